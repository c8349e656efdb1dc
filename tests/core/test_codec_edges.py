"""The canonical codec at its edges (#19): nesting, container counts, message
size and integer range each at the exact limit and one past it, in both
decoding modes, and the canonical walk reaching into lists as well as maps,
so that a limit moved by one or a branch of the walk skipped fails a test.
(The ordinary rows are in ``test_codec.py``.)"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from p2pgpu.core import LocalProtocolError, PeerMisbehaved, Reason, _codec, decode, encode


def nested_list(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def nested_map(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = {"a": value}
    return value


def test_the_limits() -> None:
    assert (_codec.depth_max, _codec.container_len_max, _codec.message_bytes_max) == (16, 4096, 256 * 1024)


@pytest.mark.parametrize("make", [nested_list, nested_map], ids=["lists", "maps"])
def test_nesting_at_the_limit_encodes_and_decodes_in_both_modes(make: Any) -> None:
    data = encode(make(_codec.depth_max))
    assert decode(data) == make(_codec.depth_max)
    assert decode(data, canonical=True) == make(_codec.depth_max)
    with pytest.raises(LocalProtocolError, match="nests too deeply"):
        encode(make(_codec.depth_max + 1))
    over = msgpack.packb(make(_codec.depth_max + 1), use_bin_type=True)
    for canonical in (False, True):
        with pytest.raises(PeerMisbehaved, match="nesting too deep") as e:
            decode(over, canonical=canonical)
        assert e.value.reason is Reason.MALFORMED


@pytest.mark.parametrize("leaf", [0, "s", b"b", None, [], {}], ids=repr)
@pytest.mark.parametrize("make", [nested_list, nested_map], ids=["lists", "maps"])
def test_both_decoding_modes_and_the_encoder_draw_the_depth_line_at_the_same_place(make: Any, leaf: Any) -> None:
    # A scalar (or an empty container) one level below the deepest allowed
    # container: refused in both modes, as encode refuses it (the canonical
    # walk once let a scalar there through, a level deeper than the rest).
    def build(depth: int) -> Any:
        value = make(depth)
        inner = value
        for _ in range(depth - 1):
            inner = inner[0] if isinstance(inner, list) else inner["a"]
        if isinstance(inner, list):
            inner[0] = leaf
        else:
            inner["a"] = leaf
        return value

    ok = build(_codec.depth_max)
    data = msgpack.packb(ok, use_bin_type=True)
    assert decode(data) == ok == decode(data, canonical=True) and encode(ok) == data
    deep = build(_codec.depth_max + 1)
    data = msgpack.packb(deep, use_bin_type=True)
    with pytest.raises(LocalProtocolError):
        encode(deep)
    for canonical in (False, True):
        with pytest.raises(PeerMisbehaved, match="nesting too deep"):
            decode(data, canonical=canonical)


def test_containers_at_the_cap_and_one_over() -> None:
    cap = _codec.container_len_max
    assert decode(encode([None] * cap), canonical=True) == [None] * cap
    keys = {f"{i:05d}": None for i in range(cap)}
    assert decode(encode(keys), canonical=True) == keys
    for over in (encode([None] * (cap + 1)), encode({**keys, "zzzzz": None})):
        for canonical in (False, True):
            with pytest.raises(PeerMisbehaved) as e:
                decode(over, canonical=canonical)
            assert e.value.reason is Reason.MALFORMED


def test_the_default_size_limit_on_both_sides() -> None:
    n = _codec.message_bytes_max
    at = encode(b"x" * (n - 5))  # bin32: 5 bytes of header
    assert len(at) == n and decode(at) == b"x" * (n - 5)
    over = encode(b"x" * (n - 4))
    with pytest.raises(PeerMisbehaved, match=f"{n + 1} bytes > {n}") as e:
        decode(over)
    assert e.value.reason is Reason.OVERSIZED


def test_strings_and_bytes_up_to_the_size_limit_decode() -> None:
    # The string and binary caps are the size limit: a message of exactly the
    # limit that is one long string or blob decodes.
    s = "é" * 100
    data = encode(s)
    assert decode(data, size_max=len(data), canonical=True) == s
    data = encode(b"\x01" * 300)
    assert decode(data, size_max=len(data), canonical=True) == b"\x01" * 300


@pytest.mark.parametrize(("value", "ok"), [
    (2**64 - 1, True), (2**64, False), (-(2**63), True), (-(2**63) - 1, False), (True, True), (False, True),
])
def test_integer_range_on_both_sides(value: int, ok: bool) -> None:
    if ok:
        assert decode(encode(value), canonical=True) == value and type(decode(encode(value))) is type(value)
    else:
        with pytest.raises(LocalProtocolError, match="64-bit range"):
            encode(value)
        with pytest.raises(LocalProtocolError, match="64-bit range"):
            encode([value])


NON_CANONICAL_DEEP = [
    ("float in a list", [0.5]),
    ("float in a list in a map", {"a": [1, 0.5]}),
    ("unsorted map in a list", [{"b": 1, "a": 2}]),
    ("unsorted map in a list in a list", [[{"b": 1, "a": 2}]]),
    ("unsorted map in a map", {"a": {"b": 1, "a": 2}}),
    ("float in a map", {"a": 0.5}),
]


@pytest.mark.parametrize("value", [r[1] for r in NON_CANONICAL_DEEP], ids=[r[0] for r in NON_CANONICAL_DEEP])
def test_the_canonical_walk_reaches_into_lists_and_maps(value: Any) -> None:
    data = msgpack.packb(value, use_bin_type=True)
    assert decode(data) == value
    with pytest.raises(PeerMisbehaved) as e:
        decode(data, canonical=True)
    assert e.value.reason is Reason.NON_CANONICAL


def test_decoded_values_have_the_wire_types() -> None:
    value = {"b": b"\x00", "l": [1, [2]], "s": "x"}
    got = decode(encode(value), canonical=True)
    assert type(got["l"]) is list and type(got["l"][1]) is list
    assert type(got["b"]) is bytes and type(got["s"]) is str
    assert decode(encode(value)) == value
    assert decode(b"\xc0") is None and decode(b"\xc0", canonical=True) is None


def test_refusals_say_what_is_wrong() -> None:
    cases: list[tuple[Any, dict[str, Any], str]] = [
        ("s", {}, "not bytes"), (b"", {}, "empty"), (b"\xc1", {}, "FormatError|ValueError"),
        (b"\x82\xa1b\x01\xa1a\x02", {"canonical": True}, "map keys are not sorted"),
        (b"\xcb" + bytes(8), {"canonical": True}, "floats are not allowed"),
        (b"\xcc\x05", {"canonical": True}, "bytes are not in canonical form"),
    ]
    for data, kw, words in cases:
        with pytest.raises(PeerMisbehaved, match=words):
            decode(data, **kw)
    for value, words in ((1.5, "floats are not allowed"), ({1: 2}, "map keys must be strings"),
                         (object(), "cannot encode object")):
        with pytest.raises(LocalProtocolError, match=words):
            encode(value)
