"""The jobs driver: carries the formation cores' actions over libp2p.

:class:`JobsService` owns a :class:`~p2pgpu.core.FormationNode` (this node as
a worker and leader) and a :class:`~p2pgpu.core.Submitter` (this node as a
submitter).  It is a driver in CONVENTIONS.md's sense: decode, hand to the
core, carry out the actions.

- Manifests, offers, proposals and confirms travel on ``/p2pgpu/jobs/1`` (the
  core can use per-job topics, but a fresh topic's mesh takes GossipSub
  heartbeats to form); accepts, certificates, declines, confirms to one peer,
  heartbeats, logs, proofs, co-signatures and payment notices on direct
  streams (``/p2pgpu/direct/1.0.0``, one length-prefixed signed message per
  frame, one long-lived stream per peer: ``_direct.py``).  A ``Send`` to
  ourselves is delivered locally.
- Core calls are synchronous and never interleave (trio runs one task at a
  time and :meth:`apply` never awaits): publishes, sends and job starts go to
  bounded channels (or per-peer link queues) served by tasks of the
  service's nursery.
- Topic messages are handled in the GossipSub validator, which therefore
  refuses anything the cores refuse: rejected (costing the forwarder score)
  or ignored, as ``core/_verdict.py`` maps the reason.
- ``Reserved``/``Released`` keep the node's advert honest: its free GPUs are
  what the capacity ledger has not promised.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import trio
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID

from p2pgpu.core import (
    Advert, GossipVerdict, Kind, LocalProtocolError, PeerMisbehaved, Reason, SignedAdvert, body_of, decode,
    envelope_from_obj, seal, verdict_for,
)
from p2pgpu.core._actions import (
    Action, CancelTimer, Cancelled, Confirmed, Emit, Failed, MemberLost, Publish, Released, Reserved, Send,
    SetTimer, StartJob, StopJob, Subscribe, Unsubscribe,
)
from p2pgpu.core._formation import FormationConfig, FormationNode
from p2pgpu.core._formation_messages import Message, decode_message, message_bytes_max
from p2pgpu.core._formation_quota import Gate, PayerChecks
from p2pgpu.core._formation_submitter import Submitter
from p2pgpu.core._manifest import SignedManifest
from p2pgpu.core._matching import matching
from p2pgpu.core._owned_table import OwnedTable

from ._collect import Collection, Collector
from ._direct import DirectLinks, read_idle_s, serve_frames
from ._streams import guarded
from ._timers import Timers

if TYPE_CHECKING:
    from ._daemon import Node

log = logging.getLogger("p2pgpu.jobs")

JOBS_TOPIC = "/p2pgpu/jobs/1"
#: Every signed message to one peer (formation, heartbeats, logs, proofs, co-signatures).
DIRECT_PROTOCOL = "/p2pgpu/direct/1.0.0"
frame_bytes_max = message_bytes_max + 1024
_FORMATION_KINDS = ("manifest", "offer", "proposal", "accept", "decline", "certificate", "confirm", "cancel")
send_queue_max = 4096
#: Job records (``core._owned_table``): strangers' jobs, in all and per
#: submitter; and this node's own (submitted or worked on), which strangers'
#: records never evict.
records_max = 10_000
records_per_submitter_max = 256
own_records_max = 10_000


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


def _why_failed(item: dict[str, Any]) -> str:
    """One member's part of a failed job's reason: what the settlement said of
    its proof, or (a valid proof of a failed run) how its run ended."""
    if item["status"] == "owed":
        how = _END_WORDS.get(item.get("end_reason", ""), str(item.get("end_reason") or "ended"))
        return f"{how} (exit code {item.get('exit_code')})"
    return f"{item['status']} {item['reason']}".strip()


_END_WORDS = {"exited": "the command failed", "time_limit": "stopped at its time limit",
              "memory_limit": "killed at its memory limit", "output_limit": "stopped at its output size limit",
              "sandbox_error": "the sandbox failed", "cancelled": "cancelled", "member_lost": "a member was lost",
              "job_failed": "the job failed on another member", "interrupted": "the worker restarted mid-job"}


class JobsService:
    def __init__(self, node: "Node", *, rng: random.Random, config: FormationConfig | None = None) -> None:
        # One topic for every job's formation messages: a fresh per-job topic
        # needs GossipSub heartbeats to build its mesh before the first offer
        # gets through (measured: 7-10 s for 2-node jobs on 8 loopback
        # processes), while the shared topic's mesh is already there.
        # The offer window only matters when the best-ranked expected volunteer
        # stays silent (otherwise it closes as soon as that one is heard): long
        # enough for the manifest's spread on a busy machine.
        config = config or FormationConfig(per_job_topics=False, member_timeout_ms=600, leader_timeout_ms=1500,
                                           offer_window_ms=200, late_volunteer_ms=600,
                                           network=getattr(node.book, "network", ""))
        self.node = node
        self.rng = rng
        self.config = config
        self.counts: Counter[str] = node.counts
        self.timers = Timers(node.now_ms)
        self.submitter = Submitter(node.identity, config, adverts=self.advert_of)
        self.formation: FormationNode | None = None
        self.records: OwnedTable[str, JobRecord] = OwnedTable(
            theirs_max=records_max, per_owner_max=records_per_submitter_max, ours_max=own_records_max)
        self.runner: Runner | None = None
        self.runner_obj: Any = None
        self.on_stop: Callable[[StopJob], None] | None = None
        self.collector = Collector(self)
        #: Set by the node when its ledger is shared (an RPC endpoint).
        self.payer_check: Any = None
        self.payer_checks = PayerChecks()
        self._check_send, self._check_recv = trio.open_memory_channel[tuple[str, str]](1024)
        self.db: Any = None  # sqlite3.Connection in the home, when there is one
        self._ops_send, self._ops_recv = trio.open_memory_channel[tuple[str, str, bytes]](send_queue_max)
        self.links: DirectLinks | None = None
        self._start_send, self._start_recv = trio.open_memory_channel[StartJob](1024)
        self._topic_scopes: dict[str, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None

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
            task_status.started()

    def on_advert(self, sa: SignedAdvert) -> None:
        """Our advert changed (or exists for the first time)."""
        now = self.node.now_ms()
        if self.formation is None:
            self.formation = FormationNode(self.node.identity, sa, self.config, adverts=self.advert_of)
        else:
            self.apply(self.formation.update_advert(sa, now), origin="formation")

    def advert_of(self, peer_id: str) -> Advert | None:
        """The cores' view of the advert book: who may volunteer, lead and be
        a member (``core/_formation_rules.py``)."""
        sa = self.node.book.adverts.get(peer_id)
        return sa.advert if sa is not None else None

    # -------------------------------------------------------------- inbound

    def _validate(self, forwarder: ID, msg: Any) -> GossipVerdict:
        stack = self.node.stack
        if stack is not None and msg.from_id == stack.host.get_id().to_bytes():
            return GossipVerdict.ACCEPT  # our own publish; the cores already know
        try:
            self.deliver(msg.data, via="topic")
        except PeerMisbehaved as exc:
            self.counts[f"jobs:{exc.reason.name.lower()}"] += 1
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
        self.deliver(data, via="stream")

    def deliver(self, data: bytes, *, via: str) -> None:
        """Decode one message and hand it to the cores; ``PeerMisbehaved`` if bad."""
        try:
            self._deliver(data, via=via)
        except (LocalProtocolError, ValueError, KeyError) as exc:
            # The message was well formed but a core refused to take it (our bug,
            # or a state we did not foresee): count and log, never crash.
            self.counts["jobs:internal_error"] += 1
            log.exception("handling a %s message failed (a bug: please report it): %s", via, exc)

    def _deliver(self, data: bytes, *, via: str) -> None:
        obj = decode(data, size_max=frame_bytes_max, canonical=True)
        kind = obj.get("k") if isinstance(obj, dict) else None
        if kind in _FORMATION_KINDS:
            self._route(decode_message(data))
        elif via == "topic":
            raise PeerMisbehaved(Reason.WRONG_KIND, f"{kind!r} does not travel on a topic")
        elif kind == "heartbeat":
            body = body_of(envelope_from_obj(obj, expected=Kind.HEARTBEAT))
            job_id = body.get("job_id")
            if self.runner_obj is not None and isinstance(job_id, str):
                self.runner_obj.on_heartbeat(job_id, data)
        elif kind == "proof":
            self.collector.on_proof(data)
        elif kind == "cosign":
            self.collector.on_cosign(data)
        elif kind == "result":
            env = envelope_from_obj(obj, expected=Kind.RESULT)
            body = body_of(env)
            if body.get("type") == "paid":
                self._on_paid(body, env.signer_peer_id)
            elif body.get("type") in ("ray_rendezvous", "ray_done"):
                if self.runner_obj is not None:
                    self.runner_obj.on_member_message(body, env.signer_peer_id)
            elif body.get("type") == "proof_ack":
                if self.runner_obj is not None:
                    self.runner_obj.on_ack(body, env.signer_peer_id)
            else:
                self.collector.on_result(body, env.signer_peer_id, data)
        else:
            raise PeerMisbehaved(Reason.WRONG_KIND, f"unexpected message kind {kind!r}")

    def _route(self, msg: Message) -> None:
        now = self.node.now_ms()
        job_id = msg.job_id
        ours = job_id in self.submitter.jobs
        if isinstance(msg, SignedManifest):
            if self.formation is not None and job_id in self.formation.jobs:
                return  # a republish of a manifest we already have
            if not ours and self.formation is not None:
                # Quotas first: a stranger's flood beyond its share costs no
                # record and no balance lookup, and is not forwarded.
                self.formation.check_admission(msg, now)
            self._record(msg, now)
            if not ours and not self._payer_gate(msg, now):
                return  # held for a balance check, or refused: the payer cannot pay
        if ours:
            self.apply(self.submitter.on_message(msg, now), origin="submitter")
        if self.formation is not None:
            if isinstance(msg, SignedManifest):
                try:
                    self.apply(self.formation.on_manifest(msg, now, self.candidates(msg)), origin="formation")
                except PeerMisbehaved as exc:
                    if not ours:
                        raise
                    # Our own job beyond our own worker's quota: others serve it.
                    self.counts[f"jobs:own_not_volunteering_{exc.reason.name.lower()}"] += 1
            else:
                self.apply(self.formation.on_message(msg, now), origin="formation")

    def candidates(self, sm: SignedManifest) -> list[str]:
        """The peers whose adverts say they can serve the job now (matching,
        enough free GPUs, unexpired): the cores let only the best-ranked few
        of them volunteer at once (``FormationConfig.spare_volunteers``).  A
        stale entry costs time, never safety."""
        return [a.peer_id for a in matching(self.node.book.live(self.node.now_ms()), sm.manifest.requirements)]

    # ------------------------------------------------ can the submitter pay?

    def _payer_gate(self, sm: SignedManifest, now: int) -> bool:
        """True when this node may consider the job now.  On a shared ledger
        the payer's balance must cover this job's price ceiling *plus* the
        ceilings of its jobs already open here (``core._formation_quota``:
        ``PayerChecks`` decides, the formation core counts what is open).  An
        unknown payer's balance is looked up first, the manifest held
        meanwhile (a few per payer).  With the embedded ledger (private to
        this node) there is nothing to check against, and every job is
        considered."""
        if self.payer_check is None:
            return True
        m = sm.manifest
        open_lamports = self.formation.open_ceiling(m.payer, m.currency) if self.formation is not None else 0
        verdict = self.payer_checks.gate(sm, now, open_lamports=open_lamports)
        if verdict.gate is Gate.REFUSE:
            self._decline_unpaid(sm, verdict.reason)
        elif verdict.lookup:
            self._queue(self._check_send, (m.payer, m.currency), "payer_check")
        return verdict.gate is Gate.ADMIT

    def _decline_unpaid(self, sm: SignedManifest, reason: str) -> None:
        self.counts["jobs:payer_cannot_pay"] += 1
        rec = self.records.get(sm.job_id)
        if rec is not None:
            rec.reason = f"not volunteering: {reason}"
        log.info("not volunteering for %s: %s", sm.job_id[:12], reason)

    async def _payer_check_worker(self) -> None:
        async for payer, currency in self._check_recv:
            balance = await self.payer_check.balance(payer, currency)
            now = self.node.now_ms()
            for sm in self.payer_checks.resolved(payer, currency, balance, now):
                if self.formation is None or sm.job_id in self.formation.jobs or not self._payer_gate(sm, now):
                    continue
                try:
                    self.apply(self.formation.on_manifest(sm, now, self.candidates(sm)), origin="formation")
                except PeerMisbehaved as exc:  # expired while we checked, or a quota filled meanwhile
                    self.counts[f"jobs:{exc.reason.name.lower()}"] += 1

    def _record(self, sm: SignedManifest, now: int, *, ours: bool = False) -> JobRecord:
        """The job's record, made if new: a stranger's (evictable within its
        submitter's quota) or, with ``ours``, one of this node's own jobs
        (``core._owned_table``: never evicted by strangers' records)."""
        rec = self.records.get(sm.job_id)
        if rec is None:
            rec = JobRecord(job_id=sm.job_id, name=sm.manifest.name, roles=[], state="seen", seen_at_ms=now,
                            manifest=sm)
            self.records.put(sm.job_id, rec, owner=sm.manifest.submitter, ours=ours)
        elif ours:
            self.records.make_ours(sm.job_id)
        return rec

    def _fire(self, key: str, now: int) -> None:
        try:
            self._fire_unguarded(key, now)
        except (LocalProtocolError, PeerMisbehaved, ValueError, KeyError) as exc:
            # A core refusing its own timer is our bug; it must not stop the node.
            self.counts["jobs:timer_error"] += 1
            log.exception("timer %s failed (a bug: please report it): %s", key, exc)

    def _fire_unguarded(self, key: str, now: int) -> None:
        if key.startswith("membership/"):
            if self.runner_obj is not None:
                self.runner_obj.on_timer(key, now)
        elif key.startswith("x/"):
            self.collector.on_timer(key, now)
        elif key.startswith("s/"):
            self.apply(self.submitter.on_timer(key, now), origin="submitter")
        elif key.startswith("f/") and self.formation is not None:
            self.apply(self.formation.on_timer(key, now), origin="formation")

    # ------------------------------------------------------------- outbound

    def apply(self, actions: list[Action], *, origin: str) -> None:
        """Carry out the cores' actions.  Never awaits: see the module docstring."""
        me = self.node.identity.peer_id
        for a in actions:
            if isinstance(a, Send):
                if a.peer_id == me:
                    self._local(a.data)
                else:
                    self._send_out(a.peer_id, a.data)
            elif isinstance(a, Publish):
                self._queue(self._ops_send, ("pub", a.topic, a.data), "publish")
                if origin == "submitter" and a.topic == self.config.jobs_topic:
                    self._local(a.data)  # our own node may serve our own job
            elif isinstance(a, Subscribe):
                if a.topic != JOBS_TOPIC:  # always subscribed; a second subscription would replace ours
                    self._queue(self._ops_send, ("sub", a.topic, b""), "subscribe")
            elif isinstance(a, Unsubscribe):
                if a.topic != JOBS_TOPIC:
                    self._queue(self._ops_send, ("unsub", a.topic, b""), "unsubscribe")
            elif isinstance(a, SetTimer):
                self.timers.set(a.key, a.at_ms)
            elif isinstance(a, CancelTimer):
                self.timers.cancel(a.key)
            elif isinstance(a, Emit):
                self.counts[a.metric] += a.value
            elif isinstance(a, (Reserved, Released)):
                total = len(self.node.inventory.gpus)
                self.node.gpus_reserved = max(0, total - a.gpus_free)
                self.node.capacity_changed()
                rec = self.records.get(a.job_id)
                if rec is not None and isinstance(a, Reserved) and rec.state == "seen":
                    rec.state = "reserved"
            elif isinstance(a, StartJob):
                self._on_start(a)
            elif isinstance(a, StopJob):
                rec = self.records.get(a.job_id)
                if rec is not None and rec.state in ("confirmed", "running"):
                    rec.reason = a.reason
                if self.on_stop is not None:
                    self.on_stop(a)
            elif isinstance(a, Confirmed):
                sub = self.submitter.jobs.get(a.job_id)
                rec = self._record(sub.sm, self.node.now_ms(), ours=True) if sub is not None \
                    else self.records.get(a.job_id)
                if rec is not None:
                    if sub is not None and "submitter" not in rec.roles:
                        rec.roles.append("submitter")
                    rec.state = "confirmed"
                    rec.confirmed_at_ms = self.node.now_ms()
                    rec.members = list(a.certificate.members)
                    rec.certificate = a.certificate.digest.hex()
                    self.collector.open(rec.manifest, a.certificate, self.node.now_ms())
                    self.persist(a.job_id)
                self.counts["jobs_confirmed"] += 1
            elif isinstance(a, (Failed, Cancelled)):
                rec = self.records.get(a.job_id)
                if rec is not None:
                    rec.state = "failed" if isinstance(a, Failed) else "cancelled"
                    rec.reason = a.reason
                    rec.ended_at_ms = self.node.now_ms()
                    self.persist(a.job_id)
            elif isinstance(a, MemberLost):
                rec = self.records.get(a.job_id)
                if rec is not None:
                    rec.extra.setdefault("lost_members", []).append(a.peer_id)
                mj = self.runner_obj.running.get(a.job_id) if self.runner_obj is not None else None
                if mj is not None and mj.ray is not None and a.peer_id in mj.start.certificate.members:
                    mj.ray.member_lost(a.peer_id)
            else:
                log.warning("unhandled action %r", a)

    def send(self, peer_id: str, data: bytes) -> None:
        """Send one signed message to a peer (ourselves included)."""
        self.apply([Send(peer_id, data)], origin="exec")

    def _local(self, data: bytes) -> None:
        try:
            self.deliver(data, via="local")
        except PeerMisbehaved as exc:  # our own message: a bug, but never fatal
            log.error("our own message was refused: %s", exc)
            self.counts["jobs:own_message_refused"] += 1

    def _queue(self, chan: Any, item: Any, what: str) -> None:
        try:
            chan.send_nowait(item)
        except trio.WouldBlock:
            # Formation retries what matters (accepts, certificates, confirms).
            self.counts[f"jobs:{what}_queue_full"] += 1

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

    def _send_out(self, peer_id: str, data: bytes) -> None:
        if self.links is None:
            self.counts["jobs:send_not_running"] += 1
            return
        # Formation retries what matters (accepts, certificates, confirms).
        self.links.send(peer_id, data)

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
        except Exception:  # noqa: BLE001 - the boundary between one job and the node
            self.counts["exec:internal_error"] += 1
            log.exception("job %s: internal error in the runner (a bug: please report it)", start.job_id[:12])
            rec = self.records.get(start.job_id)
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
        self.apply(self.submitter.submit(sm, now, self.candidates(sm)), origin="submitter")

    def cancel(self, job_id: str) -> None:
        now = self.node.now_ms()
        rec = self.records.get(job_id)
        if rec is not None and rec.state in ("succeeded", "failed", "cancelled", "interrupted"):
            return  # it already ended: cancelling must not rewrite its outcome
        if job_id in self.submitter.jobs:
            self.apply(self.submitter.cancel(job_id, now), origin="submitter")

    def finished(self, job_id: str) -> None:
        """A job this node ran has ended: free its capacity."""
        if self.formation is not None:
            self.apply(self.formation.finish(job_id, self.node.now_ms()), origin="formation")

    def status(self, job_id: str) -> dict[str, Any] | None:
        rec = self.records.get(job_id)
        if rec is None:
            matches = [r for r in self.records if r.startswith(job_id)] if len(job_id) >= 6 else []
            if len(matches) != 1:
                return None
            rec = self.records[matches[0]]
        doc = rec.to_json()
        doc["proofs"] = list(rec.extra.get("proofs", []))
        doc["payouts"] = self.payouts_of(rec.job_id)
        progress = self.submitter.progress(rec.job_id)
        if progress is not None:
            doc["formation"] = {"state": progress.state.name.lower(), "offers": progress.offers,
                                "accepts": progress.accepts, "views_seen": progress.views_seen,
                                "certificates_refused": progress.certificates_refused,
                                "last_refusal": progress.refusal, "members_needed": progress.members_needed}
        if self.formation is not None:
            ws = self.formation.state(rec.job_id)
            if ws is not None:
                doc["worker_state"] = ws.name.lower()
        return doc

    def payouts_of(self, job_id: str) -> list[dict[str, Any]]:
        if self.db is None:
            return []
        from p2pgpu.store import payouts  # noqa: PLC0415

        return [p for p in payouts(self.db) if p["job_id"] == job_id]

    def logs_of(self, job_id: str) -> list[dict[str, Any]]:
        """The submitter's collected logs of all members, else our own."""
        c = self.collector.collections.get(job_id)
        if c is not None:
            return list(c.logs)
        stored = self.collector.stored_logs(job_id)  # a job settled before a restart
        if stored:
            return stored
        runner = self.runner_obj
        return list(runner.logs.get(job_id, [])) if runner is not None else []

    def counts_by_state(self) -> dict[str, int]:
        out: Counter[str] = Counter(r.state for r in self.records.values() if r.roles)
        return dict(sorted(out.items()))

    # ------------------------------------------------------------- the store

    def persist(self, job_id: str) -> None:
        rec = self.records.get(job_id)
        if self.db is None or rec is None or not rec.roles:
            return
        from p2pgpu.store import save_job  # noqa: PLC0415

        save_job(self.db, job_id=job_id, manifest=rec.manifest.wire, roles=rec.roles, state=rec.state,
                 record=rec.to_json(), now_ms=self.node.now_ms())

    def load(self) -> None:
        """Jobs known before a restart: nothing recorded is lost.  A job that
        was running here when the node died is marked interrupted."""
        if self.db is None:
            return
        from p2pgpu.core._manifest import verify_manifest  # noqa: PLC0415
        from p2pgpu.store import load_jobs  # noqa: PLC0415

        for row in load_jobs(self.db, limit=records_max):
            try:
                sm = verify_manifest(bytes(row["manifest"]), now_ms=0, clock_skew_ms=2**62)
            except PeerMisbehaved as exc:
                log.warning("stored manifest %s no longer verifies: %s", row["job_id"][:12], exc)
                continue
            import json  # noqa: PLC0415

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
            self.records.put(rec.job_id, rec, owner=sm.manifest.submitter, ours=bool(rec.roles))
        # Jobs we submitted whose results were still coming in, and what we
        # ran and owe the submitter (a proof, co-signatures): see _collect.py.
        self.collector.reopen(self.node.now_ms())
        if self.runner_obj is not None:
            self.runner_obj.recover(self.node.now_ms())

    def record_earning(self, proof_hash: bytes, job_id: str, amount: int, currency: str) -> None:
        if self.db is None or amount <= 0:
            return
        from p2pgpu.store import record_earning, transaction  # noqa: PLC0415

        with transaction(self.db):
            record_earning(self.db, proof_hash, job_id=job_id, amount=amount, currency=currency,
                           payout_address=self.node.payout_address, created_ms=self.node.now_ms())

    def _payout_address_of(self, peer_id: str) -> str:
        if peer_id == self.node.identity.peer_id:
            return self.node.payout_address
        sa = self.node.book.adverts.get(peer_id)
        return sa.advert.payout_address if sa is not None else ""

    def store_settlement(self, c: Collection, rows: list[Any], verdicts: dict[str, tuple[str, str]]) -> None:
        """Record every proof's verdict and what it owes in one transaction."""
        rec = self.records.get(c.job_id)
        now = self.node.now_ms()
        m = c.sm.manifest
        summary: list[dict[str, Any]] = []
        by_peer = {r.peer_id: r for r in rows}
        for peer in c.cert.members:
            sp = c.proofs.get(peer)
            if sp is None:
                summary.append({"worker": peer, "status": "missing", "amount": 0, "proof_hash": "",
                                "reason": "no proof arrived"})
                continue
            row = by_peer.get(peer)
            status, reason = verdicts.get(peer, (row.status if row else "rejected", ""))
            amount = row.amount if row is not None else 0
            address = c.payout_addresses.get(peer) or self._payout_address_of(peer)
            if status == "paid" and amount > 0 and not address:
                status, reason = "no_payout_address", "the worker advertises no payout address"
            summary.append({"worker": peer, "status": "owed" if status == "paid" else status, "amount": amount,
                            "proof_hash": sp.proof_hash.hex(), "reason": reason, "gpu_ms": sp.proof.gpu_ms,
                            "payout_address": address, "exit_code": sp.proof.exit_code,
                            "end_reason": sp.proof.end_reason,
                            "output_digest": sp.proof.output_digest.hex()})
        if rec is not None:
            ok = all(i["status"] == "owed" and i.get("exit_code") == 0 for i in summary)
            if m.replicas > 1:
                ok = sum(1 for i in summary if i["status"] == "owed") >= m.quorum * m.nodes
            rec.state = "succeeded" if ok else "failed"
            if not ok and not rec.reason:
                bad = [i for i in summary if i["status"] != "owed" or i.get("exit_code") != 0]
                rec.reason = "; ".join(f"{i['worker'][:12]}: {_why_failed(i)}" for i in bad)
            rec.ended_at_ms = now
            rec.extra["proofs"] = summary
            rec.extra["member_outputs"] = {p: list(o) for p, o in sorted(c.outputs.items())}
        if self.db is not None:
            from p2pgpu.store import record_owed, record_proof, transaction  # noqa: PLC0415

            # The verdicts, what they owe, the job's outcome and the
            # collection's "settled" flag: all or nothing.
            with transaction(self.db):
                self.collector.store_settled(c, now)
                self.persist(c.job_id)
                for item in summary:
                    if not item["proof_hash"]:
                        continue
                    peer = item["worker"]
                    sp = c.proofs[peer]
                    cosigns = [w for (obs, subj), w in sorted(c.cosigns.items()) if subj == peer]
                    record_proof(self.db, proof_hash=sp.proof_hash, job_id=c.job_id, peer_id=peer, wire=sp.wire,
                                 cosigns=cosigns, status=item["status"], reason=item["reason"],
                                 amount=item["amount"], currency=m.currency, gpu_ms=sp.proof.gpu_ms, now_ms=now)
                    if item["status"] == "owed" and item["amount"] > 0:
                        record_owed(self.db, sp.proof_hash, peer, item["payout_address"], item["amount"],
                                    m.currency, c.job_id, created_ms=now)
        self.counts["jobs_settled"] += 1
        self.node.payouts_due()

    def _on_paid(self, body: dict[str, Any], signer: str) -> None:
        """The submitter says one of our proofs was paid: note the signature."""
        job_id, proof_hash, sig = body.get("job_id"), body.get("proof_hash"), body.get("tx_signature")
        rec = self.records.get(job_id) if isinstance(job_id, str) else None
        if rec is None or rec.manifest.manifest.submitter != signer:
            raise PeerMisbehaved(Reason.UNKNOWN_JOB, "payment notice from someone who did not submit that job")
        if not isinstance(proof_hash, bytes) or len(proof_hash) != 32 or not isinstance(sig, str) or len(sig) > 128:
            raise PeerMisbehaved(Reason.BAD_SCHEMA, "payment notice needs proof_hash (32 bytes) and tx_signature")
        if self.db is not None:
            from p2pgpu.store import mark_earning_paid  # noqa: PLC0415

            mark_earning_paid(self.db, proof_hash, tx_signature=sig, now_ms=self.node.now_ms(),
                              inclusion_proof=body.get("inclusion_proof") if isinstance(
                                  body.get("inclusion_proof"), str) else None)
        rec.extra["paid"] = {"tx_signature": sig, "proof_hash": proof_hash.hex()}
        self.persist(rec.job_id)

    def notice_paid(self, job_id: str, worker: str, proof_hash: bytes, tx_signature: str,
                    inclusion_proof: str | None) -> None:
        body: dict[str, Any] = {"type": "paid", "job_id": job_id, "proof_hash": proof_hash,
                                "tx_signature": tx_signature}
        if inclusion_proof:
            body["inclusion_proof"] = inclusion_proof
        self.send(worker, seal(self.node.identity, Kind.RESULT, body).to_bytes())
