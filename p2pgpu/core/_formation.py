"""Cluster formation, the worker's side: volunteer, elect, propose, accept, run.

:class:`FormationNode` is one node's pure state machine for every job it has
seen (flow 3 of docs/architecture.md; the protocol is in ``docs/formation.md``).
Its inputs are verified messages (from :func:`decode_message`), named timers
and local calls, each with ``now_ms``; its output is a list of actions
(``p2pgpu.core._actions``).  It holds the node's :class:`CapacityLedger`, the
one place that decides whether GPUs can be promised: a node reserves under a
lease only what is free, holds at most one reservation per job (a later
proposal for the same job moves it, never doubles it), and frees it when the
lease runs out unconfirmed, another cluster is confirmed, the job is cancelled
or finished.  That is why two jobs competing for the same peers can never both
hold the same capacity.

The leader of view ``v`` is the volunteer at position ``v`` in the order of
``sha256(job_id || peer_id)`` (:func:`leader_rank`), which every peer computes
alike; nodes that heard different volunteers may disagree for a while, which
costs time, never safety: safety rests on the certificate (every member signed
an accept of exactly that membership) and on the submitter confirming one
certificate per job (:class:`~p2pgpu.core.Submitter`).  The same inputs give
the same actions: everything iterates lists or dicts, randomness is not used.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field, replace

from . import _limits as limits
from ._actions import (
    Action,
    CancelTimer,
    Emit,
    Publish,
    Released,
    Reserved,
    Send,
    SetTimer,
    StartJob,
    StopJob,
    Subscribe,
    TimerKey,
    TimerOwner,
    Unsubscribe,
)
from ._advert import Advert, SignedAdvert, sign_advert
from ._errors import LocalProtocolError, PeerMisbehaved, Reason
from ._formation_messages import (
    Accept,
    Cancel,
    Certificate,
    Certified,
    Confirm,
    Decline,
    Message,
    Offer,
    Proposal,
    decode_message,
    views_max,
)
from ._formation_quota import Admission, Quotas
from ._formation_rules import (
    AdvertLookup,
    ClaimView,
    Standing,
    advert_fault,
    believe_all,
    claim_fault,
    job_value,
    leader_fault,
    member_tier,
    requirement_fault,
    validity_fault,
)
from ._formation_states import WORKER_TRANSITIONS, WorkerState, advance
from ._identity import Identity
from ._manifest import ReplayGuard, SignedManifest, check_manifest_time
from ._matching import exclusion, warm_first


@dataclass(frozen=True, kw_only=True, slots=True)
class FormationConfig:
    """Timeouts and limits of formation; the defaults suit a loopback or LAN network."""

    #: How long a volunteer collects other offers before electing a leader (it
    #: decides sooner once it has heard the best-ranked expected volunteer).
    offer_window_ms: int = 40
    #: With a candidate list (the peers the driver's advert book says can serve
    #: the job), only the ``members + spare_volunteers`` best-ranked candidates
    #: volunteer at once; the others stay quiet ...
    spare_volunteers: int = 2
    #: ... and volunteer this long after the manifest, one step per group,
    #: each group twice the size of the one before (:func:`quiet_group`: the
    #: turn grows with the log of the rank, not the rank), unless the job was
    #: confirmed or proposals show progress.
    late_volunteer_ms: int = 400
    #: No candidate stays quiet longer than this many steps of
    #: ``late_volunteer_ms`` after it saw the manifest, whatever its rank and
    #: whatever proposals it sees: candidates from the advert book that never
    #: offer (silent Sybils) or a stranger's proposals every few hundred ms
    #: cannot hold a free, matching worker back past it (#12).
    quiet_steps_max: int = 8
    #: A view whose leader shows no progress for this long is replaced by the next view.
    leader_timeout_ms: int = 400
    #: A leader replaces proposed members that have not accepted after this long.
    member_timeout_ms: int = 150
    #: How long an accepted member holds its GPUs for an unconfirmed proposal.
    lease_ms: int = 10_000
    #: Extra time a member keeps a lease past what it signed (clock skew, a confirm in flight).
    lease_grace_ms: int = 2_000
    #: The submitter confirms only a certificate whose leases last at least this much longer.
    confirm_margin_ms: int = 1_000
    #: Resend intervals for an unconfirmed accept and an unconfirmed certificate.
    accept_retry_ms: int = 500
    certificate_retry_ms: int = 500
    #: The submitter republishes its manifest while too few peers offered.
    manifest_retry_ms: int = 2_000
    manifest_retries_max: int = 5
    #: A job with no confirmed certificate this long after it was made has failed.
    formation_timeout_ms: int = 60_000
    #: A running job is stopped this long after ``duration_s_max`` if nobody said it finished.
    run_grace_ms: int = 60_000
    #: A job told to stop (cancelled, past its time) keeps its GPUs until the
    #: driver says its run ended (``finish``), or this long at most.
    stop_grace_ms: int = 60_000
    #: Proposals one leader makes in one view before it lets the view time out.
    rounds_max: int = 8
    volunteers_max: int = 256
    jobs_max: int = 1024
    jobs_topic: str = "/p2pgpu/jobs/1"
    #: Per-job GossipSub topics (``<jobs_topic>/<job_id>``), or everything on ``jobs_topic``.
    per_job_topics: bool = True
    clock_skew_ms: int = limits.clock_skew_ms_max
    #: The network whose adverts count (``""``: any), for adverts carried in offers.
    network: str = ""
    #: Per submitter and per payer: jobs open in the table, ids remembered (``_formation_quota``).
    quotas: Quotas = field(default_factory=Quotas)
    #: Jobs of one submitter this node holds GPUs for under unconfirmed leases
    #: at once: a flood of one identity's jobs holds at most this many here.
    holds_per_submitter_max: int = 1

    def topic(self, job_id: str) -> str:
        return f"{self.jobs_topic}/{job_id}" if self.per_job_topics else self.jobs_topic


#: The defaults, shared (the config is frozen).
DEFAULT_CONFIG = FormationConfig()


def leader_rank(job_id: str, peer_id: str) -> bytes:
    """A volunteer's rank for a job: lower leads first; every peer computes the same."""
    return hashlib.sha256(bytes.fromhex(job_id) + peer_id.encode()).digest()


#: The most candidates a driver's list is read for (the rest are ignored).
candidates_max = 4096


def ranked_candidates(sm: SignedManifest, candidates: list[str]) -> list[str]:
    """The first ``candidates_max`` distinct candidates in leader-rank order, best first."""
    unique = list(dict.fromkeys(candidates[:candidates_max]))
    job = bytes.fromhex(sm.job_id)  # leader_rank's prefix, computed once (a hot path: #13's profile)
    sha256 = hashlib.sha256
    unique.sort(key=lambda p: sha256(job + p.encode()).digest())
    return unique


def quiet_group(position: int, eager_max: int) -> int:
    """The step at which the candidate at ``position`` (0 = best rank)
    volunteers: 0 for the ``eager_max`` first (at once), then groups that
    double: ``eager_max * (2**k - 1)`` to ``eager_max * (2**(k+1) - 1) - 1``
    wait ``k`` steps.  An honest network draws a few offers first and twice
    as many per step while the job is undecided; candidates that never offer
    (fresh identities whose free, matching adverts fill the book) delay a
    worker behind ``n`` of them by ``log2(n / eager_max + 1)`` steps, not
    ``n / eager_max`` (400 of them: 7 steps, not 133)."""
    return (position // max(1, eager_max) + 1).bit_length() - 1


def expected_volunteers(sm: SignedManifest, candidates: list[str], config: FormationConfig) -> list[str]:
    """The ``members + spare_volunteers`` best-ranked of ``candidates``, best
    first: who volunteers at once, and whom the submitter hands the manifest
    to directly.  Every peer with the same list computes the same answer."""
    return ranked_candidates(sm, candidates)[: sm.manifest.members + config.spare_volunteers]


@dataclass(slots=True)
class Hold:
    gpus: int
    #: The lease's end; ``None`` once the job runs here.
    lease_until_ms: int | None


@dataclass(slots=True)
class CapacityLedger:
    """What a node has promised: at most one hold per job, never more than it has."""

    gpus_total: int
    holds: dict[str, Hold] = field(default_factory=dict)

    @property
    def reserved(self) -> int:
        return sum(h.gpus for h in self.holds.values())

    @property
    def free(self) -> int:
        return self.gpus_total - self.reserved

    def can_hold(self, job_id: str, gpus: int) -> bool:
        held = self.holds.get(job_id)
        return held.gpus >= gpus if held is not None else self.free >= gpus

    def reserve(self, job_id: str, gpus: int, lease_until_ms: int) -> bool:
        """Hold ``gpus`` for ``job_id`` until ``lease_until_ms`` (extending a lease
        already held for it); ``False`` when that would exceed the free GPUs."""
        if not self.can_hold(job_id, gpus):
            return False
        held = self.holds.get(job_id)
        if held is None:
            self.holds[job_id] = Hold(gpus, lease_until_ms)
        elif held.lease_until_ms is not None:
            held.lease_until_ms = max(held.lease_until_ms, lease_until_ms)
        return True

    def run(self, job_id: str) -> None:
        if job_id not in self.holds:
            raise LocalProtocolError("run without a hold")
        self.holds[job_id].lease_until_ms = None

    def release(self, job_id: str) -> int:
        held = self.holds.pop(job_id, None)
        return held.gpus if held is not None else 0


@dataclass(slots=True)
class _Job:
    sm: SignedManifest
    state: WorkerState
    #: After this nobody proposes (the submitter has given up); the record goes later.
    deadline_ms: int
    #: When this node first saw the job (views are bounded by the time since).
    seen_ms: int = 0
    #: Counted as open in the node's quotas (until it closes).
    counted: bool = False
    #: Leading, but left itself out of its proposal for the submitter's holds quota.
    quota_held: bool = False
    subscribed: bool = False
    offer_seq: int = 0
    my_offer: Offer | None = None
    #: Known volunteers, every one eligible (its signed advert matches the
    #: job): peer id -> latest offer seq (0 if learnt from a proposal).
    volunteers: dict[str, int] = field(default_factory=dict)
    #: The adverts their offers carried (one per volunteer at most).
    adverts: dict[str, Advert] = field(default_factory=dict)
    #: The candidates expected to volunteer at once, best rank first (empty:
    #: no candidate list, everyone who can serve volunteers).
    eager: list[str] = field(default_factory=list)
    #: Held back by the candidate rule until the "late" timer fires.
    quiet: bool = False
    #: The peer our first offer was also sent to directly (the expected leader).
    offered_to: str = ""
    #: When a proposal for this job was last seen (a sign formation progresses).
    progress_ms: int = -1
    #: When our current accept was last sent (a repeated proposal is not answered twice at once).
    accept_sent_ms: int = -1
    ranks: dict[str, bytes] = field(default_factory=dict)
    view: int = 0
    round: int = 0
    #: Leader side: the current proposal, its accepts, peers not to propose again.
    proposal: Proposal | None = None
    accepts: dict[str, Accept] = field(default_factory=dict)
    excluded: dict[str, int] = field(default_factory=dict)
    certified: Certified | None = None
    ever_certified: bool = False
    #: Member side: the proposal accepted last (its preference key) and our accept.
    accepted: Accept | None = None
    accepted_key: tuple[int, bytes, int] | None = None
    accepted_leader: str = ""
    #: Whether this node ever accepted another leader's proposal for the job.
    accepted_other: bool = False
    declined: bool = False
    confirm: Confirm | None = None
    #: A running job told to stop: its GPUs stay held until its run has ended.
    stopping: bool = False

    @property
    def job_id(self) -> str:
        return self.sm.job_id


class FormationNode:
    """One node's formation core for all jobs it sees.  See the module docstring.

    Feed it: :meth:`on_message` (or :meth:`on_bytes`) for every message from
    the jobs topic, the per-job topics it subscribes to and direct streams;
    :meth:`on_timer` when a timer it set fires; :meth:`finish` when a job it
    runs ends; :meth:`update_advert` when its advert changes.  A ``Send`` to
    this node's own peer id must be delivered back to it (and to the node's
    :class:`Submitter`, if the node submitted the job).
    """

    def __init__(self, identity: Identity, advert: Advert | SignedAdvert, config: FormationConfig = DEFAULT_CONFIG,
                 *, adverts: AdvertLookup | None = None, standing: Standing | None = None,
                 claims: ClaimView | None = None) -> None:
        """``advert`` is this node's own (signed, or signed here); ``adverts``
        finds other peers' adverts (the driver's advert book): with the ones
        offers carry, they decide who is an eligible volunteer and leader
        (``_formation_rules``).  ``standing``: each peer's worker score as
        this node computed it, which orders the members it proposes when it
        leads (``member_tier``).  ``claims``: this node's hardware-challenge
        verdicts (``ClaimView``); a volunteer whose claim the job needs was
        refused is never proposed (``claim_fault``)."""
        self.identity = identity
        self.standing: Standing = standing or (lambda _peer: None)
        self.claims: ClaimView = claims or believe_all
        self.peer_id = identity.peer_id
        self.config = config
        self.lookup: AdvertLookup = adverts or (lambda _peer: None)
        self.guard = ReplayGuard(ids_max=config.jobs_max * 64)
        self.admission = Admission(config.quotas)
        self.jobs: dict[str, _Job] = {}
        #: Closed jobs still in the table, oldest first: the first to go when it is full.
        self._closed: OrderedDict[str, None] = OrderedDict()
        self._set_advert(advert)
        self.ledger = CapacityLedger(len(self._advert.gpus))
        self._handlers = {"window": self._t_window, "view": self._t_view, "round": self._t_round,
                          "lease": self._t_lease, "retry": self._t_retry, "run": self._t_run, "end": self._t_end,
                          "late": self._t_late, "stop": self._t_stop}

    def _set_advert(self, advert: Advert | SignedAdvert) -> None:
        signed = advert if isinstance(advert, SignedAdvert) else sign_advert(self.identity, advert) \
            if advert.peer_id == self.identity.peer_id else None
        if signed is None or signed.advert.peer_id != self.peer_id:
            raise LocalProtocolError("the advert must be this node's own")
        self._signed = signed
        self._advert = signed.advert
        self._all_free = replace(signed.advert, gpus_free=len(signed.advert.gpus))

    # -- inputs ---------------------------------------------------------------

    def on_bytes(self, data: bytes, now_ms: int) -> list[Action]:
        return self.on_message(decode_message(data), now_ms)

    def on_message(self, msg: Message, now_ms: int) -> list[Action]:
        """Handle one verified message; ``PeerMisbehaved`` for a peer's fault."""
        if isinstance(msg, SignedManifest):
            return self.on_manifest(msg, now_ms)
        if isinstance(msg, Certified):
            return []  # for the submitter
        job = self.jobs.get(msg.job_id)
        if job is None:
            return [Emit("formation.unknown_job")]
        if isinstance(msg, Offer):
            return self._on_offer(job, msg, now_ms)
        if isinstance(msg, Proposal):
            return self._on_proposal(job, msg, now_ms)
        if isinstance(msg, Accept):
            return self._on_accept(job, msg, now_ms)
        if isinstance(msg, Decline):
            return self._on_decline(job, msg, now_ms)
        if isinstance(msg, Confirm):
            return self._on_confirm(job, msg, now_ms)
        return self._on_cancel(job, msg, now_ms)

    def on_manifest(self, sm: SignedManifest, now_ms: int, candidates: list[str] | None = None) -> list[Action]:
        """A new job: remember it and volunteer if it matches and GPUs are free.
        A job id seen before raises ``REPLAYED``; an expired one ``EXPIRED``.

        ``candidates`` are the peers the driver believes can serve the job
        (its advert book: matching, with free GPUs; this node need not be
        among them).  With them, a job draws ``members + spare_volunteers``
        offers instead of one from every matching node: the candidates are
        put in leader-rank order and only that many from the front volunteer
        now, the rest in groups that double, one ``late_volunteer_ms`` step
        each (:func:`quiet_group`), at most ``quiet_steps_max`` steps, if the
        job is still not decided.  The list only saves messages and time: a
        wrong or stale one (or one full of identities that never offer)
        delays formation by a bounded time, never breaks safety."""
        self.check_admission(sm, now_ms)
        while len(self.jobs) >= self.config.jobs_max and self._closed:
            # Forget closed jobs first, oldest first (the replay guard still remembers their ids).
            self._forget(self._closed.popitem(last=False)[0])
        self.guard.admit(sm.job_id, sm.manifest.expires_at_ms, now_ms)
        self.admission.admit(sm)
        m, cfg = sm.manifest, self.config
        deadline = min(m.expires_at_ms, m.created_at_ms + cfg.formation_timeout_ms)
        job = _Job(sm=sm, state=WorkerState.SEEN, deadline_ms=deadline, seen_ms=now_ms, counted=True)
        self.jobs[sm.job_id] = job
        actions: list[Action] = [SetTimer(self._key(job, "end"), deadline + cfg.lease_ms + cfg.lease_grace_ms)]
        if not self._can_serve(job):
            return actions
        if candidates is not None:
            # This node first: a list of ``candidates_max`` others (a book
            # full of matching adverts) must not push it out of its own
            # ranking (``index`` raised ValueError on every manifest).
            ranked = ranked_candidates(sm, [self.peer_id, *candidates[:candidates_max - 1]])
            eager_max = m.members + cfg.spare_volunteers
            job.eager = ranked[:eager_max]
            position = ranked.index(self.peer_id)
            if position >= eager_max:
                # Quiet, but listening: the job's proposals (progress) and its
                # CONFIRM or CANCEL (the end) travel on the job's topic.
                job.quiet = True
                job.subscribed = True
                actions.append(Subscribe(self.config.topic(job.job_id)))
                steps = min(quiet_group(position, eager_max), cfg.quiet_steps_max)
                actions.append(SetTimer(self._key(job, "late"), now_ms + steps * cfg.late_volunteer_ms))
                return actions
        return actions + self._volunteer(job, now_ms)

    def check_admission(self, sm: SignedManifest, now_ms: int) -> None:
        """Would :meth:`on_manifest` take this manifest?  Raises as it would
        (``NOT_YET_VALID``, ``EXPIRED``, ``REPLAYED``, ``LIMIT_EXCEEDED``: a
        submitter's or payer's quota, or a table full of open jobs), changing
        nothing: the driver asks before it spends a balance lookup on it."""
        check_manifest_time(sm, now_ms, self.config.clock_skew_ms)
        if sm.job_id in self.jobs or sm.job_id in self.guard:
            raise PeerMisbehaved(Reason.REPLAYED, f"job {sm.job_id[:12]} already seen")
        self.admission.check(sm, now_ms)
        if len(self.jobs) - len(self._closed) >= self.config.jobs_max:
            raise PeerMisbehaved(Reason.LIMIT_EXCEEDED, "too many jobs in formation")

    def open_ceiling(self, payer: str, currency: str) -> int:
        """What ``payer`` may owe for its jobs open here (the sum of their
        price ceilings): the can-it-pay check adds it to each new job's."""
        return self.admission.open_ceiling(payer, currency)

    def _forget(self, job_id: str) -> None:
        job = self.jobs.pop(job_id, None)
        self._closed.pop(job_id, None)
        if job is not None and job.counted:
            job.counted = False
            self.admission.close(job.sm)

    def on_timer(self, key: TimerKey, now_ms: int) -> list[Action]:
        handler = self._handlers.get(key.name) if key.owner is TimerOwner.FORMATION else None
        if handler is None:
            raise LocalProtocolError(f"not a formation node timer: {key}")
        job = self.jobs.get(key.job_id)
        if job is None:
            return []
        return handler(job, now_ms)

    def finish(self, job_id: str, now_ms: int) -> list[Action]:
        """The job this node ran has ended: free its GPUs."""
        job = self.jobs.get(job_id)
        if job is None or job.state is not WorkerState.RUNNING:
            return []
        actions = self._close(job, "finished", now_ms)
        self._forget(job_id)
        return actions

    def update_advert(self, advert: Advert | SignedAdvert, now_ms: int) -> list[Action]:
        self._set_advert(advert)
        self.ledger.gpus_total = max(len(self._advert.gpus), self.ledger.reserved)
        return self._capacity_freed(now_ms)

    # -- queries --------------------------------------------------------------

    @property
    def gpus_free(self) -> int:
        return self.ledger.free

    def state(self, job_id: str) -> WorkerState | None:
        job = self.jobs.get(job_id)
        return job.state if job is not None else None

    def certificate(self, job_id: str) -> Certificate | None:
        """The confirmed certificate of a job this node knows, if it has seen the CONFIRM."""
        job = self.jobs.get(job_id)
        return job.confirm.certificate if job is not None and job.confirm is not None else None

    def leader_of(self, job_id: str, view: int) -> str | None:
        job = self.jobs.get(job_id)
        if job is None or not job.volunteers:
            return None
        ranked = self._ranked(job)
        return ranked[view % len(ranked)]

    # -- volunteering and electing --------------------------------------------

    def _key(self, job: _Job, name: str) -> TimerKey:
        return TimerKey(TimerOwner.FORMATION, job.job_id, name)

    def _set(self, job: _Job, state: WorkerState) -> None:
        job.state = advance(WORKER_TRANSITIONS, job.state, state)

    def _can_serve(self, job: _Job) -> bool:
        m = job.sm.manifest
        if exclusion(self._all_free, m.requirements) is not None or self._holds_quota_full(job):
            return False
        return self.ledger.can_hold(job.job_id, m.gpus_per_node)

    def _holds_quota_full(self, job: _Job) -> bool:
        """Whether this node already holds GPUs under unconfirmed leases for
        ``holds_per_submitter_max`` other jobs of this job's submitter."""
        if job.job_id in self.ledger.holds:
            return False
        submitter = job.sm.manifest.submitter
        held = 0
        for job_id, hold in self.ledger.holds.items():
            other = self.jobs.get(job_id)
            if hold.lease_until_ms is not None and other is not None and other.sm.manifest.submitter == submitter:
                held += 1
        return held >= self.config.holds_per_submitter_max

    def _note_volunteer(self, job: _Job, peer_id: str, seq: int, advert: Advert | None = None) -> bool:
        """Remember an eligible volunteer (the caller checked its advert)."""
        if peer_id not in job.volunteers and len(job.volunteers) >= self.config.volunteers_max:
            return False
        if advert is not None:
            job.adverts[peer_id] = advert
        if seq > job.volunteers.get(peer_id, -1):
            job.volunteers[peer_id] = seq
            job.ranks.setdefault(peer_id, leader_rank(job.job_id, peer_id))
            if job.excluded.get(peer_id, seq) < seq:
                del job.excluded[peer_id]  # a newer offer: it has capacity again
            return True
        return False

    def _ranked(self, job: _Job) -> list[str]:
        return sorted(job.volunteers, key=lambda p: job.ranks[p])

    def _volunteer(self, job: _Job, now_ms: int) -> list[Action]:
        """Publish an offer (a fresh one, with a higher seq, when offering again)."""
        job.offer_seq += 1
        job.declined = False
        offer = Offer.sign(self.identity, job_id=job.job_id, seq=job.offer_seq, gpus_free=self.ledger.free,
                           price_per_gpu_hour=self._advert.price_per_gpu_hour, advert=self._signed)
        self._note_volunteer(job, self.peer_id, job.offer_seq)
        job.my_offer = offer
        actions: list[Action] = []
        if not job.subscribed:
            job.subscribed = True
            actions.append(Subscribe(self.config.topic(job.job_id)))
        data = offer.envelope.to_bytes()
        if self.peer_id in job.eager:
            # An expected volunteer tells the other expected volunteers (the
            # view-0 leader among them) and the submitter directly: one hop
            # each, and nobody else has to relay or read it.
            job.offered_to = job.eager[0]
            actions += [Send(p, data) for p in dict.fromkeys([*job.eager, job.sm.manifest.submitter])
                        if p != self.peer_id]
        else:
            actions.append(Publish(self.config.topic(job.job_id), data))
        if job.state is WorkerState.SEEN:
            self._set(job, WorkerState.OFFERED)
            actions.append(SetTimer(self._key(job, "window"), now_ms + self.config.offer_window_ms))
            if self._leader_known(job):
                actions += [CancelTimer(self._key(job, "window"))] + self._enter_view(job, job.view, now_ms)
        return actions

    def _leader_known(self, job: _Job) -> bool:
        """Whether the view-0 leader is settled before the window closes: no
        expected volunteer ranks better than the best volunteer heard so far
        (a better one that is not expected, or late, costs a view change at
        worst)."""
        if not job.eager or not job.volunteers:
            return False
        best = self._ranked(job)[0]
        best_rank = job.ranks[best]
        return all(p in job.volunteers or leader_rank(job.job_id, p) > best_rank for p in job.eager)

    def _t_late(self, job: _Job, now_ms: int) -> list[Action]:
        """A quiet candidate's turn: volunteer unless the job is decided or progressing."""
        if not job.quiet or job.state is not WorkerState.SEEN or job.confirm is not None \
                or now_ms >= job.deadline_ms:
            return []
        # Progress (an eligible, rightful leader's proposal) defers the turn,
        # but never past ``quiet_steps_max`` steps after the manifest: a
        # matching stranger proposing every few hundred ms would otherwise
        # keep every quiet candidate quiet until the job fails.
        latest = job.seen_ms + self.config.quiet_steps_max * self.config.late_volunteer_ms
        if job.progress_ms >= 0 and now_ms < job.progress_ms + self.config.leader_timeout_ms and now_ms < latest:
            return [SetTimer(self._key(job, "late"), min(job.progress_ms + self.config.leader_timeout_ms, latest))]
        job.quiet = False
        if not self._can_serve(job):
            return []
        return [Emit("formation.late_volunteer")] + self._volunteer(job, now_ms)

    def _on_offer(self, job: _Job, offer: Offer, now_ms: int) -> list[Action]:
        if job.state in (WorkerState.RUNNING, WorkerState.CLOSED) or offer.peer_id == self.peer_id:
            return []
        carried = offer.advert.advert
        if job.adverts.get(offer.peer_id) != carried:  # a new advert: does it match the job? (once)
            lie = requirement_fault(carried, job.sm)
            if lie is not None:
                # Its own advert says it cannot serve the job: the offer is a lie.
                raise PeerMisbehaved(Reason.BAD_PROOF, f"offer of {offer.peer_id[:16]}: {lie}")
        if validity_fault(carried, now_ms, network=self.config.network) is not None:
            return [Emit("formation.offer_ineligible")]  # expired, or another network's: nobody's lie
        if not self._note_volunteer(job, offer.peer_id, offer.seq, carried):
            return []
        if job.state is WorkerState.LEADING and job.proposal is None:
            return self._propose(job, now_ms)  # we were waiting for enough volunteers
        if job.state is WorkerState.OFFERED and self._leader_known(job):
            return [CancelTimer(self._key(job, "window"))] + self._enter_view(job, job.view, now_ms)
        return []

    def _t_window(self, job: _Job, now_ms: int) -> list[Action]:
        if job.state is not WorkerState.OFFERED:
            return []
        return self._enter_view(job, job.view, now_ms)

    def _enter_view(self, job: _Job, view: int, now_ms: int) -> list[Action]:
        """Start ``view``: lead it if this node ranks there, else follow."""
        job.view, job.round, job.proposal, job.accepts, job.certified = view, 0, None, {}, None
        # Who declined or stayed silent for the last leader may serve this one
        # (busy then, free now): never carrying exclusions across views keeps
        # a loaded network from excluding everyone (a livelock seen on 16 real nodes).
        job.excluded = {}
        actions: list[Action] = [CancelTimer(self._key(job, "round")),
                                 SetTimer(self._key(job, "view"), now_ms + self.config.leader_timeout_ms)]
        ranked = self._ranked(job)
        leader = ranked[view % len(ranked)]
        if leader == self.peer_id:
            self._set(job, WorkerState.LEADING)
            actions += self._propose(job, now_ms)
        else:
            self._set(job, WorkerState.FOLLOWING)
            if job.my_offer is not None and not (view == 0 and leader == job.offered_to):
                # The leader may have subscribed to the job's topic after our
                # offer went by: hand it over directly, so it knows its volunteers.
                actions.append(Send(leader, job.my_offer.envelope.to_bytes()))
        return actions

    def _t_view(self, job: _Job, now_ms: int) -> list[Action]:
        if job.state not in (WorkerState.FOLLOWING, WorkerState.LEADING, WorkerState.CERTIFIED):
            return []
        if now_ms >= job.deadline_ms or job.view >= views_max:
            return self._close(job, "formation gave up", now_ms) + [Emit("formation.gave_up")]
        actions: list[Action] = [Emit("formation.view_change")]
        if job.my_offer is not None:
            # Something went wrong: ask the submitter too.  If the job was
            # decided while we heard nothing, it answers with its CONFIRM or CANCEL.
            actions.append(Send(job.sm.manifest.submitter, job.my_offer.envelope.to_bytes()))
        return actions + self._enter_view(job, job.view + 1, now_ms)

    # -- leading --------------------------------------------------------------

    def _choose_members(self, job: _Job, now_ms: int) -> list[str]:
        """This leader first (if it can serve), then volunteers in rank order
        starting after the leader, so the silent leaders of earlier views
        (ranked before it) come last; never an excluded peer, nor one whose
        GPU claim this node refused (``claim_fault``)."""
        ranked = self._ranked(job)
        at = ranked.index(self.peer_id) if self.peer_id in ranked else 0
        order = ranked[at + 1:] + ranked[:at]
        # Volunteers whose advert lists the job's image as cached first (a
        # warm start), rank order otherwise: only a tie-breaker among eligible
        # volunteers (core/_matching.warm_first).
        order = warm_first(order, job.adverts, job.sm.manifest.image)
        members = [self.peer_id] if self._can_serve(job) else []
        others = [p for p in order if p != self.peer_id and p not in job.excluded
                  and claim_fault(self.advert_of(job.job_id, p), job.sm, now_ms, self.claims) is None]
        # By standing first (_formation_rules.member_tier), rank order within
        # a tier: a stable sort of a list already in rank order.
        value = job_value(job.sm)
        others.sort(key=lambda p: member_tier(self.standing(p), value))
        members += others
        return members[: job.sm.manifest.members]

    def _propose(self, job: _Job, now_ms: int) -> list[Action]:
        m = job.sm.manifest
        job.quota_held = self._holds_quota_full(job)
        members = self._choose_members(job, now_ms)
        if len(members) < m.members:
            job.proposal = None
            return [Emit("formation.too_few_volunteers")] + self._drop_own_lease(job, now_ms)
        prop = Proposal.sign(self.identity, job_id=job.job_id, view=job.view, round=job.round,
                             members=tuple(members), gpus_per_member=m.gpus_per_node)
        job.proposal, job.accepts = prop, {}
        data = prop.envelope.to_bytes()
        actions: list[Action] = [
            Publish(self.config.topic(job.job_id), data),
            # The members hear it in one hop (the topic copy, a gossip path
            # later, is answered from the same accept at most once per retry
            # interval), and so does the submitter, which can then put the
            # certificate together from the accepts it is also sent.
            *[Send(p, data) for p in dict.fromkeys([*members, m.submitter]) if p != self.peer_id],
            SetTimer(self._key(job, "round"), now_ms + self.config.member_timeout_ms),
            SetTimer(self._key(job, "view"), now_ms + self.config.leader_timeout_ms),
        ]
        if self.peer_id in members:
            actions += self._as_member(job, prop, now_ms)
        return actions

    def _next_round(self, job: _Job, now_ms: int) -> list[Action]:
        job.round += 1
        if job.round >= self.config.rounds_max:
            job.proposal = None
            self._set(job, WorkerState.FOLLOWING)  # the view times out and the next leader tries
            return [Emit("formation.rounds_exhausted")] + self._drop_own_lease(job, now_ms)
        return self._propose(job, now_ms)

    def _drop_own_lease(self, job: _Job, now_ms: int) -> list[Action]:
        """A leader whose own proposal is dead frees the GPUs it held for it.

        Only when every accept it signed for this job was for its own
        proposals, which only it could certify, and it never did: then no
        certificate can name it.  (The hold is one per job, shared by all the
        accepts a node signed for it, so one accept of another leader's
        proposal, which may be certified and confirmed, keeps it.)  Without
        this, two leaders of competing jobs that each hold their own GPU and
        decline the other's proposal would wait for their leases to lapse.
        """
        held = self.ledger.holds.get(job.job_id)
        if job.accepted_leader != self.peer_id or held is None or held.lease_until_ms is None \
                or job.ever_certified or job.accepted_other:
            return []  # a certificate with our accept may still be confirmed: keep the GPUs for it
        gpus = self.ledger.release(job.job_id)
        job.accepted, job.accepted_key, job.accepted_leader = None, None, ""
        actions: list[Action] = [CancelTimer(self._key(job, "lease")),
                                 Released(job.job_id, gpus, "own proposal abandoned", self.ledger.free)]
        return actions + self._capacity_freed(now_ms)

    def _on_accept(self, job: _Job, accept: Accept, now_ms: int) -> list[Action]:
        if job.confirm is not None:
            # Confirmed already: tell the sender, so it starts or lets go.
            return [Send(accept.peer_id, job.confirm.envelope.to_bytes())]
        prop = job.proposal
        if job.state is not WorkerState.LEADING or prop is None or accept.proposal != prop.digest:
            return [Emit("formation.accept_stale")]
        if accept.peer_id not in prop.members:
            raise PeerMisbehaved(Reason.NOT_A_MEMBER, "accept from a peer that was not proposed")
        job.accepts[accept.peer_id] = accept
        if len(job.accepts) < len(prop.members):
            return []
        cert = Certificate(proposal=prop, accepts=tuple(job.accepts[p] for p in prop.members))
        job.certified = Certified.sign(self.identity, cert)
        job.ever_certified = True
        self._set(job, WorkerState.CERTIFIED)
        wait_ms = max(cert.lease_until_ms - self.config.confirm_margin_ms, now_ms + self.config.leader_timeout_ms)
        return [
            CancelTimer(self._key(job, "round")),
            Send(job.sm.manifest.submitter, job.certified.envelope.to_bytes()),
            SetTimer(self._key(job, "retry"), now_ms + self.config.certificate_retry_ms),
            SetTimer(self._key(job, "view"), wait_ms),
            Emit("formation.certified"),
        ]

    def _on_decline(self, job: _Job, decline: Decline, now_ms: int) -> list[Action]:
        prop = job.proposal
        if job.state is not WorkerState.LEADING or prop is None or decline.proposal != prop.digest:
            return [Emit("formation.decline_stale")]
        if decline.peer_id not in prop.members:
            raise PeerMisbehaved(Reason.NOT_A_MEMBER, "decline from a peer that was not proposed")
        job.excluded[decline.peer_id] = job.volunteers.get(decline.peer_id, 0)
        return [Emit("formation.declined")] + self._next_round(job, now_ms)

    def _t_round(self, job: _Job, now_ms: int) -> list[Action]:
        prop = job.proposal
        if job.state is not WorkerState.LEADING or prop is None:
            return []
        for p in prop.members:
            if p not in job.accepts:
                job.excluded[p] = job.volunteers.get(p, 0)
        return [Emit("formation.member_silent")] + self._next_round(job, now_ms)

    # -- following and accepting ----------------------------------------------

    def _preference(self, job: _Job, prop: Proposal) -> tuple[int, bytes, int]:
        """Later views win; in one view the better-ranked leader; then later rounds."""
        rank = job.ranks.get(prop.leader) or leader_rank(job.job_id, prop.leader)
        return (prop.view, bytes(255 - b for b in rank), prop.round)

    def advert_of(self, job_id: str, peer_id: str) -> Advert | None:
        """The advert this node holds of a peer, for a job: its own, the one
        the peer's offer carried, else the driver's book's."""
        if peer_id == self.peer_id:
            return self._advert
        job = self.jobs.get(job_id)
        carried = job.adverts.get(peer_id) if job is not None else None
        return carried if carried is not None else self.lookup(peer_id)

    def _leader_refused(self, job: _Job, prop: Proposal, now_ms: int) -> str | None:
        """Why this node will not follow ``prop`` (``_formation_rules``): its
        leader is no eligible volunteer, or not the rightful leader of its view."""
        if prop.leader == self.peer_id:
            return None
        why = advert_fault(self.advert_of(job.job_id, prop.leader), job.sm, now_ms, network=self.config.network)
        if why is not None:
            return f"leader {prop.leader[:16]}: {why}"
        elapsed = max(now_ms - job.seen_ms, now_ms - job.sm.manifest.created_at_ms)
        return leader_fault(job.job_id, view=prop.view, leader=prop.leader, volunteers=job.volunteers,
                            elapsed_ms=elapsed, leader_timeout_ms=self.config.leader_timeout_ms,
                            rank=lambda p: self._rank(job, p))

    def _rank(self, job: _Job, peer_id: str) -> bytes:
        r = job.ranks.get(peer_id)
        if r is None:
            r = leader_rank(job.job_id, peer_id)
            if len(job.ranks) < self.config.volunteers_max + 1:
                job.ranks[peer_id] = r
        return r

    def _on_proposal(self, job: _Job, prop: Proposal, now_ms: int) -> list[Action]:
        m = job.sm.manifest
        if prop.gpus_per_member != m.gpus_per_node or len(prop.members) != m.members:
            raise PeerMisbehaved(Reason.BAD_SCHEMA, "proposal does not fit the manifest")
        if job.state in (WorkerState.RUNNING, WorkerState.CLOSED):
            return []
        if self._leader_refused(job, prop, now_ms) is not None:
            # Not evidence of progress, and nothing to follow or accept: a
            # stranger's proposals neither reserve our GPUs nor quiet us.
            return [Emit("formation.proposal_refused")]
        job.progress_ms = now_ms
        if job.state is WorkerState.SEEN and job.quiet and prop.view > job.view:
            job.view = prop.view  # should it volunteer later, it joins the view in progress
        if prop.leader == self.peer_id or job.state is WorkerState.SEEN:
            return []
        self._note_volunteer(job, prop.leader, 0)  # eligible: checked above
        actions: list[Action] = []
        if job.state in (WorkerState.LEADING, WorkerState.CERTIFIED):
            mine = job.proposal or (job.certified.certificate.proposal if job.certified is not None else None)
            ours = (job.view, bytes(255 - b for b in job.ranks[self.peer_id]), job.round)
            if mine is not None:
                ours = self._preference(job, mine)
            if self._preference(job, prop) <= ours:
                return self._as_member(job, prop, now_ms)  # ours is preferred; no progress for theirs
            job.proposal, job.certified = None, None
            actions += [CancelTimer(self._key(job, "round")), Emit("formation.stepped_down")]
            self._set(job, WorkerState.FOLLOWING)
        if prop.view >= job.view:
            if job.state is WorkerState.OFFERED:
                self._set(job, WorkerState.FOLLOWING)
                actions.append(CancelTimer(self._key(job, "window")))
            job.view = prop.view
            actions.append(SetTimer(self._key(job, "view"), now_ms + self.config.leader_timeout_ms))
        return actions + self._as_member(job, prop, now_ms)

    def _as_member(self, job: _Job, prop: Proposal, now_ms: int) -> list[Action]:
        """Reserve under a lease and accept, or decline; at most one hold per job."""
        if self.peer_id not in prop.members:
            return []
        key = self._preference(job, prop)
        if job.accepted is not None:
            if job.accepted.proposal == prop.digest:
                if 0 <= job.accept_sent_ms and now_ms - job.accept_sent_ms < self.config.accept_retry_ms // 2:
                    return []  # the same proposal again (the topic's copy of a direct one): answered
                job.accept_sent_ms = now_ms
                return self._send_accept(job, job.accepted)  # a repeat: same answer
            if job.accepted_key is not None and key <= job.accepted_key:
                return [Emit("formation.proposal_superseded")]
        lease_until = now_ms + self.config.lease_ms
        if self._holds_quota_full(job) or not self.ledger.reserve(job.job_id, prop.gpus_per_member, lease_until):
            job.declined = True
            decline = Decline.sign(self.identity, job_id=job.job_id, view=prop.view, round=prop.round,
                                   proposal=prop.digest, reason="no free capacity")
            if prop.leader == self.peer_id:
                return self._on_decline(job, decline, now_ms)
            return [Send(prop.leader, decline.envelope.to_bytes()), Emit("formation.decline_sent")]
        accept = Accept.sign(self.identity, proposal=prop, lease_until_ms=lease_until,
                             price_per_gpu_hour=self._advert.price_per_gpu_hour,
                             payout_address=self._advert.payout_address)
        job.accepted, job.accepted_key, job.accepted_leader = accept, key, prop.leader
        job.accepted_other = job.accepted_other or prop.leader != self.peer_id
        actions: list[Action] = [
            Reserved(job.job_id, prop.gpus_per_member, lease_until, self.ledger.free),
            SetTimer(self._key(job, "lease"), lease_until + self.config.lease_grace_ms),
        ]
        if prop.leader == self.peer_id:
            if job.sm.manifest.submitter != self.peer_id:
                actions.append(Send(job.sm.manifest.submitter, accept.envelope.to_bytes()))
            return actions + self._on_accept(job, accept, now_ms)
        actions.append(SetTimer(self._key(job, "retry"), now_ms + self.config.accept_retry_ms))
        job.accept_sent_ms = now_ms
        return actions + self._send_accept(job, accept)

    def _send_accept(self, job: _Job, accept: Accept) -> list[Action]:
        data = accept.envelope.to_bytes()
        out: list[Action] = []
        if job.accepted_leader != self.peer_id:
            out.append(Send(job.accepted_leader, data))
        # The submitter learns progress, and answers with its CONFIRM if it has one.
        out.append(Send(job.sm.manifest.submitter, data))
        return out

    def _t_retry(self, job: _Job, now_ms: int) -> list[Action]:
        if job.state in (WorkerState.RUNNING, WorkerState.CLOSED, WorkerState.SEEN):
            return []
        out: list[Action] = []
        if job.state is WorkerState.CERTIFIED and job.certified is not None:
            out.append(Send(job.sm.manifest.submitter, job.certified.envelope.to_bytes()))
        held = self.ledger.holds.get(job.job_id)
        if job.accepted is not None and held is not None and job.accepted_leader != self.peer_id:
            out += self._send_accept(job, job.accepted)
        if out:
            out.append(SetTimer(self._key(job, "retry"), now_ms + min(self.config.accept_retry_ms,
                                                                       self.config.certificate_retry_ms)))
        return out

    def _t_lease(self, job: _Job, now_ms: int) -> list[Action]:
        held = self.ledger.holds.get(job.job_id)
        if held is None or held.lease_until_ms is None:
            return []
        if now_ms < held.lease_until_ms + self.config.lease_grace_ms:
            return [SetTimer(self._key(job, "lease"), held.lease_until_ms + self.config.lease_grace_ms)]
        gpus = self.ledger.release(job.job_id)
        job.accepted, job.accepted_key = None, None
        return [Released(job.job_id, gpus, "lease expired", self.ledger.free)] + self._capacity_freed(now_ms)

    # -- confirmation, cancel, the end ----------------------------------------

    def _on_confirm(self, job: _Job, confirm: Confirm, now_ms: int) -> list[Action]:
        m = job.sm.manifest
        if confirm.submitter != m.submitter:
            raise PeerMisbehaved(Reason.SIGNER_MISMATCH, "confirm not signed by the job's submitter")
        cert = confirm.certificate
        if job.confirm is not None:
            if job.confirm.certificate.digest != cert.digest:
                raise PeerMisbehaved(Reason.CONFLICT, "the submitter confirmed two certificates")
            return []
        if job.state is WorkerState.CLOSED:
            return []
        job.confirm = confirm
        actions: list[Action] = [CancelTimer(self._key(job, k)) for k in ("window", "view", "round", "retry")]
        if self.peer_id not in cert.members:
            return actions + self._close(job, "another cluster was confirmed", now_ms)
        held_before = job.job_id in self.ledger.holds
        if not self.ledger.reserve(job.job_id, m.gpus_per_node, now_ms):
            decline = Decline.sign(self.identity, job_id=job.job_id, view=cert.proposal.view,
                                   round=cert.proposal.round, proposal=cert.proposal.digest,
                                   reason="lease expired and the GPUs are taken")
            return actions + [Send(m.submitter, decline.envelope.to_bytes()), Emit("formation.member_lost")] + \
                self._close(job, "lease expired before the confirmation", now_ms)
        self.ledger.run(job.job_id)
        self._set(job, WorkerState.RUNNING)
        if not held_before:
            # The lease had lapsed (and was released) but the GPUs were still
            # free: the driver must learn that they are taken again.
            actions.append(Reserved(job.job_id, m.gpus_per_node, now_ms, self.ledger.free))
        until = now_ms + m.duration_s_max * 1000 + self.config.run_grace_ms
        return actions + [
            CancelTimer(self._key(job, "lease")),
            SetTimer(self._key(job, "run"), until),
            StartJob(job.job_id, job.sm, cert, cert.members.index(self.peer_id), confirm.envelope.to_bytes()),
        ] + self._capacity_freed(now_ms)  # no longer an unconfirmed hold: the submitter's other jobs may have one

    def _on_cancel(self, job: _Job, cancel: Cancel, now_ms: int) -> list[Action]:
        if cancel.submitter != job.sm.manifest.submitter:
            raise PeerMisbehaved(Reason.SIGNER_MISMATCH, "cancel not signed by the job's submitter")
        if job.state is WorkerState.CLOSED:
            return []
        if job.state is WorkerState.RUNNING:
            return self._stop_running(job, StopJob(job.job_id, "cancelled"), now_ms)
        return self._close(job, "cancelled", now_ms)

    def _stop_running(self, job: _Job, stop: StopJob, now_ms: int) -> list[Action]:
        """Stop a job running here.  Its GPUs stay held until the driver says
        its run has ended (:meth:`finish`), or ``stop_grace_ms`` at most: a
        sandbox being stopped still holds them, and freeing them at the stop
        order promised them to the next job while the runner still had them
        (a job confirmed right after a cancel was refused "1 GPUs asked, 0
        free here")."""
        if job.stopping:
            return []
        job.stopping = True
        return [stop, SetTimer(self._key(job, "stop"), now_ms + self.config.stop_grace_ms)]

    def _t_run(self, job: _Job, now_ms: int) -> list[Action]:
        if job.state is not WorkerState.RUNNING:
            return []
        return self._stop_running(job, StopJob(job.job_id, "past duration_s_max", "time_limit"), now_ms)

    def _t_stop(self, job: _Job, now_ms: int) -> list[Action]:
        """The run was told to stop ``stop_grace_ms`` ago and the driver never
        said it ended: free its GPUs anyway (a bounded hold, not a leak)."""
        if job.state is not WorkerState.RUNNING:
            return []
        actions = self._close(job, "stopped, its end never reported", now_ms)
        self._forget(job.job_id)
        return actions

    def _t_end(self, job: _Job, now_ms: int) -> list[Action]:
        if job.state is WorkerState.RUNNING:
            return []  # the run timer or finish() removes it
        actions = self._close(job, "formation over", now_ms) if job.state is not WorkerState.CLOSED else []
        self._forget(job.job_id)
        return actions

    def _close(self, job: _Job, reason: str, now_ms: int) -> list[Action]:
        self._set(job, WorkerState.CLOSED)
        self._closed[job.job_id] = None
        if job.counted:
            job.counted = False
            self.admission.close(job.sm)
        actions: list[Action] = [CancelTimer(self._key(job, k)) for k in ("window", "view", "round", "retry",
                                                                          "lease", "run", "late", "stop")]
        if job.subscribed:
            job.subscribed = False
            actions.append(Unsubscribe(self.config.topic(job.job_id)))
        gpus = self.ledger.release(job.job_id)
        if gpus:
            actions.append(Released(job.job_id, gpus, reason, self.ledger.free))
            actions += self._capacity_freed(now_ms)
        return actions

    def _capacity_freed(self, now_ms: int) -> list[Action]:
        """GPUs came free (or a submitter's unconfirmed hold was confirmed):
        volunteer for jobs still forming that this node passed over or
        declined (offers are not binding), and propose for jobs it leads but
        could not propose for.  At most ``holds_per_submitter_max`` jobs per
        submitter in one pass: a flood of one submitter's jobs does not get
        an offer each every time a GPU comes free."""
        actions: list[Action] = []
        per_submitter: dict[str, int] = {}
        for job_id in sorted(self.jobs):
            job = self.jobs[job_id]
            if now_ms >= job.deadline_ms or job.confirm is not None:
                continue
            submitter = job.sm.manifest.submitter
            if per_submitter.get(submitter, 0) >= self.config.holds_per_submitter_max:
                continue
            idle_leader = job.state is WorkerState.LEADING and job.proposal is None and job.quota_held
            again = (job.state is WorkerState.SEEN and not job.quiet) or (job.declined and job.state in (
                WorkerState.FOLLOWING, WorkerState.LEADING, WorkerState.OFFERED))
            if (again or idle_leader) and self._can_serve(job):
                per_submitter[submitter] = per_submitter.get(submitter, 0) + 1
                actions += self._volunteer(job, now_ms) if again else self._propose(job, now_ms)
        return actions
