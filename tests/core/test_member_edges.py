"""A member's side at its edges (#19, written against the mutation survivors
of ``core/_member.py``): what a proof earns in whole lamports, the duration
cap of an interrupted proof, the end reason of a part stopped without a
cause, the outputs list's wire body, and the exact actions of every
delivery path (first send, resend, not tracked, given up, backoff cap)."""

from __future__ import annotations

from test_member import CERT, JOB, A, B, S, part

from p2pgpu.core._actions import (
    CancelTimer,
    DeliveryDone,
    Emit,
    HandOver,
    Send,
    SetTimer,
    TimerKey,
    TimerOwner,
)
from p2pgpu.core._codec import decode
from p2pgpu.core._envelope import body_of, envelope_from_obj
from p2pgpu.core._member import (
    Deliveries,
    Delivery,
    MemberConfig,
    expected_earning,
    interrupted_cosigns,
    interrupted_proof,
    member_proof,
    outputs_wire,
    resend_key,
)
from p2pgpu.core._proof import Checkpoint, chain_heads
from p2pgpu.core._settlement import ack_wire, item_hash


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


# -- written against the sample of 300 (seed 1) of core/_member.py at d8f036e ---------------


def test_an_hour_at_no_price_earns_nothing() -> None:
    """``expected_earning__mutmut_7`` (``max(0, price)`` to ``max(1, ...)``:
    a GPU-hour at a price of 0 would earn 1)."""
    proof = member_proof(A, job_id=JOB, cert_hash=CERT, part=part(ended_at_ms=1_000 + 3_600_000, gpus=("g0",)),
                         duration_ms_max=4_000_000)
    assert proof.proof.gpu_ms == 3_600_000 and expected_earning(proof, 0) == 0
    assert expected_earning(proof, 1) == 1


def test_an_interrupted_proof_ends_at_its_last_checkpoint_and_chains_every_one() -> None:
    """``interrupted_proof__mutmut_6`` (the checkpoints' info dropped),
    ``_18`` (no checkpoint: ended at the start), ``_19``, ``_83`` (the last
    checkpoint and the last head, not the second)."""
    cps = [(2_000, b"a"), (5_000, b"b"), (9_000, b"c")]
    run = {"job_id": JOB, "cert_hash": CERT, "started_at_ms": 1_000, "gpus": ["g0"], "checkpoints": cps,
           "members": [A.peer_id], "observed": {}}
    p = interrupted_proof(A, run).proof
    assert p.checkpoints == tuple(Checkpoint(t_ms=t, info=i) for t, i in cps)
    assert (p.ended_at_ms, p.gpu_ms) == (9_000, 8_000)
    assert p.chain_head == chain_heads(JOB, CERT, A.peer_id, p.checkpoints)[-1]
    bare = interrupted_proof(A, {**run, "checkpoints": []}).proof
    assert (bare.ended_at_ms, bare.gpu_ms, bare.checkpoints) == (1_000, 0, ())
    assert bare.chain_head == chain_heads(JOB, CERT, A.peer_id, ())[-1]


def test_interrupted_cosignatures_only_of_others_seen() -> None:
    """``interrupted_cosigns__mutmut_8`` (``or`` to ``and``): ourselves and a
    member never seen get no co-signature."""
    run = {"job_id": JOB, "cert_hash": CERT, "members": [A.peer_id, B.peer_id, S.peer_id],
           "observed": {B.peer_id: [1_000, 9_000, 17, "00" * 32]}}
    (cs,) = interrupted_cosigns(A, run)
    c = cs.cosign
    assert (c.subject, c.observer, c.first_seen_ms, c.last_seen_ms, c.heartbeats) == (B.peer_id, A.peer_id, 1_000,
                                                                                        9_000, 17)


def test_a_part_that_names_no_gpu_proves_a_simulated_one() -> None:
    """``member_proof__mutmut_48``."""
    assert member_proof(A, job_id=JOB, cert_hash=CERT, part=part(gpus=()), duration_ms_max=60_000).proof.gpus == \
        ("simulated",)


def test_the_outbox_keeps_each_item_once_with_its_kind_and_forgets_an_emptied_job() -> None:
    """``resend_key__mutmut_7`` (the timer's name), ``_track__mutmut_2``
    (the same item tracked twice), ``hand_over__mutmut_24`` (its kind),
    ``_done__mutmut_14`` (a job left behind once its last item is acknowledged),
    ``pending__mutmut_3``, ``_5`` (an unknown job)."""
    assert resend_key(JOB) == TimerKey(TimerOwner.DELIVERY, JOB, "resend")
    d = Deliveries()
    assert d.pending("cd" * 32) == []
    d.hand_over(JOB, S.peer_id, [("proof", b"p" * 10)], 0)
    again = d.hand_over(JOB, S.peer_id, [("proof", b"p" * 10)], 1)
    assert Emit("exec:deliveries_not_tracked") in again and len(d) == 1
    assert [x.kind for x in d.pending(JOB)] == ["proof"]
    body = body_of(envelope_from_obj(decode(ack_wire(S, JOB, [item_hash(b"p" * 10)], "recorded"), canonical=True)))
    d.on_ack(body, S.peer_id)
    assert JOB not in d.by_job and len(d) == 0


def test_a_delivery_expires_by_its_age_and_one_expiring_does_not_drop_anothers_resend() -> None:
    """``on_timer__mutmut_6`` (``now - created`` to ``now + created``) and
    ``_8`` (``+=`` to ``=``: the actions before an expired item lost)."""
    cfg = MemberConfig(resend_ttl_ms=10_000)
    d = Deliveries(cfg)
    d.hand_over(JOB, S.peer_id, [("proof", b"p" * 10)], 5_000)
    assert Send(S.peer_id, b"p" * 10) in d.on_timer(resend_key(JOB), 6_000)  # 1 s old: resent
    late = Deliveries(cfg)
    late.restore([Delivery(item_hash=item_hash(b"n" * 10), job_id=JOB, dest=S.peer_id, kind="proof", wire=b"n" * 10,
                           created_ms=5_000),
                  Delivery(item_hash=item_hash(b"o" * 10), job_id=JOB, dest=S.peer_id, kind="cosign", wire=b"o" * 10,
                           created_ms=0)], 10_001)
    acts = late.on_timer(resend_key(JOB), 10_001)
    assert Send(S.peer_id, b"n" * 10) in acts and Emit("exec:delivery_given_up") in acts


def test_a_restore_schedules_every_job_and_counts_every_item_not_tracked() -> None:
    """``restore__mutmut_4`` and ``_15`` (``+=`` to ``=``)."""
    d = Deliveries(MemberConfig(pending_max=1))
    items = [Delivery(item_hash=item_hash(w), job_id=j, dest=S.peer_id, kind="proof", wire=w, created_ms=0)
             for j, w in ((JOB, b"a" * 8), ("cd" * 32, b"b" * 8), ("ef" * 32, b"c" * 8))]
    acts = d.restore(items, 100)
    assert acts.count(Emit("exec:deliveries_not_tracked")) == 2
    assert SetTimer(resend_key(JOB), 100) in acts and CancelTimer(resend_key("cd" * 32)) in acts
    assert CancelTimer(resend_key("ef" * 32)) in acts
