"""Reputation at its edges (#19): the decay at exact ages, every number of a
score from a hand-computed example, each reason a receipt is refused, the
limits (receipts considered, the reporter's weight), ties in the ranking, and
the job value a score allows."""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_reputation import PAYER, ledger
from trust_fixtures import (
    ALICE,
    BOB,
    CAROL,
    SUBMITTER,
    T0,
    address,
    line,
    member_receipt,
    receipt,
    recosign,
    tx,
)

from p2pgpu.core import _reputation
from p2pgpu.core._receipt import SignedMemberReceipt, sign_member_receipt, sign_receipt
from p2pgpu.core._reputation import (
    Refused,
    Reputation,
    Score,
    VerifiedPayment,
    compute_reputation,
    decayed,
    half_life_ms,
    job_value_max,
)

H = half_life_ms


def test_decay_at_exact_ages() -> None:
    assert decayed(1000, 0) == 1000 and decayed(1000, -5) == 1000  # from the future: as new, never more
    assert decayed(1000, 1) == 1000 * (2 * H - 1) // (2 * H) == 999
    assert decayed(1000, H // 2) == 750
    assert decayed(1000, H) == 500 and decayed(1000, H + H // 2) == 375
    assert decayed(2**62, 62 * H) == 1 and decayed(2**62, 63 * H) == 0 and decayed(2**62, 63 * H - 1) == 0
    assert decayed(2**63, 62 * H) == 2 and decayed(2**63, 63 * H) == 0
    assert decayed(1000, 10, half_life=10) == 500 and decayed(1000, 5, half_life=10) == 750


def test_score_numbers_and_json() -> None:
    s = Score(peer_id="p", good=100, bad=10, paid=50, late=20, jobs_paid=3, proofs_refused=1, reports_late=2,
              receipts=[f"r{i:02}" for i in range(40, 0, -1)])
    assert (s.worker, s.submitter) == (60, -30)
    assert s.to_json() == {"peer_id": "p", "worker": 60, "submitter": -30, "good": 100, "bad": 10, "paid": 50,
                           "late": 20, "jobs_paid": 3, "proofs_refused": 1, "reports_late": 2,
                           "evidence": [f"r{i:02}" for i in range(1, 33)]}


def test_job_value_max() -> None:
    assert job_value_max(None) == 10_000_000
    assert job_value_max(Score(peer_id="p", bad=1)) == 10_000_000
    assert job_value_max(Score(peer_id="p", good=4, bad=1)) == 10_000_000  # worker 0
    assert job_value_max(Score(peer_id="p", good=5, bad=1)) == 10_000_002  # worker 1
    assert job_value_max(Score(peer_id="p", good=5)) == 10_000_010


def test_ranking_ties_break_by_good_then_peer_id() -> None:
    rep = Reputation(scores={"a": Score(peer_id="a", good=8, bad=2), "b": Score(peer_id="b", good=0),
                             "c": Score(peer_id="c", good=4, bad=1), "d": Score(peer_id="d", good=0)},
                     refused=[])
    # a and c are both worth 0 as workers; a has more good evidence.  b, d and
    # the unknown e are worth 0 with no evidence: peer id order.
    assert rep.ranked_workers(["e", "d", "c", "b", "a"]) == ["a", "c", "b", "d", "e"]
    assert rep.score("e") == Score(peer_id="e") and "e" not in rep.scores


def test_every_number_of_one_job() -> None:
    r = receipt("j", [line(ALICE, amount=900), line(BOB, "proof_refused"), line(CAROL, "no_proof")],
                at=T0 - H)  # one half-life old
    sr = sign_receipt(SUBMITTER, r)
    rep = compute_reputation([sr.wire], payments=ledger([r]), now_ms=T0)
    tag = sr.digest.hex()[:16]
    assert rep.refused == []
    assert list(rep.scores) == sorted(rep.scores)
    sub, alice, bob, carol = (rep.scores[p.peer_id] for p in (SUBMITTER, ALICE, BOB, CAROL))
    assert (sub.paid, sub.receipts, sub.late) == (450, [tag], 0)
    assert (alice.good, alice.jobs_paid, alice.bad, alice.receipts) == (450, 1, 0, [tag])
    # The job's verified value (900) per member (3), decayed: 150.
    assert (bob.bad, bob.proofs_refused, bob.good, bob.jobs_paid) == (150, 1, 0, 0)
    assert (carol.bad, carol.good, carol.receipts) == (0, 0, [tag])


def test_the_ledger_caps_what_a_line_claims_both_ways() -> None:
    r = receipt("j", [line(ALICE, amount=1000)])
    t = r.lines[0].tx_signature
    for shown, credited in ((600, 600), (1000, 1000), (5000, 1000)):
        pay = {t: VerifiedPayment(tx_signature=t, payer=PAYER, transfers={r.lines[0].address: shown})}
        rep = compute_reputation([sign_receipt(SUBMITTER, r)], payments=pay, now_ms=r.settled_at_ms)
        assert rep.scores[ALICE.peer_id].good == credited


def test_each_reason_a_receipt_is_refused() -> None:
    r = receipt("j", [line(ALICE)])
    sr = sign_receipt(SUBMITTER, r)
    tag = sr.digest.hex()[:16]
    pays = ledger([r])
    other_payer = {r.job_id: address("someone else")}
    assert compute_reputation([sr], payments=pays, now_ms=T0, job_payers=other_payer).refused == [
        Refused(digest=tag, why="payer differs from the job's manifest")]
    assert compute_reputation([sr], payments=pays, now_ms=T0, job_payers={r.job_id: PAYER}).refused == []
    assert compute_reputation([sr], payments={}, now_ms=T0).refused == [
        Refused(digest=tag, why="no payment in it verified on the ledger")]
    assert compute_reputation([sr], payments=pays, now_ms=T0, cert_addresses={}).refused == [
        Refused(digest=tag, why="certificate unknown: payout addresses cannot be checked")]
    again = sign_receipt(SUBMITTER, recosign(replace(r, settled_at_ms=T0 + 1)))
    assert compute_reputation([again, sr], payments=pays, now_ms=T0).refused == [
        Refused(digest=again.digest.hex()[:16], why="a second receipt for the same job")]  # the older one counts
    assert compute_reputation([b"\x00", sr.wire], payments=pays, now_ms=T0).refused == [
        Refused(digest="?", why="bad_schema: not an envelope")]


def test_a_payment_from_another_payer_or_to_another_address_verifies_nothing() -> None:
    r = receipt("j", [line(ALICE)])
    ln = r.lines[0]
    for pay in (VerifiedPayment(tx_signature=ln.tx_signature, payer=address("x"), transfers={ln.address: 10**6}),
                VerifiedPayment(tx_signature=ln.tx_signature, payer=PAYER, transfers={address("y"): 10**6}),
                VerifiedPayment(tx_signature=ln.tx_signature, payer=PAYER, transfers={ln.address: 0})):
        rep = compute_reputation([sign_receipt(SUBMITTER, r)], payments={ln.tx_signature: pay}, now_ms=T0)
        assert rep.scores == {} and rep.refused[0].why == "no payment in it verified on the ledger"


def test_credit_is_bound_to_the_members_own_address() -> None:
    r = receipt("j", [line(ALICE), line(BOB)])
    alice = next(ln for ln in r.lines if ln.peer_id == ALICE.peer_id)
    bound = {r.cert_hash: {ALICE.peer_id: alice.address, BOB.peer_id: address("bob's real one")}}
    rep = compute_reputation([sign_receipt(SUBMITTER, r)], payments=ledger([r]), now_ms=T0, cert_addresses=bound)
    assert rep.scores[ALICE.peer_id].good == 1_000_000 and rep.scores[BOB.peer_id].good == 0


def test_only_so_many_receipts_are_considered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_reputation, "receipts_max", 2)
    rs = [receipt(f"j{i}", [line(ALICE, txname=f"t{i}")]) for i in range(3)]
    rep = compute_reputation([sign_receipt(SUBMITTER, r) for r in rs], payments=ledger(rs), now_ms=T0)
    assert rep.scores[ALICE.peer_id].jobs_paid == 2
    ms = [sign_member_receipt(ALICE, member_receipt(f"j{i}", ALICE, "late", owed=10)) for i in range(3)]
    rep = compute_reputation([sign_receipt(SUBMITTER, r) for r in rs[:1]], payments=ledger(rs), now_ms=T0,
                             member_receipts=ms)
    assert rep.scores[SUBMITTER.peer_id].reports_late == 2


def test_a_late_report_weighs_at_most_the_reporters_good() -> None:
    r = receipt("j", [line(ALICE, amount=300)])
    base = [sign_receipt(SUBMITTER, r)]
    for owed, late in ((100, 100), (300, 300), (1000, 300)):
        m = sign_member_receipt(ALICE, member_receipt("j", ALICE, "unpaid", owed=owed))
        rep = compute_reputation(base, payments=ledger([r]), now_ms=T0, member_receipts=[m])
        s = rep.scores[SUBMITTER.peer_id]
        assert (s.late, s.reports_late, s.submitter) == (late, 1, 300 - 4 * late)
        assert s.receipts[-1] == m.digest.hex()[:16]
    on_time = sign_member_receipt(ALICE, member_receipt("j", ALICE, "on_time", owed=100))
    rep = compute_reputation(base, payments=ledger([r]), now_ms=T0, member_receipts=[on_time])
    assert rep.scores[SUBMITTER.peer_id].reports_late == 0
    stranger = sign_member_receipt(BOB, member_receipt("j", BOB, "late", owed=100))
    rep = compute_reputation(base, payments=ledger([r]), now_ms=T0, member_receipts=[stranger])
    assert rep.scores[SUBMITTER.peer_id].late == 0 and BOB.peer_id not in rep.scores
    old = sign_member_receipt(ALICE, member_receipt("j", ALICE, "late", owed=100, at=T0 - H))
    rep = compute_reputation(base, payments=ledger([r]), now_ms=T0, member_receipts=[old])
    assert rep.scores[SUBMITTER.peer_id].late == 50
    bad = compute_reputation(base, payments=ledger([r]), now_ms=T0, member_receipts=[b"\x00"]).refused
    assert len(bad) == 1 and bad[0].digest == "?"


def test_a_payment_shared_by_receipts_counts_for_the_earliest() -> None:
    r1 = receipt("j1", [line(ALICE, txname="shared")], at=T0)
    r2 = receipt("j2", [line(ALICE, txname="shared")], at=T0 + 1)
    pays = ledger([r1])
    rep = compute_reputation([sign_receipt(SUBMITTER, r2), sign_receipt(SUBMITTER, r1)], payments=pays, now_ms=T0)
    assert rep.scores[ALICE.peer_id].jobs_paid == 1
    assert [x.why for x in rep.refused] == ["no payment in it verified on the ledger"]
    assert rep.refused[0].digest == sign_receipt(SUBMITTER, r2).digest.hex()[:16]
    assert tx("shared") == r1.lines[0].tx_signature


def test_contributions_add_up_across_jobs_and_reports() -> None:
    r1 = receipt("j1", [line(ALICE, amount=300, txname="a")], at=T0)
    r2 = receipt("j2", [line(ALICE, amount=200, txname="b")], at=T0)
    ms = [sign_member_receipt(ALICE, member_receipt(j, ALICE, "late", owed=100)) for j in ("j1", "j2")]
    rep = compute_reputation([sign_receipt(SUBMITTER, r) for r in (r1, r2)], payments=ledger([r1, r2]), now_ms=T0,
                             member_receipts=ms)
    alice, sub = rep.scores[ALICE.peer_id], rep.scores[SUBMITTER.peer_id]
    assert (alice.peer_id, alice.good, alice.jobs_paid) == (ALICE.peer_id, 500, 2)
    assert (sub.peer_id, sub.paid, sub.late, sub.reports_late) == (SUBMITTER.peer_id, 500, 200, 2)


def test_a_wrong_output_counts_as_bad_like_a_refused_proof() -> None:
    r = receipt("j", [line(ALICE, amount=600), line(BOB, "outside_quorum"), line(CAROL, "proof_refused")])
    rep = compute_reputation([sign_receipt(SUBMITTER, r)], payments=ledger([r]), now_ms=T0)
    for p in (BOB, CAROL):
        assert (rep.scores[p.peer_id].bad, rep.scores[p.peer_id].proofs_refused) == (200, 1)


def test_one_refused_receipt_or_report_does_not_stop_the_others() -> None:
    good = receipt("g", [line(ALICE, txname="g")])
    for bad in (receipt("b", [line(ALICE, txname="b")], payer=address("other")),  # payer differs
                receipt("g", [line(BOB, txname="x")], at=T0 + 1)):               # a second receipt for g
        rs = sorted([good, bad], key=lambda r: r.settled_at_ms)
        job_payers = {bad.job_id: PAYER} if bad.job_id != good.job_id else None
        rep = compute_reputation([sign_receipt(SUBMITTER, r) for r in rs], payments=ledger([good]), now_ms=T0,
                                 job_payers=job_payers)
        assert rep.scores[ALICE.peer_id].jobs_paid == 1 and len(rep.refused) == 1
    # Refused first in the canonical order, and a good one after it.
    early_bad = receipt("b", [line(ALICE, txname="b")], at=T0 - 1, payer=address("other"))
    rep = compute_reputation([sign_receipt(SUBMITTER, r) for r in (early_bad, good)], payments=ledger([good]),
                             now_ms=T0, job_payers={early_bad.job_id: PAYER})
    assert rep.scores[ALICE.peer_id].jobs_paid == 1
    # Member reports: an undecodable one, an on-time one, a weightless one, then one that counts.
    base = [sign_receipt(SUBMITTER, good)]
    ms: list[SignedMemberReceipt | bytes] = [b"\x00", sign_member_receipt(ALICE, member_receipt("g", ALICE, "on_time", at=T0 - 3)),
          sign_member_receipt(BOB, member_receipt("g", BOB, "late", at=T0 - 2)),
          sign_member_receipt(ALICE, member_receipt("g", ALICE, "late", owed=1, at=T0))]
    rep = compute_reputation(base, payments=ledger([good]), now_ms=T0, member_receipts=ms)
    s = rep.scores[SUBMITTER.peer_id]
    assert (s.late, s.reports_late) == (1, 1)  # a weight of one lamport counts
    assert rep.refused == [Refused(digest="?", why="bad_schema: not an envelope")]


def test_an_unpaid_line_before_a_paid_one_in_a_receipt() -> None:
    first, second = sorted((ALICE, BOB), key=lambda i: i.peer_id)
    r = receipt("j", [line(first, "no_proof"), line(second, amount=100)])
    rep = compute_reputation([sign_receipt(SUBMITTER, r)], payments=ledger([r]), now_ms=T0)
    assert rep.scores[second.peer_id].good == 100 and rep.scores[first.peer_id].good == 0


def test_only_verified_transfers_count_even_of_one_lamport() -> None:
    r = receipt("j", [line(ALICE, amount=100, txname="t"), line(BOB, amount=100, txname="t")])
    a, b = (next(ln for ln in r.lines if ln.peer_id == p.peer_id) for p in (ALICE, BOB))
    pay = {a.tx_signature: VerifiedPayment(tx_signature=a.tx_signature, payer=PAYER,
                                           transfers={a.address: 1, b.address: 0})}
    rep = compute_reputation([sign_receipt(SUBMITTER, r)], payments=pay, now_ms=T0)
    assert (rep.scores[ALICE.peer_id].good, rep.scores[ALICE.peer_id].jobs_paid) == (1, 1)
    assert (rep.scores[BOB.peer_id].good, rep.scores[BOB.peer_id].jobs_paid) == (0, 0)


def test_a_receipt_of_an_unknown_certificate_does_not_stop_the_next() -> None:
    unknown = receipt("u", [line(ALICE, txname="u")], at=T0 - 1)
    known = receipt("k", [line(ALICE, txname="k")])
    k = known.lines[0]
    bound = {known.cert_hash: {ALICE.peer_id: k.address}}
    rep = compute_reputation([sign_receipt(SUBMITTER, r) for r in (unknown, known)],
                             payments=ledger([unknown, known]), now_ms=T0, cert_addresses=bound)
    assert [x.why for x in rep.refused] == ["certificate unknown: payout addresses cannot be checked"]
    assert rep.scores[ALICE.peer_id].jobs_paid == 1 and rep.scores[ALICE.peer_id].good == 1_000_000


def test_a_line_whose_payment_is_not_found_does_not_stop_the_next_line() -> None:
    first, second = sorted((ALICE, BOB), key=lambda i: i.peer_id)
    r = receipt("j", [line(first, txname="missing"), line(second, amount=100, txname="found")])
    found = next(ln for ln in r.lines if ln.peer_id == second.peer_id)
    pays = {found.tx_signature: VerifiedPayment(tx_signature=found.tx_signature, payer=r.payer,
                                                transfers={found.address: 100})}
    rep = compute_reputation([sign_receipt(SUBMITTER, r)], payments=pays, now_ms=T0)
    assert rep.scores[second.peer_id].good == 100 and rep.scores[first.peer_id].good == 0
