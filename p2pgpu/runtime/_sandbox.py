"""Run one job's command under bubblewrap, with limits, streamed logs and hashed outputs.

The job sees a read-only system (``/usr`` and its merged-usr links, a few
``/etc`` files), a fresh ``/proc`` and ``/dev``, a private ``/tmp`` (tmpfs), its
own work directory at ``/work`` (also ``$HOME``), its inputs read-only at
``/work/in``, and only the GPU device nodes assigned to it.  It runs as uid
65534 in new user, pid, mount, ipc, uts, cgroup and (unless allowed) network
namespaces, with a cleared environment.  Nothing of the node is mounted: not
its home, not its key, not the host's ``/tmp``.

:func:`run_job` is the one entry point: it refuses a job the operator's
:class:`SandboxPolicy` does not allow (:class:`JobRejected`), runs it, kills the
whole sandbox at the time or memory limit, streams stdout/stderr line by line
to an async callback, and returns a :class:`SandboxResult` with the reason it
ended, the exit status, and the output files with their hashes and the output
digest that the work proof signs.  Cancelling the calling trio scope kills the
sandbox before the cancellation propagates.  The bubblewrap command line is
built by a pure function (:func:`bwrap_argv`) so tests can inspect it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import trio

from p2pgpu.core._proof import output_digest

from ._lines import LineForwarder, StreamState
from ._limits import (
    MemoryLimit,
    SandboxUnavailable,
    open_memory_limit,
    resolve_memory,
    rss_bytes,
    sweep_stale_cgroups,
)
from ._outputs import OutputFile, OutputLimitExceeded, collect_outputs, usage

#: Why a sandboxed run ended.
REASONS = ("exited", "time_limit", "memory_limit", "output_limit", "sandbox_error")
#: A job whose node died is still killed this long after its time limit.
orphan_grace_s = 10.0
SANDBOX_UID = 65534
WORK = "/work"
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
env_vars_max = 128
env_value_bytes_max = 32 * 1024
argv_max = 256
gpus_max = 16
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
#: Names the sandbox sets itself; a manifest may not override them.
RESERVED_ENV = ("HOME", "TMPDIR", "CUDA_VISIBLE_DEVICES", "MASTER_ADDR", "MASTER_PORT", "RANK",
                "WORLD_SIZE", "LOCAL_RANK")
_SYSTEM_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
#: The /etc the job needs to run programs; no passwd/group/shadow of the host.
ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/alternatives",
             "/etc/localtime", "/etc/nsswitch.conf", "/etc/mime.types")
#: Added only when the job has the network.
NET_ETC_FILES = ("/etc/resolv.conf", "/etc/hosts", "/etc/gai.conf", "/etc/ssl", "/etc/ca-certificates")
LineCallback = Callable[[str, bytes], Awaitable[None]]


class JobRejected(Exception):
    """This node will not run this job as asked (network not allowed, a GPU
    it does not have, a reserved environment name).  Not a sandbox failure."""


@dataclass(frozen=True, kw_only=True)
class ClusterEnv:
    """Where a member of a multi-node job stands in its cluster."""

    rank: int
    world_size: int
    members: tuple[str, ...]
    rendezvous_host: str
    rendezvous_port: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size or len(self.members) != self.world_size:
            raise ValueError("rank must be below world_size, and members must list world_size peers")
        if not 0 < self.rendezvous_port < 65536 or not self.rendezvous_host:
            raise ValueError("rendezvous needs a host and a port in 1..65535")

    def env(self) -> dict[str, str]:
        return {
            "P2PGPU_RANK": str(self.rank),
            "P2PGPU_WORLD_SIZE": str(self.world_size),
            "P2PGPU_MEMBERS": ",".join(self.members),
            "P2PGPU_RENDEZVOUS": f"{self.rendezvous_host}:{self.rendezvous_port}",
            "MASTER_ADDR": self.rendezvous_host,
            "MASTER_PORT": str(self.rendezvous_port),
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": "0",
        }


@dataclass(frozen=True, kw_only=True)
class SandboxPolicy:
    """The operator's side: what this node allows and where things are.

    ``dev_dir`` is where GPU device nodes are looked up (``/dev``; tests point
    it at a directory of stand-in files).  ``memory_backend`` is ``auto`` or
    one of ``cgroup2``, ``cgroup1``, ``rlimit`` (see ``_limits``).
    ``extra_ro_paths`` are more host directories every job sees read-only at
    the same place (a Python or CUDA environment under ``/opt``, say); never
    put the node's home, keys or data there.
    """

    allow_network: bool = False
    bwrap: str = "bwrap"
    dev_dir: Path = Path("/dev")
    memory_backend: str = "auto"
    cgroup_base: Path | None = None
    poll_interval_ms: int = 100
    tmp_bytes_max: int = 1 << 30
    extra_ro_paths: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """One run: the command, its environment, where it works, its limits."""

    argv: tuple[str, ...]
    work_dir: Path
    time_limit_ms: int
    memory_bytes_max: int
    env: Mapping[str, str] = field(default_factory=dict)
    inputs_dir: Path | None = None
    network: bool = False
    gpus: tuple[int, ...] = ()
    cluster: ClusterEnv | None = None
    job_id: str = ""
    output_files_max: int = 1000
    output_file_bytes_max: int = 1 << 30
    output_bytes_max: int = 4 << 30
    log_bytes_max: int = 64 << 20
    log_line_bytes_max: int = 16 * 1024
    #: Processes and threads the job may have at once (where a pids cgroup exists).
    pids_max: int = 4096
    #: An OCI image's unpacked root: the job runs in it instead of the host's
    #: /usr (runtime/_oci_root.py), with the image's ``Env`` under its own.
    root_dir: Path | None = None
    image_env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 < len(self.argv) <= argv_max or any("\0" in a for a in self.argv):
            raise ValueError(f"argv must have 1 to {argv_max} arguments without NUL")
        if self.time_limit_ms <= 0 or self.memory_bytes_max <= 0:
            raise ValueError("time and memory limits must be positive")
        if len(self.gpus) > gpus_max or len(set(self.gpus)) != len(self.gpus) or any(g < 0 for g in self.gpus):
            raise ValueError("gpus must be distinct non-negative indices")


@dataclass(frozen=True, kw_only=True)
class SandboxResult:
    reason: str
    #: The command's exit status as bubblewrap reports it (128+N for signal N);
    #: 137 when we killed it; None only for ``sandbox_error`` before it ran.
    exit_code: int | None
    wall_ms: int
    stdout_sha256: bytes
    stderr_sha256: bytes
    stdout_bytes: int
    stderr_bytes: int
    logs_truncated: bool
    stderr_tail: bytes
    outputs: tuple[OutputFile, ...]
    output_digest: bytes
    memory_backend: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.reason == "exited" and self.exit_code == 0


def job_env(spec: JobSpec) -> dict[str, str]:
    """The job's whole environment: the manifest's variables, PATH, HOME and
    ours.  Nothing of the node's environment is passed."""
    if len(spec.env) > env_vars_max:
        raise JobRejected(f"more than {env_vars_max} environment variables")
    env = {"PATH": DEFAULT_PATH}
    for name in sorted(spec.image_env):  # an image's own Env first: the manifest's and ours win
        value = spec.image_env[name]
        if _ENV_NAME.match(name) and "\0" not in value and len(value.encode()) <= env_value_bytes_max \
                and name not in RESERVED_ENV and not name.startswith("P2PGPU_") and len(env) < env_vars_max:
            env[name] = value
    for name in sorted(spec.env):
        value = spec.env[name]
        if not _ENV_NAME.match(name) or "\0" in value or len(value.encode()) > env_value_bytes_max:
            raise JobRejected(f"environment variable {name!r} is not allowed")
        if name in RESERVED_ENV or name.startswith("P2PGPU_"):
            raise JobRejected(f"environment variable {name} is set by the sandbox")
        env[name] = value
    env.update({"HOME": WORK, "TMPDIR": "/tmp", "P2PGPU_WORK": WORK, "P2PGPU_IN": WORK + "/in",
                "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(len(spec.gpus))),
                "P2PGPU_GPUS": ",".join(str(g) for g in spec.gpus)})
    if spec.job_id:
        env["P2PGPU_JOB_ID"] = spec.job_id
    if spec.cluster is not None:
        env.update(spec.cluster.env())
    return env


def gpu_device_paths(gpus: tuple[int, ...], dev_dir: Path) -> list[Path]:
    """The device nodes a job with ``gpus`` gets: its ``nvidia<N>`` and the
    shared control nodes that exist.  No GPUs, no NVIDIA nodes at all."""
    if not gpus:
        return []
    paths = []
    for g in gpus:
        p = dev_dir / f"nvidia{g}"
        if not p.exists():
            raise JobRejected(f"GPU {g} is assigned but {p} does not exist")
        paths.append(p)
    for name in ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"):
        if (dev_dir / name).exists():
            paths.append(dev_dir / name)
    return paths


def bwrap_argv(spec: JobSpec, policy: SandboxPolicy, *, etc_dir: Path, status_fd: int | None = None) -> list[str]:
    """The bubblewrap command line for ``spec`` (pure but for existence checks)."""
    if spec.network and not policy.allow_network:
        raise JobRejected("the job asks for the network and this node does not allow it")
    if spec.root_dir is not None:
        from ._oci_root import oci_bwrap_argv  # noqa: PLC0415

        return oci_bwrap_argv(spec, policy, status_fd=status_fd)
    # Absolute: the job's cleared environment has no PATH to find it with.
    a = [shutil.which(policy.bwrap) or policy.bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
         "--new-session", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "p2pgpu-job",
         "--cap-drop", "ALL", "--ro-bind", "/usr", "/usr"]
    if spec.network:
        a.append("--share-net")
    for d in _SYSTEM_DIRS:
        if os.path.islink(d):
            a += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            a += ["--ro-bind", d, d]
    for f in ETC_FILES + (NET_ETC_FILES if spec.network else ()):
        a += ["--ro-bind-try", f, f]
    for extra in policy.extra_ro_paths:
        if not os.path.isabs(extra):
            raise JobRejected(f"extra read-only path {extra!r} must be absolute")
        a += ["--ro-bind", extra, extra]
    for name in ("passwd", "group", "hostname"):
        a += ["--ro-bind", str(etc_dir / name), f"/etc/{name}"]
    a += ["--proc", "/proc", "--dev", "/dev"]
    for p in gpu_device_paths(spec.gpus, policy.dev_dir):
        a += ["--dev-bind", str(p), f"/dev/{p.name}"]
    a += ["--size", str(policy.tmp_bytes_max), "--tmpfs", "/tmp", "--bind", str(spec.work_dir), WORK]
    if spec.inputs_dir is not None:
        a += ["--ro-bind", str(spec.inputs_dir), WORK + "/in"]
    a += ["--chdir", WORK]
    if status_fd is not None:
        a += ["--json-status-fd", str(status_fd)]
    return a + ["--", *spec.argv]


def _write_etc(etc_dir: Path) -> None:
    etc_dir.mkdir()
    (etc_dir / "passwd").write_text(f"job:x:{SANDBOX_UID}:{SANDBOX_UID}:p2pgpu job:{WORK}:/bin/sh\n")
    (etc_dir / "group").write_text(f"job:x:{SANDBOX_UID}:\n")
    (etc_dir / "hostname").write_text("p2pgpu-job\n")


@lru_cache(maxsize=8)
def _resolved_backend(preference: str, base: Path | None) -> tuple[str, Path | None]:
    return resolve_memory(preference, base)


def check_sandbox(policy: SandboxPolicy | None = None) -> str | None:
    """``None`` if jobs can run sandboxed here, else the reason they cannot
    (the node then refuses every job).  Runs a real, tiny sandbox, and
    removes empty job cgroups a killed node left behind; call it at start."""
    policy = policy or SandboxPolicy()
    if shutil.which(policy.bwrap) is None:
        return f"bubblewrap ({policy.bwrap}) is not installed"
    try:
        _resolved_backend(policy.memory_backend, policy.cgroup_base)
        sweep_stale_cgroups()
    except SandboxUnavailable as exc:
        return str(exc)
    with tempfile.TemporaryDirectory(prefix="p2pgpu-check-") as tmp:
        work, etc_dir = Path(tmp) / "work", Path(tmp) / "etc"
        work.mkdir()
        _write_etc(etc_dir)
        spec = JobSpec(argv=("/bin/sh", "-c", "echo ok > probe"), work_dir=work, time_limit_ms=10_000,
                       memory_bytes_max=256 << 20)
        argv = bwrap_argv(spec, policy, etc_dir=etc_dir)
        try:
            proc = subprocess.run(argv, env={}, capture_output=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"bubblewrap failed to start: {exc}"
        if proc.returncode != 0 or not (work / "probe").exists():
            err = proc.stderr.decode(errors="replace").strip()[-300:]
            return f"bubblewrap cannot make a sandbox here (exit {proc.returncode}): {err}"
    return None


def sandbox_memory_backend(policy: SandboxPolicy | None = None) -> str:
    """The memory backend jobs get under ``policy`` on this machine."""
    policy = policy or SandboxPolicy()
    return _resolved_backend(policy.memory_backend, policy.cgroup_base)[0]


@dataclass
class _Run:
    spec: JobSpec
    lines: LineForwarder
    reason: str = "exited"
    detail: str = ""
    status: list[dict[str, int]] = field(default_factory=list)

    async def read_status(self, source: trio.abc.ReceiveStream) -> None:
        data = b""
        while (chunk := await source.receive_some(4096)) and len(data) < 65536:
            data += chunk
        for line in data.decode(errors="replace").splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                self.status.append({k: v for k, v in obj.items() if isinstance(v, int)})

    def exit_code(self) -> int | None:
        for rec in self.status:
            if "exit-code" in rec:
                return rec["exit-code"]
        return None


def _kill(proc: trio.Process, limit: MemoryLimit) -> None:
    """SIGKILL bubblewrap's process group; --die-with-parent and the pid
    namespace take every process of the job with it; the cgroup sweeps up."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # already gone
    limit.kill_all()


async def _watch(run: _Run, proc: trio.Process, limit: MemoryLimit, policy: SandboxPolicy) -> None:
    spec = run.spec
    while True:
        await trio.sleep(policy.poll_interval_ms / 1000)
        if limit.watchdog and rss_bytes(proc.pid) > limit.limit_bytes:
            run.reason, run.detail = "memory_limit", f"resident memory above {limit.limit_bytes} bytes"
            _kill(proc, limit)
            return
        files, size = usage(spec.work_dir, spec.output_files_max + 1)
        if files > spec.output_files_max or size > spec.output_bytes_max:
            run.reason, run.detail = "output_limit", f"work dir holds {files} files, {size} bytes"
            _kill(proc, limit)
            return


async def run_job(spec: JobSpec, policy: SandboxPolicy | None = None, *,
                  on_line: LineCallback | None = None) -> SandboxResult:
    """Run ``spec`` sandboxed and return how it ended.

    ``on_line(stream, line)`` is awaited for each line of ``"stdout"`` and
    ``"stderr"`` (without the newline; lines longer than
    ``log_line_bytes_max`` come in pieces), until ``log_bytes_max`` bytes were
    forwarded.  A slow callback slows the job (the pipe fills): hand lines to
    a bounded channel if that matters.  Raises :class:`JobRejected` if the
    policy forbids the job, :class:`SandboxUnavailable` if no sandbox can run.
    """
    policy = policy or SandboxPolicy()
    if shutil.which(policy.bwrap) is None:
        raise SandboxUnavailable(f"bubblewrap ({policy.bwrap}) is not installed")
    if not spec.work_dir.is_dir():
        raise JobRejected(f"work dir {spec.work_dir} does not exist")
    backend, cgroup_base = _resolved_backend(policy.memory_backend, policy.cgroup_base)
    env = job_env(spec)
    scratch = Path(tempfile.mkdtemp(prefix="p2pgpu-sbx-"))
    try:
        _write_etc(scratch / "etc")
        bwrap_argv(spec, policy, etc_dir=scratch / "etc")  # refuses before anything starts
        limit = open_memory_limit(backend, spec.memory_bytes_max, gpus=len(spec.gpus), base=cgroup_base,
                                  pids_max=spec.pids_max)
        try:
            r_fd, w_fd = os.pipe()
            status_stream = trio.lowlevel.FdStream(r_fd)  # owns r_fd
            try:
                # trio starts processes from a worker thread that exits after
                # 10 s idle, and --die-with-parent follows the forking *thread*:
                # bwrap was SIGKILLed 10 s into every job.  `timeout` becomes
                # bwrap's parent instead: it lives as long as the job, and it
                # still ends an orphaned job at its limit if the node dies.
                hard_limit_s = spec.time_limit_ms / 1000 + orphan_grace_s
                argv = limit.wrap([shutil.which("timeout") or "timeout", "-s", "KILL", f"{hard_limit_s:.3f}",
                                   *bwrap_argv(spec, policy, etc_dir=scratch / "etc", status_fd=w_fd)])
                try:
                    proc = await trio.lowlevel.open_process(
                        argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, start_new_session=True, pass_fds=(w_fd,))
                finally:
                    os.close(w_fd)  # only bubblewrap holds the writing end now
                return await _supervise(spec, policy, limit, proc, status_stream, on_line)
            finally:
                await status_stream.aclose()
        finally:
            await limit.aclose()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


async def _supervise(spec: JobSpec, policy: SandboxPolicy, limit: MemoryLimit, proc: trio.Process,
                     status_stream: trio.lowlevel.FdStream, on_line: LineCallback | None) -> SandboxResult:
    run = _Run(spec=spec, lines=LineForwarder(on_line, spec.log_bytes_max, spec.log_line_bytes_max))
    out, err = StreamState("stdout"), StreamState("stderr")
    t0 = trio.current_time()
    try:
        assert proc.stdout is not None and proc.stderr is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run.lines.pump, proc.stdout, out)
            nursery.start_soon(run.lines.pump, proc.stderr, err)
            nursery.start_soon(run.read_status, status_stream)
            async with trio.open_nursery() as watchers:
                watchers.start_soon(_watch, run, proc, limit, policy)
                with trio.move_on_after(spec.time_limit_ms / 1000) as timer:
                    await proc.wait()
                if timer.cancelled_caught:
                    run.reason, run.detail = "time_limit", f"ran past {spec.time_limit_ms} ms"
                    _kill(proc, limit)
                    await proc.wait()
                watchers.cancel_scope.cancel()
            # Everything in the sandbox is dead now, so the pipes reach EOF;
            # the bound only guards against a stray holder of a pipe.
            nursery.cancel_scope.deadline = trio.current_time() + 5
    finally:
        if proc.returncode is None:
            _kill(proc, limit)
            with trio.CancelScope(shield=True):
                await proc.wait()
    wall_ms = int((trio.current_time() - t0) * 1000)
    exit_code = run.exit_code()
    if exit_code is None and run.reason == "exited":
        run.reason = "sandbox_error"
        run.detail = bytes(err.tail).decode(errors="replace").strip()[-500:]
    if exit_code is None and proc.returncode is not None and run.reason != "sandbox_error":
        exit_code = 128 - proc.returncode if proc.returncode < 0 else proc.returncode
    if run.reason in ("exited", "sandbox_error") and limit.oom_killed():
        run.reason, run.detail = "memory_limit", f"killed by the kernel above {limit.limit_bytes} bytes"
    elif run.reason == "exited" and limit.looks_out_of_memory(bytes(err.tail), exit_code, None):
        run.reason, run.detail = "memory_limit", "allocation failed at the address-space limit"
    outputs: tuple[OutputFile, ...] = ()
    try:
        outputs = tuple(await trio.to_thread.run_sync(
            collect_outputs, spec.work_dir, spec.output_files_max, spec.output_file_bytes_max,
            spec.output_bytes_max))
    except OutputLimitExceeded as exc:
        if run.reason == "exited":
            run.reason, run.detail = "output_limit", str(exc)
    stdout_sha = out.hash.digest()
    return SandboxResult(
        reason=run.reason, exit_code=exit_code, wall_ms=wall_ms, stdout_sha256=stdout_sha,
        stderr_sha256=err.hash.digest(), stdout_bytes=out.bytes, stderr_bytes=err.bytes,
        logs_truncated=run.lines.truncated, stderr_tail=bytes(err.tail), outputs=outputs,
        output_digest=output_digest([(f.path, f.size, f.sha256) for f in outputs], stdout_sha),
        memory_backend=limit.backend, detail=run.detail,
    )
