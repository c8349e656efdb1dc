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
    body = receipt("j1", [line(ALICE)]).to_obj()
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
