"""The ``ray`` runtime: the members of a confirmed cluster become one Ray cluster, every process of it in a sandbox.

Every member runs one :class:`RayMember`, and everything of the job runs in
that member's bubblewrap sandbox with the same guarantees as a ``process``
job (``_sandbox``: no node files, no node paths, its own disk, memory and
process limits, the keeper that kills it with the node): Ray's GCS, raylet,
agents and workers, and the driver.  The sandbox's command is a small
supervisor (``_ray_inside``) that starts Ray, watches it and runs the driver
on rank 0; it reports to the node through an event pipe.

The network is the difference: each member's sandbox joins a network
namespace of its own (``_netns``) whose only reachable addresses are the
other members' sandboxes of the same job (a /24 per job on the host, a
/30 per member, nftables rules on the host's end of its veth): not the
node's control API, not its libp2p ports, not the host, not other jobs,
not the internet.  Inside its own namespace every port is free, so Ray runs
on its default ports and the rendezvous is only the job's subnet: rank 0
claims one (:func:`_netns.claim_subnet`) and the node sends it to the
others (``on_event("net_ready", {"subnet"})``, :meth:`RayMember.
set_rendezvous`), whose sandboxes then join at ``subnet[2]:6379``.

Ray's Python comes from the node's own environment, bound read-only into
the sandbox (a virtualenv at ``/opt/p2pgpu/env``, its base interpreter at
its own path); :func:`ray_unavailable` says why a node cannot offer ``ray``
(the operator did not turn it on, Ray is not installed, no namespaces or
nftables, the Python environment overlaps the node's home).

A member lost mid-job is noticed two ways: Ray declares its node dead (the
head's supervisor watches the GCS), or the caller's heartbeat layer reports
it (:meth:`RayMember.member_lost`).  Either way ``on_member_lost`` is awaited
and the manifest's policy applies: ``fail`` stops the job on this member,
``continue`` carries on, except that nothing continues without the head.
Stopping a member is killing its sandbox: the pid namespace takes every Ray
process with it.  The member's lifecycle is the table :data:`TRANSITIONS`.
See ``docs/ray.md``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from enum import Enum
from pathlib import Path
from typing import Any

import trio

from p2pgpu.core._proof import output_digest

from ._limits import SandboxUnavailable
from ._netns import ClusterNet, NetUnavailable, claim_subnet, net_unavailable, parse_subnet
from ._ray_spec import (
    POLICIES,
    REASONS,
    RayAddress,
    RayMemberSpec,
    RayResult,
    check_env,
    object_store_bytes_min,
)
from ._sandbox import DEFAULT_PATH, ClusterEnv, JobSpec, SandboxPolicy, SandboxResult, in_thread, run_job

__all__ = ["POLICIES", "REASONS", "TRANSITIONS", "RayAddress", "RayMember", "RayMemberSpec", "RayResult", "State",
           "ray_python", "ray_unavailable"]

LineCallback = Callable[[str, bytes], Awaitable[None]]
EventCallback = Callable[[str, Mapping[str, Any]], None]
LostCallback = Callable[[int, str, str], Awaitable[None]]
#: Where the node's Python environment (a virtualenv) appears in the sandbox.
ENV_IN_SANDBOX = "/opt/p2pgpu/env"
#: What the sandbox's supervisor may report (lines longer are cut; more are ignored).
event_bytes_max = 4096
events_max = 10_000
#: /dev/shm beyond the object store (Ray falls back to /tmp when it is short).
shm_slack_bytes = 64 << 20
_INSIDE = Path(__file__).with_name("_ray_inside.py")


class State(str, Enum):
    STARTING = "starting"  # network and sandbox being made, Ray starting
    WAITING = "waiting"    # head: up, waiting for every member's node
    RUNNING = "running"    # head: entrypoint running; other ranks: joined
    STOPPING = "stopping"  # tearing down
    DONE = "done"


TRANSITIONS: dict[State, tuple[State, ...]] = {
    State.STARTING: (State.WAITING, State.RUNNING, State.STOPPING),
    State.WAITING: (State.RUNNING, State.STOPPING),
    State.RUNNING: (State.STOPPING,),
    State.STOPPING: (State.DONE,),
    State.DONE: (),
}


def ray_python() -> tuple[str, tuple[tuple[str, str], ...]]:
    """(the Python to run in the sandbox, the read-only binds it needs):
    the node's virtualenv at :data:`ENV_IN_SANDBOX` and its base interpreter
    at its own path (nothing when it lives under ``/usr``)."""
    binds: list[tuple[str, str]] = []
    base, prefix = os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)
    if not (base == "/usr" or base.startswith("/usr/")):
        binds.append((base, base))
    if prefix != base:
        binds.append((prefix, ENV_IN_SANDBOX))
        return f"{ENV_IN_SANDBOX}/bin/{os.path.basename(sys.executable)}", tuple(binds)
    return os.path.realpath(sys.executable), tuple(binds)


def _overlaps(a: str, b: str) -> bool:
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def ray_unavailable(*, enabled: bool = False, home: Path | None = None) -> str | None:
    """``None`` if this node can run ``ray`` jobs, else why not (the node
    then does not advertise the runtime).  ``enabled`` is the operator's
    choice (``allow_ray_jobs`` in ``config.toml``, off by default)."""
    if not enabled:
        return "ray jobs are off (set allow_ray_jobs = true in config.toml to offer them)"
    if importlib.util.find_spec("ray") is None:
        return "ray is not installed (pip install 'p2pgpu[ray]')"
    _python, binds = ray_python()
    for src, dest in binds:
        if home is not None and _overlaps(src, str(home)):
            return f"the Python environment {src} overlaps the node's home {home}: it would be bound into jobs"
        if any(_overlaps(dest, reserved) for reserved in ("/work", "/tmp", "/proc", "/dev", "/etc")):
            return f"the Python installation {src} would be bound at {dest}, a path the sandbox reserves"
    return net_unavailable()


class RayMember:
    """Run one member's part of a ``ray`` job: ``await RayMember(spec).run()``.

    ``on_line(stream, line)`` gets the sandbox's output lines (the driver's,
    on rank 0); ``on_event(name, info)`` is called at each step
    (``net_ready`` with the ``subnet`` on the head: send it to the others;
    ``ray_started`` with the head's :class:`RayAddress`; ``nodes_ready``,
    ``entrypoint_started``, ``member_lost``, ``ray_start_retry``,
    ``stopping``); ``on_member_lost(rank, peer_id, source)`` is awaited when
    a member is lost (``source`` is ``"ray"`` or ``"caller"``).  ``now_ms``
    (the wall clock) dates ``RayResult.ended_at_ms``; ``on_ended`` is called
    with it when the sandbox dies, ``on_started`` when its process started
    (``run_job``'s: what a member claims runs from there).
    """

    def __init__(self, spec: RayMemberSpec, *, policy: SandboxPolicy | None = None,
                 on_line: LineCallback | None = None, on_event: EventCallback | None = None,
                 on_member_lost: LostCallback | None = None, now_ms: Callable[[], int] | None = None,
                 on_ended: Callable[[int], None] | None = None,
                 on_started: Callable[[int], None] | None = None) -> None:
        check_env(spec.env)
        self.spec = spec
        self.policy = policy or SandboxPolicy()
        self._on_line, self._on_event, self._on_lost = on_line, on_event, on_member_lost
        self._now_ms, self._on_ended, self._on_started = now_ms, on_ended, on_started
        self.state = State.STARTING
        self.address: RayAddress | None = None
        self.subnet: str = ""
        self._subnet_set = trio.Event()
        self._stop_reason = ""
        self._stop_detail = ""
        self._stop_event = trio.Event()
        self._lost: list[int] = []
        self._pending_lost: list[tuple[int, str]] = []
        self._lost_wakeup = trio.Event()
        self._events = 0
        self._driver_exited = False
        self._failure = ""
        self._t0 = 0.0
        self._startup_ms = -1

    # --- calls from the caller (the node) --------------------------------------------------

    def set_rendezvous(self, subnet: str) -> None:
        """Tell a joining member its job's subnet (rank 0 chose it); raises
        ``ValueError`` for anything but a /24 of the pool."""
        net = parse_subnet(subnet)
        if not self._subnet_set.is_set():
            self.subnet = str(net)
            self._subnet_set.set()

    def stop(self, reason: str = "cancelled", detail: str = "") -> None:
        """End this member's run: ``cancelled`` by the submitter, ``finished``
        (the head said the job ended), or ``member_lost``.  Idempotent."""
        if reason not in REASONS:
            raise ValueError(f"reason must be one of {', '.join(REASONS)}")
        if not self._stop_event.is_set():
            self._stop_reason, self._stop_detail = reason, detail
            self._stop_event.set()

    def member_lost(self, peer_id: str) -> None:
        """The heartbeat layer declared ``peer_id`` lost (``MemberLost``)."""
        if peer_id not in self.spec.members:
            raise ValueError(f"{peer_id} is not a member of this cluster")
        self._pending_lost.append((self.spec.members.index(peer_id), "caller"))
        self._lost_wakeup.set()

    # --- the run ------------------------------------------------------------------------------

    def _to(self, new: State) -> None:
        if new not in TRANSITIONS[self.state]:
            raise RuntimeError(f"ray member: {self.state.value} -> {new.value} is not allowed")
        self.state = new

    def _event(self, name: str, **info: Any) -> None:
        if self._on_event is not None:
            self._on_event(name, info)

    def _ms(self) -> int:
        return int((trio.current_time() - self._t0) * 1000)

    async def run(self) -> RayResult:
        """Make the network, run the sandbox, and say how it ended."""
        self._t0 = trio.current_time()
        result: SandboxResult | None = None
        try:
            with trio.move_on_after(self.spec.start_timeout_ms / 1000) as waited:
                subnet = await self._rendezvous()
            if waited.cancelled_caught or subnet is None:
                reason, detail = ("ray_error", f"no rendezvous from the head in {self.spec.start_timeout_ms} ms"
                                  ) if not self._stop_event.is_set() else (self._stop_reason, self._stop_detail)
            else:
                result = await self._run_sandbox(subnet)
                reason, detail = self._outcome(result)
        except (NetUnavailable, SandboxUnavailable) as exc:
            reason, detail = "ray_error", str(exc)
        finally:
            # Whatever ended it (the caller's cancellation included), the
            # sandbox is gone by now: run_job killed it and removed the rest.
            self._to(State.STOPPING)
            self._event("stopping", ms=self._ms())
            self._to(State.DONE)
        return self._result(reason, detail, result)

    async def _rendezvous(self) -> str | None:
        """The job's subnet: claimed here on rank 0, told by rank 0 elsewhere."""
        spec = self.spec
        if spec.head:
            self.subnet = str(await in_thread(claim_subnet, spec.job_id))
            self._event("net_ready", subnet=self.subnet)
            return self.subnet
        async with trio.open_nursery() as nursery:
            async def stopped() -> None:
                await self._stop_event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(stopped)
            await self._subnet_set.wait()
            nursery.cancel_scope.cancel()
        return self.subnet if self._subnet_set.is_set() and not self._stop_event.is_set() else None

    def _job_spec(self, subnet: str, events_fd: int) -> JobSpec:
        spec = self.spec
        net = ClusterNet(job_id=spec.job_id, subnet=parse_subnet(subnet), rank=spec.rank)
        head_ip = str(ClusterNet(job_id=spec.job_id, subnet=net.subnet, rank=0).sandbox_ip)
        python, binds = ray_python()
        object_store = max(object_store_bytes_min, spec.memory_bytes_max // 4)
        config = {"events_fd": events_fd, "rank": spec.rank, "world_size": spec.world_size,
                  "node_ip": str(net.sandbox_ip), "head_ip": head_ip, "gcs_port": spec.gcs_port,
                  "temp_dir": "/tmp/ray", "num_cpus": spec.num_cpus, "num_gpus": len(spec.gpus),
                  "memory": spec.memory_bytes_max - object_store, "object_store": object_store,
                  "start_timeout_s": spec.start_timeout_ms / 1000,
                  "watch_interval_s": max(0.1, spec.health_check_period_ms / 2000),
                  "command": list(spec.command)}
        env = {"PATH": f"{os.path.dirname(python)}:{DEFAULT_PATH}", "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1",
               "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_gcs_rpc_server_reconnect_timeout_s": str(spec.head_lost_timeout_s),
               "RAY_health_check_period_ms": str(spec.health_check_period_ms),
               "RAY_health_check_failure_threshold": str(spec.health_check_failures_max)}
        if spec.auth_token:
            env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": spec.auth_token})
        env.update(spec.env)
        cluster = ClusterEnv(rank=spec.rank, world_size=spec.world_size, members=spec.members,
                             rendezvous_host=head_ip, rendezvous_port=spec.master_port)
        return JobSpec(argv=(python, "-I", "-c", _INSIDE.read_text(), json.dumps(config)), work_dir=spec.work_dir,
                       time_limit_ms=spec.time_limit_ms, memory_bytes_max=spec.memory_bytes_max, env=env,
                       gpus=spec.gpus, cluster=cluster, job_id=spec.job_id, cluster_net=net, ro_binds=binds,
                       state_path=spec.state_path, log_bytes_max=spec.log_bytes_max,
                       log_line_bytes_max=spec.log_line_bytes_max, output_files_max=spec.output_files_max,
                       output_file_bytes_max=spec.output_file_bytes_max, output_bytes_max=spec.output_bytes_max)

    async def _run_sandbox(self, subnet: str) -> SandboxResult | None:
        r_fd, w_fd = os.pipe()
        events = trio.lowlevel.FdStream(r_fd)  # owns r_fd
        object_store = max(object_store_bytes_min, self.spec.memory_bytes_max // 4)
        policy = dataclasses.replace(self.policy, shm_bytes_max=max(self.policy.shm_bytes_max,
                                                                     object_store + shm_slack_bytes))
        result: SandboxResult | None = None
        try:
            job = self._job_spec(subnet, w_fd)
            async with trio.open_nursery() as nursery:
                run_scope = trio.CancelScope()
                nursery.start_soon(self._read_events, events)
                nursery.start_soon(self._wait_stop, run_scope)
                nursery.start_soon(self._watch_losses)
                with run_scope:
                    try:
                        result = await run_job(job, policy, on_line=self._on_line, now_ms=self._now_ms,
                                               on_ended=self._on_ended, on_started=self._on_started,
                                               pass_fds=(w_fd,))
                    finally:
                        os.close(w_fd)
                        w_fd = -1
                nursery.cancel_scope.cancel()
        finally:
            if w_fd >= 0:
                os.close(w_fd)
            await events.aclose()
        return result

    async def _wait_stop(self, run_scope: trio.CancelScope) -> None:
        await self._stop_event.wait()
        run_scope.cancel()  # kills the sandbox: the pid namespace takes every Ray process with it

    async def _watch_losses(self) -> None:
        while True:
            await self._lost_wakeup.wait()
            self._lost_wakeup = trio.Event()
            while self._pending_lost:
                rank, source = self._pending_lost.pop(0)
                if await self._handle_loss(rank, source):
                    self.stop("member_lost", f"member {rank} lost ({source})")

    async def _handle_loss(self, rank: int, source: str) -> bool:
        """Record a lost member; True if the job must stop here."""
        if rank in self._lost or rank == self.spec.rank:
            return False
        self._lost.append(rank)
        peer = self.spec.members[rank]
        self._event("member_lost", rank=rank, peer_id=peer, source=source)
        if self._on_lost is not None:
            await self._on_lost(rank, peer, source)
        return self.spec.on_member_loss == "fail" or rank == 0

    async def _read_events(self, source: trio.abc.ReceiveStream) -> None:
        """The sandbox's reports: the job's own word about its own cluster."""
        buf = b""
        while chunk := await source.receive_some(65536):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            buf = buf[-event_bytes_max:]
            for line in lines:
                self._events += 1
                if self._events > events_max:
                    continue
                try:
                    msg = json.loads(line[:event_bytes_max])
                except ValueError:
                    continue
                if isinstance(msg, dict) and isinstance(msg.get("event"), str):
                    self._on_inside(msg["event"], msg)

    def _on_inside(self, name: str, msg: dict[str, Any]) -> None:
        spec = self.spec
        if name == "ray_started" and self.state is State.STARTING:
            head = ClusterNet(job_id=spec.job_id, subnet=parse_subnet(self.subnet), rank=0)
            self.address = RayAddress(host=str(head.sandbox_ip), gcs_port=spec.gcs_port,
                                      master_port=spec.master_port)
            if spec.head:
                self._to(State.WAITING)
            else:
                self._to(State.RUNNING)
                self._startup_ms = self._ms()
            self._event("ray_started", address=self.address, ms=self._ms())
        elif name == "nodes_ready" and self.state is State.WAITING:
            self._to(State.RUNNING)
            self._event("nodes_ready", ms=self._ms())
        elif name == "entrypoint_started" and spec.head and self._startup_ms < 0:
            self._startup_ms = self._ms()
            self._event("entrypoint_started", ms=self._startup_ms)
        elif name == "nodes" and spec.head:
            for rank in msg.get("dead") or []:
                if type(rank) is int and 0 <= rank < spec.world_size:
                    self._pending_lost.append((rank, "ray"))
                    self._lost_wakeup.set()
        elif name == "driver_exited" and spec.head:
            self._driver_exited = True
        elif name in ("error", "ray_stopped"):
            self._failure = str(msg.get("detail", ""))[:500]
        elif name == "ray_start_retry":
            self._event("ray_start_retry", tail=str(msg.get("tail", ""))[:300])

    def _outcome(self, result: SandboxResult | None) -> tuple[str, str]:
        if self._stop_event.is_set():
            return self._stop_reason, self._stop_detail
        if result is None:
            return "ray_error", "the sandbox did not run"
        if result.reason in ("time_limit", "memory_limit", "output_limit"):
            return result.reason, result.detail
        if result.reason == "sandbox_error":
            return "ray_error", result.detail
        if self.spec.head and self._driver_exited:
            return "exited", ""
        return "ray_error", self._failure or f"this member's Ray stopped (exit {result.exit_code})"

    def _result(self, reason: str, detail: str, result: SandboxResult | None) -> RayResult:
        empty = hashlib.sha256(b"").digest()
        exit_code = result.exit_code if result is not None and reason == "exited" else None
        if result is None:
            return RayResult(reason=reason, exit_code=None, wall_ms=self._ms(), startup_ms=self._startup_ms,
                             stdout_sha256=empty, stderr_sha256=empty, stdout_bytes=0, stderr_bytes=0,
                             logs_truncated=False, stderr_tail=b"", outputs=(),
                             output_digest=output_digest([], empty), members_lost=tuple(self._lost),
                             detail=detail)
        return RayResult(
            reason=reason, exit_code=exit_code, wall_ms=self._ms(), startup_ms=self._startup_ms,
            stdout_sha256=result.stdout_sha256, stderr_sha256=result.stderr_sha256,
            stdout_bytes=result.stdout_bytes, stderr_bytes=result.stderr_bytes,
            logs_truncated=result.logs_truncated, stderr_tail=result.stderr_tail, outputs=result.outputs,
            output_digest=result.output_digest, members_lost=tuple(self._lost), detail=detail,
            ended_at_ms=result.ended_at_ms)
