"""Receipts at their edges (#19): every bound of every field on both sides,
the rule that ties a paid line's amount, address and transactions together
taken apart one condition at a time, each decoder refusal naming its field,
and the signer, kind, canonical and size rules with their details.  The signed
bytes are pinned in ``tests/data/vectors.json`` (``test_vectors.py``)."""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace
from types import SimpleNamespace
from typing import Any, cast

import msgpack
import pytest
from trust_fixtures import (
    ALICE,
    BOB,
    CAROL,
    SUBMITTER,
    T0,
    address,
    job_id,
    line,
    member_receipt,
    receipt,
    tx,
)

from p2pgpu.core import Identity, Kind, PeerMisbehaved, Reason, decode, encode, seal
from p2pgpu.core._formation_messages import Accept, Certificate, Proposal
from p2pgpu.core._identity import verify_signature
from p2pgpu.core._manifest import members_max
from p2pgpu.core._receipt import (
    LINE_OUTCOMES,
    Earning,
    MemberAccount,
    MemberReceipt,
    Receipt,
    ReceiptLine,
    SettledLine,
    SignedReceipt,
    build_receipt,
    decode_member_receipt,
    decode_published,
    decode_receipt,
    line_payments,
    member_account,
    member_verdict,
    payments_cap,
    publish_wire,
    published_bytes_max,
    receipts_key,
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


def test_a_payer_signature_is_64_bytes_and_needs_the_payer_it_names() -> None:
    """Each half of the constructor's rule alone (the decoder's schema checks
    the length first, so only the constructor tells them apart)."""
    r = receipt("j", [PAID])
    assert replace(r, payer_signature=b"\x01" * 64).payer_signature == b"\x01" * 64
    for over in ({"payer_signature": b"\x01" * 63}, {"payer_signature": b"\x01" * 65},
                 {"lines": (UNPAID,), "payer": "", "payer_signature": b"\x01" * 64}):
        with pytest.raises(ValueError, match="payer_signature is 64 bytes, by the payer named"):
            replace(r, **over)


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



# --- payments, from settlement to a receipt, and a member's account (#19, the receipt publishing code) ---


def test_a_payment_may_be_as_large_as_an_amount_may() -> None:
    assert replace(PAID, amount=int_max, payments=((TX88, int_max),)).payments == ((TX88, int_max),)


def test_equal_payments_are_listed_by_signature() -> None:
    a, b = sorted([tx("u"), tx("v")])
    assert replace(PAID, payments=((a, 500_000), (b, 500_000))).payments == ((a, 500_000), (b, 500_000))
    with pytest.raises(ValueError, match="payments are listed largest first, then by signature"):
        replace(PAID, payments=((b, 500_000), (a, 500_000)))


def settled_line(peer: Any = ALICE, **over: Any) -> SettledLine:
    base = SettledLine(peer_id=peer.peer_id, status="owed", amount=1000, address=address(peer.peer_id),
                       proof_hash=b"p" * 32, tx_signature=tx("final"))
    return replace(base, **over)


def built(*lines: SettledLine, payer: str = address("payer")) -> Receipt:
    r = build_receipt(job_id=job_id("built"), cert_hash=b"c" * 32, submitter=SUBMITTER.peer_id, payer=payer,
                      currency="SOL", settled_at_ms=T0, lines=list(lines))
    assert r is not None
    return r


def by_peer(r: Receipt) -> dict[str, ReceiptLine]:
    return {ln.peer_id: ln for ln in r.lines}


def test_build_receipt_sets_every_field_of_a_line() -> None:
    r = built(settled_line(ALICE), settled_line(BOB, proof_hash=b"short"), settled_line(CAROL, amount=1))
    assert by_peer(r) == {
        ALICE.peer_id: ReceiptLine(peer_id=ALICE.peer_id, outcome="paid", amount=1000,
                                   address=address(ALICE.peer_id), payments=((tx("final"), 1000),),
                                   proof_hash=b"p" * 32),
        # a proof hash that is not 32 bytes is left out, not a refusal of the whole receipt
        BOB.peer_id: ReceiptLine(peer_id=BOB.peer_id, outcome="paid", amount=1000, address=address(BOB.peer_id),
                                 payments=((tx("final"), 1000),), proof_hash=b""),
        # one lamport is a payment like any other
        CAROL.peer_id: ReceiptLine(peer_id=CAROL.peer_id, outcome="paid", amount=1, address=address(CAROL.peer_id),
                                   payments=((tx("final"), 1),), proof_hash=b"p" * 32),
    }
    assert (r.job_id, r.cert_hash, r.submitter, r.payer, r.currency, r.settled_at_ms) == (
        job_id("built"), b"c" * 32, SUBMITTER.peer_id, address("payer"), "SOL", T0)


def test_a_receipt_that_cites_no_payment_names_no_payer() -> None:
    r = built(settled_line(ALICE, status="rejected", amount=0, tx_signature=""),
              settled_line(BOB, tx_signature=""))
    assert r.payer == ""
    assert {p: ln.outcome for p, ln in by_peer(r).items()} == {ALICE.peer_id: "proof_refused", BOB.peer_id: "unpaid"}


def test_a_status_settlement_does_not_know_is_reported_unpaid() -> None:
    """A store written by another version may hold a status this one does not
    map: the member is reported unpaid (the truth of what the receipt shows),
    not a receipt that cannot be built."""
    r = built(settled_line(ALICE, status="held", tx_signature=""))
    assert (r.lines[0].outcome, r.lines[0].amount, r.lines[0].payments) == ("unpaid", 0, ())


def test_the_per_line_cap_counts_only_lines_that_cite_payments() -> None:
    """16 lines citing payments share the receipt's 128 at 8 each; a 17th
    line owed but not yet paid cites nothing and takes no share."""
    members = [Identity.from_rng(random.Random(7100 + i)) for i in range(17)]
    paying = [settled_line(m, amount=0, tx_signature="", installments=tuple((tx(f"{i}-{k}"), 10 + k)
                                                                            for k in range(10)))
              for i, m in enumerate(members[:16])]
    r = built(*paying, settled_line(members[16], tx_signature=""))
    assert payments_cap(16) == 8 and payments_cap(17) == 7
    cited = [len(ln.payments) for ln in r.lines if ln.payments]
    assert cited == [8] * 16


def test_payments_cap_values() -> None:
    assert [payments_cap(n) for n in (0, 1, 16, 17, 64, 128, 129)] == [8, 8, 8, 7, 2, 1, 1]


def test_line_payments_merge_one_transaction_and_skip_what_paid_nothing() -> None:
    a, b = sorted([tx("a"), tx("b")])
    ln = settled_line(amount=50, tx_signature=a, installments=((a, 300), ("", 70), (tx("zero"), 0), (tx("one"), 1),
                                                               (b, 350)))
    # the final line and an installment paid by one batch: one payment of their sum;
    # an installment without a transaction, or of nothing, is no payment; one lamport is
    assert line_payments(ln) == (701, ((a, 350), (b, 350), (tx("one"), 1)))
    assert line_payments(ln, 1) == (701, ((a, 350),)) == line_payments(ln, 0)
    assert line_payments(replace(ln, installments=((b, 350), (a, 300))))[1][:2] == ((a, 350), (b, 350))
    r = built(ln)
    assert (r.lines[0].amount, r.lines[0].payments) == (701, ((a, 350), (b, 350), (tx("one"), 1)))


def earning(amount: int, tx_signature: str = "", paid_at_ms: int | None = None, *, installment: bool = True,
            on_ledger: int | None = None) -> Earning:
    return Earning(amount=amount, installment=installment, tx_signature=tx_signature, paid_at_ms=paid_at_ms,
                   on_ledger=on_ledger)


def test_a_member_is_owed_its_final_proof_not_its_installments() -> None:
    got = member_account([earning(300, "a", T0), earning(100, "b", T0), earning(500, installment=False)],
                         due_ms=T0 + 10, now_ms=T0 + 10)
    assert got == MemberAccount(owed=500, received=400, tx_signature="a", verdict="late")
    # no final proof: what it claimed
    got = member_account([earning(300, "a", T0), earning(200, "b", T0)], due_ms=T0 + 10, now_ms=T0 + 10)
    assert got == MemberAccount(owed=500, received=500, tx_signature="a", verdict="on_time")


def test_only_a_payment_with_its_notice_is_received() -> None:
    final = earning(500, installment=False)
    got = member_account([final, earning(500, "a", None)], due_ms=T0 + 10, now_ms=T0 + 10)
    assert got == MemberAccount(owed=500, received=0, tx_signature="", verdict="unpaid")
    got = member_account([final, earning(500, "", T0)], due_ms=T0 + 10, now_ms=T0 + 10)
    assert got == MemberAccount(owed=500, received=0, tx_signature="", verdict="unpaid")


def test_the_latest_payment_decides_lateness_whatever_the_order() -> None:
    got = member_account([earning(250, "a", T0 + 11), earning(250, "b", T0 + 1), earning(500, installment=False)],
                         due_ms=T0 + 10, now_ms=T0 + 20)
    assert got is not None and got.verdict == "late"


def test_the_cited_transaction_is_the_largest_then_the_first_by_signature() -> None:
    final = earning(600, installment=False)
    got = member_account([final, earning(200, "a", T0), earning(400, "b", T0)], due_ms=T0 + 10, now_ms=T0)
    assert got is not None and got.tx_signature == "b"
    got = member_account([final, earning(300, "b", T0), earning(300, "a", T0)], due_ms=T0 + 10, now_ms=T0)
    assert got is not None and got.tx_signature == "a"
    # a transaction the ledger showed paid nothing is never cited
    got = member_account([final, earning(300, "a", T0, on_ledger=0), earning(1, "b", T0)], due_ms=T0 + 10,
                         now_ms=T0 + 10)
    assert got == MemberAccount(owed=600, received=1, tx_signature="b", verdict="late")


def test_one_lamport_received_is_a_payment() -> None:
    got = member_account([earning(1, installment=False), earning(1, "a", T0)], due_ms=T0 + 10, now_ms=T0)
    assert got == MemberAccount(owed=1, received=1, tx_signature="a", verdict="on_time")
    assert member_verdict(owed=1, received=1, due_ms=T0, paid_at_ms=T0) == "on_time"


def test_a_one_character_transaction_decodes_and_an_empty_one_is_refused_by_name() -> None:
    one = [[*PAID.to_obj()[:4], [["1", 1_000_000]], PAID.proof_hash]]
    assert decode_receipt(receipt_wire(lines=one)).receipt.lines[0].payments == (("1", 1_000_000),)
    empty = [[*PAID.to_obj()[:4], [["", 1_000_000]], PAID.proof_hash]]
    err = refused(decode_receipt, receipt_wire(lines=empty))
    assert (err.reason, err.detail) == (Reason.BAD_SCHEMA, "lines[0]: payments: a tx_signature is 1..88 characters")


def test_receipts_key_is_pinned() -> None:
    key = receipts_key("12D3KooWpeer")
    assert key == "/p2pgpu/receipts/" + hashlib.sha256(b"12D3KooWpeer").hexdigest()[:32] and len(key) == 49


# --- published receipts -------------------------------------------------------------------


def members_cert(*members: Identity, job: str = job_id("built"), view: int = 0) -> Certificate:
    prop = Proposal.sign(members[0], job_id=job, view=view, round=0, members=tuple(m.peer_id for m in members),
                         gpus_per_member=1)
    return Certificate(proposal=prop, accepts=tuple(
        Accept.sign(m, proposal=prop, lease_until_ms=T0 + 10**6, price_per_gpu_hour=1,
                    payout_address=address(m.peer_id)) for m in members))


def published_pair(cert: Certificate | None = None) -> tuple[bytes, Receipt, Certificate]:
    cert = cert or members_cert(ALICE, BOB)
    r = build_receipt(job_id=cert.job_id, cert_hash=cert.digest, submitter=SUBMITTER.peer_id,
                      payer=address("payer"), currency="SOL", settled_at_ms=T0,
                      lines=[settled_line(ALICE), settled_line(BOB)])
    assert r is not None
    return publish_wire(sign_receipt(SUBMITTER, r), cert), r, cert


def outer_with(wire: bytes, **over: Any) -> bytes:
    outer = decode(wire)
    outer.update(over)
    return encode(outer)


def test_a_published_receipt_must_be_a_receipt_envelope() -> None:
    """The same body signed as another kind (a signature made for another
    purpose) is not a receipt."""
    wire, r, _ = published_pair()
    other = seal(SUBMITTER, Kind.MEMBER_RECEIPT, r.to_obj()).to_bytes()
    err = refused(decode_published, outer_with(wire, receipt=other))
    assert (err.reason, err.detail) == (Reason.WRONG_KIND, "expected receipt, got member_receipt")


def test_the_verifier_handed_in_checks_every_signature() -> None:
    wire, _, _ = published_pair()
    seen: list[bytes] = []

    def verify(signer: bytes, message: bytes, signature: bytes) -> None:
        seen.append(message.split(b"\x00", 1)[0])
        verify_signature(signer, message, signature)

    decode_published(wire, verify)
    assert sorted(seen) == sorted([b"p2pgpu/receipt/v1", b"p2pgpu/proposal/v1", b"p2pgpu/accept/v1",
                                   b"p2pgpu/accept/v1"])


def test_published_parts_must_be_canonical_and_within_their_kinds_size() -> None:
    wire, _, _ = published_pair()
    outer = decode(wire)
    env = decode(outer["receipt"])
    shuffled_receipt = msgpack.packb(dict(reversed(list(env.items()))), use_bin_type=True)
    cert_obj = decode(outer["certificate"])
    shuffled_cert = msgpack.packb(dict(reversed(list(cert_obj.items()))), use_bin_type=True)
    assert shuffled_receipt != outer["receipt"] and shuffled_cert != outer["certificate"]
    for over in ({"receipt": shuffled_receipt}, {"certificate": shuffled_cert}):
        assert refused(decode_published, outer_with(wire, **over)).reason is Reason.NON_CANONICAL
    big_env = encode({**env, "s": b"\x00" * Kind.RECEIPT.bytes_max})
    big_cert = encode({**cert_obj, "pad": b"\x00" * Kind.CERTIFICATE.bytes_max})
    for over in ({"receipt": big_env}, {"certificate": big_cert}):
        data = outer_with(wire, **over)
        assert len(data) <= published_bytes_max
        err = refused(decode_published, data)
        assert err.reason is Reason.OVERSIZED, err


def test_a_certificate_of_the_same_job_but_another_cluster_is_not_the_one_named() -> None:
    wire, _, cert = published_pair()
    other = members_cert(ALICE, BOB, view=1)
    assert other.job_id == cert.job_id and other.digest != cert.digest
    err = refused(decode_published, outer_with(wire, certificate=encode(other.to_obj())))
    assert (err.reason, err.detail) == (Reason.BAD_PROOF, "the certificate is not the one the receipt names")


@pytest.mark.parametrize("part", ["receipt", "certificate"])
def test_each_published_part_must_be_bytes(part: str) -> None:
    wire, _, _ = published_pair()
    err = refused(decode_published, outer_with(wire, **{part: [1]}))
    assert (err.reason, err.detail) == (Reason.BAD_SCHEMA,
                                        "a published receipt is {receipt: bytes, certificate: bytes}")


def test_publish_wire_at_its_ceiling() -> None:
    """The published bytes may be exactly ``published_bytes_max`` long, not one more
    (a signed receipt stands in here: only its bytes are published)."""
    _, _, cert = published_pair()
    inner = len(encode(cert.to_obj()))

    def signed(n: int) -> SignedReceipt:
        return cast(SignedReceipt, SimpleNamespace(wire=b"r" * n))
    n = published_bytes_max - inner - 64
    n += published_bytes_max - len(publish_wire(signed(n), cert))
    assert len(publish_wire(signed(n), cert)) == published_bytes_max
    with pytest.raises(ValueError, match=f"published receipt of {published_bytes_max + 1} bytes > "):
        publish_wire(signed(n + 1), cert)
