"""Unpack OCI image layers safely into a root file system.

A layer is a tar archive (gzip-compressed or not) that a stranger made.  The
rules follow what umoci and containerd do (``fs.RootPath`` / securejoin): every
entry is placed *inside* the root, whatever its name or the links already
there.

- A name with a ``..`` component or an absolute name is refused: the image is
  refused (:class:`UnsafeLayer`), not cleaned up and used.
- Parent directories are walked one component at a time.  A symbolic link met
  on the way is resolved **inside** the root (an absolute target starts at the
  root, ``..`` stops at the root), at most ``link_hops_max`` times, as the
  kernel would resolve it in the sandbox; it can never lead out.  The entry
  itself is never followed: an existing file, link or tree at its place is
  removed first.
- Hard links must name a regular file already unpacked inside the root.
- Character and block devices are refused; FIFOs are skipped.  Set-uid and
  set-gid bits are dropped; owners are not kept (the job runs as one user).
- Whiteouts: ``.wh.NAME`` deletes ``NAME`` from the layers below;
  ``.wh..wh..opq`` empties its directory of what the layers below put there.
- Limits: entries per layer, bytes unpacked in all, path length.

Symbolic links are created as they are (an absolute target is correct inside
the sandbox, where the root is this directory).
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

link_hops_max = 40
entries_per_layer_max = 500_000
path_bytes_max = 4096
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
_COPY_BYTES = 1 << 20


class UnsafeLayer(Exception):
    """A layer tries to escape its root, or breaks a limit; the image is refused."""


@dataclass
class UnpackLimits:
    bytes_max: int = 64 << 30
    entries_max: int = entries_per_layer_max


@dataclass
class _State:
    root: str
    limits: UnpackLimits
    written: int = 0
    #: Paths (relative, resolved) this layer created: an opaque marker spares them.
    created: set[str] = field(default_factory=set)


def _clean_name(name: str) -> list[str]:
    if len(name.encode("utf-8", "surrogateescape")) > path_bytes_max or "\0" in name:
        raise UnsafeLayer(f"entry name too long or with NUL: {name[:80]!r}")
    if name.startswith("/"):
        raise UnsafeLayer(f"absolute path in a layer: {name[:80]!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeLayer(f"'..' in a layer path: {name[:80]!r}")
    return parts


def _resolve_dir(st: _State, parts: list[str], *, create: bool) -> list[str]:
    """The components of directory ``parts`` resolved inside the root,
    following links the way the sandbox would, never above the root.  Missing
    directories are made when ``create``."""
    resolved: list[str] = []
    todo = list(parts)
    hops = 0
    while todo:
        comp = todo.pop(0)
        if comp in ("", "."):
            continue
        if comp == "..":
            if resolved:
                resolved.pop()
            continue
        cand = resolved + [comp]
        path = os.path.join(st.root, *cand)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            if not create:
                raise UnsafeLayer(f"no directory {'/'.join(cand)!r} in the image") from None
            os.mkdir(path, 0o755)
            resolved = cand
            continue
        if stat.S_ISLNK(info.st_mode):
            hops += 1
            if hops > link_hops_max:
                raise UnsafeLayer(f"too many links resolving {'/'.join(parts)!r}")
            target = os.readlink(path)
            tparts = target.split("/")
            if target.startswith("/"):
                resolved = []
            todo = tparts + todo
            continue
        if not stat.S_ISDIR(info.st_mode):
            raise UnsafeLayer(f"{'/'.join(cand)!r} is not a directory, but a layer puts files under it")
        resolved = cand
    return resolved


def _remove(path: str) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _mode(mode: int) -> int:
    return stat.S_IMODE(mode) & ~(stat.S_ISUID | stat.S_ISGID)


def _entries(fileobj: IO[bytes], limits: UnpackLimits) -> Iterator[tuple[tarfile.TarInfo, tarfile.TarFile]]:
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for n, ti in enumerate(tar):
                if n >= limits.entries_max:
                    raise UnsafeLayer(f"more than {limits.entries_max} entries in a layer")
                yield ti, tar
    except tarfile.TarError as exc:
        raise UnsafeLayer(f"not a valid tar layer: {exc}") from None


def unpack_layer(fileobj: IO[bytes], root: Path, limits: UnpackLimits | None = None, *,
                 already_written: int = 0) -> int:
    """Apply one layer to ``root``; return the bytes written so far (all
    layers, when ``already_written`` carries the previous layers' count).
    Raises :class:`UnsafeLayer`."""
    st = _State(root=str(root), limits=limits or UnpackLimits(), written=already_written)
    for ti, tar in _entries(fileobj, st.limits):
        parts = _clean_name(ti.name)
        if not parts:
            continue  # the root itself
        base = parts[-1]
        parent = _resolve_dir(st, parts[:-1], create=True)
        pdir = os.path.join(st.root, *parent)
        rel = "/".join(parent + [base])
        if base == OPAQUE:
            for name in os.listdir(pdir):
                if "/".join(parent + [name]) not in st.created:
                    _remove(os.path.join(pdir, name))
            continue
        if base.startswith(WHITEOUT):
            victim = base[len(WHITEOUT):]
            if victim in ("", ".", ".."):
                raise UnsafeLayer(f"bad whiteout {ti.name[:80]!r}")
            _remove(os.path.join(pdir, victim))
            continue
        dest = os.path.join(pdir, base)
        if ti.isdir():
            try:
                info = os.lstat(dest)
                if not stat.S_ISDIR(info.st_mode):
                    _remove(dest)
                    os.mkdir(dest, 0o755)
            except FileNotFoundError:
                os.mkdir(dest, 0o755)
            os.chmod(dest, _mode(ti.mode) | 0o700)
            st.created.add(rel)
            continue
        if ti.ischr() or ti.isblk():
            raise UnsafeLayer(f"device file in a layer: {ti.name[:80]!r}")
        if ti.isfifo():
            continue
        _remove(dest)
        st.created.add(rel)
        if ti.issym():
            if len(ti.linkname) > path_bytes_max or "\0" in ti.linkname:
                raise UnsafeLayer("link target too long")
            os.symlink(ti.linkname, dest)
        elif ti.islnk():
            tparts = _clean_name(ti.linkname)
            if not tparts:
                raise UnsafeLayer("hard link to the root")
            tparent = _resolve_dir(st, tparts[:-1], create=False)
            src = os.path.join(st.root, *tparent, tparts[-1])
            try:
                info = os.lstat(src)
            except FileNotFoundError:
                raise UnsafeLayer(f"hard link to a missing file {ti.linkname[:80]!r}") from None
            if not stat.S_ISREG(info.st_mode):
                raise UnsafeLayer(f"hard link to something other than a file: {ti.linkname[:80]!r}")
            os.link(src, dest, follow_symlinks=False)
        elif ti.isreg():
            st.written += ti.size
            if st.written > st.limits.bytes_max:
                raise UnsafeLayer(f"the image unpacks to more than {st.limits.bytes_max} bytes")
            src_f = tar.extractfile(ti)
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as out:
                if src_f is not None:
                    shutil.copyfileobj(src_f, out, _COPY_BYTES)
            os.chmod(dest, _mode(ti.mode))
        else:
            continue  # other types (sparse, GNU extensions) carry nothing we need
    return st.written
