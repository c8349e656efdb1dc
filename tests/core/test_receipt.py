"""Receipts (``p2pgpu/core/_receipt.py``): round trips, the rules each field
obeys, the signer rule, size limits and canonical bytes."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest
from trust_fixtures import ALICE, BOB, SUBMITTER, line, member_receipt, receipt

from p2pgpu.core import Identity, Kind, LocalProtocolError, PeerMisbehaved, Reason, encode, seal
from p2pgpu.core._manifest import members_max
from p2pgpu.core._receipt import (
    decode_member_receipt,
    decode_receipt,
    sign_member_receipt,
    sign_receipt,
)


def test_receipts_round_trip() -> None:
    r = receipt("j1", [line(ALICE), line(BOB, "proof_refused")])
    sr = sign_receipt(SUBMITTER, r)
    assert decode_receipt(sr.wire) == sr and r.paid_total == 1_000_000
    m = member_receipt("j1", ALICE, "late")
    sm = sign_member_receipt(ALICE, m)
    assert decode_member_receipt(sm.wire) == sm


def test_the_largest_receipt_fits_its_kind() -> None:
    members = [Identity.from_rng(random.Random(5000 + i)) for i in range(members_max)]
    r = receipt("big", [line(p, txname=f"t{i}") for i, p in enumerate(members)])
    assert len(sign_receipt(SUBMITTER, r).wire) <= Kind.RECEIPT.bytes_max


def _sealed(identity: Identity, kind: Kind, body: dict[str, Any]) -> bytes:
    return seal(identity, kind, body).to_bytes()


@pytest.mark.parametrize("change", [
    {"job_id": "x" * 64}, {"cert_hash": b"c" * 31}, {"currency": ""}, {"payer": "not-an-address"},
    {"lines": []}, {"settled_at_ms": -1}, {"extra": 1},
])
def test_hostile_receipt_fields(change: dict[str, Any]) -> None:
    body = {**receipt("j1", [line(ALICE)]).to_obj(), **change}
    with pytest.raises(PeerMisbehaved) as exc:
        decode_receipt(_sealed(SUBMITTER, Kind.RECEIPT, body))
    assert exc.value.reason is Reason.BAD_SCHEMA


@pytest.mark.parametrize("row", [
    "no list", [], ["p", "paid", 1, "", "", b""],                     # paid without address or tx
    ["p", "proof_refused", 5, "", "", b""],                            # amount on an unpaid line
    ["p", "stolen", 0, "", "", b""],                                   # unknown outcome
    ["p", "no_proof", 0, "", "0OIl", b""],                             # not base58
    ["p", "no_proof", 0, "", "", b"x" * 31], ["p", "no_proof", True, "", "", b""],
])
def test_hostile_receipt_lines(row: Any) -> None:
    body = receipt("j1", [line(ALICE)], cosigned=False).to_obj()
    body["lines"] = [row]
    with pytest.raises(PeerMisbehaved):
        decode_receipt(_sealed(SUBMITTER, Kind.RECEIPT, body))


def test_lines_must_be_unique_sorted_and_not_the_submitter() -> None:
    good = receipt("j1", [line(ALICE), line(BOB)])
    body = good.to_obj()
    body["lines"] = list(reversed(body["lines"]))
    with pytest.raises(PeerMisbehaved):
        decode_receipt(_sealed(SUBMITTER, Kind.RECEIPT, body))
    body["lines"] = [body["lines"][0], body["lines"][0]]
    with pytest.raises(PeerMisbehaved):
        decode_receipt(_sealed(SUBMITTER, Kind.RECEIPT, body))
    with pytest.raises(ValueError):
        replace(good, lines=(line(SUBMITTER),))


def test_a_receipt_signed_by_anyone_but_its_submitter_is_refused() -> None:
    r = receipt("j1", [line(ALICE)])
    with pytest.raises(PeerMisbehaved) as exc:
        decode_receipt(_sealed(ALICE, Kind.RECEIPT, r.to_obj()))
    assert exc.value.reason is Reason.SIGNER_MISMATCH
    with pytest.raises(ValueError):
        sign_receipt(ALICE, r)
    m = member_receipt("j1", ALICE, "unpaid")
    with pytest.raises(PeerMisbehaved) as exc:
        decode_member_receipt(_sealed(BOB, Kind.MEMBER_RECEIPT, m.to_obj()))
    assert exc.value.reason is Reason.SIGNER_MISMATCH


def test_a_receipt_is_not_a_member_receipt_nor_a_proof() -> None:
    sr = sign_receipt(SUBMITTER, receipt("j1", [line(ALICE)]))
    with pytest.raises(PeerMisbehaved) as exc:
        decode_member_receipt(sr.wire)
    assert exc.value.reason in (Reason.WRONG_KIND, Reason.OVERSIZED)


@pytest.mark.parametrize("change", [
    {"verdict": "unpaid"},                       # unpaid yet received
    {"received": 0},                             # nothing received but a transaction
    {"member": SUBMITTER.peer_id},               # reporting on itself
    {"owed": -1}, {"verdict": "great"}, {"tx_signature": "x" * 89},
])
def test_hostile_member_receipt_fields(change: dict[str, Any]) -> None:
    body = {**member_receipt("j1", ALICE, "on_time").to_obj(), **change}
    with pytest.raises(PeerMisbehaved):
        decode_member_receipt(_sealed(ALICE, Kind.MEMBER_RECEIPT, body))


def test_non_canonical_and_oversized_bytes_are_refused() -> None:
    import msgpack

    sr = sign_receipt(SUBMITTER, receipt("j1", [line(ALICE)]))
    obj = sr.envelope.to_obj()
    shuffled = msgpack.packb(dict(reversed(list(obj.items()))), use_bin_type=True)
    with pytest.raises(PeerMisbehaved) as exc:
        decode_receipt(shuffled)
    assert exc.value.reason is Reason.NON_CANONICAL
    with pytest.raises(PeerMisbehaved) as exc:
        decode_receipt(sr.wire + b"\x00" * Kind.RECEIPT.bytes_max)
    assert exc.value.reason is Reason.OVERSIZED
    huge = receipt("j1", [line(ALICE)]).to_obj()
    huge["currency"] = "S" * 40_000
    with pytest.raises(LocalProtocolError):
        seal(SUBMITTER, Kind.RECEIPT, huge)  # we would never send it
    assert encode(huge)  # ... though it encodes


# -- payments: a line cites every payment of its member (pay as you go) -------------------------

def _paid_row(payments: Any, amount: int) -> list[Any]:
    from trust_fixtures import address
    return [ALICE.peer_id, "paid", amount, address(ALICE.peer_id), payments, b""]


def test_a_line_lists_installments_and_remainder() -> None:
    from trust_fixtures import tx
    pays = [[tx("a"), 300], [tx("b"), 200]]
    pays.sort(key=lambda p: (-p[1], p[0]))
    body = receipt("j1", [line(ALICE)], cosigned=False).to_obj()
    body["lines"] = [_paid_row(pays, 500)]
    r = decode_receipt(_sealed(SUBMITTER, Kind.RECEIPT, body)).receipt
    assert r.lines[0].amount == 500 and r.lines[0].tx_signatures == [p[0] for p in pays]


def _nine() -> list[list[Any]]:
    from trust_fixtures import tx
    return sorted([[tx(f"n{i}"), 100 + i] for i in range(9)], key=lambda p: (-p[1], p[0]))


@pytest.mark.parametrize("pays,amount", [
    ("tx", 5),                                                     # not a list
    ([], 5),                                                       # paid, nothing cited
    ([["5" * 87, 3], ["5" * 87, 2]], 5),                           # one transaction twice
    ([["5" * 87, 2], ["6" * 87, 3]], 5),                           # not largest first
    ([["5" * 87, 3]], 5),                                          # total differs from the payments
    ([["5" * 87, 0]], 0),                                          # a zero payment
    ([["5" * 87, True]], 1),                                       # a bool for an amount
    ([["0OIl", 5]], 5),                                            # not base58
    ([["5" * 89, 5]], 5),                                          # too long
    ([["5" * 87]], 5), ([["5" * 87, 5, 1]], 5),                    # not a pair
    (_nine(), sum(p[1] for p in _nine())),                         # more than line_payments_max
])
def test_hostile_line_payments(pays: Any, amount: int) -> None:
    body = receipt("j1", [line(ALICE)], cosigned=False).to_obj()
    body["lines"] = [_paid_row(pays, amount)]
    with pytest.raises(PeerMisbehaved) as exc:
        decode_receipt(_sealed(SUBMITTER, Kind.RECEIPT, body))
    assert exc.value.reason is Reason.BAD_SCHEMA


def test_a_full_payment_list_may_leave_the_smallest_out() -> None:
    from p2pgpu.core._receipt import line_payments_max
    eight = _nine()[:line_payments_max]
    body = receipt("j1", [line(ALICE)], cosigned=False).to_obj()
    body["lines"] = [_paid_row(eight, sum(p[1] for p in eight) + 99)]  # 99 more in a payment not listed
    assert decode_receipt(_sealed(SUBMITTER, Kind.RECEIPT, body)).receipt.lines[0].amount == 99 + sum(
        p[1] for p in eight)


def test_a_receipt_lists_at_most_receipt_payments_max_and_the_largest_fits() -> None:
    """64 members with the longest peer ids, payments up to the receipt's cap
    of the longest signatures and amounts: fits ``Kind.RECEIPT``; one more
    payment is refused."""
    from trust_fixtures import address, tx

    from p2pgpu.core._receipt import ReceiptLine, line_payments_max, receipt_payments_max
    per = receipt_payments_max // members_max
    lines = []
    for i in range(members_max):
        pays = tuple(sorted(((tx(f"{i}-{j}").ljust(88, "z"), 2**61 - j) for j in range(per)),
                            key=lambda p: (-p[1], p[0])))
        lines.append(ReceiptLine(peer_id=f"{i:02d}".ljust(64, "P"), outcome="paid", amount=sum(a for _, a in pays),
                                 address=address(str(i)), payments=pays, proof_hash=b"h" * 32))
    from trust_fixtures import recosign

    big = recosign(replace(receipt("big", [line(ALICE)]), lines=tuple(lines)))  # with the payer's co-signature
    assert len(sign_receipt(SUBMITTER, big).wire) <= Kind.RECEIPT.bytes_max
    assert per < line_payments_max
    extra = lines[0].payments + (("1".ljust(88, "y"), 1),)
    more = replace(lines[0], amount=lines[0].amount + 1, payments=extra)
    with pytest.raises(ValueError):
        replace(big, lines=(more, *lines[1:]))
    body = big.to_obj()
    body["lines"][0] = more.to_obj()
    with pytest.raises(PeerMisbehaved) as exc:
        decode_receipt(_sealed(SUBMITTER, Kind.RECEIPT, body))
    assert exc.value.reason in (Reason.BAD_SCHEMA, Reason.OVERSIZED)
