"""Pay as you go at its edges (#19, written against the mutation survivors of
``core/_installments.py``): the outbox key pinned, an interval's amount and
the tolerance in whole lamports and milliseconds, every bound of a claim on
both sides, the exact actions of each path, the verifier handed in used for
every co-signature, and what a claim of interval 0 (co-signatures only) or an
older claim after a newer one must never do to what is owed."""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack
import pytest
from test_installments import (
    ADDRS,
    CFG,
    I_MS,
    T0,
    A,
    B,
    Bench,
    S,
    ack_status,
    certificate,
    cosign,
    manifest,
    member,
    owed_rows,
)

from p2pgpu.core import Kind, PeerMisbehaved, Reason, encode
from p2pgpu.core._actions import (
    CancelTimer,
    Emit,
    Installment,
    InstallmentsOwed,
    ItemTaken,
    LookupCollection,
    SetTimer,
    StopJob,
)
from p2pgpu.core._codec import decode
from p2pgpu.core._errors import LocalProtocolError
from p2pgpu.core._formation_messages import Accept, Certificate, Proposal
from p2pgpu.core._identity import verify_signature
from p2pgpu.core._installments import (
    Claim,
    InstallmentConfig,
    Installments,
    claim_cosigns_max,
    claim_timer,
    cosign_bytes_max,
    due_timer,
    installment_key,
    interval_amount,
)
from p2pgpu.core._settlement import item_hash


def test_the_outbox_key_is_pinned() -> None:
    """The key the outbox pays an interval under, recomputed from its rule: a
    change of it would pay every interval of a running job a second time."""
    job = "ab" * 32
    want = hashlib.sha256(b"p2pgpu/installment/v1\x00" + encode({"interval": 3, "job_id": job, "peer_id": "p"}))
    assert installment_key(job, "p", 3) == want.digest()
    assert want.hexdigest() == "c95ae6451679770d83da771884428532d3ad7bc11213bfb839b15dd69cf643bd"
    assert len({installment_key(job, "p", 3), installment_key(job, "q", 3), installment_key(job, "p", 4),
                installment_key("cd" * 32, "p", 3)}) == 4


def test_an_interval_earns_whole_lamports_rounded_down() -> None:
    assert interval_amount(1, 1, 1_000) == 0 and isinstance(interval_amount(1, 1, 1_000), int)
    assert interval_amount(7, 3, 3_600_000) == 21
    assert interval_amount(3_600_001, 1, 1) == 1
    assert interval_amount(0, 4, 3_600_000) == interval_amount(-5, 4, 3_600_000) == 0  # free work earns nothing
    assert interval_amount(10, -1, 3_600_000) == interval_amount(10, 1, -1) == 0


def test_the_tolerance_is_whole_milliseconds() -> None:
    inst = Installments(A, CFG, tolerance_ms=1_000, tolerance_ppm=50_000)
    assert [inst.tolerance(x) for x in (-1, 0, 20_000, 30_001, 30_019)] == [1_000, 1_000, 1_000, 1_500, 1_500]
    assert all(isinstance(inst.tolerance(x), int) for x in (30_001, 30_019))


def claim(**over: Any) -> Claim:
    base = {"job_id": "ab" * 32, "peer_id": A.peer_id, "cert_hash": b"c" * 32, "interval": 1,
            "chain_head": b"h" * 32}
    return Claim(**{**base, **over})


def test_claim_bounds_on_both_sides() -> None:
    ok = claim(peer_id="p", cosigns=tuple(b"x" * cosign_bytes_max for _ in range(claim_cosigns_max)))
    assert len(ok.cosigns) == claim_cosigns_max
    bad: list[tuple[dict[str, Any], str]] = [
        ({"peer_id": ""}, "peer_id a peer id"), ({"peer_id": "p" * 65}, "peer_id a peer id"),
        ({"cert_hash": b"c" * 31}, "cert_hash and chain_head are 32 bytes"),
        ({"chain_head": b"h" * 31}, "cert_hash and chain_head are 32 bytes"),
        ({"chain_head": b"h" * 33}, "cert_hash and chain_head are 32 bytes"),
        ({"cosigns": (b"x",) * (claim_cosigns_max + 1)}, "at most 32 co-signatures"),
        ({"cosigns": (b"x" * (cosign_bytes_max + 1),)}, "of 1024 bytes")]
    for over, why in bad:
        with pytest.raises(ValueError, match=why):
            claim(**over)


def test_a_received_claim_the_constructor_refuses_is_a_schema_fault() -> None:
    body = claim().to_body() | {"interval": -1}
    with pytest.raises(PeerMisbehaved) as err:
        Claim.from_body(body, A.peer_id)
    assert err.value.reason is Reason.BAD_SCHEMA and err.value.detail.startswith("interval_claim: interval in 0..")


def test_every_action_of_a_claim_taken_repeated_and_late() -> None:
    b = Bench()
    wire = b.claim(A, 1)
    h = item_hash(wire)
    out = b.send(wire, T0 + I_MS + 2_500)
    assert out[:2] == [ItemTaken(b.job, h, "claim", A.peer_id, wire, T0 + I_MS + 2_500),
                       InstallmentsOwed(b.job, "SOL", (Installment(installment_key(b.job, A.peer_id, 1), A.peer_id, 1,
                                                                   10_000, ADDRS[0]),))]
    assert out[2] == Emit("installments:claim_taken") and ack_status(out) == ["recorded"] and len(out) == 4
    again = b.send(wire, T0 + I_MS + 3_000)
    assert again[0] == Emit("installments:claim_repeated") and ack_status(again) == ["recorded"] and len(again) == 2
    b.inst.close(b.job)
    late = b.send(b.claim(A, 2), T0 + 2 * I_MS + 2_500)
    assert late[0] == Emit("installments:claim_late") and ack_status(late) == ["late"] and len(late) == 2
    b.inst.forget(b.job)
    wire = b.claim(A, 1)
    assert b.send(wire, T0 + I_MS) == [LookupCollection(b.job, A.peer_id, item_hash(wire))]


def test_nothing_is_owed_before_a_claim() -> None:
    b = Bench((A, B))
    assert b.inst.intervals_owed(b.job, A.peer_id) == 0 == b.inst.prepaid(b.job, A.peer_id)
    assert b.inst.intervals_owed("ef" * 32, A.peer_id) == 0


def test_a_member_without_a_payout_address_is_owed_with_an_empty_one() -> None:
    b = Bench()
    inst = Installments(A, CFG)
    inst.open(b.sm, b.cert, T0, {})
    rows = [r for a in b.send(b.claim(A, 1), T0 + I_MS, inst) if isinstance(a, InstallmentsOwed) for r in a.rows]
    assert [(r.interval, r.payout_address) for r in rows] == [(1, "")]


def test_co_signatures_alone_never_make_their_sender_owed() -> None:
    """A claim of interval 0 (a member whose part ended, still watching) carries
    co-signatures only: it claims nothing for its sender."""
    b = Bench((A, B))
    out = b.send(b.claim(A, 1, cosigns=(cosign(A, B, b.job, b.cert, 12_000),)), T0 + 12_000)
    assert owed_rows(out) == [(A.peer_id, 1, 10_000)]
    # A saw B for 12 s, enough for an interval: but B claims none
    out = b.send(b.claim(B, 0, cosigns=(cosign(B, A, b.job, b.cert, 12_000),)), T0 + 12_500)
    assert owed_rows(out) == [] and ack_status(out) == ["recorded"]
    assert b.inst.intervals_owed(b.job, B.peer_id) == 0


def test_an_older_claim_after_a_newer_one_keeps_the_newer_claim() -> None:
    """A's claim of 2 is held (B saw one interval); A's claim of 1 comes after it
    (a resend, reordered): when B's co-signature covers the second interval,
    A is owed both."""
    b = Bench((A, B))
    b.send(b.claim(B, 1, cosigns=(cosign(B, A, b.job, b.cert, 12_000),)), T0 + 12_000)
    b.send(b.claim(A, 2, cosigns=(cosign(A, B, b.job, b.cert, 22_000),)), T0 + 22_000)
    assert b.inst.intervals_owed(b.job, A.peer_id) == 1
    b.send(b.claim(A, 1, cosigns=(cosign(A, B, b.job, b.cert, 12_500),)), T0 + 22_050)
    out = b.send(b.claim(B, 2, cosigns=(cosign(B, A, b.job, b.cert, 22_000),)), T0 + 22_100)
    assert (A.peer_id, 2, 10_000) in owed_rows(out)
    assert b.inst.intervals_owed(b.job, A.peer_id) == 2


def test_the_verifier_handed_in_checks_co_signatures_and_stored_claims() -> None:
    b = Bench((A, B))
    seen: list[bytes] = []

    def verify(key: bytes, message: bytes, signature: bytes) -> None:
        seen.append(message.split(b"\x00", 1)[0])
        verify_signature(key, message, signature)

    inst = Installments(A, CFG, verify=verify)
    inst.open(b.sm, b.cert, T0, b.addresses)
    wire = b.claim(B, 1, cosigns=(cosign(B, A, b.job, b.cert, 12_000),))
    b.send(wire, T0 + 12_000, inst)
    assert seen == [b"p2pgpu/cosign/v1"]  # the claim's own envelope was opened by the bench
    seen.clear()
    fresh = Installments(A, CFG, verify=verify)
    fresh.open(b.sm, b.cert, T0, b.addresses)
    fresh.restore_claim(b.job, B.peer_id, wire, T0 + 12_000)
    assert seen == [b"p2pgpu/result/v1", b"p2pgpu/cosign/v1"]


def test_a_job_of_one_interval_is_paid_as_it_goes() -> None:
    pay = member(duration_s_max=I_MS // 1000)
    assert pay.intervals_max == 1
    assert pay.start(T0) == [SetTimer(claim_timer(pay.job_id), T0 + I_MS + CFG.claim_delay_ms)]


def test_an_overdue_payment_stops_the_job_with_these_actions() -> None:
    pay = member()
    pay.start(T0)
    pay.claim_due(T0 + I_MS + 2_000)
    out = pay.on_due(T0 + I_MS + 2_000 + CFG.grace_ms)
    assert out == [Emit("installments:overdue"), CancelTimer(claim_timer(pay.job_id)),
                   CancelTimer(due_timer(pay.job_id)), StopJob(pay.job_id, pay.stopped_reason, cause="unpaid")]
    assert pay.stopped_reason.startswith("stopped: the submitter did not pay interval 1 of 10 s")



# -- the second sample's survivors (at the head with payment notices, #16.3) --------------------


def test_a_claim_exactly_at_the_window_and_its_tolerance_is_taken() -> None:
    b = Bench()
    # one 10 s interval, 9 s after the confirmation: 9_000 + 1_000 (the floor) is exactly 10_000
    assert owed_rows(b.send(b.claim(A, 1), T0 + I_MS - 1_000)) == [(A.peer_id, 1, 10_000)]
    with pytest.raises(PeerMisbehaved, match="only 8999 ms passed"):
        Bench().send(b.claim(A, 1), T0 + I_MS - 1_001)


def test_a_member_that_works_for_nothing_is_owed_no_rows() -> None:
    b = Bench()
    prop = Proposal.sign(A, job_id=b.job, view=0, round=0, members=(A.peer_id,), gpus_per_member=1)
    free = Certificate(proposal=prop, accepts=(Accept.sign(A, proposal=prop, lease_until_ms=T0 + 60_000,
                                                           price_per_gpu_hour=0, payout_address=ADDRS[0]),))
    inst = Installments(S, CFG)
    inst.open(b.sm, free, T0, b.addresses)
    out = b.send(b.claim(A, 1, cert=free), T0 + I_MS, inst)
    assert owed_rows(out) == [] and inst.intervals_owed(b.job, A.peer_id) == 1


def test_a_claim_nobody_saw_is_held_and_says_so() -> None:
    b = Bench((A, B))
    # A (a watcher now) saw B for 1 s only: B's claim of its first interval is held, nothing owed yet
    out = b.send(b.claim(A, 1, cosigns=(cosign(A, B, b.job, b.cert, 1_000),)), T0 + 12_000)
    assert owed_rows(out) == [(A.peer_id, 1, 10_000)] and Emit("installments:claim_held") not in out
    out = b.send(b.claim(B, 1), T0 + 12_100)
    assert owed_rows(out) == [] and Emit("installments:claim_held") in out
    assert b.inst.intervals_owed(b.job, B.peer_id) == 0


def test_the_bound_before_the_confirmation_is_the_tolerance_alone() -> None:
    b = Bench()
    j = b.inst.jobs[b.job]
    assert b.inst.bound_ms(j, A.peer_id, T0 - 5) == 1_000 == b.inst.bound_ms(j, A.peer_id, T0)
    assert b.inst.bound_ms(j, A.peer_id, T0 + 1) == 1_001


def test_a_job_counts_whole_intervals() -> None:
    b = Bench(duration_s_max=25)
    assert b.inst.jobs[b.job].intervals_max == 2 and isinstance(b.inst.jobs[b.job].intervals_max, int)


def test_a_stored_claim_is_read_within_its_kinds_size() -> None:
    b = Bench()
    with pytest.raises(PeerMisbehaved) as err:
        b.inst.restore_claim(b.job, A.peer_id, b"\x00" * (Kind.RESULT.bytes_max + 1_025), T0)
    assert err.value.reason is Reason.OVERSIZED


def test_the_submitters_tolerance_with_no_floor() -> None:
    inst = Installments(S, CFG, tolerance_ms=0, tolerance_ppm=1_000_000)
    assert [inst.tolerance(x) for x in (-3, 0, 1, 9)] == [0, 0, 1, 9]


def test_a_claim_due_and_an_unpaid_stop_in_words() -> None:
    pay = member()
    pay.start(T0)
    k, out = pay.claim_due(T0 + I_MS + 2_000)
    assert (k, out) == (1, [Emit("installments:claimed"), SetTimer(claim_timer(pay.job_id), T0 + 2 * I_MS + 2_000),
                            SetTimer(due_timer(pay.job_id), T0 + I_MS + 2_000 + CFG.grace_ms)])
    pay.on_due(T0 + I_MS + 2_000 + CFG.grace_ms)
    assert pay.stopped_reason == ("stopped: the submitter did not pay interval 1 of 10 s (claimed 5 s earlier; "
                                  "0 of 1 intervals paid)")


# -- written against the sample of 300 (seed 1) at 5a3b27c --------------------------------


def test_a_claims_peer_id_is_at_most_64_characters() -> None:
    """``Claim.__post_init____mutmut_7`` (``<= 64`` to ``< 64``)."""
    base: dict[str, Any] = {"job_id": "ab" * 32, "cert_hash": b"\x01" * 32, "interval": 1, "chain_head": b"\x02" * 32}
    assert Claim(peer_id="p" * 64, **base).peer_id == "p" * 64
    with pytest.raises(ValueError, match="peer_id"):
        Claim(peer_id="p" * 65, **base)


def test_a_malformed_claim_is_refused_as_a_bad_schema_with_its_words() -> None:
    """``Claim.from_body__mutmut_22``, ``_53``, ``_56``: the reason and the
    words of each refusal."""
    good = Claim(job_id="ab" * 32, peer_id=A.peer_id, cert_hash=b"\x01" * 32, interval=1,
                 chain_head=b"\x02" * 32).to_body()
    with pytest.raises(PeerMisbehaved) as err:
        Claim.from_body({**good, "extra": 1}, A.peer_id)
    assert err.value.reason is Reason.BAD_SCHEMA and "interval_claim needs exactly cert_hash" in err.value.detail
    with pytest.raises(PeerMisbehaved) as err:
        Claim.from_body({**good, "interval": "1"}, A.peer_id)
    assert (err.value.reason, err.value.detail) == (Reason.BAD_SCHEMA, "interval_claim fields have the wrong types")


def test_one_bad_cosignature_does_not_hide_the_good_ones_after_it() -> None:
    """``_take__mutmut_16`` (``continue`` to ``break``): a co-signature that
    does not decode, or is about someone else, is skipped; the next counts."""
    b = Bench((A, B))
    b.send(b.claim(A, 1, cosigns=(cosign(A, B, b.job, b.cert, 11_500),)), T0 + 12_000)
    b.send(b.claim(B, 1, cosigns=(cosign(B, A, b.job, b.cert, 11_500),)), T0 + 12_000)
    out = b.send(b.claim(B, 2, cosigns=(cosign(B, A, b.job, b.cert, 15_000),)), T0 + 22_000)
    assert owed_rows(out) == []  # held: A saw B for 11.5 s only
    about_a = cosign(B, A, b.job, b.cert, 21_000)  # signed by B: not A's observation
    out = b.send(b.claim(A, 0, cosigns=(b"\x93junk", about_a, cosign(A, B, b.job, b.cert, 21_600))), T0 + 22_100)
    assert owed_rows(out) == [(B.peer_id, 2, 10_000)]


def test_an_older_observation_arriving_late_does_not_lower_what_was_seen() -> None:
    """``_take__mutmut_23``: what A saw of B only grows; an older
    co-signature arriving after a newer one leaves the newer in force."""
    b = Bench((A, B))
    b.send(b.claim(A, 1, cosigns=(cosign(A, B, b.job, b.cert, 21_600),)), T0 + 22_000)
    b.send(b.claim(A, 0, cosigns=(cosign(A, B, b.job, b.cert, 11_500),)), T0 + 22_050)  # older, late
    out = b.send(b.claim(B, 2, cosigns=(cosign(B, A, b.job, b.cert, 21_600),)), T0 + 22_100)
    assert owed_rows(out) == [(B.peer_id, 1, 10_000), (B.peer_id, 2, 10_000)]  # 11.5 s seen would owe only 1


def test_jobs_paid_as_they_go_up_to_the_limit() -> None:
    """``open__mutmut_5``: exactly ``jobs_max`` jobs, not one more."""
    inst = Installments(S, InstallmentConfig(jobs_max=2))
    jobs = [manifest(duration_s_max=60 + i) for i in range(3)]
    for sm in jobs[:2]:
        inst.open(sm, certificate(sm.job_id, (A,)), T0, {A.peer_id: ADDRS[0]})
    with pytest.raises(LocalProtocolError, match="more than 2 jobs"):
        inst.open(jobs[2], certificate(jobs[2].job_id, (A,)), T0, {A.peer_id: ADDRS[0]})


def test_a_stored_claim_is_read_canonically_and_only_for_its_job_and_member() -> None:
    """``restore_claim__mutmut_16`` (a stored claim decoded without
    ``canonical``) and ``_31`` (the refusal's reason dropped)."""
    b = Bench((A, B))
    fresh = Installments(S, CFG)
    fresh.open(b.sm, b.cert, T0, b.addresses)
    wire = b.claim(A, 1)
    bent = msgpack.packb(dict(reversed(list(decode(wire).items()))), use_bin_type=True)
    with pytest.raises(PeerMisbehaved) as err:
        fresh.restore_claim(b.job, A.peer_id, bent, T0 + 12_000)
    assert err.value.reason is Reason.NON_CANONICAL
    with pytest.raises(PeerMisbehaved) as err:
        fresh.restore_claim(b.job, B.peer_id, wire, T0 + 12_000)
    assert (err.value.reason, err.value.detail) == (Reason.NOT_A_MEMBER, "stored claim of another job or member")


def test_a_member_whose_part_ended_counts_the_cosignatures_it_sends() -> None:
    """``MemberInstallments.claim_due__mutmut_37`` (the metric's name), and
    ``_21``: the claim timer is set again for the last interval when it
    fires early."""
    pay = member(duration_s_max=20)  # two intervals
    pay.start(T0)
    assert pay.claim_due(T0 + I_MS + 2_000)[0] == 1
    job = pay.job_id
    assert pay.claim_due(T0 + 2 * I_MS) == (None, [SetTimer(claim_timer(job), T0 + 2 * I_MS + 2_000)])  # early
    pay.finish()
    assert pay.claim_due(T0 + 2 * I_MS + 2_000) == (0, [Emit("installments:cosigns_sent")])


def test_an_interval_that_earns_one_unit_is_owed() -> None:
    """``_owe__mutmut_41`` (``amount > 0`` to ``> 1``): an interval earning
    exactly 1 (a price of 360 per GPU-hour, 10 s) is owed like any other;
    dropped, it would still count as prepaid and the final line would
    subtract what was never paid."""
    b = Bench()
    prop = Proposal.sign(A, job_id=b.job, view=0, round=0, members=(A.peer_id,), gpus_per_member=1)
    cert = Certificate(proposal=prop, accepts=(Accept.sign(A, proposal=prop, lease_until_ms=T0 + 60_000,
                                                           price_per_gpu_hour=360, payout_address=ADDRS[0]),))
    inst = Installments(S, CFG)
    inst.open(b.sm, cert, T0, {A.peer_id: ADDRS[0]})
    out = b.send(b.claim(A, 1, cert=cert), T0 + 12_000, inst)
    assert owed_rows(out) == [(A.peer_id, 1, 1)] and inst.prepaid(b.job, A.peer_id) == 1
