"""Hardware challenges: is the GPU a peer advertises really there?

A challenger sends a signed :class:`Challenge`: a fresh 32-byte seed and a
matrix size ``n`` chosen for the GPU model claimed (:func:`size_for`).  The
prover derives two ``n x n`` matrices ``A`` and ``B`` from the seed
(:func:`matrix_keys`: ChaCha20 keystreams, one byte per entry, entry
``(byte >> 3) - 16`` in ``[-16, 15]``), multiplies them on the claimed device,
reduces the product modulo the prime ``p = 251`` and answers with a signed
:class:`ChallengeAnswer` that commits to ``C mod p`` by hash
(:func:`commitment_of`) within a deadline derived from the model's published
throughput (:func:`deadline_ms_for`).  Only then does it stream the
``n^2`` bytes of ``C mod p``; the challenger checks them against the
commitment and with Freivalds' algorithm (``p2pgpu.gpu._matmul``): ``k``
random vectors ``r`` over ``F_p``, ``C r == A (B r) (mod p)``, in ``O(k n^2)``.

Why it is sound (``docs/proofs.md``, "Hardware challenges"):

- *Exact arithmetic.*  ``|a_ij b_jk| <= 256`` and ``n <= 8192 = 2^13``, so
  every partial sum of ``C`` is an integer below ``2^21 < 2^24``: float32,
  TF32, FP16 or BF16 inputs with float32 accumulation all give ``C`` exactly,
  in any summation order.  The check is exact; there is no tolerance.
- *The deadline covers the work, not the transfer.*  The commitment is a hash
  of ``C mod p``, so it cannot be sent before ``C`` is known; the ``n^2``
  bytes follow it with a transfer allowance of their own.
- *A wrong product is caught.*  For any ``D = C' - C != 0 (mod p)`` and ``r``
  uniform in ``F_p^n``, ``Pr[D r = 0] <= 1/p``; ``k`` independent vectors
  give ``p^-k`` (:func:`freivalds_error_bound`).  Computing ``A B mod p``
  costs a matrix product, like ``A B``.
- *Why not answer only ``C r``?*  A prover told ``r`` could compute ``A (B r)``
  in ``O(n^2)`` without multiplying the matrices; the challenger must hold the
  committed product itself.

What it proves is a throughput floor: ``2 n^3`` exact multiply-adds within
the deadline.  The deadline includes host-side allowances (deriving the
matrices, hashing the product) that do not shrink with the GPU, so the floor
(``throughput_floor_gflops``) separates a CPU claiming a data-centre GPU by
two orders of magnitude, not one GPU generation from the next.

This module is pure: messages, sizes, deadlines, the prover's admission
rules (:class:`ProverGate`), the verdict of one exchange (:func:`judge`) and
what a node believes of each claim (:class:`ClaimBook`).  The matrix work is
``p2pgpu.gpu._matmul``'s; the streams are ``p2pgpu.node._challenge``'s.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from fractions import Fraction
from functools import lru_cache
from random import Random
from typing import Any

from . import _limits as limits
from . import _schema as s
from ._advert import Advert
from ._codec import decode
from ._envelope import Envelope, Kind, body_of, envelope_from_obj, seal
from ._errors import LocalProtocolError, PeerMisbehaved, Reason
from ._identity import Identity

#: The prime the product is reduced by (one byte per entry on the wire).
modulus = 251
seed_bytes = 32
#: Matrix sizes: multiples of ``n_step`` in ``[n_min, n_max]``.  ``n_max`` keeps
#: float32 exact (see above) and the product transfer at 64 MiB.
n_min = 64
n_max = 8192
n_step = 64
#: The compute allowance is the time at the published rate times this.
safety_factor = 4
#: ``n`` is chosen so the product takes about this long at the published rate.
target_compute_ms = 250
#: Host-side work (deriving 2 n^2 bytes, reducing and hashing n^2): allowed rate.
host_bytes_per_ms_min = 200_000
#: Fixed allowance: stream set-up, scheduling, the challenger's own noise.
base_ms = 1_500
#: A prover refuses challenges that give it longer than this (they hold it busy).
deadline_ms_max = 60_000
#: Bytes per product frame, and the transfer allowance after the commitment.
product_frame_bytes = 1 << 20
transfer_bytes_per_ms_min = 1_000
transfer_base_ms = 10_000
#: Freivalds rounds the challenger runs (error <= 251^-4 < 2.6e-10).
rounds_default = 4
model_len_max = 64
detail_len_max = 128
peer_id_len_max = limits.peer_id_len_max
clock_skew_ms_max = limits.clock_skew_ms_max

_MATRIX_TAG = b"p2pgpu/challenge-matrix/v1\x00"
_COMMIT_TAG = b"p2pgpu/challenge-commit/v1\x00"


# --- the table of models -------------------------------------------------------

@dataclass(frozen=True, kw_only=True, slots=True)
class ModelSpec:
    """A challengeable model: GPU model names matching ``pattern`` (a regex,
    case-insensitive) and their published dense throughput for the exact
    modes above (TF32 tensor cores where the GPU has them, else FP32), in
    GFLOPS.  CPU entries are for the NumPy backend."""

    key: str
    pattern: str
    gflops: int
    note: str = ""

    def __post_init__(self) -> None:
        if self.gflops <= 0 or not 0 < len(self.key) <= model_len_max:
            raise ValueError("a model needs a key and a positive throughput")


#: In matching order (the first pattern found in a GPU's model name wins).
#: Figures are the vendors' published dense peaks (no sparsity).
MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(key="h200", pattern=r"\bh200\b", gflops=494_700, note="TF32 dense, SXM"),
    ModelSpec(key="h100-pcie", pattern=r"\bh100\b.*\bpcie\b", gflops=378_000, note="TF32 dense"),
    ModelSpec(key="h100", pattern=r"\bh100\b", gflops=494_700, note="TF32 dense, SXM"),
    ModelSpec(key="a100", pattern=r"\ba100\b", gflops=156_000, note="TF32 dense"),
    ModelSpec(key="l40s", pattern=r"\bl40s\b", gflops=183_000, note="TF32 dense"),
    ModelSpec(key="l40", pattern=r"\bl40\b", gflops=90_500, note="TF32 dense"),
    ModelSpec(key="l4", pattern=r"\bl4\b", gflops=60_000, note="TF32 dense"),
    ModelSpec(key="a10", pattern=r"\ba10\b", gflops=62_500, note="TF32 dense"),
    ModelSpec(key="rtx-4090", pattern=r"\b4090\b", gflops=82_600, note="TF32 dense"),
    ModelSpec(key="rtx-3090", pattern=r"\b3090\b", gflops=35_600, note="TF32 dense"),
    ModelSpec(key="v100", pattern=r"\bv100\b", gflops=15_700, note="FP32, no TF32"),
    ModelSpec(key="t4", pattern=r"\bt4\b", gflops=8_100, note="FP32, no TF32"),
    ModelSpec(key="cpu", pattern=r"^cpu$", gflops=5, note="NumPy float32 on a small, shared CPU"),
)


def model_spec(key: str, models: Sequence[ModelSpec] = MODELS) -> ModelSpec | None:
    for m in models:
        if m.key == key:
            return m
    return None


@lru_cache(maxsize=1024)
def model_key(gpu_model: str, models: tuple[ModelSpec, ...] = MODELS) -> str | None:
    """The table key for a GPU's model name, or None when it has no entry
    (such a claim cannot be challenged and stays untested).  Cached: matching
    asks it for every GPU of every advert."""
    name = gpu_model.lower()
    for m in models:
        if re.search(m.pattern, name):
            return m.key
    return None


def size_for(spec: ModelSpec) -> int:
    """The largest ``n`` (a multiple of ``n_step`` in ``[n_min, n_max]``) whose
    product takes at most ``target_compute_ms`` at the published rate."""
    flops_max = target_compute_ms * spec.gflops * 1_000_000
    n = n_min
    while n + n_step <= n_max and 2 * (n + n_step) ** 3 <= flops_max:
        n += n_step
    return n


def compute_ms_for(n: int, spec: ModelSpec) -> int:
    """Compute allowance: ``2 n^3`` flops at the published rate, times the safety factor."""
    return -(-2 * n**3 * safety_factor // (spec.gflops * 1_000_000))


def host_ms_for(n: int) -> int:
    return -(-3 * n * n // host_bytes_per_ms_min)


def deadline_ms_for(n: int, spec: ModelSpec) -> int:
    """From sending the challenge to receiving the commitment."""
    return base_ms + host_ms_for(n) + compute_ms_for(n, spec)


def transfer_ms_for(n: int) -> int:
    """After the commitment: time allowed to stream the ``n^2`` product bytes."""
    return transfer_base_ms + -(-n * n // transfer_bytes_per_ms_min)


def throughput_floor_gflops(n: int, deadline_ms: int) -> int:
    """What passing proves: at least this many GFLOPS sustained (``2 n^3``
    flops within the deadline)."""
    return 2 * n**3 // (deadline_ms * 1_000_000)


def freivalds_error_bound(rounds: int, p: int = modulus) -> Fraction:
    """Probability that a wrong product (mod ``p``) passes ``rounds`` rounds."""
    if rounds < 1:
        raise LocalProtocolError("at least one Freivalds round")
    return Fraction(1, p**rounds)


# --- the matrices and the commitment ----------------------------------------------

def matrix_keys(seed: bytes) -> tuple[bytes, bytes]:
    """ChaCha20 keys of ``A`` and ``B``: ``sha256(tag || seed || "A")``, ``"B"``.
    Each matrix is the first ``n^2`` bytes of ChaCha20 (RFC 8439) under its
    key with an all-zero 16-byte counter-and-nonce block, row-major; entry
    ``(byte >> 3) - 16``."""
    if len(seed) != seed_bytes:
        raise LocalProtocolError("a challenge seed is 32 bytes")
    return (hashlib.sha256(_MATRIX_TAG + seed + b"A").digest(), hashlib.sha256(_MATRIX_TAG + seed + b"B").digest())


def commitment_hasher(challenge_digest: bytes) -> Any:
    """A sha256 to feed ``C mod p`` into, row-major, one byte per entry."""
    return hashlib.sha256(_COMMIT_TAG + challenge_digest)


def commitment_of(challenge_digest: bytes, product_mod_p: bytes) -> bytes:
    h = commitment_hasher(challenge_digest)
    h.update(product_mod_p)
    return bytes(h.digest())


# --- messages ----------------------------------------------------------------------

def _peer(body: dict[str, Any], name: str) -> str:
    return s.get_str(body, name, peer_id_len_max, len_min=1)


@dataclass(frozen=True, kw_only=True, slots=True)
class Challenge:
    challenger: str
    prover: str
    model: str
    n: int
    seed: bytes
    deadline_ms: int
    issued_at_ms: int

    def __post_init__(self) -> None:
        if not n_min <= self.n <= n_max or self.n % n_step:
            raise ValueError(f"n must be a multiple of {n_step} in [{n_min}, {n_max}]")
        if len(self.seed) != seed_bytes or not 0 < self.deadline_ms <= s.int_max:
            raise ValueError("seed is 32 bytes and the deadline positive")
        if not 0 < len(self.model) <= model_len_max or self.challenger == self.prover:
            raise ValueError("a model name, and a challenger that is not the prover")

    def to_obj(self) -> dict[str, Any]:
        return {"challenger": self.challenger, "prover": self.prover, "model": self.model, "n": self.n,
                "seed": self.seed, "deadline_ms": self.deadline_ms, "issued_at_ms": self.issued_at_ms}

    @classmethod
    def from_obj(cls, body: dict[str, Any]) -> Challenge:
        s.exact_keys(body, {"challenger", "prover", "model", "n", "seed", "deadline_ms", "issued_at_ms"})
        try:
            return cls(challenger=_peer(body, "challenger"), prover=_peer(body, "prover"),
                       model=s.get_str(body, "model", model_len_max, len_min=1), n=s.get_int(body, "n"),
                       seed=s.get_bytes(body, "seed", seed_bytes, len_min=seed_bytes),
                       deadline_ms=s.get_int(body, "deadline_ms"), issued_at_ms=s.get_int(body, "issued_at_ms"))
        except ValueError as exc:
            raise PeerMisbehaved(Reason.BAD_SCHEMA, str(exc)) from None


ANSWER_STATUSES = ("ok", "busy", "refused")


@dataclass(frozen=True, kw_only=True, slots=True)
class ChallengeAnswer:
    """``ok`` with the commitment; ``busy`` (try later); ``refused`` (will not do it)."""

    challenge: bytes
    prover: str
    status: str
    commitment: bytes
    detail: str = ""

    def __post_init__(self) -> None:
        if len(self.challenge) != 32 or self.status not in ANSWER_STATUSES:
            raise ValueError(f"challenge digest is 32 bytes, status one of {ANSWER_STATUSES}")
        if len(self.commitment) != (32 if self.status == "ok" else 0):
            raise ValueError("an ok answer carries a 32-byte commitment, others none")
        if len(self.detail) > detail_len_max or not 0 < len(self.prover) <= peer_id_len_max:
            raise ValueError("detail or prover too long")

    def to_obj(self) -> dict[str, Any]:
        return {"challenge": self.challenge, "prover": self.prover, "status": self.status,
                "commitment": self.commitment, "detail": self.detail}

    @classmethod
    def from_obj(cls, body: dict[str, Any]) -> ChallengeAnswer:
        s.exact_keys(body, {"challenge", "prover", "status", "commitment", "detail"})
        try:
            return cls(challenge=s.get_bytes(body, "challenge", 32, len_min=32), prover=_peer(body, "prover"),
                       status=s.get_str(body, "status", 16), commitment=s.get_bytes(body, "commitment", 32),
                       detail=s.get_str(body, "detail", detail_len_max))
        except ValueError as exc:
            raise PeerMisbehaved(Reason.BAD_SCHEMA, str(exc)) from None


@dataclass(frozen=True, slots=True)
class SignedChallenge:
    challenge: Challenge
    envelope: Envelope

    @property
    def digest(self) -> bytes:
        return self.envelope.digest

    @property
    def wire(self) -> bytes:
        return self.envelope.to_bytes()


@dataclass(frozen=True, slots=True)
class SignedAnswer:
    answer: ChallengeAnswer
    envelope: Envelope

    @property
    def wire(self) -> bytes:
        return self.envelope.to_bytes()


def make_challenge(identity: Identity, *, prover: str, model: str, rng: Random, now_ms: int,
                   models: Sequence[ModelSpec] = MODELS, n: int | None = None) -> SignedChallenge:
    """A challenge for ``model`` (a table key) sized and timed by the table;
    ``n`` overrides the size (the deadline follows it)."""
    spec = model_spec(model, models)
    if spec is None:
        raise LocalProtocolError(f"no table entry for model {model!r}")
    size = size_for(spec) if n is None else n
    ch = Challenge(challenger=identity.peer_id, prover=prover, model=model, n=size, seed=rng.randbytes(seed_bytes),
                   deadline_ms=deadline_ms_for(size, spec), issued_at_ms=now_ms)
    return SignedChallenge(ch, seal(identity, Kind.CHALLENGE, ch.to_obj()))


def answer(identity: Identity, challenge: SignedChallenge, status: str, commitment: bytes = b"",
           detail: str = "") -> SignedAnswer:
    ans = ChallengeAnswer(challenge=challenge.digest, prover=identity.peer_id, status=status,
                          commitment=commitment, detail=detail[:detail_len_max])
    return SignedAnswer(ans, seal(identity, Kind.CHALLENGE_ANSWER, ans.to_obj()))


def decode_challenge(data: bytes) -> SignedChallenge:
    """Bytes to a signed challenge (signer is its challenger), or ``PeerMisbehaved``."""
    env = envelope_from_obj(decode(data, size_max=Kind.CHALLENGE.bytes_max, canonical=True), expected=Kind.CHALLENGE)
    ch = Challenge.from_obj(body_of(env))
    if env.signer_peer_id != ch.challenger:
        raise PeerMisbehaved(Reason.SIGNER_MISMATCH, "challenge not signed by its challenger")
    return SignedChallenge(ch, env)


def decode_answer(data: bytes) -> SignedAnswer:
    env = envelope_from_obj(decode(data, size_max=Kind.CHALLENGE_ANSWER.bytes_max, canonical=True),
                            expected=Kind.CHALLENGE_ANSWER)
    ans = ChallengeAnswer.from_obj(body_of(env))
    if env.signer_peer_id != ans.prover:
        raise PeerMisbehaved(Reason.SIGNER_MISMATCH, "answer not signed by its prover")
    return SignedAnswer(ans, env)


# --- the prover's admission rules ---------------------------------------------------

@dataclass(frozen=True, kw_only=True, slots=True)
class Admitted:
    challenge: SignedChallenge
    #: Give up computing after this (ms on the prover's clock): the answer
    #: would be late anyway.
    abandon_at_ms: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Declined:
    challenge: SignedChallenge
    status: str  # "busy" or "refused"
    detail: str


@dataclass
class ProverGate:
    """Which challenges a prover takes on: one at a time, a token bucket per
    challenger and one for all, sizes and deadlines within caps.

    ``admit`` raises ``PeerMisbehaved`` for input nobody honest sends (bad
    signature, a challenge for another prover, a stream peer that is not the
    signer, an issue time far in the future), and returns :class:`Declined`
    for what is only a limit (busy, rate) or a size this prover will not do.
    """

    peer_id: str
    n_max: int = n_max
    per_challenger_burst: int = 2
    per_challenger_refill_ms: int = 60_000
    total_burst: int = 10
    total_refill_ms: int = 6_000
    challengers_max: int = 1024
    busy: bool = False
    _buckets: OrderedDict[str, tuple[int, int]] = field(default_factory=OrderedDict)
    _total: tuple[int, int] | None = None

    def _take(self, state: tuple[int, int] | None, burst: int, refill_ms: int,
              now_ms: int) -> tuple[bool, tuple[int, int]]:
        tokens, at = state if state is not None else (burst, now_ms)
        gained = max(0, now_ms - at) // refill_ms
        if gained:
            tokens, at = min(burst, tokens + gained), at + gained * refill_ms
        if tokens >= burst:
            at = now_ms  # a full bucket does not bank time
        if tokens == 0:
            return False, (tokens, at)
        return True, (tokens - 1, at)

    def admit(self, data: bytes, *, from_peer: str, now_ms: int) -> Admitted | Declined:
        sc = decode_challenge(data)
        ch = sc.challenge
        if ch.challenger != from_peer:
            raise PeerMisbehaved(Reason.SIGNER_MISMATCH, "challenge signed by another peer than the sender")
        if ch.prover != self.peer_id:
            raise PeerMisbehaved(Reason.BAD_SCHEMA, "challenge addressed to another prover")
        if ch.issued_at_ms > now_ms + clock_skew_ms_max:
            raise PeerMisbehaved(Reason.NOT_YET_VALID, "challenge issued in the future")
        if ch.issued_at_ms + clock_skew_ms_max + ch.deadline_ms < now_ms:
            raise PeerMisbehaved(Reason.EXPIRED, "challenge is stale")
        if ch.n > self.n_max or ch.deadline_ms > deadline_ms_max:
            return Declined(challenge=sc, status="refused",
                            detail=f"n {ch.n} > {self.n_max} or deadline over {deadline_ms_max} ms")
        if self.busy:
            return Declined(challenge=sc, status="busy", detail="another challenge is running")
        ok, state = self._take(self._buckets.get(from_peer), self.per_challenger_burst,
                               self.per_challenger_refill_ms, now_ms)
        if not ok:
            self._buckets[from_peer] = state
            return Declined(challenge=sc, status="busy", detail="too many challenges from you: try later")
        ok_total, total = self._take(self._total, self.total_burst, self.total_refill_ms, now_ms)
        if not ok_total:
            return Declined(challenge=sc, status="busy", detail="too many challenges: try later")
        self._buckets[from_peer] = state
        self._buckets.move_to_end(from_peer)
        while len(self._buckets) > self.challengers_max:
            self._buckets.popitem(last=False)
        self._total = total
        self.busy = True
        return Admitted(challenge=sc, abandon_at_ms=now_ms + ch.deadline_ms)

    def done(self) -> None:
        self.busy = False


# --- the verdict of one exchange ----------------------------------------------------

class Outcome(str, Enum):
    PASSED = "passed"
    LATE = "late"              # the commitment came after the deadline
    WRONG = "wrong"            # the product does not match the commitment or fails Freivalds
    REFUSED = "refused"        # the prover said it will not do it
    BUSY = "busy"              # the prover asked us to try later
    NO_ANSWER = "no_answer"    # the stream failed or the prover went silent
    BAD_ANSWER = "bad_answer"  # an answer that is not for this challenge, or undecodable


#: Outcomes that refuse the claim at once; the others are retried.
FAILING = frozenset({Outcome.LATE, Outcome.WRONG, Outcome.REFUSED, Outcome.BAD_ANSWER})


def read_answer(challenge: SignedChallenge, data: bytes) -> SignedAnswer | Outcome:
    """The prover's answer, or ``BAD_ANSWER`` when it is not a valid answer
    by that prover to exactly this challenge."""
    try:
        sa = decode_answer(data)
    except PeerMisbehaved:
        return Outcome.BAD_ANSWER
    if sa.answer.challenge != challenge.digest or sa.answer.prover != challenge.challenge.prover:
        return Outcome.BAD_ANSWER
    return sa


def judge(challenge: SignedChallenge, answer_: SignedAnswer | Outcome | None, *, elapsed_ms: int | None,
          product_ok: bool | None) -> Outcome:
    """One exchange's outcome.  ``elapsed_ms``: from sending the challenge to
    receiving the answer, on the challenger's clock.  ``product_ok``: the
    streamed product matched the commitment and passed Freivalds (None: not
    received)."""
    if answer_ is None or elapsed_ms is None:
        return Outcome.NO_ANSWER
    if isinstance(answer_, Outcome):
        return answer_
    a = answer_.answer
    if a.status == "busy":
        return Outcome.BUSY
    if a.status == "refused":
        return Outcome.REFUSED
    if elapsed_ms > challenge.challenge.deadline_ms:
        return Outcome.LATE
    if product_ok is None:
        return Outcome.NO_ANSWER
    return Outcome.PASSED if product_ok else Outcome.WRONG


# --- what a node believes of each claim ---------------------------------------------

class Verdict(str, Enum):
    BELIEVED = "believed"
    REFUSED = "refused"
    UNTESTED = "untested"


@dataclass(frozen=True, kw_only=True, slots=True)
class ClaimRecord:
    outcome: Outcome
    at_ms: int
    #: Consecutive outcomes that neither passed nor failed (busy, no answer).
    inconclusive: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class ClaimPolicy:
    """How long a verdict holds, and what an untested claim is worth."""

    believed_ttl_ms: int = 24 * 3600 * 1000
    refused_ttl_ms: int = 24 * 3600 * 1000
    retry_ms: int = 60_000
    #: This many inconclusive exchanges in a row refuse the claim (a peer that
    #: is always busy or silent when challenged).
    inconclusive_max: int = 3
    #: False: a claim is matched only once it passed (strict networks may want it).
    untested_believed: bool = True


def verdict_of(record: ClaimRecord | None, now_ms: int, policy: ClaimPolicy) -> Verdict:
    """Challenge results to "claim believed / refused / untested"."""
    if record is None:
        return Verdict.UNTESTED
    age = now_ms - record.at_ms
    if record.outcome is Outcome.PASSED:
        return Verdict.BELIEVED if age < policy.believed_ttl_ms else Verdict.UNTESTED
    if record.outcome in FAILING or record.inconclusive >= policy.inconclusive_max:
        return Verdict.REFUSED if age < policy.refused_ttl_ms else Verdict.UNTESTED
    return Verdict.UNTESTED


def exempt(advert: Advert, *, allow_simulated: bool) -> bool:
    """Simulated GPUs are never challenged, and exist only on networks that
    allow them (elsewhere the advert book refuses them)."""
    return advert.simulated and allow_simulated


@dataclass
class ClaimBook:
    """Challenge results per ``(peer id, model key)``, bounded; what to
    challenge next; and the view of an advert that matching should see."""

    allow_simulated: bool
    policy: ClaimPolicy = field(default_factory=ClaimPolicy)
    models: tuple[ModelSpec, ...] = MODELS
    claims_max: int = 10_000
    records: OrderedDict[tuple[str, str], ClaimRecord] = field(default_factory=OrderedDict)
    #: Records per peer: ``view`` returns an unrecorded peer's advert as is
    #: without looking at its GPUs (matching calls it for every advert).
    _per_peer: dict[str, int] = field(default_factory=dict)

    def record(self, peer_id: str, model: str, outcome: Outcome, now_ms: int) -> Verdict:
        key = (peer_id, model)
        prev = self.records.pop(key, None)
        if prev is None:
            self._per_peer[peer_id] = self._per_peer.get(peer_id, 0) + 1
        inconclusive = 0
        if outcome in (Outcome.BUSY, Outcome.NO_ANSWER):
            inconclusive = (prev.inconclusive if prev is not None and prev.outcome not in FAILING else 0) + 1
        self.records[key] = ClaimRecord(outcome=outcome, at_ms=now_ms, inconclusive=inconclusive)
        while len(self.records) > self.claims_max:
            (gone, _), _rec = self.records.popitem(last=False)  # the least recently recorded
            self._per_peer[gone] -= 1
            if not self._per_peer[gone]:
                del self._per_peer[gone]
        return verdict_of(self.records[key], now_ms, self.policy)

    def verdict(self, peer_id: str, model: str, now_ms: int) -> Verdict:
        return verdict_of(self.records.get((peer_id, model)), now_ms, self.policy)

    def claims(self, advert: Advert) -> list[str]:
        """The challengeable model keys an advert claims, sorted."""
        if exempt(advert, allow_simulated=self.allow_simulated):
            return []
        keys = {model_key(g.model, self.models) for g in advert.gpus}
        return sorted(k for k in keys if k is not None)

    def due(self, adverts: Iterable[Advert], now_ms: int, *, me: str, limit: int = 16) -> list[tuple[str, str]]:
        """Claims to challenge now, at most ``limit``: untested ones, expired
        verdicts, and inconclusive ones after ``retry_ms``."""
        out: list[tuple[str, str]] = []
        for adv in sorted(adverts, key=lambda a: a.peer_id):
            if adv.peer_id == me:
                continue
            for model in self.claims(adv):
                rec = self.records.get((adv.peer_id, model))
                v = verdict_of(rec, now_ms, self.policy)
                if rec is not None and v is Verdict.UNTESTED and now_ms - rec.at_ms < self.policy.retry_ms:
                    continue
                if v is Verdict.UNTESTED:
                    out.append((adv.peer_id, model))
                    if len(out) >= limit:
                        return out
        return out

    def view(self, advert: Advert, now_ms: int) -> Advert:
        """The advert as matching should see it: GPUs whose claim is refused
        (or untested, under a strict policy) are left out."""
        if exempt(advert, allow_simulated=self.allow_simulated):
            return advert
        if self.policy.untested_believed and advert.peer_id not in self._per_peer:
            return advert
        hidden: set[str] = set()
        for name in sorted({g.model for g in advert.gpus}):  # adverts repeat one model many times
            key = model_key(name, self.models)
            v = Verdict.UNTESTED if key is None else self.verdict(advert.peer_id, key, now_ms)
            if v is Verdict.REFUSED or (v is Verdict.UNTESTED and not self.policy.untested_believed):
                hidden.add(name)
        if not hidden:
            return advert
        kept = [g for g in advert.gpus if g.model not in hidden]
        # Adverts say how many GPUs are free, not which: never more free than kept.
        return replace(advert, gpus=tuple(kept), gpus_free=min(advert.gpus_free, len(kept)))
