"""A finished job's outputs: found, bounded, hashed, and sealed where the job cannot reach them.

When the sandbox is gone, every regular file under the job's ``/work`` is an
output, named by its path relative to ``/work`` (POSIX, valid UTF-8, at
most ``path_bytes_max`` bytes) and hashed with sha256.  Links, FIFOs,
sockets and devices are skipped.  :func:`seal_outputs` copies each output
out of the job's disk into a directory only the node writes (the node's
``jobs/<job>/work``), hashing while it copies, with the set-uid, set-gid and
exec bits dropped; from then on the node serves results only from that
sealed copy and only by the (path, sha256) it recorded
(``p2pgpu/node/_results.py``).  Files are always opened relative to a
directory handle without following links (``_walk``), so no name the job
left can point the node at a file of its own.  Limits on the number of
files, each file's size and the total are checked while walking and
copying; a walk that meets a problem (too many entries, a path too long)
seals nothing and says why.

:func:`collect_outputs` hashes outputs in place (the Ray runtime's work
directory); :func:`open_sealed` opens one sealed output for serving.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ._walk import make_dirs_beneath, open_beneath, path_bytes_max, walk

path_len_max = path_bytes_max
#: Entries (files, directories, links...) walked before a job's tree is refused.
entries_max_default = 1_000_000
_CHUNK = 1 << 20
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class OutputLimitExceeded(Exception):
    """The job left more, or larger, outputs than its limits allow."""


@dataclass(frozen=True, kw_only=True, slots=True)
class OutputFile:
    path: str
    size: int
    sha256: bytes


def _check_names(files: list[tuple[str, int]], files_max: int, file_bytes_max: int, bytes_max: int) -> None:
    if len(files) > files_max:
        raise OutputLimitExceeded(f"more than {files_max} output files")
    total = 0
    for rel, size in files:
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:
            raise OutputLimitExceeded("an output path is not valid UTF-8") from None
        if size > file_bytes_max:
            raise OutputLimitExceeded(f"{rel[:64]} is larger than {file_bytes_max} bytes")
        total += size
        if total > bytes_max:
            raise OutputLimitExceeded(f"outputs total more than {bytes_max} bytes")


def _found(root_fd: int, files_max: int, file_bytes_max: int, bytes_max: int,
           entries_max: int) -> list[tuple[str, int]]:
    w = walk(root_fd, entries_max=entries_max, files_max=files_max)
    if w.problem:
        raise OutputLimitExceeded(w.problem)
    _check_names(w.files, files_max, file_bytes_max, bytes_max)
    return w.files


def _copy(src_fd: int, dst_fd: int | None, size_max: int, name: str) -> tuple[int, bytes]:
    """Hash ``src_fd`` (a regular file) to its end, copying to ``dst_fd``."""
    if not stat.S_ISREG(os.fstat(src_fd).st_mode):
        raise OutputLimitExceeded(f"{name[:64]} is not a regular file")
    h, n = hashlib.sha256(), 0
    while chunk := os.read(src_fd, _CHUNK):
        n += len(chunk)
        if n > size_max:
            raise OutputLimitExceeded(f"{name[:64]} is larger than {size_max} bytes")
        h.update(chunk)
        if dst_fd is not None:
            view = memoryview(chunk)
            while view:
                view = view[os.write(dst_fd, view):]
    return n, h.digest()


def collect_outputs(root: Path, files_max: int, file_bytes_max: int, bytes_max: int,
                    entries_max: int = entries_max_default) -> list[OutputFile]:
    """Hash every output under ``root`` in place, sorted by path, or raise
    :class:`OutputLimitExceeded`.  Never follows a link; no path limit."""
    try:
        root_fd = os.open(root, _DIR)
    except OSError as exc:
        raise OutputLimitExceeded(f"cannot open the work directory: {exc.strerror}") from None
    try:
        out, total = [], 0
        for rel, _size in _found(root_fd, files_max, file_bytes_max, bytes_max, entries_max):
            try:
                fd = open_beneath(root_fd, rel)
            except OSError as exc:
                raise OutputLimitExceeded(f"cannot open {rel[:64]}: {exc.strerror}") from None
            try:
                size, digest = _copy(fd, None, file_bytes_max, rel)
            finally:
                os.close(fd)
            total += size
            if total > bytes_max:
                raise OutputLimitExceeded(f"outputs total more than {bytes_max} bytes")
            out.append(OutputFile(path=rel, size=size, sha256=digest))
        return sorted(out, key=lambda f: f.path)
    finally:
        os.close(root_fd)


def seal_outputs(src: Path, dest: Path, *, files_max: int, file_bytes_max: int, bytes_max: int,
                 entries_max: int = entries_max_default) -> list[OutputFile]:
    """Copy every output under ``src`` (the dead job's ``/work``) into the
    empty directory ``dest``, hashing as it copies; sorted by path.  Raises
    :class:`OutputLimitExceeded` (``dest`` is then emptied again)."""
    src_fd = os.open(src, _DIR)
    try:
        dest_fd = os.open(dest, _DIR)
    except OSError:
        os.close(src_fd)
        raise
    try:
        try:
            return _seal(src_fd, dest_fd, files_max, file_bytes_max, bytes_max, entries_max)
        except OutputLimitExceeded:
            _empty(dest_fd)
            raise
    finally:
        os.close(src_fd)
        os.close(dest_fd)


def _seal(src_fd: int, dest_fd: int, files_max: int, file_bytes_max: int, bytes_max: int,
          entries_max: int) -> list[OutputFile]:
    out, total = [], 0
    for rel, _size in _found(src_fd, files_max, file_bytes_max, bytes_max, entries_max):
        try:
            fd = open_beneath(src_fd, rel)
        except OSError as exc:
            raise OutputLimitExceeded(f"cannot open {rel[:64]}: {exc.strerror}") from None
        try:
            parent, _, name = rel.rpartition("/")
            dir_fd = make_dirs_beneath(dest_fd, parent)
            try:
                wfd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                              dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
            try:
                size, digest = _copy(fd, wfd, file_bytes_max, rel)
                os.fchmod(wfd, 0o644)
            finally:
                os.close(wfd)
        finally:
            os.close(fd)
        total += size
        if total > bytes_max:
            raise OutputLimitExceeded(f"outputs total more than {bytes_max} bytes")
        out.append(OutputFile(path=rel, size=size, sha256=digest))
    return sorted(out, key=lambda f: f.path)


def _empty(dest_fd: int) -> None:
    from ._walk import _remove_beneath

    with os.scandir(dest_fd) as it:
        names = [e.name for e in it]
    for name in names:
        _remove_beneath(dest_fd, name, 10_000_000)


def link_tree(src: Path, dest: Path, *, files_max: int, bytes_max: int,
              entries_max: int = entries_max_default) -> int:
    """Put every regular file under ``src`` at the same path under the empty
    directory ``dest``: a hard link (no copy; the caller binds ``dest``
    read-only), or a copy where ``src`` is on another file system.  Links
    are never followed.  Returns the bytes staged; raises
    :class:`OutputLimitExceeded` past the limits."""
    src_fd = os.open(src, _DIR)
    try:
        dest_fd = os.open(dest, _DIR)
    except OSError:
        os.close(src_fd)
        raise
    try:
        total = 0
        for rel, size in _found(src_fd, files_max, bytes_max, bytes_max, entries_max):
            total += size
            parent, _, name = rel.rpartition("/")
            sdir = open_beneath(src_fd, parent, flags=_DIR) if parent else os.dup(src_fd)
            ddir = make_dirs_beneath(dest_fd, parent)
            try:
                try:
                    os.link(name, name, src_dir_fd=sdir, dst_dir_fd=ddir, follow_symlinks=False)
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                        raise
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=sdir)
                try:
                    wfd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o444,
                                  dir_fd=ddir)
                    try:
                        _copy(fd, wfd, bytes_max, rel)
                    finally:
                        os.close(wfd)
                finally:
                    os.close(fd)
            finally:
                os.close(sdir)
                os.close(ddir)
        return total
    finally:
        os.close(src_fd)
        os.close(dest_fd)


def open_sealed(root: Path, rel: str) -> int:
    """Open the sealed output ``rel`` under ``root`` for reading, without
    following links, and check it is a regular file.  Raises ``OSError`` or
    ``ValueError``; the caller closes the handle."""
    root_fd = os.open(root, _DIR)
    try:
        fd = open_beneath(root_fd, rel)
    finally:
        os.close(root_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"{rel[:64]} is not a regular file")
    os.set_blocking(fd, True)
    return fd


def sha256_fd(fd: int, size_max: int) -> tuple[int, bytes]:
    """(size, sha256) of an open regular file, read from its start; raises
    :class:`OutputLimitExceeded` past ``size_max`` bytes."""
    h, n, off = hashlib.sha256(), 0, 0
    while chunk := os.pread(fd, _CHUNK, off):
        off += len(chunk)
        n += len(chunk)
        if n > size_max:
            raise OutputLimitExceeded(f"more than {size_max} bytes")
        h.update(chunk)
    return n, h.digest()
