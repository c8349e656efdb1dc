"""Canonical msgpack: the one place where wire bytes are made and read.

Signed messages must have exactly one byte form, so the encoder sorts map keys,
uses the binary type for ``bytes`` and refuses floats (whose rounding differs
between languages).  The decoder checks the size before it looks at a byte,
caps every container, and rejects nesting deeper than ``depth_max``; any input
either decodes or raises :class:`PeerMisbehaved`, never another exception.
"""

from __future__ import annotations

from typing import Any

import msgpack

from ._errors import LocalProtocolError, PeerMisbehaved, Reason

#: A default ceiling for one decoded message; callers pass tighter ones.
message_bytes_max = 256 * 1024
depth_max = 16
#: msgpack's C unpacker would allocate containers of a claimed length before
#: reading them; these caps stop an absurd length prefix early.
container_len_max = 4096


def _canonical(obj: Any, depth: int) -> Any:
    if depth > depth_max:
        raise LocalProtocolError("message nests too deeply to encode")
    if isinstance(obj, int) and not isinstance(obj, bool) and not -(2**63) <= obj < 2**64:
        raise LocalProtocolError("integer out of msgpack's 64-bit range")
    if obj is None or isinstance(obj, (bool, int, str, bytes)):
        return obj
    if isinstance(obj, float):
        raise LocalProtocolError("floats are not allowed in wire messages")
    if isinstance(obj, (list, tuple)):
        return [_canonical(x, depth + 1) for x in obj]
    if isinstance(obj, dict):
        for key in obj:
            if not isinstance(key, str):
                raise LocalProtocolError("map keys must be strings")
        return {k: _canonical(obj[k], depth + 1) for k in sorted(obj)}
    raise LocalProtocolError(f"cannot encode {type(obj).__name__}")


def encode(obj: Any) -> bytes:
    """Canonical bytes of ``obj`` (maps sorted by key, no floats)."""
    data: bytes = msgpack.packb(_canonical(obj, 0), use_bin_type=True)
    return data


def _check_depth(obj: Any, depth: int) -> None:
    if depth > depth_max:
        raise PeerMisbehaved(Reason.MALFORMED, "nesting too deep")
    if isinstance(obj, list):
        for x in obj:
            _check_depth(x, depth + 1)
    elif isinstance(obj, dict):
        for v in obj.values():
            _check_depth(v, depth + 1)


def _check_canonical_shape(obj: Any, depth: int) -> None:
    """Depth, string keys in sorted order, no floats: one walk.  With these,
    re-packing the decoded object reproduces canonical bytes exactly, so the
    canonical check needs no second walk (``encode`` would rebuild every map
    in sorted order; this only looks)."""
    if depth > depth_max:
        raise PeerMisbehaved(Reason.MALFORMED, "nesting too deep")
    t = type(obj)
    if depth == depth_max and (t is dict or t is list) and obj:
        # Its items sit one level too deep; scalars are not walked, so say it here
        # (the same depth rule as ``_check_depth`` and ``encode``).
        raise PeerMisbehaved(Reason.MALFORMED, "nesting too deep")
    if t is dict:
        keys = list(obj)
        for k in keys:
            if type(k) is not str:
                raise PeerMisbehaved(Reason.NON_CANONICAL, "map keys must be strings")
        if keys != sorted(keys):
            raise PeerMisbehaved(Reason.NON_CANONICAL, "map keys are not sorted")
        for v in obj.values():
            if type(v) in (dict, list, float):
                _check_canonical_shape(v, depth + 1)
    elif t is list:
        for v in obj:
            if type(v) in (dict, list, float):
                _check_canonical_shape(v, depth + 1)
    elif t is float:
        raise PeerMisbehaved(Reason.NON_CANONICAL, "floats are not allowed in wire messages")


def decode(data: bytes, *, size_max: int = message_bytes_max, canonical: bool = False) -> Any:
    """Decode one msgpack object, or raise ``PeerMisbehaved``.

    With ``canonical=True`` the bytes must be exactly what :func:`encode` would
    produce, so that a signature or a hash over them names one message only.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PeerMisbehaved(Reason.MALFORMED, "not bytes")
    if len(data) > size_max:
        raise PeerMisbehaved(Reason.OVERSIZED, f"{len(data)} bytes > {size_max}")
    if len(data) == 0:
        raise PeerMisbehaved(Reason.MALFORMED, "empty")
    try:
        obj = msgpack.unpackb(
            bytes(data),
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=size_max,
            max_bin_len=size_max,
            max_array_len=container_len_max,
            max_map_len=container_len_max,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException, msgpack.ExtraData, RecursionError) as exc:
        # ValueError covers FormatError, StackError, OutOfData and bad UTF-8.
        raise PeerMisbehaved(Reason.MALFORMED, type(exc).__name__) from None
    if not canonical:
        _check_depth(obj, 0)
        return obj
    _check_canonical_shape(obj, 0)
    # Same shape, so packb gives the canonical bytes; any other encoding of
    # the same values (a wider int, str8 for a short string...) differs.
    if msgpack.packb(obj, use_bin_type=True) != bytes(data):
        raise PeerMisbehaved(Reason.NON_CANONICAL, "bytes are not in canonical form")
    return obj
