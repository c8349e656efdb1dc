"""A member's side of a job (``core/_member.py``): the proof's rules and the
deliveries to the submitter, resent until acknowledged."""

from __future__ import annotations

from random import Random

import pytest

from p2pgpu.core import Identity, PeerMisbehaved, Reason
from p2pgpu.core._actions import CancelTimer, DeliveryDone, HandOver, Send, SetTimer
from p2pgpu.core._member import (
    Deliveries,
    Delivery,
    MemberConfig,
    PartEnded,
    member_proof,
    resend_key,
)
from p2pgpu.core._proof import Checkpoint, CheckpointChain
from p2pgpu.core._settlement import ProofAck, item_hash

S, A, B = (Identity.from_rng(Random(i)) for i in (1, 2, 3))
JOB = "ab" * 32
CERT = b"\x05" * 32


def part(**kw: object) -> PartEnded:
    base: dict[str, object] = {"started_at_ms": 1_000, "ended_at_ms": 6_000, "exit_code": 0, "end_reason": "exited",
                               "gpus": ("g0", "g1")}
    base.update(kw)
    return PartEnded(**base)  # type: ignore[arg-type]


def test_an_honest_part_proves_its_gpus_times_its_span() -> None:
    p = member_proof(A, job_id=JOB, cert_hash=CERT, part=part(), duration_ms_max=60_000).proof
    assert (p.started_at_ms, p.ended_at_ms, p.gpu_ms, p.exit_code, p.end_reason) == (1_000, 6_000, 10_000, 0, "exited")


def test_gpu_time_is_capped_by_the_duration_limit() -> None:
    p = member_proof(A, job_id=JOB, cert_hash=CERT, part=part(ended_at_ms=100_000), duration_ms_max=10_000).proof
    assert p.gpu_ms == 2 * 10_000


def test_a_stopped_part_carries_the_cause_it_was_stopped_for() -> None:
    p = member_proof(A, job_id=JOB, cert_hash=CERT, part=part(stopped=True, exit_code=0, end_reason="exited"),
                     duration_ms_max=60_000, stop_cause="member_lost").proof
    assert (p.exit_code, p.end_reason) == (137, "member_lost")
    p = member_proof(A, job_id=JOB, cert_hash=CERT, part=part(end_reason="ray_error"), duration_ms_max=60_000).proof
    assert p.end_reason == "sandbox_error"


def test_a_member_cut_off_claims_no_further_than_it_was_vouched_for_nor_before_its_last_checkpoint() -> None:
    chain = CheckpointChain(JOB, CERT, A.peer_id)
    chain.add(3_000)
    p = member_proof(A, job_id=JOB, cert_hash=CERT, part=part(checkpoints=tuple(chain.checkpoints)),
                     duration_ms_max=60_000, vouched_until_ms=2_000).proof
    assert p.ended_at_ms == 3_000 and p.chain_head == chain.head  # the chain still verifies
    p = member_proof(A, job_id=JOB, cert_hash=CERT, part=part(), duration_ms_max=60_000,
                     vouched_until_ms=4_500).proof
    assert p.ended_at_ms == 4_500 and p.gpu_ms == 2 * 3_500


def ack(signer: Identity, items: list[bytes], status: str = "recorded") -> dict[str, object]:
    return ProofAck(job_id=JOB, submitter=signer.peer_id, items=tuple(items), status=status).to_body()


def test_hand_over_stores_first_then_sends_and_resends_with_backoff() -> None:
    d = Deliveries()
    items = [("proof", b"p" * 10), ("outputs", b"o" * 10)]
    acts = d.hand_over(JOB, S.peer_id, items, 0, earning=(b"\x01" * 32, 7, "SOL"), proof_signed=True)
    assert isinstance(acts[0], HandOver) and acts[0].earning == (b"\x01" * 32, 7, "SOL")
    assert [a for a in acts if isinstance(a, Send)] == [Send(S.peer_id, w) for _, w in items]
    assert acts[-1] == SetTimer(resend_key(JOB), 1_000)
    sends = []
    for at in (1_000, 3_000, 7_000, 15_000, 30_000, 45_000):
        out = d.on_timer(resend_key(JOB), at)
        sends.append(sum(isinstance(a, Send) for a in out))
        assert out[-1] == SetTimer(resend_key(JOB), at + min(15_000, 1_000 << (len(sends))))
    assert sends == [2] * 6


def test_only_the_submitter_a_message_went_to_may_acknowledge_it() -> None:
    d = Deliveries()
    d.hand_over(JOB, S.peer_id, [("proof", b"p" * 10)], 0)
    h = item_hash(b"p" * 10)
    with pytest.raises(PeerMisbehaved) as exc:
        d.on_ack(ack(B, [h]), B.peer_id)
    assert exc.value.reason is Reason.NOT_A_MEMBER and len(d) == 1
    acts = d.on_ack(ack(S, [h]), S.peer_id)
    assert DeliveryDone(JOB, h, "recorded") in acts and CancelTimer(resend_key(JOB)) in acts and len(d) == 0
    assert [a.metric for a in d.on_ack(ack(S, [h]), S.peer_id)] == ["exec:ack_nothing_pending"]  # type: ignore[union-attr]


def test_deliveries_are_given_up_after_their_lifetime() -> None:
    d = Deliveries(MemberConfig(resend_ttl_ms=10_000))
    d.hand_over(JOB, S.peer_id, [("proof", b"p" * 10)], 0)
    acts = d.on_timer(resend_key(JOB), 10_001)
    assert DeliveryDone(JOB, item_hash(b"p" * 10), "expired") in acts and len(d) == 0


def test_restored_deliveries_go_out_when_the_timers_run_and_are_bounded() -> None:
    d = Deliveries(MemberConfig(pending_max=1))
    stored = [Delivery(item_hash=item_hash(w), job_id=JOB, dest=S.peer_id, kind="proof", wire=w, created_ms=0)
              for w in (b"a" * 8, b"b" * 8)]
    acts = d.restore(stored, 50_000)
    assert len(d) == 1 and not any(isinstance(a, Send) for a in acts)
    assert SetTimer(resend_key(JOB), 50_000) in acts
    assert sum(isinstance(a, Send) for a in d.on_timer(resend_key(JOB), 50_000)) == 1


def test_interrupted_proof_is_the_time_up_to_the_last_checkpoint() -> None:
    from p2pgpu.core._member import interrupted_cosigns, interrupted_proof

    run = {"job_id": JOB, "cert_hash": CERT, "started_at_ms": 1_000, "gpus": ["g"],
           "checkpoints": [(2_000, b""), (3_000, b"")], "members": [A.peer_id, B.peer_id],
           "observed": {B.peer_id: [1_100, 2_900, 5, (b"\x00" * 32).hex()]}}
    p = interrupted_proof(A, run).proof
    assert (p.ended_at_ms, p.gpu_ms, p.end_reason, p.exit_code) == (3_000, 2_000, "interrupted", 137)
    assert p.checkpoints == (Checkpoint(t_ms=2_000, info=b""), Checkpoint(t_ms=3_000, info=b""))
    (cs,) = interrupted_cosigns(A, run)
    assert cs.cosign.subject == B.peer_id and cs.cosign.observed_ms == 1_800
