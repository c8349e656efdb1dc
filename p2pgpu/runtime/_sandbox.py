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

import dataclasses
import functools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import trio

from p2pgpu.core._proof import output_digest

from ._disk import (
    ETC_DIR,
    WORK_DIR,
    DiskUnavailable,
    JobDisk,
    inputs_of,
    make_job_disk,
    probe_disk_backend,
    remove_job_disk,
    scratch_root_default,
)
from ._leftovers import process_start_ticks, write_record
from ._limits import (
    MemoryLimit,
    SandboxUnavailable,
    open_memory_limit,
    resolve_memory,
    rss_bytes,
    sweep_stale_cgroups,
)
from ._lines import LineForwarder, StreamState
from ._netns import ClusterNet, MemberNet, NetUnavailable, close_member_net, open_member_net
from ._outputs import OutputFile, OutputLimitExceeded, link_tree, seal_outputs
from ._walk import walk

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
#: Kernel settings under the job's fresh ``/proc``, made read-only over it.
#: The job's uid is the node's own outside its user namespace, so when the
#: node runs as root every root-owned, owner-writable sysctl file (765 of them
#: here) was writable by job code: the host's kernel settings, not a copy.
#: bubblewrap covers ``/proc/sys`` only when the directory itself is
#: writable (it is 0555), so it did not.  ``/proc/pressure`` takes PSI
#: triggers.  (bubblewrap covers ``/proc/irq`` and ``/proc/bus`` itself, and
#: ``/proc/sysrq-trigger`` when it is writable: covered here whatever it is.)
PROC_READ_ONLY = ("/proc/sys", "/proc/pressure", "/proc/sysrq-trigger")


def proc_args() -> list[str]:
    """bubblewrap options for the job's ``/proc``: its own pid namespace's,
    with the kernel's settings read-only (``PROC_READ_ONLY``)."""
    a = ["--proc", "/proc"]
    for p in PROC_READ_ONLY:
        a += ["--ro-bind-try", p, p]
    return a


#: Where the sandbox puts its own things: no extra bind may cover them.
_RESERVED_DESTS = ("/", WORK, "/tmp", "/dev", "/proc", "/etc")
#: The /etc the job needs to run programs; no passwd/group/shadow of the host.
ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/alternatives",
             "/etc/localtime", "/etc/nsswitch.conf", "/etc/mime.types")
#: Added only when the job has the network.
NET_ETC_FILES = ("/etc/resolv.conf", "/etc/hosts", "/etc/gai.conf", "/etc/ssl", "/etc/ca-certificates")
LineCallback = Callable[[str, bytes], Awaitable[None]]
T = TypeVar("T")
log = logging.getLogger("p2pgpu.sandbox")
#: The whole environment of the processes the node starts outside the
#: sandbox (keeper, cgroup wrapper, bubblewrap): nothing of the job's, and
#: nothing of the node's (they start in ``/``: the job can read bubblewrap's
#: environment as its ``/proc/1/environ``).
_HOST_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}
#: The ``dir`` disk backend walks the job's names at most this often.
dir_walk_interval_s = 1.0
#: Inputs staged for a job (hard links; copied only across file systems).  The
#: content store bounds what a manifest may name; this is the last guard.
inputs_files_max = 100_000
inputs_bytes_max = 1 << 40


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
    shm_bytes_max: int = 64 << 20
    extra_ro_paths: tuple[str, ...] = ()
    #: ``auto`` or one of ``loop``, ``tmpfs``, ``dir`` (see ``_disk``).
    disk_backend: str = "auto"
    #: Where job disks go (default ``/var/tmp/p2pgpu-<uid>``); never the node's home.
    scratch_root: Path | None = None


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
    #: Files, directories and links the job's disk may hold (its inodes).
    output_entries_max: int = 1_000_000
    #: Where the running sandbox is recorded for a restarted node (``_leftovers``).
    state_path: Path | None = None
    #: A cluster member's own network (``_netns``): the sandbox joins a namespace
    #: that reaches only the job's other members.  Independent of ``network``.
    cluster_net: ClusterNet | None = None
    #: More read-only binds, (host path, path in the sandbox): the Ray runtime's
    #: Python environment.  Never the node's home; never over /work, /tmp, /dev, /proc.
    ro_binds: tuple[tuple[str, str], ...] = ()
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
        if min(self.output_files_max, self.output_bytes_max, self.output_entries_max) < 0:
            raise ValueError("output limits must not be negative")
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
    #: The wall clock (``run_job``'s ``now_ms``) when the sandbox died; 0 without a clock.
    ended_at_ms: int = 0
    #: ... and when its process started, the moment the time limit began to
    #: count (after the job's disk, inputs and cgroups were ready); 0 without
    #: a clock.  What a member claims to have served runs from here.
    started_at_ms: int = 0
    disk_backend: str = ""

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


def bwrap_argv(spec: JobSpec, policy: SandboxPolicy, *, disk_top: Path, status_fd: int | None = None,
               env_fd: int | None = None) -> list[str]:
    """The bubblewrap command line for ``spec`` (pure but for existence checks).

    ``disk_top`` is the job's disk (``_disk``: ``work``, ``in``, ``etc``).
    The job's environment is set by bubblewrap itself (``--clearenv`` and
    ``--setenv``), read from ``env_fd`` (``--args``) when given, so no
    process outside the sandbox ever runs with a variable the manifest chose
    (``LD_PRELOAD`` in the keeper would run the submitter's code as the node)."""
    if spec.network and not policy.allow_network:
        raise JobRejected("the job asks for the network and this node does not allow it")
    if spec.root_dir is not None:
        from ._oci_root import oci_bwrap_argv  # noqa: PLC0415

        return oci_bwrap_argv(spec, policy, disk_top=disk_top, status_fd=status_fd, env_fd=env_fd)
    # Absolute: the host-side processes get no PATH of the job's.
    a = [shutil.which(policy.bwrap) or policy.bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
         "--new-session", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "p2pgpu-job",
         "--cap-drop", "ALL"]
    a += ["--args", str(env_fd)] if env_fd is not None else env_args(job_env(spec))
    a += ["--ro-bind", "/usr", "/usr"]
    if spec.network or spec.cluster_net is not None:
        a.append("--share-net")  # the host's, or the member's namespace the node entered (nsenter)
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
    for src, dest in spec.ro_binds:
        if not (os.path.isabs(src) and os.path.isabs(dest)) or any(
                dest == r or dest.startswith(r + "/") for r in _RESERVED_DESTS):
            raise JobRejected(f"read-only bind {src!r} -> {dest!r} is not allowed")
        a += ["--ro-bind", src, dest]
    for name in ("passwd", "group", "hostname"):
        a += ["--ro-bind", str(disk_top / ETC_DIR / name), f"/etc/{name}"]
    a += [*proc_args(), "--dev", "/dev"]
    for p in gpu_device_paths(spec.gpus, policy.dev_dir):
        a += ["--dev-bind", str(p), f"/dev/{p.name}"]
    # Everything the job can write is size-limited: /dev/shm and /tmp are
    # tmpfs with --size, /work is its own disk, and / and /dev are read-only.
    a += ["--size", str(policy.shm_bytes_max), "--tmpfs", "/dev/shm",
          "--size", str(policy.tmp_bytes_max), "--tmpfs", "/tmp",
          "--bind", str(disk_top / WORK_DIR), WORK, "--ro-bind", str(inputs_of(disk_top)), WORK + "/in",
          "--remount-ro", "/", "--remount-ro", "/dev", "--chdir", WORK]
    if status_fd is not None:
        a += ["--json-status-fd", str(status_fd)]
    return a + ["--", *spec.argv]


def env_args(env: Mapping[str, str]) -> list[str]:
    """bubblewrap options that give the job exactly ``env``."""
    out = ["--clearenv"]
    for name in sorted(env):
        out += ["--setenv", name, env[name]]
    return out


def _env_fd(env: Mapping[str, str]) -> int:
    """A memory file holding :func:`env_args` for ``--args`` (NUL-separated:
    values may be up to 32 KiB each, too long for a command line)."""
    fd = os.memfd_create("p2pgpu-job-env", 0)  # inheritable: bubblewrap reads it
    data = b"".join(a.encode() + b"\0" for a in env_args(env))
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _write_etc(etc_dir: Path) -> None:
    etc_dir.mkdir(exist_ok=True)
    (etc_dir / "passwd").write_text(f"job:x:{SANDBOX_UID}:{SANDBOX_UID}:p2pgpu job:{WORK}:/bin/sh\n")
    (etc_dir / "group").write_text(f"job:x:{SANDBOX_UID}:\n")
    (etc_dir / "hostname").write_text("p2pgpu-job\n")


@lru_cache(maxsize=8)
def _resolved_backend(preference: str, base: Path | None) -> tuple[str, Path | None]:
    return resolve_memory(preference, base)


def _resolved_disk(policy: SandboxPolicy) -> tuple[str, str]:
    try:
        return probe_disk_backend(policy.disk_backend, policy.scratch_root)
    except DiskUnavailable as exc:
        raise SandboxUnavailable(str(exc)) from None


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
        _resolved_disk(policy)
    except SandboxUnavailable as exc:
        return str(exc)
    with tempfile.TemporaryDirectory(prefix="p2pgpu-check-") as tmp:
        top = Path(tmp) / "disk"
        for d in (top / WORK_DIR, top / ETC_DIR, inputs_of(top)):
            d.mkdir(parents=True)
        _write_etc(top / ETC_DIR)
        spec = JobSpec(argv=("/bin/sh", "-c", "echo ok > probe"), work_dir=top / WORK_DIR, time_limit_ms=10_000,
                       memory_bytes_max=256 << 20)
        argv = bwrap_argv(spec, policy, disk_top=top)
        try:
            proc = subprocess.run(argv, env=_HOST_ENV, capture_output=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"bubblewrap failed to start: {exc}"
        if proc.returncode != 0 or not (top / WORK_DIR / "probe").exists():
            err = proc.stderr.decode(errors="replace").strip()[-300:]
            return f"bubblewrap cannot make a sandbox here (exit {proc.returncode}): {err}"
    return None


def sandbox_disk_backend(policy: SandboxPolicy | None = None) -> tuple[str, str]:
    """(the disk backend jobs get under ``policy`` here, why better ones do
    not work: "" when the best one does).  The node logs the reason."""
    return _resolved_disk(policy or SandboxPolicy())


def sandbox_memory_backend(policy: SandboxPolicy | None = None) -> str:
    """The memory backend jobs get under ``policy`` on this machine."""
    policy = policy or SandboxPolicy()
    return _resolved_backend(policy.memory_backend, policy.cgroup_base)[0]


@dataclass
class _Run:
    spec: JobSpec
    lines: LineForwarder
    disk: JobDisk
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


_THREADS: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("p2pgpu_sandbox_threads")
#: Worker threads the sandbox's blocking work (walks, copies, mounts) may use at once.
threads_max = 4


def _limiter() -> trio.CapacityLimiter:
    try:
        return _THREADS.get()
    except LookupError:
        limiter = trio.CapacityLimiter(threads_max)
        _THREADS.set(limiter)
        return limiter


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking ``fn(*args)`` in a worker thread (at most
    :data:`threads_max` at once), never in the event loop."""
    return await trio.to_thread.run_sync(fn, *args, limiter=_limiter())


def _kill(proc: trio.Process, limit: MemoryLimit) -> None:
    """SIGKILL the keeper's process group (the keeper, the cgroup wrapper,
    bubblewrap); --die-with-parent and the pid namespace take every process
    of the job with it; the cgroup sweeps up."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # already gone
    limit.kill_all()


def _walk_usage(disk: JobDisk, entries_max: int) -> tuple[int, int]:
    """(bytes, entries) of the job's files by name: the ``dir`` backend's
    measure (blocking; never raises)."""
    try:
        fd = os.open(disk.work, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return 0, 0
    try:
        w = walk(fd, entries_max=entries_max, files_max=entries_max)
    finally:
        os.close(fd)
    return w.bytes, w.entries


async def _watch(run: _Run, proc: trio.Process, limit: MemoryLimit, policy: SandboxPolicy) -> None:
    spec, disk = run.spec, run.disk
    walked_at = -1e9
    while True:
        await trio.sleep(policy.poll_interval_ms / 1000)
        if limit.watchdog and rss_bytes(proc.pid) > limit.limit_bytes:
            run.reason, run.detail = "memory_limit", f"resident memory above {limit.limit_bytes} bytes"
            _kill(proc, limit)
            return
        used = disk.usage()
        if used is None and trio.current_time() - walked_at >= dir_walk_interval_s:
            # The ``dir`` backend: walk the names, off the event loop, at most once a second.
            used = await in_thread(_walk_usage, disk, spec.output_entries_max + 1)
            walked_at = trio.current_time()
        if used is not None and (used[0] > spec.output_bytes_max or used[1] > spec.output_entries_max):
            run.reason = "output_limit"
            run.detail = f"work dir holds {used[0]} bytes in {used[1]} entries (limits {spec.output_bytes_max} " \
                         f"bytes, {spec.output_entries_max} entries)"
            _kill(proc, limit)
            return


def _check_work_dir(work_dir: Path) -> None:
    if not work_dir.is_dir() or work_dir.is_symlink():
        raise JobRejected(f"work dir {work_dir} does not exist")
    if any(work_dir.iterdir()):
        raise JobRejected(f"work dir {work_dir} is not empty (it receives the sealed outputs)")


def _prepare_disk(spec: JobSpec, policy: SandboxPolicy, backend: str) -> JobDisk:
    """Make the job's disk and lay it out: the job's /etc files, and its
    inputs hard-linked beside it (never bound from the node's own
    directories, whose paths the job would read in its mount table).  Blocking."""
    if spec.inputs_dir is not None and not spec.inputs_dir.is_dir():
        raise JobRejected(f"inputs dir {spec.inputs_dir} does not exist")
    try:
        disk = make_job_disk(backend, policy.scratch_root or scratch_root_default(),
                             bytes_max=spec.output_bytes_max, inodes_max=spec.output_entries_max + 256)
    except DiskUnavailable as exc:
        raise SandboxUnavailable(f"cannot make the job's disk: {exc}") from None
    try:
        _write_etc(disk.etc)
        if spec.inputs_dir is not None:
            link_tree(spec.inputs_dir, disk.inputs, files_max=inputs_files_max, bytes_max=inputs_bytes_max)
        disk.set_baseline()
    except (OSError, OutputLimitExceeded) as exc:
        remove_job_disk(disk)
        raise JobRejected(f"cannot stage the inputs: {exc}") from None
    return disk


def _record(spec: JobSpec, disk: JobDisk, limit: MemoryLimit | None, proc: trio.Process | None,
            net: MemberNet | None) -> None:
    """Write down what this sandbox leaves on the host (``_leftovers``)."""
    if spec.state_path is None:
        return
    doc: dict[str, Any] = {"scratch": str(disk.scratch), "mount": str(disk.top) if disk.mounted else "",
                           "cgroups": [str(d) for d in (limit._dirs() if limit is not None else [])]}
    if net is not None:
        doc.update(netns=net.netns, nft_table=net.table, net_claim=str(net.claim))
    if proc is not None:
        doc.update(keeper_pid=proc.pid, keeper_start=process_start_ticks(proc.pid))
    write_record(spec.state_path, doc)


async def run_job(spec: JobSpec, policy: SandboxPolicy | None = None, *,
                  on_line: LineCallback | None = None, now_ms: Callable[[], int] | None = None,
                  on_ended: Callable[[int], None] | None = None, on_started: Callable[[int], None] | None = None,
                  pass_fds: tuple[int, ...] = ()) -> SandboxResult:
    """Run ``spec`` sandboxed and return how it ended.

    ``on_line(stream, line)`` is awaited for each line of ``"stdout"`` and
    ``"stderr"`` (without the newline; lines longer than
    ``log_line_bytes_max`` come in pieces), until ``log_bytes_max`` bytes were
    forwarded.  A slow callback slows the job (the pipe fills): hand lines to
    a bounded channel if that matters.  ``now_ms`` (the wall clock) dates
    the end of the run (``SandboxResult.ended_at_ms``) at the moment the
    sandbox died, before its outputs are sealed; ``on_ended(ended_at_ms)``
    is called then (the node stops extending its checkpoint chain).
    ``on_started(started_at_ms)`` is called when the sandbox's process has
    started and the time limit begins to count (``SandboxResult.started_at_ms``):
    the job's disk, its inputs and its memory limit are ready by then, so
    however slow they were to make, they are not the job's run.
    ``pass_fds`` are handed to the job's first process (the Ray runtime's
    event pipe).  With ``spec.cluster_net`` the sandbox joins a network of
    its own that reaches the job's other members only (``_netns``).  ``spec.work_dir`` must be
    an empty directory: it receives the sealed outputs.  Raises
    :class:`JobRejected` if the policy forbids the job,
    :class:`SandboxUnavailable` if no sandbox can run.
    """
    policy = policy or SandboxPolicy()
    if shutil.which(policy.bwrap) is None:
        raise SandboxUnavailable(f"bubblewrap ({policy.bwrap}) is not installed")
    _check_work_dir(spec.work_dir)
    # Probing makes a cgroup and a disk the first time: off the event loop too.
    backend, cgroup_base = await in_thread(_resolved_backend, policy.memory_backend, policy.cgroup_base)
    disk_backend, _why = await in_thread(_resolved_disk, policy)
    env = job_env(spec)
    bwrap_argv(spec, policy, disk_top=Path("/"))  # refuses before anything starts
    disk = await in_thread(_prepare_disk, spec, policy, disk_backend)
    net: MemberNet | None = None
    try:
        _record(spec, disk, None, None, None)
        if spec.cluster_net is not None:
            try:
                net = await in_thread(open_member_net, spec.cluster_net)
            except NetUnavailable as exc:
                raise SandboxUnavailable(f"cannot make the member's network: {exc}") from None
            _record(spec, disk, None, None, net)
        limit = open_memory_limit(backend, spec.memory_bytes_max, gpus=len(spec.gpus), base=cgroup_base,
                                  pids_max=spec.pids_max)
        try:
            result = await _start_and_supervise(spec, policy, limit, disk, net, env, on_line, now_ms, on_ended,
                                                on_started, pass_fds)
        finally:
            await limit.aclose()
        return await _seal(spec, disk, result)
    finally:
        with trio.CancelScope(shield=True):
            left = await in_thread(remove_job_disk, disk)
            if net is not None:
                left = "; ".join(p for p in (left, await in_thread(close_member_net, net)) if p)
            if left:
                log.warning("job disk %s not fully removed: %s", disk.scratch, left)
            elif spec.state_path is not None:
                spec.state_path.unlink(missing_ok=True)


async def _start_and_supervise(spec: JobSpec, policy: SandboxPolicy, limit: MemoryLimit, disk: JobDisk,
                               net: MemberNet | None, env: dict[str, str], on_line: LineCallback | None,
                               now_ms: Callable[[], int] | None, on_ended: Callable[[int], None] | None,
                               on_started: Callable[[int], None] | None, pass_fds: tuple[int, ...]) -> SandboxResult:
    r_fd, w_fd = os.pipe()
    status_stream = trio.lowlevel.FdStream(r_fd)  # owns r_fd
    env_fd = _env_fd(env)
    try:
        # The keeper is bubblewrap's parent for the job's whole life, and it
        # kills the job when the node dies or at the hard limit (_keeper).
        hard_limit_s = spec.time_limit_ms / 1000 + orphan_grace_s
        inner = bwrap_argv(spec, policy, disk_top=disk.top, status_fd=w_fd, env_fd=env_fd)
        if net is not None:
            inner = [shutil.which("nsenter") or "nsenter", f"--net={net.netns_path}", "--", *inner]
        inner = limit.wrap(inner)
        argv = [sys.executable, "-I", str(Path(__file__).with_name("_keeper.py")), str(os.getpid()),
                f"{hard_limit_s:.3f}", "--scratch", str(disk.scratch)]
        if disk.mounted:
            argv += ["--mount", str(disk.top)]
        for cg in limit._dirs():
            argv += ["--cgroup", str(cg)]
        if net is not None:
            argv += ["--netns", net.netns, "--nft", net.table, "--claim", str(net.claim)]
        argv += ["--", *inner]
        fds = (w_fd, env_fd, *pass_fds)
        try:
            proc = await trio.lowlevel.open_process(
                argv, env=_HOST_ENV | {"P2PGPU_KEEPER_PASS_FDS": ",".join(map(str, fds))}, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, pass_fds=fds,
                # The job reads the sandbox's init (bubblewrap) in its /proc/1: its
                # environment's PWD was the node's working directory (often its home).
                cwd="/")
        finally:
            os.close(w_fd)  # only bubblewrap holds the writing end now
            os.close(env_fd)
        try:
            _record(spec, disk, limit, proc, net)
        except OSError as exc:  # the job still runs bounded; only a restart's clean-up would miss it
            log.warning("cannot record the sandbox in %s: %s", spec.state_path, exc)
        return await _supervise(spec, policy, limit, disk, proc, status_stream, on_line, now_ms, on_ended,
                                on_started)
    finally:
        await status_stream.aclose()


async def _supervise(spec: JobSpec, policy: SandboxPolicy, limit: MemoryLimit, disk: JobDisk, proc: trio.Process,
                     status_stream: trio.lowlevel.FdStream, on_line: LineCallback | None,
                     now_ms: Callable[[], int] | None, on_ended: Callable[[int], None] | None,
                     on_started: Callable[[int], None] | None = None) -> SandboxResult:
    # The run starts now, as the time limit does: what a member claims it
    # served is this run, never the setup before it (docs/proofs.md).
    started_at_ms = now_ms() if now_ms is not None else 0
    if on_started is not None:
        on_started(started_at_ms)
    run = _Run(spec=spec, lines=LineForwarder(on_line, spec.log_bytes_max, spec.log_line_bytes_max), disk=disk)
    out, err = StreamState("stdout"), StreamState("stderr")
    t0 = trio.current_time()
    ended_at_ms = 0
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
                # The job is over now: its end time is this, whatever
                # sealing and cleaning up take afterwards.
                ended_at_ms = now_ms() if now_ms is not None else 0
                if on_ended is not None:
                    on_ended(ended_at_ms)
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
    stdout_sha = out.hash.digest()
    return SandboxResult(
        reason=run.reason, exit_code=exit_code, wall_ms=wall_ms, stdout_sha256=stdout_sha,
        stderr_sha256=err.hash.digest(), stdout_bytes=out.bytes, stderr_bytes=err.bytes,
        logs_truncated=run.lines.truncated, stderr_tail=bytes(err.tail), outputs=(),
        output_digest=output_digest([], stdout_sha), memory_backend=limit.backend, detail=run.detail,
        ended_at_ms=ended_at_ms, disk_backend=disk.backend, started_at_ms=started_at_ms,
    )


async def _seal(spec: JobSpec, disk: JobDisk, result: SandboxResult) -> SandboxResult:
    """Move the dead job's outputs into ``spec.work_dir`` (off the event loop)."""
    reason, detail = result.reason, result.detail
    outputs: tuple[OutputFile, ...] = ()
    try:
        outputs = tuple(await in_thread(functools.partial(
            seal_outputs, disk.work, spec.work_dir, files_max=spec.output_files_max,
            file_bytes_max=spec.output_file_bytes_max, bytes_max=spec.output_bytes_max,
            entries_max=spec.output_entries_max)))
    except (OutputLimitExceeded, OSError) as exc:
        if reason == "exited":
            reason, detail = "output_limit", str(exc)
    return dataclasses.replace(
        result, reason=reason, detail=detail, outputs=outputs,
        output_digest=output_digest([(f.path, f.size, f.sha256) for f in outputs], result.stdout_sha256))
