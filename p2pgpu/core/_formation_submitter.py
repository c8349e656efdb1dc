"""Cluster formation, the submitter's side: publish, confirm exactly once, cancel.

:class:`Submitter` is the pure core of a node that submits jobs.  It
publishes the signed manifest, follows offers and accepts as progress, and
confirms the *first* valid certificate for each job: every member's accept
verifies over the same proposal, the membership fits the manifest, prices are
within its ceiling, and the leases last long enough to reach the members.
Every later certificate for that job is refused, so at most one cluster per
job ever starts; a peer that still asks (a late leader, a member retrying its
accept, a late volunteer) is answered with the CONFIRM, so it starts or lets
go.  If no certificate comes within ``formation_timeout_ms`` (or before the
manifest expires) the job fails with a reason a person can read, and a signed
CANCEL frees whatever volunteers hold.  Same input, same output: no clock, no
randomness.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ._actions import (
    Action,
    Cancelled,
    CancelTimer,
    Confirmed,
    Emit,
    Failed,
    MemberLost,
    Publish,
    Send,
    SetTimer,
    Subscribe,
    TimerKey,
    TimerOwner,
    Unsubscribe,
)
from ._advert import Advert
from ._errors import LocalProtocolError, PeerMisbehaved, Reason
from ._formation import DEFAULT_CONFIG, FormationConfig, expected_volunteers, leader_rank
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
)
from ._formation_rules import (
    AdvertLookup,
    ClaimView,
    Refusal,
    advert_fault,
    believe_all,
    claim_fault,
    leader_fault,
)
from ._formation_states import SUBMITTER_TRANSITIONS, SubmitterState, advance
from ._identity import Identity
from ._manifest import SignedManifest


@dataclass(frozen=True, slots=True)
class JobProgress:
    """What ``job status`` and ``job submit --wait`` show about a submitted job."""

    job_id: str
    state: SubmitterState
    submitted_at_ms: int
    deadline_ms: int
    members_needed: int
    offers: int
    accepts: int
    views_seen: int
    certificates_refused: int
    members: tuple[str, ...]
    certificate_digest: str
    confirmed_at_ms: int | None
    reason: str
    lost_members: tuple[str, ...]
    #: Why the last certificate was refused ("" if none was).
    refusal: str = ""
    #: The same as a code (``Refusal``; ``None`` if none was refused, or it was
    #: refused for a peer's fault, which raised instead).
    refusal_code: Refusal | None = None


@dataclass(slots=True)
class _Submitted:
    sm: SignedManifest
    state: SubmitterState
    submitted_at_ms: int
    deadline_ms: int
    offers: dict[str, int] = field(default_factory=dict)
    accepts: dict[str, int] = field(default_factory=dict)
    views_seen: int = 0
    refused: int = 0
    manifest_sends: int = 1
    confirm: Confirm | None = None
    cancel: Cancel | None = None
    confirmed_at_ms: int | None = None
    reason: str = ""
    lost: list[str] = field(default_factory=list)
    answered_at: dict[str, int] = field(default_factory=dict)
    #: Proposals heard (by digest, the latest few) and the accepts of them, so
    #: the submitter can put a certificate together itself when the last
    #: accept reaches it before the leader's ``Certified`` does.
    proposals: dict[bytes, Proposal] = field(default_factory=dict)
    accepted: dict[bytes, dict[str, Accept]] = field(default_factory=dict)
    #: The eligible volunteers' adverts, as their offers carried them (keys:
    #: the volunteers the rightful-leader rule counts).
    adverts: dict[str, Advert] = field(default_factory=dict)
    refusal: str = ""
    refusal_code: Refusal | None = None
    #: The job ran and was settled (the host says so): nothing more to do for it.
    settled: bool = False

    @property
    def over(self) -> bool:
        """Nothing more can happen to the job: it failed, was cancelled, or ran and settled."""
        return self.state in (SubmitterState.FAILED, SubmitterState.CANCELLED) or self.settled

    def forget_at_ms(self, config: FormationConfig) -> int:
        """When every volunteer's formation core has let the job go (its end
        timer: the deadline plus a lease and its grace): until then the
        submitter answers late leaders and members with the CONFIRM or CANCEL."""
        return self.deadline_ms + config.lease_ms + config.lease_grace_ms


#: Proposals a submitter keeps per job for assembling certificates itself,
#: and the proposal digests it keeps accepts for.
proposals_kept_max = 16
accepted_digests_max = 64


class Submitter:
    """The submitter's formation core for the jobs this node published.

    :meth:`submit` a signed manifest; feed :meth:`on_message` the messages that
    reach this node (direct streams and the per-job topic); :meth:`on_timer` its
    timers (``TimerKey`` owned by ``TimerOwner.SUBMITTER``); :meth:`cancel` on ``job cancel``;
    read :meth:`progress`.
    """

    def __init__(self, identity: Identity, config: FormationConfig = DEFAULT_CONFIG, *,
                 adverts: AdvertLookup | None = None, claims: ClaimView | None = None) -> None:
        """``adverts`` finds a peer's advert (the driver's advert book); with
        the ones offers carry, it decides who may be in a confirmed cluster
        and who may lead it (``_formation_rules``).  ``claims``: this node's
        hardware-challenge verdicts; a certificate naming a member whose
        claim the job needs was refused is refused (``Refusal.CLAIM_REFUSED``)."""
        self.identity = identity
        self.peer_id = identity.peer_id
        self.config = config
        self.lookup: AdvertLookup = adverts or (lambda _peer: None)
        self.claims: ClaimView = claims or believe_all
        self.jobs: dict[str, _Submitted] = {}

    def _key(self, job_id: str, name: str) -> TimerKey:
        return TimerKey(TimerOwner.SUBMITTER, job_id, name)

    def _set(self, job: _Submitted, state: SubmitterState) -> None:
        job.state = advance(SUBMITTER_TRANSITIONS, job.state, state)

    # -- local calls ----------------------------------------------------------

    def submit(self, sm: SignedManifest, now_ms: int, candidates: list[str] | None = None) -> list[Action]:
        """Publish a job.  With ``candidates`` (the peers the advert book says
        can serve it), the manifest also goes directly to the ones expected to
        volunteer first (:func:`expected_volunteers`): one hop instead of a
        gossip path on formation's critical path."""
        if sm.manifest.submitter != self.peer_id:
            raise LocalProtocolError("this node did not sign that manifest")
        self._make_room(sm)
        deadline = min(sm.manifest.expires_at_ms, now_ms + self.config.formation_timeout_ms)
        self.jobs[sm.job_id] = _Submitted(sm=sm, state=SubmitterState.PUBLISHED, submitted_at_ms=now_ms,
                                          deadline_ms=deadline)
        return self._publish(sm, deadline, now_ms, candidates)

    def resume(self, sm: SignedManifest, submitted_at_ms: int, now_ms: int,
               candidates: list[str] | None = None) -> list[Action]:
        """Take up again a job this node submitted before it restarted and
        never confirmed (the driver stored it as forming: the confirmation is
        stored before it can leave, so no cluster of it can be running).

        Its volunteers still hold GPUs for it under leases and resend their
        certificates to us; a submitter that forgot the job answered none of
        them, so those GPUs stayed held until the job's formation deadline and
        (``holds_per_submitter_max``) no volunteer would take this node's next
        job either (#13: a restarted submitter's first job reached no
        volunteer).  Resumed, the job is published again and confirmed as if
        nothing had happened, within its original deadline; past it, it fails
        now and its CANCEL frees the volunteers (and answers the late ones)."""
        if sm.manifest.submitter != self.peer_id:
            raise LocalProtocolError("this node did not sign that manifest")
        if sm.job_id in self.jobs:
            return []
        self._make_room(sm)
        deadline = min(sm.manifest.expires_at_ms, submitted_at_ms + self.config.formation_timeout_ms)
        job = _Submitted(sm=sm, state=SubmitterState.PUBLISHED, submitted_at_ms=submitted_at_ms,
                         deadline_ms=deadline)
        self.jobs[sm.job_id] = job
        if now_ms < deadline:
            return [Emit("formation.resumed")] + self._publish(sm, deadline, now_ms, candidates)
        job.reason = "the submitter restarted while the job was forming, and its time to form ran out"
        actions = self._withdraw(job, "the submitter restarted", now_ms)
        self._set(job, SubmitterState.FAILED)
        return actions + [Failed(sm.job_id, job.reason)]

    def restore_confirmed(self, sm: SignedManifest, certificate: Certificate, confirmed_at_ms: int) -> list[Action]:
        """After a restart: a job this node confirmed (the driver stored the
        certificate and the confirmation time before the CONFIRM could leave)
        is known again as confirmed, so that a member still asking (its
        CONFIRM lost when we died: it holds GPUs under a lease and resends its
        accept or certificate) is answered with it, as before the restart.
        The CONFIRM is signed again over the same certificate and time: the
        same bytes (Ed25519 is deterministic), never a second decision.
        Without it such a member held the GPUs until the formation deadline
        and, at ``holds_per_submitter_max``, took none of our next jobs (#13)."""
        if sm.manifest.submitter != self.peer_id or certificate.job_id != sm.job_id:
            raise LocalProtocolError("not a job this node submitted, or another job's certificate")
        if sm.job_id in self.jobs:
            return []
        self._make_room(sm)
        m = sm.manifest
        job = _Submitted(sm=sm, state=SubmitterState.PUBLISHED, submitted_at_ms=m.created_at_ms,
                         deadline_ms=min(m.expires_at_ms, m.created_at_ms + self.config.formation_timeout_ms))
        job.confirm = Confirm.sign(self.identity, certificate, confirmed_at_ms=confirmed_at_ms)
        job.confirmed_at_ms = confirmed_at_ms
        self._set(job, SubmitterState.CONFIRMED)
        self.jobs[sm.job_id] = job
        return self.decided(sm.job_id)

    def _make_room(self, sm: SignedManifest) -> None:
        if sm.job_id in self.jobs:
            raise LocalProtocolError("job already submitted")
        if len(self.jobs) >= self.config.jobs_max:
            # Full: the oldest job that already ended (failed or cancelled) goes
            # first; jobs still forming or running never do.
            done = next((j for j, s in self.jobs.items() if s.over), None)
            if done is None:
                raise LocalProtocolError(f"{len(self.jobs)} jobs of this node are forming or running: "
                                         "wait for some to end")
            self.forget(done)

    def _publish(self, sm: SignedManifest, deadline_ms: int, now_ms: int,
                 candidates: list[str] | None) -> list[Action]:
        direct = [] if candidates is None else [
            Send(p, sm.wire) for p in expected_volunteers(sm, candidates, self.config) if p != self.peer_id]
        return [
            Subscribe(self.config.topic(sm.job_id)),
            *direct,
            Publish(self.config.jobs_topic, sm.wire),
            SetTimer(self._key(sm.job_id, "end"), deadline_ms),
            SetTimer(self._key(sm.job_id, "republish"), now_ms + self.config.manifest_retry_ms),
        ]

    def cancel(self, job_id: str, now_ms: int, reason: str = "cancelled by the submitter") -> list[Action]:
        job = self.jobs.get(job_id)
        if job is None:
            raise LocalProtocolError(f"no job {job_id[:12]} was submitted here")
        if job.state not in (SubmitterState.PUBLISHED, SubmitterState.CONFIRMED) or job.settled:
            return []  # it already ended: cancelling must not rewrite its outcome
        actions = self._withdraw(job, reason, now_ms)
        self._set(job, SubmitterState.CANCELLED)
        return actions + [Cancelled(job_id, reason)]

    def decided(self, job_id: str) -> list[Action]:
        """The job was confirmed, failed or cancelled: forget it once no
        volunteer works on it any more (and, if it ran, once it is settled)."""
        job = self.jobs.get(job_id)
        if job is None:
            return []
        return [SetTimer(self._key(job_id, "forget"), job.forget_at_ms(self.config))]

    def settled(self, job_id: str, now_ms: int) -> None:
        """The job ran and was settled: forgotten now if its forget time passed."""
        job = self.jobs.get(job_id)
        if job is None:
            return
        job.settled = True
        if now_ms >= job.forget_at_ms(self.config):
            self.forget(job_id)

    def forget(self, job_id: str) -> None:
        """Drop a finished job's record (the driver keeps its own history).
        The core host calls it when the job is settled, or a while after it
        failed or was cancelled."""
        self.jobs.pop(job_id, None)

    def progress(self, job_id: str) -> JobProgress | None:
        job = self.jobs.get(job_id)
        if job is None:
            return None
        cert = job.confirm.certificate if job.confirm is not None else None
        return JobProgress(
            job_id=job_id, state=job.state, submitted_at_ms=job.submitted_at_ms, deadline_ms=job.deadline_ms,
            members_needed=job.sm.manifest.members, offers=len(job.offers), accepts=len(job.accepts),
            views_seen=job.views_seen, certificates_refused=job.refused,
            members=cert.members if cert is not None else (), certificate_digest=cert.digest.hex() if cert else "",
            confirmed_at_ms=job.confirmed_at_ms, reason=job.reason, lost_members=tuple(job.lost),
            refusal=job.refusal, refusal_code=job.refusal_code,
        )

    # -- timers ---------------------------------------------------------------

    def on_timer(self, key: TimerKey, now_ms: int) -> list[Action]:
        if key.owner is not TimerOwner.SUBMITTER or key.name not in ("republish", "end", "forget"):
            raise LocalProtocolError(f"not a submitter timer: {key}")
        if key.name == "forget":
            # Set when the job was decided, for when no volunteer still works on it.
            forgotten = self.jobs.get(key.job_id)
            if forgotten is not None and forgotten.over:
                self.forget(key.job_id)
            return []
        job = self.jobs.get(key.job_id)
        if job is None or job.state is not SubmitterState.PUBLISHED:
            return []
        if key.name == "republish":
            if len(job.offers) >= job.sm.manifest.members or job.manifest_sends > self.config.manifest_retries_max:
                return []
            job.manifest_sends += 1
            return [Publish(self.config.jobs_topic, job.sm.wire), Emit("formation.manifest_republished"),
                    SetTimer(key, now_ms + self.config.manifest_retry_ms)]
        if now_ms < job.deadline_ms:
            return [SetTimer(key, job.deadline_ms)]
        need = job.sm.manifest.members
        reason = (f"no cluster formed within {(job.deadline_ms - job.submitted_at_ms) // 1000} s: "
                  f"{len(job.offers)} matching peers with free GPUs offered, {need} needed")
        if len(job.offers) >= need:
            reason += f"; {len(job.accepts)} accepted (the others were busy or unreachable)"
        job.reason = reason
        actions = self._withdraw(job, "formation timed out", now_ms)
        self._set(job, SubmitterState.FAILED)
        return actions + [Failed(job.sm.job_id, reason)]

    def _withdraw(self, job: _Submitted, reason: str, now_ms: int) -> list[Action]:
        job_id = job.sm.job_id
        job.cancel = Cancel.sign(self.identity, job_id=job_id, reason=reason, cancelled_at_ms=now_ms)
        data = job.cancel.envelope.to_bytes()
        actions: list[Action] = [Publish(self.config.topic(job_id), data)]
        if job.confirm is not None:
            actions += [Send(m, data) for m in job.confirm.certificate.members]
        return actions + [CancelTimer(self._key(job_id, "end")), CancelTimer(self._key(job_id, "republish")),
                          Unsubscribe(self.config.topic(job_id))]

    # -- messages -------------------------------------------------------------

    def on_message(self, msg: Message, now_ms: int) -> list[Action]:
        """Handle one verified message; ``PeerMisbehaved`` for a peer's fault."""
        if isinstance(msg, SignedManifest):
            return []
        job = self.jobs.get(msg.job_id)
        if job is None:
            return []  # not ours (the node's FormationNode handles it)
        if isinstance(msg, Certified):
            return self._on_certified(job, msg, now_ms)
        if isinstance(msg, Offer):
            if msg.peer_id not in job.offers and len(job.offers) >= self.config.volunteers_max:
                return []
            if advert_fault(msg.advert.advert, job.sm, now_ms, network=self.config.network) is not None:
                return [Emit("formation.offer_ineligible")] + self._answer(job, msg.peer_id, now_ms)
            job.offers[msg.peer_id] = max(msg.seq, job.offers.get(msg.peer_id, 0))
            job.adverts[msg.peer_id] = msg.advert.advert
            return self._answer(job, msg.peer_id, now_ms)
        if isinstance(msg, Accept):
            if job.state is SubmitterState.PUBLISHED and len(job.accepts) < self.config.volunteers_max:
                job.accepts[msg.peer_id] = msg.view
            known = job.accepted.get(msg.proposal)
            if job.state is SubmitterState.PUBLISHED and (known is not None or
                                                          len(job.accepted) < accepted_digests_max):
                # Bounded: accepts of at most accepted_digests_max proposals (a
                # proposal may arrive after its accepts), members-many each.
                byp = job.accepted.setdefault(msg.proposal, {})
                prop = job.proposals.get(msg.proposal)
                if prop is not None and msg.peer_id not in prop.members:
                    return self._answer(job, msg.peer_id, now_ms)
                if len(byp) < job.sm.manifest.members and msg.peer_id not in byp:
                    byp[msg.peer_id] = msg
                    return self._assemble(job, msg.proposal, now_ms)
            return self._answer(job, msg.peer_id, now_ms)
        if isinstance(msg, Decline):
            cert = job.confirm.certificate if job.confirm is not None else None
            if cert is not None and msg.peer_id in cert.members and msg.proposal == cert.proposal.digest \
                    and msg.peer_id not in job.lost:
                job.lost.append(msg.peer_id)
                return [MemberLost(job.sm.job_id, msg.peer_id, msg.reason)]
            return []
        if isinstance(msg, Proposal):
            job.views_seen = max(job.views_seen, msg.view + 1)
            if job.state is SubmitterState.PUBLISHED and msg.digest not in job.proposals:
                if len(job.proposals) >= proposals_kept_max:
                    oldest = next(iter(job.proposals))
                    del job.proposals[oldest]
                    job.accepted.pop(oldest, None)
                job.proposals[msg.digest] = msg
                return self._assemble(job, msg.digest, now_ms)
            return self._answer(job, msg.leader, now_ms)
        return []  # a Confirm or Cancel: ours, echoed back

    def _answer(self, job: _Submitted, peer_id: str, now_ms: int) -> list[Action]:
        """Tell a peer still working on a decided job how it ended (rate-limited)."""
        final = job.confirm if job.state is SubmitterState.CONFIRMED else job.cancel
        if final is None:
            return []
        last = job.answered_at.get(peer_id)
        if last is not None and now_ms - last < self.config.accept_retry_ms // 2:
            return []
        if last is None and len(job.answered_at) >= self.config.volunteers_max:
            return []
        job.answered_at[peer_id] = now_ms
        return [Send(peer_id, final.envelope.to_bytes())]

    def advert_of(self, job_id: str, peer_id: str) -> Advert | None:
        """A peer's advert for one of our jobs: the one its offer carried, else the book's."""
        job = self.jobs.get(job_id)
        carried = job.adverts.get(peer_id) if job is not None else None
        return carried if carried is not None else self.lookup(peer_id)

    def _check(self, job: _Submitted, cert: Certificate, now_ms: int) -> tuple[Refusal, str] | None:
        """Why a certificate can't be confirmed (``None`` if it can); raises for a peer's fault.

        Besides its fit, prices and leases: every member and the leader are
        eligible volunteers (their signed adverts match the job), and the
        leader is the rightful leader of the proposal's view as far as the
        volunteers we heard tell (``_formation_rules``).  Those two refuse
        without blame: we may lack an advert, or know a volunteer the leader
        did not.  Nor is a member whose GPU claim our hardware challenge
        refused (``claim_fault``): without blame either, since the leader may
        believe the claim (it has not challenged it, or it passed there)."""
        m = job.sm.manifest
        if len(cert.members) != m.members or cert.proposal.gpus_per_member != m.gpus_per_node:
            raise PeerMisbehaved(Reason.BAD_PROOF, "certificate does not fit the manifest")
        for a in cert.accepts:
            if a.price_per_gpu_hour > m.price_per_gpu_hour_max:
                raise PeerMisbehaved(Reason.BAD_PROOF, f"{a.peer_id[:16]} asks more than the price ceiling")
        if cert.lease_until_ms < now_ms + self.config.confirm_margin_ms:
            return Refusal.LEASES, "leases too short"
        job_id = job.sm.job_id
        for role, peer in [*(("member", p) for p in cert.members), ("leader", cert.leader)]:
            why = advert_fault(self.advert_of(job_id, peer), job.sm, now_ms, network=self.config.network)
            if why is not None:
                return Refusal.INELIGIBLE, f"{role} {peer[:16]}: {why}"
        for peer in cert.members:
            why = claim_fault(self.advert_of(job_id, peer), job.sm, now_ms, self.claims)
            if why is not None:
                return Refusal.CLAIM_REFUSED, f"member {peer[:16]}: {why}"
        why = leader_fault(job_id, view=cert.proposal.view, leader=cert.leader, volunteers=job.adverts,
                           elapsed_ms=now_ms - job.submitted_at_ms, leader_timeout_ms=self.config.leader_timeout_ms,
                           rank=lambda p: leader_rank(job_id, p))
        return None if why is None else (Refusal.NOT_THE_LEADER, why)

    def _assemble(self, job: _Submitted, digest: bytes, now_ms: int) -> list[Action]:
        """Confirm a certificate made of a proposal and all its members' accepts,
        when they are all here: the accepts travel to the submitter as well as
        to the leader, so the submitter need not wait for the leader's
        ``Certified`` (one hop less).  Safety is the same: what makes a
        certificate is every member's signed accept of that membership."""
        prop = job.proposals.get(digest)
        got = job.accepted.get(digest, {})
        if prop is None:
            return []
        for p in [p for p in got if p not in prop.members]:
            del got[p]  # arrived before the proposal, from a peer it does not name
        if any(m not in got for m in prop.members):
            return []
        if len(prop.members) != job.sm.manifest.members or prop.gpus_per_member != job.sm.manifest.gpus_per_node:
            return []  # the leader's proposal does not fit: its Certified would be refused as well
        for p in prop.members:
            a = got[p]
            if (a.job_id, a.view, a.round, a.gpus) != (prop.job_id, prop.view, prop.round, prop.gpus_per_member):
                del got[p]  # signed for a proposal with the same digest but other terms: not ours to use
                return []
        cert = Certificate(proposal=prop, accepts=tuple(got[p] for p in prop.members))
        try:
            actions = self._confirm_if_ok(job, cert, now_ms)
        except PeerMisbehaved:
            # The fault is the leader's or a member's, not necessarily the sender's
            # of the message that completed the set: refuse, blame nobody here
            # (the leader's own Certified is judged, and blamed, on arrival).
            job.refused += 1
            return [Emit("formation.certificate_refused")]
        return [Emit("formation.assembled")] + actions

    def _on_certified(self, job: _Submitted, msg: Certified, now_ms: int) -> list[Action]:
        cert = msg.certificate
        if job.state is not SubmitterState.PUBLISHED:
            if job.confirm is not None and job.confirm.certificate.digest != cert.digest:
                job.refused += 1
                return [Emit("formation.certificate_refused")] + self._answer(job, cert.leader, now_ms)
            return self._answer(job, cert.leader, now_ms)
        return self._confirm_if_ok(job, cert, now_ms)

    def _confirm_if_ok(self, job: _Submitted, cert: Certificate, now_ms: int) -> list[Action]:
        refused = self._check(job, cert, now_ms)
        if refused is not None:
            job.refused += 1
            job.refusal_code, job.refusal = refused
            return [Emit("formation.certificate_refused")]
        confirm = Confirm.sign(self.identity, cert, confirmed_at_ms=now_ms)
        job.confirm, job.confirmed_at_ms = confirm, now_ms
        self._set(job, SubmitterState.CONFIRMED)
        data = confirm.envelope.to_bytes()
        job_id = job.sm.job_id
        return [
            CancelTimer(self._key(job_id, "end")),
            CancelTimer(self._key(job_id, "republish")),
            Publish(self.config.topic(job_id), data),
            *[Send(p, data) for p in cert.members],
            Confirmed(job_id, cert, data),
        ]
