"""Work proofs: what a member signs about its work, how anyone checks it, what it is owed.

Each member of a confirmed cluster signs a :class:`Proof` (``Kind.PROOF``) when
its part of a job ends: the job id (manifest hash), the certificate hash, its
peer id and GPUs, start and end (ms), GPU-milliseconds, exit status and end
reason, the output digest, and a hash chain of periodic checkpoints.  Other
members co-sign (``Kind.COSIGN``) what they observed of it: the heartbeats
they received (first/last seen, count) and the last checkpoint head they
carried.  :func:`verify_proof` is what the submitter runs on every proof; it
raises :class:`ProofRejected` (a ``PeerMisbehaved`` with a :class:`ProofFault`)
naming the rule broken.  :func:`owed` turns verified proofs into amounts, with
integer arithmetic only, so anyone holding the same proofs gets the same
figure.  Pure functions over bytes and values; ``docs/proofs.md`` is the
reference for every field and rule.

The certificate is anything with ``members`` (peer ids, in certificate order)
and a 32-byte hash, as ``cert_hash`` or ``digest``: the formation core's
``Certificate`` (whose ``digest`` names it), or a stand-in in tests.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Protocol

from . import _limits as limits
from . import _schema as s
from ._codec import decode, encode
from ._envelope import Envelope, Kind, body_of, envelope_from_obj, seal
from ._errors import LocalProtocolError, PeerMisbehaved, Reason
from ._identity import Identity, Verifier

digest_bytes = 32
gpus_max = limits.gpus_per_node_max
gpu_name_len_max = 64
checkpoints_max = 256
checkpoint_info_bytes_max = 32
peer_id_len_max = limits.peer_id_len_max
#: How a member's part ended (the sandbox's reasons plus the cluster's own;
#: "interrupted": the member's node died mid-job and proves up to its last checkpoint;
#: "unpaid": the member stopped because an installment was overdue, core/_installments.py).
END_REASONS = ("exited", "time_limit", "memory_limit", "output_limit", "sandbox_error", "cancelled",
               "member_lost", "job_failed", "interrupted", "unpaid")
#: GPU-milliseconds per GPU-hour: prices are per GPU-hour.
ms_per_hour = 3_600_000
_OUTPUTS_TAG = b"p2pgpu/outputs/v1\x00"
_CHAIN_TAG = b"p2pgpu/checkpoint/v1\x00"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class ProofFault(IntEnum):
    """Why a proof was refused.  Stable numbers (metric labels, docs)."""

    MALFORMED = 1
    BAD_SIGNATURE = 2
    SIGNER_MISMATCH = 3
    WRONG_JOB = 4
    WRONG_CERTIFICATE = 5
    NOT_A_MEMBER = 6
    TOO_MANY_GPUS = 7
    BAD_TIMES = 8
    OVER_DURATION = 9
    OVER_GPU_TIME = 10
    #: No longer raised: a claim beyond what the co-signers saw is paid up to
    #: their observation (``VerifiedProof.paid_gpu_ms``).  Kept: its number is stable.
    OVER_OBSERVED = 11
    NOT_OBSERVED = 12
    BROKEN_CHAIN = 13
    #: More time than passed, on the submitter's own clock, between its
    #: confirmation of the cluster and the arrival of the member's results.
    OVER_WINDOW = 14


_FAULT_REASON = {ProofFault.MALFORMED: Reason.BAD_SCHEMA, ProofFault.BAD_SIGNATURE: Reason.BAD_SIGNATURE,
                 ProofFault.SIGNER_MISMATCH: Reason.SIGNER_MISMATCH, ProofFault.WRONG_JOB: Reason.UNKNOWN_JOB,
                 ProofFault.NOT_A_MEMBER: Reason.NOT_A_MEMBER}


class ProofRejected(PeerMisbehaved):
    """A proof that does not verify: ``fault`` says which rule it broke."""

    def __init__(self, fault: ProofFault, detail: str = "") -> None:
        super().__init__(_FAULT_REASON.get(fault, Reason.BAD_PROOF), f"{fault.name.lower()}: {detail}")
        self.fault = fault


class CertificateLike(Protocol):
    """What verification needs of a confirmed cluster certificate: its
    members in order, and its hash as ``cert_hash`` or ``digest``."""

    @property
    def members(self) -> Sequence[str]: ...


def certificate_hash(cert: Any) -> bytes:
    """The certificate's hash: ``cert.cert_hash`` if it has one, else
    ``cert.digest`` (the formation core's ``Certificate``)."""
    h = getattr(cert, "cert_hash", None)
    if h is None:
        h = getattr(cert, "digest", None)
    if not isinstance(h, bytes) or len(h) != digest_bytes:
        raise LocalProtocolError("a certificate needs a 32-byte cert_hash or digest")
    return h


def agreed_prices(cert: Any) -> dict[str, int]:
    """Each member's agreed price per GPU-hour, from the accepts of a formation
    ``Certificate`` (each member signed its price in its accept); empty for a
    certificate without accepts.  Pass it to :func:`owed` as ``prices``."""
    return {a.peer_id: a.price_per_gpu_hour for a in getattr(cert, "accepts", ())}


def output_digest(files: Iterable[tuple[str, int, bytes]], stdout_sha256: bytes) -> bytes:
    """The digest of a job's results: sha256 over a domain tag and the
    canonical msgpack of ``{"files": [[path, size, sha256], ...] sorted by
    path, "stdout_sha256": ...}``.  Replicas that computed the same thing
    produce the same digest; the submitter recomputes it from what it got."""
    rows = sorted([p, n, h] for p, n, h in files)
    return hashlib.sha256(_OUTPUTS_TAG + encode({"files": rows, "stdout_sha256": stdout_sha256})).digest()


# --- checkpoint chain ---------------------------------------------------------

def chain_genesis(job_id: str, cert_hash: bytes, peer_id: str) -> bytes:
    """The head before any checkpoint: binds the chain to one member of one cluster."""
    return hashlib.sha256(_CHAIN_TAG + encode({"job_id": job_id, "cert_hash": cert_hash,
                                               "peer_id": peer_id})).digest()


def chain_next(prev: bytes, t_ms: int, info: bytes) -> bytes:
    """``H(prev, t_ms, info)``: one checkpoint appended to the chain."""
    return hashlib.sha256(_CHAIN_TAG + prev + encode({"t_ms": t_ms, "info": info})).digest()


@dataclass(frozen=True, kw_only=True, slots=True)
class Checkpoint:
    t_ms: int
    info: bytes = b""

    def __post_init__(self) -> None:
        if not 0 <= self.t_ms <= s.int_max or len(self.info) > checkpoint_info_bytes_max:
            raise ValueError(f"checkpoint time out of range or info over {checkpoint_info_bytes_max} bytes")


class CheckpointChain:
    """A member's running chain: :meth:`add` every ``checkpoint_interval_ms``
    with a little progress info (e.g. a hash of the log so far); heartbeats
    carry :attr:`head`; the proof carries :attr:`checkpoints` and the head.
    Holds at most ``checkpoints_max`` checkpoints: pick the interval so that
    the job's duration limit fits (:func:`checkpoint_interval_ms`)."""

    def __init__(self, job_id: str, cert_hash: bytes, peer_id: str) -> None:
        self.head = chain_genesis(job_id, cert_hash, peer_id)
        self.checkpoints: list[Checkpoint] = []
        self.heads: list[bytes] = [self.head]

    def add(self, t_ms: int, info: bytes = b"") -> bytes:
        if len(self.checkpoints) >= checkpoints_max:
            raise ValueError(f"a chain holds at most {checkpoints_max} checkpoints")
        if self.checkpoints and t_ms < self.checkpoints[-1].t_ms:
            raise ValueError("checkpoint times must not go backwards")
        cp = Checkpoint(t_ms=t_ms, info=info)
        self.head = chain_next(self.head, cp.t_ms, cp.info)
        self.checkpoints.append(cp)
        self.heads.append(self.head)
        return self.head


def checkpoint_interval_ms(duration_ms_max: int, interval_ms_min: int = 10_000) -> int:
    """An interval at which a job running its whole duration limit still fits
    in ``checkpoints_max - 1`` checkpoints (one more is added at the end)."""
    return max(interval_ms_min, -(-duration_ms_max // (checkpoints_max - 1)))


def chain_heads(job_id: str, cert_hash: bytes, peer_id: str, checkpoints: Sequence[Checkpoint]) -> list[bytes]:
    """Every head of the chain, genesis first."""
    heads = [chain_genesis(job_id, cert_hash, peer_id)]
    for cp in checkpoints:
        heads.append(chain_next(heads[-1], cp.t_ms, cp.info))
    return heads


# --- messages -------------------------------------------------------------------

def _job_id(body: dict[str, Any]) -> str:
    v = s.get_str(body, "job_id", 64, len_min=64)
    if not _HEX64.match(v):
        raise s.fail("job_id", "must be 64 lowercase hex characters")
    return v


@dataclass(frozen=True, kw_only=True, slots=True)
class Proof:
    """One member's signed account of its work (fields: ``docs/proofs.md``)."""

    job_id: str
    cert_hash: bytes
    peer_id: str
    gpus: tuple[str, ...]
    started_at_ms: int
    ended_at_ms: int
    gpu_ms: int
    exit_code: int
    end_reason: str
    output_digest: bytes
    checkpoints: tuple[Checkpoint, ...]
    chain_head: bytes

    def __post_init__(self) -> None:
        if not _HEX64.match(self.job_id) or len(self.cert_hash) != digest_bytes:
            raise ValueError("job_id must be 64 hex characters and cert_hash 32 bytes")
        if not 0 < len(self.peer_id) <= peer_id_len_max:
            raise ValueError("peer_id length")
        if len(self.gpus) > gpus_max or any(not 0 < len(g) <= gpu_name_len_max for g in self.gpus):
            raise ValueError(f"at most {gpus_max} GPUs, each named in 1..{gpu_name_len_max} characters")
        if not 0 <= self.started_at_ms <= self.ended_at_ms <= s.int_max or not 0 <= self.gpu_ms <= s.int_max:
            raise ValueError("times must satisfy 0 <= started_at_ms <= ended_at_ms")
        if not 0 <= self.exit_code <= 255 or self.end_reason not in END_REASONS:
            raise ValueError(f"exit_code in 0..255 and end_reason one of {', '.join(END_REASONS)}")
        if len(self.output_digest) not in (0, digest_bytes) or len(self.chain_head) != digest_bytes:
            raise ValueError("output_digest is empty or 32 bytes; chain_head is 32 bytes")
        if len(self.checkpoints) > checkpoints_max:
            raise ValueError(f"at most {checkpoints_max} checkpoints")

    @property
    def duration_ms(self) -> int:
        return self.ended_at_ms - self.started_at_ms

    def to_obj(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id, "cert_hash": self.cert_hash, "peer_id": self.peer_id,
            "gpus": list(self.gpus), "started_at_ms": self.started_at_ms, "ended_at_ms": self.ended_at_ms,
            "gpu_ms": self.gpu_ms, "exit_code": self.exit_code, "end_reason": self.end_reason,
            "output_digest": self.output_digest,
            "checkpoints": [[c.t_ms, c.info] for c in self.checkpoints], "chain_head": self.chain_head,
        }

    @classmethod
    def from_obj(cls, body: dict[str, Any]) -> Proof:
        s.exact_keys(body, set(_PROOF_FIELDS))
        cps = []
        for i, row in enumerate(s.get_list(body, "checkpoints", checkpoints_max)):
            if not (isinstance(row, list) and len(row) == 2 and type(row[0]) is int and isinstance(row[1], bytes)):
                raise s.fail(f"checkpoints[{i}]", "must be [t_ms, info]")
            try:
                cps.append(Checkpoint(t_ms=row[0], info=row[1]))
            except ValueError as exc:
                raise s.fail(f"checkpoints[{i}]", str(exc)) from None
        try:
            return cls(
                job_id=_job_id(body), cert_hash=s.get_bytes(body, "cert_hash", 32, len_min=32),
                peer_id=s.get_str(body, "peer_id", peer_id_len_max, len_min=1),
                gpus=s.get_str_list(body, "gpus", gpus_max, gpu_name_len_max),
                started_at_ms=s.get_int(body, "started_at_ms"), ended_at_ms=s.get_int(body, "ended_at_ms"),
                gpu_ms=s.get_int(body, "gpu_ms"), exit_code=s.get_int(body, "exit_code", 0, 255),
                end_reason=s.get_str(body, "end_reason", 16),
                output_digest=s.get_bytes(body, "output_digest", 32), checkpoints=tuple(cps),
                chain_head=s.get_bytes(body, "chain_head", 32, len_min=32),
            )
        except ValueError as exc:
            raise PeerMisbehaved(Reason.BAD_SCHEMA, str(exc)) from None


_PROOF_FIELDS = ("job_id", "cert_hash", "peer_id", "gpus", "started_at_ms", "ended_at_ms", "gpu_ms",
                 "exit_code", "end_reason", "output_digest", "checkpoints", "chain_head")


@dataclass(frozen=True, kw_only=True, slots=True)
class Cosign:
    """What ``observer`` saw of ``subject`` during the job."""

    job_id: str
    cert_hash: bytes
    subject: str
    observer: str
    first_seen_ms: int
    last_seen_ms: int
    heartbeats: int
    last_chain_head: bytes

    def __post_init__(self) -> None:
        if not _HEX64.match(self.job_id) or len(self.cert_hash) != digest_bytes:
            raise ValueError("job_id must be 64 hex characters and cert_hash 32 bytes")
        if not (0 < len(self.subject) <= peer_id_len_max and 0 < len(self.observer) <= peer_id_len_max):
            raise ValueError("peer id length")
        if self.subject == self.observer:
            raise ValueError("a member does not co-sign its own proof")
        if not 0 <= self.first_seen_ms <= self.last_seen_ms <= s.int_max or not 0 < self.heartbeats <= s.int_max:
            raise ValueError("need 0 <= first_seen_ms <= last_seen_ms and at least one heartbeat")
        if len(self.last_chain_head) not in (0, digest_bytes):
            raise ValueError("last_chain_head is empty or 32 bytes")

    @property
    def observed_ms(self) -> int:
        return self.last_seen_ms - self.first_seen_ms

    def to_obj(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "cert_hash": self.cert_hash, "subject": self.subject,
                "observer": self.observer, "first_seen_ms": self.first_seen_ms, "last_seen_ms": self.last_seen_ms,
                "heartbeats": self.heartbeats, "last_chain_head": self.last_chain_head}

    @classmethod
    def from_obj(cls, body: dict[str, Any]) -> Cosign:
        s.exact_keys(body, {"job_id", "cert_hash", "subject", "observer", "first_seen_ms", "last_seen_ms",
                            "heartbeats", "last_chain_head"})
        try:
            return cls(
                job_id=_job_id(body), cert_hash=s.get_bytes(body, "cert_hash", 32, len_min=32),
                subject=s.get_str(body, "subject", peer_id_len_max, len_min=1),
                observer=s.get_str(body, "observer", peer_id_len_max, len_min=1),
                first_seen_ms=s.get_int(body, "first_seen_ms"), last_seen_ms=s.get_int(body, "last_seen_ms"),
                heartbeats=s.get_int(body, "heartbeats", 1), last_chain_head=s.get_bytes(body, "last_chain_head", 32),
            )
        except ValueError as exc:
            raise PeerMisbehaved(Reason.BAD_SCHEMA, str(exc)) from None


@dataclass(frozen=True, slots=True)
class SignedProof:
    proof: Proof
    envelope: Envelope

    @property
    def proof_hash(self) -> bytes:
        """The proof's stable id (what payout batches put in their Merkle tree)."""
        return self.envelope.digest

    @property
    def wire(self) -> bytes:
        return self.envelope.to_bytes()


@dataclass(frozen=True, slots=True)
class SignedCosign:
    cosign: Cosign
    envelope: Envelope

    @property
    def wire(self) -> bytes:
        return self.envelope.to_bytes()


def sign_proof(identity: Identity, proof: Proof) -> SignedProof:
    if proof.peer_id != identity.peer_id:
        raise ValueError("a proof is signed by the member it describes")
    return SignedProof(proof, seal(identity, Kind.PROOF, proof.to_obj()))


def sign_cosign(identity: Identity, cosign: Cosign) -> SignedCosign:
    if cosign.observer != identity.peer_id:
        raise ValueError("a co-signature is signed by its observer")
    return SignedCosign(cosign, seal(identity, Kind.COSIGN, cosign.to_obj()))


def decode_proof(data: bytes, *, verify: Verifier | None = None) -> SignedProof:
    """Bytes to a signed proof whose signature, schema and signer were checked,
    or ``PeerMisbehaved`` (never another exception)."""
    env = envelope_from_obj(decode(data, size_max=Kind.PROOF.bytes_max, canonical=True), expected=Kind.PROOF,
                            verify=verify)
    proof = Proof.from_obj(body_of(env))
    if env.signer_peer_id != proof.peer_id:
        raise PeerMisbehaved(Reason.SIGNER_MISMATCH, "proof not signed by its member")
    return SignedProof(proof, env)


def decode_cosign(data: bytes, *, verify: Verifier | None = None) -> SignedCosign:
    env = envelope_from_obj(decode(data, size_max=Kind.COSIGN.bytes_max, canonical=True), expected=Kind.COSIGN,
                            verify=verify)
    cosign = Cosign.from_obj(body_of(env))
    if env.signer_peer_id != cosign.observer:
        raise PeerMisbehaved(Reason.SIGNER_MISMATCH, "co-signature not signed by its observer")
    return SignedCosign(cosign, env)


# --- verification -----------------------------------------------------------------

#: Default tolerances (``ProofTerms``): a floor, and a share of the observation.
tolerance_ms_default = 1_000
tolerance_ppm_default = 50_000
#: The node's heartbeat interval: what a co-signer's first sight of a member may lag its start.
heartbeat_interval_ms_default = 1_000
ppm = 1_000_000


@dataclass(frozen=True, kw_only=True, slots=True)
class ProofTerms:
    """What a proof is checked against: the manifest's terms for this job.

    Every time claim is bounded by an observation plus a tolerance
    *proportional to that observation*, with a small floor:
    ``tolerance(x) = max(tolerance_ms, x * tolerance_ppm / 10^6)`` (1 s or
    5 %).  An absolute tolerance let a member inflate a short job by most of
    it (#13: 1.48x on a 7 s job with 5 s); a proportional one keeps the
    excess a small share whatever the length.  A co-signer's observation
    (first to last heartbeat it received) is credited with one
    ``heartbeat_interval_ms`` first: it may have heard the member first one
    interval after the member started.  ``cosigns_min`` is how many other
    members must vouch for a proof (default: one when the cluster has other
    members).
    """

    job_id: str
    duration_ms_max: int
    gpus_per_member: int
    price_per_gpu_hour_max: int
    nodes: int = 1
    replicas: int = 1
    quorum: int = 1
    tolerance_ms: int = tolerance_ms_default
    tolerance_ppm: int = tolerance_ppm_default
    heartbeat_interval_ms: int = heartbeat_interval_ms_default
    cosigns_min: int | None = None

    def __post_init__(self) -> None:
        if self.duration_ms_max <= 0 or self.gpus_per_member <= 0 or self.price_per_gpu_hour_max < 0:
            raise ValueError("duration and GPUs must be positive, price not negative")
        if self.nodes < 1 or not 1 <= self.quorum <= self.replicas or self.tolerance_ms < 0:
            raise ValueError("need nodes >= 1, 1 <= quorum <= replicas, tolerance >= 0")
        if not 0 <= self.tolerance_ppm <= ppm or self.heartbeat_interval_ms < 0:
            raise ValueError("tolerance_ppm in 0..10^6, heartbeat interval >= 0")

    def tolerance(self, observed_ms: int) -> int:
        """How much a claim may exceed an observation of ``observed_ms``."""
        return max(self.tolerance_ms, max(0, observed_ms) * self.tolerance_ppm // ppm)

    @classmethod
    def from_manifest(cls, signed_manifest: Any, **over: Any) -> ProofTerms:
        """Terms of a ``SignedManifest`` (``p2pgpu.core._manifest``); ``over``
        sets the tolerances or ``heartbeat_interval_ms``."""
        m = signed_manifest.manifest
        return cls(job_id=signed_manifest.job_id, duration_ms_max=m.duration_s_max * 1000,
                   gpus_per_member=m.gpus_per_node, price_per_gpu_hour_max=m.price_per_gpu_hour_max,
                   nodes=m.nodes, replicas=m.replicas, quorum=m.quorum, **over)


@dataclass(frozen=True, kw_only=True, slots=True)
class Window:
    """What the submitter itself saw of one member, on its own clock: when it
    confirmed the cluster (``confirmed_at_ms``, the time in its signed
    CONFIRM) and when that member's results first arrived (``results_at_ms``:
    its proof or its outputs list, whichever came first).  An honest member
    starts after the confirmation and sends its results after it ended, so
    its whole part lies inside the window, whatever the clocks say (only
    durations are compared: the member's clock may be off by any constant).
    """

    confirmed_at_ms: int
    results_at_ms: int

    @property
    def ms(self) -> int:
        return max(0, self.results_at_ms - self.confirmed_at_ms)


@dataclass(frozen=True, kw_only=True, slots=True)
class VerifiedProof:
    """A proof that passed :func:`verify_proof`, with the evidence used."""

    signed: SignedProof
    rank: int
    replica: int
    cosigners: tuple[str, ...]
    observed_ms: int | None
    cosigns_ignored: tuple[tuple[str, str], ...]
    #: The most time this proof could have claimed (``None``: nothing bounded it
    #: but the duration limit): what the observations allowed.
    bound_ms: int | None = None

    @property
    def proof(self) -> Proof:
        return self.signed.proof

    @property
    def paid_gpu_ms(self) -> int:
        """The GPU time this proof is paid for: what it claims, but no more
        than its GPUs times what the observations allowed (a claim beyond what
        the co-signers saw is paid up to their observation, not refused: a
        member that a partition cut off from them served that time too, and
        nobody can vouch for more)."""
        p = self.proof
        if self.bound_ms is None:
            return p.gpu_ms
        return min(p.gpu_ms, len(p.gpus) * max(0, self.bound_ms))

    @property
    def capped(self) -> bool:
        """Whether the claim went beyond what was observed (and is paid only up to it)."""
        return self.paid_gpu_ms < self.proof.gpu_ms


def _usable_cosign(c: Any, p: Proof, cert: CertificateLike, heads: list[bytes],
                   verify: Verifier | None = None) -> SignedCosign | str:
    """The co-signature, or why it is ignored (a bad co-signature is the
    co-signer's fault, never the proof's)."""
    try:
        sc = c if isinstance(c, SignedCosign) else decode_cosign(c, verify=verify)
    except PeerMisbehaved as exc:
        return f"undecodable: {exc}"
    co = sc.cosign
    if co.job_id != p.job_id or co.cert_hash != p.cert_hash or co.subject != p.peer_id:
        return "about another job, certificate or member"
    if co.observer not in cert.members:
        return "observer is not a member"
    if co.last_chain_head and co.last_chain_head not in heads:
        return "saw a chain head that is not on this proof's chain"
    return sc


def verify_proof(proof: SignedProof | bytes, *, cert: CertificateLike, terms: ProofTerms,
                 cosigns: Sequence[SignedCosign | bytes] = (), window: Window | None = None,
                 verify: Verifier | None = None) -> VerifiedProof:
    """Check one proof against the confirmed certificate, the job's terms and
    what was observed of it, or raise :class:`ProofRejected`.  ``window`` is
    the submitter's own observation of this member (the submitter always
    passes it, for every cluster size: it is what bounds a lone member);
    ``None`` only for a third party re-checking proofs without the
    submitter's record.  Rules, in order: docs/proofs.md."""
    try:
        sp = proof if isinstance(proof, SignedProof) else decode_proof(proof, verify=verify)
    except PeerMisbehaved as exc:
        fault = {Reason.BAD_SIGNATURE: ProofFault.BAD_SIGNATURE,
                 Reason.SIGNER_MISMATCH: ProofFault.SIGNER_MISMATCH}.get(exc.reason, ProofFault.MALFORMED)
        raise ProofRejected(fault, exc.detail) from None
    p, members = sp.proof, list(cert.members)
    if getattr(cert, "job_id", terms.job_id) != terms.job_id:
        raise LocalProtocolError("the certificate is for another job than the terms")
    if p.job_id != terms.job_id:
        raise ProofRejected(ProofFault.WRONG_JOB, f"proof for job {p.job_id[:12]}")
    if p.cert_hash != certificate_hash(cert):
        raise ProofRejected(ProofFault.WRONG_CERTIFICATE, "not the confirmed certificate")
    if p.peer_id not in members:
        raise ProofRejected(ProofFault.NOT_A_MEMBER, f"{p.peer_id[:16]} is not in the certificate")
    if len(p.gpus) > terms.gpus_per_member:
        raise ProofRejected(ProofFault.TOO_MANY_GPUS, f"{len(p.gpus)} GPUs > {terms.gpus_per_member}")
    if p.duration_ms > terms.duration_ms_max + terms.tolerance(terms.duration_ms_max):
        raise ProofRejected(ProofFault.OVER_DURATION, f"{p.duration_ms} ms > limit {terms.duration_ms_max} ms")
    if p.gpu_ms > len(p.gpus) * min(p.duration_ms, terms.duration_ms_max):
        raise ProofRejected(ProofFault.OVER_GPU_TIME, f"{p.gpu_ms} GPU-ms > {len(p.gpus)} GPUs x duration")
    heads = chain_heads(p.job_id, p.cert_hash, p.peer_id, p.checkpoints)
    if heads[-1] != p.chain_head:
        raise ProofRejected(ProofFault.BROKEN_CHAIN, "checkpoints do not hash to the chain head")
    for a, b in zip(p.checkpoints, p.checkpoints[1:]):
        if b.t_ms < a.t_ms:
            raise ProofRejected(ProofFault.BROKEN_CHAIN, "checkpoint times go backwards")
    if p.checkpoints and not (p.started_at_ms <= p.checkpoints[0].t_ms
                              and p.checkpoints[-1].t_ms <= p.ended_at_ms):
        raise ProofRejected(ProofFault.BROKEN_CHAIN, "checkpoints outside [started_at_ms, ended_at_ms]")
    used: dict[str, SignedCosign] = {}
    ignored: list[tuple[str, str]] = []
    for c in cosigns:
        got = _usable_cosign(c, p, cert, heads, verify)
        if isinstance(got, str):
            ignored.append(("?", got))
        elif got.cosign.observer in used:
            ignored.append((got.cosign.observer, "second co-signature from one observer"))
        else:
            used[got.cosign.observer] = got
    cosigns_min = terms.cosigns_min if terms.cosigns_min is not None else min(1, len(members) - 1)
    if len(used) < cosigns_min:
        raise ProofRejected(ProofFault.NOT_OBSERVED, f"{len(used)} usable co-signatures < {cosigns_min}")
    observed = max((sc.cosign.observed_ms for sc in used.values()), default=None)
    if window is not None and p.duration_ms > window.ms + terms.tolerance(window.ms):
        raise ProofRejected(ProofFault.OVER_WINDOW,
                            f"served {p.duration_ms} ms, but only {window.ms} ms passed between the "
                            "confirmation and its results")
    # A claim beyond what the co-signers saw (OVER_OBSERVED) is not refused: it
    # is paid up to that observation plus the tolerance (``paid_gpu_ms``).
    index = members.index(p.peer_id)
    return VerifiedProof(signed=sp, rank=index % terms.nodes, replica=index // terms.nodes,
                         cosigners=tuple(sorted(used)), observed_ms=observed, cosigns_ignored=tuple(ignored),
                         bound_ms=claim_bound_ms(terms, observed_ms=observed, window=window))


def _cosigned_bound_ms(terms: ProofTerms, observed_ms: int) -> int:
    credited = observed_ms + terms.heartbeat_interval_ms
    return credited + terms.tolerance(credited)


def claim_bound_ms(terms: ProofTerms, *, observed_ms: int | None, window: Window | None) -> int | None:
    """The longest part a proof may claim given what was observed: the
    submitter's window plus its tolerance, and the best co-signer's
    observation (credited one heartbeat interval) plus its tolerance,
    whichever is smaller; ``None`` when neither was observed.  What a
    verified proof is paid never exceeds this (times its GPUs)."""
    bounds = []
    if window is not None:
        bounds.append(window.ms + terms.tolerance(window.ms))
    if observed_ms is not None:
        bounds.append(_cosigned_bound_ms(terms, observed_ms))
    return min(bounds) if bounds else None


# --- quorum and what is owed --------------------------------------------------------

@dataclass(frozen=True, kw_only=True, slots=True)
class Owed:
    """One line of what a job owes: ``amount`` to ``peer_id`` for one proof."""

    peer_id: str
    proof_hash: bytes
    gpu_ms: int
    price_per_gpu_hour: int
    amount: int
    status: str  # "paid" (owed), "outside_quorum" (nothing), "no_quorum" (its time: nobody can tell)


def quorum_digests(proofs: Sequence[VerifiedProof], terms: ProofTerms) -> dict[int, bytes | None]:
    """Per rank, the output digest that a quorum of replicas agree on, or None.

    A digest wins a rank when at least ``terms.quorum`` proofs of that rank
    carry it and strictly more than carry any other digest.  Empty digests
    (a member that produced no output) never win.
    """
    out: dict[int, bytes | None] = {}
    for rank in range(terms.nodes):
        votes: dict[bytes, int] = {}
        for vp in proofs:
            d = vp.proof.output_digest
            if vp.rank == rank and d:
                votes[d] = votes.get(d, 0) + 1
        ranked = sorted(votes.items(), key=lambda kv: (-kv[1], kv[0]))
        top = ranked[0] if ranked else None
        clear = top is not None and top[1] >= terms.quorum and (len(ranked) == 1 or ranked[1][1] < top[1])
        out[rank] = top[0] if clear and top is not None else None
    return out


def owed(proofs: Sequence[VerifiedProof], *, terms: ProofTerms,
         prices: Mapping[str, int] | None = None) -> list[Owed]:
    """What is owed for each verified proof, in proof-hash order.

    ``amount = gpu_ms * price // 3_600_000`` (floor: never more than the
    time served at the price), where ``price`` is the member's agreed price
    per GPU-hour (``prices``, e.g. from its offer) capped at the manifest's
    ceiling, or the ceiling when none was agreed.  With ``replicas > 1`` a
    proof whose output differs from its rank's quorum digest is paid nothing
    (``outside_quorum``: the other replicas agree it is wrong); where no
    digest reaches a quorum (``no_quorum``) nobody can tell who is right, and
    each is paid its time served, as every member of a failed job is.
    One proof per member counts (the first by proof hash); duplicates are dropped.
    """
    prices = prices or {}
    seen: set[str] = set()
    unique = []
    for vp in sorted(proofs, key=lambda v: v.signed.proof_hash):
        if vp.proof.job_id != terms.job_id or vp.proof.peer_id in seen:
            continue
        seen.add(vp.proof.peer_id)
        unique.append(vp)
    winners = quorum_digests(unique, terms) if terms.replicas > 1 else {}
    rows = []
    for vp in unique:
        p = vp.proof
        price = min(prices.get(p.peer_id, terms.price_per_gpu_hour_max), terms.price_per_gpu_hour_max)
        status = "paid"
        if terms.replicas > 1:
            win = winners.get(vp.rank)
            status = "no_quorum" if win is None else ("paid" if p.output_digest == win else "outside_quorum")
        amount = vp.paid_gpu_ms * max(price, 0) // ms_per_hour if status != "outside_quorum" else 0
        rows.append(Owed(peer_id=p.peer_id, proof_hash=vp.signed.proof_hash, gpu_ms=p.gpu_ms,
                         price_per_gpu_hour=price, amount=amount, status=status))
    return rows


def owed_total(rows: Iterable[Owed]) -> dict[str, int]:
    """Amount per peer id (sorted), the figure anyone can recompute."""
    total: dict[str, int] = {}
    for r in rows:
        total[r.peer_id] = total.get(r.peer_id, 0) + r.amount
    return dict(sorted(total.items()))
