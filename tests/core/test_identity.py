"""Node identity: our peer ids are libp2p's, computed with no libp2p import.

The core builds peer ids by hand (identity multihash of the protobuf public
key) so that verifying an advert needs no libp2p.  These tests check it
against py-libp2p itself, seed by seed, and check signing and verifying.
"""

from __future__ import annotations

import random

import warnings

import pytest

with warnings.catch_warnings():
    # py-libp2p imports websockets.legacy, which warns on import (not our code).
    warnings.simplefilter("ignore", DeprecationWarning)
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

from p2pgpu.core import (
    Identity,
    PeerMisbehaved,
    Reason,
    peer_id_from_public_key,
    public_key_from_peer_id,
    verify_signature,
)

SEEDS = [bytes(32), b"\x01" * 32, b"\xff" * 32,
         bytes(range(32))] + [random.Random(i).randbytes(32) for i in range(12)]


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: s.hex()[:8])
def test_peer_id_equals_libp2p(seed: bytes) -> None:
    kp = create_new_key_pair(seed)
    ident = Identity(seed)
    assert ident.peer_id == ID.from_pubkey(kp.public_key).to_base58()
    assert ident.public_key == kp.public_key.to_bytes()
    assert ident.seed == seed
    assert ident.peer_id.startswith("12D3KooW")


@pytest.mark.parametrize("seed", SEEDS[:6], ids=lambda s: s.hex()[:8])
def test_public_key_round_trip(seed: bytes) -> None:
    ident = Identity(seed)
    assert public_key_from_peer_id(ident.peer_id) == ident.public_key
    assert peer_id_from_public_key(public_key_from_peer_id(ident.peer_id)) == ident.peer_id


def test_libp2p_verifies_our_signatures_and_we_verify_its() -> None:
    seed = b"\x07" * 32
    kp = create_new_key_pair(seed)
    ident = Identity(seed)
    msg = b"p2pgpu/test\x00hello"
    assert kp.public_key.verify(msg, ident.sign(msg))
    verify_signature(ident.public_key, msg, kp.private_key.sign(msg))


def test_from_rng_is_deterministic() -> None:
    a = Identity.from_rng(random.Random(42))
    b = Identity.from_rng(random.Random(42))
    c = Identity.from_rng(random.Random(43))
    assert a.peer_id == b.peer_id != c.peer_id
    assert a.peer_id in repr(a)


@pytest.mark.parametrize("seed", [b"", b"\x00" * 31, b"\x00" * 33, b"\x00" * 64])
def test_seed_must_be_32_bytes(seed: bytes) -> None:
    with pytest.raises(ValueError):
        Identity(seed)


def test_verify_signature_rejects() -> None:
    ident = Identity(b"\x02" * 32)
    other = Identity(b"\x03" * 32)
    msg = b"message"
    sig = ident.sign(msg)
    verify_signature(ident.public_key, msg, sig)
    cases = [
        (ident.public_key, msg + b"!", sig),
        (other.public_key, msg, sig),
        (ident.public_key, msg, sig[:-1] + bytes([sig[-1] ^ 1])),
        (ident.public_key, msg, sig[:63]),
        (ident.public_key, msg, sig + b"\x00"),
        (ident.public_key[:31], msg, sig),
        (b"\x00" * 32, msg, sig),
        (b"\x00" * 32, msg, b"\x00" * 64),
        (b"\xff" * 32, msg, sig),
    ]
    for key, m, s in cases:
        with pytest.raises(PeerMisbehaved) as info:
            verify_signature(key, m, s)
        assert info.value.reason is Reason.BAD_SIGNATURE


@pytest.mark.parametrize(
    "peer_id",
    [
        "",
        "not base58 0OIl",
        "é",
        "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",  # an RSA-era sha256 peer id: no key inside
        "12D3KooW",
        Identity(b"\x01" * 32).peer_id + "1",
        Identity(b"\x01" * 32).peer_id[:-1],
        Identity(b"\x01" * 32).peer_id + "\n",  # base58 would strip it: not canonical
        Identity(b"\x01" * 32).peer_id + " ",
    ],
)
def test_public_key_from_bad_peer_id(peer_id: str) -> None:
    with pytest.raises(PeerMisbehaved) as info:
        public_key_from_peer_id(peer_id)
    assert info.value.reason is Reason.BAD_SCHEMA


@pytest.mark.parametrize("key", [b"", b"\x00" * 31, b"\x00" * 33])
def test_peer_id_from_bad_public_key(key: bytes) -> None:
    with pytest.raises(PeerMisbehaved) as info:
        peer_id_from_public_key(key)
    assert info.value.reason is Reason.BAD_SCHEMA
