"""Reputation (``p2pgpu/core/_reputation.py``): recomputable, weighted by
verified payments, decaying; forged and unpaid receipts carry no weight; a
peer whose proofs were refused ranks below honest peers; new identities get
small jobs first."""

from __future__ import annotations

import random
from typing import Any

import pytest
from trust_fixtures import (
    ALICE,
    BOB,
    CAROL,
    DAVE,
    IDS,
    MALLORY,
    SUBMITTER,
    T0,
    address,
    job_id,
    key_of,
    line,
    member_receipt,
    receipt,
    tx,
)

from p2pgpu.core import Kind, PeerMisbehaved, Reason, seal
from p2pgpu.core._receipt import Receipt, sign_member_receipt, sign_receipt
from p2pgpu.core._reputation import (
    VerifiedPayment,
    compute_reputation,
    decayed,
    half_life_ms,
    job_value_base,
    job_value_max,
)

PAYER = address("payer:" + SUBMITTER.peer_id)


def ledger(receipts: list[Receipt]) -> dict[str, VerifiedPayment]:
    """What an honest ledger shows for the receipts' paid lines."""
    txs: dict[str, dict[str, int]] = {}
    payer = {}
    for r in receipts:
        for ln in r.lines:
            for t, amount in ln.payments:
                txs.setdefault(t, {})[ln.address] = amount
                payer[t] = r.payer
    return {t: VerifiedPayment(tx_signature=t, payer=payer[t], transfers=m) for t, m in txs.items()}


def history() -> tuple[list[bytes], list[bytes], dict[str, VerifiedPayment]]:
    """Ten jobs: Alice, Bob and Carol always paid; Dave's proof refused in three."""
    rs = []
    for j in range(10):
        lines = [line(p, amount=1_000_000 + 1000 * j, txname=f"job{j}") for p in (ALICE, BOB, CAROL)]
        lines.append(line(DAVE, "proof_refused" if j % 3 == 0 else "paid", 1_000_000, txname=f"job{j}"))
        rs.append(receipt(f"job{j}", lines, at=T0 + j * 3_600_000))
    members = [sign_member_receipt(p, member_receipt(f"job{j}", p, at=T0 + j * 3_600_000)).wire
               for j in range(10) for p in (ALICE, BOB)]
    return [sign_receipt(SUBMITTER, r).wire for r in rs], members, ledger(rs)


def test_a_copy_of_the_receipts_gives_the_same_numbers() -> None:
    rs, ms, pays = history()
    now = T0 + 5 * 24 * 3_600_000
    a = compute_reputation(rs, member_receipts=ms, payments=pays, now_ms=now)
    copy = [bytes(x) for x in reversed(rs)]  # another node, another order, its own copy
    shuffled_ms = list(ms)
    random.Random(3).shuffle(shuffled_ms)
    b = compute_reputation(copy + rs[:3], member_receipts=shuffled_ms, payments=dict(reversed(pays.items())),
                           now_ms=now)
    assert {p: s.to_json() for p, s in a.scores.items()} == {p: s.to_json() for p, s in b.scores.items()}
    assert a.score(ALICE.peer_id).good > 0 and a.score(SUBMITTER.peer_id).paid > 0


def test_a_peer_whose_proofs_were_refused_ranks_below_honest_peers() -> None:
    rs, ms, pays = history()
    rep = compute_reputation(rs, member_receipts=ms, payments=pays, now_ms=T0 + 24 * 3_600_000)
    dave = rep.score(DAVE.peer_id)
    assert dave.proofs_refused == 4 and dave.jobs_paid == 6
    ranked = rep.ranked_workers([DAVE.peer_id, ALICE.peer_id, BOB.peer_id, CAROL.peer_id, MALLORY.peer_id])
    # Honest peers first, then the stranger without a record (0), Dave last (negative).
    assert set(ranked[:3]) == {ALICE.peer_id, BOB.peer_id, CAROL.peer_id}
    assert ranked[3:] == [MALLORY.peer_id, DAVE.peer_id]
    assert all(rep.score(p).worker > dave.worker for p in (ALICE.peer_id, BOB.peer_id, CAROL.peer_id))
    assert dave.worker < 0  # four refusals outweigh six payments at penalty 4
    assert job_value_max(dave) == job_value_base


def test_a_forged_receipt_is_refused() -> None:
    rs, _, pays = history()
    base = compute_reputation(rs, payments=pays, now_ms=T0)
    # Mallory signs a receipt as if she were the submitter: wrong signer.
    forged = seal(MALLORY, Kind.RECEIPT, receipt("fake", [line(MALLORY, txname="job1")]).to_obj()).to_bytes()
    # Mallory, as her own submitter, cites Alice's real payment to pay herself.
    cites = sign_receipt(IDS[6], receipt(
        "fake2", [line(MALLORY, txname="job1")], submitter=IDS[6], payer=PAYER)).wire
    # ... or invents a payment that the ledger never saw.
    invented = sign_receipt(IDS[6], receipt("fake3", [line(MALLORY, amount=10**12, txname="never")],
                                            submitter=IDS[6])).wire
    rep = compute_reputation([*rs, forged, cites, invented], payments=pays, now_ms=T0)
    assert rep.score(MALLORY.peer_id).good == 0
    assert len(rep.refused) == 3
    assert {p: s.good for p, s in rep.scores.items() if p in base.scores} == \
        {p: s.good for p, s in base.scores.items()}


def test_a_forger_cannot_take_credit_for_someone_elses_payment() -> None:
    """Mallory's own submitter cites Alice's real payment (tx and address),
    crediting Mallory's peer id, dated before the genuine receipt.  With the
    members' signed payout addresses (from the certificates' accepts), the
    credit goes to nobody but Alice."""
    from p2pgpu.core._receipt import ReceiptLine

    genuine = receipt("j", [line(ALICE, amount=5_000_000, txname="j")], at=T0)
    stolen = ReceiptLine(peer_id=MALLORY.peer_id, outcome="paid", amount=5_000_000,
                         address=address(ALICE.peer_id), payments=((tx("j"), 5_000_000),), proof_hash=b"")
    sybil = IDS[6]
    forged = receipt("f", [stolen], submitter=sybil, payer=PAYER, at=T0 - 1)
    wires = [sign_receipt(SUBMITTER, genuine).wire, sign_receipt(sybil, forged).wire]
    bound = {genuine.cert_hash: {ALICE.peer_id: address(ALICE.peer_id)},
             forged.cert_hash: {MALLORY.peer_id: address(MALLORY.peer_id)}}
    rep = compute_reputation(wires, payments=ledger([genuine]), now_ms=T0, cert_addresses=bound)
    assert rep.score(MALLORY.peer_id).good == 0 and rep.score(ALICE.peer_id).good == 5_000_000
    # Without the binding the forger, dated first, would have taken it: the
    # reason the wiring passes the certificates' addresses in.
    loose = compute_reputation(wires, payments=ledger([genuine]), now_ms=T0)
    assert loose.score(MALLORY.peer_id).good >= 4_999_000 and loose.score(ALICE.peer_id).good == 0
    # A receipt whose certificate is unknown cannot be checked: refused.
    assert compute_reputation(wires[:1], payments=ledger([genuine]), now_ms=T0, cert_addresses={}).scores == {}


def test_a_second_receipt_for_a_job_and_a_payment_cited_twice_count_once() -> None:
    r = receipt("j", [line(ALICE, amount=5_000_000, txname="j")])
    again = receipt("j", [line(ALICE, amount=5_000_000, txname="j")], at=T0 + 1)
    other_job = receipt("k", [line(ALICE, amount=5_000_000, txname="j")], at=T0 + 2)
    pays = ledger([r])
    rep = compute_reputation([sign_receipt(SUBMITTER, x).wire for x in (r, again, other_job)], payments=pays,
                             now_ms=T0)
    assert rep.score(ALICE.peer_id).good == 5_000_000
    assert len(rep.refused) == 2


def test_weight_is_what_the_ledger_shows_not_what_the_receipt_claims() -> None:
    r = receipt("j", [line(ALICE, amount=9_000_000, txname="j")])
    pays = {tx("j"): VerifiedPayment(tx_signature=tx("j"), payer=PAYER, transfers={address(ALICE.peer_id): 1_000})}
    rep = compute_reputation([sign_receipt(SUBMITTER, r).wire], payments=pays, now_ms=T0)
    assert rep.score(ALICE.peer_id).good == 1_000
    other_payer = {tx("j"): VerifiedPayment(tx_signature=tx("j"), payer=address("someone"),
                                            transfers={address(ALICE.peer_id): 9_000_000})}
    assert compute_reputation([sign_receipt(SUBMITTER, r).wire], payments=other_payer,
                              now_ms=T0).score(ALICE.peer_id).good == 0
    # The manifest's payer, where known, must be the receipt's.
    assert compute_reputation([sign_receipt(SUBMITTER, r).wire], payments=ledger([r]), now_ms=T0,
                              job_payers={job_id("j"): address("other")}).scores == {}


def test_unpaid_receipts_carry_no_weight_good_or_bad() -> None:
    r = receipt("j", [line(ALICE, "proof_refused"), line(BOB, "no_proof")])
    rep = compute_reputation([sign_receipt(SUBMITTER, r).wire], payments={}, now_ms=T0)
    assert rep.scores == {} and rep.refused[0].why == "no payment in it verified on the ledger"


def test_late_payment_reports_need_a_reporter_with_a_record() -> None:
    rs, _, pays = history()
    stranger = IDS[7]
    reports = [sign_member_receipt(ALICE, member_receipt("job1", ALICE, "unpaid", owed=500_000)).wire,
               sign_member_receipt(stranger, member_receipt("job1", stranger, "unpaid", owed=10**12)).wire]
    rep = compute_reputation(rs, member_receipts=reports, payments=pays, now_ms=T0)
    sub = rep.score(SUBMITTER.peer_id)
    assert sub.reports_late == 1 and sub.late == 500_000
    assert sub.submitter == sub.paid - 4 * 500_000


def test_scores_decay_with_a_half_life() -> None:
    assert decayed(1_000, 0) == 1_000 and decayed(1_000, -5) == 1_000
    assert decayed(1_000, half_life_ms) == 500 and decayed(1_000, 2 * half_life_ms) == 250
    assert decayed(1_000, half_life_ms // 2) == 750  # linear between halvings
    assert decayed(1_000, 100 * half_life_ms) == 0
    prev = 1_000
    for k in range(0, 4 * half_life_ms, half_life_ms // 7):
        cur = decayed(1_000, k)
        assert cur <= prev
        prev = cur
    r = receipt("j", [line(ALICE, amount=8_000_000, txname="j")])
    pays = ledger([r])
    wire = sign_receipt(SUBMITTER, r).wire
    fresh = compute_reputation([wire], payments=pays, now_ms=T0).score(ALICE.peer_id).good
    old = compute_reputation([wire], payments=pays, now_ms=T0 + half_life_ms).score(ALICE.peer_id).good
    assert (fresh, old) == (8_000_000, 4_000_000)


def test_new_identities_get_small_jobs_first() -> None:
    rs, _, pays = history()
    rep = compute_reputation(rs, payments=pays, now_ms=T0)
    assert job_value_max(None) == job_value_max(rep.score(MALLORY.peer_id)) == job_value_base
    alice = rep.score(ALICE.peer_id)
    assert job_value_max(alice) == job_value_base + 2 * alice.worker > job_value_base


def test_score_json_names_its_evidence() -> None:
    rs, ms, pays = history()
    doc: dict[str, Any] = compute_reputation(rs, member_receipts=ms, payments=pays,
                                             now_ms=T0).score(ALICE.peer_id).to_json()
    assert doc["jobs_paid"] == 10 and len(doc["evidence"]) == 10



def test_peers_with_a_record_best_first() -> None:
    """The advert book keeps these when strangers crowd it (#16)."""
    r = receipt("rec", [line(ALICE, amount=3_000, txname="rec"), line(BOB, amount=1_000, txname="rec"),
                        line(CAROL, "proof_refused")])
    rep = compute_reputation([sign_receipt(SUBMITTER, r).wire], payments=ledger([r]), now_ms=T0)
    assert rep.with_record(10) == [SUBMITTER.peer_id, ALICE.peer_id, BOB.peer_id]  # CAROL: a negative record
    assert rep.with_record(1) == [SUBMITTER.peer_id]


def test_every_verified_installment_counts_and_only_those() -> None:
    """Pay as you go: Alice's line cites three payments (two installments and
    the remainder).  Each verified payment adds to her good and to the
    submitter's paid; one the ledger does not show adds nothing, one that
    moved less counts for what moved, and one already credited elsewhere
    counts once.  Before #16's fix a line cited one transaction only."""
    from p2pgpu.core._receipt import ReceiptLine

    a = address(ALICE.peer_id)
    pays = tuple(sorted(((tx("i1"), 400), (tx("i2"), 300), (tx("fin"), 200)), key=lambda p: (-p[1], p[0])))
    ln = ReceiptLine(peer_id=ALICE.peer_id, outcome="paid", amount=900, address=a, payments=pays, proof_hash=b"")
    r = receipt("payg", [ln], payer=PAYER)
    ledger_all = {t: VerifiedPayment(tx_signature=t, payer=PAYER, transfers={a: n}) for t, n in pays}
    rep = compute_reputation([sign_receipt(SUBMITTER, r).wire], payments=ledger_all, now_ms=T0)
    assert rep.score(ALICE.peer_id).good == 900 and rep.score(SUBMITTER.peer_id).paid == 900
    partial = dict(ledger_all)
    del partial[tx("i2")]
    partial[tx("fin")] = VerifiedPayment(tx_signature=tx("fin"), payer=PAYER, transfers={a: 50})
    rep = compute_reputation([sign_receipt(SUBMITTER, r).wire], payments=partial, now_ms=T0)
    assert rep.score(ALICE.peer_id).good == 400 + 50
    # a second job's receipt citing one of the same payments: counted once
    again = receipt("payg2", [ReceiptLine(peer_id=ALICE.peer_id, outcome="paid", amount=400, address=a,
                                          payments=((tx("i1"), 400),), proof_hash=b"")], payer=PAYER, at=T0 + 1)
    rep = compute_reputation([sign_receipt(SUBMITTER, r).wire, sign_receipt(SUBMITTER, again).wire],
                             payments=ledger_all, now_ms=T0)
    assert rep.score(ALICE.peer_id).good == 900


def _backdated_forgery(**cosign_kw: Any) -> tuple[Any, Any, dict[str, VerifiedPayment], dict[bytes, dict[str, str]]]:
    """Alice's genuine receipt (paid 5,000,000 in ``tx("j")``) and Mallory's
    forgery, dated before it, citing that payment under the genuine payer."""
    from p2pgpu.core._receipt import ReceiptLine

    payer = address("payer:" + SUBMITTER.peer_id)
    genuine = receipt("j", [line(ALICE, amount=5_000_000, txname="j")], at=T0)
    stolen = ReceiptLine(peer_id=MALLORY.peer_id, outcome="paid", amount=5_000_000,
                         address=address(ALICE.peer_id), payments=((tx("j"), 5_000_000),), proof_hash=b"")
    forged = receipt("f", [stolen], submitter=IDS[6], payer=payer, at=T0 - 1, **cosign_kw)
    ledger = {tx("j"): VerifiedPayment(tx_signature=tx("j"), payer=payer,
                                       transfers={address(ALICE.peer_id): 5_000_000})}
    # Each certificate as its accepts were signed: Alice's by Alice, Mallory's by Mallory.
    bound = {genuine.cert_hash: {ALICE.peer_id: address(ALICE.peer_id)},
             forged.cert_hash: {MALLORY.peer_id: address(ALICE.peer_id)}}
    return genuine, forged, ledger, bound


def test_a_backdated_receipt_cannot_take_credit_for_someone_elses_payment() -> None:
    """#16.2 (found while building receipts that cite installments; a strict
    xfail until the payer co-signed receipts): a forger took credit for
    someone else's real payment.

    Mallory controls a sybil submitter.  It signs a certificate for a job of its
    own in which **its own accept names Alice's payout address** (an accept is
    signed by the member alone: nothing ties a payout address to one peer), and
    a receipt, dated one millisecond before Alice's genuine one, whose line pays
    Mallory at that address, citing Alice's real payout transaction and naming
    the genuine payer.  Every other check of ``compute_reputation`` passes: the
    signatures, the certificate binding (Mallory -> that address, as Mallory
    signed it), the payer, the ledger transfer; and since each ``(transaction,
    address)`` credits only the receipt taken first in ``(settled_at_ms,
    digest)`` order, the backdated forgery took Alice's credit.

    Closed at the root: a receipt's payments count only when the payer's key
    (the one that signed the transactions on the ledger) co-signed the
    receipt.  Mallory does not hold it."""
    genuine, forged, ledger, bound = _backdated_forgery(cosigned=False)
    sybil = IDS[6]
    rep = compute_reputation([sign_receipt(SUBMITTER, genuine).wire, sign_receipt(sybil, forged).wire],
                             payments=ledger, now_ms=T0, cert_addresses=bound)
    assert rep.score(MALLORY.peer_id).good == 0
    assert rep.score(ALICE.peer_id).good == 5_000_000
    assert [r.why for r in rep.refused] == ["its payer did not co-sign it: its payments verify nothing"]


def test_a_forged_payer_co_signature_is_refused_at_decoding() -> None:
    """The forger co-signs with a key of its own while naming the genuine
    payer: the signature does not verify against the payer's address, and the
    receipt is refused as forged (``BAD_SIGNATURE``) before any score."""
    from p2pgpu.core._receipt import cosign, decode_receipt

    _genuine, forged, _ledger, _bound = _backdated_forgery(cosigned=False)
    mine = cosign(forged, IDS[6].sign)
    with pytest.raises(ValueError, match="co-signature does not verify"):
        sign_receipt(IDS[6], mine)  # our own code never signs one
    wire = seal(IDS[6], Kind.RECEIPT, mine.to_obj()).to_bytes()
    with pytest.raises(PeerMisbehaved) as exc:
        decode_receipt(wire)
    assert exc.value.reason is Reason.BAD_SIGNATURE
    assert compute_reputation([wire], payments={}, now_ms=T0).refused[0].why.startswith("bad_signature")


def test_a_forger_that_co_signs_as_its_own_payer_cites_nothing_it_paid() -> None:
    """Naming a payer it holds the key of, the forger's co-signature verifies,
    but the cited transaction was paid by another key: no credit."""
    genuine, forged, ledger, bound = _backdated_forgery(cosigned=False)
    own = address("mallory's own payer")
    from dataclasses import replace

    from p2pgpu.core._receipt import cosign

    forged = cosign(replace(forged, payer=own), key_of(own).sign)
    rep = compute_reputation([sign_receipt(SUBMITTER, genuine).wire, sign_receipt(IDS[6], forged).wire],
                             payments=ledger, now_ms=T0, cert_addresses=bound)
    assert rep.score(MALLORY.peer_id).good == 0 and rep.score(ALICE.peer_id).good == 5_000_000


def test_the_payer_co_signature_is_what_separates_the_forgery() -> None:
    """The same forgery with the genuine payer's co-signature (a payer that
    colludes, or a stolen payer key) takes the credit: the co-signature is
    the check that closes the hole, and it is not bypassed."""
    genuine, forged, ledger, bound = _backdated_forgery()  # co-signed by the genuine payer's key
    rep = compute_reputation([sign_receipt(SUBMITTER, genuine).wire, sign_receipt(IDS[6], forged).wire],
                             payments=ledger, now_ms=T0, cert_addresses=bound)
    assert rep.score(MALLORY.peer_id).good == decayed(5_000_000, 1) and rep.score(ALICE.peer_id).good == 0
