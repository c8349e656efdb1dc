"""The host at its edges (#19, written against the mutation samples of
``core/_host.py``): what it wires together, and what no lifecycle table
reached.  Its settlement must subtract what the host's own installments
already owed (else the final line pays a member's installments a second
time), look payout addresses up through the host, and check signatures with
the verifier the host was given; the member's side hands over the right
items with the right earning and co-signatures; the submitter's side owes
claims live and after a restart; the payer gate counts what a payer already
owes here; frames are decoded canonically and bounded.  Each test names the
mutants it kills (``scripts/mutation _host --sample 300 --seed 1``)."""

from __future__ import annotations

from random import Random
from typing import Any

import msgpack
import pytest
from swarm import make_advert, make_manifest
from test_installments import ADDRS, CFG, I_MS, PAYER, A, B, S, certificate, manifest

from p2pgpu.core import Identity, Kind, PeerMisbehaved, Reason, seal
from p2pgpu.core._actions import (
    CancelTimer,
    CheckBalance,
    CheckPayment,
    Emit,
    HandOver,
    InstallmentsOwed,
    JobSeen,
    MemberDone,
    MemberMessage,
    NotVolunteering,
    PaidNotice,
    Publish,
    Refused,
    Send,
    SetTimer,
    Settled,
    StartJob,
    TimerKey,
    TimerOwner,
)
from p2pgpu.core._codec import decode, encode
from p2pgpu.core._envelope import body_of, envelope_from_obj
from p2pgpu.core._errors import LocalProtocolError
from p2pgpu.core._formation import FormationConfig
from p2pgpu.core._formation_messages import Confirm
from p2pgpu.core._formation_quota import PayerChecks, Quotas
from p2pgpu.core._host import Host, HostConfig, Via, local_messages_max, tx_signature_len_max
from p2pgpu.core._identity import verify_signature
from p2pgpu.core._installments import Claim, claim_timer, claim_wire, due_timer, installment_key
from p2pgpu.core._member import PartEnded, expected_earning
from p2pgpu.core._membership import Heartbeat, sign_heartbeat
from p2pgpu.core._notices import paid_ack_wire
from p2pgpu.core._proof import CheckpointChain, Proof, decode_proof, sign_proof
from p2pgpu.core._reputation import VerifiedPayment
from p2pgpu.core._settlement import SettlementConfig, ack_wire, settle_key


def test_the_settlement_is_wired_to_the_hosts_installments_addresses_and_verifier() -> None:
    def verify(key: bytes, message: bytes, signature: bytes) -> None:
        verify_signature(key, message, signature)

    host = Host(S, HostConfig(installments=CFG), verify=verify)
    assert host.settlement.prepaid == host.installments.prepaid
    assert host.settlement.payout_address_of == host._payout_address_of
    assert host.settlement.verify is verify


# -- written against the sample of 300 (seed 1) at 21b91e2 ------------------------------------
#
# Each test below names the mutants of ``core/_host.py`` it kills; the
# harmless or equivalent ones are explained in docs/testing.md.

T0 = 1_800_000_000_000
CLAIM_MS = T0 + I_MS + CFG.claim_delay_ms
TX, TX2 = "5" * 87, "4" * 87


def running(members: tuple[Identity, ...] = (A,), **host: Any) -> tuple[Host, Any, Any]:
    """A's host, a member of S's pay-as-you-go job (10 s intervals), started at T0."""
    sm = manifest(nodes=len(members))
    cert = certificate(sm.job_id, members)
    h = Host(A, HostConfig(installments=CFG), submitter_of={sm.job_id: S.peer_id}.get, **host)
    h._member_run(StartJob(sm.job_id, sm, cert, 0, b""))
    assert h.member_started(sm.job_id, T0)
    return h, sm, cert


def heartbeat(who: Identity, sm: Any, cert: Any, at_ms: int, seq: int = 1, state: str = "running") -> bytes:
    return sign_heartbeat(who, Heartbeat(job_id=sm.job_id, cert_hash=cert.digest, peer_id=who.peer_id, seq=seq,
                                         sent_at_ms=at_ms, state=state, chain_head=b"\x00" * 32,
                                         checkpoints=0)).envelope.to_bytes()


def handovers(actions: list[Any]) -> list[HandOver]:
    return [a for a in actions if isinstance(a, HandOver)]


def test_a_member_starts_once() -> None:
    """``member_started`` twice does not start the heartbeats and claims again
    (``member_started__mutmut_3``: ``or`` to ``and``)."""
    h, sm, _ = running()
    assert h.member_started(sm.job_id, T0 + 100) == []


def test_the_chain_head_reaches_the_membership() -> None:
    """``member_progress__mutmut_2`` (the run looked up under ``None``)."""
    h, sm, _ = running()
    h.member_progress(sm.job_id, b"\x07" * 32, 3)
    membership = h.members[sm.job_id].membership
    assert (membership.chain_head, membership.checkpoints) == (b"\x07" * 32, 3)


def test_a_claim_carries_the_cosignatures_of_what_the_member_saw() -> None:
    """The claim A hands over carries its co-signature of B (the submitter
    pays B's intervals only as far as others saw B), under A's job id
    (``_installment_timer__mutmut_39``, ``_48``)."""
    h, sm, cert = running((A, B))
    assert h.on_bytes(heartbeat(B, sm, cert, T0 + 500), T0 + 500, via=Via.DIRECT) is not None
    assert h.on_bytes(heartbeat(B, sm, cert, T0 + 9_000, seq=2), T0 + 9_000, via=Via.DIRECT) is not None
    (ho,) = handovers(h.on_timer(claim_timer(sm.job_id), CLAIM_MS))
    (kind, wire), = ho.items
    body = body_of(envelope_from_obj(decode(wire, size_max=1 << 16, canonical=True)))
    assert (ho.job_id, ho.dest, kind, body["interval"]) == (sm.job_id, S.peer_id, "claim", 1)
    assert ho.earning == (installment_key(sm.job_id, A.peer_id, 1), 10_000, sm.manifest.currency)
    assert list(body["cosigns"]) == [c.wire for c in h.members[sm.job_id].membership.cosigns()]
    assert len(body["cosigns"]) == 1


def part(sm: Any, end_ms: int) -> PartEnded:
    return PartEnded(started_at_ms=T0, ended_at_ms=end_ms, exit_code=0, end_reason="exited",
                     output_digest=b"\x05" * 32, gpus=("GPU-0",), outputs=({"path": "out.txt", "size": 3},))


def test_a_part_that_ends_hands_over_its_outputs_and_proof_and_watches_the_others() -> None:
    """The hand-over of an ended part: outputs and proof, with what the proof
    earns (``member_ended__mutmut_39``, ``_66``); the due timer of pay as you
    go cancelled (``_13``); the watch timer set while B still runs (``_92``);
    when it fires, A co-signs what it saw of B and is done, its claim timer
    cancelled (``_timer__mutmut_31``, ``_close_member__mutmut_8``, ``_11``)."""
    h, sm, cert = running((A, B))
    h.on_bytes(heartbeat(B, sm, cert, T0 + 500), T0 + 500, via=Via.DIRECT)
    job = sm.job_id
    end = T0 + 5_000
    acts = h.member_ended(job, part(sm, end), end)
    assert CancelTimer(due_timer(job)) in acts
    (ho,) = handovers(acts)
    assert [k for k, _ in ho.items] == ["outputs", "proof"]
    proof = decode_proof(ho.items[1][1])
    price = min(cert.accepts[0].price_per_gpu_hour, sm.manifest.price_per_gpu_hour_max)
    assert ho.earning == (proof.proof_hash, expected_earning(proof, price), sm.manifest.currency)
    assert ho.earning[1] > 0 and ho.proof_signed and ho.dest == S.peer_id
    cfg = h.config.member
    watch = TimerKey(TimerOwner.MEMBERSHIP, job, "watch")
    assert SetTimer(watch, end + min(cfg.watch_after_end_ms_max,
                                     sm.manifest.duration_s_max * 1000 + cfg.member_timeout_ms)) in acts
    assert job in h.members
    done = h.on_timer(watch, end + 60_000)
    assert MemberDone(job) in done and job not in h.members
    assert CancelTimer(claim_timer(job)) in done  # pay as you go closed
    (cos,) = handovers(done)
    assert cos.cosigned and [k for k, _ in cos.items] == ["cosign"] and cos.job_id == job


def test_a_member_host_believes_notices_unless_told_it_can_check_them() -> None:
    """``check_payments`` is off unless the driver says it can reach a ledger
    (``__init____mutmut_1``)."""
    h, sm, _ = running()
    h.on_timer(claim_timer(sm.job_id), CLAIM_MS)
    key = installment_key(sm.job_id, A.peer_id, 1)
    notice = seal(S, Kind.RESULT, {"type": "paid", "job_id": sm.job_id, "proof_hash": key, "tx_signature": TX})
    acts = h.on_bytes(notice.to_bytes(), CLAIM_MS + 100, via=Via.DIRECT)
    assert PaidNotice(sm.job_id, key, TX, None) in acts and not any(isinstance(a, CheckPayment) for a in acts)


def test_two_intervals_paid_by_two_transactions_both_count() -> None:
    """Each transaction is credited under its own signature
    (``payment_checked__mutmut_40``: the signature dropped made the second
    transaction look like the first one cited again)."""
    h, sm, _ = running(check_payments=True)
    job = sm.job_id
    h.on_timer(claim_timer(job), CLAIM_MS)
    h.on_timer(claim_timer(job), CLAIM_MS + I_MS)
    for k, tx in ((1, TX), (2, TX2)):
        key = installment_key(job, A.peer_id, k)
        check = CheckPayment(job, key, tx, S.peer_id, None)
        done = h.payment_checked(check, VerifiedPayment(tx_signature=tx, payer=PAYER, transfers={ADDRS[0]: 10_000}),
                                 CLAIM_MS + I_MS + k)
        assert PaidNotice(job, key, tx, None) in done, k
        assert Send(S.peer_id, paid_ack_wire(A, job_id=job, proof_hash=key)) in done


def test_a_checked_payment_of_a_job_no_longer_running_is_believed() -> None:
    """``payment_checked__mutmut_15``, ``_24``, ``_26``: no run (or no
    interval owed) is the notice believed and acknowledged, as before #16.3."""
    h = Host(A, HostConfig(installments=CFG), check_payments=True)
    job, key = "ab" * 32, b"\x03" * 32
    done = h.payment_checked(CheckPayment(job, key, TX, S.peer_id, None), None, T0)
    assert done == [PaidNotice(job, key, TX, None), Send(S.peer_id, paid_ack_wire(A, job_id=job, proof_hash=key))]


def paid(job: str, **over: Any) -> bytes:
    body = {"type": "paid", "job_id": job, "proof_hash": b"\x01" * 32, "tx_signature": TX, **over}
    return seal(S, Kind.RESULT, body).to_bytes()


def test_a_payment_notices_signature_length_on_both_sides() -> None:
    """``_paid__mutmut_30``, ``_31`` (an empty signature, and one of exactly
    the maximum), ``_35`` (its words), ``_50`` (the inclusion proof passed on)."""
    job = "cd" * 32
    h = Host(A, submitter_of={job: S.peer_id}.get)
    for sig in ("", "5" * (tx_signature_len_max + 1)):
        (refused,) = h.on_bytes(paid(job, tx_signature=sig), T0, via=Via.DIRECT)
        assert refused == Refused(Reason.BAD_SCHEMA, "payment notice needs proof_hash (32 bytes) and tx_signature")
    longest = "5" * tx_signature_len_max
    acts = h.on_bytes(paid(job, tx_signature=longest, inclusion_proof="path"), T0, via=Via.DIRECT)
    assert acts[0] == PaidNotice(job, b"\x01" * 32, longest, "path")


def test_a_message_of_no_known_kind_is_refused_as_a_wrong_kind() -> None:
    """``_dispatch__mutmut_109`` (the refusal's reason dropped)."""
    h = Host(A)
    (refused,) = h.on_bytes(encode({"k": "gossip"}), T0, via=Via.DIRECT)
    assert refused == Refused(Reason.WRONG_KIND, "unexpected message kind 'gossip'")


def test_a_non_canonical_frame_is_refused_before_it_is_read() -> None:
    """``_dispatch__mutmut_4``, ``_8``: the frame is decoded canonically, so a
    re-ordered encoding of a valid, signed payment notice is refused."""
    job = "cd" * 32
    h = Host(A, submitter_of={job: S.peer_id}.get)
    wire = paid(job)
    bent = msgpack.packb(dict(reversed(list(decode(wire).items()))), use_bin_type=True)
    assert bent != wire and decode(bent) == decode(wire)
    (refused,) = h.on_bytes(bent, T0, via=Via.DIRECT)
    assert isinstance(refused, Refused) and refused.reason is Reason.NON_CANONICAL
    assert isinstance(h.on_bytes(wire, T0, via=Via.DIRECT)[0], PaidNotice)


def refusing(key: bytes) -> Any:
    def verify(k: bytes, message: bytes, signature: bytes) -> None:
        if k == key:
            raise PeerMisbehaved(Reason.BAD_SIGNATURE, "refused by this test")
        verify_signature(k, message, signature)
    return verify


def test_formation_messages_are_checked_with_the_hosts_verifier() -> None:
    """The envelope (``_dispatch__mutmut_20``) and the signatures inside a
    formation message (``_33``: a certificate's accepts) are checked by the
    verifier the host was given, not the default."""
    sm = manifest(nodes=2)
    h = Host(A, verify=refusing(S.public_key))
    assert h.on_bytes(sm.wire, T0, via=Via.TOPIC) == [Refused(Reason.BAD_SIGNATURE, "refused by this test")]
    cert = certificate(sm.job_id, (A, B))
    confirm = Confirm.sign(S, cert, confirmed_at_ms=T0 + 1_000)
    h = Host(A, verify=refusing(B.public_key))
    acts = h.on_bytes(confirm.envelope.to_bytes(), T0 + 1_000, via=Via.DIRECT)
    assert acts == [Refused(Reason.BAD_SIGNATURE, "refused by this test")]


def test_the_host_hands_its_own_terms_to_the_cores_it_builds() -> None:
    """``__init____mutmut_17``, ``_33``, ``_38``, ``_39``, ``_40``, and
    ``set_advert__mutmut_11``: the installments get the host's configuration
    and the settlement's tolerances; the formation core its configuration and
    the hardware-claim verdicts."""
    def claims(advert: Any, now_ms: int) -> Any:
        return None

    formation = FormationConfig(lease_ms=7_000)
    settlement = SettlementConfig(tolerance_ms=1_234, tolerance_ppm=5_678)
    h = Host(A, HostConfig(formation=formation, installments=CFG, settlement=settlement), claims=claims)
    assert h.installments.identity is A and h.installments.config is CFG
    assert (h.installments.tolerance_ms, h.installments.tolerance_ppm) == (1_234, 5_678)
    assert h.installments.heartbeat_interval_ms == h.config.member.heartbeat_interval_ms
    h.set_advert(make_advert(A, gpus=2, model="NVIDIA A100", now_ms=T0), T0)
    assert h.formation is not None and h.formation.config is formation and h.formation.claims is claims


def test_a_new_advert_reaches_the_formation_core() -> None:
    """``set_advert__mutmut_18``, ``_21``, ``_25``: the second advert updates
    the formation core (its GPUs), and what that frees is acted on at the
    time given: a job seen when it had too few GPUs gets an offer now."""
    h = Host(A)
    assert h.set_advert(make_advert(A, gpus=1, model="NVIDIA A100", now_ms=T0), T0) == []
    sm = make_manifest(S, Random(3), now_ms=T0, gpus_per_node=2)
    assert not any(isinstance(a, Publish) for a in h.on_bytes(sm.wire, T0, via=Via.TOPIC))
    acts = h.set_advert(make_advert(A, gpus=3, model="NVIDIA A100", now_ms=T0), T0 + 10)
    assert h.formation is not None and h.formation.gpus_free == 3
    assert any(isinstance(a, Publish) for a in acts)  # it volunteered


def test_payout_addresses_come_from_the_advert_book() -> None:
    """``_payout_address_of__mutmut_3``, ``_4``."""
    advert = make_advert(B, gpus=1, model="NVIDIA A100", now_ms=T0)
    h = Host(A, adverts={B.peer_id: advert}.get)
    assert h._payout_address_of(B.peer_id) == advert.payout_address != ""
    assert h._payout_address_of(S.peer_id) == ""


# -- the submitter's side: pay as you go, a restart, stored items ---------------------------


def claim(me: Identity, sm: Any, cert: Any, k: int) -> bytes:
    return claim_wire(me, Claim(job_id=sm.job_id, peer_id=me.peer_id, cert_hash=cert.digest, interval=k,
                                chain_head=b"\x01" * 32))


def proof_of(me: Identity, sm: Any, cert: Any, served_ms: int) -> bytes:
    chain = CheckpointChain(sm.job_id, cert.digest, me.peer_id)
    return sign_proof(me, Proof(job_id=sm.job_id, cert_hash=cert.digest, peer_id=me.peer_id, gpus=("g",),
                                started_at_ms=T0, ended_at_ms=T0 + served_ms, gpu_ms=served_ms, exit_code=0,
                                end_reason="exited", output_digest=b"\x07" * 32, checkpoints=(),
                                chain_head=chain.head)).wire


def owed(actions: list[Any]) -> list[tuple[str, int, int]]:
    return [(r.peer_id, r.interval, r.amount) for a in actions if isinstance(a, InstallmentsOwed) for r in a.rows]


def test_a_restarted_submitter_replays_stored_claims_then_owes_live_ones_and_pays_the_remainder() -> None:
    """``settlement_restore`` (every mutant of it had "no tests"): the stored
    claims are owed again under the same keys before the settlement's own
    items, so the final line subtracts them; a live claim reaches the
    installments (``_result__mutmut_70``, ``_72``); the installments of a
    settled job stay (late claims are answered ``late``) until the
    collection's deadline, then go (``_observe__mutmut_59``,
    ``_timer__mutmut_57``)."""
    sm = manifest()
    cert = certificate(sm.job_id, (A,))
    job = sm.job_id
    h = Host(S, HostConfig(installments=CFG))
    deadline = T0 + 600_000
    restored = h.settlement_restore(sm, cert, confirmed_at_ms=T0, deadline_ms=deadline,
                                    payout_addresses={A.peer_id: ADDRS[0]},
                                    items=[("claim", A.peer_id, claim(A, sm, cert, 1), T0 + 12_000)], now_ms=T0 + 13_000)
    assert owed(restored) == [(A.peer_id, 1, 10_000)]
    assert Emit("settlement.reopened") in restored and SetTimer(settle_key(job), deadline) in restored
    assert h.installments.prepaid(job, A.peer_id) == 10_000
    live = h.on_bytes(claim(A, sm, cert, 2), T0 + 22_000, via=Via.DIRECT)
    assert owed(live) == [(A.peer_id, 2, 10_000)]
    assert any(isinstance(a, Send) and a.peer_id == A.peer_id for a in live)  # acknowledged
    settled = [a for a in h.on_bytes(proof_of(A, sm, cert, 25_000), T0 + 26_000, via=Via.DIRECT)
               if isinstance(a, Settled)]
    (line,) = settled[0].lines
    assert (line.prepaid, line.amount, line.payout_address) == (20_000, 5_000, ADDRS[0])
    assert job in h.installments.jobs and job in h.settlement.collections
    h.on_timer(settle_key(job), deadline)
    assert job not in h.settlement.collections and job not in h.installments.jobs


def test_a_stored_claim_that_no_longer_verifies_is_counted_and_skipped() -> None:
    sm = manifest()
    cert = certificate(sm.job_id, (A,))
    h = Host(S, HostConfig(installments=CFG))
    forged = claim(B, sm, cert, 1)  # B is not a member
    acts = h.settlement_restore(sm, cert, confirmed_at_ms=T0, deadline_ms=T0 + 600_000,
                                payout_addresses={A.peer_id: ADDRS[0]}, items=[("claim", B.peer_id, forged, T0)],
                                now_ms=T0 + 13_000)
    assert Emit("installments.stored_claim_refused") in acts and owed(acts) == []


def test_the_stored_answer_to_a_lookup() -> None:
    """``on_stored`` (every mutant of it had "no tests"): a member of a stored
    job is acknowledged ``recorded`` or ``late``; anyone else is refused,
    with the reason and the words."""
    h = Host(S)
    job, item = "ef" * 32, b"\x09" * 32
    for stored, status in ((True, "recorded"), (False, "late")):
        acts = h.on_stored(job, A.peer_id, item, members=[A.peer_id, B.peer_id], stored=stored, now_ms=T0)
        assert acts == [Emit(f"collect:ack_{status}"), Send(A.peer_id, ack_wire(S, job, [item], status))]
    (r,) = h.on_stored(job, A.peer_id, item, members=None, stored=True, now_ms=T0)
    assert r == Refused(Reason.UNKNOWN_JOB, f"no confirmed job {job[:12]} here")
    (r,) = h.on_stored(job, A.peer_id, item, members=[B.peer_id], stored=True, now_ms=T0)
    assert r == Refused(Reason.NOT_A_MEMBER, f"{A.peer_id[:16]} is not a member of {job[:12]}")


def test_hand_over_and_restored_deliveries_go_to_the_deliveries() -> None:
    """``hand_over`` (its mutants had "no tests"): the items, the job and the
    marks reach the deliveries, which send now and resend later."""
    h = Host(A)
    job = "ab" * 32
    acts = h.hand_over(job, S.peer_id, [("cosign", b"c" * 40)], T0, cosigned=True)
    assert acts[0] == HandOver(job_id=job, dest=S.peer_id, items=(("cosign", b"c" * 40),), cosigned=True)
    assert Send(S.peer_id, b"c" * 40) in acts
    assert [d.job_id for d in h.deliveries.by_job[job].values()] == [job]


# -- the worker's side: the payer gate, balances, the call loop -----------------------------


def worker(**host: Any) -> Host:
    h = Host(A, HostConfig(formation=FormationConfig()), **host)
    h.set_advert(make_advert(A, gpus=4, model="NVIDIA A100", now_ms=T0), T0)
    return h


def test_the_payer_gate_counts_what_the_payer_already_owes_here() -> None:
    """A payer whose balance covers one job's ceiling (10,000) but not two:
    the second job is refused because the first is open here
    (``_payer_gate__mutmut_5``, ``_7``, ``_8``, ``_11``)."""
    h = worker(payer_checks=PayerChecks())
    first, second = (make_manifest(S, Random(i), now_ms=T0) for i in (1, 2))
    assert CheckBalance(PAYER, "SOL") in h.on_bytes(first.wire, T0, via=Via.TOPIC)
    went = h.on_balance(PAYER, "SOL", 15_000, T0 + 10)
    assert any(isinstance(a, Publish) for a in went)  # it offered for the first
    acts = h.on_bytes(second.wire, T0 + 20, via=Via.TOPIC)
    assert Emit("jobs:payer_cannot_pay") in acts and not any(isinstance(a, Publish) for a in acts)
    (nv,) = [a for a in acts if isinstance(a, NotVolunteering)]
    assert "plus 10000 for its other open jobs" in nv.reason


def test_a_payer_covering_exactly_the_ceiling_passes_a_host_without_an_advert() -> None:
    """``_payer_gate__mutmut_12``: with no formation core nothing is open
    here (0, not 1), so exactly the ceiling is enough."""
    h = Host(A, payer_checks=PayerChecks())
    sm = make_manifest(S, Random(1), now_ms=T0)
    h.on_balance(PAYER, "SOL", 10_000, T0)
    acts = h.on_bytes(sm.wire, T0 + 10, via=Via.TOPIC)
    assert not any(isinstance(a, NotVolunteering) for a in acts) and Emit("jobs:payer_cannot_pay") not in acts


def test_a_manifest_that_expired_while_its_balance_was_looked_up() -> None:
    """``on_balance__mutmut_32`` (the candidates asked without the time) and
    ``_36`` (the refusal counted as nothing)."""
    asked: list[int] = []

    def candidates(sm: Any, now_ms: int) -> None:
        asked.append(now_ms)

    h = worker(payer_checks=PayerChecks(), candidates=candidates)
    live = make_manifest(S, Random(1), now_ms=T0)
    dying = make_manifest(S, Random(2), now_ms=T0, ttl_ms=1_000)
    h.on_bytes(live.wire, T0, via=Via.TOPIC)
    h.on_bytes(dying.wire, T0, via=Via.TOPIC)
    acts = h.on_balance(PAYER, "SOL", 10**15, T0 + 5_000)
    assert asked == [T0 + 5_000] * 2  # at the time the balance came
    assert Emit("jobs:expired") in acts


def test_messages_to_ourselves_are_bounded() -> None:
    """``_run__mutmut_5``, ``_7``: exactly ``local_messages_max`` local
    messages are handled; one more is our own bug."""
    h = Host(A)
    acts = h._run(T0, lambda c: c.local.extend([b"\x93junk"] * local_messages_max))
    assert acts == [Emit("jobs:own_message_refused")] * local_messages_max
    with pytest.raises(LocalProtocolError, match="do not end"):
        h._run(T0, lambda c: c.local.extend([b"\x93junk"] * (local_messages_max + 1)))


def own_job_started(h: Host, sm: Any) -> list[Any]:
    """Submit ``sm`` on ``h`` (a worker) and fire its timers until it starts here."""
    acts = h.submit(sm, T0)
    timers: dict[Any, int] = {}
    for _ in range(200):
        if any(isinstance(a, StartJob) for a in acts):
            return acts
        for a in acts:
            if isinstance(a, SetTimer):
                timers[a.key] = a.at_ms
            elif isinstance(a, CancelTimer):
                timers.pop(a.key, None)
        key, at = min(timers.items(), key=lambda kv: kv[1])
        del timers[key]
        acts = h.on_timer(key, at)
    raise AssertionError("our own job never started here")


def test_a_job_finished_without_a_proof_frees_its_gpus() -> None:
    """``job_finished`` (its mutants had "no tests"): the run is forgotten
    and the formation core frees the job's GPUs."""
    h = worker()
    sm = make_manifest(A, Random(7), now_ms=T0, gpus_per_node=2)
    own_job_started(h, sm)
    assert h.formation is not None and h.formation.gpus_free == 2
    h._member_run(StartJob(sm.job_id, sm, h.formation.certificate(sm.job_id), 0, b""))  # type: ignore[arg-type]
    assert sm.job_id in h.members
    h.job_finished(sm.job_id, T0 + 20_000)
    assert sm.job_id not in h.members and h.formation.gpus_free == 4
    assert h.job_finished(sm.job_id, T0 + 20_001) == []  # once


def test_our_own_job_beyond_our_own_quota_is_counted_and_served_by_others() -> None:
    """``_manifest__mutmut_41``: our own worker refusing our own job (its
    per-submitter quota is full) is counted, not a refusal of the message."""
    h = Host(A, HostConfig(formation=FormationConfig(quotas=Quotas(jobs_per_submitter_max=1))))
    h.set_advert(make_advert(A, gpus=4, model="NVIDIA A100", now_ms=T0), T0)
    h.submit(make_manifest(A, Random(1), now_ms=T0), T0)
    acts = h.submit(make_manifest(A, Random(2), now_ms=T0), T0 + 1)
    assert Emit("jobs:own_not_volunteering_limit_exceeded") in acts
    assert any(isinstance(a, Publish) for a in acts) and not any(isinstance(a, Refused) for a in acts)


def test_cancelling_our_own_job_reaches_our_own_worker_on_a_single_topic() -> None:
    """``cancel`` (its mutants had "no tests"): the submitter core cancels,
    and with one topic for everything its cancel is handled by our own
    worker at once (``cancel__mutmut_9``, ``_12``).  An unknown job: nothing."""
    h = Host(A, HostConfig(formation=FormationConfig(per_job_topics=False)))
    h.set_advert(make_advert(A, gpus=4, model="NVIDIA A100", now_ms=T0), T0)
    sm = make_manifest(A, Random(1), now_ms=T0)
    h.submit(sm, T0)
    assert h.cancel("00" * 32, T0 + 5) == []
    acts = h.cancel(sm.job_id, T0 + 10)
    assert any(isinstance(a, Publish) for a in acts)
    assert h.formation is not None and h.formation.state(sm.job_id) is not None
    assert h.formation.state(sm.job_id).name == "CLOSED"  # type: ignore[union-attr]


def test_runtime_messages_between_members_reach_the_driver_only_from_members() -> None:
    """A Ray rendezvous from a member of a job running here goes to the
    driver with its job and body (``_result__mutmut_105``, ``_110``); from
    anyone else, or for a job not running here, it is counted (``_114``)."""
    h, sm, _ = running((A, B))
    body = {"type": "ray_rendezvous", "job_id": sm.job_id, "address": "10.0.0.2:6379"}
    (msg,) = h.on_bytes(seal(B, Kind.RESULT, body).to_bytes(), T0 + 100, via=Via.DIRECT)
    assert msg == MemberMessage(sm.job_id, B.peer_id, body)
    for stranger, job in ((S, sm.job_id), (B, "00" * 32)):
        acts = h.on_bytes(seal(stranger, Kind.RESULT, {**body, "job_id": job}).to_bytes(), T0 + 200, via=Via.DIRECT)
        assert acts == [Emit("exec:member_message_unknown_job")]


# -- written against the sample of 300 at 9cd4b88 (main's #13.1 merged) ----------------------


def test_a_resumed_job_is_published_again_and_served_by_our_own_worker() -> None:
    """``resume_submitted`` (its mutants had "no tests"): the submitter core
    takes the job back, asks the candidates at the time given, and its
    publish reaches our own worker too."""
    asked: list[int] = []

    def candidates(sm: Any, now_ms: int) -> None:
        asked.append(now_ms)

    h = Host(A, HostConfig(formation=FormationConfig(per_job_topics=False)), candidates=candidates)
    h.set_advert(make_advert(A, gpus=4, model="NVIDIA A100", now_ms=T0), T0)
    sm = make_manifest(A, Random(11), now_ms=T0)
    acts = h.resume_submitted(sm, T0, T0 + 100)
    assert sm.job_id in h.submitter.jobs and asked and set(asked) == {T0 + 100}
    assert JobSeen(sm) in acts and any(isinstance(a, Publish) for a in acts)


def test_a_submitted_job_goes_straight_to_the_candidates() -> None:
    """``submit__mutmut_17`` (the candidate list dropped)."""
    h = Host(S, candidates=lambda sm, now_ms: [B.peer_id])
    sm = make_manifest(S, Random(12), now_ms=T0)
    assert Send(B.peer_id, sm.wire) in h.submit(sm, T0)


def test_the_formation_core_orders_members_by_the_hosts_standing() -> None:
    """``set_advert__mutmut_7`` (the standing function not handed over)."""
    def standing(peer: str) -> int | None:
        return 1

    h = Host(A, standing=standing)
    h.set_advert(make_advert(A, gpus=1, model="NVIDIA A100", now_ms=T0), T0)
    assert h.formation is not None and h.formation.standing is standing
