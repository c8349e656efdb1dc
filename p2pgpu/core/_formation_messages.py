"""The signed messages of cluster formation, and the certificate.

Each message is a frozen dataclass holding its fields and the envelope that
carries them; one exists only if it was signed here (``X.sign``) or its bytes
verified (``X.from_envelope`` / :func:`decode_message`).  Fields are checked
when the object is built; a peer's bad bytes raise ``PeerMisbehaved`` with a
reason, never another exception (Hypothesis checks this in
``tests/core/test_formation.py``).  Who signed is checked here too: an offer,
accept or decline by the peer it names, a proposal or certified cluster by its
leader.  That a CONFIRM or CANCEL comes from the job's submitter needs the
manifest, so the cores check it.

A :class:`Certificate` is a proposal plus one accept per member, each accept
signed by that member over the proposal's digest: anyone holding one can
check, with no other state, that every member agreed to exactly that
membership (job, view, round, leader, members).  Its digest names the cluster
in work proofs.  See ``docs/formation.md`` for the flow.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, ClassVar

from . import _limits as limits
from . import _schema as s
from ._advert import Advert, SignedAdvert, is_solana_address
from ._codec import decode, encode
from ._envelope import Envelope, Kind, body_of, envelope_from_obj, seal
from ._errors import PeerMisbehaved, Reason
from ._identity import Identity, Verifier, peer_id_from_public_key, public_key_from_peer_id
from ._manifest import SignedManifest, manifest_from_envelope, members_max

views_max = 1 << 16
rounds_max = 1 << 16
reason_len_max = 200
gpus_max = limits.gpus_per_node_max
_JOB_ID_RE = re.compile(r"^[0-9a-f]{64}$")
_CERT_TAG = b"p2pgpu/certificate-hash/v1\x00"
#: The largest formation message (a CONFIRM, which carries a whole certificate).
message_bytes_max = max(k.bytes_max for k in (Kind.MANIFEST, Kind.CONFIRM, Kind.CERTIFICATE))


def _check_job_id(job_id: str) -> None:
    if not _JOB_ID_RE.match(job_id):
        raise ValueError("job_id must be 64 lowercase hex digits")


def _check_peer_id(peer_id: str, where: str) -> None:
    if not _is_peer_id(peer_id):
        raise ValueError(f"{where} is not an Ed25519 peer id")


def _build(cls: Any, env: Envelope, fields: dict[str, Any]) -> Any:
    try:
        return cls(envelope=env, **fields)
    except ValueError as exc:
        raise PeerMisbehaved(Reason.BAD_SCHEMA, f"{cls.kind.value}: {exc}") from None


@lru_cache(maxsize=8192)
def signer_of(public_key: bytes) -> str:
    """The peer id of an envelope's signer (cached: base58 is slow in Python)."""
    return peer_id_from_public_key(public_key)


@lru_cache(maxsize=8192)
def _is_peer_id(peer_id: str) -> bool:
    try:
        public_key_from_peer_id(peer_id)
    except PeerMisbehaved:
        return False
    return True


def _signed_by(msg: Any, peer_id: str) -> None:
    if signer_of(msg.envelope.signer) != peer_id:
        raise PeerMisbehaved(Reason.SIGNER_MISMATCH, f"{msg.kind.value} not signed by {peer_id[:16]}")


def _open(env: Envelope, kind: Kind) -> dict[str, Any]:
    if env.kind is not kind:
        raise PeerMisbehaved(Reason.WRONG_KIND, f"expected {kind.value}, got {env.kind.value}")
    return body_of(env)


class _Signed:
    """The encode/decode pair every signed formation message has."""

    __slots__ = ()
    kind: ClassVar[Kind]
    envelope: Envelope

    def to_bytes(self) -> bytes:
        """The wire bytes (the envelope)."""
        return self.envelope.to_bytes()

    @classmethod
    def from_envelope(cls, env: Envelope, verify: Verifier | None = None) -> Any:
        """The message in a verified envelope (``verify`` checks the
        signatures of the envelopes it carries)."""
        raise NotImplementedError

    @classmethod
    def decode(cls, data: bytes, *, verify: Verifier | None = None) -> Any:
        """Bytes as this kind of message, or ``PeerMisbehaved`` (never another error)."""
        env = envelope_from_obj(decode(data, size_max=cls.kind.bytes_max, canonical=True), expected=cls.kind,
                                verify=verify)
        return cls.from_envelope(env, verify)


def _advert_from_obj(obj: Any, verify: Verifier | None = None) -> SignedAdvert:
    """A signed advert carried inside another message: its envelope verified
    and signed by the peer it describes (time and network rules are the
    cores', which know ``now``)."""
    env = envelope_from_obj(obj, expected=Kind.ADVERT, verify=verify)
    advert = Advert.from_obj(body_of(env))
    if signer_of(env.signer) != advert.peer_id:
        raise PeerMisbehaved(Reason.SIGNER_MISMATCH, "carried advert not signed by its peer")
    return SignedAdvert(advert, env)


@dataclass(frozen=True, kw_only=True, slots=True)
class Offer(_Signed):
    """A matching peer with free capacity volunteers for a job.  Not binding;
    a newer ``seq`` from the same peer replaces an older offer.  It carries
    the volunteer's own signed advert (at most ``Kind.ADVERT.bytes_max``), so
    whoever checks that a cluster's members match the job can do so even
    for a peer whose advert it has not heard by gossip."""

    kind: ClassVar[Kind] = Kind.OFFER
    job_id: str
    peer_id: str
    seq: int
    gpus_free: int
    price_per_gpu_hour: int
    advert: SignedAdvert
    envelope: Envelope = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_job_id(self.job_id)
        if not 1 <= self.seq <= s.int_max or not 0 <= self.gpus_free <= gpus_max:
            raise ValueError("seq or gpus_free out of range")
        if not 0 <= self.price_per_gpu_hour <= s.int_max:
            raise ValueError("price out of range")
        if self.advert.advert.peer_id != self.peer_id:
            raise ValueError("the carried advert is another peer's")

    @classmethod
    def sign(cls, identity: Identity, *, job_id: str, seq: int, gpus_free: int, price_per_gpu_hour: int,
             advert: SignedAdvert) -> Offer:
        body = {"job_id": job_id, "peer_id": identity.peer_id, "seq": seq, "gpus_free": gpus_free,
                "price_per_gpu_hour": price_per_gpu_hour, "advert": advert.envelope.to_obj()}
        return cls(envelope=seal(identity, cls.kind, body), job_id=job_id, peer_id=identity.peer_id, seq=seq,
                   gpus_free=gpus_free, price_per_gpu_hour=price_per_gpu_hour, advert=advert)

    @classmethod
    def from_envelope(cls, env: Envelope, verify: Verifier | None = None) -> Offer:
        b = _open(env, cls.kind)
        s.exact_keys(b, {"job_id", "peer_id", "seq", "gpus_free", "price_per_gpu_hour", "advert"})
        msg: Offer = _build(cls, env, {
            "job_id": s.get_str(b, "job_id", 64), "peer_id": s.get_str(b, "peer_id", 64),
            "seq": s.get_int(b, "seq", 1), "gpus_free": s.get_int(b, "gpus_free", 0, gpus_max),
            "price_per_gpu_hour": s.get_int(b, "price_per_gpu_hour"), "advert": _advert_from_obj(b["advert"], verify)})
        _signed_by(msg, msg.peer_id)
        return msg


@dataclass(frozen=True, kw_only=True, slots=True)
class Proposal(_Signed):
    """The leader of ``view`` proposes ``members`` (attempt ``round`` of its view)."""

    kind: ClassVar[Kind] = Kind.PROPOSAL
    job_id: str
    view: int
    round: int
    leader: str
    members: tuple[str, ...]
    gpus_per_member: int
    envelope: Envelope = field(repr=False, compare=False)
    #: sha256 of the proposal (what every accept signs), computed once.
    digest: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "digest", self.envelope.digest)
        _check_job_id(self.job_id)
        if not 0 <= self.view <= views_max or not 0 <= self.round <= rounds_max:
            raise ValueError("view or round out of range")
        if not 1 <= len(self.members) <= members_max or len(set(self.members)) != len(self.members):
            raise ValueError(f"members must be 1 to {members_max} distinct peers")
        for i, m in enumerate(self.members):
            _check_peer_id(m, f"members[{i}]")
        if not 1 <= self.gpus_per_member <= gpus_max:
            raise ValueError("gpus_per_member out of range")

    @classmethod
    def sign(cls, identity: Identity, *, job_id: str, view: int, round: int, members: tuple[str, ...],
             gpus_per_member: int) -> Proposal:
        body = {"job_id": job_id, "view": view, "round": round, "leader": identity.peer_id,
                "members": list(members), "gpus_per_member": gpus_per_member}
        return cls(envelope=seal(identity, cls.kind, body), job_id=job_id, view=view, round=round,
                   leader=identity.peer_id, members=tuple(members), gpus_per_member=gpus_per_member)

    @classmethod
    def from_envelope(cls, env: Envelope, verify: Verifier | None = None) -> Proposal:
        b = _open(env, cls.kind)
        s.exact_keys(b, {"job_id", "view", "round", "leader", "members", "gpus_per_member"})
        msg: Proposal = _build(cls, env, {
            "job_id": s.get_str(b, "job_id", 64), "view": s.get_int(b, "view", 0, views_max),
            "round": s.get_int(b, "round", 0, rounds_max), "leader": s.get_str(b, "leader", 64),
            "members": s.get_str_list(b, "members", members_max, 64),
            "gpus_per_member": s.get_int(b, "gpus_per_member", 1, gpus_max)})
        _signed_by(msg, msg.leader)
        return msg


@dataclass(frozen=True, kw_only=True, slots=True)
class Accept(_Signed):
    """A member reserved ``gpus`` until ``lease_until_ms`` and agrees to exactly
    the proposal whose digest is ``proposal``, at ``price_per_gpu_hour``, paid to
    ``payout_address``."""

    kind: ClassVar[Kind] = Kind.ACCEPT
    job_id: str
    view: int
    round: int
    proposal: bytes
    peer_id: str
    gpus: int
    lease_until_ms: int
    price_per_gpu_hour: int
    payout_address: str
    envelope: Envelope = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_job_id(self.job_id)
        if len(self.proposal) != 32:
            raise ValueError("proposal digest must be 32 bytes")
        if not 0 <= self.view <= views_max or not 0 <= self.round <= rounds_max:
            raise ValueError("view or round out of range")
        if not 1 <= self.gpus <= gpus_max or not 0 <= self.lease_until_ms <= s.int_max:
            raise ValueError("gpus or lease out of range")
        if not 0 <= self.price_per_gpu_hour <= s.int_max:
            raise ValueError("price out of range")
        if self.payout_address and not is_solana_address(self.payout_address):
            raise ValueError("payout_address is not a Solana address")

    @classmethod
    def sign(cls, identity: Identity, *, proposal: Proposal, lease_until_ms: int, price_per_gpu_hour: int,
             payout_address: str) -> Accept:
        body = {"job_id": proposal.job_id, "view": proposal.view, "round": proposal.round,
                "proposal": proposal.digest, "peer_id": identity.peer_id, "gpus": proposal.gpus_per_member,
                "lease_until_ms": lease_until_ms, "price_per_gpu_hour": price_per_gpu_hour,
                "payout_address": payout_address}
        return cls(envelope=seal(identity, cls.kind, body), job_id=proposal.job_id, view=proposal.view,
                   round=proposal.round, proposal=proposal.digest, peer_id=identity.peer_id,
                   gpus=proposal.gpus_per_member, lease_until_ms=lease_until_ms,
                   price_per_gpu_hour=price_per_gpu_hour, payout_address=payout_address)

    @classmethod
    def from_envelope(cls, env: Envelope, verify: Verifier | None = None) -> Accept:
        b = _open(env, cls.kind)
        s.exact_keys(b, {"job_id", "view", "round", "proposal", "peer_id", "gpus", "lease_until_ms",
                         "price_per_gpu_hour", "payout_address"})
        msg: Accept = _build(cls, env, {
            "job_id": s.get_str(b, "job_id", 64), "view": s.get_int(b, "view", 0, views_max),
            "round": s.get_int(b, "round", 0, rounds_max), "proposal": s.get_bytes(b, "proposal", 32),
            "peer_id": s.get_str(b, "peer_id", 64), "gpus": s.get_int(b, "gpus", 1, gpus_max),
            "lease_until_ms": s.get_int(b, "lease_until_ms"),
            "price_per_gpu_hour": s.get_int(b, "price_per_gpu_hour"),
            "payout_address": s.get_str(b, "payout_address", 64)})
        _signed_by(msg, msg.peer_id)
        return msg


@dataclass(frozen=True, kw_only=True, slots=True)
class Decline(_Signed):
    """A proposed member will not take part (no free capacity, ...)."""

    kind: ClassVar[Kind] = Kind.DECLINE
    job_id: str
    view: int
    round: int
    proposal: bytes
    peer_id: str
    reason: str
    envelope: Envelope = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_job_id(self.job_id)
        if len(self.proposal) != 32 or len(self.reason) > reason_len_max:
            raise ValueError("bad proposal digest or reason too long")
        if not 0 <= self.view <= views_max or not 0 <= self.round <= rounds_max:
            raise ValueError("view or round out of range")

    @classmethod
    def sign(cls, identity: Identity, *, job_id: str, view: int, round: int, proposal: bytes,
             reason: str) -> Decline:
        body = {"job_id": job_id, "view": view, "round": round, "proposal": proposal,
                "peer_id": identity.peer_id, "reason": reason[:reason_len_max]}
        return cls(envelope=seal(identity, cls.kind, body), job_id=job_id, view=view, round=round,
                   proposal=proposal, peer_id=identity.peer_id, reason=reason[:reason_len_max])

    @classmethod
    def from_envelope(cls, env: Envelope, verify: Verifier | None = None) -> Decline:
        b = _open(env, cls.kind)
        s.exact_keys(b, {"job_id", "view", "round", "proposal", "peer_id", "reason"})
        msg: Decline = _build(cls, env, {
            "job_id": s.get_str(b, "job_id", 64), "view": s.get_int(b, "view", 0, views_max),
            "round": s.get_int(b, "round", 0, rounds_max), "proposal": s.get_bytes(b, "proposal", 32),
            "peer_id": s.get_str(b, "peer_id", 64), "reason": s.get_str(b, "reason", reason_len_max)})
        _signed_by(msg, msg.peer_id)
        return msg


@dataclass(frozen=True, kw_only=True, slots=True)
class Certificate:
    """A proposal and every member's accept of it: verifiable by anyone."""

    proposal: Proposal
    accepts: tuple[Accept, ...]

    def __post_init__(self) -> None:
        p = self.proposal
        if len(self.accepts) != len(p.members):
            have = {a.peer_id for a in self.accepts}
            missing = [m for m in p.members if m not in have]
            raise ValueError(f"certificate lacks an accept from {missing[0][:16] if missing else 'a member'}")
        for member, a in zip(p.members, self.accepts):
            if a.peer_id != member:
                raise ValueError(f"accept of {a.peer_id[:16]} is not member {member[:16]}'s")
            if (a.job_id, a.view, a.round, a.proposal, a.gpus) != (
                    p.job_id, p.view, p.round, p.digest, p.gpus_per_member):
                raise ValueError(f"accept of {member[:16]} is for another proposal")

    @property
    def job_id(self) -> str:
        return self.proposal.job_id

    @property
    def members(self) -> tuple[str, ...]:
        return self.proposal.members

    @property
    def leader(self) -> str:
        return self.proposal.leader

    @property
    def lease_until_ms(self) -> int:
        """When the first member's lease runs out: confirm before this."""
        return min(a.lease_until_ms for a in self.accepts)

    def to_obj(self) -> dict[str, Any]:
        return {"proposal": self.proposal.envelope.to_obj(), "accepts": [a.envelope.to_obj() for a in self.accepts]}

    @property
    def digest(self) -> bytes:
        """sha256 naming this certificate (work proofs carry it)."""
        return hashlib.sha256(_CERT_TAG + encode(self.to_obj())).digest()

    @classmethod
    def from_obj(cls, obj: Any, verify: Verifier | None = None) -> Certificate:
        """Verify every signature and that each accept is its member's, for this proposal."""
        if not isinstance(obj, dict):
            raise s.fail("certificate", "must be a map")
        s.exact_keys(obj, {"proposal", "accepts"})
        proposal = Proposal.from_envelope(envelope_from_obj(obj["proposal"], expected=Kind.PROPOSAL, verify=verify))
        raw = s.get_list(obj, "accepts", members_max)
        accepts = tuple(Accept.from_envelope(envelope_from_obj(a, expected=Kind.ACCEPT, verify=verify))
                        for a in raw)
        try:
            return cls(proposal=proposal, accepts=accepts)
        except ValueError as exc:
            raise PeerMisbehaved(Reason.BAD_PROOF, str(exc)) from None


@dataclass(frozen=True, kw_only=True, slots=True)
class Certified(_Signed):
    """The leader hands a complete certificate to the submitter."""

    kind: ClassVar[Kind] = Kind.CERTIFICATE
    job_id: str
    certificate: Certificate
    envelope: Envelope = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.certificate.job_id != self.job_id:
            raise ValueError("certificate is for another job")

    @classmethod
    def sign(cls, identity: Identity, certificate: Certificate) -> Certified:
        body = {"job_id": certificate.job_id, "certificate": certificate.to_obj()}
        return cls(envelope=seal(identity, cls.kind, body), job_id=certificate.job_id, certificate=certificate)

    @classmethod
    def from_envelope(cls, env: Envelope, verify: Verifier | None = None) -> Certified:
        b = _open(env, cls.kind)
        s.exact_keys(b, {"job_id", "certificate"})
        msg: Certified = _build(cls, env, {"job_id": s.get_str(b, "job_id", 64),
                                           "certificate": Certificate.from_obj(b["certificate"], verify)})
        _signed_by(msg, msg.certificate.leader)
        return msg


@dataclass(frozen=True, kw_only=True, slots=True)
class Confirm(_Signed):
    """The submitter confirms one certificate for its job (members start on it)."""

    kind: ClassVar[Kind] = Kind.CONFIRM
    job_id: str
    certificate: Certificate
    confirmed_at_ms: int
    envelope: Envelope = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.certificate.job_id != self.job_id:
            raise ValueError("certificate is for another job")
        if not 0 <= self.confirmed_at_ms <= s.int_max:
            raise ValueError("confirmed_at_ms out of range")

    @property
    def submitter(self) -> str:
        return signer_of(self.envelope.signer)

    @classmethod
    def sign(cls, identity: Identity, certificate: Certificate, *, confirmed_at_ms: int) -> Confirm:
        body = {"job_id": certificate.job_id, "certificate": certificate.to_obj(), "confirmed_at_ms": confirmed_at_ms}
        return cls(envelope=seal(identity, cls.kind, body), job_id=certificate.job_id, certificate=certificate,
                   confirmed_at_ms=confirmed_at_ms)

    @classmethod
    def from_envelope(cls, env: Envelope, verify: Verifier | None = None) -> Confirm:
        b = _open(env, cls.kind)
        s.exact_keys(b, {"job_id", "certificate", "confirmed_at_ms"})
        msg: Confirm = _build(cls, env, {"job_id": s.get_str(b, "job_id", 64),
                                         "certificate": Certificate.from_obj(b["certificate"], verify),
                                         "confirmed_at_ms": s.get_int(b, "confirmed_at_ms")})
        return msg


@dataclass(frozen=True, kw_only=True, slots=True)
class Cancel(_Signed):
    """The submitter withdraws its job: everyone releases what it holds for it."""

    kind: ClassVar[Kind] = Kind.CANCEL
    job_id: str
    reason: str
    cancelled_at_ms: int
    envelope: Envelope = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_job_id(self.job_id)
        if len(self.reason) > reason_len_max or not 0 <= self.cancelled_at_ms <= s.int_max:
            raise ValueError("reason too long or time out of range")

    @property
    def submitter(self) -> str:
        return signer_of(self.envelope.signer)

    @classmethod
    def sign(cls, identity: Identity, *, job_id: str, reason: str, cancelled_at_ms: int) -> Cancel:
        body = {"job_id": job_id, "reason": reason[:reason_len_max], "cancelled_at_ms": cancelled_at_ms}
        return cls(envelope=seal(identity, cls.kind, body), job_id=job_id, reason=reason[:reason_len_max],
                   cancelled_at_ms=cancelled_at_ms)

    @classmethod
    def from_envelope(cls, env: Envelope, verify: Verifier | None = None) -> Cancel:
        b = _open(env, cls.kind)
        s.exact_keys(b, {"job_id", "reason", "cancelled_at_ms"})
        msg: Cancel = _build(cls, env, {"job_id": s.get_str(b, "job_id", 64),
                                        "reason": s.get_str(b, "reason", reason_len_max),
                                        "cancelled_at_ms": s.get_int(b, "cancelled_at_ms")})
        return msg


Message = SignedManifest | Offer | Proposal | Accept | Decline | Certified | Confirm | Cancel
_CLASSES: dict[Kind, Any] = {c.kind: c for c in (Offer, Proposal, Accept, Decline, Certified, Confirm, Cancel)}


def message_from_envelope(env: Envelope, verify: Verifier | None = None) -> Message:
    """A verified envelope as a formation message (a manifest without time checks)."""
    if env.kind is Kind.MANIFEST:
        return manifest_from_envelope(env)
    cls = _CLASSES.get(env.kind)
    if cls is None:
        raise PeerMisbehaved(Reason.WRONG_KIND, f"{env.kind.value} is not a formation message")
    msg: Message = cls.from_envelope(env, verify)
    return msg


def decode_message(data: bytes, *, verify: Verifier | None = None) -> Message:
    """Bytes from the network as a formation message, or ``PeerMisbehaved``.

    Decode once and hand the object to every core that wants it: the
    signatures are checked here, not again in the cores.
    """
    obj = decode(data, size_max=message_bytes_max, canonical=True)
    env = envelope_from_obj(obj, verify=verify)
    if len(data) > env.kind.bytes_max + 512:
        raise PeerMisbehaved(Reason.OVERSIZED, f"{env.kind.value} of {len(data)} bytes")
    return message_from_envelope(env, verify)
