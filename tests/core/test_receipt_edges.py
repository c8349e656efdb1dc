"""Receipts at their edges (#19): every bound of every field on both sides,
the rule that ties a paid line's amount, address and transactions together
taken apart one condition at a time, each decoder refusal naming its field,
and the signer, kind, canonical and size rules with their details.  The signed
bytes are pinned in ``tests/data/vectors.json`` (``test_vectors.py``)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import msgpack
import pytest
from trust_fixtures import ALICE, BOB, SUBMITTER, address, line, member_receipt, receipt, tx

from p2pgpu.core import Kind, PeerMisbehaved, Reason, decode, encode, seal
from p2pgpu.core._manifest import members_max
from p2pgpu.core._receipt import (
    LINE_OUTCOMES,
    MemberReceipt,
    Receipt,
    ReceiptLine,
    decode_member_receipt,
    decode_receipt,
    sign_member_receipt,
    sign_receipt,
)
from p2pgpu.core._schema import int_max

PAID = line(ALICE)
UNPAID = line(BOB, "no_proof")
TX88 = tx("t")  # a 64-byte signature in base58


def refused(decoder: Any, wire: bytes) -> PeerMisbehaved:
    with pytest.raises(PeerMisbehaved) as err:
        decoder(wire)
    return err.value


# --- lines ---------------------------------------------------------------------------


def test_line_field_bounds() -> None:
    for over in ({"peer_id": "x"}, {"peer_id": "x" * 64}, {"amount": int_max},
                 {"amount": 1, "payments": ((TX88, 1),)}, {"proof_hash": b""},
                 {"payments": (("1", 1_000_000),)}, {"payments": (("z" * 88, 1_000_000),)},
                 {"payments": ((TX88, 600_000), (tx("u"), 400_000))}):
        assert replace(PAID, **over) is not None
    for outcome in LINE_OUTCOMES[1:]:
        assert replace(UNPAID, outcome=outcome).outcome == outcome
    bad: list[tuple[ReceiptLine, dict[str, Any], str]] = [
        (PAID, {"peer_id": ""}, "peer_id, and outcome one of paid, outside_quorum, no_quorum, proof_refused, no_proof"),
        (PAID, {"peer_id": "x" * 65}, "peer_id, and outcome one of"),
        (UNPAID, {"outcome": "stolen"}, "peer_id, and outcome one of"),
        (PAID, {"amount": int_max + 1}, r"amount in \[0, 2\^63\) and proof_hash empty or 32 bytes"),
        (UNPAID, {"amount": -1}, r"amount in \[0, 2\^63\)"),
        (PAID, {"proof_hash": b"\x00" * 31}, "proof_hash empty or 32 bytes"),
        (PAID, {"proof_hash": b"\x00" * 33}, "proof_hash empty or 32 bytes"),
        (PAID, {"payments": (("0OIl", 1_000_000),)}, "tx_signature must be base58"),
        (PAID, {"payments": (("z" * 89, 1_000_000),)}, "tx_signature must be base58"),
        (PAID, {"payments": ((TX88, 0),)}, "a payment's amount is positive"),
        (PAID, {"payments": ((TX88, 500_000), (TX88, 500_000))}, "one entry per transaction"),
        (PAID, {"payments": ((tx("u"), 400_000), (TX88, 600_000))}, "payments are listed largest first"),
        (PAID, {"payments": tuple((tx(str(i)), 1) for i in range(9))}, "at most 8 payments a line"),
        (PAID, {"payments": ((TX88, 1_000_001),)}, "amount is the total of the payments"),
        (PAID, {"address": "x"}, "address is not a Solana address"),
    ]
    for base, over, why in bad:
        with pytest.raises(ValueError, match=why):
            replace(base, **over)


TIED = "a line that was paid has an amount, an address and its transactions; others none"


@pytest.mark.parametrize("over,why", [({"amount": 0}, "amount is the total of the payments"),
                                      ({"payments": ()}, TIED), ({"address": ""}, TIED),
                                      ({"amount": 0, "payments": (), "address": ""},
                                       "a paid line has an amount, an address and its transactions")],
                         ids=["no amount", "no transaction", "no address", "none"])
def test_a_paid_line_needs_amount_address_and_transaction(over: dict[str, Any], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        replace(PAID, **over)


@pytest.mark.parametrize("over,why", [({"amount": 1}, TIED),
                                      ({"payments": ((TX88, 1),)}, "amount is the total of the payments"),
                                      ({"address": address("x")}, TIED)],
                         ids=["an amount", "a transaction", "an address"])
def test_an_unpaid_line_has_none_of_them(over: dict[str, Any], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        replace(UNPAID, **over)


def test_an_unpaid_line_may_cite_installments_paid_before() -> None:
    """#16: a line whose final part was not paid (or was refused) still says
    what installments paid it, with their transactions."""
    for outcome in ("unpaid", "proof_refused", "no_proof"):
        ln = replace(UNPAID, outcome=outcome, amount=300, address=address("x"), payments=((TX88, 300),))
        assert ln.amount == 300 and ln.tx_signatures == [TX88]


# --- receipts -----------------------------------------------------------------------


def test_receipt_field_bounds() -> None:
    r = receipt("j", [PAID, UNPAID])
    for over in ({"submitter": "s"}, {"submitter": "s" * 64}, {"currency": "c"}, {"currency": "c" * 64},
                 {"settled_at_ms": 0}, {"settled_at_ms": int_max}):
        assert replace(r, **over) is not None
    assert replace(r, lines=(UNPAID,), payer="", payer_signature=b"").payer == ""  # nothing paid: no payer needed
    bad: list[tuple[dict[str, Any], str]] = [
        ({"job_id": "AB" * 32}, "job_id is 64 hex characters and cert_hash 32 bytes"),
        ({"cert_hash": b"\x00" * 31}, "job_id is 64 hex characters and cert_hash 32 bytes"),
        ({"submitter": ""}, "submitter and currency lengths"), ({"submitter": "s" * 65}, "submitter and currency"),
        ({"currency": ""}, "submitter and currency lengths"), ({"currency": "c" * 65}, "submitter and currency"),
        ({"payer": "x"}, "payer is not a Solana address"),
        ({"lines": ()}, "between 1 and 64 lines"),
        ({"lines": tuple(reversed(r.lines))}, "one line per member, sorted by peer id"),
        ({"lines": (PAID, PAID)}, "one line per member, sorted by peer id"),
        ({"lines": (line(SUBMITTER),)}, "the submitter is not one of its members"),
        ({"settled_at_ms": -1}, "settled_at_ms out of range"), ({"settled_at_ms": int_max + 1}, "settled_at_ms"),
        ({"payer": ""}, "a receipt with payments names its payer"),
    ]
    for over, why in bad:
        with pytest.raises(ValueError, match=why):
            replace(r, **over)


def test_receipt_line_count_bounds() -> None:
    import random

    from p2pgpu.core import Identity

    peers = sorted((Identity.from_rng(random.Random(7000 + i)) for i in range(members_max + 1)),
                   key=lambda i: i.peer_id)
    lines = [line(p, "no_proof") for p in peers]
    assert len(receipt("j", lines[:members_max]).lines) == members_max
    with pytest.raises(ValueError, match="between 1 and 64 lines"):
        receipt("j", lines)


def test_paid_total() -> None:
    assert receipt("j", [line(ALICE, amount=7), line(BOB, amount=5)]).paid_total == 12
    assert receipt("j", [UNPAID]).paid_total == 0


def test_member_receipt_field_bounds() -> None:
    m = member_receipt("j", ALICE)
    for over in ({"member": "m"}, {"member": "m" * 64}, {"submitter": "s" * 64}, {"owed": 0}, {"owed": int_max},
                 {"received": int_max}, {"reported_at_ms": 0}):
        assert replace(m, **over) is not None
    assert replace(m, verdict="late").verdict == "late"
    assert replace(m, received=1).received == 1  # one lamport received is paid, with its transaction
    unpaid = member_receipt("j", ALICE, "unpaid")
    bad: list[tuple[MemberReceipt, dict[str, Any], str]] = [
        (m, {"job_id": "AB" * 32}, "job_id is 64 hex characters and cert_hash 32 bytes"),
        (m, {"cert_hash": b"\x00" * 33}, "cert_hash 32 bytes"),
        (m, {"member": ""}, "member and submitter lengths"), (m, {"member": "m" * 65}, "member and submitter"),
        (m, {"submitter": ""}, "member and submitter lengths"), (m, {"submitter": "s" * 65}, "member and submitter"),
        (m, {"submitter": ALICE.peer_id}, "a member is not its submitter; verdict one of on_time, late, unpaid"),
        (m, {"verdict": "great"}, "verdict one of on_time, late, unpaid"),
        (m, {"owed": -1}, "amounts and time must not be negative"),
        (m, {"owed": int_max + 1}, "amounts and time must not be negative"),
        (m, {"received": int_max + 1}, "amounts and time must not be negative"),
        (unpaid, {"received": -1, "tx_signature": ""}, "amounts and time must not be negative"),
        (m, {"reported_at_ms": -1}, "amounts and time must not be negative"),
        (m, {"tx_signature": "0OIl"}, "tx_signature must be base58"),
        (m, {"verdict": "unpaid"}, "unpaid means nothing received and no transaction; otherwise both"),
        (m, {"received": 0}, "unpaid means nothing received"),
        (m, {"tx_signature": ""}, "unpaid means nothing received"),
        (unpaid, {"tx_signature": TX88}, "unpaid means nothing received"),
        (unpaid, {"verdict": "late"}, "unpaid means nothing received"),
    ]
    for base, over, why in bad:
        with pytest.raises(ValueError, match=why):
            replace(base, **over)


def test_signing_keeps_the_receipt() -> None:
    r = receipt("j", [PAID])
    sr = sign_receipt(SUBMITTER, r)
    assert sr.receipt == r and sr.digest == sr.envelope.digest and decode_receipt(sr.wire).wire == sr.wire
    m = member_receipt("j", ALICE)
    sm = sign_member_receipt(ALICE, m)
    assert sm.receipt == m and sm.digest == sm.envelope.digest and decode_member_receipt(sm.wire).wire == sm.wire
    with pytest.raises(ValueError, match="a receipt is signed by its submitter"):
        sign_receipt(ALICE, r)
    with pytest.raises(ValueError, match="a member receipt is signed by its member"):
        sign_member_receipt(SUBMITTER, m)


# --- decoders ------------------------------------------------------------------------


def receipt_wire(**over: Any) -> bytes:
    # not co-signed: the payer's signature would cover the fields changed here
    return seal(SUBMITTER, Kind.RECEIPT, {**receipt("j", [PAID], cosigned=False).to_obj(), **over}).to_bytes()


def member_wire(**over: Any) -> bytes:
    return seal(ALICE, Kind.MEMBER_RECEIPT, {**member_receipt("j", ALICE).to_obj(), **over}).to_bytes()


RECEIPT_REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"job_id": "AB" * 32}, "job_id: must be 64 lowercase hex characters"),
    ({"job_id": "a" * 65}, "job_id: length must be in [64, 64]"),
    ({"cert_hash": b"\x00" * 31}, "cert_hash: length must be in [32, 32]"),
    ({"submitter": "s" * 65}, "submitter: length must be in [1, 64]"),
    ({"payer": "p" * 45}, "payer: length must be in [0, 44]"),
    ({"currency": ""}, "currency: length must be in [1, 64]"),
    ({"currency": "c" * 65}, "currency: length must be in [1, 64]"),
    ({"settled_at_ms": -1}, "settled_at_ms: must be in [0, "),
    ({"lines": []}, "lines: must have between 1 and 64 items"),
    ({"lines": [5]}, "lines[0]: must be [peer_id, outcome, amount, address, payments, proof_hash]"),
    ({"lines": [PAID.to_obj()[:5]]}, "lines[0]: must be [peer_id, outcome"),
    ({"lines": [["x" * 65, *PAID.to_obj()[1:]]]}, "peer_id: length must be in [1, 64]"),
    ({"lines": [[PAID.peer_id, "o" * 17, *PAID.to_obj()[2:]]]}, "outcome: length must be in [0, 16]"),
    ({"lines": [[*PAID.to_obj()[:2], "1", *PAID.to_obj()[3:]]]}, "amount: must be an integer"),
    ({"lines": [[*PAID.to_obj()[:3], "a" * 45, *PAID.to_obj()[4:]]]}, "address: length must be in [0, 44]"),
    ({"lines": [[*PAID.to_obj()[:4], "z" * 88, PAID.proof_hash]]}, "payments: must be a list"),
    ({"lines": [[*PAID.to_obj()[:4], [["z" * 89, 1_000_000]], PAID.proof_hash]]},
     "payments: a tx_signature is 1..88 characters"),
    ({"lines": [[*PAID.to_obj()[:4], [[TX88]], PAID.proof_hash]]}, "payments: each is [tx_signature, amount]"),
    ({"lines": [[*PAID.to_obj()[:4], [[TX88, "1"]], PAID.proof_hash]]}, "a payment is [tx_signature, amount]"),
    ({"lines": [[*PAID.to_obj()[:4], [[tx(str(i)), 1] for i in range(9)], PAID.proof_hash]]},
     "payments: must have between 0 and 8 items"),
    ({"lines": [[*PAID.to_obj()[:5], b"\x00" * 33]]}, "proof_hash: length must be in [0, 32]"),
    ({"lines": [[*PAID.to_obj()[:2], 0, *PAID.to_obj()[3:]]]}, "lines[0]: amount is the total of the payments"),
    ({"lines": [[*PAID.to_obj()[:2], 2_000_000, *PAID.to_obj()[3:]]]},
     "a line lists all its payments, or its 8 largest"),
    ({"payer": ""}, "a receipt with payments names its payer"),
    ({"extra": 1}, "extra: unknown field"),
    ({"payer_signature": b"\x00" * 63}, "payer_signature: length must be in [64, 64]"),
    ({"payer_signature": "s" * 64}, "payer_signature: must be bytes"),
]


@pytest.mark.parametrize("over,why", RECEIPT_REFUSED, ids=[w for _, w in RECEIPT_REFUSED])
def test_receipt_decoder_names_the_field(over: dict[str, Any], why: str) -> None:
    # A line's schema errors name the field but not the line (a line's
    # ``where`` is added to the constructor's errors only): ``in``, not
    # ``startswith``, so that naming the line too would still pass.
    err = refused(decode_receipt, receipt_wire(**over))
    assert err.reason is Reason.BAD_SCHEMA
    assert why in err.detail, err.detail


MEMBER_REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"job_id": "AB" * 32}, "job_id: must be 64 lowercase hex characters"),
    ({"cert_hash": b"\x00" * 33}, "cert_hash: length must be in [32, 32]"),
    ({"member": ""}, "member: length must be in [1, 64]"),
    ({"submitter": "s" * 65}, "submitter: length must be in [1, 64]"),
    ({"owed": -1}, "owed: must be in [0, "), ({"received": -1}, "received: must be in [0, "),
    ({"tx_signature": "z" * 89}, "tx_signature: length must be in [0, 88]"),
    ({"verdict": "v" * 17}, "verdict: length must be in [0, 16]"),
    ({"verdict": "great"}, "a member is not its submitter; verdict one of"),
    ({"reported_at_ms": -1}, "reported_at_ms: must be in [0, "),
]


@pytest.mark.parametrize("over,why", MEMBER_REFUSED, ids=[w for _, w in MEMBER_REFUSED])
def test_member_receipt_decoder_names_the_field(over: dict[str, Any], why: str) -> None:
    err = refused(decode_member_receipt, member_wire(**over))
    assert err.reason is Reason.BAD_SCHEMA
    assert err.detail.startswith(why), err.detail


def test_a_payer_signature_that_does_not_verify_is_refused() -> None:
    """#16.2: 64 bytes that are not the payer key's signature of this receipt
    (zeros; the submitter's own key's; the payer's, of another receipt)."""
    from trust_fixtures import key_of

    from p2pgpu.core._receipt import payer_message

    r = receipt("j", [PAID], cosigned=False)
    other = receipt("other", [PAID], cosigned=False)
    for sig in (b"\x00" * 64, SUBMITTER.sign(payer_message(r)), key_of(r.payer).sign(payer_message(other))):
        err = refused(decode_receipt, receipt_wire(payer_signature=sig))
        assert err.reason is Reason.BAD_SIGNATURE, sig
    good = key_of(r.payer).sign(payer_message(r))
    assert decode_receipt(receipt_wire(payer_signature=good)).receipt.cosigned


def test_decoders_take_the_smallest_valid_fields() -> None:
    r = decode_receipt(receipt_wire(currency="c"))
    assert r.receipt.currency == "c"
    mr = decode_member_receipt(member_wire(submitter="s", owed=0))
    assert (mr.receipt.submitter, mr.receipt.owed) == ("s", 0)


def test_signers_and_kinds() -> None:
    err = refused(decode_receipt, seal(ALICE, Kind.RECEIPT, receipt("j", [PAID]).to_obj()).to_bytes())
    assert (err.reason, err.detail) == (Reason.SIGNER_MISMATCH, "receipt not signed by its submitter")
    err = refused(decode_member_receipt, seal(BOB, Kind.MEMBER_RECEIPT, member_receipt("j", ALICE).to_obj())
                  .to_bytes())
    assert (err.reason, err.detail) == (Reason.SIGNER_MISMATCH, "member receipt not signed by its member")
    err = refused(decode_receipt, member_wire())
    assert (err.reason, err.detail) == (Reason.WRONG_KIND, "expected receipt, got member_receipt")
    err = refused(decode_member_receipt, seal(SUBMITTER, Kind.RECEIPT, member_receipt("j", ALICE).to_obj())
                  .to_bytes())
    assert (err.reason, err.detail) == (Reason.WRONG_KIND, "expected member_receipt, got receipt")


@pytest.mark.parametrize("decoder,make", [(decode_receipt, lambda: receipt_wire()),
                                          (decode_member_receipt, lambda: member_wire())],
                         ids=["receipt", "member receipt"])
def test_non_canonical_and_oversized(decoder: Any, make: Any) -> None:
    wire = make()
    kind = Kind(decode(wire)["k"])
    decoder(wire)
    shuffled = msgpack.packb(dict(reversed(list(decode(wire).items()))), use_bin_type=True)
    assert refused(decoder, shuffled).reason is Reason.NON_CANONICAL
    assert refused(decoder, b"\x00" * (kind.bytes_max + 1)).reason is Reason.OVERSIZED
    obj = decode(wire)
    obj["s"] = b"\x00" * kind.bytes_max
    assert refused(decoder, encode(obj)).reason is Reason.OVERSIZED


def test_receipt_round_trip_keeps_every_field() -> None:
    r = receipt("j", [PAID, UNPAID])
    got = decode_receipt(sign_receipt(SUBMITTER, r).wire).receipt
    assert got == r and got.lines == r.lines
    assert Receipt.from_obj(r.to_obj()) == r
    m = member_receipt("j", ALICE, "late")
    assert MemberReceipt.from_obj(m.to_obj()) == m
