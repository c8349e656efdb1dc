"""Jobs in the simulated world: the real formation cores, execution, payouts.

Every node with a real identity runs a :class:`~p2pgpu.core.FormationNode`
built from its own signed advert; every submitter runs a
:class:`~p2pgpu.core.Submitter`.  Submitters sign real manifests
(:func:`~p2pgpu.core.sign_manifest`).  This module is their driver, the twin
of the node's: it carries the cores' actions (``docs/formation.md``,
"Driving the cores") onto the simulated network: ``Publish`` on the jobs
topic is GossipSub to every node; ``Publish`` on a per-job topic goes to the
topic's current subscribers directly (a topic of a handful of peers is one
hop in GossipSub); ``Send`` is a direct message; ``SetTimer`` is an engine
event at the node's own (skewed) clock.  Each message is decoded and verified
once where it is sent (``decode_message``) and the verified object handed to
every receiver, as ``tests/core/swarm.py`` does.

Execution is modelled (a member runs for a random share of the job's time,
then tells its ``FormationNode`` it finished); proofs and payment are real: the
member signs a :class:`~p2pgpu.core.Proof` (no checkpoints), the other members
co-sign what they observed (:class:`~p2pgpu.core.Cosign`, from the time both
ran), the submitter runs :func:`~p2pgpu.core.verify_proof` (with its own
window of each member: confirmation to the proof's arrival) and
:func:`~p2pgpu.core.owed` (agreed prices from the certificate, quorum over
replicas) and pays the rows through the real :func:`plan_batches` of
``core/_payout.py``, on a ledger that confirms every planned batch at once.
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
    Cosign,
    Emit,
    Failed,
    FormationConfig,
    FormationNode,
    MemberLost,
    PeerMisbehaved,
    Proof,
    ProofRejected,
    ProofTerms,
    Publish,
    Released,
    Reserved,
    Send,
    SetTimer,
    SignedCosign,
    StartJob,
    StopJob,
    Submitter,
    Subscribe,
    Unsubscribe,
    Window,
    agreed_prices,
    certificate_hash,
    decode_cosign,
    owed,
    sign_cosign,
    sign_proof,
    verify_proof,
)
from p2pgpu.core._formation_messages import Accept, Certified, Proposal, decode_message
from p2pgpu.core._manifest import Manifest, SignedManifest, sign_manifest
from p2pgpu.core._matching import matching
from p2pgpu.core._payout import Owed as PayoutOwed
from p2pgpu.core._payout import plan_batches
from p2pgpu.core._proof import chain_heads

from ._scenario import JobSection

if TYPE_CHECKING:
    from p2pgpu.core import Advert

    from ._gossip import Msg
    from ._world import World

rent_exempt_min_lamports = 890_880
initial_balance_lamports = 1_000_000_000
decoded_cache_max = 100_000
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
    jid: int
    job_id: str
    submitter: int
    manifest: Manifest
    t_submit_us: int
    state: JobState = JobState.FORMING
    members: list[int] = field(default_factory=list)
    t_confirm_us: int = 0
    #: member -> its signed proof (bytes, as received)
    results: dict[int, bytes] = field(default_factory=dict)
    #: member -> when its proof reached the submitter (the submitter's clock)
    results_at_ms: dict[int, int] = field(default_factory=dict)
    #: when the submitter confirmed the cluster (its clock)
    confirmed_at_ms: int = 0
    cosigns: list[bytes] = field(default_factory=list)
    certificate: Any = None
    signed: Any = None
    reason: str = ""
    t_done_us: int = 0

    def to(self, new: JobState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise AssertionError(f"job {self.jid}: {self.state.value} -> {new.value} is not in the table")
        self.state = new


class JobFlow:
    def __init__(self, world: World, cfg: JobSection) -> None:
        self.world = world
        self.cfg = cfg
        self.rng = world.engine.stream("jobs")
        self.fconfig = FormationConfig(offer_window_ms=cfg.offer_window_ms, leader_timeout_ms=cfg.leader_timeout_ms,
                                       member_timeout_ms=cfg.member_timeout_ms, lease_ms=cfg.lease_ms,
                                       formation_timeout_ms=cfg.formation_timeout_ms,
                                       spare_volunteers=cfg.spare_volunteers,
                                       late_volunteer_ms=cfg.late_volunteer_ms)
        #: Candidate lists per job (see :meth:`candidates`), computed once.
        self._cands: dict[str, list[str]] = {}
        n = world.n
        self.enabled = cfg.submitters > 0
        self.fnodes: list[FormationNode | None] = [None] * n
        self.subs: dict[int, Submitter] = {}
        self.topics: dict[str, dict[int, bool]] = {}
        self.timers: list[dict[str, int] | None] = [None] * n
        self.jobs: dict[int, Job] = {}
        self.by_job_id: dict[str, int] = {}
        self.formation_ms: list[float] = []
        self.emitted: dict[str, int] = {}
        self.misbehaved: dict[str, int] = {}
        self.members_lost = 0
        self._decoded: dict[bytes, Any] = {}
        self._runs: dict[tuple[int, str], int] = {}  # (node, job_id) -> run generation
        self._started: dict[tuple[int, str], tuple[int, Any]] = {}  # (node, job_id) -> (start ms, certificate)
        self.proof_faults: dict[str, int] = {}
        self.owed: dict[int, list[PayoutOwed]] = {}
        self.owed_meta: dict[int, tuple[int, int]] = {}
        self.balances: dict[str, int] = {}
        self.batches = 0
        self.paid_total = 0
        self.paid_count = 0
        self.proofs_rejected = 0
        self._next_owed = 1
        real = [i for i in range(n) if world.nodes[i].real]
        self.submitters = sorted(self.rng.sample(real, min(len(real), cfg.submitters)))
        for i in self.submitters:
            sn = world.nodes[i]
            sn.submitter = True
            if sn.book is None:
                sn.book = world._new_book()
                world.book_nodes.append(i)
            world.churn.churning[i] = False  # submitters stay up (their jobs are the measurement)
            assert sn.identity is not None
            self.subs[i] = Submitter(sn.identity, self.fconfig, adverts=self.advert_of)
        world.book_nodes.sort()
        world.net.handlers["fm.msg"] = self._on_direct
        world.net.handlers["job.proof"] = self._on_proof
        world.net.handlers["job.cosign"] = self._on_cosign

    # -- the driver: carrying out the cores' actions ---------------------------------------
    def on_own_advert(self, node: int, advert: Advert) -> None:
        """A node (re)signed its advert: start its formation core, or update it."""
        if not self.enabled:
            return
        if self.world.mutation == "overcommit" and self.world.nodes[node].adversary is None:
            # test-only breakage: the driver tells the core it has twice the GPUs it has
            advert = dataclasses.replace(advert, gpus=advert.gpus * 2, gpus_free=2 * advert.gpus_free)
        fn = self.fnodes[node]
        if fn is None:
            ident = self.world.nodes[node].identity
            assert ident is not None
            self.fnodes[node] = FormationNode(ident, advert, self.fconfig, adverts=self.advert_of)
            self.topics.setdefault(self.fconfig.jobs_topic, {})[node] = True
        else:
            self.carry(node, fn.update_advert(advert, self.world.node_now_ms(node)))

    def advert_of(self, peer_id: str) -> Advert | None:
        """The cores' advert book: every node's current advert (the simulated
        workers keep no books of their own; see :meth:`candidates`)."""
        node = self.world.by_peer.get(peer_id)
        return self.world.nodes[node].advert if node is not None else None

    def _decode(self, data: bytes) -> Any:
        """The verified message, decoded once for all its receivers; ``None``
        when its receivers would refuse it (counted as they would count it):
        e.g. an offer carrying an advert signed with a negative
        ``issued_at_ms`` by a node whose simulated clock is skewed below 0."""
        msg = self._decoded.get(data)
        if msg is None:
            if len(self._decoded) >= decoded_cache_max:
                self._decoded.clear()
            try:
                msg = decode_message(data)
            except PeerMisbehaved as exc:
                self.misbehaved[exc.reason.name] = self.misbehaved.get(exc.reason.name, 0) + 1
                return None
            self._decoded[data] = msg
        return msg

    def carry(self, node: int, actions: list[Any]) -> None:
        w = self.world
        for a in actions:
            if isinstance(a, Send):
                msg = self._decode(a.data)
                if msg is None or self._suppressed(node, msg):
                    continue
                dst = w.by_peer.get(a.peer_id)
                if dst == node:
                    w.engine.after(0, self._local, (node, w.net.epoch[node], msg))
                elif dst is not None:
                    w.net.send(node, dst, len(a.data), "fm.msg", msg)
            elif isinstance(a, Publish):
                msg = self._decode(a.data)
                if msg is None or self._suppressed(node, msg):
                    continue
                if a.topic == self.fconfig.jobs_topic:
                    w.gossip.publish(node, a.topic, len(a.data), msg)
                else:
                    for dst in self.topics.get(a.topic, {}):
                        if dst != node:
                            w.net.send(node, dst, len(a.data), "fm.msg", msg)
            elif isinstance(a, SetTimer):
                t = self._timers(node)
                gen = t.get(a.key, 0) + 1
                t[a.key] = gen
                at_us = (a.at_ms - w.nodes[node].skew_ms) * 1000
                w.engine.at(at_us, self._fire, (node, w.net.epoch[node], a.key, gen))
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
            self._runs.pop((node, a.job_id), None)
            w.checker.on_release(node, self._jid(a.job_id))
        elif isinstance(a, Confirmed):
            self._confirmed(a)
        elif isinstance(a, Failed):
            job = self.jobs.get(self._jid(a.job_id))
            if job is not None and job.state is JobState.FORMING:
                job.to(JobState.FAILED)
                job.reason = a.reason
                w.engine.trace("job", job.jid, "failed")
        elif isinstance(a, MemberLost):
            self.members_lost += 1

    def _suppressed(self, node: int, msg: Any) -> bool:
        """Adversaries act by not sending: a silent leader sends no proposal or
        certificate; a member that never accepts sends no accept."""
        adv = self.world.nodes[node].adversary
        if adv is None:
            return False
        if adv.never_accepts and isinstance(msg, Accept):
            return True
        return adv.silent_leader and isinstance(msg, (Proposal, Certified))

    def _timers(self, node: int) -> dict[str, int]:
        t = self.timers[node]
        if t is None:
            t = self.timers[node] = {}
        return t

    def _fire(self, arg: tuple[int, int, str, int]) -> None:
        node, epoch, key, gen = arg
        w = self.world
        t = self.timers[node]
        if w.net.epoch[node] != epoch or not w.net.up[node] or t is None or t.get(key) != gen:
            return
        now_ms = w.node_now_ms(node)
        if key.startswith("f/"):
            fn = self.fnodes[node]
            if fn is not None:
                self.carry(node, fn.on_timer(key, now_ms))
        else:
            self.carry(node, self.subs[node].on_timer(key, now_ms))

    def _deliver(self, node: int, msg: Any) -> None:
        w = self.world
        now_ms = w.node_now_ms(node)
        actions: list[Any] = []
        try:
            fn = self.fnodes[node]
            if fn is not None and isinstance(msg, SignedManifest):
                if msg.job_id not in fn.jobs:  # else a copy (direct and gossiped), as the node skips it
                    actions = fn.on_manifest(msg, now_ms, self.candidates(msg))
            elif fn is not None:
                actions = fn.on_message(msg, now_ms)
            sub = self.subs.get(node)
            if sub is not None:
                actions = actions + sub.on_message(msg, now_ms)
        except PeerMisbehaved as exc:
            self.misbehaved[exc.reason.name] = self.misbehaved.get(exc.reason.name, 0) + 1
        self.carry(node, actions)

    def _on_direct(self, dst: int, src: int, msg: Any) -> None:
        self._deliver(dst, msg)

    def _local(self, arg: tuple[int, int, Any]) -> None:
        node, epoch, msg = arg
        if self.world.net.epoch[node] == epoch and self.world.net.up[node]:
            self._deliver(node, msg)

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
            now_ms = w.engine.now_us // 1000
            req = sm.manifest.requirements
            live = [sn.advert for sn in w.nodes if sn.advert is not None and sn.advert.expires_at_ms > now_ms]
            got = [a.peer_id for a in matching(live, req)]
            self._cands[sm.job_id] = got
        return got

    def on_manifest(self, node: int, msg: Msg) -> None:
        """Gossip delivered something on the jobs topic to ``node``."""
        if msg.origin != node and (self.fnodes[node] is not None or node in self.subs):
            self._deliver(node, msg.data)

    def on_node_down(self, node: int) -> None:
        """Formation state lives in memory: a restart begins afresh."""
        self.fnodes[node] = None
        self.timers[node] = None
        for subs in self.topics.values():
            subs.pop(node, None)
        for key in [k for k in self._runs if k[0] == node]:
            del self._runs[key]
            self._started.pop(key, None)
        self.world.checker.on_node_down(node)

    def _jid(self, job_id: str) -> int:
        return self.by_job_id.get(job_id, 0)

    # -- submitting ----------------------------------------------------------------------
    def start(self) -> None:
        if self.submitters and self.cfg.rate_per_s > 0:
            self.world.engine.at(5_000_000, self._arrival, None)
            self.world.engine.at(2_000_000, self._pay_tick, None)

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
        )
        sm = sign_manifest(sn.identity, m)
        jid = len(self.jobs) + 1
        job = Job(jid, sm.job_id, node, m, w.engine.now_us)
        job.signed = sm
        self.jobs[jid] = job
        self.by_job_id[sm.job_id] = jid
        self._decoded[sm.wire] = sm
        w.engine.trace("job", jid, "submit", m.members)
        self.carry(node, self.subs[node].submit(sm, now_ms, self.candidates(sm)))
        fn = self.fnodes[node]
        if fn is not None:  # the submitter's own node may work on its own job
            self._deliver(node, sm)
        return job

    def _confirmed(self, a: Confirmed) -> None:
        w = self.world
        jid = self._jid(a.job_id)
        job = self.jobs[jid]
        members = [w.by_peer[p] for p in a.certificate.members]
        w.checker.on_confirm(jid, members)
        job.to(JobState.RUNNING)
        job.members = members
        job.certificate = a.certificate
        job.t_confirm_us = w.engine.now_us
        job.confirmed_at_ms = w.node_now_ms(job.submitter)
        self.formation_ms.append((job.t_confirm_us - job.t_submit_us) / 1000)
        w.engine.trace("job", jid, "confirm", len(members))
        w.engine.after(int((job.manifest.duration_s_max + 20) * 1_000_000), self._result_deadline, jid)

    # -- running, on the member --------------------------------------------------------------
    def _start(self, node: int, a: StartJob) -> None:
        w = self.world
        jid = self._jid(a.job_id)
        w.checker.on_start(node, jid, a.manifest.manifest.gpus_per_node)
        w.engine.trace("start", node, jid)
        adv = w.nodes[node].adversary
        if adv is not None and adv.never_runs:
            return
        gen = self._runs.get((node, a.job_id), 0) + 1
        self._runs[(node, a.job_id)] = gen
        self._started[(node, a.job_id)] = (w.engine.now_us // 1000, a.certificate)
        dur = self.rng.uniform(0.5, 1.0) * self.cfg.duration_s
        w.engine.after(int(dur * 1_000_000), self._finish, (node, a.job_id, gen))

    def _finish(self, arg: tuple[int, str, int]) -> None:
        node, job_id, gen = arg
        w = self.world
        if self._runs.get((node, job_id)) != gen:
            return  # stopped, or the node went down
        del self._runs[(node, job_id)]
        start_ms, cert = self._started.pop((node, job_id))
        jid = self._jid(job_id)
        job = self.jobs[jid]
        g = job.manifest.gpus_per_node
        end_ms = w.engine.now_us // 1000
        w.checker.on_finish(node, jid, g * (end_ms - start_ms))
        fn = self.fnodes[node]
        if fn is not None:
            self.carry(node, fn.finish(job_id, w.node_now_ms(node)))
        sn = w.nodes[node]
        assert sn.identity is not None
        skew = sn.skew_ms
        cert_hash = certificate_hash(cert)
        claim: dict[str, Any] = {"started_at_ms": start_ms + skew, "ended_at_ms": end_ms + skew, "gpu_ms": g * (end_ms - start_ms),
                 "output_digest": hashlib.sha256(job_id.encode()).digest()}  # the honest output of this job
        if sn.adversary is not None:
            claim = sn.adversary.proof_claim(claim, job.manifest.duration_s_max * 1000)
        proof = Proof(job_id=job_id, cert_hash=cert_hash, peer_id=sn.identity.peer_id,
                      gpus=tuple(f"{sn.gpus[0].model} #{i}" for i in range(g)), exit_code=0, end_reason="exited",
                      checkpoints=(), chain_head=chain_heads(job_id, cert_hash, sn.identity.peer_id, ())[-1],
                      **claim)
        wire = sign_proof(sn.identity, proof).wire
        w.net.send(node, job.submitter, len(wire), "job.proof", (jid, wire))
        # The other members saw this one's heartbeats while both ran: they co-sign.
        for m in job.members:
            if m != node and w.net.up[m]:
                w.engine.after(1000, self._cosign, (m, node, jid, start_ms, end_ms, cert_hash))

    def _cosign(self, arg: tuple[int, int, int, int, int, bytes]) -> None:
        observer, subject, jid, start_ms, end_ms, cert_hash = arg
        w = self.world
        job = self.jobs[jid]
        o, sub = w.nodes[observer], w.nodes[subject]
        if not w.net.up[observer] or o.identity is None or sub.identity is None:
            return
        seen_from = max(start_ms, job.t_confirm_us // 1000)
        co = Cosign(job_id=job.job_id, cert_hash=cert_hash, subject=sub.identity.peer_id,
                    observer=o.identity.peer_id, first_seen_ms=seen_from + o.skew_ms, last_seen_ms=end_ms + o.skew_ms,
                    heartbeats=max(1, (end_ms - seen_from) // 1000), last_chain_head=b"")
        wire = sign_cosign(o.identity, co).wire
        w.net.send(observer, job.submitter, len(wire), "job.cosign", (jid, wire))

    # -- proofs and payment, on the submitter ---------------------------------------------------
    def _on_proof(self, dst: int, src: int, payload: tuple[int, bytes]) -> None:
        jid, wire = payload
        job = self.jobs[jid]
        if job.state is not JobState.RUNNING or src not in job.members or src in job.results:
            return
        job.results[src] = wire
        job.results_at_ms[src] = self.world.node_now_ms(dst)
        if len(job.results) == len(job.members):
            # wait a moment for the co-signatures that follow the last proof
            self.world.engine.after(3_000_000, self._result_deadline, jid)

    def _on_cosign(self, dst: int, src: int, payload: tuple[int, bytes]) -> None:
        jid, wire = payload
        job = self.jobs[jid]
        if job.state is JobState.RUNNING:
            job.cosigns.append(wire)

    def _result_deadline(self, jid: int) -> None:
        job = self.jobs[jid]
        if job.state is JobState.RUNNING:
            self._settle(job)

    def _settle(self, job: Job) -> None:
        """Verify every proof with the real proof core and turn what is owed
        (its ``owed``, agreed prices from the certificate) into payout rows."""
        w = self.world
        assert job.certificate is not None and job.signed is not None
        terms = ProofTerms.from_manifest(job.signed)
        cosigns: dict[str, list[SignedCosign]] = {}
        for c in job.cosigns:
            try:
                sc = decode_cosign(c)
            except PeerMisbehaved:
                continue
            cosigns.setdefault(sc.cosign.subject, []).append(sc)
        verified = []
        for m in job.members:
            wire = job.results.get(m)
            if wire is None:
                continue
            ident = w.nodes[m].identity
            assert ident is not None
            window = Window(confirmed_at_ms=job.confirmed_at_ms, results_at_ms=job.results_at_ms[m])
            try:
                verified.append(verify_proof(wire, cert=job.certificate, terms=terms,
                                             cosigns=cosigns.get(ident.peer_id, []), window=window))
            except ProofRejected as exc:
                self.proofs_rejected += 1
                self.proof_faults[exc.fault.name] = self.proof_faults.get(exc.fault.name, 0) + 1
        rows = owed(verified, terms=terms, prices=agreed_prices(job.certificate))
        paid_rows = [r for r in rows if r.status == "paid" and r.amount > 0]
        complete = len(job.results) == len(job.members) and len(verified) == len(job.members)
        job.to(JobState.DONE if complete and len(paid_rows) == len(job.members) else JobState.FAILED)
        job.t_done_us = w.engine.now_us
        w.engine.trace("job", job.jid, job.state.value, len(paid_rows))
        sub = w.nodes[job.submitter]
        if sub.adversary is not None and sub.adversary.never_pays:
            return
        for r in paid_rows:
            m = w.by_peer[r.peer_id]
            row = PayoutOwed(owed_id=self._next_owed, proof_hash=r.proof_hash,
                             payout_address=w.nodes[m].payout_address, amount=r.amount, currency="SOL")
            self.owed_meta[self._next_owed] = (job.jid, m)
            self._next_owed += 1
            self.owed.setdefault(job.submitter, []).append(row)
            w.checker.on_owed(job.jid, m, r.amount)

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
                for row in rows:
                    if row.owed_id in in_batch:
                        paid_ids[row.owed_id] = True
                        jid, member = self.owed_meta[row.owed_id]
                        self.paid_total += row.amount
                        self.paid_count += 1
                        w.checker.on_paid(jid, member, row.proof_hash, row.amount)
                        if w.mutation == "double_pay":
                            w.checker.on_paid(jid, member, row.proof_hash, row.amount)
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
            "members_lost": self.members_lost,
            "proofs_rejected": self.proofs_rejected,
            "proof_faults": dict(sorted(self.proof_faults.items())),
            "payouts": self.paid_count,
            "payout_batches": self.batches,
            "paid_lamports": self.paid_total,
            "owed_unpaid_lamports": sum(r.amount for rows in self.owed.values() for r in rows),
            "formation_misbehaved": dict(sorted(self.misbehaved.items())),
            "formation_emitted": dict(sorted(self.emitted.items())),
        }
