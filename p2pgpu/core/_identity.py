"""Node identity: the libp2p Ed25519 key, and peer ids computed without I/O.

A peer id is the base58 identity multihash of the protobuf-encoded public key
(libp2p's rule for keys of 42 bytes or less), so a verifier can check that an
envelope's signer *is* the peer id an advert claims, with no libp2p import.
Signing and verifying use libsodium (PyNaCl): ~19k verifies/s on one core
here, twice the ``cryptography`` package.  Reading and writing the key file is
the node's business (``p2pgpu.node``), not the core's.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import base58
import nacl.exceptions
import nacl.signing

from ._errors import PeerMisbehaved, Reason

public_key_bytes = 32
signature_bytes = 64
# protobuf PublicKey{Type: Ed25519 (1), Data: 32 bytes}, then multihash
# "identity" (code 0x00) of that 36-byte encoding.
_PB_PREFIX = b"\x08\x01\x12\x20"
_MH_PREFIX = b"\x00\x24"


@lru_cache(maxsize=4096)
def peer_id_from_public_key(public_key: bytes) -> str:
    if len(public_key) != public_key_bytes:
        raise PeerMisbehaved(Reason.BAD_SCHEMA, "public key must be 32 bytes")
    return base58.b58encode(_MH_PREFIX + _PB_PREFIX + public_key).decode("ascii")


def public_key_from_peer_id(peer_id: str) -> bytes:
    """The Ed25519 key inside a peer id, or ``PeerMisbehaved`` if it has none."""
    try:
        raw = base58.b58decode(peer_id.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise PeerMisbehaved(Reason.BAD_SCHEMA, "peer id is not base58") from None
    if len(raw) != 38 or not raw.startswith(_MH_PREFIX + _PB_PREFIX):
        raise PeerMisbehaved(Reason.BAD_SCHEMA, "peer id is not an Ed25519 identity multihash")
    if base58.b58encode(raw).decode("ascii") != peer_id:  # b58decode ignores trailing whitespace
        raise PeerMisbehaved(Reason.BAD_SCHEMA, "peer id is not in canonical base58")
    return raw[6:]


@lru_cache(maxsize=4096)
def _verify_key(public_key: bytes) -> nacl.signing.VerifyKey:
    # Building a VerifyKey costs about as much as a verify: cache per signer.
    return nacl.signing.VerifyKey(public_key)


#: What checks one signature: ``verify(public_key, message, signature)`` returns
#: or raises ``PeerMisbehaved(BAD_SIGNATURE)``.  The cores take one as an
#: argument (default :func:`verify_signature`); the simulator passes a
#: memoising one (``p2pgpu/sim/_crypto.py``), never patching this module.
Verifier = Callable[[bytes, bytes, bytes], None]


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> None:
    """Raise ``PeerMisbehaved(BAD_SIGNATURE)`` unless ``signature`` is valid."""
    if len(public_key) != public_key_bytes or len(signature) != signature_bytes:
        raise PeerMisbehaved(Reason.BAD_SIGNATURE, "wrong key or signature length")
    try:
        _verify_key(bytes(public_key)).verify(message, bytes(signature))
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, nacl.exceptions.TypeError):
        raise PeerMisbehaved(Reason.BAD_SIGNATURE, "signature does not verify") from None


class Identity:
    """An Ed25519 signing key and the peer id it defines."""

    __slots__ = ("_key", "public_key", "peer_id")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise ValueError("an Ed25519 seed is 32 bytes")
        self._key = nacl.signing.SigningKey(seed)
        self.public_key: bytes = bytes(self._key.verify_key)
        self.peer_id: str = peer_id_from_public_key(self.public_key)

    @classmethod
    def from_rng(cls, rng: "random.Random") -> "Identity":  # noqa: F821 - typing only
        """A deterministic identity from an injected RNG (tests, simulator)."""
        return cls(rng.randbytes(32))

    @property
    def seed(self) -> bytes:
        return bytes(self._key)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message).signature

    def __repr__(self) -> str:
        return f"Identity({self.peer_id})"
