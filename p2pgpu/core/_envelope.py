"""Signed envelopes: ``{kind, version, body, signer, signature}``.

The signature covers a domain tag for the kind and version followed by the
canonical body bytes, so a signature made for one kind of message can never be
replayed as another.  The envelope carries the body as bytes: the verifier
checks the signature over exactly what was signed, then decodes the body, and
the body must be canonical so that its hash (a job id, a proof hash) names one
message only.  Sizes are checked per kind before anything is decoded.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ._codec import decode, encode
from ._errors import LocalProtocolError, PeerMisbehaved, Reason
from ._identity import Identity, Verifier, peer_id_from_public_key, verify_signature

protocol_version = 1


class Kind(str, Enum):
    """Every signed message kind, with its size ceiling in bytes."""

    ADVERT = "advert"
    MANIFEST = "manifest"
    OFFER = "offer"
    PROPOSAL = "proposal"
    ACCEPT = "accept"
    DECLINE = "decline"
    CONFIRM = "confirm"
    CANCEL = "cancel"
    HEARTBEAT = "heartbeat"
    PROOF = "proof"
    COSIGN = "cosign"
    RESULT = "result"
    CERTIFICATE = "certificate"
    CHALLENGE = "challenge"
    CHALLENGE_ANSWER = "challenge_answer"
    RECEIPT = "receipt"
    MEMBER_RECEIPT = "member_receipt"

    @property
    def bytes_max(self) -> int:
        return _BYTES_MAX[self]

    @property
    def domain_tag(self) -> bytes:
        return _DOMAIN_TAGS[self]


#: What each kind's signatures and digests are bound to, made once.
_DOMAIN_TAGS: dict[Kind, bytes] = {k: f"p2pgpu/{k.value}/v{protocol_version}\x00".encode() for k in Kind}

_BYTES_MAX: dict[Kind, int] = {
    Kind.ADVERT: 8 * 1024,
    Kind.MANIFEST: 64 * 1024,
    Kind.OFFER: 12 * 1024,  # with the volunteer's signed advert (8 KiB at most)
    Kind.PROPOSAL: 16 * 1024,
    Kind.ACCEPT: 4 * 1024,
    Kind.DECLINE: 4 * 1024,
    Kind.CONFIRM: 96 * 1024,
    Kind.CANCEL: 4 * 1024,
    Kind.HEARTBEAT: 4 * 1024,
    Kind.PROOF: 32 * 1024,
    Kind.COSIGN: 4 * 1024,
    Kind.RESULT: 16 * 1024,
    Kind.CERTIFICATE: 64 * 1024,
    Kind.CHALLENGE: 1024,
    Kind.CHALLENGE_ANSWER: 1024,
    Kind.RECEIPT: 32 * 1024,
    Kind.MEMBER_RECEIPT: 2 * 1024,
}
_ENVELOPE_OVERHEAD = 256
_KINDS = {k.value: k for k in Kind}


@dataclass(frozen=True, kw_only=True, slots=True)
class Envelope:
    """A verified envelope.  Only :func:`seal` and :func:`open_envelope` make one."""

    kind: Kind
    version: int
    body: bytes
    signer: bytes
    signature: bytes

    @property
    def signer_peer_id(self) -> str:
        return peer_id_from_public_key(self.signer)

    def to_bytes(self) -> bytes:
        return encode(
            {"k": self.kind.value, "v": self.version, "b": self.body, "s": self.signer, "g": self.signature}
        )

    def to_obj(self) -> dict[str, Any]:
        """The envelope as a msgpack-ready map, for embedding in other messages."""
        return {"k": self.kind.value, "v": self.version, "b": self.body, "s": self.signer, "g": self.signature}

    @property
    def digest(self) -> bytes:
        """sha256 of the kind tag and canonical body: the message's stable id."""
        return hashlib.sha256(self.kind.domain_tag + self.body).digest()


def seal(identity: Identity, kind: Kind, body: dict[str, Any]) -> Envelope:
    """Sign ``body`` as a message of ``kind``."""
    body_bytes = encode(body)
    if len(body_bytes) + _ENVELOPE_OVERHEAD > kind.bytes_max:
        raise LocalProtocolError(f"{kind.value} body of {len(body_bytes)} bytes is over the limit")
    signature = identity.sign(kind.domain_tag + body_bytes)
    return Envelope(
        kind=kind, version=protocol_version, body=body_bytes, signer=identity.public_key, signature=signature
    )


def envelope_from_obj(obj: Any, *, expected: Kind | None = None, verify: Verifier | None = None) -> Envelope:
    """Check an already-decoded envelope map and its signature (with
    ``verify``, default :func:`~p2pgpu.core.verify_signature`)."""
    if not isinstance(obj, dict) or set(obj) != {"k", "v", "b", "s", "g"}:
        raise PeerMisbehaved(Reason.BAD_SCHEMA, "not an envelope")
    kind = _KINDS.get(obj["k"]) if isinstance(obj["k"], str) else None
    if kind is None:
        raise PeerMisbehaved(Reason.WRONG_KIND, f"unknown kind {obj['k']!r}")
    if expected is not None and kind is not expected:
        raise PeerMisbehaved(Reason.WRONG_KIND, f"expected {expected.value}, got {kind.value}")
    version = obj["v"]
    if type(version) is not int or version != protocol_version:
        raise PeerMisbehaved(Reason.UNSUPPORTED_VERSION, f"version {version!r}")
    body, signer, signature = obj["b"], obj["s"], obj["g"]
    if not (isinstance(body, bytes) and isinstance(signer, bytes) and isinstance(signature, bytes)):
        raise PeerMisbehaved(Reason.BAD_SCHEMA, "body, signer and signature must be bytes")
    if len(body) + _ENVELOPE_OVERHEAD > kind.bytes_max:
        raise PeerMisbehaved(Reason.OVERSIZED, f"{kind.value} body of {len(body)} bytes")
    (verify or verify_signature)(signer, kind.domain_tag + body, signature)
    return Envelope(kind=kind, version=version, body=body, signer=signer, signature=signature)


def open_envelope(data: bytes, *, expected: Kind | None = None,
                  verify: Verifier | None = None) -> tuple[Envelope, dict[str, Any]]:
    """Decode and verify an envelope; return it with its decoded body map."""
    size_max = expected.bytes_max if expected is not None else max(_BYTES_MAX.values())
    env = envelope_from_obj(decode(data, size_max=size_max, canonical=True), expected=expected, verify=verify)
    return env, body_of(env)


def body_of(env: Envelope) -> dict[str, Any]:
    body = decode(env.body, size_max=env.kind.bytes_max, canonical=True)
    if not isinstance(body, dict):
        raise PeerMisbehaved(Reason.BAD_SCHEMA, "body must be a map")
    return body
