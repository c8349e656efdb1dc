"""The core host: one node's whole job protocol, bytes and timer firings in, actions out.

A driver (the libp2p node, the simulator, a test swarm) holds one
:class:`Host` per node and does only this: it hands the host every message
that reaches the node (:meth:`Host.on_bytes`, saying whether it came on a
topic, a direct stream, or from the node itself), every timer that fires
(:meth:`Host.on_timer`, with the typed key the host asked for) and the
node's local events (its own advert, a job submitted or cancelled, a job's
part started or ended, a balance looked up), and it carries out the actions
that come back: it sends and publishes, sets timers, persists, runs
processes and pays.  It decides nothing about a job: every rule is here or
in the cores below, so the simulator runs exactly the protocol the node
runs, and a recorded sequence of inputs gives the same actions in both.

What the host owns:

- **Manifest de-duplication**: a manifest that the node's formation core
  already tracks (a republish, the same manifest directly and by gossip) is
  dropped before any core sees it; one it forgot is refused as ``REPLAYED``
  by the core's replay guard.
- **A fixed dispatch order**: a formation message goes to the submitter core
  (if the job is ours), then to the worker's formation core; a heartbeat to
  the membership core of that job; a proof, co-signature, outputs list or
  log batch to settlement; a ``proof_ack`` to the deliveries of what we
  ran.  Each sub-core's refusal is handled on its own: one core refusing
  does not keep the next from seeing the message, and every refusal comes
  back as a ``Refused`` action (the driver turns the first into a gossip
  verdict, ``core/_verdict.py``).  A message the host itself produced for its
  own node (a ``Send`` to itself, the submitter's publish of its own
  manifest) is handled here at once, in order, never by the driver.
- **The payer gate** (on a shared ledger): a stranger's manifest waits for
  its payer's balance (``CheckBalance``; the driver answers with
  :meth:`Host.on_balance`), and a payer that cannot pay for it and its other
  open jobs here gets no volunteer.
- **The member's side of a running job**: a ``Membership`` (heartbeats, loss
  detection, the loss policy) from ``StartJob`` until the co-signatures are
  handed over; the proof built from what the driver measured
  (:func:`~p2pgpu.core._member.member_proof`); the deliveries to the
  submitter, resent until acknowledged.
- **The submitter's side**: ``Settlement`` opens when the job is confirmed
  and settles it; the submitter core forgets each job once no volunteer can
  still be working on it (and, if it ran, once it settled), so a
  long-running daemon never fills its table (it once refused every
  ``job submit`` after 1,024).  After a restart the driver hands back the
  jobs it submitted that were still forming (:meth:`Host.resume_submitted`):
  their volunteers still hold GPUs for them.

Like every core it never awaits and never reads a clock: ``now_ms`` comes
with every call, and the candidate lists and advert lookups are functions
the driver hands in (its advert book).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ._actions import (
    Action,
    Cancelled,
    CheckBalance,
    CheckPayment,
    Confirmed,
    Emit,
    Failed,
    JobSeen,
    MemberDone,
    MemberMessage,
    NotVolunteering,
    PaidNotice,
    Publish,
    Refused,
    Send,
    SetTimer,
    Settled,
    StartJob,
    StopJob,
    TimerKey,
    TimerOwner,
)
from ._advert import Advert, SignedAdvert
from ._codec import decode
from ._envelope import Kind, body_of, envelope_from_obj
from ._errors import LocalProtocolError, PeerMisbehaved, Reason
from ._formation import DEFAULT_CONFIG, FormationConfig, FormationNode
from ._formation_messages import Certificate, Message, message_bytes_max, message_from_envelope
from ._formation_quota import Gate, PayerChecks
from ._formation_rules import ClaimView
from ._formation_submitter import Submitter
from ._identity import Identity, Verifier
from ._installments import (
    DEFAULT_INSTALLMENTS,
    Claim,
    InstallmentConfig,
    Installments,
    MemberInstallments,
    claim_cosigns_max,
    claim_wire,
    member_installments,
)
from ._manifest import SignedManifest
from ._member import (
    DEFAULT_MEMBER,
    Deliveries,
    Delivery,
    MemberConfig,
    PartEnded,
    expected_earning,
    member_proof,
    outputs_wire,
)
from ._membership import Membership, decode_heartbeat
from ._notices import DEFAULT_NOTICES, NoticeConfig, PaidNotices, paid_ack_wire, paid_wire
from ._proof import SignedProof
from ._reputation import VerifiedPayment
from ._settlement import DEFAULT_SETTLEMENT, Settlement, SettlementConfig

#: Every signed message to one peer or topic is at most this long (a CONFIRM
#: carrying a whole certificate is the largest formation message).
frame_bytes_max = message_bytes_max + 1024
FORMATION_KINDS = ("manifest", "offer", "proposal", "accept", "decline", "certificate", "confirm", "cancel")
#: Local messages handled in one call at most (a loop of messages to ourselves is a bug).
local_messages_max = 10_000
#: Member messages for the runtime (Ray) the host passes on.
MEMBER_MESSAGE_TYPES = ("ray_rendezvous", "ray_done")
tx_signature_len_max = 128


class Via(str, Enum):
    """How a message reached the node."""

    TOPIC = "topic"
    DIRECT = "direct"
    #: From this node itself (its own message to itself).
    LOCAL = "local"


@dataclass
class MemberRun:
    """One job this node runs as a member, from ``StartJob`` until its
    co-signatures are handed over."""

    start: StartJob
    membership: Membership
    #: The cause of the first ``StopJob`` (the proof's end reason if stopped).
    stop_cause: str = ""
    #: Our own part ended (proof handed over); we only watch the others now.
    ended: bool = False
    started: bool = False
    #: Pay as you go (``core/_installments.py``): None when paid at the end only.
    pay: MemberInstallments | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class HostConfig:
    formation: FormationConfig = DEFAULT_CONFIG
    member: MemberConfig = DEFAULT_MEMBER
    settlement: SettlementConfig = DEFAULT_SETTLEMENT
    installments: InstallmentConfig = DEFAULT_INSTALLMENTS
    notices: NoticeConfig = DEFAULT_NOTICES


Candidates = Callable[[SignedManifest, int], "list[str] | None"]


@dataclass
class _Call:
    """The actions of one call and the local messages it still has to handle."""

    now_ms: int
    out: list[Action] = field(default_factory=list)
    local: deque[bytes] = field(default_factory=deque)
    handled: int = 0


class Host:
    """One node's job protocol (see the module doc)."""

    def __init__(self, identity: Identity, config: HostConfig = HostConfig(), *,
                 adverts: Callable[[str], Advert | None] | None = None,
                 candidates: Candidates | None = None,
                 submitter_of: Callable[[str], str | None] | None = None,
                 payer_checks: PayerChecks | None = None,
                 verify: Verifier | None = None,
                 standing: Callable[[str], int | None] | None = None,
                 claims: ClaimView | None = None, check_payments: bool = False) -> None:
        """``adverts`` looks a peer's advert up in the driver's book;
        ``candidates`` lists the peers it says can serve a job now (``None``:
        no list, every matching peer volunteers); ``submitter_of`` names the
        submitter of a job the driver knows (for payment notices);
        ``payer_checks`` is given on a shared ledger only (the payer gate);
        ``verify`` checks signatures (default: the real Ed25519 check);
        ``standing`` gives a peer's worker score from the receipts the driver
        holds (the members this node proposes when it leads are ordered by
        it: ``core._formation_rules.member_tier``); ``claims`` applies this
        node's hardware-challenge verdicts to an advert (``ClaimBook.view``):
        it proposes, and confirms, no member whose claim it refused
        (``core._formation_rules.claim_fault``).  ``check_payments``: the
        driver can look transactions up on a ledger, so a payment notice for
        an interval counts only once the ledger shows it (``CheckPayment``,
        then :meth:`payment_checked`: ``core/_notices.py``)."""
        self.identity = identity
        self.peer_id = identity.peer_id
        self.config = config
        self.verify = verify
        self.adverts = adverts or (lambda _peer: None)
        self.candidates: Candidates = candidates or (lambda _sm, _now: None)
        self.submitter_of = submitter_of or (lambda _job: None)
        self.payer_checks = payer_checks
        self.standing = standing
        self.claims = claims
        self.check_payments = check_payments
        self.notices = PaidNotices(config.notices)
        self.formation: FormationNode | None = None
        self.submitter = Submitter(identity, config.formation, adverts=self.adverts, claims=claims)
        self.installments = Installments(identity, config.installments,
                                         tolerance_ms=config.settlement.tolerance_ms,
                                         tolerance_ppm=config.settlement.tolerance_ppm,
                                         heartbeat_interval_ms=config.member.heartbeat_interval_ms, verify=verify)
        self.settlement = Settlement(identity, config.settlement, verify=verify,
                                     payout_address_of=self._payout_address_of,
                                     prepaid=self.installments.prepaid)
        self.deliveries = Deliveries(config.member)
        self.members: dict[str, MemberRun] = {}

    # -- local events -------------------------------------------------------------------

    def set_advert(self, advert: SignedAdvert | Advert, now_ms: int) -> list[Action]:
        """Our advert changed (or exists for the first time): the worker's
        formation core is built from it, or told its new terms."""
        if self.formation is None:
            self.formation = FormationNode(self.identity, advert, self.config.formation, adverts=self.adverts,
                                           standing=self.standing, claims=self.claims)
            return []
        return self._run(now_ms, lambda c: self._observe(c, self.formation.update_advert(advert, now_ms)))  # type: ignore[union-attr]

    def submit(self, sm: SignedManifest, now_ms: int) -> list[Action]:
        """Publish a job this node signed (its own node may serve it too)."""
        return self._run(now_ms, lambda c: self._observe(
            c, self.submitter.submit(sm, now_ms, self.candidates(sm, now_ms)), origin="submitter"))

    def resume_submitted(self, sm: SignedManifest, submitted_at_ms: int, now_ms: int) -> list[Action]:
        """After a restart: a job this node submitted and never confirmed
        (stored as forming) forms again, within its original deadline
        (:meth:`Submitter.resume`)."""
        return self._run(now_ms, lambda c: self._observe(
            c, self.submitter.resume(sm, submitted_at_ms, now_ms, self.candidates(sm, now_ms)), origin="submitter"))

    def cancel(self, job_id: str, now_ms: int) -> list[Action]:
        if job_id not in self.submitter.jobs:
            return []
        return self._run(now_ms, lambda c: self._observe(c, self.submitter.cancel(job_id, now_ms),
                                                         origin="submitter"))

    def on_balance(self, payer: str, currency: str, balance: int | None, now_ms: int) -> list[Action]:
        """A payer's balance came back: the manifests that waited for it go on."""
        if self.payer_checks is None:
            return []

        def go(c: _Call) -> None:
            assert self.payer_checks is not None
            for sm in self.payer_checks.resolved(payer, currency, balance, now_ms):
                if self.formation is None or sm.job_id in self.formation.jobs or not self._payer_gate(c, sm):
                    continue
                try:
                    self._observe(c, self.formation.on_manifest(sm, now_ms, self.candidates(sm, now_ms)))
                except PeerMisbehaved as exc:  # expired while we checked, or a quota filled meanwhile
                    c.out.append(Emit(f"jobs:{exc.reason.name.lower()}"))
        return self._run(now_ms, go)

    def member_started(self, job_id: str, now_ms: int) -> list[Action]:
        """Our part of a job began running: heartbeats start."""
        run = self.members.get(job_id)
        if run is None or run.started:
            return []
        run.started = True

        def go(c: _Call) -> None:
            self._observe(c, run.membership.start(now_ms))
            if run.pay is not None:
                self._observe(c, run.pay.start(now_ms))
        return self._run(now_ms, go)

    def member_progress(self, job_id: str, chain_head: bytes, checkpoints: int) -> None:
        """Our checkpoint chain grew: the next heartbeats carry its head."""
        run = self.members.get(job_id)
        if run is not None:
            run.membership.set_progress(chain_head, checkpoints)

    def member_ended(self, job_id: str, part: PartEnded, now_ms: int, *,
                     proof: SignedProof | None = None) -> list[Action]:
        """Our part ended: sign the proof, hand it (and the outputs list) to the
        submitter, tell the others, and keep watching them until they are done
        (our co-signatures vouch for their time) or the watch runs out.
        ``proof``: one the driver signed itself instead (only the simulator's
        lying adversaries do)."""
        run = self.members.get(job_id)
        if run is None or run.ended:
            return []
        run.ended = True
        start, m = run.start, run.start.manifest.manifest
        cfg = self.config.member

        def go(c: _Call) -> None:
            if run.pay is not None:
                self._observe(c, run.pay.finish())
            signed = proof or member_proof(
                self.identity, job_id=job_id, cert_hash=start.certificate.digest, part=part,
                duration_ms_max=m.duration_s_max * 1000, stop_cause=run.stop_cause,
                vouched_until_ms=run.membership.vouched_until_ms())
            price = min(self._agreed_price(start), m.price_per_gpu_hour_max)
            items = [("outputs", outputs_wire(self.identity, job_id, signed, part.outputs)), ("proof", signed.wire)]
            self._observe(c, self.deliveries.hand_over(
                job_id, m.submitter, items, now_ms, earning=(signed.proof_hash, expected_earning(signed, price),
                                                             m.currency),
                proof_signed=True, observed=observed(run.membership)))
            self._observe(c, run.membership.finish(now_ms))
            if run.membership.done:
                self._close_member(c, run)
            else:
                watch = min(cfg.watch_after_end_ms_max, m.duration_s_max * 1000 + cfg.member_timeout_ms)
                c.out.append(SetTimer(TimerKey(TimerOwner.MEMBERSHIP, job_id, "watch"), now_ms + watch))
        return self._run(now_ms, go)

    def job_finished(self, job_id: str, now_ms: int) -> list[Action]:
        """A job's part here is over without a proof from this life (the driver
        refused to start it again, or failed to): free what it holds."""
        self.members.pop(job_id, None)
        if self.formation is None:
            return []
        return self._run(now_ms, lambda c: self._observe(c, self.formation.finish(job_id, now_ms)))  # type: ignore[union-attr]

    def restore_deliveries(self, deliveries: list[Delivery], now_ms: int) -> list[Action]:
        """After a restart: what we stored for submitters and they did not
        acknowledge goes out again when the timers run."""
        return self._run(now_ms, lambda c: self._observe(c, self.deliveries.restore(deliveries, now_ms)))

    def hand_over(self, job_id: str, dest: str, items: list[tuple[str, bytes]], now_ms: int,
                  **marks: Any) -> list[Action]:
        """Hand signed messages to ``dest`` through the deliveries (an
        interrupted member's proof and co-signatures after a restart)."""
        return self._run(now_ms, lambda c: self._observe(c, self.deliveries.hand_over(
            job_id, dest, items, now_ms, **marks)))

    def settlement_restore(self, sm: SignedManifest, cert: Certificate, *, confirmed_at_ms: int, deadline_ms: int,
                           payout_addresses: dict[str, str], items: list[tuple[str, str, bytes, int]],
                           now_ms: int) -> list[Action]:
        """After a restart: a collection the driver stored, handed back (its
        items in the order they came; ``Settlement.restore``)."""
        def go(c: _Call) -> None:
            # Members that never got our CONFIRM are answered with it again.
            self._observe(c, self.submitter.restore_confirmed(sm, cert, confirmed_at_ms), origin="submitter")
            self.installments.open(sm, cert, confirmed_at_ms, payout_addresses)
            for kind, sender, wire, received_ms in items:
                if kind == "claim":  # replayed first: the settlement's remainder needs them
                    try:
                        self._observe(c, self.installments.restore_claim(sm.job_id, sender, wire, received_ms))
                    except PeerMisbehaved:
                        c.out.append(Emit("installments.stored_claim_refused"))
            self._observe(c, self.settlement.restore(
                sm, cert, confirmed_at_ms=confirmed_at_ms, deadline_ms=deadline_ms,
                payout_addresses=payout_addresses, items=items, now_ms=now_ms))
        return self._run(now_ms, go)

    def on_stored(self, job_id: str, sender: str, item_hash: bytes, *, members: list[str] | None, stored: bool,
                  now_ms: int) -> list[Action]:
        """The driver's answer to a ``LookupCollection``: the stored job's
        members (``None``: never confirmed here) and whether it stored this item."""
        def go(c: _Call) -> None:
            try:
                self._observe(c, self.settlement.stored_ack(job_id, sender, item_hash, members=members,
                                                            stored=stored))
            except PeerMisbehaved as exc:
                c.out.append(Refused(exc.reason, exc.detail))
        return self._run(now_ms, go)

    # -- messages -----------------------------------------------------------------------

    def on_bytes(self, data: bytes, now_ms: int, *, via: Via) -> list[Action]:
        """One message that reached this node.  Never raises for the sender's
        fault: a refusal is a ``Refused`` action (the first of them is the
        message's verdict)."""
        return self._run(now_ms, lambda c: self._handle(c, data, via))

    def on_timer(self, key: TimerKey, now_ms: int) -> list[Action]:
        return self._run(now_ms, lambda c: self._timer(c, key))

    def notify_paid(self, job_id: str, worker: str, proof_hash: bytes, tx_signature: str, now_ms: int, *,
                    inclusion_proof: str | None = None) -> list[Action]:
        """The payer paid ``worker``'s row ``proof_hash`` of a job we submitted:
        tell it, and again until it acknowledges (``core/_notices.py``)."""
        wire = paid_wire(self.identity, job_id=job_id, proof_hash=proof_hash, tx_signature=tx_signature,
                         inclusion_proof=inclusion_proof)
        return self._run(now_ms, lambda c: self._observe(c, self.notices.send(job_id, worker, proof_hash, wire,
                                                                              now_ms)))

    def payment_checked(self, check: CheckPayment, payment: VerifiedPayment | None, now_ms: int, *,
                        reachable: bool = True) -> list[Action]:
        """What the ledger showed of the transaction a payment notice cites
        (``payment``: ``None`` when not found or failed; ``reachable``: false
        when the ledger could not be asked, and the notice is then believed).
        A payment the ledger shows counts, and is acknowledged; one it does
        not is neither (the submitter resends it; the interval stays due)."""
        def go(c: _Call) -> None:
            notice = PaidNotice(check.job_id, check.proof_hash, check.tx_signature, check.inclusion_proof)
            run = self.members.get(check.job_id)
            pay = run.pay if run is not None else None
            if pay is None or pay.owed_interval(check.proof_hash) is None:
                self._believe(c, notice, check.submitter)  # no longer ours to check: as before
                return
            if not reachable:
                c.out.append(Emit("installments:paid_unchecked"))
                self._believe(c, notice, check.submitter)
                return
            why, actions = pay.on_checked(check.proof_hash, check.tx_signature, payment)
            self._observe(c, actions)
            if why is None:
                c.out.append(notice)
                c.out.append(Send(check.submitter, paid_ack_wire(self.identity, job_id=check.job_id,
                                                                 proof_hash=check.proof_hash)))
        return self._run(now_ms, go)

    # -- the call loop --------------------------------------------------------------------

    def _run(self, now_ms: int, first: Callable[[_Call], None]) -> list[Action]:
        c = _Call(now_ms)
        first(c)
        while c.local:
            c.handled += 1
            if c.handled > local_messages_max:
                raise LocalProtocolError("messages to ourselves do not end")
            self._handle(c, c.local.popleft(), Via.LOCAL)
        return c.out

    def _observe(self, c: _Call, actions: list[Action], origin: str = "") -> None:
        """Take a core's actions: messages to ourselves are handled in this
        call; the facts the host acts on are acted on; the rest goes out."""
        for a in actions:
            if isinstance(a, Send) and a.peer_id == self.peer_id:
                c.local.append(a.data)
                continue
            c.out.append(a)
            if isinstance(a, Publish):
                if origin == "submitter" and a.topic == self.config.formation.jobs_topic:
                    c.local.append(a.data)  # our own node may serve our own job
            elif isinstance(a, StartJob):
                self._member_run(a)
            elif isinstance(a, StopJob):
                run = self.members.get(a.job_id)
                if run is not None and not run.stop_cause:
                    run.stop_cause = a.cause
            elif isinstance(a, Confirmed):
                sub = self.submitter.jobs.get(a.job_id)
                if sub is not None:
                    self._observe(c, self.settlement.open(sub.sm, a.certificate, c.now_ms))
                    col = self.settlement.collections.get(a.job_id)
                    if col is not None:
                        self.installments.open(sub.sm, a.certificate, col.confirmed_at_ms, col.payout_addresses)
                c.out += self.submitter.decided(a.job_id)
            elif isinstance(a, (Failed, Cancelled)):
                if isinstance(a, Cancelled):
                    self.settlement.note_cancel(a.job_id, a.reason)
                c.out += self.submitter.decided(a.job_id)
            elif isinstance(a, Settled):
                self.submitter.settled(a.job_id, c.now_ms)
                self.installments.close(a.job_id)
                if a.job_id not in self.settlement.collections:
                    self.installments.forget(a.job_id)

    def _handle(self, c: _Call, data: bytes, via: Via) -> None:
        before = len(c.out)
        try:
            self._dispatch(c, data, via)
        except PeerMisbehaved as exc:
            c.out.append(Refused(exc.reason, exc.detail))
        if via is Via.LOCAL and any(isinstance(a, Refused) for a in c.out[before:]):
            # Our own message refused: a bug of ours, counted, never a verdict.
            c.out[before:] = [Emit("jobs:own_message_refused") if isinstance(a, Refused) else a
                              for a in c.out[before:]]

    def _dispatch(self, c: _Call, data: bytes, via: Via) -> None:
        obj = decode(data, size_max=frame_bytes_max, canonical=True)
        kind = obj.get("k") if isinstance(obj, dict) else None
        if kind in FORMATION_KINDS:
            env = envelope_from_obj(obj, verify=self.verify)
            if len(data) > env.kind.bytes_max + 512:
                raise PeerMisbehaved(Reason.OVERSIZED, f"{env.kind.value} of {len(data)} bytes")
            self._formation(c, message_from_envelope(env, self.verify))
            return
        if via is Via.TOPIC:
            raise PeerMisbehaved(Reason.WRONG_KIND, f"{kind!r} does not travel on a topic")
        if kind == "heartbeat":
            shb = decode_heartbeat(data, verify=self.verify)
            run = self.members.get(shb.heartbeat.job_id)
            if run is None:
                c.out.append(Emit("exec:heartbeat_unknown_job"))
                return
            self._observe(c, run.membership.on_signed_heartbeat(shb, c.now_ms))
            self._maybe_close(c, run)
        elif kind == "proof":
            self._observe(c, self.settlement.on_proof(data, c.now_ms))
        elif kind == "cosign":
            self._observe(c, self.settlement.on_cosign(data, c.now_ms))
        elif kind == "result":
            env = envelope_from_obj(obj, expected=Kind.RESULT, verify=self.verify)
            self._result(c, body_of(env), env.signer_peer_id, data)
        else:
            raise PeerMisbehaved(Reason.WRONG_KIND, f"unexpected message kind {kind!r}")

    def _result(self, c: _Call, body: dict[str, Any], signer: str, data: bytes) -> None:
        kind = body.get("type")
        if kind == "paid":
            notice = self._paid(body, signer)
            run = self.members.get(notice.job_id)
            if self.check_payments and run is not None and run.pay is not None \
                    and run.pay.owed_interval(notice.proof_hash) is not None:
                # Checked on the ledger before the interval counts as paid (#16.3).
                c.out.append(CheckPayment(notice.job_id, notice.proof_hash, notice.tx_signature, signer,
                                          notice.inclusion_proof))
                return
            self._believe(c, notice, signer)
        elif kind == "paid_ack":
            job_id, proof_hash = body.get("job_id"), body.get("proof_hash")
            if not isinstance(job_id, str) or not isinstance(proof_hash, bytes):
                raise PeerMisbehaved(Reason.BAD_SCHEMA, "a payment acknowledgement needs job_id and proof_hash")
            self._observe(c, self.notices.on_ack(job_id, proof_hash, signer))
        elif kind == "interval_claim":
            self._observe(c, self.installments.on_claim(body, signer, data, c.now_ms))
        elif kind == "proof_ack":
            self._observe(c, self.deliveries.on_ack(body, signer))
        elif kind in MEMBER_MESSAGE_TYPES:
            run = self.members.get(str(body.get("job_id")))
            if run is not None and signer in run.start.certificate.members:
                c.out.append(MemberMessage(run.start.job_id, signer, body))
            else:
                c.out.append(Emit("exec:member_message_unknown_job"))
        else:
            self._observe(c, self.settlement.on_result(body, signer, data, c.now_ms))

    def _believe(self, c: _Call, notice: PaidNotice, submitter: str) -> None:
        """A payment notice counts: the driver records it, the interval (if
        one) is paid, and the submitter hears that it arrived."""
        c.out.append(notice)
        run = self.members.get(notice.job_id)
        if run is not None and run.pay is not None:
            self._observe(c, run.pay.on_paid(notice.proof_hash))
        c.out.append(Send(submitter, paid_ack_wire(self.identity, job_id=notice.job_id,
                                                   proof_hash=notice.proof_hash)))

    def _paid(self, body: dict[str, Any], signer: str) -> PaidNotice:
        job_id, proof_hash, sig = body.get("job_id"), body.get("proof_hash"), body.get("tx_signature")
        if not isinstance(job_id, str) or self.submitter_of(job_id) != signer:
            raise PeerMisbehaved(Reason.UNKNOWN_JOB, "payment notice from someone who did not submit that job")
        if not isinstance(proof_hash, bytes) or len(proof_hash) != 32 or not isinstance(sig, str) \
                or not 0 < len(sig) <= tx_signature_len_max:
            raise PeerMisbehaved(Reason.BAD_SCHEMA, "payment notice needs proof_hash (32 bytes) and tx_signature")
        inclusion = body.get("inclusion_proof")
        return PaidNotice(job_id, proof_hash, sig, inclusion if isinstance(inclusion, str) else None)

    # -- formation ------------------------------------------------------------------------

    def _formation(self, c: _Call, msg: Message) -> None:
        """The dispatch order: the submitter core (our job), then the worker's
        formation core; each one's refusal on its own."""
        now = c.now_ms
        ours = msg.job_id in self.submitter.jobs
        if isinstance(msg, SignedManifest):
            self._manifest(c, msg, ours)
            return
        refusals: list[PeerMisbehaved] = []
        if ours:
            try:
                self._observe(c, self.submitter.on_message(msg, now), origin="submitter")
            except PeerMisbehaved as exc:
                refusals.append(exc)
        if self.formation is not None:
            try:
                self._observe(c, self.formation.on_message(msg, now))
            except PeerMisbehaved as exc:
                refusals.append(exc)
        c.out += [Refused(e.reason, e.detail) for e in refusals]

    def _manifest(self, c: _Call, sm: SignedManifest, ours: bool) -> None:
        now, fn = c.now_ms, self.formation
        if fn is not None and sm.job_id in fn.jobs:
            c.out.append(Emit("jobs:manifest_repeated"))  # a republish, or the same manifest by another path
            return
        if not ours and fn is not None:
            # Quotas first: a stranger's flood beyond its share costs no record
            # and no balance lookup, and is not forwarded.
            fn.check_admission(sm, now)
        c.out.append(JobSeen(sm))
        if not ours and not self._payer_gate(c, sm):
            return  # held for a balance check, or refused: the payer cannot pay
        if fn is None:
            return
        try:
            self._observe(c, fn.on_manifest(sm, now, self.candidates(sm, now)))
        except PeerMisbehaved as exc:
            if not ours:
                raise
            # Our own job beyond our own worker's quota: others serve it.
            c.out.append(Emit(f"jobs:own_not_volunteering_{exc.reason.name.lower()}"))

    def _payer_gate(self, c: _Call, sm: SignedManifest) -> bool:
        """True when this node may consider the job now (``core._formation_quota``)."""
        if self.payer_checks is None:
            return True
        m = sm.manifest
        open_lamports = self.formation.open_ceiling(m.payer, m.currency) if self.formation is not None else 0
        verdict = self.payer_checks.gate(sm, c.now_ms, open_lamports=open_lamports)
        if verdict.gate is Gate.REFUSE:
            c.out += [Emit("jobs:payer_cannot_pay"), NotVolunteering(sm.job_id, f"not volunteering: {verdict.reason}")]
        elif verdict.lookup:
            c.out.append(CheckBalance(m.payer, m.currency))
        return verdict.gate is Gate.ADMIT

    # -- timers ---------------------------------------------------------------------------

    def _timer(self, c: _Call, key: TimerKey) -> None:
        now = c.now_ms
        if key.owner is TimerOwner.FORMATION:
            if self.formation is not None:
                self._observe(c, self.formation.on_timer(key, now))
        elif key.owner is TimerOwner.SUBMITTER:
            self._observe(c, self.submitter.on_timer(key, now), origin="submitter")
        elif key.owner is TimerOwner.MEMBERSHIP:
            run = self.members.get(key.job_id)
            if run is None:
                return
            if key.name == "watch":
                if run.ended:
                    self._close_member(c, run)
                return
            self._observe(c, run.membership.on_timer(key, now))
            self._maybe_close(c, run)
        elif key.owner is TimerOwner.SETTLEMENT:
            self._observe(c, self.settlement.on_timer(key, now))
            if key.job_id not in self.settlement.collections:
                self.installments.forget(key.job_id)
        elif key.owner is TimerOwner.INSTALLMENT:
            run = self.members.get(key.job_id)
            if run is not None and run.pay is not None:
                self._installment_timer(c, run, run.pay, key)
        elif key.owner is TimerOwner.NOTICE:
            self._observe(c, self.notices.on_timer(key, now))
        else:
            self._observe(c, self.deliveries.on_timer(key, now))

    # -- the member's side --------------------------------------------------------------------

    def _member_run(self, start: StartJob) -> None:
        if start.job_id in self.members:
            return
        m, cfg = start.manifest.manifest, self.config.member
        cert = start.certificate
        membership = Membership(identity=self.identity, job_id=start.job_id, cert_hash=cert.digest,
                                members=cert.members, policy=m.on_member_loss,
                                heartbeat_interval_ms=cfg.heartbeat_interval_ms,
                                member_timeout_ms=cfg.member_timeout_ms, start_grace_ms=cfg.start_grace_ms,
                                verify=self.verify)
        mine = next((a for a in cert.accepts if a.peer_id == self.peer_id), None)
        pay = member_installments(start.manifest, peer_id=self.peer_id, price_per_gpu_hour=self._agreed_price(start),
                                  config=self.config.installments,
                                  address=mine.payout_address if mine is not None else "")
        self.members[start.job_id] = MemberRun(start=start, membership=membership, pay=pay)

    def _maybe_close(self, c: _Call, run: MemberRun) -> None:
        if run.ended and run.membership.done and run.start.job_id in self.members:
            self._close_member(c, run)

    def _close_member(self, c: _Call, run: MemberRun) -> None:
        """Our part ended and there is nobody left to watch: co-sign what we saw,
        hand it over, free the GPUs."""
        job_id = run.start.job_id
        if self.members.pop(job_id, None) is None:
            return
        m = run.start.manifest.manifest
        if run.pay is not None:
            self._observe(c, run.pay.close())
        cosigns = [("cosign", cs.wire) for cs in run.membership.cosigns()]
        self._observe(c, run.membership.stop_watching())
        self._observe(c, self.deliveries.hand_over(job_id, m.submitter, cosigns, c.now_ms, cosigned=True))
        if self.formation is not None:
            self._observe(c, self.formation.finish(job_id, c.now_ms))
        c.out.append(MemberDone(job_id))

    def _installment_timer(self, c: _Call, run: MemberRun, pay: MemberInstallments, key: TimerKey) -> None:
        """Pay as you go, the member's side: claim an interval, or stop when a payment is overdue."""
        if key.name == "due":
            self._observe(c, pay.on_due(c.now_ms))
            return
        k, actions = pay.claim_due(c.now_ms)
        self._observe(c, actions)
        if k is None:
            return
        start = run.start
        cosigns = tuple(cs.wire for cs in run.membership.cosigns())[:claim_cosigns_max]
        if k == 0 and not cosigns:
            return  # nothing seen of anyone: nothing to vouch for
        wire = claim_wire(self.identity, Claim(job_id=start.job_id, peer_id=self.peer_id,
                                               cert_hash=start.certificate.digest, interval=k,
                                               chain_head=run.membership.chain_head, cosigns=cosigns))
        earning = (pay.key(k), pay.amount, pay.currency) if k else None  # 0: co-signatures only
        self._observe(c, self.deliveries.hand_over(start.job_id, start.manifest.manifest.submitter,
                                                   [("claim", wire)], c.now_ms, earning=earning))

    def _agreed_price(self, start: StartJob) -> int:
        return next((a.price_per_gpu_hour for a in start.certificate.accepts if a.peer_id == self.peer_id),
                    start.manifest.manifest.price_per_gpu_hour_max)

    def _payout_address_of(self, peer_id: str) -> str:
        advert = self.adverts(peer_id)
        return advert.payout_address if advert is not None else ""


def observed(membership: Membership) -> dict[str, list[Any]]:
    """What a member saw of the others so far (stored, to co-sign after a crash)."""
    return {peer: [o.first_seen_ms, o.last_seen_ms, o.heartbeats, o.chain_head.hex()]
            for peer, o in membership.seen.items() if o.first_seen_ms is not None and o.last_seen_ms is not None}
