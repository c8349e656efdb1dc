"""Canonical msgpack: one byte form per message, and every bad input is a typed rejection.

Table-driven: each row is an input and what the codec must do with it.  The
decoder either returns a value or raises ``PeerMisbehaved`` with the reason in
the row; the encoder refuses what has no canonical form with
``LocalProtocolError`` (our own bug, not a peer's).
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from p2pgpu.core import LocalProtocolError, PeerMisbehaved, Reason, _codec, decode, encode

# --- encoding ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, b"\xc0"),
        (True, b"\xc3"),
        (False, b"\xc2"),
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\xcc\x80"),  # smallest form, always
        (-1, b"\xff"),
        (-33, b"\xd0\xdf"),
        (2**64 - 1, b"\xcf" + b"\xff" * 8),
        (-(2**63), b"\xd3\x80" + b"\x00" * 7),
        ("a", b"\xa1a"),
        (b"a", b"\xc4\x01a"),  # bytes use the bin type, never str
        ([], b"\x90"),
        ((1, 2), b"\x92\x01\x02"),  # tuples are lists on the wire
        ({}, b"\x80"),
        ({"b": 1, "a": 2}, b"\x82\xa1a\x02\xa1b\x01"),  # keys sorted
        ({"a": {"d": 1, "c": 2}}, b"\x81\xa1a\x82\xa1c\x02\xa1d\x01"),  # sorted at every level
    ],
)
def test_encode_is_canonical(value: Any, expected: bytes) -> None:
    assert encode(value) == expected


def test_key_order_of_the_input_does_not_matter() -> None:
    a = {"z": 1, "a": [1, {"y": b"x", "b": None}], "m": "s"}
    b = {"m": "s", "a": [1, {"b": None, "y": b"x"}], "z": 1}
    assert list(a) != list(b)
    assert encode(a) == encode(b)


def test_bytes_and_str_are_different_messages() -> None:
    assert encode("ab") != encode(b"ab")
    assert decode(encode(b"ab")) == b"ab"
    assert decode(encode("ab")) == "ab"


@pytest.mark.parametrize(
    "value",
    [
        1.0,
        [0.5],
        {"price": 1.5},
        {1: "int key"},
        {b"k": "bytes key"},
        {None: 1},
        {1, 2},
        object(),
        bytearray(b"x"),
        2**64,
        -(2**63) - 1,
        10**30,
    ],
    ids=lambda v: "object()" if type(v) is object else repr(v),  # not its address: the same id in every worker
)
def test_encode_refuses_what_has_no_canonical_form(value: Any) -> None:
    with pytest.raises(LocalProtocolError):
        encode(value)


def test_encode_refuses_deep_nesting() -> None:
    value: Any = 0
    for _ in range(_codec.depth_max + 1):
        value = [value]
    with pytest.raises(LocalProtocolError):
        encode(value)


@pytest.mark.parametrize(
    "value",
    [None, True, 0, -5, 2**64 - 1, "é", b"\x00\xff", [1, "a", b"b", None], {"k": {"n": [True, False]}}],
    ids=repr,
)
def test_round_trip_canonical(value: Any) -> None:
    data = encode(value)
    assert decode(data, canonical=True) == (list(value) if isinstance(value, tuple) else value)
    assert encode(decode(data)) == data


# --- decoding: limits and malformed input ------------------------------------


def _nested(depth: int) -> bytes:
    return b"\x91" * depth + b"\xc0"


DECODE_REJECTS: list[tuple[str, Any, dict[str, Any], Reason]] = [
    ("empty", b"", {}, Reason.MALFORMED),
    ("not bytes: str", "\xc0", {}, Reason.MALFORMED),
    ("not bytes: None", None, {}, Reason.MALFORMED),
    ("not bytes: list", [0xC0], {}, Reason.MALFORMED),
    ("oversized", encode(b"x" * 200), {"size_max": 100}, Reason.OVERSIZED),
    ("oversized by one", b"\xc0" * 11, {"size_max": 10}, Reason.OVERSIZED),
    ("never used byte 0xc1", b"\xc1", {}, Reason.MALFORMED),
    ("truncated str", b"\xa5ab", {}, Reason.MALFORMED),
    ("truncated array", b"\x92\x01", {}, Reason.MALFORMED),
    ("truncated map", b"\x81\xa1a", {}, Reason.MALFORMED),
    ("truncated uint64", b"\xcf\x00\x00", {}, Reason.MALFORMED),
    ("absurd array32 length", b"\xdd\xff\xff\xff\xff", {}, Reason.MALFORMED),
    ("absurd map32 length", b"\xdf\xff\xff\xff\xff", {}, Reason.MALFORMED),
    ("absurd str32 length", b"\xdb\xff\xff\xff\xff", {}, Reason.MALFORMED),
    ("absurd bin32 length", b"\xc6\xff\xff\xff\xff", {}, Reason.MALFORMED),
    ("array over the container cap", b"\xdc\x10\x01" + b"\xc0" * 0x1001, {}, Reason.MALFORMED),
    ("ext type refused", b"\xd4\x01\x00", {}, Reason.MALFORMED),
    ("timestamp ext refused", b"\xd6\xff\x00\x00\x00\x00", {}, Reason.MALFORMED),
    ("bad utf-8 in str", b"\xa2\xff\xfe", {}, Reason.MALFORMED),
    ("surrogate in str", b"\xa3\xed\xa0\x80", {}, Reason.MALFORMED),
    ("int map key", b"\x81\x01\x02", {}, Reason.MALFORMED),
    ("list map key", b"\x81\x90\x01", {}, Reason.MALFORMED),
    ("two objects", b"\xc0\xc0", {}, Reason.MALFORMED),
    ("trailing garbage", encode({"a": 1}) + b"\x00", {}, Reason.MALFORMED),
    ("nesting one too deep", _nested(_codec.depth_max + 1), {}, Reason.MALFORMED),
    ("nesting past msgpack's stack", _nested(5000), {}, Reason.MALFORMED),
    ("nested maps too deep", b"\x81\xa1a" * (_codec.depth_max + 1) + b"\xc0", {}, Reason.MALFORMED),
]


@pytest.mark.parametrize(("data", "kwargs", "reason"), [r[1:] for r in DECODE_REJECTS],
                         ids=[r[0] for r in DECODE_REJECTS])
def test_decode_rejects(data: Any, kwargs: dict[str, Any], reason: Reason) -> None:
    with pytest.raises(PeerMisbehaved) as info:
        decode(data, **kwargs)
    assert info.value.reason is reason


def test_nesting_at_the_limit_decodes() -> None:
    assert decode(_nested(_codec.depth_max)) is not None


def test_size_limit_is_inclusive() -> None:
    data = encode(b"x" * 50)
    assert decode(data, size_max=len(data)) == b"x" * 50


def test_bytearray_and_memoryview_are_accepted() -> None:
    data = encode({"a": 1})
    assert decode(bytearray(data)) == {"a": 1}
    assert decode(memoryview(data), canonical=True) == {"a": 1}


# --- decoding: canonical form --------------------------------------------------

NON_CANONICAL: list[tuple[str, bytes]] = [
    ("unsorted keys", b"\x82\xa1b\x01\xa1a\x02"),
    ("duplicate keys", b"\x82\xa1a\x01\xa1a\x02"),
    ("int in a wider form", b"\xd0\x01"),
    ("uint8 for a fixint", b"\xcc\x05"),
    ("str8 for a fixstr", b"\xd9\x01a"),
    ("array16 for a fixarray", b"\xdc\x00\x01\x01"),
    ("map16 for a fixmap", b"\xde\x00\x00"),
    ("float64", b"\xcb" + b"\x00" * 8),
    ("float32", b"\xca" + b"\x00" * 4),
    ("nested float", b"\x81\xa1p\xcb" + b"\x00" * 8),
    ("bytes map key", b"\x81\xc4\x01a\x01"),
]


@pytest.mark.parametrize("data", [r[1] for r in NON_CANONICAL], ids=[r[0] for r in NON_CANONICAL])
def test_canonical_decode_rejects_other_byte_forms(data: bytes) -> None:
    decode(data)  # a valid msgpack value...
    with pytest.raises(PeerMisbehaved) as info:
        decode(data, canonical=True)  # ...but not the one byte form we sign
    assert info.value.reason is Reason.NON_CANONICAL


def test_msgpack_other_encoders_agree_only_when_sorted() -> None:
    value = {"b": [1, 2], "a": {"y": b"1", "x": "2"}}
    unsorted = msgpack.packb(value, use_bin_type=True)
    assert decode(unsorted) == value
    with pytest.raises(PeerMisbehaved):
        decode(unsorted, canonical=True)
    assert decode(encode(value), canonical=True) == value


def test_peer_misbehaved_message_names_the_reason() -> None:
    with pytest.raises(PeerMisbehaved, match="^oversized: "):
        decode(b"\xc0" * 20, size_max=10)
    assert str(PeerMisbehaved(Reason.EXPIRED)) == "expired"
