"""Jobs in the simulated world: one core host per node, carried over the modelled network.

Every node with a real identity runs a :class:`~p2pgpu.core.Host`, the same
object the libp2p node drives: formation (worker and submitter), membership
(heartbeats and loss detection between the members of a running job),
settlement, the member's deliveries.  This module is only its driver, the
twin of ``p2pgpu/node/_jobs.py``: it hands each host the bytes that reach
its node and the timers that fire at its own (skewed) clock, and carries out
the actions: ``Publish`` on the jobs topic goes through the GossipSub model
(the node's settings: its mesh only), a per-job topic to its current
subscribers, ``Send`` is a direct message over the modelled links (lost,
delayed, cut by partitions like any other), ``SetTimer`` an engine event.
Heartbeats and co-signatures are therefore real messages between members:
a member that goes down, or that a partition cuts off, stops beating, the
others detect the loss after ``member_timeout_ms`` and apply the manifest's
policy, and each co-signs what it observed.

What is modelled is the job's execution (a member runs for a random share
of ``jobs.duration_s``, then tells its host its part ended) and the ledger
(every planned payout batch confirms at once); proofs, co-signatures,
verification, quorum, what is owed and the batches are the real code.
Adversaries change what their nodes do at the few places a real node's
software could lie: what they send, whether they run, the proof they sign.

The ground truth only the simulator knows (who really ran, for how long,
who went down mid-job, who was cut off from every other member) is handed to
the invariant checker (``_invariants.py``) as it happens.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from p2pgpu.core import (
    CancelTimer,
    Confirmed,
    Emit,
    Failed,
    FormationConfig,
    MemberLost,
    Proof,
    Publish,
    Released,
    Reserved,
    Send,
    SetTimer,
    StartJob,
    StopJob,
    Subscribe,
    TimerKey,
    Unsubscribe,
    decode,
    sign_proof,
)
from p2pgpu.core._actions import (
    DeliveryDone,
    HandOver,
    InstallmentsOwed,
    ItemTaken,
    LateLine,
    LookupCollection,
    MemberDone,
    Refused,
    Settled,
)
from p2pgpu.core._host import Host, HostConfig, Via
from p2pgpu.core._identity import Verifier
from p2pgpu.core._installments import DEFAULT_INSTALLMENTS, UNPAID
from p2pgpu.core._manifest import Manifest, SignedManifest, sign_manifest
from p2pgpu.core._matching import matching
from p2pgpu.core._member import Delivery, MemberConfig, PartEnded
from p2pgpu.core._payout import Owed as PayoutOwed
from p2pgpu.core._payout import plan_batches
from p2pgpu.core._proof import chain_heads
from p2pgpu.core._settlement import item_hash

from ._payg import Payg
from ._receipts import SimReceipts
from ._scenario import JobSection
from ._trust import Challenges

if TYPE_CHECKING:
    from p2pgpu.core import Advert

    from ._gossip import Msg
    from ._world import World

rent_exempt_min_lamports = 890_880
initial_balance_lamports = 1_000_000_000
candidates_cache_max = 1024


class JobState(str, Enum):
    FORMING = "forming"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


TRANSITIONS: dict[JobState, tuple[JobState, ...]] = {
    JobState.FORMING: (JobState.RUNNING, JobState.FAILED),
    JobState.RUNNING: (JobState.DONE, JobState.FAILED),
    JobState.DONE: (),
    JobState.FAILED: (),
}


@dataclass(slots=True)
class Job:
    """What the simulator knows of one job (ground truth, for metrics and checks)."""

    jid: int
    job_id: str
    submitter: int
    manifest: Manifest
    t_submit_us: int
    state: JobState = JobState.FORMING
    members: list[int] = field(default_factory=list)
    t_confirm_us: int = 0
    reason: str = ""
    t_done_us: int = 0
    signed: Any = None
    settled: Any = None


@dataclass(slots=True)
class Run:
    """A member's modelled run of a job."""

    gen: int
    started_engine_ms: int
    started_node_ms: int


def sim_config(cfg: JobSection) -> HostConfig:
    """The hosts' settings: formation from ``[jobs]`` (defaults: the node's),
    membership timings from ``[jobs]`` too."""
    formation = FormationConfig(offer_window_ms=cfg.offer_window_ms, leader_timeout_ms=cfg.leader_timeout_ms,
                                member_timeout_ms=cfg.member_timeout_ms, lease_ms=cfg.lease_ms,
                                formation_timeout_ms=cfg.formation_timeout_ms,
                                spare_volunteers=cfg.spare_volunteers, late_volunteer_ms=cfg.late_volunteer_ms,
                                per_job_topics=cfg.per_job_topics)
    member = MemberConfig(heartbeat_interval_ms=cfg.heartbeat_interval_ms,
                          member_timeout_ms=cfg.member_loss_timeout_ms)
    installments = dataclasses.replace(DEFAULT_INSTALLMENTS, grace_ms=cfg.payment_grace_s * 1000)
    return HostConfig(formation=formation, member=member, installments=installments)


class JobFlow:
    def __init__(self, world: World, cfg: JobSection, *, verify: Verifier | None = None) -> None:
        self.world = world
        self.cfg = cfg
        self.rng = world.engine.stream("jobs")
        self.hconfig = sim_config(cfg)
        if world.mutation == "absolute_tolerance":
            # test-only breakage (#13): the 5 s absolute tolerance that paid an inflater 1.48x a 7 s job
            self.hconfig = dataclasses.replace(self.hconfig, settlement=dataclasses.replace(
                self.hconfig.settlement, tolerance_ms=5_000, tolerance_ppm=0))
        if world.mutation == "late_unpaid_stop":
            # test-only breakage: a member that keeps working 10 s past its grace when unpaid
            inst = self.hconfig.installments
            self.hconfig = dataclasses.replace(self.hconfig, installments=dataclasses.replace(
                inst, grace_ms=inst.grace_ms + 10_000))
        self.fconfig = self.hconfig.formation
        self.verify = verify
        #: Candidate lists per job (see :meth:`candidates`), computed once.
        self._cands: dict[str, list[str]] = {}
        n = world.n
        self.enabled = cfg.submitters > 0
        self.hosts: list[Host | None] = [None] * n
        self.topics: dict[str, dict[int, bool]] = {}
        self.timers: list[dict[TimerKey, int] | None] = [None] * n
        self.jobs: dict[int, Job] = {}
        self.by_job_id: dict[str, int] = {}
        self.formation_ms: list[float] = []
        self.emitted: dict[str, int] = {}
        self.misbehaved: dict[str, int] = {}
        #: Distinct (job, member) pairs some other member (or the submitter) reported lost.
        self.lost_pairs: dict[tuple[int, int], bool] = {}
        self.runs: dict[tuple[int, str], Run] = {}
        self._gens: dict[tuple[int, str], int] = {}
        self.proof_faults: dict[str, int] = {}
        self.owed: dict[int, list[PayoutOwed]] = {}
        self.owed_meta: dict[int, tuple[int, int]] = {}
        self.balances: dict[str, int] = {}
        self.batches = 0
        self.paid_total = 0
        self.paid_count = 0
        self.proofs_rejected = 0
        self.late_lines = 0
        self._next_owed = 1
        #: (job id, item hash) of what submitters took (their stores, for late resends).
        self.stored: dict[tuple[str, bytes], bool] = {}
        #: Each member's stored deliveries (the node's ``deliveries`` table):
        #: what it handed over for a submitter and was not acknowledged yet.  A
        #: restart that keeps the disk hands them to the new host, which sends
        #: them again, as the node does (``store/_recovery.py``).
        self.outbox: dict[int, dict[bytes, Delivery]] = {}
        #: The jobs each node that went down with its disk had submitted and
        #: were still forming (the node's ``jobs`` rows in state forming).
        self.forming_at_down: dict[int, list[int]] = {}
        #: Pay as you go: installments owed, paid with a notice, workers' exposure (sim/_payg.py).
        self.payg = Payg(self)
        real = [i for i in range(n) if world.nodes[i].real]
        self.submitters = sorted(self.rng.sample(real, min(len(real), cfg.submitters)))
        #: Hardware challenges by the submitters (sim/_trust.py).
        self.challenges = Challenges(self)
        #: Receipts at the end of the run, and receipt forgers (sim/_receipts.py).
        self.receipts = SimReceipts(self)
        for i in self.submitters:
            sn = world.nodes[i]
            sn.submitter = True
            if sn.book is None:
                sn.book = world._new_book()
                world.book_nodes.append(i)
            world.churn.churning[i] = False  # submitters stay up (their jobs are the measurement)
        world.book_nodes.sort()
        world.net.handlers["job.msg"] = self._on_direct

    # -- hosts -------------------------------------------------------------------------------
    def host(self, node: int) -> Host:
        h = self.hosts[node]
        if h is None:
            ident = self.world.nodes[node].identity
            assert ident is not None
            h = self.hosts[node] = Host(ident, self.hconfig, adverts=self.advert_of,
                                        candidates=lambda sm, _now: self.candidates(sm),
                                        submitter_of=self._submitter_of, verify=self.verify,
                                        claims=self.challenges.claims_of(node))
            self.topics.setdefault(self.fconfig.jobs_topic, {})[node] = True
        return h

    def on_own_advert(self, node: int, advert: Advert) -> None:
        """A node (re)signed its advert: its host's worker core follows it."""
        if not self.enabled:
            return
        if self.world.mutation == "overcommit" and self.world.nodes[node].adversary is None:
            # test-only breakage: the driver tells the core it has twice the GPUs it has
            advert = dataclasses.replace(advert, gpus=advert.gpus * 2, gpus_free=2 * advert.gpus_free)
        self.carry(node, self.host(node).set_advert(advert, self.world.node_now_ms(node)))

    def advert_of(self, peer_id: str) -> Advert | None:
        """The cores' advert book: every node's current advert (the simulated
        workers keep no books of their own; see :meth:`candidates`)."""
        node = self.world.by_peer.get(peer_id)
        return self.world.nodes[node].advert if node is not None else None

    def _submitter_of(self, job_id: str) -> str | None:
        job = self.jobs.get(self.by_job_id.get(job_id, 0))
        return job.manifest.submitter if job is not None else None

    def candidates(self, sm: SignedManifest) -> list[str] | None:
        """What the node's driver hands the cores: the peers whose adverts
        match the job with enough free GPUs.  The simulated workers keep no
        books, so every node gets the same list, made from each node's
        current advert (crashed nodes' included until they expire: a book is
        stale that way too) when the job is first seen."""
        if not self.cfg.candidates:
            return None
        got = self._cands.get(sm.job_id)
        if got is None:
            if len(self._cands) >= candidates_cache_max:
                self._cands.pop(next(iter(self._cands)))
            w = self.world
            now_ms = w.network_now_ms()
            live = [sn.advert for sn in w.nodes if sn.advert is not None and sn.advert.expires_at_ms > now_ms]
            live = self.challenges.view(w.by_peer.get(sm.manifest.submitter), live)
            got = [a.peer_id for a in matching(live, sm.manifest.requirements)]
            self._cands[sm.job_id] = got
        return got

    # -- carrying out the host's actions -----------------------------------------------------
    def carry(self, node: int, actions: list[Any]) -> None:
        w = self.world
        for a in actions:
            if isinstance(a, Send):
                if self._suppressed(node, a.data):
                    continue
                dst = w.by_peer.get(a.peer_id)
                if dst is not None and dst != node:
                    w.net.send(node, dst, len(a.data), "job.msg", a.data)
            elif isinstance(a, Publish):
                if self._suppressed(node, a.data):
                    continue
                if a.topic == self.fconfig.jobs_topic:
                    w.gossip.publish(node, a.topic, len(a.data), a.data)
                else:
                    for dst in self.topics.get(a.topic, {}):
                        if dst != node:
                            w.net.send(node, dst, len(a.data), "job.msg", a.data)
            elif isinstance(a, SetTimer):
                t = self._timers(node)
                gen = t.get(a.key, 0) + 1
                t[a.key] = gen
                w.engine.at(max(w.engine.now_us, w.engine_us_of(node, a.at_ms)), self._fire,
                            (node, w.net.epoch[node], a.key, gen))
            elif isinstance(a, CancelTimer):
                t = self._timers(node)
                t[a.key] = t.get(a.key, 0) + 1
            elif isinstance(a, Subscribe):
                self.topics.setdefault(a.topic, {})[node] = True
            elif isinstance(a, Unsubscribe):
                subs = self.topics.get(a.topic)
                if subs is not None:
                    subs.pop(node, None)
                    if not subs:
                        del self.topics[a.topic]
            elif isinstance(a, Emit):
                self.emitted[a.metric] = self.emitted.get(a.metric, 0) + a.value
            elif isinstance(a, Refused):
                self.misbehaved[a.reason.name] = self.misbehaved.get(a.reason.name, 0) + 1
            else:
                self._fact(node, a)

    def _fact(self, node: int, a: Any) -> None:
        w = self.world
        if isinstance(a, Reserved):
            w.checker.on_hold(node, self._jid(a.job_id), a.gpus)
            w.engine.trace("hold", node, self._jid(a.job_id), a.gpus)
        elif isinstance(a, Released):
            w.checker.on_release(node, self._jid(a.job_id))
            w.engine.trace("release", node, self._jid(a.job_id))
        elif isinstance(a, StartJob):
            self._start(node, a)
        elif isinstance(a, StopJob):
            if a.cause == UNPAID:
                self.payg.stopped(node, a.job_id)
            self._stop(node, a)
        elif isinstance(a, InstallmentsOwed):
            self.payg.owed(node, a)
        elif isinstance(a, Confirmed):
            self._confirmed(a)
        elif isinstance(a, Failed):
            job = self.jobs.get(self._jid(a.job_id))
            if job is not None and job.state is JobState.FORMING:
                self._to(job, JobState.FAILED)
                job.reason = a.reason
                w.engine.trace("job", job.jid, "failed")
        elif isinstance(a, MemberLost):
            lost = w.by_peer.get(a.peer_id)
            jid = self._jid(a.job_id)
            if lost is not None and jid:
                self.lost_pairs[(jid, lost)] = True
        elif isinstance(a, MemberDone):
            w.engine.trace("member_done", node, self._jid(a.job_id))
        elif isinstance(a, Settled):
            self._settled(node, a)
        elif isinstance(a, ItemTaken):
            self.stored[(a.job_id, a.item_hash)] = True  # what a node's store would hold
            member = w.by_peer.get(a.sender)
            if member is not None and a.kind in ("proof", "outputs"):
                w.checker.on_results(self._jid(a.job_id), member, a.received_ms)
        elif isinstance(a, LookupCollection):  # a resend after the collection was forgotten
            job = self.jobs.get(self._jid(a.job_id))
            members = [w.nodes[m].identity.peer_id for m in job.members  # type: ignore[union-attr]
                       ] if job is not None and job.members else None
            h = self.hosts[node]
            if h is not None:
                self.carry(node, h.on_stored(a.job_id, a.sender, a.item_hash, members=members,
                                             stored=(a.job_id, a.item_hash) in self.stored,
                                             now_ms=w.node_now_ms(node)))
        elif isinstance(a, LateLine):
            self._late_line(a)
        elif isinstance(a, HandOver):
            now_ms = w.node_now_ms(node)
            box = self.outbox.setdefault(node, {})
            for kind, wire in a.items:
                box[item_hash(wire)] = Delivery(item_hash=item_hash(wire), job_id=a.job_id, dest=a.dest, kind=kind,
                                                wire=wire, created_ms=now_ms)
        elif isinstance(a, DeliveryDone):
            pending = self.outbox.get(node)
            if pending is not None:
                pending.pop(a.item_hash, None)
                if not pending:
                    del self.outbox[node]

    def _suppressed(self, node: int, data: bytes) -> bool:
        """Adversaries act by not sending: a silent leader sends no proposal or
        certificate; a member that never accepts sends no accept."""
        adv = self.world.nodes[node].adversary
        if adv is None or not (adv.never_accepts or adv.silent_leader):
            return False
        obj = decode(data, size_max=len(data) + 1, canonical=False)
        kind = obj.get("k") if isinstance(obj, dict) else None
        if adv.never_accepts and kind == "accept":
            return True
        return adv.silent_leader and kind in ("proposal", "certificate")

    def _timers(self, node: int) -> dict[TimerKey, int]:
        t = self.timers[node]
        if t is None:
            t = self.timers[node] = {}
        return t

    def _fire(self, arg: tuple[int, int, TimerKey, int]) -> None:
        node, epoch, key, gen = arg
        w = self.world
        t = self.timers[node]
        h = self.hosts[node]
        if w.net.epoch[node] != epoch or not w.net.up[node] or t is None or t.get(key) != gen or h is None:
            return
        self.carry(node, h.on_timer(key, w.node_now_ms(node)))

    def _on_direct(self, dst: int, src: int, data: bytes) -> None:
        h = self.hosts[dst]
        if h is not None and self.world.net.up[dst]:
            self.carry(dst, h.on_bytes(data, self.world.node_now_ms(dst), via=Via.DIRECT))

    def on_topic(self, node: int, msg: Msg) -> None:
        """Gossip delivered something on the jobs topic to ``node``."""
        h = self.hosts[node]
        if msg.origin != node and h is not None:
            self.carry(node, h.on_bytes(msg.data, self.world.node_now_ms(node), via=Via.TOPIC))

    def on_node_down(self, node: int, *, lose_state: bool = False) -> None:
        """A node's host lives in memory: a restart begins afresh (its runs are
        lost); its stored deliveries survive unless its disk is gone."""
        w = self.world
        if lose_state:
            self.outbox.pop(node, None)
        # The jobs it submitted that were still forming: stored (as the node
        # stores them), taken up again when it comes back with its disk.
        self.forming_at_down[node] = [] if lose_state else [
            j.jid for j in self.jobs.values() if j.submitter == node and j.state is JobState.FORMING]
        for key in [k for k in self.runs if k[0] == node]:
            del self.runs[key]
            w.checker.on_member_down(self._jid(key[1]), node)
        self.hosts[node] = None
        self.timers[node] = None
        for subs in self.topics.values():
            subs.pop(node, None)
        w.checker.on_node_down(node)

    def on_node_up(self, node: int) -> None:
        """A node came back with its disk: the jobs it submitted that were still
        forming form again (``Host.resume_submitted``), and what it stored for
        submitters and was not acknowledged goes out again
        (``Host.restore_deliveries``), as the node does."""
        for jid in self.forming_at_down.pop(node, []):
            job = self.jobs[jid]
            if job.state is JobState.FORMING and job.signed is not None \
                    and self.world.nodes[node].identity is not None:
                self.world.engine.trace("job", jid, "resumed")
                self.carry(node, self.host(node).resume_submitted(job.signed, job.manifest.created_at_ms,
                                                                  self.world.node_now_ms(node)))
        box = self.outbox.get(node)
        if not box or self.world.nodes[node].identity is None:
            return
        self.world.engine.trace("deliveries_restored", node, len(box))
        saved = [dataclasses.replace(d, attempts=0, next_ms=0) for d in box.values()]
        self.carry(node, self.host(node).restore_deliveries(saved, self.world.node_now_ms(node)))

    def _jid(self, job_id: str) -> int:
        return self.by_job_id.get(job_id, 0)

    # -- submitting ----------------------------------------------------------------------
    def start(self) -> None:
        if self.submitters and self.cfg.rate_per_s > 0:
            self.world.engine.at(5_000_000, self._arrival, None)
            self.world.engine.at(2_000_000, self._pay_tick, None)
        self.challenges.start()

    def _arrival(self, _: Any) -> None:
        w = self.world
        if w.engine.now_us < w.quiet_us - int((self.cfg.duration_s + 5) * 1_000_000):
            self.submit(self.rng.choice(self.submitters))
        w.engine.after(int(self.rng.expovariate(self.cfg.rate_per_s) * 1_000_000) + 1, self._arrival, None)

    def submit(self, node: int) -> Job | None:
        w = self.world
        sn = w.nodes[node]
        assert sn.identity is not None
        if not w.net.up[node]:
            return None
        now_ms = w.node_now_ms(node)
        replicas = self.rng.choice(self.cfg.replicas_choices)
        m = Manifest(
            name="sim", submitter=sn.identity.peer_id, created_at_ms=now_ms,
            expires_at_ms=now_ms + 10 * 60 * 1000, nonce=self.rng.randbytes(16),
            nodes=self.rng.choice(self.cfg.nodes_choices),
            gpus_per_node=self.rng.choice(self.cfg.gpus_per_node_choices), command=("true",),
            duration_s_max=max(1, int(self.cfg.duration_s * 1.5)), price_per_gpu_hour_max=self.cfg.price_max,
            payer=sn.payout_address, replicas=replicas, quorum=replicas // 2 + 1,
            on_member_loss=self.cfg.on_member_loss, interval_s=self.cfg.interval_s,
        )
        sm = sign_manifest(sn.identity, m)
        jid = len(self.jobs) + 1
        job = Job(jid, sm.job_id, node, m, w.engine.now_us)
        job.signed = sm
        self.jobs[jid] = job
        self.by_job_id[sm.job_id] = jid
        w.engine.trace("job", jid, "submit", m.members)
        self.carry(node, self.host(node).submit(sm, now_ms))
        return job

    @staticmethod
    def _to(job: Job, new: JobState) -> None:
        if new not in TRANSITIONS[job.state]:
            raise AssertionError(f"job {job.jid}: {job.state.value} -> {new.value} is not in the table")
        job.state = new

    def _confirmed(self, a: Confirmed) -> None:
        w = self.world
        jid = self._jid(a.job_id)
        job = self.jobs[jid]
        members = [w.by_peer[p] for p in a.certificate.members]
        w.checker.on_confirm(jid, members)
        self._to(job, JobState.RUNNING)
        job.members = members
        job.t_confirm_us = w.engine.now_us
        self.formation_ms.append((job.t_confirm_us - job.t_submit_us) / 1000)
        self.challenges.on_confirmed(job.submitter, members)
        self.receipts.on_confirmed(jid, a.certificate)
        w.checker.on_confirmed_at(jid, w.node_now_ms(job.submitter))
        w.engine.trace("job", jid, "confirm", len(members))

    # -- running, on the member (the modelled execution) ------------------------------------
    def _start(self, node: int, a: StartJob) -> None:
        w = self.world
        jid = self._jid(a.job_id)
        w.checker.on_start(node, jid, a.manifest.manifest.gpus_per_node)
        w.engine.trace("start", node, jid)
        adv = w.nodes[node].adversary
        if adv is not None and adv.never_runs:
            return
        key = (node, a.job_id)
        gen = self._gens.get(key, 0) + 1
        self._gens[key] = gen
        self.runs[key] = Run(gen, w.engine.now_us // 1000, w.node_now_ms(node))
        w.checker.on_running(jid, node)
        self.carry(node, self.host(node).member_started(a.job_id, w.node_now_ms(node)))
        dur = self.rng.uniform(0.5, 1.0) * self.cfg.duration_s
        w.engine.after(int(dur * 1_000_000), self._end, (node, a.job_id, gen, False))

    def _stop(self, node: int, a: StopJob) -> None:
        run = self.runs.get((node, a.job_id))
        if run is not None:
            self._end((node, a.job_id, run.gen, True))

    def _end(self, arg: tuple[int, str, int, bool]) -> None:
        node, job_id, gen, stopped = arg
        w = self.world
        run = self.runs.get((node, job_id))
        h = self.hosts[node]
        if run is None or run.gen != gen or h is None:
            return  # stopped before, or the node went down
        del self.runs[(node, job_id)]
        jid = self._jid(job_id)
        job = self.jobs[jid]
        g = job.manifest.gpus_per_node
        end_ms = w.engine.now_us // 1000
        w.checker.on_finish(node, jid, g * (end_ms - run.started_engine_ms))
        sn = w.nodes[node]
        assert sn.identity is not None
        mr = h.members.get(job_id)
        if mr is not None and mr.membership.vouched_until_ms() is not None:
            w.checker.on_cut_off(jid, node)  # nobody vouches for its time after the last contact
        started = run.started_node_ms
        if w.mutation == "late_start_stamp" and sn.adversary is None:
            started += 2_000  # test-only breakage: a driver that stamps the start after its setup
        part = PartEnded(started_at_ms=started, ended_at_ms=w.node_now_ms(node), exit_code=0,
                         end_reason="exited", stopped=stopped,
                         output_digest=hashlib.sha256(job_id.encode()).digest(),  # the honest output of this job
                         gpus=tuple(f"{sn.gpus[0].model} #{i}" for i in range(g)))
        proof = None
        if sn.adversary is not None and mr is not None:
            proof = self._lie(node, job_id, mr.start.certificate.digest, part, job.manifest.duration_s_max * 1000)
        self.carry(node, h.member_ended(job_id, part, w.node_now_ms(node), proof=proof))

    def _lie(self, node: int, job_id: str, cert_hash: bytes, part: PartEnded, duration_ms_max: int) -> Any:
        """The proof an adversary signs instead of the honest one (or ``None``)."""
        sn = self.world.nodes[node]
        assert sn.adversary is not None and sn.identity is not None
        honest = {"started_at_ms": part.started_at_ms, "ended_at_ms": part.ended_at_ms,
                  "gpu_ms": len(part.gpus) * min(part.ended_at_ms - part.started_at_ms, duration_ms_max),
                  "output_digest": part.output_digest}
        claim = sn.adversary.proof_claim(dict(honest), duration_ms_max)
        if claim == honest:
            return None
        return sign_proof(sn.identity, Proof(
            job_id=job_id, cert_hash=cert_hash, peer_id=sn.identity.peer_id, gpus=part.gpus,
            exit_code=0, end_reason="exited", checkpoints=(),
            chain_head=chain_heads(job_id, cert_hash, sn.identity.peer_id, ())[-1], **claim))

    # -- settlement and payment, on the submitter ------------------------------------------------
    def _settled(self, node: int, s: Settled) -> None:
        """The submitter's settlement core decided: record the outcome, check
        it against the ground truth, queue what is owed for payment."""
        w = self.world
        jid = self._jid(s.job_id)
        job = self.jobs.get(jid)
        if job is None or job.state is not JobState.RUNNING:
            return
        job.settled = s
        self._to(job, JobState.DONE if s.succeeded else JobState.FAILED)
        job.reason = s.reason
        job.t_done_us = w.engine.now_us
        paid = [ln for ln in s.lines if ln.payable]
        w.engine.trace("job", jid, job.state.value, len(paid))
        w.checker.on_settled(jid, s)
        for ln in s.lines:
            self._line(job, ln)

    def _late_line(self, a: LateLine) -> None:
        job = self.jobs.get(self._jid(a.job_id))
        if job is None or job.settled is None:
            return
        self.late_lines += 1
        self.world.checker.on_line(job.jid, a.line, job.settled.lines)
        self._line(job, a.line)

    def _line(self, job: Job, ln: Any) -> None:
        """One member's line: counted, and owed (paid at the next tick)."""
        w = self.world
        if ln.status == "rejected":
            self.proofs_rejected += 1
            self.proof_faults[ln.fault] = self.proof_faults.get(ln.fault, 0) + 1
        sub = w.nodes[job.submitter]
        if not ln.payable or (sub.adversary is not None and sub.adversary.never_pays):
            return
        m = w.by_peer[ln.peer_id]
        row = PayoutOwed(owed_id=self._next_owed, proof_hash=ln.proof_hash,
                         payout_address=w.nodes[m].payout_address, amount=ln.amount, currency="SOL")
        self.owed_meta[self._next_owed] = (job.jid, m)
        self._next_owed += 1
        self.owed.setdefault(job.submitter, []).append(row)
        w.checker.on_owed(job.jid, m, ln.amount)

    def _pay_tick(self, _: Any) -> None:
        """Every submitter's payer: plan batches with the real payout core and
        settle them on a modelled ledger (confirmed in one step)."""
        w = self.world
        for sub, rows in sorted(self.owed.items()):
            if not rows:
                continue
            for r in rows:  # workers' wallets exist already (funded)
                self.balances.setdefault(r.payout_address, initial_balance_lamports)
            plan = plan_batches(rows, balances=self.balances, rent_exempt_min_lamports=rent_exempt_min_lamports,
                                transfers_max=19)
            paid_ids: dict[int, bool] = {}
            for batch in plan.batches:
                self.batches += 1
                w.engine.trace("batch", sub, batch.merkle_root().hex()[:16], batch.total)
                for t in batch.transfers:
                    self.balances[t.address] += t.amount
                in_batch = dict.fromkeys(batch.owed_ids, True)
                tx = self.receipts.batch(sub, batch.merkle_root(), [(t.address, t.amount) for t in batch.transfers])
                for row in rows:
                    if row.owed_id in in_batch:
                        paid_ids[row.owed_id] = True
                        jid, member = self.owed_meta.pop(row.owed_id)
                        self.receipts.paid(jid, member, row.proof_hash, tx, row.amount)
                        self.paid_total += row.amount
                        self.paid_count += 1
                        w.checker.on_paid(jid, member, row.proof_hash, row.amount,
                                          installment=self.payg.paid(sub, row.owed_id))
                        if w.mutation == "double_pay":
                            w.checker.on_paid(jid, member, row.proof_hash, row.amount,
                                          installment=self.payg.paid(sub, row.owed_id))
            self.owed[sub] = [r for r in rows if r.owed_id not in paid_ids]
        w.engine.after(2_000_000, self._pay_tick, None)

    # -- reporting ------------------------------------------------------------------------
    def running_count(self) -> int:
        return sum(1 for j in self.jobs.values() if j.state is JobState.RUNNING)

    def stats(self) -> dict[str, Any]:
        jobs = list(self.jobs.values())
        if not jobs:
            return {"jobs_submitted": 0}
        fms = sorted(self.formation_ms)
        counted = [j for j in jobs if j.state is not JobState.FORMING]

        def p(q: float) -> float | None:
            return round(fms[min(len(fms) - 1, round(q / 100 * (len(fms) - 1)))], 1) if fms else None

        return {
            "jobs_submitted": len(jobs),
            "jobs_formed": len(fms),
            "formation_success_ratio": round(len(fms) / len(counted), 4) if counted else None,
            "formation_latency_ms_p50": p(50),
            "formation_latency_ms_p99": p(99),
            "jobs_completed": sum(1 for j in jobs if j.state is JobState.DONE),
            "jobs_failed": sum(1 for j in jobs if j.state is JobState.FAILED),
            "members_lost": len(self.lost_pairs),
            "members_down_while_running": self.world.checker.down_while_running,
            "proofs_undeliverable": self.world.checker.undeliverable,
            "proofs_partitioned_past_deadline": self.world.checker.partitioned_proofs,
            "proofs_rejected": self.proofs_rejected,
            "proofs_capped": self.world.checker.capped,
            "late_lines": self.late_lines,
            "proof_faults": dict(sorted(self.proof_faults.items())),
            "payouts": self.paid_count,
            "payout_batches": self.batches,
            "paid_lamports": self.paid_total,
            "owed_unpaid_lamports": sum(r.amount for rows in self.owed.values() for r in rows),
            **self.payg.stats(),
            **self.challenges.stats(),
            **self.receipts.stats(),
            "formation_misbehaved": dict(sorted(self.misbehaved.items())),
            "formation_emitted": dict(sorted(self.emitted.items())),
        }
