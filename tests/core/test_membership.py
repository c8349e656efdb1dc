"""Cluster membership: heartbeats, loss detection, policies, and co-signed proofs.

Table-driven tests of one core (event in, actions out), then a small
virtual-time swarm that routes the cores' actions between members with a
fixed latency and crashes a member on cue.
"""

from __future__ import annotations

import dataclasses
import heapq
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pgpu.core import Identity, Kind, PeerMisbehaved, Reason, seal
from p2pgpu.core._actions import CancelTimer, Emit, MemberLost, Send, SetTimer, StopJob, TimerKey, TimerOwner
from p2pgpu.core._membership import (
    MEMBER_TRANSITIONS,
    Heartbeat,
    Membership,
    MemberStatus,
    decode_heartbeat,
    sign_heartbeat,
)
from p2pgpu.core._proof import (
    CheckpointChain,
    Proof,
    ProofTerms,
    output_digest,
    sign_proof,
    verify_proof,
)

RNG = random.Random(11)
A, B, C, OUTSIDER = (Identity.from_rng(RNG) for _ in range(4))
JOB = "cd" * 32
HB_KEY = TimerKey(TimerOwner.MEMBERSHIP, JOB, "heartbeat")
CHECK_KEY = TimerKey(TimerOwner.MEMBERSHIP, JOB, "check")
CERT_HASH = b"\x42" * 32
MEMBERS = (A.peer_id, B.peer_id, C.peer_id)
HB, TIMEOUT, GRACE = 1_000, 5_000, 2_000


def core(identity: Identity = A, policy: str = "fail") -> Membership:
    return Membership(identity=identity, job_id=JOB, cert_hash=CERT_HASH, members=MEMBERS, policy=policy,
                      heartbeat_interval_ms=HB, member_timeout_ms=TIMEOUT, start_grace_ms=GRACE)


def beat(sender: Identity, seq: int, *, sent_at_ms: int = 0, state: str = "running", job_id: str = JOB,
         head: bytes = b"\x00" * 32) -> bytes:
    hb = Heartbeat(job_id=job_id, cert_hash=CERT_HASH, peer_id=sender.peer_id, seq=seq, sent_at_ms=sent_at_ms,
                   state=state, chain_head=head, checkpoints=0)
    return sign_heartbeat(sender, hb).envelope.to_bytes()


def of(actions: list[Any], kind: type) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


# --- one core, event in, actions out ------------------------------------------------

def test_start_beats_to_everyone_and_sets_timers() -> None:
    m = core()
    actions = m.start(1_000)
    assert sorted(a.peer_id for a in of(actions, Send)) == sorted([B.peer_id, C.peer_id])
    assert of(actions, SetTimer) == [SetTimer(HB_KEY, 2_000),
                                     SetTimer(CHECK_KEY, 1_000 + GRACE + TIMEOUT + 1)]
    hb = decode_heartbeat(of(actions, Send)[0].data).heartbeat
    assert (hb.seq, hb.state, hb.sent_at_ms) == (1, "running", 1_000)
    assert of(m.on_timer(HB_KEY, 2_000), Send)[0].data != of(actions, Send)[0].data


def test_heartbeats_carry_the_chain_head() -> None:
    m = core()
    m.start(0)
    m.set_progress(b"\x07" * 32, 3)
    hb = decode_heartbeat(of(m.on_timer(HB_KEY, HB), Send)[0].data).heartbeat
    assert hb.chain_head == b"\x07" * 32 and hb.checkpoints == 3


# name, heartbeat bytes, expected reason
BAD_HEARTBEATS = [
    ("not a member", lambda: beat(OUTSIDER, 1), Reason.NOT_A_MEMBER),
    ("another job", lambda: beat(B, 1, job_id="ef" * 32), Reason.UNKNOWN_JOB),
    ("signer is not the sender", lambda: seal(C, Kind.HEARTBEAT, decode_heartbeat(beat(B, 1)).heartbeat.to_obj())
     .to_bytes(), Reason.SIGNER_MISMATCH),
    ("from the future", lambda: beat(B, 1, sent_at_ms=10**9), Reason.NOT_YET_VALID),
    ("not a heartbeat", lambda: seal(B, Kind.PROOF, {"x": 1}).to_bytes(), Reason.WRONG_KIND),
    ("garbage", lambda: b"\xc1", Reason.MALFORMED),
]


@pytest.mark.parametrize("name,make,reason", BAD_HEARTBEATS, ids=[b[0] for b in BAD_HEARTBEATS])
def test_bad_heartbeats_are_refused(name: str, make: Any, reason: Reason) -> None:
    m = core()
    m.start(0)
    with pytest.raises(PeerMisbehaved) as err:
        m.on_heartbeat(make(), 100)
    assert err.value.reason is reason
    assert m.seen[B.peer_id].heartbeats == 0


def test_replayed_heartbeat_is_refused() -> None:
    m = core()
    m.start(0)
    m.on_heartbeat(beat(B, 5), 100)
    for seq in (5, 4):
        with pytest.raises(PeerMisbehaved) as err:
            m.on_heartbeat(beat(B, seq), 200)
        assert err.value.reason is Reason.REPLAYED
    assert m.seen[B.peer_id].heartbeats == 1


def test_observations_are_recorded_in_our_time() -> None:
    m = core()
    m.start(0)
    for i, t in enumerate((300, 1_300, 2_300), start=1):
        m.on_heartbeat(beat(B, i, sent_at_ms=t - 250, head=bytes([i]) * 32), t)
    o = m.seen[B.peer_id]
    assert (o.first_seen_ms, o.last_seen_ms, o.heartbeats, o.chain_head) == (300, 2_300, 3, b"\x03" * 32)
    c = m.cosign(B.peer_id)
    assert c is not None and (c.first_seen_ms, c.last_seen_ms, c.heartbeats) == (300, 2_300, 3)
    assert m.cosign(C.peer_id) is None


# policy, what the loss of C causes at A
LOSS_TABLE = [
    ("fail", [MemberLost, Emit, StopJob, Send, CancelTimer, SetTimer], "failed"),
    ("continue", [MemberLost, Emit, SetTimer], "running"),
]


@pytest.mark.parametrize("policy,kinds,state", LOSS_TABLE, ids=[t[0] for t in LOSS_TABLE])
def test_silent_member_is_lost_exactly_at_the_timeout(policy: str, kinds: list[type], state: str) -> None:
    m = core(policy=policy)
    m.start(0)
    m.on_heartbeat(beat(B, 1), 500)
    m.on_heartbeat(beat(C, 1), 600)
    # B keeps beating; C falls silent after 600 ms.
    for i, t in enumerate(range(1_500, 6_000, 1_000), start=2):
        m.on_heartbeat(beat(B, i), t)
    assert m.on_timer(CHECK_KEY, 600 + TIMEOUT) == [SetTimer(CHECK_KEY,
                                                                           600 + TIMEOUT + 1)]
    actions = m.on_timer(CHECK_KEY, 600 + TIMEOUT + 1)
    assert [type(a) for a in actions] == kinds
    assert of(actions, MemberLost)[0].peer_id == C.peer_id
    assert m.seen[C.peer_id].status is MemberStatus.LOST and m.state == state
    if policy == "fail":
        sent = of(actions, Send)
        assert [s.peer_id for s in sent] == [B.peer_id], "the lost member is not told"
        assert decode_heartbeat(sent[0].data).heartbeat.state == "failed"


def test_never_heard_member_gets_the_start_grace() -> None:
    m = core(policy="continue")
    m.start(0)
    m.on_heartbeat(beat(B, 1), 100)
    m.on_heartbeat(beat(B, 2), GRACE + TIMEOUT)
    assert of(m.on_timer(CHECK_KEY, GRACE + TIMEOUT), MemberLost) == []
    lost = of(m.on_timer(CHECK_KEY, GRACE + TIMEOUT + 1), MemberLost)
    assert [x.peer_id for x in lost] == [C.peer_id]


def test_a_failed_member_stops_the_job_here() -> None:
    m = core()
    m.start(0)
    actions = m.on_heartbeat(beat(B, 1, state="failed"), 700)
    assert of(actions, StopJob) and m.state == "failed"
    assert m.seen[B.peer_id].status is MemberStatus.FAILED


def test_finished_members_are_not_lost_and_the_job_ends_when_all_are_done() -> None:
    m = core()
    m.start(0)
    m.on_heartbeat(beat(B, 1), 100)
    m.on_heartbeat(beat(C, 1), 100)
    m.on_heartbeat(beat(B, 2, state="finished"), 900)
    m.on_heartbeat(beat(C, 2), 5_000)
    assert of(m.on_timer(CHECK_KEY, 900 + TIMEOUT + 1), MemberLost) == []
    actions = m.finish(6_000)
    # B finished too, and may still be watching others: it hears our last beat.
    assert {a.peer_id for a in of(actions, Send)} == {B.peer_id, C.peer_id}
    assert CancelTimer(HB_KEY) in actions and not m.done
    assert m.on_timer(HB_KEY, 7_000) == []
    m.on_heartbeat(beat(C, 3, state="finished"), 8_000)
    assert m.done and m.alive() == []


def test_a_member_that_finished_first_still_hears_and_vouches_for_the_others_to_their_end() -> None:
    """#13 (found by the simulator running membership): a member kept beating
    only to members still running, so one that finished first stopped hearing
    the others and co-signed only up to its own end: the longer-running
    member's honest proof was refused (``OVER_OBSERVED``) and it went unpaid."""
    sw = swarm("fail")
    sw.run(30_000, finish_at={A.peer_id: 4_000, B.peer_id: 12_000, C.peer_id: 12_000})
    seen_b = sw.cores[A.peer_id].cosign(B.peer_id)
    assert seen_b is not None and seen_b.last_seen_ms >= 12_000 - sw.cores[B.peer_id].heartbeat_interval_ms
    assert sw.cores[A.peer_id].done


def test_lost_member_stays_lost() -> None:
    assert (MemberStatus.LOST, "heartbeat") not in MEMBER_TRANSITIONS
    m = core(policy="continue")
    m.start(0)
    m.on_heartbeat(beat(B, 1), 10)
    m.on_timer(CHECK_KEY, GRACE + TIMEOUT + 1)
    assert m.seen[C.peer_id].status is MemberStatus.LOST
    assert m.on_heartbeat(beat(C, 1), GRACE + TIMEOUT + 50) == [Emit("membership_heartbeats_ignored")]
    assert m.cosign(C.peer_id) is None


def test_misuse_is_a_local_error() -> None:
    from p2pgpu.core import LocalProtocolError
    with pytest.raises(LocalProtocolError):
        Membership(identity=OUTSIDER, job_id=JOB, cert_hash=CERT_HASH, members=MEMBERS, policy="fail")
    with pytest.raises(LocalProtocolError):
        Membership(identity=A, job_id=JOB, cert_hash=CERT_HASH, members=MEMBERS, policy="replace")
    m = core()
    m.start(0)
    with pytest.raises(LocalProtocolError):
        m.start(1)


# --- a swarm on virtual time ---------------------------------------------------------------

@dataclasses.dataclass
class Swarm:
    """Routes Send/SetTimer actions between cores with a fixed latency."""

    cores: dict[str, Membership]
    latency_ms: int = 20
    now_ms: int = 0
    crashed: dict[str, int] = dataclasses.field(default_factory=dict)
    log: list[tuple[int, str, Any]] = dataclasses.field(default_factory=list)
    chains: dict[str, CheckpointChain] = dataclasses.field(default_factory=dict)
    _q: list[tuple[int, int, str, str, Any]] = dataclasses.field(default_factory=list)
    _n: int = 0
    _timers: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)

    def push(self, at: int, peer: str, kind: str, arg: Any) -> None:
        self._n += 1
        heapq.heappush(self._q, (at, self._n, peer, kind, arg))

    def apply(self, peer: str, actions: list[Any]) -> None:
        for a in actions:
            self.log.append((self.now_ms, peer, a))
            if isinstance(a, Send):
                self.push(self.now_ms + self.latency_ms, a.peer_id, "msg", a.data)
            elif isinstance(a, SetTimer):
                self._timers[(peer, a.key)] = a.at_ms
                self.push(a.at_ms, peer, "timer", a.key)
            elif isinstance(a, CancelTimer):
                self._timers.pop((peer, a.key), None)

    def run(self, until_ms: int, *, checkpoint_every_ms: int = 0, finish_at: dict[str, int] | None = None) -> None:
        for peer, t in (finish_at or {}).items():
            self.push(t, peer, "finish", None)
        if checkpoint_every_ms:
            for peer in self.cores:
                self.push(checkpoint_every_ms, peer, "checkpoint", checkpoint_every_ms)
        while self._q and self._q[0][0] <= until_ms:
            at, _, peer, kind, arg = heapq.heappop(self._q)
            self.now_ms = at
            if peer in self.crashed and at >= self.crashed[peer]:
                continue
            m = self.cores[peer]
            if kind == "msg":
                self.apply(peer, m.on_heartbeat(arg, at))
            elif kind == "timer" and self._timers.get((peer, arg)) == at:
                del self._timers[(peer, arg)]
                self.apply(peer, m.on_timer(arg, at))
            elif kind == "finish":
                self.apply(peer, m.finish(at))
            elif kind == "checkpoint" and m.state == "running":
                chain = self.chains.setdefault(peer, CheckpointChain(JOB, CERT_HASH, peer))
                m.set_progress(chain.add(at, b"step"), len(chain.checkpoints))
                self.push(at + arg, peer, "checkpoint", arg)

    def events(self, kind: type) -> list[tuple[int, str, Any]]:
        return [(t, p, a) for t, p, a in self.log if isinstance(a, kind)]


def swarm(policy: str) -> Swarm:
    cores = {i.peer_id: core(i, policy) for i in (A, B, C)}
    sw = Swarm(cores)
    for peer, m in cores.items():
        sw.apply(peer, m.start(0))
    return sw


def test_swarm_fail_policy_stops_everyone_after_a_crash() -> None:
    sw = swarm("fail")
    sw.crashed[C.peer_id] = 3_500
    sw.run(20_000)
    last_heard = 3_000 + sw.latency_ms  # C's last heartbeat was sent at 3000
    lost = sw.events(MemberLost)
    assert {p for _, p, _ in lost} <= {A.peer_id, B.peer_id} and lost
    assert {a.peer_id for _, _, a in lost} == {C.peer_id}
    first_detection = min(t for t, _, _ in lost)
    assert first_detection == last_heard + TIMEOUT + 1
    stops = sw.events(StopJob)
    assert {p for _, p, _ in stops} == {A.peer_id, B.peer_id}
    assert max(t for t, _, _ in stops) <= first_detection + sw.latency_ms
    assert sw.cores[A.peer_id].state == sw.cores[B.peer_id].state == "failed"


def test_members_that_stop_one_after_another_still_tell_each_other() -> None:
    """#13 (found by the simulator under churn): A stops first (C failed the
    job) and tells B; B stops on hearing it, but told only the members it saw
    alive, not A, whom it knew had failed: A kept watching, heard nothing
    more from B, and took it for lost (a false ``MemberLost``)."""
    a, b = core(A), core(B)
    a.start(0)
    b.start(0)
    a.on_heartbeat(beat(B, 1), 100)
    b.on_heartbeat(beat(A, 1), 100)
    stop_a = a.on_heartbeat(beat(C, 1, state="failed"), 200)
    to_b = [s for s in of(stop_a, Send) if s.peer_id == B.peer_id]
    stop_b = b.on_heartbeat(to_b[0].data, 210)
    assert of(stop_b, StopJob)
    to_a = [s for s in of(stop_b, Send) if s.peer_id == A.peer_id]
    assert to_a, "B must tell A it stopped"
    a.on_heartbeat(to_a[0].data, 220)
    assert of(a.on_timer(CHECK_KEY, 220 + TIMEOUT + 1), MemberLost) == []
    assert a.done


def test_swarm_continue_policy_and_proofs_cover_the_time_served() -> None:
    sw = swarm("continue")
    crash_ms = 7_500
    sw.crashed[C.peer_id] = crash_ms
    sw.run(40_000, checkpoint_every_ms=2_000, finish_at={A.peer_id: 30_000, B.peer_id: 30_000})
    assert not sw.events(StopJob)
    assert {a.peer_id for _, _, a in sw.events(MemberLost)} == {C.peer_id}
    assert sw.cores[A.peer_id].done and sw.cores[B.peer_id].done

    cosigns = {i.peer_id: [] for i in (A, B, C)}  # type: dict[str, list[bytes]]
    for peer in (A.peer_id, B.peer_id):
        for sc in sw.cores[peer].cosigns():
            cosigns[sc.cosign.subject].append(sc.wire)
    cert = type("Cert", (), {"members": MEMBERS, "cert_hash": CERT_HASH})()
    terms = ProofTerms(job_id=JOB, duration_ms_max=60_000, gpus_per_member=1, price_per_gpu_hour_max=1,
                       tolerance_ms=HB + 2 * sw.latency_ms)

    def proof_of(identity: Identity, end_ms: int) -> bytes:
        chain = CheckpointChain(JOB, CERT_HASH, identity.peer_id)
        for cp in sw.chains[identity.peer_id].checkpoints:
            if cp.t_ms <= end_ms:
                chain.add(cp.t_ms, cp.info)
        p = Proof(job_id=JOB, cert_hash=CERT_HASH, peer_id=identity.peer_id, gpus=("g0",), started_at_ms=0,
                  ended_at_ms=end_ms, gpu_ms=end_ms, exit_code=0, end_reason="exited",
                  output_digest=output_digest([], b"\x00" * 32), checkpoints=tuple(chain.checkpoints),
                  chain_head=chain.head)
        return sign_proof(identity, p).wire

    for ident in (A, B):
        vp = verify_proof(proof_of(ident, 30_000), cert=cert, terms=terms, cosigns=cosigns[ident.peer_id])
        assert vp.cosigners and vp.observed_ms is not None and vp.observed_ms >= 30_000 - 2 * HB
    # C served until its crash: a proof for that is paid in full; one for the
    # whole job is paid no more than the others saw of C.
    served = verify_proof(proof_of(C, crash_ms), cert=cert, terms=terms, cosigns=cosigns[C.peer_id])
    assert served.observed_ms is not None and served.observed_ms <= crash_ms and not served.capped
    whole = verify_proof(proof_of(C, 30_000), cert=cert, terms=terms, cosigns=cosigns[C.peer_id])
    assert whole.capped and whole.bound_ms is not None and whole.paid_gpu_ms == whole.bound_ms < 30_000
    assert whole.bound_ms <= crash_ms + 2 * terms.heartbeat_interval_ms + terms.tolerance(crash_ms)


def test_swarm_is_deterministic() -> None:
    def trace() -> list[tuple[int, str, str]]:
        sw = swarm("continue")
        sw.crashed[B.peer_id] = 4_200
        sw.run(15_000, finish_at={A.peer_id: 12_000, C.peer_id: 12_500})
        return [(t, p, type(a).__name__) for t, p, a in sw.log]
    assert trace() == trace()


# --- the decoder never crashes ---------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1024))
def test_decode_heartbeat_takes_any_bytes(data: bytes) -> None:
    try:
        shb = decode_heartbeat(data)
    except PeerMisbehaved:
        return
    assert shb.envelope.kind is Kind.HEARTBEAT


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_decode_heartbeat_takes_mutated_heartbeats(data: st.DataObject) -> None:
    wire = bytearray(beat(B, 3))
    for _ in range(data.draw(st.integers(1, 4))):
        wire[data.draw(st.integers(0, len(wire) - 1))] = data.draw(st.integers(0, 255))
    m = core()
    m.start(0)
    try:
        m.on_heartbeat(bytes(wire), 100)
    except PeerMisbehaved:
        return
    assert m.seen[B.peer_id].heartbeats <= 1


@pytest.mark.parametrize("stop_when_alone", [True, False])
def test_a_member_cut_off_from_everyone(stop_when_alone: bool) -> None:
    m = Membership(identity=A, job_id=JOB, cert_hash=CERT_HASH, members=MEMBERS, policy="continue",
                   heartbeat_interval_ms=HB, member_timeout_ms=TIMEOUT, start_grace_ms=GRACE,
                   stop_when_alone=stop_when_alone)
    m.start(0)
    m.on_heartbeat(beat(B, 1), 1_000)
    m.on_heartbeat(beat(C, 1), 1_200)
    assert m.vouched_until_ms() is None
    first = m.on_timer(CHECK_KEY, 1_000 + TIMEOUT + 1)
    assert [x.peer_id for x in of(first, MemberLost)] == [B.peer_id] and not of(first, StopJob)
    assert m.vouched_until_ms() is None, "C still hears us"
    second = m.on_timer(CHECK_KEY, 1_200 + TIMEOUT + 1)
    assert [x.peer_id for x in of(second, MemberLost)] == [C.peer_id]
    assert m.vouched_until_ms() == 1_200 + HB
    assert bool(of(second, StopJob)) is stop_when_alone
    assert m.state == ("failed" if stop_when_alone else "running")
