"""Runs the jobs this node was confirmed for: sandbox, heartbeats, proof.

On ``StartJob`` a member lays out the job's work directory under the home
(``jobs/<job_id>/work``, inputs in ``work/in``) and, in one nursery:
- runs the manifest's command in the bubblewrap sandbox with the manifest's
  limits and environment plus the cluster's (rank, world size, members,
  rendezvous);
- heartbeats the other members through the membership core, which detects a
  lost member and applies the manifest's policy (``fail`` stops the job here);
- extends its checkpoint chain every interval (progress info: a hash of the
  log so far) and sends its log lines to the submitter in batches.
When the command ends it signs its work proof, sends it (and the list of its
output files) to the submitter, records what it expects to earn, keeps
watching the others until they are done (its co-signatures vouch for their
time), sends its co-signatures, and frees its GPUs.  If the sandbox cannot
run here the node advertises no runtime, so it is never asked; a job that
still arrives is refused, never run unconfined.

What the member sends the submitter that counts (its outputs list, its proof,
its co-signatures) is stored first (``deliveries``) and resent with backoff
until the submitter acknowledges it with a signed ``proof_ack``: a submitter
that was down when the proof went out still gets it after its restart.  The
member also stores its progress at every checkpoint (before the new chain
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
from p2pgpu.core._membership import Membership
from p2pgpu.core._outcome import member_state_after, start_refusal
from p2pgpu.core._proof import (
    END_REASONS,
    Checkpoint,
    CheckpointChain,
    Cosign,
    Proof,
    chain_heads,
    checkpoint_interval_ms,
    sign_cosign,
    sign_proof,
)
from p2pgpu.runtime import ClusterEnv, JobRejected, JobSpec, SandboxPolicy, SandboxUnavailable, run_job
from p2pgpu.runtime._leftovers import RECORD_NAME, reap_leftovers
from p2pgpu.runtime._sandbox import sandbox_disk_backend
from p2pgpu.runtime._walk import remove_tree

from ._collect import ProofAck, item_hash

if TYPE_CHECKING:
    from ._jobs import JobsService

log = logging.getLogger("p2pgpu.runner")

job_memory_bytes_default = 2 << 30
log_lines_kept_max = 10_000
log_batch_bytes_max = 12 * 1024
log_flush_interval_s = 0.2
heartbeat_interval_ms = 500
member_timeout_ms = 3_000
#: After our part ends, how long we keep watching members that still run.
watch_after_end_ms_max = 120_000
#: Resending what the submitter has not acknowledged: first after
#: ``resend_interval_ms_min``, doubling up to ``resend_interval_ms_max``,
#: given up ``resend_ttl_ms`` after the message was made.
resend_interval_ms_min = 1_000
resend_interval_ms_max = 15_000
resend_ttl_ms = 3_600_000
pending_max = 10_000
#: Acknowledged deliveries, finished runs and settled collections' items are
#: forgotten this long after (at a start): resends stop after ``resend_ttl_ms``.
recovery_kept_ms = 7 * 24 * 3_600_000
#: The exit status an interrupted member reports (killed, as by SIGKILL).
interrupted_exit_code = 137


@dataclass
class Delivery:
    """One signed message to the submitter, resent until acknowledged."""

    item_hash: bytes
    job_id: str
    dest: str
    kind: str
    wire: bytes
    created_ms: int
    attempts: int = 0
    next_ms: int = 0


@dataclass
class MemberJob:
    start: StartJob
    membership: Membership
    chain: CheckpointChain
    gpus: tuple[int, ...] = ()
    pending: list[list[Any]] = field(default_factory=list)
    log_hash: Any = field(default_factory=hashlib.sha256)
    log_seq: int = 0
    stop_reason: str = ""
    changed: trio.Event = field(default_factory=trio.Event)
    ray: Any = None
    #: When the sandbox died (wall ms); no checkpoint is added after it.
    ended_ms: int = 0


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
        self.logs: dict[str, list[dict[str, Any]]] = {}
        self.running: dict[str, MemberJob] = {}
        self._scopes: dict[str, trio.CancelScope] = {}
        self._gpus_in_use: dict[str, tuple[int, ...]] = {}
        #: item hash -> what we still resend to a submitter (see the module doc).
        self.pending: dict[bytes, Delivery] = {}
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
        rec = self.jobs.records[start.job_id]
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

    def on_heartbeat(self, job_id: str, data: bytes) -> None:
        mj = self.running.get(job_id)
        if mj is None:
            self.jobs.counts["exec:heartbeat_unknown_job"] += 1
            return
        self.jobs.apply(mj.membership.on_heartbeat(data, self.jobs.node.now_ms()), origin="membership")
        mj.changed.set()

    def on_timer(self, key: str, now_ms: int) -> None:
        job_id = key.split("/")[1] if key.count("/") >= 2 else ""
        if key.endswith("/resend"):
            self._resend(job_id, now_ms)
            return
        mj = self.running.get(job_id)
        if mj is not None:
            self.jobs.apply(mj.membership.on_timer(key, now_ms), origin="membership")
            mj.changed.set()

    def stop(self, stop: StopJob) -> None:
        mj = self.running.get(stop.job_id)
        if mj is not None and not mj.stop_reason:
            mj.stop_reason = stop.reason
        if mj is not None and mj.ray is not None:
            mj.ray.stop("cancelled", stop.reason)  # lets Ray tear down its processes itself
            return
        scope = self._scopes.get(stop.job_id)
        if scope is not None:
            scope.cancel()

    # ----------------------------------------------------------- running

    async def run(self, start: StartJob) -> None:
        rec = self.jobs.records[start.job_id]
        refusal = start_refusal(rec.extra.get("member_state"))
        if refusal is not None:
            self._refuse_start(start, refusal)
            return
        node = self.jobs.node
        now = node.now_ms
        m = start.manifest.manifest
        cert = start.certificate
        mj = MemberJob(
            start=start,
            membership=Membership(identity=node.identity, job_id=start.job_id, cert_hash=cert.digest,
                                  members=cert.members, policy=m.on_member_loss,
                                  heartbeat_interval_ms=heartbeat_interval_ms, member_timeout_ms=member_timeout_ms),
            chain=CheckpointChain(start.job_id, cert.digest, node.identity.peer_id),
        )
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
        end_reason, exit_code, digest, outputs = "sandbox_error", 255, b"", []
        ended_at_ms = 0
        try:
            spec = self._spec(start, mj)
            self.jobs.apply(mj.membership.start(started_ms), origin="membership")
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
                                                   on_ended=lambda t: setattr(mj, "ended_ms", t))
                    except (JobRejected, SandboxUnavailable, OSError, ValueError) as exc:
                        refused = exc  # raised out here, not wrapped in the nursery's ExceptionGroup
                nursery.cancel_scope.cancel()
            if refused is not None:
                raise refused
            if scope.cancelled_caught:
                end_reason = "job_failed" if "failed" in mj.stop_reason or "lost" in mj.stop_reason else "cancelled"
                exit_code = 137
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
                elif end_reason == "cancelled" and "lost" in mj.stop_reason:
                    end_reason = "member_lost"
                digest = result.output_digest
                outputs = [{"path": o.path, "sha256": o.sha256.hex(), "size_bytes": o.size} for o in result.outputs]
                # When the job ended, not after its outputs were sealed and its disk removed.
                ended_at_ms = getattr(result, "ended_at_ms", 0)
        except (JobRejected, SandboxUnavailable, OSError, ValueError) as exc:
            rec.reason = f"refused: {exc}"
            log.warning("job %s refused: %s", start.job_id[:12], exc)
        except Exception as exc:  # noqa: BLE001 - e.g. an ExceptionGroup from the job's tasks: a bug of ours
            # The member still proves what it served and frees its GPUs: a
            # bug here must never leave the job "running" forever.
            self.jobs.counts["exec:runner_error"] += 1
            log.exception("job %s: error while running it (a bug: please report it)", start.job_id[:12])
            rec.reason = f"sandbox error: {exc!r}"[:300]
        last_checkpoint = mj.chain.checkpoints[-1].t_ms if mj.chain.checkpoints else started_ms
        ended_ms = max(ended_at_ms or now(), started_ms, last_checkpoint)
        if node.blobs is not None:
            node.blobs.store.unpin(start.job_id)  # its inputs may be evicted now (least recently used first)
        from ._images import release_image  # noqa: PLC0415

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
        claimed_start_ms = started_ms - inflate_time_ms if self.adversary == "inflate_time" else started_ms
        self._send_proof(mj, claimed_start_ms, ended_ms, exit_code, end_reason, digest, outputs)
        # Stored now, not only after the watch below: a node killed while it
        # watches the others must come back knowing how its own part ended
        # and which proof it sent (the submitter already holds that proof).
        self.jobs.persist(start.job_id)
        self.jobs.apply(mj.membership.finish(ended_ms), origin="membership")
        # Keep watching members that still run: our co-signatures vouch for their time.
        with trio.move_on_after(min(watch_after_end_ms_max, m.duration_s_max * 1000 + member_timeout_ms) / 1000):
            while not mj.membership.done:
                await mj.changed.wait()
                mj.changed = trio.Event()
        self._hand_over(start.job_id, m.submitter, [("cosign", cs.wire) for cs in mj.membership.cosigns()],
                        cosigned=True)
        self.running.pop(start.job_id, None)
        self.jobs.finished(start.job_id)
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
        from p2pgpu.runtime import RayMember, RayMemberSpec  # noqa: PLC0415

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
                           now_ms=node.now_ms, on_ended=lambda t: setattr(mj, "ended_ms", t))
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

    def _send_proof(self, mj: MemberJob, started: int, ended: int, exit_code: int, end_reason: str,
                    digest: bytes, outputs: list[dict[str, Any]]) -> None:
        start, node = mj.start, self.jobs.node
        m = start.manifest.manifest
        gpu_names = self._gpu_names(mj)
        gpu_ms = len(gpu_names) * min(ended - started, m.duration_s_max * 1000)
        proof = sign_proof(node.identity, Proof(
            job_id=start.job_id, cert_hash=start.certificate.digest, peer_id=node.identity.peer_id,
            gpus=tuple(gpu_names), started_at_ms=started, ended_at_ms=ended, gpu_ms=gpu_ms, exit_code=exit_code,
            end_reason=end_reason if end_reason in END_REASONS else "sandbox_error",
            output_digest=digest, checkpoints=tuple(mj.chain.checkpoints), chain_head=mj.chain.head))
        outputs_wire = seal(node.identity, Kind.RESULT, {
            "type": "outputs", "job_id": start.job_id, "peer_id": node.identity.peer_id,
            "outputs": outputs[:200], "exit_code": exit_code, "end_reason": end_reason}).to_bytes()
        expected = gpu_ms * min(self._price(start), m.price_per_gpu_hour_max) // 3_600_000
        self._hand_over(start.job_id, m.submitter, [("outputs", outputs_wire), ("proof", proof.wire)],
                        earning=(proof.proof_hash, expected, m.currency), observed=self._observed(mj))
        rec = self.jobs.records[start.job_id]
        rec.extra["proof_hash"] = proof.proof_hash.hex()

    def _price(self, start: StartJob) -> int:
        me = self.jobs.node.identity.peer_id
        return next((a.price_per_gpu_hour for a in start.certificate.accepts if a.peer_id == me),
                    start.manifest.manifest.price_per_gpu_hour_max)

    # ------------------------------------------- deliveries to the submitter

    def _hand_over(self, job_id: str, dest: str, items: list[tuple[str, bytes]], *, send_now: bool = True,
                   earning: tuple[bytes, int, str] | None = None, observed: dict[str, list[Any]] | None = None,
                   cosigned: bool = False) -> None:
        """Store ``items`` (and what goes with them: the earning a proof
        expects, the run's "proof signed"/"co-signed" marks) in one
        transaction, then send them and resend until acknowledged."""
        now = self.jobs.node.now_ms()
        db = self.jobs.db
        if db is not None:
            from p2pgpu.store import add_delivery, record_earning, set_member_run, transaction  # noqa: PLC0415

            with transaction(db):
                for kind, wire in items:
                    add_delivery(db, item_hash=item_hash(wire), job_id=job_id, dest=dest, kind=kind, wire=wire,
                                 now_ms=now)
                if earning is not None and earning[1] > 0:
                    record_earning(db, earning[0], job_id=job_id, amount=earning[1], currency=earning[2],
                                   payout_address=self.jobs.node.payout_address, created_ms=now)
                set_member_run(db, job_id, proof_signed=earning is not None, cosigned=cosigned, observed=observed)
        for kind, wire in items:
            d = Delivery(item_hash=item_hash(wire), job_id=job_id, dest=dest, kind=kind, wire=wire, created_ms=now,
                         next_ms=now)
            if d.item_hash in self.pending or len(self.pending) >= pending_max:
                self.jobs.counts["exec:deliveries_not_tracked"] += 1
                if send_now:
                    self.jobs.send(dest, wire)
                continue
            self.pending[d.item_hash] = d
            if send_now:
                self._send_delivery(d, now)
        self._schedule(job_id)

    def _send_delivery(self, d: Delivery, now_ms: int) -> None:
        d.attempts += 1
        d.next_ms = now_ms + min(resend_interval_ms_max, resend_interval_ms_min << min(d.attempts - 1, 16))
        if d.attempts > 1:
            self.jobs.counts["exec:resent"] += 1
        self.jobs.send(d.dest, d.wire)  # may deliver locally and be acknowledged at once

    def _schedule(self, job_id: str) -> None:
        due = [d.next_ms for d in self.pending.values() if d.job_id == job_id]
        key = f"membership/{job_id}/resend"
        if due:
            self.jobs.timers.set(key, min(due))
        else:
            self.jobs.timers.cancel(key)

    def _resend(self, job_id: str, now_ms: int) -> None:
        for d in [d for d in self.pending.values() if d.job_id == job_id and d.next_ms <= now_ms]:
            if now_ms - d.created_ms > resend_ttl_ms:
                log.warning("job %s: the submitter never acknowledged our %s; giving up", job_id[:12], d.kind)
                self._settle_delivery(d, "expired", now_ms)
                continue
            self._send_delivery(d, now_ms)
        self._schedule(job_id)

    def _settle_delivery(self, d: Delivery, status: str, now_ms: int) -> None:
        self.pending.pop(d.item_hash, None)
        self.jobs.counts[f"exec:delivery_{status}"] += 1
        if self.jobs.db is not None:
            from p2pgpu.store import ack_delivery  # noqa: PLC0415

            ack_delivery(self.jobs.db, d.item_hash, status=status, now_ms=now_ms)

    def on_ack(self, body: dict[str, Any], signer: str) -> None:
        """The submitter acknowledged messages we sent it.  Only the job's
        submitter may: an ack from anyone else is refused (``PeerMisbehaved``)."""
        ack = ProofAck.from_body(body, signer)
        rec = self.jobs.records.get(ack.job_id)
        if rec is not None and rec.manifest.manifest.submitter != signer:
            raise PeerMisbehaved(Reason.NOT_A_MEMBER, "proof_ack from someone who did not submit that job")
        now = self.jobs.node.now_ms()
        taken = 0
        for h in ack.items:
            d = self.pending.get(h)
            if d is None or d.job_id != ack.job_id:
                continue
            if d.dest != signer:
                raise PeerMisbehaved(Reason.NOT_A_MEMBER, "proof_ack from someone who did not submit that job")
            self._settle_delivery(d, ack.status, now)
            taken += 1
        if not taken:
            self.jobs.counts["exec:ack_nothing_pending"] += 1  # a repeated ack: our resend crossed it
        self._schedule(ack.job_id)

    # ---------------------------------------------------- crash recovery

    def _observed(self, mj: MemberJob) -> dict[str, list[Any]]:
        """What we saw of the others so far, to co-sign after a crash."""
        return {peer: [o.first_seen_ms, o.last_seen_ms, o.heartbeats, o.chain_head.hex()]
                for peer, o in mj.membership.seen.items() if o.first_seen_ms is not None and o.last_seen_ms is not None}

    def _save_run(self, mj: MemberJob, now_ms: int) -> None:
        """Our progress so far; written before a new chain head goes out."""
        if self.jobs.db is None:
            return
        from p2pgpu.store import save_member_run  # noqa: PLC0415

        start, m = mj.start, mj.start.manifest.manifest
        save_member_run(self.jobs.db, job_id=start.job_id, cert_hash=start.certificate.digest,
                        submitter=m.submitter, members=list(start.certificate.members),
                        price_per_gpu_hour=min(self._price(start), m.price_per_gpu_hour_max), currency=m.currency,
                        started_at_ms=mj.membership.started_at_ms, gpus=self._gpu_names(mj),
                        checkpoints=[(c.t_ms, c.info) for c in mj.chain.checkpoints], observed=self._observed(mj),
                        now_ms=now_ms)

    def recover(self, now_ms: int) -> None:
        """After a restart (before the node runs): take back what the
        submitter has not acknowledged, and for each job this node died in,
        sign the proof of the time served up to the last checkpoint and the
        co-signatures of what it saw.  Everything goes out when the timers run."""
        db = self.jobs.db
        if db is None:
            return
        from p2pgpu.store import pending_deliveries, prune_recovery, unfinished_member_runs  # noqa: PLC0415

        prune_recovery(db, before_ms=now_ms - recovery_kept_ms)
        for row in pending_deliveries(db, limit=pending_max):
            self.pending[row["item_hash"]] = Delivery(
                item_hash=row["item_hash"], job_id=row["job_id"], dest=row["dest"], kind=row["kind"],
                wire=row["wire"], created_ms=row["created_ms"], next_ms=now_ms)
        for run in unfinished_member_runs(db):
            if run["job_id"] not in self.running:
                self._recover_run(run, now_ms)
        for job_id in sorted({d.job_id for d in self.pending.values()}):
            self._schedule(job_id)

    def _recover_run(self, run: dict[str, Any], now_ms: int) -> None:
        identity = self.jobs.node.identity
        job_id = run["job_id"]
        rec = self.jobs.records.get(job_id)
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
                rec.exit_code, rec.ended_at_ms = interrupted_exit_code, ended
            self.jobs.counts["exec:interrupted_proofs"] += 1
            log.info("job %s was interrupted here: proving %d ms served", job_id[:12], ended - run["started_at_ms"])
        if not run["cosigned"]:
            items += [("cosign", cs.wire) for cs in interrupted_cosigns(identity, run)]
        self._hand_over(job_id, run["submitter"], items, send_now=False, earning=earning, cosigned=True)
        self.jobs.persist(job_id)

    def _on_line(self, mj: MemberJob) -> Any:
        lines = self.logs.setdefault(mj.start.job_id, [])
        now = self.jobs.node.now_ms

        async def on_line(stream: str, line: bytes) -> None:
            text = line.decode("utf-8", "replace")
            t = now()
            mj.log_hash.update(line + b"\n")
            if len(lines) < log_lines_kept_max:
                lines.append({"t_ms": t, "stream": stream, "line": text})
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
            head = mj.chain.add(self.jobs.node.now_ms(), mj.log_hash.copy().digest())
            self._save_run(mj, self.jobs.node.now_ms())  # stored before any heartbeat shows the head
            mj.membership.set_progress(head, len(mj.chain.checkpoints))

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


def interrupted_proof(identity: Any, run: dict[str, Any], *, duration_ms_max: int | None = None) -> Any:
    """The proof a member signs after dying mid-job: from its start to its
    last stored checkpoint (no further: nobody saw a later head), end reason
    ``interrupted``, no output.  Its co-signers heard its heartbeats at least
    until that checkpoint, so it stays within what they observed."""
    cps = tuple(Checkpoint(t_ms=t, info=i) for t, i in run["checkpoints"])
    started = run["started_at_ms"]
    ended = max(started, cps[-1].t_ms if cps else started)
    served = ended - started if duration_ms_max is None else min(ended - started, duration_ms_max)
    heads = chain_heads(run["job_id"], run["cert_hash"], identity.peer_id, cps)
    return sign_proof(identity, Proof(
        job_id=run["job_id"], cert_hash=run["cert_hash"], peer_id=identity.peer_id, gpus=tuple(run["gpus"]),
        started_at_ms=started, ended_at_ms=ended, gpu_ms=len(run["gpus"]) * served,
        exit_code=interrupted_exit_code, end_reason="interrupted", output_digest=b"", checkpoints=cps,
        chain_head=heads[-1]))


def interrupted_cosigns(identity: Any, run: dict[str, Any]) -> list[Any]:
    """Co-signatures of what a member had seen of the others when it last
    stored its progress (in member order)."""
    out = []
    for peer in run["members"]:
        seen = run["observed"].get(peer)
        if peer == identity.peer_id or seen is None:
            continue
        first, last, count, head = seen
        out.append(sign_cosign(identity, Cosign(
            job_id=run["job_id"], cert_hash=run["cert_hash"], subject=peer, observer=identity.peer_id,
            first_seen_ms=first, last_seen_ms=last, heartbeats=count, last_chain_head=bytes.fromhex(head))))
    return out
