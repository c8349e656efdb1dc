"""A member's side at its edges (#19, written against the mutation survivors
of ``core/_member.py``): what a proof earns in whole lamports, the duration
cap of an interrupted proof, the end reason of a part stopped without a
cause, the outputs list's wire body, and the exact actions of every
delivery path (first send, resend, not tracked, given up, backoff cap)."""

from __future__ import annotations

from test_member import CERT, JOB, A, S, part

from p2pgpu.core._actions import CancelTimer, DeliveryDone, Emit, HandOver, Send, SetTimer
from p2pgpu.core._codec import decode
from p2pgpu.core._envelope import body_of, envelope_from_obj
from p2pgpu.core._member import (
    Deliveries,
    MemberConfig,
    expected_earning,
    interrupted_proof,
    member_proof,
    outputs_wire,
    resend_key,
)
from p2pgpu.core._settlement import item_hash


def test_a_proof_earns_whole_lamports_and_nothing_at_no_price() -> None:
    proof = member_proof(A, job_id=JOB, cert_hash=CERT, part=part(), duration_ms_max=60_000)  # 2 GPUs x 5 s
    assert proof.proof.gpu_ms == 10_000
    assert expected_earning(proof, 3_600_000) == 10_000
    assert expected_earning(proof, 1_000) == 2  # 10_000 * 1_000 / 3_600_000 = 2.7, rounded down
    assert expected_earning(proof, 0) == 0 == expected_earning(proof, -5)


def test_an_interrupted_proof_is_capped_by_the_duration_limit() -> None:
    run = {"job_id": JOB, "cert_hash": CERT, "started_at_ms": 1_000, "gpus": ["g0", "g1"],
           "checkpoints": [(2_000, b""), (9_000, b"")], "members": [A.peer_id], "observed": {}}
    assert interrupted_proof(A, run).proof.gpu_ms == 2 * 8_000
    p = interrupted_proof(A, run, duration_ms_max=5_000).proof
    assert (p.ended_at_ms, p.gpu_ms) == (9_000, 2 * 5_000)


def test_a_part_stopped_without_a_cause_was_cancelled() -> None:
    p = member_proof(A, job_id=JOB, cert_hash=CERT, part=part(stopped=True), duration_ms_max=60_000).proof
    assert (p.end_reason, p.exit_code) == ("cancelled", 137)


def test_the_outputs_list_wire_body() -> None:
    proof = member_proof(A, job_id=JOB, cert_hash=CERT, part=part(exit_code=3), duration_ms_max=60_000)
    outs = [{"path": "out/a", "bytes": 1}]
    env = envelope_from_obj(decode(outputs_wire(A, JOB, proof, outs), canonical=True))
    assert env.signer_peer_id == A.peer_id
    assert body_of(env) == {"type": "outputs", "job_id": JOB, "peer_id": A.peer_id, "outputs": outs, "exit_code": 3,
                            "end_reason": "exited"}


def test_hand_over_every_action_and_field() -> None:
    d = Deliveries()
    wire = b"p" * 10
    assert d.hand_over(JOB, S.peer_id, [("proof", wire)], 5) == [
        HandOver(job_id=JOB, dest=S.peer_id, items=(("proof", wire),), earning=None, proof_signed=False,
                 cosigned=False, observed=None),
        Send(S.peer_id, wire), SetTimer(resend_key(JOB), 5 + 1_000)]
    marked = Deliveries().hand_over(JOB, S.peer_id, [("cosign", wire)], 5, cosigned=True, observed={"x": [1]},
                                    send_now=False)
    assert marked == [HandOver(job_id=JOB, dest=S.peer_id, items=(("cosign", wire),), cosigned=True,
                               observed={"x": [1]}), SetTimer(resend_key(JOB), 5)]  # due now, sent by the timer


def test_only_a_resend_counts_as_resent() -> None:
    d = Deliveries()
    first = d.hand_over(JOB, S.peer_id, [("proof", b"p" * 10)], 0)
    assert Emit("exec:resent") not in first
    assert d.on_timer(resend_key(JOB), 1_000) == [Emit("exec:resent"), Send(S.peer_id, b"p" * 10),
                                                 SetTimer(resend_key(JOB), 3_000)]


def test_a_delivery_not_tracked_still_goes_out_once() -> None:
    d = Deliveries(MemberConfig(pending_max=1))
    d.hand_over(JOB, S.peer_id, [("proof", b"a" * 8)], 0)
    out = d.hand_over(JOB, S.peer_id, [("outputs", b"b" * 8)], 0)
    assert out[1:3] == [Emit("exec:deliveries_not_tracked"), Send(S.peer_id, b"b" * 8)] and len(d) == 1


def test_a_delivery_given_up_says_so() -> None:
    d = Deliveries(MemberConfig(resend_ttl_ms=10_000))
    d.hand_over(JOB, S.peer_id, [("proof", b"p" * 10)], 0)
    assert d.on_timer(resend_key(JOB), 10_001) == [
        Emit("exec:delivery_given_up"), Emit("exec:delivery_expired"), DeliveryDone(JOB, item_hash(b"p" * 10),
                                                                                    "expired"),
        CancelTimer(resend_key(JOB))]


def test_the_backoff_stops_doubling_after_sixteen_resends() -> None:
    d = Deliveries(MemberConfig(resend_interval_ms_min=1, resend_interval_ms_max=10**12, resend_ttl_ms=10**15))
    d.hand_over(JOB, S.peer_id, [("proof", b"p" * 10)], 0)
    now, gaps = 0, []
    for _ in range(20):
        nxt = d.pending(JOB)[0].next_ms
        gaps.append(nxt - now)
        now = nxt
        d.on_timer(resend_key(JOB), now)
    assert gaps[:3] == [1, 2, 4] and gaps[16] == 1 << 16 and gaps[17:] == [1 << 16] * 3
