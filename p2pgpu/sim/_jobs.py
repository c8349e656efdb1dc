"""Jobs in the simulated world: manifests, a stand-in formation, execution, payouts.

Real cores used here: submitters build and sign real manifests
(:func:`~p2pgpu.core.sign_manifest`), gossiped as bytes on the jobs topic;
receivers check them with :func:`~p2pgpu.core.verify_manifest` (verdict
cached per unique bytes, time check per node) and a per-node
:class:`~p2pgpu.core.ReplayGuard`; a node volunteers only if the real
:func:`~p2pgpu.core.exclusion` passes on its own advert and it really has the
GPUs free; payouts are grouped by the real :func:`plan_batches` of
``p2pgpu/core/_payout.py`` with its Merkle roots.

**Stand-in:** the cluster formation core (``core/_formation.py``) had not
landed when this was written, so formation here is a small submitter-led
exchange with the same shape as the architecture's (offers, a ranked choice
by ``sha256(job_id, peer_id)``, propose, leased reservation and accept,
confirm, replace a decliner from the remaining offers, leases that expire),
with unsigned modelled messages.  It exists so that capacity, execution and
payment invariants have something to check; the formation core replaces it.
Job states and their transitions are the table ``TRANSITIONS``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from p2pgpu.core import PeerMisbehaved, Reason, exclusion
from p2pgpu.core._manifest import Manifest, ReplayGuard, sign_manifest, verify_manifest
from p2pgpu.core._payout import Owed, plan_batches

from ._scenario import JobSection

if TYPE_CHECKING:
    from ._gossip import Msg
    from ._world import World

_MSG_BYTES = 400
rent_exempt_min_lamports = 890_880
initial_balance_lamports = 1_000_000_000


class JobState(str, Enum):
    OFFERING = "offering"
    FORMING = "forming"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


TRANSITIONS: dict[JobState, tuple[JobState, ...]] = {
    JobState.OFFERING: (JobState.FORMING, JobState.FAILED),
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
    state: JobState = JobState.OFFERING
    offers: list[int] = field(default_factory=list)
    members: list[int] = field(default_factory=list)
    accepted: dict[int, bool] = field(default_factory=dict)
    asked: dict[int, bool] = field(default_factory=dict)
    t_confirm_us: int = 0
    results: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    reason: str = ""
    t_done_us: int = 0

    def to(self, new: JobState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise AssertionError(f"job {self.jid}: {self.state.value} -> {new.value} is not in the table")
        self.state = new


class JobFlow:
    def __init__(self, world: "World", cfg: JobSection) -> None:
        self.world = world
        self.cfg = cfg
        self.rng = world.engine.stream("jobs")
        self.jobs: dict[int, Job] = {}
        self.by_job_id: dict[str, int] = {}
        self.formation_ms: list[float] = []
        self.guards: dict[int, ReplayGuard] = {}
        self._verdicts: dict[bytes, Any] = {}
        self.owed: dict[int, list[Owed]] = {}  # submitter -> unpaid rows
        self.owed_meta: dict[int, tuple[int, int]] = {}  # owed_id -> (jid, member)
        self.balances: dict[str, int] = {}
        self.batches = 0
        self.paid_total = 0
        self.paid_count = 0
        self.proofs_rejected = 0
        self._next_owed = 1
        real = [i for i in range(world.n) if world.nodes[i].identity is not None]
        self.submitters = sorted(self.rng.sample(real, min(len(real), cfg.submitters)))
        for i in self.submitters:
            sn = world.nodes[i]
            sn.submitter = True
            if sn.book is None:
                sn.book = world._new_book()
                world.book_nodes.append(i)
            world.churn.churning[i] = False  # submitters stay up (their jobs are the measurement)
        world.book_nodes.sort()
        for kind, fn in (("job.offer", self._on_offer), ("job.propose", self._on_propose),
                         ("job.accept", self._on_accept), ("job.decline", self._on_decline),
                         ("job.confirm", self._on_confirm), ("job.cancel", self._on_cancel),
                         ("job.result", self._on_result)):
            world.net.handlers[kind] = fn

    # -- submitting --------------------------------------------------------------------
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
        nodes = self.rng.choice(self.cfg.nodes_choices)
        replicas = self.rng.choice(self.cfg.replicas_choices)
        m = Manifest(
            name="sim", submitter=sn.identity.peer_id, created_at_ms=now_ms,
            expires_at_ms=now_ms + 10 * 60 * 1000, nonce=self.rng.randbytes(16), nodes=nodes,
            gpus_per_node=self.rng.choice(self.cfg.gpus_per_node_choices), command=("true",),
            duration_s_max=max(1, int(self.cfg.duration_s * 1.5)), price_per_gpu_hour_max=self.cfg.price_max,
            payer=sn.payout_address, replicas=replicas, quorum=replicas // 2 + 1,
        )
        sm = sign_manifest(sn.identity, m)
        jid = len(self.jobs) + 1
        job = Job(jid, sm.job_id, node, m, w.engine.now_us)
        self.jobs[jid] = job
        self.by_job_id[sm.job_id] = jid
        w.engine.trace("job", jid, "submit", nodes)
        w.gossip.publish(node, "/p2pgpu/jobs/1", len(sm.wire), sm.wire, jid)
        w.engine.after(int(self.cfg.offer_window_ms * 1000), self._choose, jid)
        w.engine.after(int(self.cfg.formation_timeout_ms * 1000), self._formation_deadline, jid)
        return job

    # -- volunteering (every node that hears the manifest) -------------------------------
    def on_manifest(self, node: int, msg: "Msg") -> None:
        w = self.world
        sn = w.nodes[node]
        if node == msg.origin or sn.identity is None or sn.advert is None:
            return
        now_ms = w.node_now_ms(node)
        verdict = self._verdicts.get(msg.data)
        if verdict is None:
            try:
                verdict = verify_manifest(msg.data, now_ms=now_ms)
            except PeerMisbehaved as exc:
                verdict = exc.reason
            self._verdicts[msg.data] = verdict
        if isinstance(verdict, Reason):
            return
        m = verdict.manifest
        guard = self.guards.get(node)
        if guard is None:
            guard = self.guards[node] = ReplayGuard(ids_max=10_000)
        try:
            guard.admit(verdict.job_id, m.expires_at_ms, now_ms)
        except PeerMisbehaved:
            return
        req = m.requirements
        if exclusion(sn.advert, req) is not None or sn.gpus_free < m.gpus_per_node:
            adv = sn.adversary
            if adv is None or not adv.claims_capacity:
                return
        w.net.send(node, msg.origin, _MSG_BYTES, "job.offer", msg.info)

    def _on_offer(self, dst: int, src: int, jid: int) -> None:
        job = self.jobs[jid]
        if job.state is JobState.OFFERING and src not in job.offers:
            job.offers.append(src)

    def _rank(self, job: Job, node: int) -> bytes:
        ident = self.world.nodes[node].identity
        assert ident is not None
        return hashlib.sha256(job.job_id.encode() + ident.peer_id.encode()).digest()

    def _choose(self, jid: int) -> None:
        job = self.jobs[jid]
        if job.state is not JobState.OFFERING:
            return
        job.offers.sort(key=lambda p: self._rank(job, p))
        job.to(JobState.FORMING)
        for _ in range(job.manifest.members):
            if not self._ask_next(job):
                return

    def _ask_next(self, job: Job) -> bool:
        for p in job.offers:
            if p not in job.asked:
                job.asked[p] = True
                job.members.append(p)
                job.accepted[p] = False
                self.world.net.send(job.submitter, p, _MSG_BYTES, "job.propose", job.jid)
                self.world.engine.after(int(self.cfg.offer_timeout_ms * 1000), self._accept_deadline, (job.jid, p))
                return True
        self._fail(job, "not enough volunteers accepted")
        return False

    # -- the worker's side ----------------------------------------------------------------
    def _on_propose(self, dst: int, src: int, jid: int) -> None:
        w = self.world
        sn = w.nodes[dst]
        job = self.jobs[jid]
        g = job.manifest.gpus_per_node
        adv = sn.adversary
        if adv is not None and adv.never_accepts:
            return
        if jid in sn.held or (sn.gpus_free < g and w.mutation != "overcommit"):
            w.net.send(dst, src, _MSG_BYTES, "job.decline", jid)
            return
        sn.held[jid] = g
        w.checker.on_hold(dst, jid, g)
        w.engine.trace("hold", dst, jid, g)
        w.engine.after(int(self.cfg.lease_ms * 1000), self._lease_expired, (dst, jid, w.net.epoch[dst]))
        w.net.send(dst, src, _MSG_BYTES, "job.accept", jid)

    def _lease_expired(self, arg: tuple[int, int, int]) -> None:
        node, jid, epoch = arg
        w = self.world
        if w.net.epoch[node] != epoch:
            return
        if jid in w.nodes[node].held and jid not in self._running_on(node):
            self._release(node, jid)

    def _running_on(self, node: int) -> dict[int, bool]:
        return self.world.checker.running.get(node, {})

    def _release(self, node: int, jid: int) -> None:
        w = self.world
        w.nodes[node].running.pop(jid, None)
        if w.nodes[node].held.pop(jid, None) is not None:
            w.checker.on_release(node, jid)
            w.engine.trace("release", node, jid)

    def _on_confirm(self, dst: int, src: int, jid: int) -> None:
        w = self.world
        sn = w.nodes[dst]
        if jid not in sn.held:
            return  # lease expired: the submitter's result deadline handles it
        if sn.running.get(jid):
            return  # a duplicated confirm must not start the job twice
        sn.running[jid] = True
        job = self.jobs[jid]
        w.checker.on_start(dst, jid)
        w.engine.trace("start", dst, jid)
        adv = sn.adversary
        if adv is not None and adv.never_runs:
            return
        dur = self.rng.uniform(0.5, 1.0) * self.cfg.duration_s
        w.engine.after(int(dur * 1_000_000), self._finish, (dst, jid, w.net.epoch[dst], w.engine.now_us))
        _ = job

    def _finish(self, arg: tuple[int, int, int, int]) -> None:
        node, jid, epoch, t0 = arg
        w = self.world
        if w.net.epoch[node] != epoch:
            return
        job = self.jobs[jid]
        g = job.manifest.gpus_per_node
        gpu_s = g * (w.engine.now_us - t0) // 1_000_000
        digest = hashlib.sha256(job.job_id.encode()).digest()  # the honest output of this job
        w.checker.on_finish(node, jid, gpu_s)
        self._release(node, jid)
        adv = w.nodes[node].adversary
        if adv is not None:
            gpu_s, digest = adv.result(gpu_s, digest)
        w.net.send(node, job.submitter, _MSG_BYTES, "job.result", (jid, gpu_s, digest))

    def _on_cancel(self, dst: int, src: int, jid: int) -> None:
        self._release(dst, jid)

    def on_node_down(self, node: int) -> None:
        sn = self.world.nodes[node]
        for jid in list(sn.held):
            self._release(node, jid)
        self.world.checker.on_node_down(node)

    # -- the submitter's side ---------------------------------------------------------------
    def _on_accept(self, dst: int, src: int, jid: int) -> None:
        job = self.jobs[jid]
        if job.state is not JobState.FORMING or src not in job.accepted:
            self.world.net.send(dst, src, _MSG_BYTES, "job.cancel", jid)
            return
        job.accepted[src] = True
        if all(job.accepted[m] for m in job.members) and len(job.members) == job.manifest.members:
            w = self.world
            job.to(JobState.RUNNING)
            job.t_confirm_us = w.engine.now_us
            self.formation_ms.append((job.t_confirm_us - job.t_submit_us) / 1000)
            w.checker.on_confirm(jid, list(job.members))
            w.engine.trace("job", jid, "confirm", len(job.members))
            for m in job.members:
                w.net.send(dst, m, _MSG_BYTES, "job.confirm", jid)
            w.engine.after(int((job.manifest.duration_s_max + 10) * 1_000_000), self._result_deadline, jid)

    def _on_decline(self, dst: int, src: int, jid: int) -> None:
        self._drop_member(self.jobs[jid], src)

    def _accept_deadline(self, arg: tuple[int, int]) -> None:
        jid, p = arg
        job = self.jobs[jid]
        if job.state is JobState.FORMING and job.accepted.get(p) is False:
            self._drop_member(job, p)

    def _drop_member(self, job: Job, p: int) -> None:
        if job.state is not JobState.FORMING or p not in job.accepted:
            return
        job.members.remove(p)
        del job.accepted[p]
        self.world.net.send(job.submitter, p, _MSG_BYTES, "job.cancel", job.jid)
        self._ask_next(job)

    def _formation_deadline(self, jid: int) -> None:
        job = self.jobs[jid]
        if job.state in (JobState.OFFERING, JobState.FORMING):
            self._fail(job, "formation timed out")

    def _fail(self, job: Job, why: str) -> None:
        if job.state in (JobState.DONE, JobState.FAILED):
            return
        job.to(JobState.FAILED)
        job.reason = why
        self.world.engine.trace("job", job.jid, "failed")
        for m in job.members:
            self.world.net.send(job.submitter, m, _MSG_BYTES, "job.cancel", job.jid)

    def _on_result(self, dst: int, src: int, payload: tuple[int, int, bytes]) -> None:
        jid, gpu_s, digest = payload
        job = self.jobs[jid]
        if job.state is not JobState.RUNNING or src not in job.members or src in job.results:
            return
        # The proof check of this stand-in: a member cannot claim more GPU time
        # than it could have used since the confirmation the submitter sent.
        bound = job.manifest.gpus_per_node * ((self.world.engine.now_us - job.t_confirm_us) // 1_000_000 + 1)
        if gpu_s > bound:
            self.proofs_rejected += 1
            job.results[src] = (-1, b"")
        else:
            job.results[src] = (gpu_s, digest)
        if len(job.results) == len(job.members):
            self._settle(job)

    def _result_deadline(self, jid: int) -> None:
        job = self.jobs[jid]
        if job.state is JobState.RUNNING:
            self._settle(job)

    def _settle(self, job: Job) -> None:
        """Decide who is owed: valid proofs whose output agrees with the quorum."""
        votes: dict[bytes, int] = {}
        for gpu_s, digest in job.results.values():
            if gpu_s >= 0:
                votes[digest] = votes.get(digest, 0) + 1
        replicated = job.manifest.replicas > 1
        winner = max(sorted(votes), key=lambda d: votes[d]) if votes else b""
        # Only replicas of the same work can be compared; without replication
        # every valid proof stands on its own.
        ok = votes.get(winner, 0) >= job.manifest.quorum if replicated else bool(votes)
        job.to(JobState.DONE if ok and len(job.results) == len(job.members) else JobState.FAILED)
        job.t_done_us = self.world.engine.now_us
        self.world.engine.trace("job", job.jid, job.state.value)
        sub = self.world.nodes[job.submitter]
        if sub.adversary is not None and sub.adversary.never_pays:
            return
        for m in job.members:
            r = job.results.get(m)
            if not ok or r is None or r[0] <= 0 or (replicated and r[1] != winner):
                continue
            amount = r[0] * self.world.nodes[m].price // 3600
            if amount <= 0:
                continue
            owed = Owed(owed_id=self._next_owed, proof_hash=hashlib.sha256(f"{job.job_id}/{m}".encode()).digest(),
                        payout_address=self.world.nodes[m].payout_address, amount=amount, currency="SOL")
            self.owed_meta[self._next_owed] = (job.jid, m)
            self._next_owed += 1
            self.owed.setdefault(job.submitter, []).append(owed)
            self.world.checker.on_owed(job.jid, m, amount)

    def _pay_tick(self, _: Any) -> None:
        """Every submitter's payer: plan batches with the real payout core and
        settle them on a modelled ledger (confirmed in one step)."""
        w = self.world
        for sub, rows in sorted(self.owed.items()):
            if not rows:
                continue
            for r in rows:  # workers' wallets exist already (funded), unless a scenario says otherwise
                self.balances.setdefault(r.payout_address, initial_balance_lamports)
            plan = plan_batches(rows, balances=self.balances, rent_exempt_min_lamports=rent_exempt_min_lamports,
                                transfers_max=19)
            paid_ids: dict[int, bool] = {}
            for batch in plan.batches:
                self.batches += 1
                w.engine.trace("batch", sub, batch.merkle_root().hex()[:16], batch.total)
                for t in batch.transfers:
                    self.balances[t.address] += t.amount
                for row in rows:
                    if row.owed_id in batch.owed_ids:
                        paid_ids[row.owed_id] = True
                        jid, member = self.owed_meta[row.owed_id]
                        self.paid_total += row.amount
                        self.paid_count += 1
                        w.checker.on_paid(jid, member, row.proof_hash, row.amount)
                        if w.mutation == "double_pay":
                            w.checker.on_paid(jid, member, row.proof_hash, row.amount)
            self.owed[sub] = [r for r in rows if r.owed_id not in paid_ids]
        w.engine.after(2_000_000, self._pay_tick, None)

    # -- reporting -----------------------------------------------------------------------------
    def running_count(self) -> int:
        return sum(1 for j in self.jobs.values() if j.state is JobState.RUNNING)

    def stats(self) -> dict[str, Any]:
        jobs = list(self.jobs.values())
        if not jobs:
            return {"jobs_submitted": 0}
        fms = sorted(self.formation_ms)
        formed = len(fms)
        counted = [j for j in jobs if j.t_submit_us < self.world.quiet_us]

        def p(q: float) -> float | None:
            return round(fms[min(len(fms) - 1, int(round(q / 100 * (len(fms) - 1))))], 1) if fms else None

        return {
            "jobs_submitted": len(jobs),
            "jobs_formed": formed,
            "formation_success_ratio": round(formed / len(counted), 4) if counted else None,
            "formation_latency_ms_p50": p(50),
            "formation_latency_ms_p99": p(99),
            "jobs_completed": sum(1 for j in jobs if j.state is JobState.DONE),
            "jobs_failed": sum(1 for j in jobs if j.state is JobState.FAILED),
            "proofs_rejected": self.proofs_rejected,
            "payouts": self.paid_count,
            "payout_batches": self.batches,
            "paid_lamports": self.paid_total,
            "owed_unpaid_lamports": sum(r.amount for rows in self.owed.values() for r in rows),
        }
