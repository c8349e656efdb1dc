"""How much of a node one stranger's jobs may take: quotas per submitter and per payer.

A flood of 5,000 signed manifests from one identity filled every node's
formation table (1,024 jobs shared by all strangers) and its GPUs for a
minute, so a real job submitted meanwhile failed (#18.3).  Cancelling each
flooded job at once freed the table but not the replay memory (#18.4).
These pure structures give every submitter and payer a bounded share:

- :class:`Admission` counts, per submitter and per payer, the jobs open in a
  node's formation table (not closed: forming, or running here) and the job
  ids it remembers against replays, and refuses a manifest beyond either
  quota with ``LIMIT_EXCEEDED`` (a local limit: the manifest is not
  forwarded).  It also sums each payer's open jobs' price ceilings
  (:func:`job_ceiling`), which the can-it-pay check adds to the job at hand.
- :class:`PayerChecks` decides, on a shared ledger, whether a payer's
  balance covers a job on top of its open ones, holding manifests while
  their payer's balance is looked up: one lookup per payer at a time, a few
  manifests waiting per payer, a few payers waiting at once, so a flood of
  one payer's manifests cannot crowd out another payer's lookup.

How many GPUs one submitter may hold under unconfirmed leases is the
formation core's rule (``FormationConfig.holds_per_submitter_max``).  Same
input, same output: no clock, no randomness.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum

from ._errors import PeerMisbehaved, Reason
from ._manifest import Manifest, SignedManifest
from ._payout import payer_covers


def job_ceiling(m: Manifest) -> int:
    """The most a job can cost: every member's GPUs for the whole duration
    limit at the price ceiling (smallest currency unit, rounded up)."""
    gpu_ms = m.members * m.gpus_per_node * m.duration_s_max * 1000
    return -(-gpu_ms * m.price_per_gpu_hour_max // 3_600_000)


@dataclass(frozen=True, kw_only=True, slots=True)
class Quotas:
    #: Jobs of one submitter open in the table at once (forming, or running here).
    jobs_per_submitter_max: int = 32
    #: Jobs paid by one payer open at once (several identities may name one payer).
    jobs_per_payer_max: int = 64
    #: Job ids of one submitter remembered against replays (until each expires).
    remembered_per_submitter_max: int = 4096

    def __post_init__(self) -> None:
        if min(self.jobs_per_submitter_max, self.jobs_per_payer_max, self.remembered_per_submitter_max) < 1:
            raise ValueError("every quota is at least 1")


@dataclass(slots=True)
class Admission:
    """Open jobs and remembered ids per submitter and payer (see the module docstring)."""

    quotas: Quotas = field(default_factory=Quotas)
    open_by_submitter: dict[str, int] = field(default_factory=dict)
    open_by_payer: dict[str, int] = field(default_factory=dict)
    #: (payer, currency) -> the sum of its open jobs' ceilings.
    ceilings: dict[tuple[str, str], int] = field(default_factory=dict)
    remembered: dict[str, int] = field(default_factory=dict)
    _expiries: list[tuple[int, str]] = field(default_factory=list)

    def check(self, sm: SignedManifest, now_ms: int) -> None:
        """``LIMIT_EXCEEDED`` if admitting this manifest would exceed a quota."""
        m, q = sm.manifest, self.quotas
        self._forget(now_ms)
        if self.open_by_submitter.get(m.submitter, 0) >= q.jobs_per_submitter_max:
            raise PeerMisbehaved(Reason.LIMIT_EXCEEDED,
                                 f"submitter {m.submitter[:16]} has {q.jobs_per_submitter_max} jobs open here")
        if self.open_by_payer.get(m.payer, 0) >= q.jobs_per_payer_max:
            raise PeerMisbehaved(Reason.LIMIT_EXCEEDED,
                                 f"payer {m.payer[:16]} pays for {q.jobs_per_payer_max} jobs open here")
        if self.remembered.get(m.submitter, 0) >= q.remembered_per_submitter_max:
            raise PeerMisbehaved(Reason.LIMIT_EXCEEDED,
                                 f"submitter {m.submitter[:16]} has {q.remembered_per_submitter_max} live job ids here")

    def admit(self, sm: SignedManifest) -> None:
        """Count an admitted job as open and its id as remembered (until it expires)."""
        m = sm.manifest
        self.open_by_submitter[m.submitter] = self.open_by_submitter.get(m.submitter, 0) + 1
        self.open_by_payer[m.payer] = self.open_by_payer.get(m.payer, 0) + 1
        key = (m.payer, m.currency)
        self.ceilings[key] = self.ceilings.get(key, 0) + job_ceiling(m)
        self.remembered[m.submitter] = self.remembered.get(m.submitter, 0) + 1
        heapq.heappush(self._expiries, (m.expires_at_ms, m.submitter))

    def close(self, sm: SignedManifest) -> None:
        """The job is no longer open here (closed, finished, forgotten): call once."""
        m = sm.manifest
        _decrement(self.open_by_submitter, m.submitter)
        _decrement(self.open_by_payer, m.payer)
        key = (m.payer, m.currency)
        left = self.ceilings.get(key, 0) - job_ceiling(m)
        if left > 0:
            self.ceilings[key] = left
        else:
            self.ceilings.pop(key, None)

    def open_ceiling(self, payer: str, currency: str) -> int:
        """What ``payer`` may owe for its jobs open here: the sum of their ceilings."""
        return self.ceilings.get((payer, currency), 0)

    def _forget(self, now_ms: int) -> None:
        while self._expiries and self._expiries[0][0] <= now_ms:
            _, submitter = heapq.heappop(self._expiries)
            _decrement(self.remembered, submitter)


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


class Gate(Enum):
    """What to do with a manifest on a shared ledger."""

    #: The payer's balance covers it: consider the job.
    ADMIT = "admit"
    #: Its payer's balance is being looked up (``lookup``: start that lookup now).
    WAIT = "wait"
    #: The payer cannot pay (or too many manifests already wait): do not volunteer.
    REFUSE = "refuse"


@dataclass(frozen=True, slots=True)
class GateVerdict:
    gate: Gate
    reason: str = ""
    #: With ``WAIT``: the driver starts a balance lookup for this payer now.
    lookup: bool = False


@dataclass(slots=True)
class PayerChecks:
    """Balances per payer (cached ``verdict_ttl_ms``) and the manifests that
    wait for one; the driver only looks balances up (see the module docstring)."""

    verdict_ttl_ms: int = 30_000
    balances_max: int = 10_000
    waiting_per_payer_max: int = 16
    payers_waiting_max: int = 64
    balances: OrderedDict[tuple[str, str], tuple[int | None, int]] = field(default_factory=OrderedDict)
    waiting: dict[tuple[str, str], list[SignedManifest]] = field(default_factory=dict)

    def gate(self, sm: SignedManifest, now_ms: int, *, open_lamports: int) -> GateVerdict:
        """May this node consider the job?  ``open_lamports``: what its payer
        may already owe for its other open jobs here (``Admission.open_ceiling``)."""
        m = sm.manifest
        key = (m.payer, m.currency)
        cached = self.balances.get(key)
        if cached is not None and now_ms - cached[1] < self.verdict_ttl_ms:
            v = payer_covers(balance_lamports=cached[0], needed=job_ceiling(m), open_lamports=open_lamports)
            return GateVerdict(Gate.ADMIT) if v.ok else GateVerdict(Gate.REFUSE, v.reason)
        queue = self.waiting.get(key)
        if queue is None:
            if len(self.waiting) >= self.payers_waiting_max:
                return GateVerdict(Gate.REFUSE, "too many payers' balances being looked up; try again later")
            self.waiting[key] = [sm]
            return GateVerdict(Gate.WAIT, lookup=True)
        if len(queue) >= self.waiting_per_payer_max:
            return GateVerdict(Gate.REFUSE, f"{self.waiting_per_payer_max} jobs of this payer already wait "
                                            "for its balance")
        if all(w.job_id != sm.job_id for w in queue):
            queue.append(sm)
        return GateVerdict(Gate.WAIT)

    def resolved(self, payer: str, currency: str, balance_lamports: int | None, now_ms: int) -> list[SignedManifest]:
        """The balance came back (``None``: unknown): remember it and hand back
        the manifests that waited for it, to be gated again."""
        key = (payer, currency)
        self.balances[key] = (balance_lamports, now_ms)
        self.balances.move_to_end(key)
        while len(self.balances) > self.balances_max:
            self.balances.popitem(last=False)
        return self.waiting.pop(key, [])
