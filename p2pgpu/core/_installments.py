"""Pay as you go: per-interval claims, paying each interval once, and a member that stops when unpaid.

A job whose manifest sets ``payment.interval_s`` (``I``) is paid while it
runs, not only at the end, so that a worker never carries more than a
bounded amount of unpaid work for a submitter that stops paying:

- **The member** (:class:`MemberInstallments`, one per job it runs) signs a
  claim at each boundary ``start + k*I + claim_delay_ms`` of its own part
  (``Kind.RESULT``, ``type = "interval_claim"``): the job, its certificate,
  the interval ``k``, the head of its checkpoint chain, and its
  co-signatures of the other members so far (what it observed of them);
  after its own part ended, while it still watches the others, it sends
  its co-signatures at each boundary (a claim of interval 0), so that the
  others' intervals stay observed.  A claim goes through the member's deliveries (stored, resent until the
  submitter acknowledges it), with the earning it expects.  Interval ``k``
  is due ``grace_ms`` after its claim; when a payment notice for it has not
  come by then the member stops the job with end reason ``unpaid`` and says
  why in words.  Its exposure is therefore at most one interval plus the
  grace (plus the claim delay): ``docs/payouts.md`` states the bound.
- **The submitter** (:class:`Installments`) takes each claim from a member of
  a job it confirmed, refuses a claim for more intervals than passed since
  its own confirmation of the cluster (plus the proofs' tolerance), and owes
  each member every interval that is both claimed and observed: the number
  of whole intervals in ``min(window + tolerance(window), best co-signed
  observation + one heartbeat + tolerance)``, the co-signature asked for
  only when another member co-signed anyone (the final proofs' rule,
  ``core._proof.claim_bound_ms``).  A claim beyond what co-signers saw is
  held, not paid, until they have seen it.  Each interval is owed once, as
  an :class:`~p2pgpu.core._actions.Installment` keyed by
  :func:`installment_key` (job, member, interval): the outbox's unique key,
  so a resent claim, a replay after a restart or a crash between recording
  and acknowledging never pays twice.  At settlement the job is closed (no
  more installments) and the final line pays only the remainder
  (:meth:`Installments.prepaid`).

Amounts are integer: ``gpus * I_ms * price // 3_600_000`` per interval at
the member's agreed price, the same arithmetic as ``core.owed``.

Like every core: no I/O, no clock; events and ``now_ms`` in, actions out.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from ._actions import (
    Action,
    CancelTimer,
    Emit,
    Installment,
    InstallmentsOwed,
    ItemTaken,
    LookupCollection,
    Send,
    SetTimer,
    StopJob,
    TimerKey,
    TimerOwner,
)
from ._codec import decode, encode
from ._envelope import Kind, body_of, envelope_from_obj, seal
from ._errors import LocalProtocolError, PeerMisbehaved, Reason
from ._identity import Identity, Verifier
from ._manifest import SignedManifest, intervals_max
from ._notices import payment_fault
from ._proof import decode_cosign, ms_per_hour, tolerance_ms_default, tolerance_ppm_default
from ._reputation import VerifiedPayment
from ._settlement import ack_wire, item_hash

_TAG = b"p2pgpu/installment/v1\x00"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
#: Co-signatures one claim carries at most (a claim must fit ``Kind.RESULT``).
claim_cosigns_max = 32
cosign_bytes_max = 1_024
#: The end reason of a member that stopped because it was not paid.
UNPAID = "unpaid"


def installment_key(job_id: str, peer_id: str, interval: int) -> bytes:
    """The outbox key of one interval of one member's work (32 bytes)."""
    return hashlib.sha256(_TAG + encode({"job_id": job_id, "peer_id": peer_id, "interval": interval})).digest()


def interval_amount(price_per_gpu_hour: int, gpus: int, interval_ms: int) -> int:
    """What one interval earns: ``gpus * interval_ms * price // 3_600_000``."""
    return max(0, gpus) * max(0, interval_ms) * max(0, price_per_gpu_hour) // ms_per_hour


def claim_timer(job_id: str) -> TimerKey:
    return TimerKey(TimerOwner.INSTALLMENT, job_id, "claim")


def due_timer(job_id: str) -> TimerKey:
    return TimerKey(TimerOwner.INSTALLMENT, job_id, "due")


@dataclass(frozen=True, kw_only=True, slots=True)
class InstallmentConfig:
    """The worker's side of pay as you go (its operator may change them)."""

    #: How long after a claim the member waits for its payment before it
    #: stops working (the payer batches, the ledger confirms, a notice comes).
    grace_ms: int = 30_000
    #: A claim goes out this long after the interval's boundary, so the
    #: co-signatures it carries cover the other members' same interval
    #: despite their slightly different start times.
    claim_delay_ms: int = 2_000
    #: Jobs with installments tracked at once, on the submitter's side.
    jobs_max: int = 4_096


DEFAULT_INSTALLMENTS = InstallmentConfig()


# -- the claim ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Claim:
    """A member's signed claim to have served ``interval`` intervals of a job
    (``0``: none claimed, the message carries co-signatures only: a member
    whose part ended and still watches the others)."""

    job_id: str
    peer_id: str
    cert_hash: bytes
    interval: int
    chain_head: bytes
    #: The member's co-signatures of the others so far (signed ``Kind.COSIGN`` wires).
    cosigns: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        if not _HEX64.match(self.job_id) or not 0 < len(self.peer_id) <= 64:
            raise ValueError("job_id must be 64 hex characters, peer_id a peer id")
        if len(self.cert_hash) != 32 or len(self.chain_head) != 32:
            raise ValueError("cert_hash and chain_head are 32 bytes")
        if not 0 <= self.interval <= intervals_max:
            raise ValueError(f"interval in 0..{intervals_max} (0: co-signatures only)")
        if len(self.cosigns) > claim_cosigns_max or any(len(c) > cosign_bytes_max for c in self.cosigns):
            raise ValueError(f"at most {claim_cosigns_max} co-signatures of {cosign_bytes_max} bytes")

    def to_body(self) -> dict[str, Any]:
        return {"type": "interval_claim", "job_id": self.job_id, "peer_id": self.peer_id,
                "cert_hash": self.cert_hash, "interval": self.interval, "chain_head": self.chain_head,
                "cosigns": list(self.cosigns)}

    @classmethod
    def from_body(cls, body: Any, signer: str) -> Claim:
        """A received claim, or ``PeerMisbehaved`` (never another exception)."""
        keys = ["cert_hash", "chain_head", "cosigns", "interval", "job_id", "peer_id", "type"]
        if not isinstance(body, dict) or sorted(body) != keys:
            raise PeerMisbehaved(Reason.BAD_SCHEMA, f"interval_claim needs exactly {', '.join(keys)}")
        if body["peer_id"] != signer:
            raise PeerMisbehaved(Reason.SIGNER_MISMATCH, "interval_claim not signed by the member it names")
        cosigns = body["cosigns"]
        if not isinstance(cosigns, list) or not all(isinstance(c, bytes) for c in cosigns) \
                or type(body["interval"]) is not int or not isinstance(body["job_id"], str) \
                or not isinstance(body["cert_hash"], bytes) or not isinstance(body["chain_head"], bytes):
            raise PeerMisbehaved(Reason.BAD_SCHEMA, "interval_claim fields have the wrong types")
        try:
            return cls(job_id=body["job_id"], peer_id=signer, cert_hash=body["cert_hash"],
                       interval=body["interval"], chain_head=body["chain_head"], cosigns=tuple(cosigns))
        except ValueError as exc:
            raise PeerMisbehaved(Reason.BAD_SCHEMA, f"interval_claim: {exc}") from None


def claim_wire(identity: Identity, claim: Claim) -> bytes:
    if claim.peer_id != identity.peer_id:
        raise LocalProtocolError("a claim is signed by its member")
    return seal(identity, Kind.RESULT, claim.to_body()).to_bytes()


# -- the member's side ------------------------------------------------------------------


@dataclass
class MemberInstallments:
    """One job this node runs, paid as it goes (see the module doc)."""

    job_id: str
    interval_ms: int
    duration_ms_max: int
    #: What each interval earns us, and in which currency.
    amount: int
    currency: str
    config: InstallmentConfig = DEFAULT_INSTALLMENTS
    started_at_ms: int | None = None
    claimed: int = 0
    #: Claimed intervals not yet paid -> when their payment is due.
    due_ms: dict[int, int] = field(default_factory=dict)
    paid: dict[int, None] = field(default_factory=dict)
    #: Set once we stopped for want of payment: why, in words.
    stopped_reason: str = ""
    finished: bool = False
    closed: bool = False
    #: Boundaries passed (claims made while we worked, co-signature updates after).
    tick: int = 0
    peer_id: str = ""
    #: Who pays (the manifest's payer) and where we are paid (our accept's
    #: payout address): what a payment notice is checked against on the ledger.
    payer: str = ""
    address: str = ""
    #: Per transaction, what our intervals already took from it (one transfer
    #: never pays two intervals more than it moved).  At most one entry per
    #: interval paid.
    credited: dict[str, int] = field(default_factory=dict)

    @property
    def intervals_max(self) -> int:
        return min(intervals_max, self.duration_ms_max // self.interval_ms) if self.interval_ms > 0 else 0

    def key(self, interval: int) -> bytes:
        return installment_key(self.job_id, self.peer_id, interval)

    def start(self, now_ms: int) -> list[Action]:
        """Our part started: the first claim is one interval (and the delay) away."""
        if self.started_at_ms is not None or self.intervals_max < 1:
            return []
        self.started_at_ms = now_ms
        return [SetTimer(claim_timer(self.job_id), self._boundary(1))]

    def _boundary(self, k: int) -> int:
        assert self.started_at_ms is not None
        return self.started_at_ms + k * self.interval_ms + self.config.claim_delay_ms

    def claim_due(self, now_ms: int) -> tuple[int | None, list[Action]]:
        """The claim timer fired: the interval to claim now (the host signs
        and hands it over; ``0``: our part ended, send only our co-signatures
        of the others, who are still paid by what we saw of them), and the
        timers that follow."""
        if self.closed or self.stopped_reason and not self.finished or self.started_at_ms is None:
            return None, []
        k = self.tick + 1
        if k > self.intervals_max or now_ms < self._boundary(k):
            return None, ([SetTimer(claim_timer(self.job_id), self._boundary(k))]
                          if k <= self.intervals_max else [])
        self.tick = k
        out: list[Action] = []
        if k + 1 <= self.intervals_max:
            out.append(SetTimer(claim_timer(self.job_id), self._boundary(k + 1)))
        if self.finished:
            return 0, [Emit("installments:cosigns_sent"), *out]
        self.claimed = k
        self.due_ms[k] = now_ms + self.config.grace_ms
        return k, [Emit("installments:claimed"), *out, *self._schedule_due()]

    def on_paid(self, key: bytes) -> list[Action]:
        """A payment notice for one of our keys came (from the job's submitter)
        and is believed (checked on the ledger, or no ledger to check it on)."""
        k = self.owed_interval(key)
        if k is None:
            return []
        del self.due_ms[k]
        self.paid[k] = None
        return [Emit("installments:paid"), *self._schedule_due()]

    def owed_interval(self, key: bytes) -> int | None:
        """The claimed, unpaid interval whose key is ``key`` (``None``: none)."""
        return next((k for k in self.due_ms if self.key(k) == key), None)

    def on_checked(self, key: bytes, tx_signature: str, payment: VerifiedPayment | None) -> tuple[str | None,
                                                                                                list[Action]]:
        """What the ledger showed of the transaction a notice for ``key``
        cites (#16.3, ``core._notices.payment_fault``): the interval is paid
        only when the job's payer moved at least its amount to our address in
        it, beyond what earlier intervals took from it.  Returns why not
        (``None``: paid) and the actions."""
        if self.owed_interval(key) is None:
            return "no interval of ours is owed under that key", []
        credited = self.credited.get(tx_signature, 0)
        why = payment_fault(payment, payer=self.payer, address=self.address, amount=self.amount,
                            credited=credited)
        if why is not None:
            return why, [Emit("installments:notice_refused")]
        self.credited[tx_signature] = credited + self.amount
        return None, self.on_paid(key)

    def on_due(self, now_ms: int) -> list[Action]:
        """The due timer fired: a payment overdue beyond the grace stops the job."""
        if self.finished or self.stopped_reason:
            return []
        late = sorted(k for k, due in self.due_ms.items() if due <= now_ms)
        if not late:
            return self._schedule_due()
        k = late[0]
        self.stopped_reason = (
            f"stopped: the submitter did not pay interval {k} of {self.interval_ms // 1000} s "
            f"(claimed {self.config.grace_ms // 1000} s earlier; {len(self.paid)} of {self.claimed} "
            "intervals paid)")
        return [Emit("installments:overdue"), CancelTimer(claim_timer(self.job_id)),
                CancelTimer(due_timer(self.job_id)), StopJob(self.job_id, self.stopped_reason, cause=UNPAID)]

    def finish(self) -> list[Action]:
        """Our part ended: the final proof covers the rest; no more claims and
        no payment deadlines.  While we still watch the others our
        co-signatures go on at each boundary (until :meth:`close`)."""
        if self.finished:
            return []
        self.finished = True
        self.due_ms.clear()
        return [CancelTimer(due_timer(self.job_id))]

    def close(self) -> list[Action]:
        """We no longer watch anyone in this job."""
        self.closed = True
        return [CancelTimer(claim_timer(self.job_id)), CancelTimer(due_timer(self.job_id))]

    def _schedule_due(self) -> list[Action]:
        if not self.due_ms:
            return [CancelTimer(due_timer(self.job_id))]
        return [SetTimer(due_timer(self.job_id), min(self.due_ms.values()))]


def member_installments(sm: SignedManifest, *, peer_id: str, price_per_gpu_hour: int,
                        config: InstallmentConfig = DEFAULT_INSTALLMENTS,
                        address: str = "") -> MemberInstallments | None:
    """The member's pay-as-you-go state for a job it starts (``None``: paid at the end only)."""
    m = sm.manifest
    if not m.interval_s:
        return None
    price = min(price_per_gpu_hour, m.price_per_gpu_hour_max)
    interval_ms = m.interval_s * 1000
    return MemberInstallments(job_id=sm.job_id, interval_ms=interval_ms, duration_ms_max=m.duration_s_max * 1000,
                              amount=interval_amount(price, m.gpus_per_node, interval_ms), currency=m.currency,
                              config=config, peer_id=peer_id, payer=m.payer, address=address)


# -- the submitter's side ----------------------------------------------------------------


@dataclass
class JobInstallments:
    """What the submitter knows of one job's installments."""

    job_id: str
    cert_hash: bytes
    members: tuple[str, ...]
    interval_ms: int
    intervals_max: int
    confirmed_at_ms: int
    currency: str
    amounts: dict[str, int]
    payout_addresses: dict[str, str]
    claimed: dict[str, int] = field(default_factory=dict)
    #: (observer, subject) -> the longest observation co-signed so far (ms).
    observed: dict[tuple[str, str], int] = field(default_factory=dict)
    #: member -> intervals owed to it so far (1..n were recorded).
    owed: dict[str, int] = field(default_factory=dict)
    items: dict[bytes, None] = field(default_factory=dict)
    closed: bool = False


class Installments:
    """The submitter's installments of the jobs it confirmed (see the module doc)."""

    def __init__(self, identity: Identity, config: InstallmentConfig = DEFAULT_INSTALLMENTS, *,
                 tolerance_ms: int = tolerance_ms_default, tolerance_ppm: int = tolerance_ppm_default,
                 heartbeat_interval_ms: int = 500, verify: Verifier | None = None) -> None:
        self.identity = identity
        self.config = config
        self.tolerance_ms = tolerance_ms
        self.tolerance_ppm = tolerance_ppm
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.verify = verify
        self.jobs: dict[str, JobInstallments] = {}

    def tolerance(self, observed_ms: int) -> int:
        """The proofs' tolerance (``ProofTerms.tolerance``)."""
        return max(self.tolerance_ms, max(0, observed_ms) * self.tolerance_ppm // 1_000_000)

    def open(self, sm: SignedManifest, cert: Any, confirmed_at_ms: int, payout_addresses: dict[str, str]) -> None:
        """The submitter confirmed ``cert``: a job with ``payment.interval_s`` is paid as it goes."""
        m = sm.manifest
        if not m.interval_s or sm.job_id in self.jobs:
            return
        if len(self.jobs) >= self.config.jobs_max:
            raise LocalProtocolError(f"more than {self.config.jobs_max} jobs paid as they go")
        interval_ms = m.interval_s * 1000
        prices = {a.peer_id: min(a.price_per_gpu_hour, m.price_per_gpu_hour_max) for a in cert.accepts}
        members = tuple(cert.members)
        self.jobs[sm.job_id] = JobInstallments(
            job_id=sm.job_id, cert_hash=cert.digest, members=members, interval_ms=interval_ms,
            intervals_max=min(intervals_max, m.duration_s_max * 1000 // interval_ms),
            confirmed_at_ms=confirmed_at_ms, currency=m.currency,
            amounts={p: interval_amount(prices.get(p, m.price_per_gpu_hour_max), m.gpus_per_node, interval_ms)
                     for p in members},
            payout_addresses=dict(payout_addresses))

    def prepaid(self, job_id: str, peer_id: str) -> int:
        """What was owed to ``peer_id`` in installments of ``job_id`` (the final line pays the rest)."""
        j = self.jobs.get(job_id)
        if j is None:
            return 0
        return j.owed.get(peer_id, 0) * j.amounts.get(peer_id, 0)

    def intervals_owed(self, job_id: str, peer_id: str) -> int:
        j = self.jobs.get(job_id)
        return j.owed.get(peer_id, 0) if j is not None else 0

    def close(self, job_id: str) -> None:
        """The job settled: later claims are late, nothing more is owed in installments."""
        j = self.jobs.get(job_id)
        if j is not None:
            j.closed = True

    def forget(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)

    def on_claim(self, body: dict[str, Any], signer: str, wire: bytes, now_ms: int) -> list[Action]:
        """A member's claim: refused (``PeerMisbehaved``), or stored, what it
        makes owed recorded, then acknowledged."""
        claim = Claim.from_body(body, signer)
        h = item_hash(wire)
        j = self.jobs.get(claim.job_id)
        if j is None:
            return [LookupCollection(claim.job_id, signer, h)]
        if h in j.items:
            return [Emit("installments:claim_repeated"), Send(signer, ack_wire(self.identity, j.job_id, [h],
                                                                               "recorded"))]
        self._check(j, claim, now_ms)
        if j.closed:
            return [Emit("installments:claim_late"), Send(signer, ack_wire(self.identity, j.job_id, [h], "late"))]
        out: list[Action] = [ItemTaken(j.job_id, h, "claim", signer, wire, now_ms)]
        out += self._take(j, claim, h, now_ms)
        return [*out, Emit("installments:claim_taken"), Send(signer, ack_wire(self.identity, j.job_id, [h],
                                                                              "recorded"))]

    def restore_claim(self, job_id: str, sender: str, wire: bytes, received_ms: int) -> list[Action]:
        """After a restart: a claim the driver stored, replayed at the time it
        came.  What it makes owed is recorded again (a no-op in the outbox)."""
        j = self.jobs.get(job_id)
        if j is None:
            return []
        env = envelope_from_obj(decode(wire, size_max=Kind.RESULT.bytes_max + 1024, canonical=True),
                                expected=Kind.RESULT, verify=self.verify)
        claim = Claim.from_body(body_of(env), env.signer_peer_id)
        if claim.peer_id != sender or claim.job_id != job_id:
            raise PeerMisbehaved(Reason.NOT_A_MEMBER, "stored claim of another job or member")
        self._check(j, claim, received_ms)
        return self._take(j, claim, item_hash(wire), received_ms)

    def _check(self, j: JobInstallments, claim: Claim, now_ms: int) -> None:
        """Refuse a claim that is not this member's to make, or for more time than passed."""
        if claim.peer_id not in j.members:
            raise PeerMisbehaved(Reason.NOT_A_MEMBER, f"{claim.peer_id[:16]} is not a member of {j.job_id[:12]}")
        if claim.cert_hash != j.cert_hash:
            raise PeerMisbehaved(Reason.BAD_PROOF, "interval_claim for another certificate")
        if claim.interval > j.intervals_max:
            raise PeerMisbehaved(Reason.BAD_PROOF, f"claims interval {claim.interval} of a job with "
                                                   f"{j.intervals_max} intervals")
        window = max(0, now_ms - j.confirmed_at_ms)
        claimed_ms = claim.interval * j.interval_ms
        if claimed_ms > window + self.tolerance(window):
            raise PeerMisbehaved(Reason.BAD_PROOF, f"claims {claim.interval} intervals ({claimed_ms} ms), but "
                                                   f"only {window} ms passed since the cluster was confirmed")

    def _take(self, j: JobInstallments, claim: Claim, h: bytes, now_ms: int) -> list[Action]:
        j.items[h] = None
        for wire in claim.cosigns:
            try:
                sc = decode_cosign(wire, verify=self.verify)
            except PeerMisbehaved:
                continue  # a bad co-signature is the co-signer's fault, never the claim's
            co = sc.cosign
            if co.job_id != j.job_id or co.cert_hash != j.cert_hash or co.observer != claim.peer_id \
                    or co.subject not in j.members:
                continue
            key = (co.observer, co.subject)
            j.observed[key] = max(j.observed.get(key, 0), co.observed_ms)
        j.claimed[claim.peer_id] = max(j.claimed.get(claim.peer_id, 0), claim.interval)
        return self._owe(j, now_ms)

    def bound_ms(self, j: JobInstallments, peer: str, now_ms: int) -> int:
        """The longest service of ``peer`` that we, and those who watched it, observed."""
        window = max(0, now_ms - j.confirmed_at_ms)
        bound = window + self.tolerance(window)
        watchers = {obs for obs, _subject in j.observed}
        others = [m for m in j.members if m != peer and m in watchers]
        if others:
            seen = max((j.observed[(o, peer)] for o in others if (o, peer) in j.observed), default=None)
            if seen is None:
                return 0
            credited = seen + self.heartbeat_interval_ms
            bound = min(bound, credited + self.tolerance(credited))
        return bound

    def _owe(self, j: JobInstallments, now_ms: int) -> list[Action]:
        """Every interval claimed and observed that is not owed yet: owed now, once."""
        if j.closed:
            return []
        rows: list[Installment] = []
        for peer in j.members:
            n = min(j.claimed.get(peer, 0), self.bound_ms(j, peer, now_ms) // j.interval_ms, j.intervals_max)
            amount = j.amounts.get(peer, 0)
            for k in range(j.owed.get(peer, 0) + 1, n + 1):
                if amount > 0:
                    rows.append(Installment(installment_key(j.job_id, peer, k), peer, k, amount,
                                            j.payout_addresses.get(peer, "")))
            if n > j.owed.get(peer, 0):
                j.owed[peer] = n
        out: list[Action] = [InstallmentsOwed(j.job_id, j.currency, tuple(rows))] if rows else []
        if any(j.claimed.get(p, 0) > j.owed.get(p, 0) for p in j.members):
            out.append(Emit("installments:claim_held"))  # claimed beyond what was observed: not yet
        return out
