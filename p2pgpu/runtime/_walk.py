"""Walking a tree the job wrote, through directory handles, without ever raising.

A job controls every name in its work directory: it can nest directories
past ``PATH_MAX`` (4096 bytes, where path-based calls fail with
``ENAMETOOLONG``), make hundreds of thousands of entries, swap a file for a
symbolic link between two calls, or leave names that are not UTF-8.  So the
node never walks a job's files by path: :func:`walk` opens each directory
relative to its parent's handle with ``O_NOFOLLOW | O_DIRECTORY`` (no path
is ever longer than one name), lists it through that handle, and stats
entries without following links.  It is bounded (entries seen, files kept,
depth, relative path length), and every problem, an unreadable directory
included, is returned as a sentence in :attr:`Walk.problem` instead of an
exception: the watchdog and the sealer decide what a problem means.

:func:`open_beneath` opens one relative path the same way (each component
without following links), and :func:`remove_tree` deletes a tree through
handles, bounded, for the plain-directory disk backend.  These are blocking
calls: the node runs them in a worker thread (``trio.to_thread``).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

#: Relative paths longer than this (bytes) are never outputs.
path_bytes_max = 1024
#: Nesting deeper than this is not walked (a relative path of at most
#: ``path_bytes_max`` bytes has at most 512 components anyway).
depth_max = 512
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


@dataclass
class Walk:
    """What :func:`walk` found: regular files (relative path, size) in
    sorted order per directory, how many entries it saw in all (directories,
    links and the rest included), and the first problem met ("" if none)."""

    files: list[tuple[str, int]] = field(default_factory=list)
    entries: int = 0
    problem: str = ""

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self.files)

    def note(self, problem: str) -> None:
        if not self.problem:
            self.problem = problem


def _rel_bytes(rel: str) -> int:
    return len(rel.encode("utf-8", "surrogateescape"))


def walk(root_fd: int, *, entries_max: int, files_max: int, rel_bytes_max: int = path_bytes_max,
         levels_max: int = depth_max) -> Walk:
    """Every regular file under the directory ``root_fd``, never following a
    link, stopping (with a problem) after ``entries_max`` entries or
    ``files_max`` files.  Never raises ``OSError``."""
    out = Walk()
    # Depth first, one open handle per level: at most ``levels_max`` handles.
    stack: list[tuple[int, str, list[os.DirEntry[str]]]] = []
    first = _listing(root_fd, "", out)
    if first is None:
        return out
    stack.append((-1, "", first))
    try:
        while stack:
            fd, rel, entries = stack[-1]
            if not entries:
                stack.pop()
                if fd >= 0:
                    os.close(fd)
                continue
            e = entries.pop()
            out.entries += 1
            if out.entries > entries_max:
                out.note(f"more than {entries_max} entries")
                break
            sub = f"{rel}/{e.name}" if rel else e.name
            try:
                st = e.stat(follow_symlinks=False)
            except OSError as exc:
                out.note(f"cannot stat an entry: {exc.strerror}")
                continue
            if stat.S_ISREG(st.st_mode):
                if _rel_bytes(sub) > rel_bytes_max:
                    out.note(f"an output path is longer than {rel_bytes_max} bytes")
                    continue
                out.files.append((sub, st.st_size))
                if len(out.files) > files_max:
                    out.note(f"more than {files_max} output files")
                    break
            elif stat.S_ISDIR(st.st_mode):
                if _rel_bytes(sub) > rel_bytes_max or len(stack) >= levels_max:
                    out.note(f"a directory is nested deeper than {rel_bytes_max} bytes of path")
                    continue
                parent = fd if fd >= 0 else root_fd
                try:
                    child = os.open(e.name, _DIR_FLAGS, dir_fd=parent)
                except OSError as exc:  # swapped for a link, removed, unreadable
                    out.note(f"cannot open a directory: {exc.strerror}")
                    continue
                listing = _listing(child, sub, out)
                if listing is None:
                    os.close(child)
                    continue
                stack.append((child, sub, listing))
    finally:
        for fd, _, _ in stack:
            if fd >= 0:
                os.close(fd)
    return out


def _listing(fd: int, rel: str, out: Walk) -> list[os.DirEntry[str]] | None:
    """The entries of directory ``fd``, reverse-sorted (popped in order)."""
    try:
        with os.scandir(fd) as it:
            entries = list(it)
    except OSError as exc:
        out.note(f"cannot list {rel or 'the work directory'}: {exc.strerror}")
        return None
    entries.sort(key=lambda e: e.name, reverse=True)
    return entries


def open_beneath(root_fd: int, rel: str, *, flags: int = _FILE_FLAGS) -> int:
    """Open ``rel`` (a relative POSIX path) under the directory ``root_fd``,
    each component without following links.  Raises ``OSError`` (``ELOOP``
    for a link, ``ENOENT``...) or ``ValueError`` for a path that leaves."""
    parts = rel.split("/")
    if not rel or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"bad relative path {rel[:64]!r}")
    fd = root_fd
    try:
        for p in parts[:-1]:
            nxt = os.open(p, _DIR_FLAGS, dir_fd=fd)
            if fd != root_fd:
                os.close(fd)
            fd = nxt
        return os.open(parts[-1], flags, dir_fd=fd)
    finally:
        if fd != root_fd:
            os.close(fd)


def make_dirs_beneath(root_fd: int, rel_dir: str, mode: int = 0o755) -> int:
    """Create (if needed) and open the directory ``rel_dir`` under
    ``root_fd`` without following links; the caller closes the handle."""
    fd = os.dup(root_fd)
    for p in (rel_dir.split("/") if rel_dir else []):
        if p in ("", ".", ".."):
            os.close(fd)
            raise ValueError(f"bad relative path {rel_dir[:64]!r}")
        try:
            os.mkdir(p, mode, dir_fd=fd)
        except FileExistsError:
            pass
        try:
            nxt = os.open(p, _DIR_FLAGS, dir_fd=fd)
        finally:
            os.close(fd)
        fd = nxt
    return fd


def remove_tree(path: str, *, entries_max: int = 10_000_000) -> str:
    """Delete ``path`` and everything under it through directory handles
    (no path length limit, links removed, never followed).  Returns "" or
    the first problem; never raises ``OSError``."""
    parent, name = os.path.split(os.path.abspath(path))
    try:
        pfd = os.open(parent, _DIR_FLAGS)
    except OSError as exc:
        return f"cannot open {parent}: {exc.strerror}"
    try:
        return _remove_beneath(pfd, name, entries_max)
    finally:
        os.close(pfd)


def _remove_beneath(pfd: int, name: str, entries_max: int) -> str:
    problem = ""
    removed = 0

    @dataclass
    class Frame:
        parent_fd: int
        name: str
        fd: int = -1
        subdirs: list[str] = field(default_factory=list)

    stack = [Frame(pfd, name)]
    while stack:
        top = stack[-1]
        if top.fd < 0:
            try:
                top.fd = os.open(top.name, _DIR_FLAGS, dir_fd=top.parent_fd)
            except FileNotFoundError:
                stack.pop()
                continue
            except OSError:  # not a directory (a link, a file): unlink it
                stack.pop()
                try:
                    os.unlink(top.name, dir_fd=top.parent_fd)
                    removed += 1
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    problem = problem or f"cannot remove an entry: {exc.strerror}"
                continue
            try:
                with os.scandir(top.fd) as it:
                    for e in it:
                        if removed > entries_max:
                            break
                        if e.is_dir(follow_symlinks=False):
                            top.subdirs.append(e.name)
                            continue
                        try:
                            os.unlink(e.name, dir_fd=top.fd)
                            removed += 1
                        except FileNotFoundError:
                            pass
                        except OSError as exc:
                            problem = problem or f"cannot remove an entry: {exc.strerror}"
            except OSError as exc:
                problem = problem or f"cannot list a directory: {exc.strerror}"
        if removed > entries_max:
            problem = problem or f"more than {entries_max} entries to remove"
            break
        if top.subdirs:
            stack.append(Frame(top.fd, top.subdirs.pop()))
            continue
        stack.pop()
        os.close(top.fd)
        try:
            os.rmdir(top.name, dir_fd=top.parent_fd)
            removed += 1
        except FileNotFoundError:
            pass
        except OSError as exc:
            problem = problem or f"cannot remove a directory: {exc.strerror}"
    for frame in stack:
        if frame.fd >= 0:
            os.close(frame.fd)
    return problem
