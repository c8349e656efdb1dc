"""The settlement core (``core/_settlement.py``), table-driven: what a member
sends in, what must be stored and acknowledged, when the job settles, what
each member is owed and the job's outcome in words."""

from __future__ import annotations

from random import Random
from typing import Any

import pytest

from p2pgpu.core import Identity, PeerMisbehaved, Reason
from p2pgpu.core._actions import (
    CollectionOpened,
    Emit,
    ItemTaken,
    LateLine,
    LogsTaken,
    LookupCollection,
    Send,
    SetTimer,
    Settled,
    TimerKey,
    TimerOwner,
)
from p2pgpu.core._envelope import Kind, seal
from p2pgpu.core._formation_messages import Accept, Certificate, Proposal
from p2pgpu.core._manifest import Manifest, sign_manifest
from p2pgpu.core._proof import CheckpointChain, Cosign, Proof, sign_cosign, sign_proof
from p2pgpu.core._settlement import ProofAck, Settlement, item_hash, outcome, part_words

T0 = 1_800_000_000_000
PAYER = "11111111111111111111111111111111"
#: Members' payout addresses (Solana addresses, as accepts must carry).
ADDRS = ("So11111111111111111111111111111111111111112", "SysvarC1ock11111111111111111111111111111111",
         "SysvarRent111111111111111111111111111111111")
S, A, B, C = (Identity.from_rng(Random(i)) for i in (1, 2, 3, 4))
SETTLE = "settle"


def manifest(*, nodes: int = 2, replicas: int = 1, quorum: int = 1) -> Any:
    m = Manifest(name="pair", submitter=S.peer_id, created_at_ms=T0, expires_at_ms=T0 + 600_000,
                 nonce=b"n" * 16, nodes=nodes, replicas=replicas, quorum=quorum, gpus_per_node=1,
                 command=("true",), duration_s_max=60, price_per_gpu_hour_max=3_600_000, payer=PAYER)
    return sign_manifest(S, m)


def certificate(job_id: str, members: tuple[Identity, ...]) -> Certificate:
    prop = Proposal.sign(members[0], job_id=job_id, view=0, round=0, members=tuple(i.peer_id for i in members),
                         gpus_per_member=1)
    accepts = tuple(Accept.sign(i, proposal=prop, lease_until_ms=T0 + 60_000, price_per_gpu_hour=3_600_000,
                                payout_address=ADDRS[k]) for k, i in enumerate(members))
    return Certificate(proposal=prop, accepts=accepts)


def proof(me: Identity, job: str, cert: Certificate, *, ran_ms: int = 5_000, exit_code: int = 0,
          end_reason: str = "exited", digest: bytes = b"\x07" * 32) -> bytes:
    chain = CheckpointChain(job, cert.digest, me.peer_id)
    return sign_proof(me, Proof(job_id=job, cert_hash=cert.digest, peer_id=me.peer_id, gpus=("g",),
                                started_at_ms=T0, ended_at_ms=T0 + ran_ms, gpu_ms=ran_ms, exit_code=exit_code,
                                end_reason=end_reason, output_digest=digest, checkpoints=(),
                                chain_head=chain.head)).wire


def cosign(observer: Identity, subject: Identity, job: str, cert: Certificate, *, seen_ms: int = 5_000) -> bytes:
    return sign_cosign(observer, Cosign(job_id=job, cert_hash=cert.digest, subject=subject.peer_id,
                                        observer=observer.peer_id, first_seen_ms=T0, last_seen_ms=T0 + seen_ms,
                                        heartbeats=seen_ms // 500, last_chain_head=b"")).wire


class Bench:
    def __init__(self, members: tuple[Identity, ...] = (A, B), **terms: Any) -> None:
        self.sm = manifest(nodes=terms.pop("nodes", len(members)), **terms)
        self.job = self.sm.job_id
        self.cert = certificate(self.job, members)
        self.s = Settlement(S)
        self.opened = self.s.open(self.sm, self.cert, T0)

    def settled(self, actions: list[Any]) -> Settled:
        found = [a for a in actions if isinstance(a, Settled)]
        assert len(found) == 1, actions
        return found[0]


def acks(actions: list[Any]) -> list[tuple[str, str]]:
    """(to, status) of every proof_ack among the actions."""
    from p2pgpu.core import open_envelope

    out = []
    for a in actions:
        if isinstance(a, Send):
            env, body = open_envelope(a.data, expected=Kind.RESULT)
            ack = ProofAck.from_body(body, env.signer_peer_id)
            out.append((a.peer_id, ack.status))
    return out


def test_open_stores_the_collection_and_sets_the_deadline() -> None:
    b = Bench()
    opened, timer = b.opened
    assert isinstance(opened, CollectionOpened) and opened.payout_addresses == {A.peer_id: ADDRS[0], B.peer_id: ADDRS[1]}
    assert timer == SetTimer(TimerKey(TimerOwner.SETTLEMENT, b.job, SETTLE), T0 + 60_000 + 30_000)
    assert b.s.open(b.sm, b.cert, T0 + 5) == []  # once


def test_a_proof_is_stored_then_acknowledged_once() -> None:
    b = Bench()
    p = proof(A, b.job, b.cert)
    acts = b.s.on_proof(p, T0 + 5_100)
    assert isinstance(acts[0], ItemTaken) and acts[0].item_hash == item_hash(p) and acts[0].received_ms == T0 + 5_100
    assert acks(acts) == [(A.peer_id, "recorded")]
    again = b.s.on_proof(p, T0 + 6_000)  # our ack was lost: A resends
    assert acks(again) == [(A.peer_id, "recorded")] and not any(isinstance(a, ItemTaken) for a in again)
    other = b.s.on_proof(proof(A, b.job, b.cert, ran_ms=4_000), T0 + 6_000)  # a second, different proof
    assert acks(other) == [(A.peer_id, "ignored")]
    with pytest.raises(PeerMisbehaved) as exc:
        b.s.on_proof(proof(C, b.job, b.cert), T0 + 6_000)
    assert exc.value.reason is Reason.NOT_A_MEMBER


def test_complete_collection_settles_at_once_and_owes_each_its_time() -> None:
    b = Bench()
    b.s.on_proof(proof(A, b.job, b.cert), T0 + 5_100)
    b.s.on_proof(proof(B, b.job, b.cert), T0 + 5_100)
    b.s.on_cosign(cosign(A, B, b.job, b.cert), T0 + 5_200)
    s = b.settled(b.s.on_cosign(cosign(B, A, b.job, b.cert), T0 + 5_200))
    assert s.succeeded and s.reason == ""
    assert [(ln.status, ln.amount, ln.payout_address) for ln in s.lines] == [("owed", 5_000, ADDRS[0]),
                                                                           ("owed", 5_000, ADDRS[1])]
    assert [len(ln.cosigns) for ln in s.lines] == [1, 1]
    late = b.s.on_proof(proof(A, b.job, b.cert, ran_ms=4_000), T0 + 9_000)
    assert acks(late) == [(A.peer_id, "late")]
    # Forgotten at its deadline; after that the driver's store answers.
    assert b.s.on_timer(TimerKey(TimerOwner.SETTLEMENT, b.job, SETTLE), T0 + 90_000) == []
    assert b.job not in b.s.collections
    assert isinstance(b.s.on_proof(proof(A, b.job, b.cert), T0 + 90_001)[0], LookupCollection)


def test_all_proofs_in_waits_for_cosignatures_then_settles() -> None:
    b = Bench()
    b.s.on_proof(proof(A, b.job, b.cert), T0 + 5_100)
    acts = b.s.on_proof(proof(B, b.job, b.cert), T0 + 5_100)
    key = TimerKey(TimerOwner.SETTLEMENT, b.job, SETTLE)
    assert SetTimer(key, T0 + 5_100 + 8_000) in acts and not any(isinstance(a, Settled) for a in acts)
    s = b.settled(b.s.on_timer(key, T0 + 13_100))
    # Neither co-signed anyone: each had nobody there to vouch for it, the window bounds it.
    assert s.succeeded and [ln.status for ln in s.lines] == ["owed", "owed"]


def test_a_stopped_proof_does_not_wait_for_proofs_that_will_not_come() -> None:
    b = Bench()
    acts = b.s.on_proof(proof(A, b.job, b.cert, exit_code=137, end_reason="member_lost"), T0 + 5_100)
    assert SetTimer(TimerKey(TimerOwner.SETTLEMENT, b.job, SETTLE), T0 + 13_100) in acts


@pytest.mark.parametrize("exit_code,end_reason,words", [
    (3, "exited", "the command exited with code 3"),
    (137, "time_limit", "time limit reached"),
    (137, "memory_limit", "memory limit reached"),
    (137, "cancelled", "cancelled by the submitter"),
    (137, "member_lost", "stopped: another member was lost"),
    (137, "interrupted", "the worker restarted in the middle of the job"),
])
def test_a_failed_part_is_owed_its_time_and_the_reason_is_words(exit_code: int, end_reason: str,
                                                                 words: str) -> None:
    b = Bench((A,))
    s = b.settled(b.s.on_proof(proof(A, b.job, b.cert, exit_code=exit_code, end_reason=end_reason), T0 + 5_100))
    assert not s.succeeded and s.lines[0].status == "owed" and s.lines[0].amount == 5_000
    assert s.reason == f"member 0 ({A.peer_id[:12]}): {words}"


def test_missing_and_refused_proofs_say_why() -> None:
    b = Bench()
    # A claims 50 s although its results came 5.1 s after the confirmation.
    b.s.on_proof(proof(A, b.job, b.cert, ran_ms=50_000), T0 + 5_100)
    s = b.settled(b.s.on_timer(TimerKey(TimerOwner.SETTLEMENT, b.job, SETTLE), T0 + 90_000))
    assert [ln.status for ln in s.lines] == ["rejected", "missing"]
    assert s.lines[0].reason.startswith("its proof was refused (over_window: served 50000 ms, but only 5100 ms")
    assert s.lines[1].reason == "sent no proof of its work" and s.lines[1].amount == 0
    assert "owed" not in s.reason and "missing" not in s.reason


def test_replica_outcomes_are_words_and_a_tie_pays_the_time() -> None:
    b = Bench((A, B, C), nodes=1, replicas=3, quorum=2)
    b.s.on_proof(proof(A, b.job, b.cert), T0 + 5_100)
    b.s.on_proof(proof(B, b.job, b.cert, digest=b"\x08" * 32), T0 + 5_100)
    s = b.settled(b.s.on_timer(TimerKey(TimerOwner.SETTLEMENT, b.job, SETTLE), T0 + 90_000))
    assert [ln.status for ln in s.lines] == ["no_quorum", "no_quorum", "missing"]
    assert "the replicas did not agree on an output" in s.reason
    # Nobody can tell which replica is right: each is owed the time it served.
    assert [ln.amount for ln in s.lines] == [5_000, 5_000, 0]
    b = Bench((A, B, C), nodes=1, replicas=3, quorum=2)
    for who, digest in ((A, b"\x07"), (B, b"\x07"), (C, b"\x09")):
        b.s.on_proof(proof(who, b.job, b.cert, digest=digest * 32), T0 + 5_100)
    s = b.settled(b.s.on_timer(TimerKey(TimerOwner.SETTLEMENT, b.job, SETTLE), T0 + 90_000))
    assert s.succeeded and [ln.status for ln in s.lines] == ["owed", "owed", "outside_quorum"]
    assert s.lines[2].amount == 0 and s.lines[2].reason == "its output differs from the one the other replicas agreed on"


def test_a_cosignature_is_needed_only_where_another_member_was_there_to_give_one() -> None:
    # C co-signed B but never A, and A heard C: C was watching and saw
    # nothing of A, so A's proof has nobody vouching for it.
    b = Bench((A, B, C), nodes=3)
    b.s.on_proof(proof(A, b.job, b.cert), T0 + 5_100)
    b.s.on_proof(proof(B, b.job, b.cert), T0 + 5_100)
    b.s.on_cosign(cosign(C, B, b.job, b.cert), T0 + 5_100)
    b.s.on_cosign(cosign(A, C, b.job, b.cert), T0 + 5_100)
    s = b.settled(b.s.on_timer(TimerKey(TimerOwner.SETTLEMENT, b.job, SETTLE), T0 + 90_000))
    assert [ln.status for ln in s.lines] == ["rejected", "owed", "missing"]
    assert "not_observed" in s.lines[0].reason
    assert len(s.lines[2].cosigns) == 1  # a missing member's line still carries what was seen of it


def test_a_watcher_a_partition_kept_from_a_member_is_not_asked_to_vouch_for_it() -> None:
    """``smoke.toml`` seed 100 (#13): in a 3-member job a partition kept A
    from C; C still heard B once and co-signed it, so C counted as watching
    and A's proof was refused (``not_observed``: 0 usable co-signatures) for
    the 10 s it ran.  A never heard C either: C's silence says nothing about
    A, and A's time is bounded by the submitter's window, as a lone member's is."""
    b = Bench((A, B, C), nodes=3)
    b.s.on_cosign(cosign(C, B, b.job, b.cert, seen_ms=500), T0 + 5_100)  # C heard B once
    b.s.on_cosign(cosign(A, B, b.job, b.cert), T0 + 5_100)  # A heard only B, whose word never came
    b.s.on_proof(proof(A, b.job, b.cert), T0 + 5_100)
    s = b.settled(b.s.on_timer(TimerKey(TimerOwner.SETTLEMENT, b.job, SETTLE), T0 + 90_000))
    assert [ln.status for ln in s.lines] == ["owed", "missing", "missing"]
    assert s.lines[0].amount == 5_000
    # Its claim is still bounded by the window: one beyond what the submitter saw is refused.
    b = Bench((A, B, C), nodes=3)
    b.s.on_cosign(cosign(C, B, b.job, b.cert, seen_ms=500), T0 + 5_100)
    b.s.on_proof(proof(A, b.job, b.cert, ran_ms=50_000), T0 + 5_100)
    s = b.settled(b.s.on_timer(TimerKey(TimerOwner.SETTLEMENT, b.job, SETTLE), T0 + 90_000))
    assert (s.lines[0].status, s.lines[0].fault) == ("rejected", "OVER_WINDOW"), s.lines[0]


def test_a_message_for_a_job_not_open_here_is_looked_up_in_the_store() -> None:
    b = Bench()
    stranger = manifest(nodes=1).job_id[:-1] + "0"
    p = proof(A, b.job, b.cert)
    b.s.collections.clear()
    (look,) = b.s.on_proof(p, T0)
    assert look == LookupCollection(b.job, A.peer_id, item_hash(p))
    assert acks(b.s.stored_ack(b.job, A.peer_id, item_hash(p), members=[A.peer_id, B.peer_id],
                               stored=True)) == [(A.peer_id, "recorded")]
    assert acks(b.s.stored_ack(b.job, A.peer_id, item_hash(p), members=[A.peer_id], stored=False)) == [
        (A.peer_id, "late")]
    for members, reason in ((None, Reason.UNKNOWN_JOB), ([B.peer_id], Reason.NOT_A_MEMBER)):
        with pytest.raises(PeerMisbehaved) as exc:
            b.s.stored_ack(stranger, A.peer_id, item_hash(p), members=members, stored=False)
        assert exc.value.reason is reason


def test_restore_replays_the_stored_items_and_waits_for_resends() -> None:
    b = Bench()
    p = proof(A, b.job, b.cert)
    s2 = Settlement(S)
    acts = s2.restore(b.sm, b.cert, confirmed_at_ms=T0, deadline_ms=T0 + 90_000, payout_addresses={},
                      items=[("proof", A.peer_id, p, T0 + 5_100), ("proof", B.peer_id, b"garbage", T0)],
                      now_ms=T0 + 600_000)
    assert Emit("settlement.stored_item_refused") in acts
    assert SetTimer(TimerKey(TimerOwner.SETTLEMENT, b.job, SETTLE), T0 + 600_000 + 25_000) in acts
    col = s2.collections[b.job]
    assert col.results_at_ms == {A.peer_id: T0 + 5_100} and list(col.proofs) == [A.peer_id]
    assert acks(s2.on_proof(p, T0 + 600_001)) == [(A.peer_id, "recorded")]  # its resend, already stored


def test_a_cancelled_job_says_so() -> None:
    b = Bench((A,))
    b.s.note_cancel(b.job, "cancelled by the submitter")
    s = b.settled(b.s.on_proof(proof(A, b.job, b.cert, ran_ms=2_000, exit_code=137, end_reason="cancelled"),
                               T0 + 2_100))
    assert not s.succeeded and s.reason == "cancelled by the submitter" and s.lines[0].amount == 2_000
    assert s.cancelled  # the node keeps the job "cancelled", not "failed", when proofs settle it
    other = Bench((A,))  # the same proof without a cancellation: a failed job, not a cancelled one
    f = other.settled(other.s.on_proof(proof(A, other.job, other.cert, ran_ms=2_000, exit_code=137,
                                             end_reason="cancelled"), T0 + 2_100))
    assert not f.succeeded and not f.cancelled


def test_logs_new_batches_only_within_limits() -> None:
    b = Bench()

    def batch(seq: int, n: int) -> tuple[dict[str, Any], bytes]:
        body = {"type": "log", "job_id": b.job, "peer_id": A.peer_id, "seq": seq,
                "lines": [[i, "o", "x"] for i in range(n)]}
        return body, seal(A, Kind.RESULT, body).to_bytes()

    body, wire = batch(1, 3)
    (taken,) = b.s.on_result(body, A.peer_id, wire, T0)
    assert isinstance(taken, LogsTaken) and taken.seq == 1 and len(taken.lines) == 3 and taken.member_index == 0
    assert b.s.on_result(body, A.peer_id, wire, T0) == [Emit("settlement.logs_repeated")]
    body, wire = batch(2, 2_000)
    (taken,) = b.s.on_result(body, A.peer_id, wire, T0)
    assert len(taken.lines) == 1_000  # one batch's limit
    with pytest.raises(PeerMisbehaved):
        b.s.on_result(body, B.peer_id, wire, T0)  # not signed by the peer it names


def test_a_proof_held_up_past_settlement_is_still_owed_until_the_deadline() -> None:
    """#13 (found by the simulator): a partition between a member and the
    submitter held its proof up; the job settled 8 s after the other
    member's stopped proof, and the honest member's late proof went unpaid."""
    b = Bench()
    key = TimerKey(TimerOwner.SETTLEMENT, b.job, SETTLE)
    b.s.on_proof(proof(A, b.job, b.cert, ran_ms=3_000, exit_code=137, end_reason="member_lost"), T0 + 3_100)
    s = b.settled(b.s.on_timer(key, T0 + 11_100))
    assert [ln.status for ln in s.lines] == ["owed", "missing"]
    acts = b.s.on_proof(proof(B, b.job, b.cert, ran_ms=3_000, exit_code=137, end_reason="member_lost"),
                        T0 + 40_000)
    assert acks(acts) == [(B.peer_id, "recorded")] and any(isinstance(a, ItemTaken) for a in acts)
    (late,) = [a for a in acts if isinstance(a, LateLine)]
    assert late.line.peer_id == B.peer_id and late.line.status == "owed" and late.line.amount == 3_000
    # Once is all: its resend is acknowledged, not owed again.
    again = b.s.on_proof(proof(B, b.job, b.cert, ran_ms=3_000, exit_code=137, end_reason="member_lost"),
                         T0 + 41_000)
    assert acks(again) == [(B.peer_id, "recorded")] and not any(isinstance(a, LateLine) for a in again)
    # After the deadline a late proof is late: the member was away too long.
    b2 = Bench()
    b2.s.on_proof(proof(A, b2.job, b2.cert, ran_ms=3_000, exit_code=137, end_reason="member_lost"), T0 + 3_100)
    b2.s.on_timer(key.__class__(key.owner, b2.job, SETTLE), T0 + 11_100)
    b2.s.on_timer(key.__class__(key.owner, b2.job, SETTLE), T0 + 90_000)
    assert isinstance(b2.s.on_proof(proof(B, b2.job, b2.cert), T0 + 90_001)[0], LookupCollection)


def test_outcome_needs_quorum_clean_exits_per_rank() -> None:
    assert part_words("exited", 0) == ""
    assert outcome([], 1, 1) == (False, "")


def test_proof_ack_bodies_refuse_what_is_not_an_ack() -> None:
    with pytest.raises(PeerMisbehaved):
        ProofAck.from_body({"type": "proof_ack"}, A.peer_id)
    ack = ProofAck(job_id="ab" * 32, submitter=S.peer_id, items=(b"\x00" * 32,), status="late")
    assert ProofAck.from_body(ack.to_body(), S.peer_id) == ack
