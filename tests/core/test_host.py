"""The core host (``core/_host.py``): one node's whole job protocol, driven by
the in-memory swarm (``swarm.py``) from manifest to settlement, and its own
rules table by table: de-duplication, dispatch order, local delivery,
refusals, the payer gate, payment notices, forgetting."""

from __future__ import annotations

from random import Random
from typing import Any

import pytest

from p2pgpu.core import Identity, Kind, PeerMisbehaved, Reason, seal
from p2pgpu.core._actions import (
    CheckBalance,
    Emit,
    JobSeen,
    NotVolunteering,
    PaidNotice,
    Publish,
    Refused,
    Send,
    SetTimer,
    TimerOwner,
)
from p2pgpu.core._formation import FormationConfig
from p2pgpu.core._formation_messages import Offer, Proposal, decode_message
from p2pgpu.core._formation_quota import PayerChecks
from p2pgpu.core._host import Host, HostConfig, Via
from p2pgpu.core._membership import Heartbeat, sign_heartbeat

try:
    from .swarm import PAYER, Swarm, make_advert, make_manifest
except ImportError:  # tests/core is not a package: pytest put this directory on sys.path
    from swarm import PAYER, Swarm, make_advert, make_manifest  # type: ignore[no-redef]

T0 = 1_000_000


def lifecycle(seed: int, **kw: Any) -> Swarm:
    kw.setdefault("run_ms", (2_000, 4_000))
    return Swarm(seed, workers=12, submitters=1, delay_ms=(1, 20), **kw)


# -- the whole lifecycle, through hosts only ------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_jobs_form_run_and_settle_with_every_member_owed_its_time(seed: int) -> None:
    s = lifecycle(seed)
    sub = s.submitter_ids[0]
    jobs = [s.submit_at(100 * i, sub, nodes=n, replicas=r, duration_s_max=20)
            for i, (n, r) in enumerate([(1, 1), (2, 1), (1, 2)])]
    s.run(90_000)  # past every job's formation deadline and leases: all is let go
    assert sorted(s.settled) == sorted(jobs)
    for job in jobs:
        st = s.settled[job]
        assert st.succeeded, st.reason
        for line in st.lines:
            # Owed exactly its GPUs' time at its agreed price (1000 per GPU-hour).
            assert line.status == "owed" and line.amount == line.gpu_ms * 1_000 // 3_600_000
            assert 2_000 <= line.served_ms <= 4_000
            assert len(line.cosigns) == len(st.lines) - 1  # every other member vouched for it
    # Every member's host is done with the job: no run left, no GPU held.
    for pid in s.workers:
        host = s.peers[pid].host
        assert not host.members and host.formation is not None and not host.formation.ledger.holds
        assert len(host.deliveries) == 0  # every proof and co-signature acknowledged
    assert not s.peers[sub].host.submitter.jobs  # settled jobs are forgotten
    assert not s.peers[sub].host.settlement.collections  # and their collections, at their deadlines


def test_a_crashed_member_fails_the_job_and_the_survivor_is_owed_its_time() -> None:
    s = lifecycle(3, run_ms=(20_000, 20_000))
    job = s.submit_at(0, s.submitter_ids[0], nodes=2, on_member_loss="fail")
    s.run(1_500)
    cert = s.confirmed[job]
    victim, survivor = cert.members
    s.crash_at(5_000, victim)
    s.run(120_000)
    st = s.settled[job]
    assert not st.succeeded
    lines = {ln.peer_id: ln for ln in st.lines}
    assert lines[victim].status == "missing"
    surv = lines[survivor]
    # Stopped when the loss was detected, and still owed the time it served.
    assert surv.end_reason == "member_lost" and surv.exit_code == 137 and surv.status == "owed"
    assert surv.amount == surv.gpu_ms * 1_000 // 3_600_000 > 0
    assert st.reason.startswith(f"member {cert.members.index(survivor)} ") or "member_lost" not in st.reason
    assert "sent no proof of its work" in st.reason and "another member was lost" in st.reason
    assert s.lost[job] == [victim]


def test_same_seed_same_lifecycle() -> None:
    def run(seed: int) -> list[Any]:
        s = lifecycle(seed)
        s.submit_at(0, s.submitter_ids[0], nodes=2)
        s.run(30_000)
        return [*s.trace, *[(j, st.lines) for j, st in sorted(s.settled.items())]]

    assert run(4) == run(4)


# -- the host's own rules -------------------------------------------------------------


def worker(i: int, gpus: int = 1, **host: Any) -> Host:
    ident = Identity(bytes([i]) * 32)
    h = Host(ident, HostConfig(formation=FormationConfig()), **host)
    h.set_advert(make_advert(ident, gpus=gpus, model="NVIDIA A100"), T0)
    return h


SUB = Identity(bytes([200]) * 32)


def test_a_manifest_seen_twice_reaches_the_formation_core_once() -> None:
    h = worker(1)
    sm = make_manifest(SUB, Random(1), now_ms=T0)
    first = h.on_bytes(sm.wire, T0, via=Via.TOPIC)
    assert JobSeen(sm) in first and any(isinstance(a, Publish) for a in first)  # it offered
    assert h.on_bytes(sm.wire, T0 + 5, via=Via.DIRECT) == [Emit("jobs:manifest_repeated")]


def test_each_cores_refusal_is_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """The submitter core refusing a message does not keep the formation core
    from seeing it; both refusals would come back as ``Refused``."""
    a, b = worker(1), worker(2)
    sm = make_manifest(a.identity, Random(2), now_ms=T0, nodes=2)
    a.submit(sm, T0)
    b.on_bytes(sm.wire, T0, via=Via.TOPIC)
    prop = Proposal.sign(b.identity, job_id=sm.job_id, view=0, round=0,
                         members=(b.peer_id, a.peer_id), gpus_per_member=1)

    def refuse(msg: Any, now: int) -> Any:
        raise PeerMisbehaved(Reason.BAD_PROOF, "the submitter core refuses it")

    assert a.formation is not None
    seen: list[Any] = []
    real = a.formation.on_message

    def spy(msg: Any, now: int) -> Any:
        seen.append(msg)
        return real(msg, now)

    monkeypatch.setattr(a.submitter, "on_message", refuse)
    monkeypatch.setattr(a.formation, "on_message", spy)
    acts = a.on_bytes(prop.to_bytes(), T0 + 10, via=Via.DIRECT)
    assert Refused(Reason.BAD_PROOF, "the submitter core refuses it") in acts
    assert seen == [prop]  # the formation core still saw it, after the submitter core


def test_a_nodes_own_job_is_served_by_its_own_formation_core_without_the_driver() -> None:
    h = worker(1)
    sm = make_manifest(h.identity, Random(3), now_ms=T0)
    acts = h.submit(sm, T0)
    # The manifest went to the topic, and our own formation core saw it and offered.
    assert JobSeen(sm) in acts
    offers = [decode_message(a.data) for a in acts if isinstance(a, Publish)
              and isinstance(decode_message(a.data), Offer)]
    assert offers and offers[0].peer_id == h.peer_id
    assert not any(isinstance(a, Send) and a.peer_id == h.peer_id for a in acts)  # never left to the driver


def test_only_formation_messages_travel_on_a_topic() -> None:
    h = worker(1)
    hb = sign_heartbeat(SUB, Heartbeat(job_id="ab" * 32, cert_hash=b"\x00" * 32, peer_id=SUB.peer_id, seq=1,
                                       sent_at_ms=T0, state="running", chain_head=b"\x00" * 32, checkpoints=0))
    (refused,) = h.on_bytes(hb.envelope.to_bytes(), T0, via=Via.TOPIC)
    assert isinstance(refused, Refused) and refused.reason is Reason.WRONG_KIND
    assert h.on_bytes(hb.envelope.to_bytes(), T0, via=Via.DIRECT) == [Emit("exec:heartbeat_unknown_job")]
    (bad,) = h.on_bytes(b"\x93garbage", T0, via=Via.DIRECT)
    assert isinstance(bad, Refused)


def test_payment_notices_count_only_from_the_jobs_submitter() -> None:
    job = "cd" * 32
    h = worker(1, submitter_of={job: SUB.peer_id}.get)
    body = {"type": "paid", "job_id": job, "proof_hash": b"\x01" * 32, "tx_signature": "5" * 88}
    notice, ack = h.on_bytes(seal(SUB, Kind.RESULT, body).to_bytes(), T0, via=Via.DIRECT)
    assert notice == PaidNotice(job, b"\x01" * 32, "5" * 88, None)
    assert isinstance(ack, Send) and ack.peer_id == SUB.peer_id  # acknowledged (#16.3: else resent)
    (refused,) = h.on_bytes(seal(Identity(bytes([9]) * 32), Kind.RESULT, body).to_bytes(), T0, via=Via.DIRECT)
    assert isinstance(refused, Refused) and refused.reason is Reason.UNKNOWN_JOB


def test_the_payer_gate_holds_a_strangers_manifest_for_its_payers_balance() -> None:
    h = worker(1, payer_checks=PayerChecks())
    sm = make_manifest(SUB, Random(4), now_ms=T0)
    acts = h.on_bytes(sm.wire, T0, via=Via.TOPIC)
    assert CheckBalance(PAYER, "SOL") in acts and not any(isinstance(a, Publish) for a in acts)
    low = h.on_balance(PAYER, "SOL", 0, T0 + 50)  # re-gated with the balance: refused
    assert any(isinstance(a, NotVolunteering) for a in low) and not any(isinstance(a, Publish) for a in low)
    other = make_manifest(SUB, Random(5), now_ms=T0)
    (_seen, _emit, nv) = h.on_bytes(other.wire, T0 + 60, via=Via.TOPIC)
    assert isinstance(nv, NotVolunteering) and "not volunteering" in nv.reason
    rich = worker(2, payer_checks=PayerChecks())
    rich.on_bytes(sm.wire, T0, via=Via.TOPIC)
    acts = rich.on_balance(PAYER, "SOL", 10**15, T0 + 50)
    assert any(isinstance(a, Publish) for a in acts)  # it volunteered


def test_a_long_running_submitter_never_fills_its_table() -> None:
    """#13: the submitter core never forgot a job (``Submitter.forget`` had no
    caller): after 1,024 submissions every ``job submit`` was refused."""
    h = Host(SUB, HostConfig(formation=FormationConfig(formation_timeout_ms=1_000)))
    rng = Random(6)
    now = T0
    timers: dict[Any, int] = {}
    for _ in range(1_100):
        sm = make_manifest(SUB, rng, now_ms=now)
        for a in h.submit(sm, now):
            if isinstance(a, SetTimer):
                timers[a.key] = a.at_ms
        now += 50
        for key, at in sorted(((k, at) for k, at in timers.items() if at <= now), key=lambda kv: kv[1]):
            del timers[key]
            for a in h.on_timer(key, now):
                if isinstance(a, SetTimer):
                    timers[a.key] = a.at_ms
    assert len(h.submitter.jobs) <= FormationConfig().jobs_max
    assert any(k.owner is TimerOwner.SUBMITTER and k.name == "forget" for k in timers)
