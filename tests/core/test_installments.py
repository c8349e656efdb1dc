"""Pay as you go (``core/_installments.py``), table-driven: the manifest's
``payment.interval_s``, the member's claims and its stop when unpaid, the
submitter's checks (interval boundaries, a claim beyond what passed or what
co-signers saw, replays, restarts) and the final remainder."""

from __future__ import annotations

from random import Random
from typing import Any

import pytest

from p2pgpu.core import Identity, PeerMisbehaved, Reason
from p2pgpu.core._actions import (
    CancelTimer,
    Emit,
    InstallmentsOwed,
    ItemTaken,
    LookupCollection,
    Send,
    SetTimer,
    Settled,
    StopJob,
)
from p2pgpu.core._codec import decode
from p2pgpu.core._envelope import body_of, envelope_from_obj
from p2pgpu.core._formation_messages import Accept, Certificate, Proposal
from p2pgpu.core._installments import (
    UNPAID,
    Claim,
    InstallmentConfig,
    Installments,
    claim_timer,
    claim_wire,
    due_timer,
    installment_key,
    interval_amount,
    member_installments,
)
from p2pgpu.core._manifest import Manifest, ManifestError, manifest_from_doc, sign_manifest
from p2pgpu.core._proof import CheckpointChain, Cosign, Proof, sign_cosign, sign_proof
from p2pgpu.core._settlement import ProofAck, Settlement

T0 = 1_800_000_000_000
PAYER = "11111111111111111111111111111111"
ADDRS = ("So11111111111111111111111111111111111111112", "SysvarC1ock11111111111111111111111111111111",
         "SysvarRent111111111111111111111111111111111")
S, A, B, X = (Identity.from_rng(Random(i)) for i in (11, 12, 13, 14))
I_S = 10
I_MS = I_S * 1000
PRICE = 3_600_000  # 1,000 per GPU-second: one 10 s interval of one GPU earns 10,000
CFG = InstallmentConfig(grace_ms=5_000, claim_delay_ms=2_000)


def manifest(*, nodes: int = 1, interval_s: int = I_S, duration_s_max: int = 60, **kw: Any) -> Any:
    return sign_manifest(S, Manifest(
        name="payg", submitter=S.peer_id, created_at_ms=T0, expires_at_ms=T0 + 600_000, nonce=b"p" * 16,
        nodes=nodes, gpus_per_node=1, command=("true",), duration_s_max=duration_s_max,
        price_per_gpu_hour_max=PRICE, payer=PAYER, interval_s=interval_s, **kw))


def certificate(job_id: str, members: tuple[Identity, ...]) -> Certificate:
    prop = Proposal.sign(members[0], job_id=job_id, view=0, round=0, members=tuple(i.peer_id for i in members),
                         gpus_per_member=1)
    return Certificate(proposal=prop, accepts=tuple(
        Accept.sign(i, proposal=prop, lease_until_ms=T0 + 60_000, price_per_gpu_hour=PRICE, payout_address=ADDRS[k])
        for k, i in enumerate(members)))


def cosign(observer: Identity, subject: Identity, job: str, cert: Certificate, seen_ms: int) -> bytes:
    return sign_cosign(observer, Cosign(job_id=job, cert_hash=cert.digest, subject=subject.peer_id,
                                        observer=observer.peer_id, first_seen_ms=T0, last_seen_ms=T0 + seen_ms,
                                        heartbeats=max(1, seen_ms // 500), last_chain_head=b"")).wire


class Bench:
    """A submitter's installments of one confirmed job at ``T0``."""

    def __init__(self, members: tuple[Identity, ...] = (A,), **terms: Any) -> None:
        self.sm = manifest(nodes=len(members), **terms)
        self.job = self.sm.job_id
        self.cert = certificate(self.job, members)
        self.inst = Installments(S, CFG)
        self.addresses = {i.peer_id: ADDRS[k] for k, i in enumerate(members)}
        self.inst.open(self.sm, self.cert, T0, self.addresses)

    def claim(self, me: Identity, k: int, *, cosigns: tuple[bytes, ...] = (), cert: Certificate | None = None
              ) -> bytes:
        return claim_wire(me, Claim(job_id=self.job, peer_id=me.peer_id, cert_hash=(cert or self.cert).digest,
                                    interval=k, chain_head=b"\x01" * 32, cosigns=cosigns))

    def send(self, wire: bytes, now_ms: int, inst: Installments | None = None) -> list[Any]:
        env = envelope_from_obj(decode(wire, size_max=1 << 16, canonical=True))
        return (inst or self.inst).on_claim(body_of(env), env.signer_peer_id, wire, now_ms)


def owed_rows(actions: list[Any]) -> list[tuple[str, int, int]]:
    return [(r.peer_id, r.interval, r.amount) for a in actions if isinstance(a, InstallmentsOwed) for r in a.rows]


def ack_status(actions: list[Any]) -> list[str]:
    out = []
    for a in actions:
        if isinstance(a, Send):
            env = envelope_from_obj(decode(a.data, size_max=1 << 16, canonical=True))
            out.append(ProofAck.from_body(body_of(env), env.signer_peer_id).status)
    return out


# -- the manifest field ---------------------------------------------------------------


def test_interval_is_validated_and_absent_keeps_the_job_id() -> None:
    base: dict[str, Any] = {"name": "x", "submitter": S.peer_id, "created_at_ms": T0, "expires_at_ms": T0 + 1,
                            "nonce": b"p" * 16, "command": ("true",), "payer": PAYER, "duration_s_max": 600}
    assert "interval_s" not in Manifest(**base).to_obj()["payment"]
    assert Manifest(**base, interval_s=10).to_obj()["payment"]["interval_s"] == 10
    for bad in (1, 9, -5):
        with pytest.raises(ManifestError, match="payment.interval_s"):
            Manifest(**base, interval_s=bad)
    with pytest.raises(ManifestError, match="at most 4096 intervals"):
        Manifest(**{**base, "duration_s_max": 7 * 24 * 3600}, interval_s=10)
    # On the wire an explicit 0 (never canonical) or a tiny interval is the sender's fault.
    body = Manifest(**base, interval_s=10).to_obj()
    for wrong in (0, 2, "10"):
        body["payment"]["interval_s"] = wrong
        with pytest.raises(PeerMisbehaved):
            Manifest.from_obj(body)
    body["payment"]["interval_s"] = 30
    assert Manifest.from_obj(body).interval_s == 30


@pytest.mark.parametrize(("payment", "duration", "default", "want"), [
    ({}, 600, 300, 300),          # a long job gets the default interval
    ({}, 60, 300, 0),             # a short one is paid at the end only
    ({"interval_s": 0}, 600, 300, 0),
    ({"interval_s": 20}, 600, 300, 20),
    ({}, 60, 10, 10),             # a network with a short default (the devnet's)
])
def test_toml_default_interval(payment: dict[str, int], duration: int, default: int, want: int) -> None:
    doc = {"runtime": {"command": ["true"], "duration_s_max": duration}, "payment": {"payer": PAYER, **payment}}
    m = manifest_from_doc(doc, submitter=S.peer_id, now_ms=T0, rng=Random(1), interval_s_default=default)
    assert m.interval_s == want


def test_toml_interval_below_the_minimum_says_what_to_do() -> None:
    doc = {"runtime": {"command": ["true"], "duration_s_max": 600}, "payment": {"payer": PAYER, "interval_s": 1}}
    with pytest.raises(ManifestError, match="at least 10 seconds"):
        manifest_from_doc(doc, submitter=S.peer_id, now_ms=T0, rng=Random(1))


# -- the member's side -------------------------------------------------------------------


def member(**kw: Any) -> Any:
    pay = member_installments(manifest(**kw), peer_id=A.peer_id, price_per_gpu_hour=PRICE, config=CFG)
    assert pay is not None
    return pay


def test_member_claims_at_each_boundary_and_not_beyond_the_duration() -> None:
    pay = member(duration_s_max=25)  # two whole intervals
    job = pay.job_id
    assert pay.start(T0) == [SetTimer(claim_timer(job), T0 + I_MS + 2_000)]
    assert pay.claim_due(T0 + I_MS) == (None, [SetTimer(claim_timer(job), T0 + I_MS + 2_000)])  # early firing
    k, actions = pay.claim_due(T0 + I_MS + 2_000)
    assert k == 1
    assert SetTimer(claim_timer(job), T0 + 2 * I_MS + 2_000) in actions
    assert SetTimer(due_timer(job), T0 + I_MS + 2_000 + 5_000) in actions
    assert pay.on_paid(installment_key(job, A.peer_id, 1))[0] == Emit("installments:paid")
    k, actions = pay.claim_due(T0 + 2 * I_MS + 2_000)
    assert k == 2 and not any(isinstance(a, SetTimer) and a.key == claim_timer(job) for a in actions)
    assert pay.claim_due(T0 + 3 * I_MS + 2_000) == (None, [])
    assert pay.amount == interval_amount(PRICE, 1, I_MS) == 10_000


def test_member_stops_when_a_payment_is_overdue_and_says_why() -> None:
    pay = member()
    pay.start(T0)
    pay.claim_due(T0 + I_MS + 2_000)
    due = T0 + I_MS + 2_000 + 5_000
    assert pay.on_due(due - 1) == [SetTimer(due_timer(pay.job_id), due)]  # not yet
    # A notice for another key (another member's, another job's) pays nothing of ours.
    assert pay.on_paid(installment_key(pay.job_id, B.peer_id, 1)) == []
    out = pay.on_due(due)
    stop = [a for a in out if isinstance(a, StopJob)]
    assert stop and stop[0].cause == UNPAID
    assert "did not pay interval 1" in stop[0].reason and "0 of 1 intervals paid" in stop[0].reason
    assert CancelTimer(claim_timer(pay.job_id)) in out
    assert pay.claim_due(T0 + 2 * I_MS + 2_000) == (None, [])  # no claims after stopping
    assert pay.on_due(due + 10_000) == []


def test_member_paid_in_time_keeps_working() -> None:
    pay = member()
    pay.start(T0)
    pay.claim_due(T0 + I_MS + 2_000)
    assert pay.on_paid(installment_key(pay.job_id, A.peer_id, 1)) == [Emit("installments:paid"),
                                                                       CancelTimer(due_timer(pay.job_id))]
    assert not any(isinstance(a, StopJob) for a in pay.on_due(T0 + I_MS + 60_000))
    assert pay.finish() == [CancelTimer(due_timer(pay.job_id))]


def test_a_member_whose_part_ended_keeps_sending_its_cosignatures_while_it_watches() -> None:
    """Found by the simulator: a member whose part ended sent no more co-signatures,
    so the other member's later intervals were never observed, never paid, and
    that honest member stopped for want of payment."""
    pay = member()
    pay.start(T0)
    assert pay.claim_due(T0 + I_MS + 2_000)[0] == 1
    assert pay.finish() == [CancelTimer(due_timer(pay.job_id))] and not pay.due_ms  # no deadline after our part
    k, actions = pay.claim_due(T0 + 2 * I_MS + 2_000)
    assert k == 0 and SetTimer(claim_timer(pay.job_id), T0 + 3 * I_MS + 2_000) in actions  # co-signatures only
    assert pay.claimed == 1 and not any(isinstance(a, SetTimer) and a.key == due_timer(pay.job_id)
                                        for a in actions)
    assert pay.close() == [CancelTimer(claim_timer(pay.job_id)), CancelTimer(due_timer(pay.job_id))]
    assert pay.claim_due(T0 + 3 * I_MS + 2_000) == (None, [])


def test_cosignatures_alone_release_a_held_interval() -> None:
    b = Bench((A, B))
    b.send(b.claim(A, 1, cosigns=(cosign(A, B, b.job, b.cert, 11_500),)), T0 + 12_000)
    b.send(b.claim(B, 1, cosigns=(cosign(B, A, b.job, b.cert, 11_500),)), T0 + 12_000)
    # A's part ended; B claims its second interval: only 11.5 s of B were observed.
    out = b.send(b.claim(B, 2, cosigns=(cosign(B, A, b.job, b.cert, 15_000),)), T0 + 22_000)
    assert owed_rows(out) == [] and Emit("installments:claim_held") in out
    # A, still watching, sends what it saw of B (interval 0: nothing claimed for itself).
    out = b.send(b.claim(A, 0, cosigns=(cosign(A, B, b.job, b.cert, 21_600),)), T0 + 22_100)
    assert owed_rows(out) == [(B.peer_id, 2, 10_000)]
    assert b.inst.intervals_owed(b.job, A.peer_id) == 1  # A's own count did not move


def test_no_installments_without_an_interval() -> None:
    assert member_installments(manifest(interval_s=0), peer_id=A.peer_id, price_per_gpu_hour=PRICE) is None


# -- the submitter's side -----------------------------------------------------------------


def test_a_claim_is_stored_owed_once_then_acknowledged() -> None:
    b = Bench()
    wire = b.claim(A, 1)
    out = b.send(wire, T0 + I_MS + 2_500)
    kinds = [type(a).__name__ for a in out if not isinstance(a, Emit)]
    assert kinds == ["ItemTaken", "InstallmentsOwed", "Send"]  # stored, owed, then acknowledged
    owed = next(a for a in out if isinstance(a, InstallmentsOwed))
    assert owed.rows[0].key == installment_key(b.job, A.peer_id, 1)
    assert owed.rows[0].payout_address == ADDRS[0] and owed.currency == "SOL"
    assert owed_rows(out) == [(A.peer_id, 1, 10_000)] and ack_status(out) == ["recorded"]
    # The same claim again (a resend, a replay): acknowledged, never owed twice.
    again = b.send(wire, T0 + I_MS + 9_000)
    assert owed_rows(again) == [] and ack_status(again) == ["recorded"]
    assert b.inst.prepaid(b.job, A.peer_id) == 10_000


def test_interval_boundaries_owe_whole_intervals_only() -> None:
    b = Bench()
    # Claim 2 comes late (claim 1 was lost): both are owed, each once, each keyed apart.
    out = b.send(b.claim(A, 2), T0 + 2 * I_MS + 2_000)
    assert owed_rows(out) == [(A.peer_id, 1, 10_000), (A.peer_id, 2, 10_000)]
    keys = [r.key for a in out if isinstance(a, InstallmentsOwed) for r in a.rows]
    assert len(set(keys)) == 2
    assert owed_rows(b.send(b.claim(A, 1), T0 + 2 * I_MS + 3_000)) == []  # an older claim adds nothing


def test_claiming_more_intervals_than_served_is_refused() -> None:
    b = Bench()
    # 15 s after the confirmation nobody has served two 10 s intervals.
    with pytest.raises(PeerMisbehaved) as err:
        b.send(b.claim(A, 2), T0 + 15_000)
    assert err.value.reason is Reason.BAD_PROOF and "only 15000 ms passed" in err.value.detail
    assert b.inst.prepaid(b.job, A.peer_id) == 0
    # Within the tolerance (1 s floor) of the boundary: accepted.
    assert owed_rows(b.send(b.claim(A, 1), T0 + I_MS - 900)) == [(A.peer_id, 1, 10_000)]


@pytest.mark.parametrize("hostile", ["stranger", "wrong_cert", "beyond_duration", "forged_signer"])
def test_hostile_claims_are_refused(hostile: str) -> None:
    b = Bench()
    if hostile == "stranger":
        wire = b.claim(X, 1)
    elif hostile == "wrong_cert":
        wire = b.claim(A, 1, cert=certificate(b.job, (A, B)))
    elif hostile == "beyond_duration":
        wire = b.claim(A, 7)  # a 60 s job has six 10 s intervals
    else:
        body = Claim(job_id=b.job, peer_id=A.peer_id, cert_hash=b.cert.digest, interval=1,
                     chain_head=b"\x01" * 32).to_body()
        with pytest.raises(PeerMisbehaved) as err:
            b.inst.on_claim(body, X.peer_id, b"x", T0 + 3_600_000)
        assert err.value.reason is Reason.SIGNER_MISMATCH
        return
    with pytest.raises(PeerMisbehaved):
        b.send(wire, T0 + 3_600_000)
    assert b.inst.prepaid(b.job, A.peer_id) == 0 and b.inst.prepaid(b.job, X.peer_id) == 0


def test_a_claim_beyond_what_the_cosigners_saw_is_held_until_they_see_it() -> None:
    b = Bench((A, B))
    # B's first claim: nobody has co-signed anyone yet, so the window alone bounds B (the
    # final proofs' rule: a co-signature is asked for only from those who gave one).
    out = b.send(b.claim(B, 1, cosigns=(cosign(B, A, b.job, b.cert, 12_000),)), T0 + 12_000)
    assert owed_rows(out) == [(B.peer_id, 1, 10_000)]
    # A claims two intervals at 22 s, but B (a watcher now) saw A for 12 s: one is owed, one held.
    out = b.send(b.claim(A, 2, cosigns=(cosign(A, B, b.job, b.cert, 22_000),)), T0 + 22_000)
    assert owed_rows(out) == [(A.peer_id, 1, 10_000)] and Emit("installments:claim_held") in out
    assert b.inst.intervals_owed(b.job, A.peer_id) == 1
    # B's next claim carries a co-signature covering A's second interval: now owed, once.
    out = b.send(b.claim(B, 2, cosigns=(cosign(B, A, b.job, b.cert, 22_000),)), T0 + 22_100)
    assert owed_rows(out) == [(A.peer_id, 2, 10_000), (B.peer_id, 2, 10_000)]
    assert b.inst.intervals_owed(b.job, A.peer_id) == 2


def test_a_liar_claiming_beyond_what_its_peer_saw_is_not_paid_for_it() -> None:
    b = Bench((A, B))
    b.send(b.claim(A, 1), T0 + 12_000)
    b.send(b.claim(B, 1, cosigns=(cosign(B, A, b.job, b.cert, 12_000),)), T0 + 12_000)
    # A saw B (the liar) for 5 s only; B claims a second interval anyway.
    out = b.send(b.claim(A, 2, cosigns=(cosign(A, B, b.job, b.cert, 5_000),)), T0 + 24_000)
    assert owed_rows(out) == []
    out = b.send(b.claim(B, 2, cosigns=(cosign(B, A, b.job, b.cert, 23_000),)), T0 + 24_000)
    assert owed_rows(out) == [(A.peer_id, 2, 10_000)]  # A's second is observed; B's is not
    assert b.inst.intervals_owed(b.job, B.peer_id) == 1


def test_a_claim_after_settlement_is_late_and_owes_nothing() -> None:
    b = Bench()
    b.inst.close(b.job)
    out = b.send(b.claim(A, 1), T0 + 12_000)
    assert owed_rows(out) == [] and ack_status(out) == ["late"]
    b.inst.forget(b.job)
    out = b.send(b.claim(A, 1), T0 + 12_000)
    assert [type(a) for a in out] == [LookupCollection]  # answered from the store


def test_a_restart_replays_stored_claims_to_the_same_keys() -> None:
    b = Bench((A, B))
    stored: list[tuple[str, bytes, int]] = []
    rows: list[Any] = []
    for me, other, k, t in ((A, B, 1, 12_000), (B, A, 1, 12_100), (A, B, 2, 22_000), (B, A, 2, 22_100)):
        wire = b.claim(me, k, cosigns=(cosign(me, other, b.job, b.cert, t),))
        out = b.send(wire, T0 + t)
        if any(isinstance(a, ItemTaken) for a in out):
            stored.append((me.peer_id, wire, T0 + t))
        rows += [r for a in out if isinstance(a, InstallmentsOwed) for r in a.rows]
    fresh = Installments(S, CFG)
    fresh.open(b.sm, b.cert, T0, b.addresses)
    replayed = [r for sender, wire, t in stored for a in fresh.restore_claim(b.job, sender, wire, t)
                if isinstance(a, InstallmentsOwed) for r in a.rows]
    assert sorted(r.key for r in replayed) == sorted(r.key for r in rows) and len(rows) == 4
    for peer in (A.peer_id, B.peer_id):
        assert fresh.prepaid(b.job, peer) == b.inst.prepaid(b.job, peer) == 20_000


def test_final_settlement_pays_only_the_remainder() -> None:
    b = Bench()
    b.send(b.claim(A, 2), T0 + 22_000)
    s = Settlement(S, prepaid=b.inst.prepaid)
    s.open(b.sm, b.cert, T0)
    chain = CheckpointChain(b.job, b.cert.digest, A.peer_id)
    wire = sign_proof(A, Proof(job_id=b.job, cert_hash=b.cert.digest, peer_id=A.peer_id, gpus=("g",),
                               started_at_ms=T0, ended_at_ms=T0 + 25_000, gpu_ms=25_000, exit_code=0,
                               end_reason="exited", output_digest=b"\x07" * 32, checkpoints=(),
                               chain_head=chain.head)).wire
    settled = next(a for a in s.on_proof(wire, T0 + 26_000) if isinstance(a, Settled))
    line = settled.lines[0]
    assert line.prepaid == 20_000 and line.amount == 25_000 - 20_000 and line.payable
    assert line.to_json()["prepaid"] == 20_000


def test_installments_never_exceed_the_final_amount_by_more_than_they_paid() -> None:
    """A member that was paid two intervals and then proves less is owed no remainder (never negative)."""
    b = Bench()
    b.send(b.claim(A, 2), T0 + 22_000)
    s = Settlement(S, prepaid=b.inst.prepaid)
    s.open(b.sm, b.cert, T0)
    chain = CheckpointChain(b.job, b.cert.digest, A.peer_id)
    wire = sign_proof(A, Proof(job_id=b.job, cert_hash=b.cert.digest, peer_id=A.peer_id, gpus=("g",),
                               started_at_ms=T0, ended_at_ms=T0 + 15_000, gpu_ms=15_000, exit_code=0,
                               end_reason=UNPAID, output_digest=b"", checkpoints=(), chain_head=chain.head)).wire
    settled = next(a for a in s.on_proof(wire, T0 + 26_000) if isinstance(a, Settled))
    assert settled.lines[0].amount == 0 and not settled.lines[0].payable
    assert "did not pay an interval" in settled.reason
