"""Envelopes at their edges (#19): the size limit of every kind on both sides
of its exact value, at sealing and at opening, and what each refusal says, so
that a limit moved by one byte fails a test.  (The ordinary cases and each way
of tampering are in ``test_envelope.py``; the bytes are pinned in
``test_vectors.py``.)"""

from __future__ import annotations

import random

import pytest

from p2pgpu.core import (
    Identity,
    Kind,
    LocalProtocolError,
    PeerMisbehaved,
    Reason,
    _envelope,
    encode,
    envelope_from_obj,
    open_envelope,
    seal,
)

ALICE = Identity.from_rng(random.Random(1))


def body_of_size(n: int) -> dict[str, bytes]:
    """A body map whose canonical encoding is exactly ``n`` bytes."""
    for pad in range(n, max(0, n - 16), -1):
        body = {"p": b"x" * pad}
        if len(encode(body)) == n:
            return body
    raise AssertionError(f"no body of {n} bytes")


def room(kind: Kind) -> int:
    return kind.bytes_max - _envelope._ENVELOPE_OVERHEAD


def test_the_overhead_and_the_limits() -> None:
    assert _envelope._ENVELOPE_OVERHEAD == 256
    assert {k.value: k.bytes_max for k in Kind} == {
        "advert": 8192, "manifest": 65536, "offer": 12288, "proposal": 16384, "accept": 4096, "decline": 4096,
        "confirm": 98304, "cancel": 4096, "heartbeat": 4096, "proof": 32768, "cosign": 4096, "result": 16384,
        "certificate": 65536, "challenge": 1024, "challenge_answer": 1024, "receipt": 32768,
        "member_receipt": 2048}


@pytest.mark.parametrize("kind", list(Kind), ids=lambda k: k.value)
def test_seal_at_the_limit_and_one_byte_over(kind: Kind) -> None:
    at = body_of_size(room(kind))
    env = seal(ALICE, kind, at)
    assert len(env.body) == room(kind)
    assert open_envelope(env.to_bytes(), expected=kind)[1] == at
    assert open_envelope(env.to_bytes())[1] == at  # without an expected kind: the largest kind's ceiling
    over = body_of_size(room(kind) + 1)
    with pytest.raises(LocalProtocolError, match=f"{kind.value} body of {room(kind) + 1} bytes is over the limit"):
        seal(ALICE, kind, over)


@pytest.mark.parametrize("kind", [Kind.CHALLENGE, Kind.ACCEPT, Kind.CONFIRM], ids=lambda k: k.value)
def test_a_signed_body_at_the_limit_opens_and_one_byte_over_is_refused_before_the_signature(kind: Kind) -> None:
    at = encode(body_of_size(room(kind)))
    obj = {"k": kind.value, "v": 1, "b": at, "s": ALICE.public_key, "g": ALICE.sign(kind.domain_tag + at)}
    assert envelope_from_obj(obj, expected=kind).body == at
    over = encode(body_of_size(room(kind) + 1))
    bad = {**obj, "b": over, "g": ALICE.sign(kind.domain_tag + over)}  # even well signed
    with pytest.raises(PeerMisbehaved, match=f"{kind.value} body of {len(over)} bytes") as e:
        envelope_from_obj(bad)
    assert e.value.reason is Reason.OVERSIZED
    with pytest.raises(PeerMisbehaved) as e2:
        open_envelope(encode(bad), expected=kind)
    assert e2.value.reason is Reason.OVERSIZED


def test_wire_bytes_are_measured_against_the_expected_kind() -> None:
    # An offer's envelope is refused as wire bytes of a smaller kind before it is decoded...
    env = seal(ALICE, Kind.OFFER, body_of_size(room(Kind.ACCEPT) + 300))
    data = env.to_bytes()
    assert Kind.ACCEPT.bytes_max < len(data) <= Kind.OFFER.bytes_max
    with pytest.raises(PeerMisbehaved, match=f"{len(data)} bytes > {Kind.ACCEPT.bytes_max}") as e:
        open_envelope(data, expected=Kind.ACCEPT)
    assert e.value.reason is Reason.OVERSIZED
    # ... and opens as what it is, or with no kind expected.
    assert open_envelope(data, expected=Kind.OFFER)[0] == env
    assert open_envelope(data)[0] == env
    # The largest kind's envelope opens without an expected kind.
    big = seal(ALICE, Kind.CONFIRM, body_of_size(room(Kind.CONFIRM)))
    assert open_envelope(big.to_bytes())[0] == big


def test_the_body_is_decoded_under_its_kinds_ceiling() -> None:
    # body_of decodes with the kind's limit: a body at the limit decodes.
    env = seal(ALICE, Kind.CHALLENGE, body_of_size(room(Kind.CHALLENGE)))
    assert _envelope.body_of(env) == body_of_size(room(Kind.CHALLENGE))


def test_refusals_say_what_is_wrong() -> None:
    env = seal(ALICE, Kind.OFFER, {"a": 1})
    obj = env.to_obj()
    cases = [
        ({**obj, "k": "gossip"}, Reason.WRONG_KIND, "unknown kind 'gossip'"),
        ({**obj, "v": 2}, Reason.UNSUPPORTED_VERSION, "version 2"),
        ({**obj, "b": "s"}, Reason.BAD_SCHEMA, "body, signer and signature must be bytes"),
        ({**obj, "x": 1}, Reason.BAD_SCHEMA, "not an envelope"),
    ]
    for bad, reason, words in cases:
        with pytest.raises(PeerMisbehaved, match=words) as e:
            envelope_from_obj(bad)
        assert e.value.reason is reason
    with pytest.raises(PeerMisbehaved, match="expected accept, got offer") as e:
        envelope_from_obj(obj, expected=Kind.ACCEPT)
    assert e.value.reason is Reason.WRONG_KIND
    assert envelope_from_obj(obj, expected=Kind.OFFER) == env


@pytest.mark.parametrize("k", [["offer"], {"offer": 1}, 1, b"offer", None], ids=repr)
def test_a_kind_of_any_type_is_refused_as_a_wrong_kind(k: object) -> None:
    # An unhashable kind (a list, a map) must not reach the kind table's lookup.
    obj = {**seal(ALICE, Kind.OFFER, {"a": 1}).to_obj(), "k": k}
    with pytest.raises(PeerMisbehaved, match="unknown kind") as e:
        envelope_from_obj(obj)
    assert e.value.reason is Reason.WRONG_KIND


def test_body_of_decodes_under_the_kinds_ceiling_even_for_an_envelope_made_by_hand() -> None:
    # Only seal and envelope_from_obj should make an Envelope, and both check
    # the size; body_of still decodes with the kind's own ceiling.
    body = encode(body_of_size(Kind.CHALLENGE.bytes_max + 1))
    env = _envelope.Envelope(kind=Kind.CHALLENGE, version=1, body=body, signer=ALICE.public_key,
                             signature=ALICE.sign(Kind.CHALLENGE.domain_tag + body))
    with pytest.raises(PeerMisbehaved, match=f"{len(body)} bytes > {Kind.CHALLENGE.bytes_max}") as e:
        _envelope.body_of(env)
    assert e.value.reason is Reason.OVERSIZED
