"""A finished job's output files: found, bounded, hashed, made harmless.

After the sandbox is gone, every regular file under the work directory is an
output, named by its path relative to the work directory (POSIX, UTF-8) and
hashed with sha256.  Symbolic links, FIFOs, sockets and devices are skipped,
and files are opened with ``O_NOFOLLOW``: a job must not make the node read a
host file by leaving a link to it.  Set-uid/set-gid/exec bits are cleared
(the job's uid maps to the node's uid on the host).  Limits on the number of
files, each file's size and the total stop a job from filling the node's disk
(a watchdog checks the same limits while the job runs, with :func:`usage`).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

path_len_max = 1024
_CHUNK = 1 << 20


class OutputLimitExceeded(Exception):
    """The job left more, or larger, outputs than its limits allow."""


@dataclass(frozen=True, kw_only=True, slots=True)
class OutputFile:
    path: str
    size: int
    sha256: bytes


def _walk(root: Path, files_cap: int) -> list[tuple[str, os.stat_result]]:
    """Regular files under ``root`` (never following links), at most ``files_cap``."""
    found: list[tuple[str, os.stat_result]] = []
    todo = [""]
    while todo and len(found) < files_cap:
        rel = todo.pop()
        try:
            entries = sorted(os.scandir(root / rel if rel else root), key=lambda e: e.name)
        except OSError:
            continue
        for e in entries:
            sub = f"{rel}/{e.name}" if rel else e.name
            st = e.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                todo.append(sub)
            elif stat.S_ISREG(st.st_mode):
                found.append((sub, st))
                if len(found) >= files_cap:
                    break
    return found


def usage(root: Path, files_cap: int) -> tuple[int, int]:
    """(files, bytes) of regular files under ``root``, counting at most ``files_cap`` files."""
    found = _walk(root, files_cap)
    return len(found), sum(st.st_size for _, st in found)


def _sha256_file(path: Path, size_max: int) -> tuple[int, bytes]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OutputLimitExceeded(f"{path} is not a regular file")
        h, n = hashlib.sha256(), 0
        while chunk := f.read(_CHUNK):
            n += len(chunk)
            if n > size_max:
                raise OutputLimitExceeded(f"{path.name} is larger than {size_max} bytes")
            h.update(chunk)
    return n, h.digest()


def collect_outputs(root: Path, files_max: int, file_bytes_max: int, bytes_max: int) -> list[OutputFile]:
    """Hash every output under ``root``, sorted by path, or raise
    :class:`OutputLimitExceeded`."""
    found = _walk(root, files_max + 1)
    if len(found) > files_max:
        raise OutputLimitExceeded(f"more than {files_max} output files")
    out, total = [], 0
    for rel, st in found:
        if len(rel.encode("utf-8", "surrogateescape")) > path_len_max:
            raise OutputLimitExceeded(f"an output path is longer than {path_len_max} bytes")
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:
            raise OutputLimitExceeded("an output path is not valid UTF-8") from None
        if st.st_mode & (stat.S_ISUID | stat.S_ISGID | 0o111):
            os.chmod(root / rel, stat.S_IMODE(st.st_mode) & 0o666, follow_symlinks=False)
        size, digest = _sha256_file(root / rel, file_bytes_max)
        total += size
        if total > bytes_max:
            raise OutputLimitExceeded(f"outputs total more than {bytes_max} bytes")
        out.append(OutputFile(path=rel, size=size, sha256=digest))
    return sorted(out, key=lambda f: f.path)
