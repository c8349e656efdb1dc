"""Runs the jobs this node was confirmed for, in the bubblewrap sandbox.

On ``StartJob`` it lays out the job's work directory under the home
(``jobs/<job_id>/work``, inputs in ``work/in``), runs the manifest's command
with the manifest's limits and environment plus the cluster's (rank, world
size, members, rendezvous), keeps the logs and result, and tells the
formation core the job finished so its GPUs are free again.  If the sandbox
cannot run here the node does not advertise a runtime at all (see
``Node``), so it is never asked; a job that still arrives is refused, never
run unconfined.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from p2pgpu.core._actions import StartJob, StopJob
from p2pgpu.runtime import ClusterEnv, JobRejected, JobSpec, SandboxPolicy, SandboxUnavailable, run_job

if TYPE_CHECKING:
    from ._jobs import JobsService

log = logging.getLogger("p2pgpu.runner")

job_memory_bytes_default = 2 << 30
log_lines_kept_max = 10_000


class Runner:
    def __init__(self, jobs: "JobsService", *, root: Path | None, policy: SandboxPolicy) -> None:
        self.jobs = jobs
        self.root = root or Path(tempfile.mkdtemp(prefix="p2pgpu-jobs-"))
        self.policy = policy
        self.logs: dict[str, list[dict[str, Any]]] = {}
        self._scopes: dict[str, trio.CancelScope] = {}
        self._gpus_in_use: dict[str, tuple[int, ...]] = {}
        jobs.runner = self.run
        jobs.on_stop = self.stop

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

    def stop(self, stop: StopJob) -> None:
        scope = self._scopes.get(stop.job_id)
        if scope is not None:
            scope.cancel()

    async def run(self, start: StartJob) -> None:
        rec = self.jobs.records[start.job_id]
        now = self.jobs.node.now_ms
        rec.state, rec.started_at_ms = "running", now()
        scope = trio.CancelScope()
        self._scopes[start.job_id] = scope
        try:
            spec = self._spec(start)
            lines = self.logs.setdefault(start.job_id, [])

            async def on_line(stream: str, line: bytes) -> None:
                if len(lines) < log_lines_kept_max:
                    lines.append({"t_ms": now(), "stream": stream, "line": line.decode("utf-8", "replace")})

            with scope:
                result = await run_job(spec, self.policy, on_line=on_line)
            if scope.cancelled_caught:
                rec.state, rec.reason = "cancelled", rec.reason or "stopped"
            else:
                rec.exit_code = result.exit_code
                rec.state = "succeeded" if result.ok else "failed"
                rec.reason = result.reason if not result.ok else ""
                rec.extra["output_digest"] = result.output_digest.hex()
                rec.extra["outputs"] = [{"path": o.path, "sha256": o.sha256.hex(), "size_bytes": o.size}
                                        for o in result.outputs]
        except (JobRejected, SandboxUnavailable, OSError, ValueError) as exc:
            rec.state, rec.reason = "failed", f"refused: {exc}"
        finally:
            self._gpus_in_use.pop(start.job_id, None)
            self._scopes.pop(start.job_id, None)
            rec.ended_at_ms = now()
            self.jobs.finished(start.job_id)

    def _spec(self, start: StartJob) -> JobSpec:
        m = start.manifest.manifest
        work = self.root / start.job_id / "work"
        if work.exists():
            shutil.rmtree(work)
        (work / "in").mkdir(parents=True)
        for inp in m.inputs:
            if inp.data is not None:
                (work / "in" / inp.name).write_bytes(inp.data)
        members = tuple(start.certificate.members)
        cluster = None
        if len(members) > 1:
            cluster = ClusterEnv(rank=start.member_index, world_size=len(members), members=members,
                                 rendezvous_host="127.0.0.1", rendezvous_port=29500)
        gpus = self._assign_gpus(start.job_id, m.gpus_per_node)
        env = dict(m.env)
        if self.jobs.node.inventory.simulated:
            # Simulated GPUs have no device nodes: the job gets none, and is told so.
            env["P2PGPU_SIMULATED_GPUS"] = str(len(gpus))
            gpus = ()
        return JobSpec(argv=tuple(m.command), work_dir=work, time_limit_ms=m.duration_s_max * 1000,
                       memory_bytes_max=job_memory_bytes_default, env=env, inputs_dir=work / "in",
                       network=m.network, gpus=gpus, cluster=cluster, job_id=start.job_id)
