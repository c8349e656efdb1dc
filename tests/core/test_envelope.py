"""Signed envelopes: seal/open, domain separation, tampering, size limits.

Every way of breaking an envelope is a row, and each row must give
``PeerMisbehaved`` with its own reason.  The signature covers the kind's
domain tag plus the canonical body, so a signature made for one kind never
verifies as another.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import pytest

from p2pgpu.core import (
    Envelope,
    Identity,
    Kind,
    LocalProtocolError,
    PeerMisbehaved,
    Reason,
    body_of,
    decode,
    encode,
    envelope_from_obj,
    open_envelope,
    protocol_version,
    seal,
)
from p2pgpu.core import _envelope

ALICE = Identity.from_rng(random.Random(1))
MALLORY = Identity.from_rng(random.Random(2))
BODY = {"job": "x", "n": 3, "data": b"\x00\x01", "nested": {"b": [1, 2], "a": None}}


def _obj(env: Envelope) -> dict[str, Any]:
    return dict(env.to_obj())


def test_seal_then_open_gives_the_body_back() -> None:
    env = seal(ALICE, Kind.OFFER, BODY)
    opened, body = open_envelope(env.to_bytes(), expected=Kind.OFFER)
    assert body == BODY
    assert opened == env
    assert opened.signer_peer_id == ALICE.peer_id
    assert opened.version == protocol_version
    assert body_of(opened) == BODY


def test_open_without_expected_kind_accepts_any_kind() -> None:
    for kind in Kind:
        env, body = open_envelope(seal(ALICE, kind, {"k": kind.value}).to_bytes())
        assert env.kind is kind and body == {"k": kind.value}


def test_envelope_bytes_are_canonical_and_stable() -> None:
    env = seal(ALICE, Kind.ACCEPT, BODY)
    assert env.to_bytes() == encode(env.to_obj())
    assert decode(env.to_bytes(), canonical=True) == env.to_obj()
    # Ed25519 is deterministic: the same key and body give the same bytes.
    assert seal(ALICE, Kind.ACCEPT, dict(reversed(list(BODY.items())))).to_bytes() == env.to_bytes()


def test_digest_names_kind_and_body() -> None:
    a = seal(ALICE, Kind.OFFER, BODY)
    assert a.digest == seal(ALICE, Kind.OFFER, BODY).digest
    assert a.digest != seal(ALICE, Kind.ACCEPT, BODY).digest
    assert a.digest != seal(ALICE, Kind.OFFER, {**BODY, "n": 4}).digest
    assert len(a.digest) == 32


def test_domain_tags_are_distinct_per_kind() -> None:
    tags = [k.domain_tag for k in Kind]
    assert len(set(tags)) == len(tags)
    assert all(t.startswith(b"p2pgpu/") and t.endswith(b"\x00") for t in tags)


@pytest.mark.parametrize("kind", list(Kind), ids=lambda k: k.value)
def test_a_signature_for_one_kind_does_not_verify_as_another(kind: Kind) -> None:
    env = seal(ALICE, kind, BODY)
    for other in Kind:
        if other is kind:
            continue
        obj = {**_obj(env), "k": other.value}
        with pytest.raises(PeerMisbehaved) as info:
            envelope_from_obj(obj)
        assert info.value.reason is Reason.BAD_SIGNATURE


def test_wrong_expected_kind() -> None:
    data = seal(ALICE, Kind.OFFER, BODY).to_bytes()
    with pytest.raises(PeerMisbehaved) as info:
        open_envelope(data, expected=Kind.ACCEPT)
    assert info.value.reason is Reason.WRONG_KIND


def _flip(b: bytes, i: int = 0) -> bytes:
    return b[:i] + bytes([b[i] ^ 1]) + b[i + 1 :]


TAMPER: list[tuple[str, Callable[[dict[str, Any]], Any], Reason]] = [
    ("body changed", lambda o: {**o, "b": encode({**BODY, "n": 4})}, Reason.BAD_SIGNATURE),
    ("body byte flipped", lambda o: {**o, "b": _flip(o["b"], 5)}, Reason.BAD_SIGNATURE),
    ("signature flipped", lambda o: {**o, "g": _flip(o["g"], 10)}, Reason.BAD_SIGNATURE),
    ("signature truncated", lambda o: {**o, "g": o["g"][:63]}, Reason.BAD_SIGNATURE),
    ("signature empty", lambda o: {**o, "g": b""}, Reason.BAD_SIGNATURE),
    ("signer replaced", lambda o: {**o, "s": MALLORY.public_key}, Reason.BAD_SIGNATURE),
    ("signer truncated", lambda o: {**o, "s": o["s"][:31]}, Reason.BAD_SIGNATURE),
    ("signer all zeros", lambda o: {**o, "s": b"\x00" * 32}, Reason.BAD_SIGNATURE),
    ("unknown kind", lambda o: {**o, "k": "gossip"}, Reason.WRONG_KIND),
    ("kind not a str", lambda o: {**o, "k": 1}, Reason.WRONG_KIND),
    ("kind as bytes", lambda o: {**o, "k": b"offer"}, Reason.WRONG_KIND),
    ("version 2", lambda o: {**o, "v": 2}, Reason.UNSUPPORTED_VERSION),
    ("version 0", lambda o: {**o, "v": 0}, Reason.UNSUPPORTED_VERSION),
    ("version True", lambda o: {**o, "v": True}, Reason.UNSUPPORTED_VERSION),
    ("version str", lambda o: {**o, "v": "1"}, Reason.UNSUPPORTED_VERSION),
    ("body as str", lambda o: {**o, "b": "text"}, Reason.BAD_SCHEMA),
    ("signer as str", lambda o: {**o, "s": "key"}, Reason.BAD_SCHEMA),
    ("signature as list", lambda o: {**o, "g": [1]}, Reason.BAD_SCHEMA),
    ("missing field", lambda o: {k: v for k, v in o.items() if k != "g"}, Reason.BAD_SCHEMA),
    ("extra field", lambda o: {**o, "x": 1}, Reason.BAD_SCHEMA),
    ("not a map", lambda o: list(o.values()), Reason.BAD_SCHEMA),
    ("nil", lambda o: None, Reason.BAD_SCHEMA),
]


@pytest.mark.parametrize(("mutate", "reason"), [r[1:] for r in TAMPER], ids=[r[0] for r in TAMPER])
def test_tampered_envelope_is_rejected(mutate: Callable[[dict[str, Any]], Any], reason: Reason) -> None:
    obj = mutate(_obj(seal(ALICE, Kind.OFFER, BODY)))
    with pytest.raises(PeerMisbehaved) as info:
        envelope_from_obj(obj)
    assert info.value.reason is reason
    # The same through the wire path.
    with pytest.raises(PeerMisbehaved) as info:
        open_envelope(encode(obj))
    assert info.value.reason is reason


def test_resigned_by_another_key_verifies_but_names_the_other_signer() -> None:
    # Not a forgery: Mallory may sign anything as herself.  Callers compare
    # signer_peer_id with the identity a message claims (adverts do).
    env = seal(MALLORY, Kind.OFFER, BODY)
    opened, _ = open_envelope(env.to_bytes())
    assert opened.signer_peer_id == MALLORY.peer_id != ALICE.peer_id


def test_non_canonical_body_is_rejected_even_when_signed() -> None:
    # A signer that produced unsorted body bytes: the signature is valid, but
    # the body would have two byte forms (two hashes), so it is refused.
    import msgpack

    raw = msgpack.packb({"b": 1, "a": 2}, use_bin_type=True)
    sig = ALICE.sign(Kind.OFFER.domain_tag + raw)
    obj = {"k": "offer", "v": protocol_version, "b": raw, "s": ALICE.public_key, "g": sig}
    env = envelope_from_obj(obj)  # the signature itself is fine
    with pytest.raises(PeerMisbehaved) as info:
        body_of(env)
    assert info.value.reason is Reason.NON_CANONICAL
    with pytest.raises(PeerMisbehaved) as info:
        open_envelope(encode(obj))
    assert info.value.reason is Reason.NON_CANONICAL


@pytest.mark.parametrize("body", [b"\xc0", encode([1, 2]), encode("s"), encode(5)], ids=["nil", "list",
                                                                                         "str", "int"])
def test_signed_body_that_is_not_a_map(body: bytes) -> None:
    obj = {"k": "offer", "v": 1, "b": body, "s": ALICE.public_key,
           "g": ALICE.sign(Kind.OFFER.domain_tag + body)}
    with pytest.raises(PeerMisbehaved) as info:
        open_envelope(encode(obj))
    assert info.value.reason is Reason.BAD_SCHEMA


def test_signed_body_that_is_not_msgpack() -> None:
    body = b"\xc1garbage"
    obj = {"k": "offer", "v": 1, "b": body, "s": ALICE.public_key,
           "g": ALICE.sign(Kind.OFFER.domain_tag + body)}
    with pytest.raises(PeerMisbehaved) as info:
        open_envelope(encode(obj))
    assert info.value.reason is Reason.MALFORMED


def test_non_canonical_envelope_bytes() -> None:
    import msgpack

    env = seal(ALICE, Kind.OFFER, BODY)
    unsorted = msgpack.packb(dict(reversed(list(env.to_obj().items()))), use_bin_type=True)
    assert unsorted != env.to_bytes()
    with pytest.raises(PeerMisbehaved) as info:
        open_envelope(unsorted)
    assert info.value.reason is Reason.NON_CANONICAL


@pytest.mark.parametrize("kind", list(Kind), ids=lambda k: k.value)
def test_size_limits_per_kind(kind: Kind) -> None:
    room = kind.bytes_max - _envelope._ENVELOPE_OVERHEAD
    with pytest.raises(LocalProtocolError):
        seal(ALICE, kind, {"p": b"x" * room})
    # The largest body that seals also opens.
    small = {"p": b"x" * (room - 16)}
    env = seal(ALICE, kind, small)
    assert open_envelope(env.to_bytes(), expected=kind)[1] == small
    # A body over the limit, signed by hand, is refused before any crypto.
    big = encode({"p": b"x" * room})
    obj = {"k": kind.value, "v": 1, "b": big, "s": ALICE.public_key, "g": b"\x00" * 64}
    with pytest.raises(PeerMisbehaved) as info:
        envelope_from_obj(obj)
    assert info.value.reason is Reason.OVERSIZED


def test_oversized_wire_bytes_are_refused_before_decoding() -> None:
    data = b"\xc1" * (Kind.ADVERT.bytes_max + 1)  # not even msgpack: size comes first
    with pytest.raises(PeerMisbehaved) as info:
        open_envelope(data, expected=Kind.ADVERT)
    assert info.value.reason is Reason.OVERSIZED
    big = b"\xc1" * (max(k.bytes_max for k in Kind) + 1)
    with pytest.raises(PeerMisbehaved) as info:
        open_envelope(big)
    assert info.value.reason is Reason.OVERSIZED


def test_every_kind_has_a_limit() -> None:
    for kind in Kind:
        assert 1024 <= kind.bytes_max <= 256 * 1024
