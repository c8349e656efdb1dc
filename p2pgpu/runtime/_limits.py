"""Memory limits for a sandboxed job: a cgroup when we can write one, else an rlimit.

Three ways to bound a job's memory, tried in this order by :func:`memory_backend`:

``cgroup2``  a child of our own cgroup v2 (or of our parent, see
             :func:`cgroup_bases`) with ``memory.max`` (and
             ``memory.swap.max = 0``); the kernel OOM-kills inside it and
             ``memory.events`` counts ``oom_kill``: an exact, clear reason.
``cgroup1``  the same with the v1 memory controller (``memory.limit_in_bytes``,
             ``memory.oom_control``'s ``oom_kill``) on hybrid hosts, where the
             v2 hierarchy has no memory controller (this development machine).
``rlimit``   ``RLIMIT_AS`` (``ulimit -v``) on each process of the sandbox
             plus a watchdog summing the resident set of all of them (the
             rlimit alone bounds each process, not their sum).  The job's
             allocation fails instead of being killed, so the reason is
             inferred (watchdog trip, or a failing exit whose stderr says it ran
             out of memory).  CUDA reserves huge virtual ranges, so a GPU job
             gets the RSS watchdog only.

The job joins its cgroup through a two-line ``/bin/sh`` wrapper that writes its
own pid into ``cgroup.procs`` and then ``exec``\\ s bubblewrap, so no byte of the
job runs outside the limit and no ``preexec_fn`` runs in a forked child of a
threaded process.
"""

from __future__ import annotations

import errno
import os
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import trio

BACKENDS = ("cgroup2", "cgroup1", "rlimit")
cgroup_drain_s = 5.0
_OOM_MARKERS = (b"MemoryError", b"Cannot allocate memory", b"std::bad_alloc", b"out of memory",
                b"CUDA out of memory")


class SandboxUnavailable(Exception):
    """The sandbox cannot run here (no bubblewrap, no namespaces, bad config):
    the node must refuse jobs rather than run them unconfined."""


def _mountinfo() -> list[tuple[str, str, str]]:
    """(mount point, fstype, super options) of every mount."""
    rows = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) >= 5 and len(rfields) >= 3:
            rows.append((fields[4], rfields[0], rfields[2]))
    return rows


def _own_cgroup(controller: str) -> str | None:
    """Our path in the hierarchy of ``controller`` ("" for v2)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hid, _, rest = line.partition(":")
        ctrls, _, path = rest.partition(":")
        if (controller == "" and hid == "0" and ctrls == "") or controller in ctrls.split(","):
            return path
    return None


def cgroup_base(version: str, controller: str = "memory") -> Path | None:
    """The directory under which job cgroups are made: our own cgroup (for
    v1, in the hierarchy of ``controller``)."""
    for mnt, fstype, opts in _mountinfo():
        if version == "cgroup2" and fstype == "cgroup2":
            own = _own_cgroup("")
        elif version == "cgroup1" and fstype == "cgroup" and controller in opts.split(","):
            own = _own_cgroup(controller)
        else:
            continue
        if own is not None:
            return Path(mnt) / own.lstrip("/")
    return None


@dataclass(kw_only=True)
class MemoryLimit:
    """One job's memory limit.  Make with :func:`open_memory_limit`, always
    :meth:`close` (it removes the cgroup)."""

    backend: str
    limit_bytes: int
    cgroup: Path | None = None
    #: Sum the resident memory of the job's processes every poll and kill the
    #: job above the limit: always with the rlimit backend, whose
    #: ``RLIMIT_AS`` bounds each process alone (six processes under the
    #: limit each held six times it; ``tests/attacks/test_job_held_limits.py``).
    watchdog: bool = False
    #: ``RLIMIT_AS`` on every process of the job (rlimit backend, not for GPU
    #: jobs: CUDA reserves huge virtual ranges).
    address_space: bool = False
    #: A v1 ``pids`` cgroup bounding the job's processes (v2 bounds them in
    #: ``cgroup`` itself when the pids controller is there).
    pids_cgroup: Path | None = None

    def _dirs(self) -> list[Path]:
        return [d for d in (self.cgroup, self.pids_cgroup) if d is not None]

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the limits: joins the cgroups, sets the rlimit,
        then execs ``argv``."""
        dirs = self._dirs()
        steps = [f'echo $$ > "${{{i}}}/cgroup.procs" || exit 125' for i in range(len(dirs))]
        if self.address_space:
            steps.append(f"ulimit -v {max(1, self.limit_bytes // 1024)} || exit 125")
        if not steps:
            return argv
        script = "; ".join(steps) + f'; shift {max(0, len(dirs) - 1)}; exec "$@"'
        return ["/bin/sh", "-c", script, *([str(d) for d in dirs] or ["p2pgpu-sandbox"]), *argv]

    def oom_killed(self) -> bool:
        """Whether the kernel killed something in this job's cgroup for memory."""
        if self.cgroup is None:
            return False
        name = "memory.events" if self.backend == "cgroup2" else "memory.oom_control"
        try:
            text = (self.cgroup / name).read_text()
        except OSError:
            return False
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit() and int(value) > 0:
                return True
        return False

    def looks_out_of_memory(self, stderr_tail: bytes, exit_code: int | None, sig: int | None) -> bool:
        """The rlimit backend's inference: the job failed and said why."""
        if self.backend != "rlimit" or (exit_code == 0 and sig is None):
            return False
        return any(m in stderr_tail for m in _OOM_MARKERS)

    def kill_all(self) -> None:
        """SIGKILL every process left in the job's cgroups (the pid namespace
        usually took them with it already)."""
        for d in self._dirs():
            _kill_cgroup(d)

    async def aclose(self) -> None:
        """Kill what is left and remove the cgroups, waiting (shielded, at most
        ``cgroup_drain_s``) for the killed processes to leave them."""
        with trio.CancelScope(shield=True):
            with trio.move_on_after(cgroup_drain_s):
                while self._dirs():
                    self.kill_all()
                    if self.cgroup is not None and _try_rmdir(self.cgroup):
                        self.cgroup = None
                    if self.pids_cgroup is not None and _try_rmdir(self.pids_cgroup):
                        self.pids_cgroup = None
                    if self._dirs():
                        await trio.sleep(0.01)
        if self._dirs():
            raise SandboxUnavailable(f"job cgroups {self._dirs()} still hold processes")


def _kill_cgroup(d: Path) -> None:
    kill_file = d / "cgroup.kill"
    if kill_file.exists():
        try:
            kill_file.write_text("1")
            return
        except OSError:
            pass  # fall through to killing pid by pid
    try:
        pids = (d / "cgroup.procs").read_text().split()
    except OSError:
        return
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            continue


def _try_rmdir(d: Path) -> bool:
    """Remove an empty cgroup; False while processes are still leaving it."""
    try:
        d.rmdir()
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise SandboxUnavailable(f"cannot remove job cgroup {d}: {exc}") from None
        return False
    return True


def _make_cgroup(version: str, base: Path, limit_bytes: int, pids_max: int = 0) -> Path:
    if version == "cgroup2":
        try:
            ctrls = (base / "cgroup.subtree_control").read_text().split()
            if "memory" not in ctrls:
                (base / "cgroup.subtree_control").write_text("+memory")
        except OSError as exc:
            raise OSError(f"cannot enable the memory controller under {base}: {exc}") from None
    path = base / f"p2pgpu-{secrets.token_hex(6)}"
    path.mkdir()
    try:
        if version == "cgroup2":
            (path / "memory.max").write_text(str(limit_bytes))
            if (path / "memory.swap.max").exists():
                (path / "memory.swap.max").write_text("0")
            if pids_max and (path / "pids.max").exists():
                (path / "pids.max").write_text(str(pids_max))
        else:
            (path / "memory.limit_in_bytes").write_text(str(limit_bytes))
            memsw = path / "memory.memsw.limit_in_bytes"
            if memsw.exists():
                memsw.write_text(str(limit_bytes))
    except OSError:
        path.rmdir()
        raise
    return path


def cgroup_bases(version: str) -> list[Path]:
    """Where job cgroups may go, best first: under our own cgroup; for v2
    also beside it, under our parent, when the parent hands the memory
    controller down (our own cgroup holds processes, so v2's "no internal
    processes" rule forbids enabling it below us)."""
    own = cgroup_base(version)
    if own is None:
        return []
    bases = [own]
    if version == "cgroup2":
        try:
            controllers = (own / "cgroup.controllers").read_text().split()
        except OSError:
            controllers = []
        mount = next((Path(m) for m, t, _ in _mountinfo() if t == "cgroup2"), None)
        if "memory" in controllers and mount is not None and own != mount:
            bases.append(own.parent)
    return bases


def resolve_memory(preference: str = "auto", base: Path | None = None) -> tuple[str, Path | None]:
    """(backend, cgroup base) that works here: ``preference`` if it works,
    else the first of :data:`BACKENDS` that does.  Probes by making and
    removing a cgroup; ``base`` (the operator's delegated cgroup) is the only
    place tried when given."""
    if preference not in ("auto", *BACKENDS):
        raise ValueError(f"memory backend must be one of auto, {', '.join(BACKENDS)}")
    order = BACKENDS if preference == "auto" else (preference,)
    for name in order:
        if name == "rlimit":
            return name, None
        for where in ([base] if base is not None else cgroup_bases(name)):
            try:
                _make_cgroup(name, where, 1 << 30).rmdir()
            except OSError:
                continue
            return name, where
    raise SandboxUnavailable(f"memory backend {preference!r} does not work here")


def memory_backend(preference: str = "auto", base: Path | None = None) -> str:
    """The name of the backend :func:`resolve_memory` picks."""
    return resolve_memory(preference, base)[0]


def _pids_cgroup(pids_max: int) -> Path | None:
    """A v1 ``pids`` cgroup with ``pids.max``, or None where there is none."""
    base = cgroup_base("cgroup1", "pids")
    if base is None or not pids_max:
        return None
    path = base / f"p2pgpu-{secrets.token_hex(6)}"
    try:
        path.mkdir()
        (path / "pids.max").write_text(str(pids_max))
    except OSError:
        _try_rmdir(path)
        return None
    return path


def open_memory_limit(backend: str, limit_bytes: int, *, gpus: int, base: Path | None = None,
                      pids_max: int = 0) -> MemoryLimit:
    """Prepare the limits of one job: its memory cgroup under ``base`` (or the
    rlimit), and at most ``pids_max`` processes where a pids controller is
    available (v2 in the same cgroup, else a v1 pids cgroup; 0: no bound)."""
    if backend == "rlimit":
        return MemoryLimit(backend=backend, limit_bytes=limit_bytes, watchdog=True, address_space=not gpus,
                           pids_cgroup=_pids_cgroup(pids_max))
    where = base or cgroup_base(backend)
    if where is None:
        raise SandboxUnavailable(f"no {backend} hierarchy mounted")
    try:
        path = _make_cgroup(backend, where, limit_bytes, pids_max)
    except OSError as exc:
        raise SandboxUnavailable(f"cannot make a {backend} cgroup under {where}: {exc}") from None
    limit = MemoryLimit(backend=backend, limit_bytes=limit_bytes, cgroup=path)
    if pids_max and not (path / "pids.max").exists():
        limit.pids_cgroup = _pids_cgroup(pids_max)
    return limit


def sweep_stale_cgroups(min_age_s: float = 60.0) -> list[Path]:
    """Remove empty job cgroups left by a node that was killed (``kill -9``
    leaves the directory behind; its processes died with the sandbox).  Only
    ones older than ``min_age_s`` are touched, so another node's cgroup that
    is about to be joined is never taken; a cgroup still holding processes
    refuses removal and stays.  Returns what was removed."""
    now = time.time()
    bases = [*cgroup_bases("cgroup2"), *cgroup_bases("cgroup1")]
    pids_base = cgroup_base("cgroup1", "pids")
    if pids_base is not None:
        bases.append(pids_base)
    removed = []
    for base in bases:
        try:
            entries = sorted(base.glob("p2pgpu-*"))
        except OSError:
            continue
        for d in entries:
            try:
                old = now - d.stat().st_mtime > min_age_s
            except OSError:
                continue
            if old:
                try:
                    d.rmdir()
                except OSError:
                    continue  # busy: a job still runs in it
                removed.append(d)
    return removed


def descendants(root_pid: int) -> list[int]:
    """``root_pid`` and all its descendants, from /proc (the sandbox's
    orphans are reparented to its pid-namespace init, itself a descendant)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # comm may contain spaces and parentheses: ppid follows the last ')'.
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) >= 2 and fields[1].isdigit():
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(sorted(children.get(pid, [])))
    return out


def rss_bytes(root_pid: int) -> int:
    """Resident memory of ``root_pid`` and its descendants."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in descendants(root_pid):
        try:
            fields = Path(f"/proc/{pid}/statm").read_text().split()
        except OSError:
            continue
        if len(fields) >= 2:
            total += int(fields[1]) * page
    return total
