"""Runs the jobs this node was confirmed for: sandbox, heartbeats, proof.

On ``StartJob`` a member lays out the job's work directory under the home
(``jobs/<job_id>/work``, inputs in ``work/in``) and, in one nursery:
- runs the manifest's command in the bubblewrap sandbox with the manifest's
  limits and environment plus the cluster's (rank, world size, members,
  rendezvous);
- heartbeats the other members (the host's membership core, which detects a
  lost member and applies the manifest's policy: ``fail`` stops the job here);
- extends its checkpoint chain every interval (progress info: a hash of the
  log so far) and sends its log lines to the submitter in batches.
When the command ends the runner tells the core host what it measured
(``PartEnded``: start, end, exit status, outputs, the checkpoint chain); the
host signs the proof by the rules every driver shares, hands it and the
outputs list to the submitter (stored first, resent until acknowledged),
keeps watching the others until they are done (its co-signatures vouch for
their time), hands over its co-signatures and frees the GPUs.  The runner
decides none of that: it runs the job (``runtime/``), streams its logs,
extends its checkpoint chain, and stores its progress.  If the sandbox cannot
run here the node advertises no runtime, so it is never asked; a job that
still arrives is refused, never run unconfined.

The member stores its progress at every checkpoint (before the new chain
head goes out in a heartbeat), so that if this node dies mid-job it proves,
after its restart, the time it served up to its last checkpoint (end reason
``interrupted``) and co-signs what it had seen of the others
(:meth:`Runner.recover`; docs/proofs.md, "Interrupted members").
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from p2pgpu.core import Kind, PeerMisbehaved, Reason, seal
from p2pgpu.core._actions import StartJob, StopJob
from p2pgpu.core._host import observed
from p2pgpu.core._member import (
    Delivery,
    PartEnded,
    interrupted_cosigns,
    interrupted_proof,
    killed_exit_code,
)
from p2pgpu.core._outcome import member_state_after, start_refusal
from p2pgpu.core._proof import CheckpointChain, checkpoint_interval_ms
from p2pgpu.runtime import ClusterEnv, JobRejected, JobSpec, SandboxPolicy, SandboxUnavailable, run_job
from p2pgpu.runtime._leftovers import RECORD_NAME, reap_leftovers
from p2pgpu.runtime._sandbox import sandbox_disk_backend
from p2pgpu.runtime._walk import remove_tree

from ._kept_logs import KeptLogs

if TYPE_CHECKING:
    from ._jobs import JobsService

log = logging.getLogger("p2pgpu.runner")

job_memory_bytes_default = 2 << 30
log_lines_kept_max = 10_000
log_batch_bytes_max = 12 * 1024
log_flush_interval_s = 0.2
#: Acknowledged deliveries, finished runs and settled collections' items are
#: forgotten this long after (at a start): resends stop after an hour.
recovery_kept_ms = 7 * 24 * 3_600_000
#: Jobs whose own log lines stay in memory for ``job logs`` on a member,
#: and the bytes of those lines in all (``_kept_logs.py``).
log_jobs_kept_max = 64
log_bytes_kept_max = 16 << 20


@dataclass
class MemberJob:
    start: StartJob
    chain: CheckpointChain
    gpus: tuple[int, ...] = ()
    pending: list[list[Any]] = field(default_factory=list)
    log_hash: Any = field(default_factory=hashlib.sha256)
    log_seq: int = 0
    stop_reason: str = ""
    ray: Any = None
    #: When the sandbox died (wall ms); no checkpoint is added after it.
    ended_ms: int = 0
    #: When the command's sandbox started (wall ms; 0 until then): what the
    #: member claims runs from here, and checkpoints begin then.  Its setup
    #: before (inputs, image, the job's disk) is not claimed: under load it
    #: took seconds, and a short job's claim went over its duration limit.
    run_started_ms: int = 0


#: ``adversary = "inflate_time"``: how much earlier than it did a lying member claims it started.
inflate_time_ms = 20_000


class Runner:
    def __init__(self, jobs: JobsService, *, root: Path | None, policy: SandboxPolicy,
                 adversary: str = "") -> None:
        self.jobs = jobs
        self.root = root or Path(tempfile.mkdtemp(prefix="p2pgpu-jobs-"))
        self.policy = policy
        #: Test networks only: "tamper_output" makes this node lie about its
        #: output; "inflate_time" makes its proofs claim it started
        #: ``inflate_time_ms`` before it did (the submitter's window and the
        #: co-signers' observations must refuse the claim).
        self.adversary = adversary
        #: job -> its own log lines (the most recent jobs only).
        self.logs = KeptLogs(jobs_max=log_jobs_kept_max, bytes_max=log_bytes_kept_max)
        self.running: dict[str, MemberJob] = {}
        self._scopes: dict[str, trio.CancelScope] = {}
        self._gpus_in_use: dict[str, tuple[int, ...]] = {}
        jobs.runner = self.run
        jobs.runner_obj = self
        jobs.on_stop = self.stop
        # A previous life killed mid-job (kill -9) may have left a sandbox,
        # its cgroups and its disk: stop and remove them before anything runs.
        for line in reap_leftovers(self.root):
            log.warning("cleaned up after this node's previous life: %s", line)
            jobs.counts["exec:leftovers_reaped"] += 1
        try:
            backend, why = sandbox_disk_backend(policy)
        except SandboxUnavailable as exc:
            log.warning("jobs' disks: %s", exc)
        else:
            if backend == "dir":
                log.warning("jobs' disks are plain directories, their size is not enforced by the kernel: %s", why)

    def _refuse_start(self, start: StartJob, why: str) -> None:
        """A confirmation for a job this node already started (a repeated
        one, or one that reached a restarted node): never run it twice."""
        rec = self.jobs.record(start.job_id)
        assert rec is not None, start.job_id[:12]
        self.jobs.counts["exec:start_refused"] += 1
        log.warning("job %s not started: %s", start.job_id[:12], why)
        if start.job_id in self.running:
            if "submitter" not in rec.roles:
                rec.state = "running"
            return
        if "submitter" not in rec.roles:
            rec.state = member_state_after(str(rec.extra["member_state"]))
        self.jobs.finished(start.job_id)  # frees what the repeated confirmation reserved
        self.jobs.persist(start.job_id)

    # ------------------------------------------------------------ routing

    @property
    def pending(self) -> dict[bytes, Any]:
        """What we still resend to submitters (the host's deliveries), by item hash."""
        return {d.item_hash: d for ds in self.jobs.host.deliveries.by_job.values() for d in ds.values()}

    def member_lost(self, job_id: str, peer_id: str) -> None:
        """The host found a member of a job we run lost (Ray hears of it)."""
        mj = self.running.get(job_id)
        if mj is not None and mj.ray is not None and peer_id in mj.start.certificate.members:
            mj.ray.member_lost(peer_id)

    def member_done(self, job_id: str) -> None:
        """The host is done with our part (co-signatures handed over, GPUs freed)."""
        self.jobs.counts["exec:member_done"] += 1

    def stop(self, stop: StopJob) -> None:
        mj = self.running.get(stop.job_id)
        if mj is not None and not mj.stop_reason:
            mj.stop_reason = stop.reason
        if mj is not None and mj.ended_ms:
            # The command already ended on its own: there is nothing left to
            # stop, and cancelling now would only cut short the sealing of its
            # outputs (a job that exited 0 was reported "cancelled", exit 137,
            # without outputs, depending on where in its clean-up the stop fell).
            self.jobs.counts["exec:stop_after_end"] += 1
            return
        if mj is not None and mj.ray is not None:
            mj.ray.stop("cancelled", stop.reason)  # lets Ray tear down its processes itself
            return
        scope = self._scopes.get(stop.job_id)
        if scope is not None:
            scope.cancel()

    # ----------------------------------------------------------- running

    async def run(self, start: StartJob) -> None:
        rec = self.jobs.record(start.job_id)
        assert rec is not None, start.job_id[:12]
        refusal = start_refusal(rec.extra.get("member_state"))
        if refusal is not None:
            self._refuse_start(start, refusal)
            return
        node = self.jobs.node
        now = node.now_ms
        m = start.manifest.manifest
        cert = start.certificate
        mj = MemberJob(start=start, chain=CheckpointChain(start.job_id, cert.digest, node.identity.peer_id))
        self.running[start.job_id] = mj
        # On the submitter's own node the record's state is the whole job's
        # (settled from every proof); this member's own outcome goes in extra.
        own_state = "submitter" not in rec.roles
        if own_state:
            rec.state = "running"
        rec.started_at_ms = now()
        rec.extra["member_state"] = "running"
        rec.extra["member_started_at_ms"] = rec.started_at_ms
        self.jobs.persist(start.job_id)
        started_ms = rec.started_at_ms
        end_reason, exit_code, digest, outputs, stopped = "sandbox_error", 255, b"", [], False
        ended_at_ms = 0
        try:
            spec = self._spec(start, mj)
            self.jobs.apply(self.jobs.host.member_started(start.job_id, started_ms))
            self._save_run(mj, started_ms)
            scope = trio.CancelScope()
            self._scopes[start.job_id] = scope
            refused: Exception | None = None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._flush_logs, mj)
                nursery.start_soon(self._checkpoints, mj)
                with scope:
                    try:
                        spec = await self._prepare(mj, spec)
                        if m.runtime == "ray":
                            result = await self._run_ray(mj, spec)
                        else:
                            result = await run_job(spec, self.policy, on_line=self._on_line(mj), now_ms=now,
                                                   on_ended=lambda t: setattr(mj, "ended_ms", t),
                                                   on_started=lambda t: setattr(mj, "run_started_ms", t))
                    except (JobRejected, SandboxUnavailable, OSError, ValueError) as exc:
                        refused = exc  # raised out here, not wrapped in the nursery's ExceptionGroup
                nursery.cancel_scope.cancel()
            if refused is not None and not scope.cancel_called:
                raise refused
            if scope.cancel_called:
                # Stopped (StopJob) before the command ended (``stop`` cancels
                # nothing after): the host knows what for (its proof's end
                # reason).  Decided by when the stop came, not by where its
                # cancellation happened to land (``cancelled_caught`` is False
                # when it lands in a shielded clean-up).
                stopped, end_reason, exit_code = True, "cancelled", 137
            else:
                end_reason = result.reason
                if result.exit_code is not None:
                    exit_code = min(255, max(0, result.exit_code))
                else:
                    # No exit status: a Ray member other than the head ran no
                    # command of its own (its part ended cleanly), while a
                    # sandbox error never ran the job at all.
                    exit_code = 0 if end_reason in ("exited", "finished") else 255
                if end_reason == "finished":  # a Ray member whose head finished the entrypoint
                    end_reason = "exited"
                elif end_reason == "ray_error":
                    end_reason = "sandbox_error"
                elif end_reason == "cancelled":  # a Ray member stopped by a StopJob
                    stopped = True
                digest = result.output_digest
                outputs = [{"path": o.path, "sha256": o.sha256.hex(), "size_bytes": o.size} for o in result.outputs]
                # When the job ended, not after its outputs were sealed and its disk removed.
                ended_at_ms = getattr(result, "ended_at_ms", 0)
        except (JobRejected, SandboxUnavailable, OSError, ValueError) as exc:
            rec.reason = f"refused: {exc}"
            log.warning("job %s refused: %s", start.job_id[:12], exc)
        except Exception as exc:
            # The member still proves what it served and frees its GPUs: a
            # bug here must never leave the job "running" forever.
            self.jobs.counts["exec:runner_error"] += 1
            log.exception("job %s: error while running it (a bug: please report it)", start.job_id[:12])
            rec.reason = f"sandbox error: {exc!r}"[:300]
        # The part claimed is the command's run (docs/proofs.md, "What a member
        # claims"): from its sandbox's start, or nothing if it never started.
        ended_ms = max(ended_at_ms or mj.ended_ms or now(), started_ms)
        run_started_ms = min(mj.run_started_ms, ended_ms) if mj.run_started_ms else ended_ms
        if mj.chain.checkpoints:
            ended_ms = max(ended_ms, mj.chain.checkpoints[-1].t_ms)
        if node.blobs is not None:
            node.blobs.store.unpin(start.job_id)  # its inputs may be evicted now (least recently used first)
        from ._images import release_image

        release_image(node, start.job_id)
        self._gpus_in_use.pop(start.job_id, None)
        self._scopes.pop(start.job_id, None)
        await self._flush_once(mj)
        if self.adversary == "tamper_output" and digest:
            digest = hashlib.sha256(b"tampered" + digest).digest()
        rec.exit_code, rec.ended_at_ms = exit_code, ended_ms
        member_state = "succeeded" if end_reason == "exited" and exit_code == 0 else "failed"
        rec.extra["member_state"] = member_state
        rec.extra["member_ended_at_ms"] = ended_ms
        if own_state:
            rec.state = member_state
            rec.reason = rec.reason or ("" if member_state == "succeeded" else mj.stop_reason or end_reason)
        rec.extra.update(output_digest=digest.hex(), outputs=outputs)
        await self._keep_outputs(start.job_id, outputs)
        # The host signs the proof, hands it over (resent until acknowledged),
        # keeps watching the others, then co-signs and frees the GPUs.
        claimed_start_ms = run_started_ms - inflate_time_ms if self.adversary == "inflate_time" else run_started_ms
        part = PartEnded(started_at_ms=claimed_start_ms, ended_at_ms=ended_ms, exit_code=exit_code,
                         end_reason=end_reason, stopped=stopped, output_digest=digest, gpus=tuple(self._gpu_names(mj)),
                         checkpoints=tuple(mj.chain.checkpoints), outputs=tuple(outputs))
        self.running.pop(start.job_id, None)
        self.jobs.apply(self.jobs.host.member_ended(start.job_id, part, now()))
        self.jobs.persist(start.job_id)

    async def _keep_outputs(self, job_id: str, outputs: list[dict[str, Any]]) -> None:
        """Outputs become blobs in our store, announced, so that ``job results``
        can fetch them from any member that holds them (node/_outputs_blobs.py)."""
        from ._outputs_blobs import keep_outputs

        node = self.jobs.node
        if not outputs or node.blobs is None:
            return
        kept = await trio.to_thread.run_sync(keep_outputs, node, self.work_dir(job_id), outputs)
        nursery = getattr(node, "_nursery", None)
        if nursery is not None:
            for sha in kept:
                nursery.start_soon(node.blobs.announce, sha)

    async def _prepare(self, mj: MemberJob, spec: JobSpec) -> JobSpec:
        """Before the command: stage inputs named by hash or URL (and, for
        ``oci``, the image's root).  A failure ends the job with its reason,
        also sent to the submitter as a line of stderr."""
        from ._inputs import stage_inputs

        on_line = self._on_line(mj)

        async def say(text: str) -> None:
            await on_line("stderr", text.encode())

        try:
            if spec.inputs_dir is not None:
                await stage_inputs(self.jobs.node, mj.start, spec.inputs_dir, say)
            if mj.start.manifest.manifest.runtime == "oci":
                from ._images import prepare_image

                spec = await prepare_image(self.jobs.node, mj.start, spec, say)
        except JobRejected as exc:
            await say(f"p2pgpu: the job cannot start: {exc}")
            raise
        return spec

    # --------------------------------------------------------------- ray

    async def _run_ray(self, mj: MemberJob, spec: JobSpec) -> Any:
        """This member's part of a ``ray`` job (p2pgpu.runtime's RayMember),
        every process of it in this node's sandbox, on a network that reaches
        only the job's other members (docs/ray.md).  The head (rank 0) claims
        the job's subnet and tells the other members (again every 2 s until
        every node is up: a member may start later); rank 0 runs the
        entrypoint; when it ends the head tells the others to stop."""
        from p2pgpu.runtime import RayMember, RayMemberSpec

        start, node = mj.start, self.jobs.node
        m = start.manifest.manifest
        members = tuple(start.certificate.members)
        ray_spec = RayMemberSpec.for_manifest(
            m, job_id=start.job_id, members=members, rank=start.member_index, work_dir=spec.work_dir,
            num_cpus=1, memory_bytes_max=job_memory_bytes_default, gpus=spec.gpus,
            auth_token=start.certificate.digest.hex(), state_path=spec.state_path)
        subnet: list[str] = []
        net_ready, nodes_ready = trio.Event(), trio.Event()

        def on_event(name: str, info: Any) -> None:
            if name == "net_ready":
                subnet.append(str(info["subnet"]))
                net_ready.set()
            elif name in ("nodes_ready", "stopping"):
                nodes_ready.set()

        async def tell_the_others() -> None:
            await net_ready.wait()
            while not nodes_ready.is_set():
                for peer in members[1:]:
                    self._tell(peer, mj, {"type": "ray_rendezvous", "subnet": subnet[0]})
                with trio.move_on_after(2.0):
                    await nodes_ready.wait()

        member = RayMember(ray_spec, policy=self.policy, on_line=self._on_line(mj), on_event=on_event,
                           now_ms=node.now_ms, on_ended=lambda t: setattr(mj, "ended_ms", t),
                           on_started=lambda t: setattr(mj, "run_started_ms", mj.run_started_ms or t))
        mj.ray = member
        try:
            async with trio.open_nursery() as nursery:
                if start.member_index == 0:
                    nursery.start_soon(tell_the_others)
                result = await member.run()
                nursery.cancel_scope.cancel()
        finally:
            mj.ray = None
        if start.member_index == 0:
            for peer in members[1:]:
                self._tell(peer, mj, {"type": "ray_done"})
        return result

    def _tell(self, peer: str, mj: MemberJob, body: dict[str, Any]) -> None:
        node = self.jobs.node
        self.jobs.send(peer, seal(node.identity, Kind.RESULT, {
            **body, "job_id": mj.start.job_id, "peer_id": node.identity.peer_id}).to_bytes())

    def on_member_message(self, body: dict[str, Any], signer: str) -> None:
        """A message from the head of a ``ray`` job we run: the job's subnet,
        or that the job is done.  Only the head (rank 0) is listened to, and a
        subnet is only ever a /24 of the job pool that no other job holds
        here (``RayMember.set_rendezvous``, ``_netns.open_member_net``)."""
        mj = self.running.get(str(body.get("job_id")))
        if mj is None or mj.ray is None or signer != mj.start.certificate.members[0]:
            return
        if body.get("type") == "ray_rendezvous":
            try:
                mj.ray.set_rendezvous(body.get("subnet"))
            except ValueError as exc:
                self.jobs.counts["exec:ray_rendezvous_refused"] += 1
                raise PeerMisbehaved(Reason.BAD_SCHEMA, f"ray rendezvous: {exc}") from None
        elif body.get("type") == "ray_done":
            mj.ray.stop("finished")

    def _gpu_names(self, mj: MemberJob) -> list[str]:
        node, m = self.jobs.node, mj.start.manifest.manifest
        n_gpus = len(mj.gpus) or m.gpus_per_node
        gpu_names = [g.uuid_hash or g.gpu_class for g in node.inventory.gpus][:n_gpus] or ["simulated"] * n_gpus
        return (gpu_names + ["simulated"] * n_gpus)[:n_gpus]

    # ---------------------------------------------------- crash recovery

    def _save_run(self, mj: MemberJob, now_ms: int) -> None:
        """Our progress so far; written before a new chain head goes out."""
        run = self.jobs.host.members.get(mj.start.job_id)
        if self.jobs.db is None or run is None:
            return
        from p2pgpu.store import save_member_run

        start, m = mj.start, mj.start.manifest.manifest
        price = next((a.price_per_gpu_hour for a in start.certificate.accepts
                      if a.peer_id == self.jobs.node.identity.peer_id), m.price_per_gpu_hour_max)
        save_member_run(self.jobs.db, job_id=start.job_id, cert_hash=start.certificate.digest,
                        submitter=m.submitter, members=list(start.certificate.members),
                        price_per_gpu_hour=min(price, m.price_per_gpu_hour_max), currency=m.currency,
                        started_at_ms=mj.run_started_ms or run.membership.started_at_ms, gpus=self._gpu_names(mj),
                        checkpoints=[(c.t_ms, c.info) for c in mj.chain.checkpoints],
                        observed=observed(run.membership), now_ms=now_ms)

    def recover(self, now_ms: int) -> None:
        """After a restart (before the node runs): take back what the
        submitter has not acknowledged, and for each job this node died in,
        sign the proof of the time served up to the last checkpoint and the
        co-signatures of what it saw.  Everything goes out when the timers run."""
        db = self.jobs.db
        if db is None:
            return
        from p2pgpu.store import pending_deliveries, prune_recovery, unfinished_member_runs

        prune_recovery(db, before_ms=now_ms - recovery_kept_ms)
        host = self.jobs.host
        stored = [Delivery(item_hash=row["item_hash"], job_id=row["job_id"], dest=row["dest"], kind=row["kind"],
                           wire=row["wire"], created_ms=row["created_ms"])
                  for row in pending_deliveries(db, limit=host.config.member.pending_max)]
        self.jobs.apply(host.restore_deliveries(stored, now_ms))
        for run in unfinished_member_runs(db):
            if run["job_id"] not in self.running:
                self._recover_run(run, now_ms)

    def _recover_run(self, run: dict[str, Any], now_ms: int) -> None:
        identity = self.jobs.node.identity
        job_id = run["job_id"]
        rec = self.jobs.record(job_id)
        items: list[tuple[str, bytes]] = []
        earning = None
        ended = run["started_at_ms"]
        if not run["proof_signed"]:
            proof = interrupted_proof(identity, run, duration_ms_max=(
                rec.manifest.manifest.duration_s_max * 1000 if rec is not None else None))
            ended = proof.proof.ended_at_ms
            items.append(("proof", proof.wire))
            earning = (proof.proof_hash, proof.proof.gpu_ms * run["price_per_gpu_hour"] // 3_600_000,
                       run["currency"])
            if rec is not None:
                rec.extra.update(member_state="interrupted", member_ended_at_ms=ended,
                                 proof_hash=proof.proof_hash.hex())
                rec.exit_code, rec.ended_at_ms = killed_exit_code, ended
            self.jobs.counts["exec:interrupted_proofs"] += 1
            log.info("job %s was interrupted here: proving %d ms served", job_id[:12], ended - run["started_at_ms"])
        if not run["cosigned"]:
            items += [("cosign", cs.wire) for cs in interrupted_cosigns(identity, run)]
        self.jobs.apply(self.jobs.host.hand_over(job_id, run["submitter"], items, now_ms, send_now=False,
                                                 earning=earning, proof_signed=earning is not None, cosigned=True))
        self.jobs.persist(job_id)

    def _on_line(self, mj: MemberJob) -> Any:
        job_id = mj.start.job_id
        self.logs.add(job_id, [])
        now = self.jobs.node.now_ms
        count = [0]

        async def on_line(stream: str, line: bytes) -> None:
            text = line.decode("utf-8", "replace")
            t = now()
            mj.log_hash.update(line + b"\n")
            if count[0] < log_lines_kept_max:
                count[0] += 1
                self.logs.add(job_id, [{"t_ms": t, "stream": stream, "line": text}])
                mj.pending.append([t, stream, text[:4096]])

        return on_line

    async def _flush_logs(self, mj: MemberJob) -> None:
        while True:
            await trio.sleep(log_flush_interval_s)
            await self._flush_once(mj)

    async def _flush_once(self, mj: MemberJob) -> None:
        node = self.jobs.node
        while mj.pending:
            batch, size = [], 0
            while mj.pending and size + len(mj.pending[0][2]) + 32 < log_batch_bytes_max:
                item = mj.pending.pop(0)
                size += len(item[2]) + 32
                batch.append(item)
            if not batch:  # one line alone over the batch size: cut it
                item = mj.pending.pop(0)
                batch = [[item[0], item[1], item[2][: log_batch_bytes_max // 2]]]
            mj.log_seq += 1
            self.jobs.send(mj.start.manifest.manifest.submitter, seal(node.identity, Kind.RESULT, {
                "type": "log", "job_id": mj.start.job_id, "peer_id": node.identity.peer_id,
                "seq": mj.log_seq, "lines": batch}).to_bytes())
        await trio.lowlevel.checkpoint()

    async def _checkpoints(self, mj: MemberJob) -> None:
        m = mj.start.manifest.manifest
        interval_s = checkpoint_interval_ms(m.duration_s_max * 1000, 1000) / 1000
        while True:
            await trio.sleep(interval_s)
            if mj.ended_ms:
                return  # the job is over: the proof's end closes the chain
            if not mj.run_started_ms:
                continue  # still setting up: the chain covers the command's run only
            head = mj.chain.add(self.jobs.node.now_ms(), mj.log_hash.copy().digest())
            self._save_run(mj, self.jobs.node.now_ms())  # stored before any heartbeat shows the head
            self.jobs.host.member_progress(mj.start.job_id, head, len(mj.chain.checkpoints))

    def _assign_gpus(self, job_id: str, count: int) -> tuple[int, ...]:
        """Which device indices the job gets: the lowest ones no other job here
        holds.  The formation core never promises more GPUs than are free, so
        there are always enough."""
        taken = {g for gs in self._gpus_in_use.values() for g in gs}
        free = [i for i in range(len(self.jobs.node.inventory.gpus)) if i not in taken]
        if len(free) < count:
            raise JobRejected(f"{count} GPUs asked, {len(free)} free here")
        self._gpus_in_use[job_id] = tuple(free[:count])
        return self._gpus_in_use[job_id]

    def work_dir(self, job_id: str) -> Path:
        return self.root / job_id / "work"

    def _spec(self, start: StartJob, mj: MemberJob) -> JobSpec:
        m = start.manifest.manifest
        # ``work`` receives the sealed outputs when the job has ended: the job
        # itself writes to a disk of its own (p2pgpu.runtime._disk) and never
        # sees this directory, nor any path of this home.
        work = self.work_dir(start.job_id)
        for d in (work, work.parent / "in"):
            if os.path.lexists(d):
                remove_tree(str(d))
        work.mkdir(parents=True, mode=0o700)
        # Inline inputs are copied into the job's disk (read-only at /work/in,
        # $P2PGPU_IN); they are not outputs.
        inputs = work.parent / "in"
        inputs.mkdir()
        for inp in m.inputs:
            if inp.data is not None:
                target = (inputs / inp.name).resolve()
                if inputs.resolve() not in target.parents:
                    raise JobRejected(f"input name {inp.name!r} leaves the inputs directory")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(inp.data)
        members = tuple(start.certificate.members)
        cluster = None
        if len(members) > 1:
            cluster = ClusterEnv(rank=start.member_index % m.nodes, world_size=m.nodes,
                                 members=members[(start.member_index // m.nodes) * m.nodes:][: m.nodes],
                                 rendezvous_host="127.0.0.1", rendezvous_port=29500)
        mj.gpus = self._assign_gpus(start.job_id, m.gpus_per_node)
        gpus, env = mj.gpus, dict(m.env)
        if self.jobs.node.inventory.simulated:
            gpus = ()  # simulated GPUs have no device nodes: the job gets none
        return JobSpec(argv=tuple(m.command), work_dir=work, time_limit_ms=m.duration_s_max * 1000,
                       memory_bytes_max=job_memory_bytes_default, env=env, inputs_dir=inputs,
                       network=m.network, gpus=gpus, cluster=cluster, job_id=start.job_id,
                       state_path=work.parent / RECORD_NAME)

