"""The ``ray`` runtime: the members of a confirmed cluster become one Ray cluster that runs the job.

Every member runs one :class:`RayMember`.  Rank 0 starts a Ray head, the
others join it at the rendezvous address; each node declares exactly the
resources its member advertised (``--num-cpus``, ``--num-gpus``, only its
assigned GPUs visible) plus a custom resource ``p2pgpu_member_<rank>: 1`` so a
job can pin work to a member.  When every member's node is alive, rank 0 runs
the manifest's command as the Ray *driver* (a process with ``RAY_ADDRESS``
set) and streams its stdout/stderr line by line to a callback, which is how
the output reaches the submitter over the p2p network: the submitter never
talks to Ray.

Each member's Ray is confined to the job: its own ports (``_ray_procs``,
never Ray's defaults, so two jobs or two members share a machine), its own
temp dir (``--temp-dir``: sockets, logs, spilled objects), a cleared
environment, its memory limit (a cgroup from ``_limits`` when the machine
has one, plus Ray's ``--memory``/``--object-store-memory``), the job's time
limit, and a per-job token (``RAY_AUTH_MODE=token``) when the cluster hands
one out.  ``ray start --block`` runs as a new session leader, so teardown
kills exactly that session (and the driver's), never another job's Ray: see
``_ray_procs``.  Teardown runs however the run ends: entrypoint exit, time
limit, cancellation of the calling scope, :meth:`RayMember.stop`, or a lost
member under the ``fail`` policy.

A member lost mid-job is noticed two ways: Ray declares its node dead (the
head's watcher, ``_ray_watch``), or the caller's heartbeat layer
(``core/_membership.py``) reports it through :meth:`RayMember.member_lost`.
Either way ``on_member_lost`` is awaited and the manifest's policy applies:
``fail`` stops the job on this member, ``continue`` carries on (Ray
reschedules what it can), except that nothing continues without the head.
The member's lifecycle is the table :data:`TRANSITIONS`.  See ``docs/ray.md``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from enum import Enum
from pathlib import Path
from typing import Any

import trio

from p2pgpu.core._proof import output_digest

from ._lines import LineForwarder, StreamState
from ._limits import MemoryLimit, SandboxUnavailable, memory_backend, open_memory_limit
from ._outputs import OutputFile, OutputLimitExceeded, collect_outputs
from ._ray_procs import NodePorts, choose_ports, kill_session, session_processes, signal_session
from ._ray_spec import (  # noqa: F401 - re-exported: the runtime's public names live here
    POLICIES,
    REASONS,
    RayAddress,
    RayMemberSpec,
    RayResult,
    check_env,
    object_store_bytes_min,
)
from ._ray_watch import MEMBER_RESOURCE
from ._sandbox import ClusterEnv

LineCallback = Callable[[str, bytes], Awaitable[None]]
EventCallback = Callable[[str, Mapping[str, Any]], None]
LostCallback = Callable[[int, str, str], Awaitable[None]]
_READY_MARK = b"Ray runtime started"


class State(str, Enum):
    STARTING = "starting"  # ray start running, not yet up
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


def ray_unavailable() -> str | None:
    """``None`` if this Python can run Ray, else why not (the node then does
    not advertise the ``ray`` runtime)."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        return "ray is not installed (pip install 'p2pgpu[ray]')"
    return None


class RayMember:
    """Run one member's part of a ``ray`` job: ``await RayMember(spec).run()``.

    ``on_line(stream, line)`` gets the entrypoint's lines (rank 0 only);
    ``on_event(name, info)`` is called at each step (``ray_started`` with the
    :class:`RayAddress` on the head, ``nodes_ready``, ``entrypoint_started``,
    ``member_lost``, ``stopping``); ``on_member_lost(rank, peer_id, source)``
    is awaited when a member is lost (``source`` is ``"ray"`` or ``"caller"``).
    """

    def __init__(self, spec: RayMemberSpec, *, on_line: LineCallback | None = None,
                 on_event: EventCallback | None = None, on_member_lost: LostCallback | None = None,
                 rng: random.Random | None = None) -> None:
        check_env(spec.env)
        self.spec = spec
        self._on_event, self._on_lost = on_event, on_member_lost
        self._rng = rng or random.Random(int.from_bytes(os.urandom(8), "big"))
        self.state = State.STARTING
        self.address: RayAddress | None = None
        self.ports: NodePorts | None = None
        self.temp_dir: Path | None = None
        self._rendezvous_port = spec.rendezvous_port
        self._rendezvous_set = trio.Event()
        if spec.head or spec.rendezvous_port:
            self._rendezvous_set.set()
        self._stop_reason = ""
        self._stop_detail = ""
        self._stop_event = trio.Event()
        self._lost: list[int] = []
        self._pending_lost: list[tuple[int, str]] = []
        self._lost_wakeup = trio.Event()
        self._ray_proc: trio.Process | None = None
        self._ray_pidfd: int | None = None
        self._ray_tail = bytearray()
        self._driver: trio.Process | None = None
        self._out, self._err = StreamState("stdout"), StreamState("stderr")
        self._lines = LineForwarder(on_line, spec.log_bytes_max, spec.log_line_bytes_max)
        self._exit_code: int | None = None
        self._t0 = 0.0
        self._startup_ms = -1

    # --- calls from the caller (the node) --------------------------------------------------

    def set_rendezvous(self, port: int) -> None:
        """Tell a joining member the head's GCS port (when it was not known at start)."""
        if not 0 < port < 65536:
            raise ValueError("port must be in 1..65535")
        self._rendezvous_port = port
        self._rendezvous_set.set()

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

    def processes(self) -> list[int]:
        """This member's Ray and driver processes alive now."""
        pids: set[int] = set()
        for proc in (self._ray_proc, self._driver):
            if proc is not None:
                pids.update(session_processes(proc.pid))
        return sorted(pids)

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
        """Start or join, run the entrypoint (rank 0), tear down, and say how it ended."""
        spec = self.spec
        self._t0 = trio.current_time()
        reason, detail = "exited", ""
        backend = "none" if spec.memory_backend == "none" else memory_backend(spec.memory_backend, spec.cgroup_base)
        limit: MemoryLimit | None = None
        self.temp_dir = Path(tempfile.mkdtemp(prefix=f"p2pray-{spec.job_id[:6]}-", dir=spec.temp_root))
        try:
            (self.temp_dir / "work").mkdir()
            if backend in ("cgroup2", "cgroup1"):
                limit = open_memory_limit(backend, spec.memory_bytes_max, gpus=len(spec.gpus), base=spec.cgroup_base)
            with trio.move_on_after(spec.time_limit_ms / 1000) as timer:
                reason, detail = await self._run_inside(limit)
            if timer.cancelled_caught:
                reason, detail = "time_limit", f"ran past {spec.time_limit_ms} ms"
        except BaseException:
            reason = "cancelled"
            raise
        finally:
            self._to(State.STOPPING)
            self._event("stopping", reason=reason, ms=self._ms())
            with trio.CancelScope(shield=True):
                left = await self._teardown(limit)
                result = self._result(reason, detail, left)
                self._to(State.DONE)
        return result

    async def _run_inside(self, limit: MemoryLimit | None) -> tuple[str, str]:
        async with trio.open_nursery() as nursery:
            outcome: list[tuple[str, str]] = []

            async def finish(reason: str, detail: str) -> None:
                if not outcome:
                    outcome.append((reason, detail))
                nursery.cancel_scope.cancel()

            async def wait_stop() -> None:
                await self._stop_event.wait()
                await finish(self._stop_reason, self._stop_detail)

            async def watch_losses() -> None:
                while True:
                    await self._lost_wakeup.wait()
                    self._lost_wakeup = trio.Event()
                    while self._pending_lost:
                        rank, source = self._pending_lost.pop(0)
                        if await self._handle_loss(rank, source):
                            await finish("member_lost", f"member {rank} lost ({source})")

            nursery.start_soon(wait_stop)
            nursery.start_soon(watch_losses)
            try:
                await self._start_node(nursery, limit)
            except (_RayFailed, OSError) as exc:
                await finish("ray_error", str(exc))
                return outcome[0]
            if self.spec.head:
                await finish(*await self._run_head(nursery, limit))
            else:
                self._to(State.RUNNING)
                self._startup_ms = self._ms()
                await self._wait_ray_exit()
                await finish("ray_error", "this member's Ray stopped (the head is gone?): "
                             + bytes(self._ray_tail[-300:]).decode(errors="replace"))
        return outcome[0] if outcome else ("cancelled", "")

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

    # --- starting Ray -------------------------------------------------------------------------

    def _base_env(self) -> dict[str, str]:
        """What Ray's processes and the driver get: ours, then the manifest's."""
        env = self._own_env()
        for name in sorted(self.spec.env):
            env[name] = self.spec.env[name]
        return env

    def _own_env(self) -> dict[str, str]:
        spec = self.spec
        assert self.temp_dir is not None
        env = {"PATH": os.pathsep.join([os.path.dirname(sys.executable), "/usr/local/bin", "/usr/bin", "/bin"]),
               "HOME": str(self.temp_dir), "TMPDIR": str(self.temp_dir), "LANG": "C.UTF-8",
               "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in spec.gpus),
               "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_gcs_rpc_server_reconnect_timeout_s": str(spec.head_lost_timeout_s),
               "RAY_health_check_period_ms": str(spec.health_check_period_ms),
               "RAY_health_check_failure_threshold": str(spec.health_check_failures_max),
               "P2PGPU_JOB_ID": spec.job_id}
        if spec.auth_token:
            env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": spec.auth_token})
        if os.environ.get("PYTHONPATH"):  # the operator's way of installing Ray, if any
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        return env

    def _start_argv(self, ports: NodePorts) -> list[str]:
        spec = self.spec
        assert self.temp_dir is not None
        object_store = max(object_store_bytes_min, spec.memory_bytes_max // 4)
        a = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", f"--node-ip-address={spec.host}",
             f"--temp-dir={self.temp_dir}", f"--num-cpus={spec.num_cpus}", f"--num-gpus={len(spec.gpus)}",
             "--resources=" + json.dumps({f"{MEMBER_RESOURCE}{spec.rank}": 1}),
             f"--memory={spec.memory_bytes_max - object_store}", f"--object-store-memory={object_store}",
             "--disable-usage-stats", "--log-style=record", "--log-color=false", *ports.start_args(spec.head)]
        if spec.head:
            a += ["--head", "--include-dashboard=false", "--no-monitor"]
        else:
            a.append(f"--address={spec.rendezvous_host}:{self._rendezvous_port}")
        return a

    async def _start_node(self, nursery: trio.Nursery, limit: MemoryLimit | None) -> None:
        """``ray start --block`` until it says it is up; a failed start (a port
        taken meanwhile, the head not up yet) is retried with fresh ports."""
        spec = self.spec
        await self._rendezvous_set.wait()
        deadline = trio.current_time() + spec.start_timeout_ms / 1000
        if not spec.head:
            await self._wait_gcs(deadline)
        attempt, last_tail = 0, ""
        while True:
            attempt += 1
            gcs = self._rendezvous_port if spec.head else 0
            self.ports = choose_ports(head=spec.head, gcs_port=gcs, rng=self._rng,
                                      worker_ports=max(16, 4 * spec.num_cpus))
            argv = self._start_argv(self.ports)
            if limit is not None:
                argv = limit.wrap(argv)
            self._ray_tail = bytearray()
            proc = await trio.lowlevel.open_process(argv, env=self._base_env(), stdin=subprocess.DEVNULL,
                                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                    start_new_session=True)
            self._ray_proc, self._ray_pidfd = proc, _pidfd(proc.pid)
            ready = trio.Event()
            nursery.start_soon(self._drain_ray, proc, ready)
            with trio.move_on_at(deadline):
                await _first(self._wait_ray_exit, ready.wait)
            if ready.is_set():
                break
            tail = bytes(self._ray_tail[-600:]).decode(errors="replace").strip() or last_tail
            last_tail = tail
            await self._stop_ray(proc)
            self._event("ray_start_retry", attempt=attempt, tail=tail[-300:])
            if trio.current_time() >= deadline:
                raise _RayFailed(f"ray did not start in {spec.start_timeout_ms} ms ({attempt} tries): {tail}")
            await trio.sleep(min(0.2 * attempt, 2.0))
        host = spec.rendezvous_host or spec.host
        gcs_port = self.ports.gcs if spec.head else self._rendezvous_port
        self.address = RayAddress(host=host, gcs_port=gcs_port, master_port=self.ports.master)
        if spec.head:
            self._to(State.WAITING)
        self._event("ray_started", address=self.address, ms=self._ms(), attempts=attempt)

    async def _wait_gcs(self, deadline: float) -> None:
        """Until the head's GCS accepts connections.  A joining ``ray start``
        that finds no GCS retries in ~40 s cycles, so joining before the head
        is up would add up to 40 s; a TCP probe every 200 ms adds none."""
        host, port = self.spec.rendezvous_host, self._rendezvous_port
        while trio.current_time() < deadline:
            with trio.move_on_after(2):
                try:
                    stream = await trio.open_tcp_stream(host, port)
                except OSError:
                    pass  # not up yet
                else:
                    await stream.aclose()
                    return
            await trio.sleep(0.2)
        raise _RayFailed(f"the head's GCS at {host}:{port} did not come up in {self.spec.start_timeout_ms} ms")

    async def _drain_ray(self, proc: trio.Process, ready: trio.Event) -> None:
        assert proc.stdout is not None
        buf = b""
        try:
            while chunk := await proc.stdout.receive_some(65536):
                self._ray_tail = (self._ray_tail + chunk)[-8192:]
                if not ready.is_set():
                    buf = (buf + chunk)[-4096:]
                    if _READY_MARK in buf:
                        ready.set()
        except trio.ClosedResourceError:
            return  # a failed start was stopped and its pipe closed: nothing more to read

    async def _wait_ray_exit(self) -> None:
        """Until the current ``ray start`` exits.  Waits on a pidfd without
        reaping, so its pid (the session id teardown kills by) stays ours."""
        assert self._ray_proc is not None
        if self._ray_pidfd is not None:
            await trio.lowlevel.wait_readable(self._ray_pidfd)
            return
        while True:  # no pidfd (a kernel before 5.3, gVisor): poll, still without reaping
            info = os.waitid(os.P_PID, self._ray_proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)  # noqa: ASYNC222
            if info is not None:
                return
            await trio.sleep(0.1)

    # --- rank 0: wait for the members, run the entrypoint -----------------------------------------

    async def _run_head(self, nursery: trio.Nursery, limit: MemoryLimit | None) -> tuple[str, str]:
        spec = self.spec
        assert self.address is not None and self.temp_dir is not None
        ready = trio.Event()
        nursery.start_soon(self._watch_nodes, ready)
        await _first(self._wait_ray_exit, ready.wait)
        if not ready.is_set():
            return "ray_error", "the head's Ray stopped before every member joined"
        self._to(State.RUNNING)
        self._event("nodes_ready", ms=self._ms())
        cluster = ClusterEnv(rank=0, world_size=spec.world_size, members=spec.members,
                             rendezvous_host=self.address.host, rendezvous_port=self.address.master_port)
        env = self._base_env() | cluster.env() | {"RAY_ADDRESS": str(self.address),
                                                   "P2PGPU_WORK": str(self.temp_dir / "work")}
        argv = list(spec.command)
        if limit is not None:
            argv = limit.wrap(argv)
        try:
            self._driver = await trio.lowlevel.open_process(
                argv, env=env, cwd=str(self.temp_dir / "work"), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            return "ray_error", f"cannot run the entrypoint: {exc}"
        self._startup_ms = self._ms()
        self._event("entrypoint_started", ms=self._startup_ms, pid=self._driver.pid)
        driver = self._driver
        assert driver.stdout is not None and driver.stderr is not None
        async with trio.open_nursery() as pumps:
            pumps.start_soon(self._lines.pump, driver.stdout, self._out)
            pumps.start_soon(self._lines.pump, driver.stderr, self._err)
            await driver.wait()
            # The driver's children may hold the pipes: bound the wait for EOF.
            pumps.cancel_scope.deadline = trio.current_time() + 5
        rc = driver.returncode
        self._exit_code = 128 - rc if rc is not None and rc < 0 else rc
        return "exited", ""

    async def _watch_nodes(self, ready: trio.Event) -> None:
        """Run ``_ray_watch`` against the head; set ``ready`` once all ranks are
        alive, queue a loss for each rank Ray declares dead."""
        spec = self.spec
        assert self.address is not None
        env = self._own_env()  # our process: none of the manifest's variables
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        argv = [sys.executable, "-m", "p2pgpu.runtime._ray_watch", str(self.address),
                "--interval-ms", str(max(100, spec.health_check_period_ms // 2))]
        everyone = list(range(spec.world_size))
        watcher = await trio.lowlevel.open_process(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                   stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            assert watcher.stdout is not None
            buf = b""
            while chunk := await watcher.stdout.receive_some(65536):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        continue
                    if not isinstance(msg, dict) or "alive" not in msg:
                        continue
                    if msg["alive"] == everyone:
                        ready.set()
                    for rank in msg.get("dead", []):
                        if isinstance(rank, int) and 0 <= rank < spec.world_size:
                            self._pending_lost.append((rank, "ray"))
                            self._lost_wakeup.set()
        finally:
            with trio.CancelScope(shield=True):
                kill_session(watcher.pid)
                await _reap(watcher)

    # --- teardown ---------------------------------------------------------------------------

    async def _stop_ray(self, proc: trio.Process) -> None:
        """Stop one ``ray start`` and everything in its session: SIGTERM, a
        grace period, then SIGKILL until nothing is left; then reap it."""
        signal_session(proc.pid, signal.SIGTERM)
        with trio.move_on_after(self.spec.stop_grace_ms / 1000):
            while session_processes(proc.pid):
                await trio.sleep(0.05)
        for _ in range(100):
            if not session_processes(proc.pid):
                break
            kill_session(proc.pid)
            await trio.sleep(0.05)
        await _reap(proc)
        if self._ray_pidfd is not None and proc is self._ray_proc:
            os.close(self._ray_pidfd)
            self._ray_pidfd = None

    async def _teardown(self, limit: MemoryLimit | None) -> tuple[int, ...]:
        if self._driver is not None:
            for _ in range(100):
                if not session_processes(self._driver.pid):
                    break
                kill_session(self._driver.pid)
                await trio.sleep(0.02)
            await _reap(self._driver)
        if self._ray_proc is not None:
            await self._stop_ray(self._ray_proc)
        left = tuple(self.processes())
        if limit is not None:
            try:
                await limit.aclose()
            except SandboxUnavailable as exc:
                self._stop_detail = str(exc)
        return left

    def _result(self, reason: str, detail: str, left: tuple[int, ...]) -> RayResult:
        spec = self.spec
        assert self.temp_dir is not None
        outputs: tuple[OutputFile, ...] = ()
        try:
            if spec.head:
                outputs = tuple(collect_outputs(self.temp_dir / "work", spec.output_files_max,
                                                spec.output_file_bytes_max, spec.output_bytes_max))
        except OutputLimitExceeded as exc:
            detail = detail or str(exc)
        finally:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        stdout_sha = self._out.hash.digest()
        return RayResult(
            reason=reason, exit_code=self._exit_code, wall_ms=self._ms(), startup_ms=self._startup_ms,
            stdout_sha256=stdout_sha, stderr_sha256=self._err.hash.digest(), stdout_bytes=self._out.bytes,
            stderr_bytes=self._err.bytes, logs_truncated=self._lines.truncated, stderr_tail=bytes(self._err.tail),
            outputs=outputs, output_digest=output_digest([(f.path, f.size, f.sha256) for f in outputs], stdout_sha),
            members_lost=tuple(self._lost), processes_left=left, detail=detail)


class _RayFailed(Exception):
    pass


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


async def _first(*waits: Callable[[], Awaitable[Any]]) -> None:
    """Return as soon as one of ``waits`` returns (the others are cancelled)."""
    async with trio.open_nursery() as nursery:
        async def one(wait: Callable[[], Awaitable[Any]]) -> None:
            await wait()
            nursery.cancel_scope.cancel()

        for wait in waits:
            nursery.start_soon(one, wait)


async def _reap(proc: trio.Process) -> None:
    """Wait for a process already killed, and close our ends of its pipes."""
    await proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            await stream.aclose()
