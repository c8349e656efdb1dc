"""A job's disk: everything a job can write to lives on a filesystem whose size the kernel enforces.

Walking a job's file names cannot bound what it writes: a file deleted while
open keeps its blocks and has no name (the attack wrote 5.5 GB against a
4 GiB limit).  So each job gets its own filesystem, made when it starts and
destroyed when it ends, and the sandbox binds only that filesystem's
``work`` (read-write, at ``/work``) and ``etc`` (the job's ``passwd``,
``group``, ``hostname``).  The job's inputs are not on it: they are hard
links (a copy only across file systems) in ``in`` beside it in the job's
scratch directory, bound read-only at ``/work/in``, so that gigabytes of
inputs from the content store cost nothing.  Three backends, in
the order ``auto`` tries them:

``loop``   a sparse ext4 image (no journal, ``-N`` inodes) mounted through a
           loop device: the kernel refuses a byte or an inode past the
           image's size (``ENOSPC``), deleted-but-open files included, and
           ``statvfs`` tells the watchdog the exact usage at any moment.
           Needs root (``mount``) and ``mkfs.ext4``.  Removing it is one
           ``umount`` and one ``unlink``, whatever the job left (300,000
           empty directories cost nothing).
``tmpfs``  a ``tmpfs`` with ``size=`` and ``nr_inodes=``: the same
           guarantees, in memory (its pages are charged to the job's memory
           cgroup): for small limits.  Needs root.
``dir``    a plain directory, where nothing above works (a node that is not
           root): usage is measured by walking names, which a deleted-but-
           open file escapes.  :func:`probe_disk_backend` says why the node
           fell back to it, and the node logs it.

A filesystem of its own also keeps the node's paths out of the sandbox's
mount table: a bind of a filesystem's root shows ``/`` as its source path in
``/proc/self/mountinfo``.  With ``dir``, and for the inputs, the bind's
source path (under the scratch root, never under the node's home) is what
shows.  The disks live
under a scratch root (``/var/tmp/p2pgpu-<uid>``, mode 0700) in one
directory per job; :func:`remove_job_disk` takes everything away.

Everything here blocks: the node calls it from a worker thread.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ._walk import remove_tree

DISK_BACKENDS = ("loop", "tmpfs", "dir")
#: ext4's own metadata and slack on top of what the job may write.
disk_overhead_bytes = 8 << 20
inode_bytes = 256
mount_timeout_s = 60.0
#: The job's disk, bound into the sandbox: read-write, read-only, the job's /etc files.
WORK_DIR, INPUTS_DIR, ETC_DIR = "work", "in", "etc"


def inputs_of(top: Path) -> Path:
    """Where a disk's job finds its inputs (read-only at ``/work/in``)."""
    return top.parent / INPUTS_DIR


class DiskUnavailable(Exception):
    """A job's disk could not be made (the message says why)."""


@dataclass
class JobDisk:
    """One job's filesystem.  ``scratch`` is the job's directory under the
    scratch root (the image and the mount point live there); ``top`` is the
    root of the filesystem, holding ``work``, ``in`` and ``etc``."""

    backend: str
    scratch: Path
    top: Path
    image: Path | None
    bytes_max: int
    inodes_max: int
    mounted: bool = False
    base_bytes: int = 0
    base_inodes: int = 0

    @property
    def work(self) -> Path:
        return self.top / WORK_DIR

    @property
    def inputs(self) -> Path:
        """Beside the disk, not on it: hard links to the inputs, bound read-only."""
        return inputs_of(self.top)

    @property
    def etc(self) -> Path:
        return self.top / ETC_DIR

    @property
    def kernel_enforced(self) -> bool:
        return self.backend in ("loop", "tmpfs")

    def _statvfs_used(self) -> tuple[int, int]:
        st = os.statvfs(self.top)
        return (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_files - st.f_ffree

    def set_baseline(self) -> None:
        """What the disk holds before the job runs (metadata, inputs, etc)."""
        if self.kernel_enforced:
            self.base_bytes, self.base_inodes = self._statvfs_used()

    def usage(self) -> tuple[int, int] | None:
        """(bytes, inodes) the job added, deleted-but-open files included;
        ``None`` for ``dir`` (walk the names instead)."""
        if not self.kernel_enforced:
            return None
        try:
            used, inodes = self._statvfs_used()
        except OSError:
            return None
        return max(0, used - self.base_bytes), max(0, inodes - self.base_inodes)


def scratch_root_default() -> Path:
    """Where job disks go unless the operator says: ``/var/tmp`` (on disk,
    unlike a tmpfs ``/tmp``), else the temp dir; never the node's home."""
    base = Path("/var/tmp")
    if not (base.is_dir() and os.access(base, os.W_OK)):
        base = Path(tempfile.gettempdir())
    return base / f"p2pgpu-{os.getuid()}"


def _ensure_root(scratch_root: Path) -> None:
    scratch_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = scratch_root.lstat()
    if st.st_uid != os.getuid() or not os.path.isdir(scratch_root) or os.path.islink(scratch_root):
        raise DiskUnavailable(f"scratch root {scratch_root} is not a directory owned by this user")
    os.chmod(scratch_root, 0o700)


def _run(argv: list[str]) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=mount_timeout_s, check=False, env={
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DiskUnavailable(f"{argv[0]} failed: {exc}") from None
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).decode(errors="replace").strip()[-300:]
        raise DiskUnavailable(f"{' '.join(argv[:2])} failed (exit {proc.returncode}): {err}")


def image_bytes(bytes_max: int, inodes_max: int) -> int:
    """The size of a ``loop`` image that holds ``bytes_max`` of data and
    ``inodes_max`` inodes (4 KiB aligned)."""
    size = bytes_max + inodes_max * inode_bytes + disk_overhead_bytes
    return -(-size // 4096) * 4096


def make_job_disk(backend: str, scratch_root: Path, *, bytes_max: int, inodes_max: int) -> JobDisk:
    """Make and mount one job's disk (blocking).  Raises :class:`DiskUnavailable`."""
    if backend not in DISK_BACKENDS:
        raise ValueError(f"disk backend must be one of {', '.join(DISK_BACKENDS)}")
    _ensure_root(scratch_root)
    scratch = Path(tempfile.mkdtemp(prefix="job-", dir=scratch_root))
    disk = JobDisk(backend=backend, scratch=scratch, top=scratch / "disk", image=None, bytes_max=bytes_max,
                   inodes_max=inodes_max)
    try:
        disk.top.mkdir(mode=0o700)
        if backend == "loop":
            disk.image = scratch / "disk.img"
            fd = os.open(disk.image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, image_bytes(bytes_max, inodes_max))
            finally:
                os.close(fd)
            _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-b", "4096", "-O", "^has_journal,^resize_inode",
                  "-N", str(max(64, inodes_max)), "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
                  str(disk.image)])
            # noinit_itable: the image is sparse (zeros), so no lazy-init writes.
            _run(["mount", "-t", "ext4", "-o", "loop,nosuid,nodev,noatime,noinit_itable", str(disk.image),
                  str(disk.top)])
            disk.mounted = True
            (disk.top / "lost+found").rmdir()
        elif backend == "tmpfs":
            options = (f"size={max(4096, bytes_max + disk_overhead_bytes)},nr_inodes={max(64, inodes_max)},"
                       "mode=0700,nosuid,nodev,noatime")
            _run(["mount", "-t", "tmpfs", "-o", options, "p2pgpu-job", str(disk.top)])
            disk.mounted = True
        os.chmod(disk.top, 0o755)
        for name in (WORK_DIR, ETC_DIR):
            (disk.top / name).mkdir(mode=0o755)
        disk.inputs.mkdir(mode=0o755)
    except (OSError, DiskUnavailable) as exc:
        remove_job_disk(disk)
        if isinstance(exc, DiskUnavailable):
            raise
        raise DiskUnavailable(f"cannot lay out the job's disk: {exc}") from None
    return disk


def remove_job_disk(disk: JobDisk) -> str:
    """Unmount and delete the disk and its scratch directory (blocking).
    Returns "" or what could not be removed; never raises."""
    return remove_scratch(disk.scratch, mounted=disk.top if disk.mounted else None)


def remove_scratch(scratch: Path, *, mounted: Path | None) -> str:
    """Take away a job's scratch directory, unmounting ``mounted`` first
    (lazily if it is still busy).  Also used for a previous life's leftovers."""
    problem = ""
    if mounted is not None and os.path.ismount(mounted):
        try:
            _run(["umount", str(mounted)])
        except DiskUnavailable:
            try:
                _run(["umount", "-l", str(mounted)])  # a straggler holds it: detach now, freed when it goes
            except DiskUnavailable as exc:
                problem = str(exc)
    if mounted is not None and os.path.ismount(mounted):
        return problem or f"{mounted} is still mounted"
    if os.path.lexists(scratch):
        problem = remove_tree(str(scratch)) or problem
    return problem


@lru_cache(maxsize=8)
def probe_disk_backend(preference: str = "auto", scratch_root: Path | None = None) -> tuple[str, str]:
    """(backend, why the better ones do not work here: "" when none failed).

    ``preference`` is ``auto`` or one of :data:`DISK_BACKENDS`; a backend
    named explicitly that does not work raises :class:`DiskUnavailable`.
    Probes by making (and removing) a small disk of each kind."""
    if preference not in ("auto", *DISK_BACKENDS):
        raise ValueError(f"disk backend must be auto or one of {', '.join(DISK_BACKENDS)}")
    root = scratch_root or scratch_root_default()
    order = DISK_BACKENDS if preference == "auto" else (preference,)
    why: list[str] = []
    for name in order:
        if name != "dir" and os.geteuid() != 0:
            why.append(f"{name}: the node is not root (mounting needs it)")
            continue
        if name == "loop" and shutil.which("mkfs.ext4", path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
            why.append("loop: mkfs.ext4 is not installed (Debian: e2fsprogs)")
            continue
        try:
            disk = make_job_disk(name, root, bytes_max=1 << 20, inodes_max=64)
        except DiskUnavailable as exc:
            why.append(f"{name}: {exc}")
            continue
        leftover = remove_job_disk(disk)
        if leftover:
            why.append(f"{name}: {leftover}")
            continue
        return name, "; ".join(why)
    raise DiskUnavailable("no disk backend works here: " + "; ".join(why))
