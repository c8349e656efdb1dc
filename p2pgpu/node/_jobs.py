"""The jobs driver: carries the core host's actions over libp2p, and persists what they say.

:class:`JobsService` holds this node's :class:`~p2pgpu.core.Host` (every rule
of a job's lifecycle: formation as worker and submitter, membership while a
job runs, settlement, the member's deliveries to submitters) and does only
what a driver does (docs/architecture.md, "Two drivers of the same cores"):
it hands the host the bytes that reach the node and the timers that fire,
and carries out the actions that come back.

- Formation messages travel on ``/p2pgpu/jobs/1`` (``NODE_FORMATION``: one
  shared topic; a fresh per-job topic's mesh takes GossipSub heartbeats to
  form); everything addressed to one peer (accepts, certificates, confirms,
  heartbeats, logs, proofs, co-signatures, acknowledgements, payment
  notices) on direct streams (``/p2pgpu/direct/1.0.0``, one length-prefixed
  signed message per frame, one long-lived stream per peer: ``_direct.py``).
  Messages the host sends itself never leave it.
- Host calls are synchronous and never interleave (trio runs one task at a
  time and :meth:`JobsService.apply` never awaits): publishes, sends, job
  starts and balance lookups go to bounded channels (or per-peer link queues)
  served by tasks of the service's nursery; what the host says to store is
  stored at once, before any send that follows it can leave.
- Topic messages are handled in the GossipSub validator, which therefore
  refuses anything the host refuses (a ``Refused`` action): rejected
  (costing the forwarder score) or ignored, as ``core/_verdict.py`` maps the
  reason.
- ``Reserved``/``Released`` keep the node's advert honest: its free GPUs are
  what the capacity ledger has not promised.
- The settlement's actions are persisted by ``_collect.py``; the member's
  run is the runner's (``_runner.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import base58
import trio
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID

from p2pgpu.core import (
    Advert,
    GossipVerdict,
    LocalProtocolError,
    PeerMisbehaved,
    SignedAdvert,
    verdict_for,
)
from p2pgpu.core._actions import (
    Action,
    Cancelled,
    CancelTimer,
    CheckBalance,
    CheckPayment,
    CollectionOpened,
    Confirmed,
    DeliveryDone,
    Emit,
    Failed,
    HandOver,
    InstallmentsOwed,
    ItemTaken,
    JobSeen,
    LateLine,
    LogsTaken,
    LookupCollection,
    MemberDone,
    MemberLost,
    MemberMessage,
    NotVolunteering,
    PaidNotice,
    Publish,
    Refused,
    Released,
    Reserved,
    Send,
    SetTimer,
    Settled,
    StartJob,
    StopJob,
    Subscribe,
    TimerKey,
    Unsubscribe,
)
from p2pgpu.core._formation import FormationConfig, FormationNode
from p2pgpu.core._formation_messages import message_bytes_max
from p2pgpu.core._formation_quota import PayerChecks
from p2pgpu.core._formation_submitter import Submitter
from p2pgpu.core._host import Host, HostConfig, Via
from p2pgpu.core._installments import DEFAULT_INSTALLMENTS, InstallmentConfig
from p2pgpu.core._manifest import SignedManifest
from p2pgpu.core._matching import matching
from p2pgpu.core._owned_table import OwnedTable

from ._collect import Collector
from ._direct import DirectLinks, read_idle_s, serve_frames
from ._streams import guarded
from ._timers import Timers

if TYPE_CHECKING:
    from ._ports import NodePorts

log = logging.getLogger("p2pgpu.jobs")

JOBS_TOPIC = "/p2pgpu/jobs/1"
#: Every signed message to one peer (formation, heartbeats, logs, proofs, co-signatures).
DIRECT_PROTOCOL = "/p2pgpu/direct/1.0.0"
frame_bytes_max = message_bytes_max + 1024
send_queue_max = 4096
#: The node's formation settings (the simulator's defaults are these:
#: ``tests/sim/test_defaults.py``).  One topic for every job's formation
#: messages: a fresh per-job topic needs GossipSub heartbeats to build its
#: mesh before the first offer gets through (measured: 7-10 s for 2-node jobs
#: on 8 loopback processes), while the shared topic's mesh is already there.
#: The offer window only matters when the best-ranked expected volunteer stays
#: silent (otherwise it closes as soon as that one is heard): long enough for
#: the manifest's spread on a busy machine.
NODE_FORMATION = FormationConfig(per_job_topics=False, member_timeout_ms=600, leader_timeout_ms=1500,
                                 offer_window_ms=200, late_volunteer_ms=600)
#: Job records (``core._owned_table``): strangers' jobs, in all and per
#: submitter; and this node's own (submitted or worked on), which strangers'
#: records never evict.
records_max = 10_000
records_per_submitter_max = 256
own_records_max = 10_000
#: Our own records in a final state stay in the store, not in memory (#13:
#: each was ~4.7 KB of Python objects, proofs and outputs included, up to
#: 10,000 of them); the most recently used of them are kept here, at most
#: this many and this many bytes of their stored JSON.
ended_cached_max = 64
ended_cached_bytes_max = 1 << 20
#: Ended jobs of ours whose record left memory, still listed by
#: ``network.jobs`` (the explorer's network view): their network rows
#: (~0.5 KB each), the newest this many.  Equal to ``network.jobs``'s answer
#: size (``_job_api.network_jobs_max``).
network_ended_max = 2_000


def network_summary(rec: JobRecord, members: list[str], certificate: str) -> dict[str, Any]:
    """One job as ``network.jobs`` lists it: what its manifest asks and,
    where this node saw the confirmation, the cluster."""
    m = rec.manifest.manifest
    return {"job_id": rec.job_id, "name": rec.name, "state": rec.state, "roles": list(rec.roles),
            "submitter": m.submitter, "nodes": m.nodes, "replicas": m.replicas, "gpus_per_node": m.gpus_per_node,
            "runtime": m.runtime, "price_per_gpu_hour_max": m.price_per_gpu_hour_max, "currency": m.currency,
            "seen_at_ms": rec.seen_at_ms, "members": members, "certificate_hash": certificate}
#: Balance lookups waiting at once (the payer gate).
balance_checks_max = 1024
#: Payment notices waiting for their ledger lookup (then dropped: the submitter resends).
payment_checks_max = 256
#: Confirmed jobs waiting to be started by the runner at once.
starts_max = 1024


@dataclass
class JobRecord:
    """What this node knows of one job, for ``job status`` and ``job list``."""

    job_id: str
    name: str
    roles: list[str]
    state: str
    seen_at_ms: int
    manifest: SignedManifest
    submitted_at_ms: int | None = None
    confirmed_at_ms: int | None = None
    started_at_ms: int | None = None
    ended_at_ms: int | None = None
    members: list[str] = field(default_factory=list)
    certificate: str = ""
    member_index: int | None = None
    reason: str = ""
    exit_code: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        m = self.manifest.manifest
        timings = {"seen_at_ms": self.seen_at_ms, "submitted_at_ms": self.submitted_at_ms,
                   "confirmed_at_ms": self.confirmed_at_ms, "started_at_ms": self.started_at_ms,
                   "ended_at_ms": self.ended_at_ms}
        if self.submitted_at_ms is not None and self.confirmed_at_ms is not None:
            timings["formation_ms"] = self.confirmed_at_ms - self.submitted_at_ms
        return {
            "job_id": self.job_id, "name": self.name, "roles": list(self.roles), "state": self.state,
            "cluster": {"members": list(self.members), "certificate_hash": self.certificate,
                        "member_index": self.member_index},
            "timings": timings, "reason": self.reason, "exit_code": self.exit_code,
            "submitter": m.submitter, "nodes": m.nodes, "replicas": m.replicas, "runtime": m.runtime,
            **self.extra,
        }




Runner = Callable[[StartJob], Awaitable[None]]


def installment_config(node: NodePorts) -> InstallmentConfig:
    """The worker's pay-as-you-go grace: ``payment_grace_s`` in config.toml
    (how long after claiming an interval it keeps working unpaid)."""
    extra = getattr(getattr(node, "config", None), "extra", None) or {}
    grace = extra.get("payment_grace_s")
    if type(grace) is not int or not 1 <= grace <= 24 * 3600:
        return DEFAULT_INSTALLMENTS
    return dataclasses.replace(DEFAULT_INSTALLMENTS, grace_ms=grace * 1000)


class JobsService:
    def __init__(self, node: NodePorts, *, rng: random.Random, config: HostConfig | None = None) -> None:
        formation = dataclasses.replace(NODE_FORMATION, network=getattr(node.book, "network", ""))
        self.node = node
        self.rng = rng
        self.config = config or HostConfig(formation=formation, installments=installment_config(node))
        self.counts: Counter[str] = node.counts
        self.timers = Timers(node.now_ms)
        self.host = Host(node.identity, self.config, adverts=self.advert_of, candidates=self.candidates,
                         submitter_of=self._submitter_of, standing=self._standing, claims=self._claims)
        #: A test network's adversary (config.toml ``adversary``; the daemon
        #: sets it only where simulated GPUs are allowed): ``claim_ahead``
        #: also claims the interval after each one it served.
        self.adversary = ""
        self.records: OwnedTable[str, JobRecord] = OwnedTable(
            theirs_max=records_max, per_owner_max=records_per_submitter_max, ours_max=own_records_max)
        #: Stored records of ended jobs read back lately (see ``record``):
        #: job id -> (record, bytes of its stored JSON), least recently used first.
        self.ended: OrderedDict[str, tuple[JobRecord, int]] = OrderedDict()
        self.ended_bytes = 0
        #: Network rows of our ended jobs that left memory (``network_summary``),
        #: oldest first, at most ``network_ended_max``.
        self.network_ended: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.runner: Runner | None = None
        self.runner_obj: Any = None
        self.on_stop: Callable[[StopJob], None] | None = None
        #: A peer's worker score from the receipts held (#16, ``_receipts.py``), if known.
        self.standing: Callable[[str], int | None] | None = None
        #: Receipts (#16, ``_receipts.py``): told of each settlement and payment notice.
        self.on_settled: Callable[[Settled], None] | None = None
        self.on_paid: Callable[[PaidNotice], None] | None = None
        self.collector = Collector(self)
        #: Set by the node when its ledger is shared (an RPC endpoint): the payer gate.
        self.payer_check: Any = None
        self._check_send, self._check_recv = trio.open_memory_channel[tuple[str, str]](balance_checks_max)
        #: Payment notices to check on the ledger (#16.3, ``CheckPayment``).
        self._paycheck_send, self._paycheck_recv = trio.open_memory_channel[CheckPayment](payment_checks_max)
        self.payment_lookup: Any = None
        self.db: Any = None  # sqlite3.Connection in the home, when there is one
        self._ops_send, self._ops_recv = trio.open_memory_channel[tuple[str, str, bytes]](send_queue_max)
        self.links: DirectLinks | None = None
        self._start_send, self._start_recv = trio.open_memory_channel[StartJob](starts_max)
        self._topic_scopes: dict[str, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None

    @property
    def formation(self) -> FormationNode | None:
        """This node's worker formation core (``None`` until it has an advert)."""
        return self.host.formation

    @property
    def submitter(self) -> Submitter:
        return self.host.submitter

    def set_payer_check(self, checker: Any, *, ttl_s: int = 30) -> None:
        """A shared ledger: strangers' manifests wait for their payers' balances,
        each believed ``ttl_s`` (config.toml ``payer_balance_ttl_s``)."""
        self.payer_check = checker
        self.host.payer_checks = PayerChecks(verdict_ttl_ms=ttl_s * 1000)

    # ------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        stack = self.node.stack
        assert stack is not None
        stack.pubsub.set_topic_verdict_validator(JOBS_TOPIC, self._validate)
        sub = await stack.pubsub.subscribe(JOBS_TOPIC)
        # A direct stream lives as long as its sender keeps it busy (the reader
        # ends it after read_idle_s of silence); the guard's limit is a backstop.
        stack.host.set_stream_handler(DIRECT_PROTOCOL, guarded("formation", self._serve_stream, self.counts,
                                                               timeout_s=40 * read_idle_s))
        self.links = DirectLinks(stack.host, DIRECT_PROTOCOL, self.counts, prefix="jobs", dial=self.node.dial_peer)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.links.run)
            nursery.start_soon(self.timers.run, self._fire)
            nursery.start_soon(self._pubsub_worker)
            nursery.start_soon(self._drain, sub)
            nursery.start_soon(self._start_worker)
            if self.payer_check is not None:
                nursery.start_soon(self._payer_check_worker)
            if self.payment_lookup is not None:
                nursery.start_soon(self._payment_check_worker)
            task_status.started()

    def on_advert(self, sa: SignedAdvert) -> None:
        """Our advert changed (or exists for the first time)."""
        self.apply(self.host.set_advert(sa, self.node.now_ms()))

    def advert_of(self, peer_id: str) -> Advert | None:
        """The cores' view of the advert book: who may volunteer, lead and be
        a member (``core/_formation_rules.py``), and payout addresses."""
        sa = self.node.book.adverts.get(peer_id)
        return sa.advert if sa is not None else None

    def candidates(self, sm: SignedManifest, now_ms: int) -> list[str]:
        """The peers whose adverts say they can serve the job now (matching,
        enough free GPUs, unexpired): the cores let only the best-ranked few
        of them volunteer at once (``FormationConfig.spare_volunteers``).  A
        stale entry costs time, never safety."""
        return [a.peer_id for a in matching(self.node.book.live(now_ms), sm.manifest.requirements)]

    def _standing(self, peer_id: str) -> int | None:
        return self.standing(peer_id) if self.standing is not None else None

    def _claims(self, advert: Advert, now_ms: int) -> Advert:
        """This node's hardware-challenge verdicts on an advert (#16): the
        advert book's ``view`` (the challenge service's ``ClaimBook.view``),
        so matching, the dry run and the formation cores judge a claim alike:
        the cores propose and confirm no member whose claim it refused."""
        view = self.node.book.view
        return view(advert, now_ms) if view is not None else advert

    def _submitter_of(self, job_id: str) -> str | None:
        rec = self.record(job_id)
        return rec.manifest.manifest.submitter if rec is not None else None

    # -------------------------------------------------------------- inbound

    def _validate(self, forwarder: ID, msg: Any) -> GossipVerdict:
        stack = self.node.stack
        if stack is not None and msg.from_id == stack.host.get_id().to_bytes():
            return GossipVerdict.ACCEPT  # our own publish; the host already handled it
        try:
            self.deliver(msg.data, via=Via.TOPIC)
        except PeerMisbehaved as exc:
            # (counted once, where apply() met the host's Refused)
            log.info("job message from %s refused: %s", forwarder, exc)
            return verdict_for(exc.reason)  # a replay or a full table is not the forwarder's fault
        return GossipVerdict.ACCEPT

    async def _drain(self, sub: Any) -> None:
        while True:
            try:
                await sub.get()  # handled in the validator; keep the queue empty
            except trio.EndOfChannel:
                return  # unsubscribed

    async def _serve_stream(self, stream: Any) -> None:
        await serve_frames(stream, frame_bytes_max, self._on_frame)

    def _on_frame(self, data: bytes) -> None:
        self.counts["jobs:frames_in"] += 1
        self.deliver(data, via=Via.DIRECT)

    def deliver(self, data: bytes, *, via: Via | str) -> None:
        """Hand one message to the host and carry out its actions; raises
        ``PeerMisbehaved`` with the host's first refusal (the validator turns it
        into a verdict, a stream handler resets the sender's stream)."""
        now = self.node.now_ms()
        way = via if isinstance(via, Via) else (Via.DIRECT if via == "stream" else Via(via))
        try:
            actions = self.host.on_bytes(data, now, via=way)
        except (LocalProtocolError, ValueError, KeyError):
            # The host refused to take a well-formed message (our bug, or a
            # state we did not foresee): count and log, never crash.
            self.counts["jobs:internal_error"] += 1
            log.exception("handling a %s message failed (a bug: please report it)", way.value)
            return
        refused = self.apply(actions)
        if refused is not None:
            raise PeerMisbehaved(refused.reason, refused.detail)

    def _fire(self, key: TimerKey, now: int) -> None:
        try:
            self.apply(self.host.on_timer(key, now))
        except (LocalProtocolError, PeerMisbehaved, ValueError, KeyError):
            # A core refusing its own timer is our bug; it must not stop the node.
            self.counts["jobs:timer_error"] += 1
            log.exception("timer %s failed (a bug: please report it)", key)

    # ------------------------------------------------------------- outbound

    def apply(self, actions: list[Action]) -> Refused | None:
        """Carry out the host's actions, in order (what is to be stored is
        stored before the sends after it can leave).  Never awaits: see the
        module docstring.  Returns the first refusal, if any."""
        refused: Refused | None = None
        # A confirmation and the collection it opens come in one host call and
        # are stored in one transaction (``_on_confirmed``).
        opened = {a.job_id: a for a in actions if isinstance(a, CollectionOpened)}
        for a in actions:
            if isinstance(a, Confirmed):
                self._on_confirmed(a, self.node.now_ms(), opened.pop(a.job_id, None))
            elif isinstance(a, CollectionOpened) and a.job_id not in opened:
                continue  # stored with its confirmation
            elif isinstance(a, Send):
                self._send_out(a.peer_id, a.data)
            elif isinstance(a, Publish):
                self._queue(self._ops_send, ("pub", a.topic, a.data), "publish")
            elif isinstance(a, (Subscribe, Unsubscribe)):
                if a.topic != JOBS_TOPIC:  # always subscribed; a second subscription would replace ours
                    op = "sub" if isinstance(a, Subscribe) else "unsub"
                    self._queue(self._ops_send, (op, a.topic, b""), "subscribe")
            elif isinstance(a, SetTimer):
                self.timers.set(a.key, a.at_ms)
            elif isinstance(a, CancelTimer):
                self.timers.cancel(a.key)
            elif isinstance(a, Emit):
                self.counts[a.metric] += a.value
            elif isinstance(a, Refused):
                self.counts[f"jobs:{a.reason.name.lower()}"] += 1
                refused = refused or a
            else:
                self._fact(a)
        return refused

    def _fact(self, a: Action) -> None:
        """The facts the host reports: records, storage, the runner, the payer."""
        now = self.node.now_ms()
        if isinstance(a, (Reserved, Released)):
            total = len(self.node.inventory.gpus)
            self.node.gpus_reserved = max(0, total - a.gpus_free)
            self.node.capacity_changed()
            rec = self.record(a.job_id)
            if rec is not None and isinstance(a, Reserved) and rec.state == "seen":
                rec.state = "reserved"
        elif isinstance(a, JobSeen):
            self._record(a.manifest, now)
        elif isinstance(a, NotVolunteering):
            rec = self.record(a.job_id)
            if rec is not None:
                rec.reason = a.reason
            log.info("not volunteering for %s: %s", a.job_id[:12], a.reason)
        elif isinstance(a, CheckBalance):
            self._queue(self._check_send, (a.payer, a.currency), "payer_check")
        elif isinstance(a, StartJob):
            self._on_start(a)
        elif isinstance(a, StopJob):
            rec = self.record(a.job_id)
            if rec is not None and rec.state in ("confirmed", "running"):
                rec.reason = a.reason
            if self.on_stop is not None:
                self.on_stop(a)
        elif isinstance(a, (Failed, Cancelled)):
            rec = self.record(a.job_id)
            if rec is not None:
                rec.state = "failed" if isinstance(a, Failed) else "cancelled"
                rec.reason = a.reason
                rec.ended_at_ms = now
                self.persist(a.job_id)
        elif isinstance(a, MemberLost):
            rec = self.record(a.job_id)
            if rec is not None and a.peer_id not in rec.extra.setdefault("lost_members", []):
                rec.extra["lost_members"].append(a.peer_id)
            if self.runner_obj is not None:
                self.runner_obj.member_lost(a.job_id, a.peer_id)
        elif isinstance(a, CollectionOpened):
            self.collector.opened(a)
        elif isinstance(a, ItemTaken):
            self.collector.item(a)
        elif isinstance(a, LogsTaken):
            self.collector.logs_taken(a)
        elif isinstance(a, LookupCollection):
            self.apply(self.collector.lookup(a))
        elif isinstance(a, Settled):
            self.collector.settled(a)
            if self.on_settled is not None:
                self.on_settled(a)
        elif isinstance(a, LateLine):
            self.collector.late_line(a)
        elif isinstance(a, InstallmentsOwed):
            self.collector.installments_owed(a)
            if self.adversary == "forge_notices":
                # Test networks only: a submitter that says it paid each
                # interval at once, citing a transaction that never was (#16.3).
                for row in a.rows:
                    fake = base58.b58encode(hashlib.sha512(b"forged" + row.key).digest()).decode()
                    self.counts["adversary:notices_forged"] += 1
                    self.apply(self.host.notify_paid(a.job_id, row.peer_id, row.key, fake, now))
        elif isinstance(a, HandOver):
            self._hand_over(a, now)
        elif isinstance(a, DeliveryDone):
            self._delivery_done(a, now)
        elif isinstance(a, MemberDone):
            if self.runner_obj is not None:
                self.runner_obj.member_done(a.job_id)
            self.persist(a.job_id)
        elif isinstance(a, CheckPayment):
            try:
                self._paycheck_send.send_nowait(a)
            except trio.WouldBlock:  # the submitter resends it: checked then
                self.counts["jobs:payment_checks_full"] += 1
        elif isinstance(a, PaidNotice):
            self._on_paid(a, now)
            if self.on_paid is not None:
                self.on_paid(a)
        elif isinstance(a, MemberMessage):
            if self.runner_obj is not None:
                self.runner_obj.on_member_message(a.body, a.signer)
        else:
            log.warning("unhandled action %r", a)

    def send(self, peer_id: str, data: bytes) -> None:
        """Send one signed message to a peer (the runtime's: logs, Ray rendezvous)."""
        if peer_id == self.node.identity.peer_id:
            self.deliver_local(data)
        else:
            self._send_out(peer_id, data)

    def deliver_local(self, data: bytes) -> None:
        """One of our own messages to ourselves (a member's log batch to its
        own node as submitter): never fatal if refused, it is our bug."""
        try:
            self.deliver(data, via=Via.LOCAL)
        except PeerMisbehaved as exc:
            log.error("our own message was refused: %s", exc)
            self.counts["jobs:own_message_refused"] += 1

    def _queue(self, chan: Any, item: Any, what: str) -> None:
        try:
            chan.send_nowait(item)
        except trio.WouldBlock:
            # Formation retries what matters (accepts, certificates, confirms).
            self.counts[f"jobs:{what}_queue_full"] += 1

    def _send_out(self, peer_id: str, data: bytes) -> None:
        if self.links is None:
            self.counts["jobs:send_not_running"] += 1
            return
        # Formation retries what matters (accepts, certificates, confirms);
        # deliveries to the submitter are resent until acknowledged.
        self.links.send(peer_id, data)

    def _on_start(self, a: StartJob) -> None:
        rec = self._record(a.manifest, self.node.now_ms(), ours=True)
        if "member" not in rec.roles:
            rec.roles.append("member")
        rec.state = "confirmed"
        rec.members = list(a.certificate.members)
        rec.certificate = a.certificate.digest.hex()
        rec.member_index = a.member_index
        rec.confirmed_at_ms = rec.confirmed_at_ms or self.node.now_ms()
        self._queue(self._start_send, a, "start")

    def _on_confirmed(self, a: Confirmed, now: int, opened: CollectionOpened | None = None) -> None:
        """Our job is confirmed: its record says so and its collection opens,
        both stored in one transaction before the CONFIRM can leave.  Stored
        apart, a ``kill -9`` between the two left a record "confirmed" with no
        collection: after the restart the job was neither resumed (it was not
        forming) nor known as confirmed (no collection to restore), so its
        volunteer, never confirmed, held its GPUs for it until the formation
        deadline and took none of our next jobs (#13; the flaky
        tests/content/test_input_pins.py)."""
        sub = self.host.submitter.jobs.get(a.job_id)
        rec = self._record(sub.sm, now, ours=True) if sub is not None else self.record(a.job_id)
        if rec is not None:
            if sub is not None and "submitter" not in rec.roles:
                rec.roles.append("submitter")
            rec.state = "confirmed"
            rec.confirmed_at_ms = now
            rec.members = list(a.certificate.members)
            rec.certificate = a.certificate.digest.hex()
        if self.db is None:
            if opened is not None:
                self.collector.opened(opened)
        else:
            from p2pgpu.store import transaction

            with transaction(self.db):
                if rec is not None:
                    self.persist(a.job_id)
                if opened is not None:
                    self.collector.opened(opened)
        self.counts["jobs_confirmed"] += 1

    # ---------------------------------------------- the member's deliveries

    def _hand_over(self, a: HandOver, now: int) -> None:
        """Store what the member hands the submitter (and what goes with it:
        the earning its proof expects, the run's marks) in one transaction,
        before the sends that follow it leave."""
        rec = self.record(a.job_id)
        if a.earning is not None and rec is not None:
            rec.extra["proof_hash"] = a.earning[0].hex()
        if self.db is None:
            return
        from p2pgpu.core._settlement import item_hash
        from p2pgpu.store import add_delivery, record_earning, set_member_run, transaction

        with transaction(self.db):
            for kind, wire in a.items:
                add_delivery(self.db, item_hash=item_hash(wire), job_id=a.job_id, dest=a.dest, kind=kind, wire=wire,
                             now_ms=now)
            if a.earning is not None and a.earning[1] > 0:
                record_earning(self.db, a.earning[0], job_id=a.job_id, amount=a.earning[1], currency=a.earning[2],
                               payout_address=self.node.payout_address, created_ms=now)
            set_member_run(self.db, a.job_id, proof_signed=a.proof_signed or None, cosigned=a.cosigned or None,
                           observed=a.observed)
        if self.adversary == "claim_ahead":
            self._claim_ahead(a)

    def _claim_ahead(self, a: HandOver) -> None:
        """Adversary (test networks only): claim one interval more than served."""
        from p2pgpu.core._codec import decode
        from p2pgpu.core._envelope import body_of, envelope_from_obj
        from p2pgpu.core._installments import Claim, claim_wire

        for kind, wire in a.items:
            if kind != "claim":
                continue
            c = Claim.from_body(body_of(envelope_from_obj(decode(wire, size_max=1 << 16, canonical=True))),
                                self.node.identity.peer_id)
            if c.interval:
                self.counts["adversary:claims_ahead"] += 1
                self.send(a.dest, claim_wire(self.node.identity, dataclasses.replace(c, interval=c.interval + 1)))

    def _delivery_done(self, a: DeliveryDone, now: int) -> None:
        if a.status == "expired":
            log.warning("job %s: the submitter never acknowledged one of our messages; giving up", a.job_id[:12])
        if self.db is not None:
            from p2pgpu.store import ack_delivery

            ack_delivery(self.db, a.item_hash, status=a.status, now_ms=now)

    # ------------------------------------------------ can the submitter pay?

    def set_payment_lookup(self, lookup: Any) -> None:
        """A shared ledger (``solana._verify.PaymentLookup``): a payment notice
        for an interval counts only once the ledger shows the payment (#16.3)."""
        self.payment_lookup = lookup
        self.host.check_payments = True

    async def _payment_check_worker(self) -> None:
        """Payment notices to check (``CheckPayment``): what the ledger shows
        goes back to the host, which decides (``core/_notices.py``)."""
        async for check in self._paycheck_recv:
            before = self.payment_lookup.unavailable
            found = await self.payment_lookup.payments([check.tx_signature])
            payment = found.get(check.tx_signature)
            reachable = payment is not None or self.payment_lookup.unavailable == before
            if payment is None:
                self.counts["jobs:payment_not_on_ledger" if reachable else "jobs:payment_unchecked"] += 1
            self.apply(self.host.payment_checked(check, payment, self.node.now_ms(), reachable=reachable))

    async def _payer_check_worker(self) -> None:
        """Balance lookups the payer gate asked for (``CheckBalance``)."""
        async for payer, currency in self._check_recv:
            balance = await self.payer_check.balance(payer, currency)
            self.apply(self.host.on_balance(payer, currency, balance, self.node.now_ms()))

    def _record(self, sm: SignedManifest, now: int, *, ours: bool = False) -> JobRecord:
        """The job's record, made if new: a stranger's (evictable within its
        submitter's quota) or, with ``ours``, one of this node's own jobs
        (``core._owned_table``: never evicted by strangers' records)."""
        rec = self.record(sm.job_id)
        if rec is None:
            rec = JobRecord(job_id=sm.job_id, name=sm.manifest.name, roles=[], state="seen", seen_at_ms=now,
                            manifest=sm)
            self.records.put(sm.job_id, rec, owner=sm.manifest.submitter, ours=ours)
        elif ours:
            self.records.make_ours(sm.job_id)
        return rec

    async def _pubsub_worker(self) -> None:
        stack = self.node.stack
        assert stack is not None and self._nursery is not None
        async for op, topic, data in self._ops_recv:
            try:
                if op == "pub":
                    await stack.pubsub.publish(topic, data)
                elif op == "sub" and topic not in self._topic_scopes:
                    stack.pubsub.set_topic_verdict_validator(topic, self._validate)
                    sub = await stack.pubsub.subscribe(topic)
                    scope = trio.CancelScope()
                    self._topic_scopes[topic] = scope
                    self._nursery.start_soon(self._drain_topic, sub, scope)
                elif op == "unsub" and topic in self._topic_scopes:
                    self._topic_scopes.pop(topic).cancel()
                    await stack.pubsub.unsubscribe(topic)
                    stack.pubsub.remove_topic_validator(topic)
            except (BaseLibp2pError, ValueError, KeyError) as exc:
                self.counts[f"jobs:{op}_failed"] += 1
                log.info("%s %s failed: %s", op, topic, exc)

    async def _drain_topic(self, sub: Any, scope: trio.CancelScope) -> None:
        with scope:
            await self._drain(sub)

    async def _start_worker(self) -> None:
        assert self._nursery is not None
        async for start in self._start_recv:
            if self.runner is None:
                log.warning("no runner: job %s confirmed but not run", start.job_id[:12])
                continue
            self._nursery.start_soon(self._run_guarded, start)

    async def _run_guarded(self, start: StartJob) -> None:
        # A job's failure is the job's, never the node's: whatever escapes the
        # runner (a bug of ours) is logged, counted and the job marked failed.
        assert self.runner is not None
        try:
            await self.runner(start)
        except Exception:
            self.counts["exec:internal_error"] += 1
            log.exception("job %s: internal error in the runner (a bug: please report it)", start.job_id[:12])
            rec = self.record(start.job_id)
            if rec is not None:
                rec.state, rec.reason = "failed", "internal error on this node"
            self.finished(start.job_id)

    # ----------------------------------------------------- submitter's side

    def submit(self, sm: SignedManifest) -> None:
        now = self.node.now_ms()
        rec = self._record(sm, now, ours=True)
        rec.roles.append("submitter")
        rec.state = "forming"
        rec.submitted_at_ms = now
        self.apply(self.host.submit(sm, now))
        # Stored before the job id goes back to the user: a kill -9 while it
        # forms must not forget a job whose id was given (found by the soak).
        self.persist(sm.job_id)

    def cancel(self, job_id: str) -> None:
        self.apply(self.host.cancel(job_id, self.node.now_ms()))

    def finished(self, job_id: str) -> None:
        """A job's part here is over without this life's proof (refused, or a
        runner error): free what it holds."""
        self.apply(self.host.job_finished(job_id, self.node.now_ms()))

    def status(self, job_id: str) -> dict[str, Any] | None:
        rec = self.record(job_id)
        if rec is None:
            matches = self.job_ids_with_prefix(job_id) if len(job_id) >= 6 else []
            if len(matches) != 1:
                return None
            rec = self.record(matches[0])
            if rec is None:
                return None
        doc = rec.to_json()
        doc["proofs"] = list(rec.extra.get("proofs", []))
        doc["payouts"] = self.payouts_of(rec.job_id)
        if self.db is not None and rec.manifest.manifest.interval_s:
            from p2pgpu.store import installments_of

            # Pay as you go: each interval owed (submitter) and its payout's status.
            doc["installments"] = installments_of(self.db, rec.job_id)
        progress = self.host.submitter.progress(rec.job_id)
        if progress is not None:
            doc["formation"] = {"state": progress.state.name.lower(), "offers": progress.offers,
                                "accepts": progress.accepts, "views_seen": progress.views_seen,
                                "certificates_refused": progress.certificates_refused,
                                "last_refusal": progress.refusal,
                                "last_refusal_code": progress.refusal_code.value if progress.refusal_code else None,
                                "members_needed": progress.members_needed}
        if self.host.formation is not None:
            ws = self.host.formation.state(rec.job_id)
            if ws is not None:
                doc["worker_state"] = ws.name.lower()
        return doc

    def payouts_of(self, job_id: str) -> list[dict[str, Any]]:
        if self.db is None:
            return []
        from p2pgpu.store import payouts

        return payouts(self.db, job_id=job_id)

    def logs_of(self, job_id: str) -> list[dict[str, Any]]:
        """The submitter's collected logs of all members, else our own."""
        collected = self.collector.logs_of(job_id)
        if collected:
            return collected
        runner = self.runner_obj
        return list(runner.logs.get(job_id, [])) if runner is not None else []

    def counts_by_state(self) -> dict[str, int]:
        """Jobs with a role here by state: the stored ones, as the live
        records in memory say they are now."""
        live = {r.job_id: r.state for r in self.records.values() if r.roles}
        out: Counter[str] = Counter(live.values())
        if self.db is not None:
            from p2pgpu.store import job_states, stored_states

            out.update(job_states(self.db))
            out.subtract(Counter(stored_states(self.db, list(live)).values()))
        return {k: v for k, v in sorted(out.items()) if v > 0}

    def job_ids_with_prefix(self, prefix: str) -> list[str]:
        """Up to two job ids known here (in memory or stored) that start with ``prefix``."""
        found = dict.fromkeys(r for r in self.records if r.startswith(prefix))
        if self.db is not None:
            from p2pgpu.store import job_ids_with_prefix

            found.update(dict.fromkeys(job_ids_with_prefix(self.db, prefix.lower())))
        return list(found)[:2]

    def listed(self, limit: int = records_max) -> list[dict[str, Any]]:
        """``job list``: jobs with a role here, live (in memory) or stored,
        the newest ``limit``, oldest first.  Stored ones are read as stored
        (their JSON is ``JobRecord.to_json``), without re-verifying each
        manifest."""
        docs = {r.job_id: r.to_json() for r in self.records.values() if r.roles}
        if self.db is not None:
            from p2pgpu.store import load_jobs

            for row in load_jobs(self.db, limit=limit):
                if row["job_id"] not in docs:
                    doc = json.loads(row["record"])
                    if doc.get("state") in ("running", "confirmed", "reserved", "forming"):
                        doc["state"], doc["reason"] = "interrupted", "the node restarted while the job was in progress"
                    docs[row["job_id"]] = doc
        out = sorted(docs.values(), key=lambda d: (d["timings"]["seen_at_ms"], d["job_id"]))
        return out[-limit:]

    # ------------------------------------------------ records: memory and store

    def record(self, job_id: str) -> JobRecord | None:
        """This node's record of a job: in memory while the job is live; an
        ended one of ours is read back from the store (and kept a while)."""
        rec = self.records.get(job_id)
        if rec is not None:
            return rec
        hit = self.ended.get(job_id)
        if hit is not None:
            self.ended.move_to_end(job_id)
            return hit[0]
        if self.db is None:
            return None
        from p2pgpu.store import job_row

        row = job_row(self.db, job_id)
        if row is None:
            return None
        rec = self._from_row(row)
        if rec is not None:
            self._keep_ended(rec, len(row["record"]))
        return rec

    def _keep_ended(self, rec: JobRecord, size: int) -> None:
        old = self.ended.pop(rec.job_id, None)
        if old is not None:
            self.ended_bytes -= old[1]
        self.ended[rec.job_id] = (rec, size)
        self.ended_bytes += size
        while len(self.ended) > ended_cached_max or (self.ended_bytes > ended_cached_bytes_max
                                                    and len(self.ended) > 1):
            _job, (_rec, n) = self.ended.popitem(last=False)
            self.ended_bytes -= n

    def _from_row(self, row: Any) -> JobRecord | None:
        """A stored job row as a record (``None`` if its manifest no longer verifies)."""
        from p2pgpu.core._manifest import verify_manifest

        try:
            sm = verify_manifest(bytes(row["manifest"]), now_ms=0, clock_skew_ms=2**62)
        except PeerMisbehaved as exc:
            log.warning("stored manifest %s no longer verifies: %s", row["job_id"][:12], exc)
            return None
        doc = json.loads(row["record"])
        rec = JobRecord(job_id=row["job_id"], name=doc.get("name", ""), roles=row["roles"].split(","),
                        state=row["state"], seen_at_ms=doc["timings"]["seen_at_ms"], manifest=sm,
                        submitted_at_ms=doc["timings"].get("submitted_at_ms"),
                        confirmed_at_ms=doc["timings"].get("confirmed_at_ms"),
                        started_at_ms=doc["timings"].get("started_at_ms"),
                        ended_at_ms=doc["timings"].get("ended_at_ms"),
                        members=doc["cluster"]["members"], certificate=doc["cluster"]["certificate_hash"],
                        member_index=doc["cluster"]["member_index"], reason=doc.get("reason", ""),
                        exit_code=doc.get("exit_code"))
        for key in ("output_digest", "outputs", "proof_hash", "proofs", "lost_members", "member_outputs",
                    "paid", "member_state", "member_started_at_ms", "member_ended_at_ms"):
            if key in doc:
                rec.extra[key] = doc[key]
        if rec.state in ("running", "confirmed", "reserved", "forming"):
            rec.state, rec.reason = "interrupted", "the node restarted while the job was in progress"
        return rec

    def memory(self) -> dict[str, int]:
        """How many per-job entries each part of the jobs service holds in
        memory now (``status`` shows them; the soak test bounds them)."""
        host = self.host
        formation = host.formation
        return {"job_records": len(self.records), "job_records_ended_cached": len(self.ended),
                "network_rows_ended": len(self.network_ended),
                "collections": len(host.settlement.collections), "submitter_jobs": len(host.submitter.jobs),
                "member_runs": len(host.members), "deliveries": len(host.deliveries),
                "formation_jobs": len(formation.jobs) if formation is not None else 0,
                "runner_logs": len(getattr(self.runner_obj, "logs", {}))}

    # ------------------------------------------------------------- the store

    def persist(self, job_id: str) -> None:
        """Store the record; one of ours that ended leaves memory (the store
        has it: ``record`` reads it back)."""
        rec = self.record(job_id)
        if self.db is None or rec is None or not rec.roles:
            return
        from p2pgpu.store import FINAL_STATES, save_job

        doc = rec.to_json()
        save_job(self.db, job_id=job_id, manifest=rec.manifest.wire, roles=rec.roles, state=rec.state,
                 record=doc, now_ms=self.node.now_ms())
        if rec.state in FINAL_STATES and job_id in self.records:  # a record with a role is ours
            self.records.pop(job_id)
            self._keep_ended(rec, len(json.dumps(doc)))
            self.network_ended.pop(job_id, None)
            self.network_ended[job_id] = network_summary(rec, list(rec.members), rec.certificate)
            while len(self.network_ended) > network_ended_max:
                self.network_ended.popitem(last=False)

    def load(self) -> None:
        """Jobs known before a restart: nothing recorded is lost.  A job that
        was running here when the node died is marked interrupted."""
        if self.db is None:
            return
        from p2pgpu.store import load_jobs

        # Only jobs still in progress when the node stopped come back into
        # memory (as interrupted); ended ones stay in the store (``record``).
        forming: list[JobRecord] = []
        for row in load_jobs(self.db, limit=records_max, unfinished=True):
            rec = self._from_row(row)
            if rec is not None:
                self.records.put(rec.job_id, rec, owner=rec.manifest.manifest.submitter, ours=bool(rec.roles))
                if row["state"] == "forming" and "submitter" in rec.roles:
                    forming.append(rec)
        # Jobs we submitted whose results were still coming in, and what we
        # ran and owe the submitter (a proof, co-signatures): see _collect.py.
        self.collector.reopen(self.node.now_ms())
        if self.runner_obj is not None:
            self.runner_obj.recover(self.node.now_ms())
        self._resume_forming(forming)

    def _resume_forming(self, forming: list[JobRecord]) -> None:
        """Jobs we submitted that were still forming when this node stopped
        form again (``Host.resume_submitted``): their volunteers hold GPUs for
        them and would otherwise keep them, and take none of our next jobs,
        until the formation deadline (#13)."""
        for rec in sorted(forming, key=lambda r: (r.submitted_at_ms or r.seen_at_ms, r.job_id)):
            now = self.node.now_ms()
            rec.state, rec.reason = "forming", ""
            try:
                actions = self.host.resume_submitted(rec.manifest, rec.submitted_at_ms or rec.seen_at_ms, now)
            except LocalProtocolError as exc:  # our table is full of live jobs: this one stays interrupted
                rec.state, rec.reason = "interrupted", f"the node restarted while the job was forming ({exc})"
                continue
            self.counts["jobs:resumed"] += 1
            self.apply(actions)
            self.persist(rec.job_id)


    def _on_paid(self, a: PaidNotice, now: int) -> None:
        """The submitter says one of our proofs was paid: note the signature."""
        rec = self.record(a.job_id)
        if self.db is not None:
            from p2pgpu.store import mark_earning_paid

            mark_earning_paid(self.db, a.proof_hash, tx_signature=a.tx_signature, now_ms=now,
                              inclusion_proof=a.inclusion_proof)
        if rec is not None:
            rec.extra["paid"] = {"tx_signature": a.tx_signature, "proof_hash": a.proof_hash.hex()}
            self.persist(rec.job_id)

    def notice_paid(self, job_id: str, worker: str, proof_hash: bytes, tx_signature: str,
                    inclusion_proof: str | None) -> None:
        """Tell a member its row was paid, and again until it acknowledges
        (``core/_notices.py``: a lost notice would stop an honest member)."""
        actions = self.host.notify_paid(job_id, worker, proof_hash, tx_signature, self.node.now_ms(),
                                        inclusion_proof=inclusion_proof)
        if self.adversary == "lose_notices":
            # Test networks only: the first send of each notice is lost on the
            # way (its resends are not): what resending is for (#16.3).
            self.counts["adversary:notices_lost"] += sum(1 for a in actions if isinstance(a, Send))
            actions = [a for a in actions if not isinstance(a, Send)]
        self.apply(actions)
