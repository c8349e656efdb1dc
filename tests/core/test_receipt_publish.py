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

import pytest
from trust_fixtures import ALICE, BOB, CAROL, MALLORY, SUBMITTER, T0, address, job_id, tx

from p2pgpu.core import PeerMisbehaved, Reason, decode, encode
from p2pgpu.core._formation_messages import Accept, Certificate, Proposal
from p2pgpu.core._receipt import (
    SettledLine,
    build_receipt,
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
