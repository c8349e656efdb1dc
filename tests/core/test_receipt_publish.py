"""From settlement to a published receipt (core/_receipt.py, issue #16 part two).

- ``build_receipt`` turns settled lines and the outbox's transactions into
  receipt lines (paid only with a transaction; refused, outside the quorum,
  missing, unpaid otherwise), leaving out the submitter's own part;
- ``receipt_ready`` waits for every payable line's transaction, or the wait;
- ``member_verdict``: on time, late, unpaid;
- ``decode_published`` refuses, each with its reason: a forged receipt, one
  whose certificate is another job's or does not verify, one whose lines are
  not the certificate's members, oversized and non-canonical bytes.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace

import pytest
from trust_fixtures import ALICE, BOB, CAROL, MALLORY, SUBMITTER, T0, address, job_id, key_of, tx

from p2pgpu.core import Identity, Kind, PeerMisbehaved, Reason, decode, encode
from p2pgpu.core._formation_messages import Accept, Certificate, Proposal
from p2pgpu.core._manifest import members_max
from p2pgpu.core._receipt import (
    SettledLine,
    build_receipt,
    cosign,
    decode_published,
    member_verdict,
    publish_wire,
    published_bytes_max,
    receipt_ready,
    receipts_key,
    sign_receipt,
)
from p2pgpu.core._reputation import compute_reputation

JOB = job_id("published")


def certificate(job: str = JOB, members=(ALICE, BOB, CAROL)) -> Certificate:
    prop = Proposal.sign(members[0], job_id=job, view=0, round=0, members=tuple(m.peer_id for m in members),
                         gpus_per_member=1)
    return Certificate(proposal=prop, accepts=tuple(
        Accept.sign(m, proposal=prop, lease_until_ms=T0 + 10**6, price_per_gpu_hour=1,
                    payout_address=address(m.peer_id)) for m in members))


def settled(peer, status="owed", amount=1000, txname="t1") -> SettledLine:
    return SettledLine(peer_id=peer.peer_id, status=status, amount=amount, address=address(peer.peer_id),
                       proof_hash=hashlib.sha256(peer.peer_id.encode()).digest(),
                       tx_signature=tx(txname) if txname else "")


def published(cert: Certificate | None = None, lines=None, signer=SUBMITTER) -> bytes:
    cert = cert or certificate()
    lines = lines or [settled(ALICE), settled(BOB), settled(CAROL, "outside_quorum", 0, "")]
    r = build_receipt(job_id=cert.job_id, cert_hash=cert.digest, submitter=SUBMITTER.peer_id,
                      payer=address("payer"), currency="SOL", settled_at_ms=T0, lines=lines)
    assert r is not None
    r = cosign(r, key_of(r.payer).sign)  # as the submitter's payer keypair does
    return publish_wire(sign_receipt(signer, r) if signer is SUBMITTER else _sign_as(signer, r), cert)


def _sign_as(identity, r):
    from p2pgpu.core._envelope import Kind, seal
    from p2pgpu.core._receipt import SignedReceipt

    return SignedReceipt(r, seal(identity, Kind.RECEIPT, r.to_obj()))


def test_build_receipt_maps_every_settlement_status() -> None:
    lines = [settled(ALICE), settled(BOB, "rejected", 0, ""), settled(CAROL, "missing", 0, ""),
             settled(MALLORY, "owed", 500, ""), settled(SUBMITTER)]
    r = build_receipt(job_id=JOB, cert_hash=b"c" * 32, submitter=SUBMITTER.peer_id, payer=address("payer"),
                      currency="SOL", settled_at_ms=T0, lines=lines)
    assert r is not None
    got = {ln.peer_id: (ln.outcome, ln.amount, bool(ln.payments)) for ln in r.lines}
    assert got == {ALICE.peer_id: ("paid", 1000, True), BOB.peer_id: ("proof_refused", 0, False),
                   CAROL.peer_id: ("no_proof", 0, False), MALLORY.peer_id: ("unpaid", 0, False)}
    assert SUBMITTER.peer_id not in got  # its own part of its own job is no evidence
    assert [ln.peer_id for ln in r.lines] == sorted(got)


def test_no_receipt_when_the_submitter_was_its_only_member() -> None:
    assert build_receipt(job_id=JOB, cert_hash=b"c" * 32, submitter=SUBMITTER.peer_id, payer="",
                         currency="SOL", settled_at_ms=T0, lines=[settled(SUBMITTER)]) is None


def test_receipt_waits_for_payouts_or_the_wait() -> None:
    unpaid = [settled(ALICE), settled(BOB, txname="")]
    assert not receipt_ready(unpaid, settled_at_ms=T0, now_ms=T0 + 1000, wait_ms=60_000)
    assert receipt_ready(unpaid, settled_at_ms=T0, now_ms=T0 + 60_000, wait_ms=60_000)
    refused_only = [settled(ALICE), settled(BOB, "rejected", 0, "")]
    assert receipt_ready(refused_only, settled_at_ms=T0, now_ms=T0, wait_ms=60_000)
    # A missing proof may still come late (and be owed) until the deadline: wait.
    missing = [settled(ALICE), settled(BOB, "missing", 0, "")]
    assert not receipt_ready(missing, settled_at_ms=T0, now_ms=T0 + 1000, wait_ms=60_000)
    assert receipt_ready(missing, settled_at_ms=T0, now_ms=T0 + 60_000, wait_ms=60_000)


def test_member_verdicts() -> None:
    assert member_verdict(owed=10, received=10, due_ms=100, paid_at_ms=100) == "on_time"
    assert member_verdict(owed=10, received=10, due_ms=100, paid_at_ms=101) == "late"
    assert member_verdict(owed=10, received=9, due_ms=100, paid_at_ms=50) == "late"
    assert member_verdict(owed=10, received=0, due_ms=100, paid_at_ms=50) == "unpaid"
    assert member_verdict(owed=10, received=10, due_ms=100, paid_at_ms=None) == "unpaid"


def test_published_receipt_round_trip_binds_addresses() -> None:
    wire = published()
    pr = decode_published(wire)
    assert pr.wire == wire
    assert pr.addresses == {m.peer_id: address(m.peer_id) for m in (ALICE, BOB, CAROL)}
    assert pr.names(ALICE.peer_id) and pr.names(SUBMITTER.peer_id) and not pr.names(MALLORY.peer_id)
    assert len(receipts_key(ALICE.peer_id)) <= 50 and receipts_key(ALICE.peer_id).startswith("/p2pgpu/receipts/")


def _reshape(wire: bytes, fn) -> bytes:
    outer = decode(wire, size_max=len(wire))
    fn(outer)
    return encode(outer)


def _forge_amount(outer) -> None:
    env = decode(outer["receipt"], size_max=len(outer["receipt"]))
    body = decode(env["b"], size_max=len(env["b"]))
    next(row for row in body["lines"] if row[1] == "paid")[2] *= 100
    env["b"] = encode(body)
    outer["receipt"] = encode(env)


@pytest.mark.parametrize("case, reason", [
    ("forged amount", Reason.BAD_SIGNATURE),
    ("signed by another", Reason.SIGNER_MISMATCH),
    ("another job's certificate", Reason.BAD_PROOF),
    ("lines are not the members", Reason.BAD_PROOF),
    ("oversized", Reason.OVERSIZED),
    ("non-canonical", Reason.NON_CANONICAL),
    ("extra key", Reason.BAD_SCHEMA),
])
def test_hostile_published_receipts_are_refused_with_a_reason(case: str, reason: Reason) -> None:
    good = published()
    if case == "forged amount":
        data = _reshape(good, _forge_amount)
    elif case == "signed by another":
        data = published(signer=MALLORY)
    elif case == "another job's certificate":
        other = certificate(job_id("another"))
        data = _reshape(good, lambda o: o.__setitem__("certificate", encode(other.to_obj())))
    elif case == "lines are not the members":
        data = published(cert=certificate(members=(ALICE, BOB, MALLORY)))
    elif case == "oversized":
        data = good + b"\x00" * (published_bytes_max - len(good) + 1)
    elif case == "non-canonical":
        # The same map with its keys in another order: not what encode() makes.
        outer = decode(good, size_max=len(good))
        import msgpack

        data = msgpack.packb(dict(reversed(list(outer.items()))), use_bin_type=True)
        assert data != good
    else:
        data = _reshape(good, lambda o: o.__setitem__("extra", b""))
    with pytest.raises(PeerMisbehaved) as exc:
        decode_published(data)
    assert exc.value.reason is reason, exc.value


def test_cert_addresses_from_published_receipts_credit_only_the_members_own_addresses() -> None:
    """A receipt citing a real payment to an address that is not the member's
    own (as it signed it in its accept) credits nobody."""
    cert = certificate()
    lines = [settled(ALICE), SettledLine(peer_id=BOB.peer_id, status="owed", amount=1000,
                                         address=address("not bob's"), proof_hash=b"b" * 32,
                                         tx_signature=tx("t1")), settled(CAROL, "rejected", 0, "")]
    pr = decode_published(published(cert, lines))
    from p2pgpu.core._reputation import VerifiedPayment

    pay = {tx("t1"): VerifiedPayment(tx_signature=tx("t1"), payer=address("payer"),
                                     transfers={address(ALICE.peer_id): 1000, address("not bob's"): 1000})}
    rep = compute_reputation([pr.signed], payments=pay, now_ms=T0,
                             cert_addresses={pr.receipt.cert_hash: pr.addresses})
    assert rep.score(ALICE.peer_id).good == 1000
    assert rep.score(BOB.peer_id).good == 0
    assert rep.score(CAROL.peer_id).bad == 1000 // 3  # the verified value per member


# -- pay as you go: installments in the receipt and in the member's report ---------------------

def test_a_member_paid_only_by_installments_is_paid_with_its_total() -> None:
    """Its final line owes nothing (installments covered it): before #16's
    fix it said ``unpaid`` with no weight; now ``paid``, the total of its
    installments, each transaction cited (one batch paying two is one)."""
    lines = [SettledLine(peer_id=ALICE.peer_id, status="owed", amount=0, address=address(ALICE.peer_id),
                         proof_hash=b"p" * 32, installments=((tx("i1"), 300), (tx("i2"), 200), (tx("i1"), 100))),
             SettledLine(peer_id=BOB.peer_id, status="owed", amount=50, address=address(BOB.peer_id),
                         proof_hash=b"q" * 32, tx_signature=tx("fin"), installments=((tx("i1"), 300),)),
             SettledLine(peer_id=CAROL.peer_id, status="rejected", amount=0, address=address(CAROL.peer_id),
                         proof_hash=b"r" * 32, installments=((tx("i2"), 70),))]
    r = build_receipt(job_id=job_id("payg"), cert_hash=b"c" * 32, submitter=SUBMITTER.peer_id,
                      payer=address("payer"), currency="SOL", settled_at_ms=T0, lines=lines)
    assert r is not None
    got = {ln.peer_id: (ln.outcome, ln.amount, dict(ln.payments)) for ln in r.lines}
    assert got[ALICE.peer_id] == ("paid", 600, {tx("i1"): 400, tx("i2"): 200})
    assert got[BOB.peer_id] == ("paid", 350, {tx("i1"): 300, tx("fin"): 50})
    assert got[CAROL.peer_id] == ("proof_refused", 70, {tx("i2"): 70})  # refused at the end, paid before
    # A remainder not yet paid: the line says so, and cites what was paid.
    unpaid = build_receipt(job_id=job_id("payg"), cert_hash=b"c" * 32, submitter=SUBMITTER.peer_id,
                           payer=address("payer"), currency="SOL", settled_at_ms=T0,
                           lines=[replace(lines[1], tx_signature="")])
    assert unpaid is not None and (unpaid.lines[0].outcome, unpaid.lines[0].amount) == ("unpaid", 300)


def test_receipt_waits_for_installments_in_the_outbox() -> None:
    ln = SettledLine(peer_id=ALICE.peer_id, status="owed", amount=0, address=address(ALICE.peer_id),
                     proof_hash=b"p" * 32, installments=((tx("i1"), 300),), installments_pending=1)
    assert not receipt_ready([ln], settled_at_ms=T0, now_ms=T0, wait_ms=1000)
    assert receipt_ready([replace(ln, installments_pending=0)], settled_at_ms=T0, now_ms=T0, wait_ms=1000)
    assert receipt_ready([ln], settled_at_ms=T0, now_ms=T0 + 1000, wait_ms=1000)


def test_many_payments_are_capped_per_line_and_per_receipt() -> None:
    from p2pgpu.core._receipt import line_payments_max, receipt_payments_max

    members = [Identity.from_rng(random.Random(7000 + i)) for i in range(members_max)]
    lines = [SettledLine(peer_id=m.peer_id, status="owed", amount=0, address=address(m.peer_id), proof_hash=b"",
                         installments=tuple((tx(f"{i}-{k}"), 10 + k) for k in range(20)))
             for i, m in enumerate(members)]
    r = build_receipt(job_id=job_id("many"), cert_hash=b"c" * 32, submitter=SUBMITTER.peer_id,
                      payer=address("payer"), currency="SOL", settled_at_ms=T0, lines=lines)
    assert r is not None and sum(len(ln.payments) for ln in r.lines) <= receipt_payments_max
    assert all(ln.amount == sum(10 + k for k in range(20)) and ln.payments[0][1] == 29 for ln in r.lines)
    assert len(sign_receipt(SUBMITTER, r).wire) <= Kind.RECEIPT.bytes_max
    one = build_receipt(job_id=job_id("one"), cert_hash=b"c" * 32, submitter=SUBMITTER.peer_id,
                        payer=address("payer"), currency="SOL", settled_at_ms=T0, lines=lines[:1])
    assert one is not None and len(one.lines[0].payments) == line_payments_max


def test_member_account_counts_installments() -> None:
    from p2pgpu.core._receipt import Earning, member_account

    inst = [Earning(amount=300, installment=True, tx_signature="a", paid_at_ms=T0),
            Earning(amount=200, installment=True, tx_signature="b", paid_at_ms=T0 + 1)]
    assert member_account(inst, due_ms=T0 + 10, now_ms=T0 + 5) is None  # running: not yet
    final = Earning(amount=500, installment=False, created_ms=T0 + 2)
    acct = member_account([*inst, final], due_ms=T0 + 10, now_ms=T0 + 5)
    assert acct is not None and (acct.owed, acct.received, acct.verdict, acct.tx_signature) == (500, 500, "on_time",
                                                                                                  "a")
    # the ledger showed less for one transaction: late, at the due time
    short = [replace(inst[0], on_ledger=100), inst[1], final]
    assert member_account(short, due_ms=T0 + 10, now_ms=T0 + 5) is None
    acct = member_account(short, due_ms=T0 + 10, now_ms=T0 + 10)
    assert acct is not None and (acct.received, acct.verdict) == (300, "late")
    # two rows paid by one batch: counted once, at most what the ledger moved
    same = [replace(inst[0], on_ledger=500), replace(inst[1], tx_signature="a", on_ledger=500), final]
    acct = member_account(same, due_ms=T0 + 10, now_ms=T0 + 5)
    assert acct is not None and (acct.received, acct.verdict) == (500, "on_time")
    nothing = member_account([final], due_ms=T0 + 10, now_ms=T0 + 10)
    assert nothing is not None and (nothing.received, nothing.verdict, nothing.tx_signature) == (0, "unpaid", "")
