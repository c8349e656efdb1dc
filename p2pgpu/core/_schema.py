"""Field readers for decoded message bodies.

Each reader returns a typed value or raises ``PeerMisbehaved(BAD_SCHEMA)``
naming the field, so message classes validate in a few readable lines.
``bool`` is not accepted where an ``int`` is expected (Python's ``bool`` is an
``int`` subclass, msgpack's is not).
"""

from __future__ import annotations

from typing import Any

from ._errors import PeerMisbehaved, Reason

int_max = 2**63 - 1


def fail(field: str, why: str) -> PeerMisbehaved:
    return PeerMisbehaved(Reason.BAD_SCHEMA, f"{field}: {why}")


def exact_keys(body: dict[str, Any], required: set[str], optional: frozenset[str] = frozenset()) -> None:
    missing = required - body.keys()
    if missing:
        raise fail(sorted(missing)[0], "missing")
    extra = body.keys() - required - optional
    if extra:
        # key=repr: a hostile map may mix key types that do not sort together.
        raise fail(sorted(extra, key=repr)[0], "unknown field")


def get_int(body: dict[str, Any], field: str, lo: int = 0, hi: int = int_max) -> int:
    v = body.get(field)
    if type(v) is not int:
        raise fail(field, "must be an integer")
    if not lo <= v <= hi:
        raise fail(field, f"must be in [{lo}, {hi}]")
    return v


def get_bool(body: dict[str, Any], field: str) -> bool:
    v = body.get(field)
    if type(v) is not bool:
        raise fail(field, "must be a boolean")
    return v


def get_str(body: dict[str, Any], field: str, len_max: int, *, len_min: int = 0) -> str:
    v = body.get(field)
    if not isinstance(v, str):
        raise fail(field, "must be a string")
    if not len_min <= len(v) <= len_max:
        raise fail(field, f"length must be in [{len_min}, {len_max}]")
    return v


def get_bytes(body: dict[str, Any], field: str, len_max: int, *, len_min: int = 0) -> bytes:
    v = body.get(field)
    if not isinstance(v, bytes):
        raise fail(field, "must be bytes")
    if not len_min <= len(v) <= len_max:
        raise fail(field, f"length must be in [{len_min}, {len_max}]")
    return v


def get_list(body: dict[str, Any], field: str, len_max: int, *, len_min: int = 0) -> list[Any]:
    v = body.get(field)
    if not isinstance(v, list):
        raise fail(field, "must be a list")
    if not len_min <= len(v) <= len_max:
        raise fail(field, f"must have between {len_min} and {len_max} items")
    return v


def get_str_list(body: dict[str, Any], field: str, len_max: int, item_len_max: int) -> tuple[str, ...]:
    items = get_list(body, field, len_max)
    for i, item in enumerate(items):
        if not isinstance(item, str) or not 0 < len(item) <= item_len_max:
            raise fail(f"{field}[{i}]", f"must be a string of 1 to {item_len_max} characters")
    return tuple(items)


def get_map(body: dict[str, Any], field: str) -> dict[str, Any]:
    v = body.get(field)
    if not isinstance(v, dict):
        raise fail(field, "must be a map")
    return v
