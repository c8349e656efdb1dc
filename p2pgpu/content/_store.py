"""The content store: blobs by SHA-256 in the node's home, crash-safe, bounded.

Layout under the store's root (``<home>/blobs``)::

    data/<sha256 hex>      complete blobs, verified, mode 0444
    tree/<sha256 hex>      each blob's chunk tree (leaf hashes; core/_chunks.py)
    partial/<hex>.part     a download in progress (written at chunk offsets)
    partial/<hex>.have     which of its chunks are verified and on disk
    index.sqlite           size and last use of each blob; pins

Rules that make it crash-safe: a blob is only ever *renamed* into ``data/``,
after its bytes were written to a temporary name in the same directory,
fsynced, and their SHA-256 checked against its name; so whatever is in
``data/`` is whole and correct, and a crash leaves at worst a temporary file
(removed at the next open) or a partial.  A partial's ``.have`` record is
replaced (temp, fsync, rename) only after the chunks it lists were fsynced,
so a resumed download trusts exactly the chunks that reached the disk
verified.  Files are opened relative to directory handles with
``O_NOFOLLOW``, and the directories themselves without following links, so
a link planted in the store cannot make the node read or write elsewhere.

Limits: ``bytes_max`` for everything (blobs and partials), ``blob_bytes_max``
for one blob.  Making room evicts the least recently used blobs that no job
pins; if that is not enough the store refuses (:class:`StoreFull`) rather
than evict what a job needs.  Time comes in as ``now_ms`` arguments.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pgpu.core import decode, encode
from p2pgpu.core._chunks import BlobTree, TreeHasher, chunk_bytes_default
from p2pgpu.core._errors import PeerMisbehaved

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_COPY_BYTES = 1 << 20
#: Chunks written between two fsyncs of a partial's data and its ``.have`` record.
have_flush_chunks = 32
bytes_max_default = 64 << 30
blob_bytes_max_default = 16 << 30
pins_per_blob_max = 1024
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

Progress = Callable[[int, int], None]


class StoreError(Exception):
    """A local failure of the store (disk, a damaged file); the message says what."""


class StoreFull(StoreError):
    """There is no room for a blob without evicting what jobs need."""


class BlobMismatch(StoreError):
    """Bytes offered as a blob do not hash to its name (or exceed its size)."""


def check_hex(sha256: str) -> str:
    if not _HEX64.match(sha256):
        raise ValueError(f"not a sha256 in lowercase hex: {sha256[:70]!r}")
    return sha256


@dataclass(frozen=True, slots=True)
class BlobInfo:
    sha256: str
    size: int
    last_used_ms: int
    pins: int


def _open_dir(parent_fd: int | None, name: str | Path, *, create: bool) -> int:
    if create:
        try:
            os.mkdir(name, 0o700, dir_fd=parent_fd)
        except FileExistsError:
            pass
    return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)


class BlobStore:
    """Blobs by SHA-256 under ``root`` (see the module doc)."""

    def __init__(self, root: Path, *, bytes_max: int = bytes_max_default,
                 blob_bytes_max: int = blob_bytes_max_default, now_ms: int = 0) -> None:
        if bytes_max <= 0 or blob_bytes_max <= 0:
            raise ValueError("limits must be positive")
        self.root = Path(root)
        self.bytes_max = bytes_max
        self.blob_bytes_max = min(blob_bytes_max, bytes_max)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._root_fd = _open_dir(None, self.root, create=False)
        self._data_fd = _open_dir(self._root_fd, "data", create=True)
        self._tree_fd = _open_dir(self._root_fd, "tree", create=True)
        self._part_fd = _open_dir(self._root_fd, "partial", create=True)
        self.db = sqlite3.connect(self.root / "index.sqlite", isolation_level=None, check_same_thread=False)
        #: Fetches write from worker threads: one statement at a time.
        self._db_lock = threading.RLock()
        self._x("PRAGMA journal_mode=WAL")
        self._x("CREATE TABLE IF NOT EXISTS blobs (sha256 TEXT PRIMARY KEY, size INTEGER NOT NULL, "
                        "last_used_ms INTEGER NOT NULL)")
        self._x("CREATE TABLE IF NOT EXISTS pins (sha256 TEXT NOT NULL, owner TEXT NOT NULL, "
                        "PRIMARY KEY (sha256, owner))")
        # Which IPFS CID a blob was fetched as (inputs by CID: node/_bitswap.py),
        # so a later job naming the same CID starts from the store.
        self._x("CREATE TABLE IF NOT EXISTS cids (cid TEXT PRIMARY KEY, sha256 TEXT NOT NULL)")
        self._reconcile(now_ms)

    def _x(self, sql: str, args: tuple[object, ...] = ()) -> _Rows:
        with self._db_lock:
            return _Rows(self.db.execute(sql, args).fetchall())

    def close(self) -> None:
        self.db.close()
        for fd in (self._data_fd, self._tree_fd, self._part_fd, self._root_fd):
            os.close(fd)

    # ------------------------------------------------------------ recovery

    def _reconcile(self, now_ms: int) -> None:
        """After a crash: drop temporary files, index rows without a file, and
        files without a row (a crash between the rename and the insert leaves
        a complete blob: it is re-hashed and kept if it matches its name)."""
        for name in os.listdir(self._data_fd):
            if name.startswith(".tmp-"):
                os.unlink(name, dir_fd=self._data_fd)
        for name in os.listdir(self._part_fd):
            if ".tmp-" in name:
                os.unlink(name, dir_fd=self._part_fd)
        rows = {r[0] for r in self._x("SELECT sha256 FROM blobs")}
        files = {n for n in os.listdir(self._data_fd) if _HEX64.match(n)}
        for sha in sorted(rows - files):
            self._x("DELETE FROM blobs WHERE sha256 = ?", (sha,))
        for sha in sorted(files - rows):
            tree = self._hash_fd_file(self._data_fd, sha)
            if tree.sha256.hex() == sha:
                self._write_tree(tree)
                self._x("INSERT INTO blobs VALUES (?, ?, ?)", (sha, tree.size, now_ms))
            else:
                os.unlink(sha, dir_fd=self._data_fd)

    def _hash_fd_file(self, dir_fd: int, name: str, progress: Progress | None = None) -> BlobTree:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        with os.fdopen(fd, "rb") as f:
            total = os.fstat(f.fileno()).st_size
            h = TreeHasher()
            while chunk := f.read(_COPY_BYTES):
                h.update(chunk)
                if progress is not None:
                    progress(h.size, total)
        return h.finish()

    # ------------------------------------------------------------- queries

    def has(self, sha256: str) -> bool:
        return self._x("SELECT 1 FROM blobs WHERE sha256 = ?", (check_hex(sha256),)).fetchone() is not None

    def info(self, sha256: str) -> BlobInfo | None:
        row = self._x("SELECT size, last_used_ms, (SELECT COUNT(*) FROM pins p WHERE p.sha256 = b.sha256) "
                              "FROM blobs b WHERE sha256 = ?", (check_hex(sha256),)).fetchone()
        return None if row is None else BlobInfo(sha256=sha256, size=row[0], last_used_ms=row[1], pins=row[2])

    def blobs(self) -> list[BlobInfo]:
        rows = self._x("SELECT sha256, size, last_used_ms, (SELECT COUNT(*) FROM pins p "
                               "WHERE p.sha256 = b.sha256) FROM blobs b ORDER BY sha256").fetchall()
        return [BlobInfo(sha256=r[0], size=r[1], last_used_ms=r[2], pins=r[3]) for r in rows]

    def used_bytes(self) -> int:
        blobs = self._x("SELECT COALESCE(SUM(size), 0) FROM blobs").fetchone()[0]
        return int(blobs) + self._partial_bytes()

    def _partial_bytes(self) -> int:
        total = 0
        for name in os.listdir(self._part_fd):
            if name.endswith(".part"):
                total += os.stat(name, dir_fd=self._part_fd, follow_symlinks=False).st_size
        return total

    def tree(self, sha256: str) -> BlobTree | None:
        try:
            fd = os.open(check_hex(sha256), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._tree_fd)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as f:
            data = f.read(64 << 20)
        try:
            return BlobTree.from_obj(decode(data, size_max=64 << 20))
        except PeerMisbehaved as exc:
            raise StoreError(f"the chunk tree of {sha256[:12]} is damaged: {exc}") from None

    def _write_tree(self, tree: BlobTree) -> None:
        self._write_atomic(self._tree_fd, tree.sha256.hex(), encode(tree.to_obj()))

    @staticmethod
    def _write_atomic(dir_fd: int, name: str, data: bytes) -> None:
        tmp = f"{name}.tmp-{os.getpid()}-{threading.get_ident()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dir_fd)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)

    def open_blob(self, sha256: str) -> int:
        """A read-only descriptor of a complete blob (the caller closes it)."""
        try:
            return os.open(check_hex(sha256), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._data_fd)
        except FileNotFoundError:
            raise StoreError(f"blob {sha256[:12]} is not in the store") from None

    def blob_path(self, sha256: str) -> Path:
        """Where a complete blob lives (for binding it read-only into a sandbox)."""
        return self.root / "data" / check_hex(sha256)

    def touch(self, sha256: str, now_ms: int) -> None:
        self._x("UPDATE blobs SET last_used_ms = ? WHERE sha256 = ?", (now_ms, check_hex(sha256)))

    # ---------------------------------------------------------------- pins

    def pin(self, sha256: str, owner: str) -> None:
        """Keep ``sha256`` from eviction until ``owner`` (a job id) unpins it."""
        self._x("INSERT OR IGNORE INTO pins VALUES (?, ?)", (check_hex(sha256), owner))

    def pin_owners(self, prefix: str, *, limit: int) -> list[str]:
        """Owners of pins that start with ``prefix`` (at most ``limit``)."""
        rows = self._x("SELECT DISTINCT owner FROM pins WHERE substr(owner, 1, ?) = ? ORDER BY owner LIMIT ?",
                       (len(prefix), prefix, limit))
        return [r[0] for r in rows]

    def unpin(self, owner: str) -> None:
        self._x("DELETE FROM pins WHERE owner = ?", (owner,))

    # ----------------------------------------------------------- IPFS CIDs

    def note_cid(self, cid: str, sha256: str) -> None:
        """Remember that the file IPFS names ``cid`` is blob ``sha256`` (after
        every block of it was checked against its CID)."""
        self._x("INSERT OR REPLACE INTO cids VALUES (?, ?)", (cid, check_hex(sha256)))

    def blob_of_cid(self, cid: str, size: int) -> BlobTree | None:
        """The blob fetched as ``cid``, if it is still here and ``size`` bytes."""
        row = self._x("SELECT c.sha256 FROM cids c JOIN blobs b ON b.sha256 = c.sha256 WHERE c.cid = ? AND b.size = ?",
                      (cid, size)).fetchone()
        return self.tree(row[0]) if row is not None else None

    # ------------------------------------------------------------ eviction

    def reserve(self, size: int, now_ms: int, *, keep: tuple[str, ...] = ()) -> list[str]:
        """Make room for ``size`` more bytes by evicting the least recently
        used unpinned blobs; return what was evicted, or raise :class:`StoreFull`."""
        if size > self.blob_bytes_max:
            raise StoreFull(f"a blob of {size} bytes is over this node's limit of {self.blob_bytes_max} bytes")
        used = self.used_bytes()
        if used + size <= self.bytes_max:
            return []
        candidates = self._x(
            "SELECT sha256, size FROM blobs b WHERE NOT EXISTS (SELECT 1 FROM pins p WHERE p.sha256 = b.sha256) "
            "ORDER BY last_used_ms, sha256").fetchall()
        plan, freed = [], 0
        for sha, sz in candidates:
            if used - freed + size <= self.bytes_max:
                break
            if sha in keep:
                continue
            plan.append(sha)
            freed += sz
        if used - freed + size > self.bytes_max:
            raise StoreFull(f"no room for {size} bytes: {used} of {self.bytes_max} bytes are used and only "
                            f"{freed} could be freed without touching blobs that jobs need")
        for sha in plan:
            self.remove(sha)
        return plan

    def remove(self, sha256: str) -> None:
        check_hex(sha256)
        self._x("DELETE FROM blobs WHERE sha256 = ?", (sha256,))
        self._x("DELETE FROM pins WHERE sha256 = ?", (sha256,))
        self._x("DELETE FROM cids WHERE sha256 = ?", (sha256,))
        for fd in (self._data_fd, self._tree_fd):
            try:
                os.unlink(sha256, dir_fd=fd)
            except FileNotFoundError:
                pass

    # ------------------------------------------------- adding whole blobs

    @contextmanager
    def incoming(self, sha256: str | None, size: int | None, now_ms: int) -> Iterator[Incoming]:
        """Write a blob's bytes in order; on leaving the block it is checked
        and committed (or, on any error, its temporary file removed).  With
        ``sha256``/``size`` given, bytes beyond ``size`` or a wrong hash raise
        :class:`BlobMismatch` and nothing enters the store."""
        if sha256 is not None:
            check_hex(sha256)
        if size is not None:
            self.reserve(size, now_ms, keep=(sha256,) if sha256 else ())
        size_max = size if size is not None else self.blob_bytes_max
        tmp = f".tmp-{os.getpid()}-{os.urandom(6).hex()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=self._data_fd)
        inc = Incoming(fd=fd, size_max=size_max)
        try:
            yield inc
            tree = inc.finish()
            if size is not None and tree.size != size:
                raise BlobMismatch(f"got {tree.size} bytes, expected {size}")
            if sha256 is not None and tree.sha256.hex() != sha256:
                raise BlobMismatch(f"content hashes to {tree.sha256.hex()}, not {sha256}")
            if size is None:
                self.reserve(tree.size, now_ms)
            self._commit(tmp, tree, now_ms)
            inc.tree = tree
        except BaseException:
            inc.close()
            try:
                os.unlink(tmp, dir_fd=self._data_fd)
            except FileNotFoundError:
                pass
            raise

    def _commit(self, tmp: str, tree: BlobTree, now_ms: int) -> None:
        sha = tree.sha256.hex()
        os.chmod(tmp, 0o444, dir_fd=self._data_fd)  # our own O_EXCL file, never a link
        self._write_tree(tree)
        os.replace(tmp, sha, src_dir_fd=self._data_fd, dst_dir_fd=self._data_fd)
        os.fsync(self._data_fd)
        self._x("INSERT OR REPLACE INTO blobs VALUES (?, ?, ?)", (sha, tree.size, now_ms))

    def import_file(self, path: Path, now_ms: int, *, sha256: str | None = None,
                    progress: Progress | None = None) -> BlobTree:
        """Copy a local file into the store (hashing it as it goes)."""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise StoreError(f"{path} is not a regular file")
            if sha256 is not None and self.has(sha256):
                self.touch(sha256, now_ms)
                tree = self.tree(sha256)
                if tree is not None:
                    return tree
            with self.incoming(sha256, st.st_size, now_ms) as inc:
                while chunk := f.read(_COPY_BYTES):
                    inc.write(chunk)
                    if progress is not None:
                        progress(inc.hasher.size, st.st_size)
        assert inc.tree is not None
        return inc.tree

    # ----------------------------------------------------------- partials

    def partial(self, tree: BlobTree) -> Partial:
        """The download of ``tree``'s blob: resumed from what is on disk when
        a partial of the same tree exists, else started afresh (room is
        reserved for the whole blob first)."""
        sha = tree.sha256.hex()
        have: set[int] = set()
        try:
            fd = os.open(f"{sha}.have", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._part_fd)
            with os.fdopen(fd, "rb") as f:
                rec = decode(f.read(64 << 20), size_max=64 << 20)
            old = BlobTree.from_obj(rec["tree"])
            bits = rec["have"]
            if old == tree and isinstance(bits, bytes):
                have = {i for i in range(tree.chunks) if bits[i >> 3] >> (i & 7) & 1}
        except (FileNotFoundError, PeerMisbehaved, KeyError, TypeError, IndexError):
            have = set()
        exists = True
        try:
            os.stat(f"{sha}.part", dir_fd=self._part_fd, follow_symlinks=False)
        except FileNotFoundError:
            exists = False
        if not have or not exists:
            self.drop_partial(sha)
            self.reserve(tree.size, 0)
            have = set()
        fd = os.open(f"{sha}.part", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=self._part_fd)
        if os.fstat(fd).st_size != tree.size:
            os.ftruncate(fd, tree.size)
        return Partial(store=self, tree=tree, fd=fd, have=have)

    def drop_partial(self, sha256: str) -> None:
        for suffix in (".part", ".have"):
            try:
                os.unlink(check_hex(sha256) + suffix, dir_fd=self._part_fd)
            except FileNotFoundError:
                pass

    def partial_have(self, sha256: str) -> tuple[BlobTree, set[int]] | None:
        """A partial's tree and verified chunks, for serving what we have so far."""
        try:
            fd = os.open(f"{check_hex(sha256)}.have", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=self._part_fd)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as f:
            try:
                rec = decode(f.read(64 << 20), size_max=64 << 20)
                tree = BlobTree.from_obj(rec["tree"])
                bits = rec["have"]
                return tree, {i for i in range(tree.chunks) if bits[i >> 3] >> (i & 7) & 1}
            except (PeerMisbehaved, KeyError, TypeError, IndexError):
                return None

    def read_partial_chunk(self, sha256: str, offset: int, length: int) -> bytes:
        fd = os.open(f"{check_hex(sha256)}.part", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._part_fd)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)


class _Rows:
    def __init__(self, rows: list[tuple[object, ...]]) -> None:
        self.rows = rows

    def fetchone(self) -> Any:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[Any]:
        return self.rows

    def __iter__(self) -> Iterator[Any]:
        return iter(self.rows)


class Incoming:
    """A blob being written in order (see :meth:`BlobStore.incoming`)."""

    def __init__(self, *, fd: int, size_max: int) -> None:
        self.fd = fd
        self.size_max = size_max
        self.hasher = TreeHasher(chunk_bytes_default)
        self.tree: BlobTree | None = None

    def write(self, data: bytes) -> None:
        if self.hasher.size + len(data) > self.size_max:
            raise BlobMismatch(f"more than the {self.size_max} bytes expected")
        self.hasher.update(data)
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def finish(self) -> BlobTree:
        os.fsync(self.fd)
        self.close()
        return self.hasher.finish()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Partial:
    """A chunked download on disk: chunks written at their offsets, the
    verified set recorded crash-safely, committed once the SHA-256 checks."""

    def __init__(self, *, store: BlobStore, tree: BlobTree, fd: int, have: set[int]) -> None:
        self.store = store
        self.tree = tree
        self.fd = fd
        self.have = set(have)
        self._unsynced = 0
        #: Fetch workers write chunks from several threads.
        self._lock = threading.Lock()

    @property
    def sha256(self) -> str:
        return self.tree.sha256.hex()

    def write_chunk(self, index: int, data: bytes) -> None:
        """Write a chunk that was already checked against its leaf."""
        offset, length = self.tree.span(index)
        if len(data) != length:
            raise ValueError("chunk length")
        view, pos = memoryview(data), offset
        while view:
            n = os.pwrite(self.fd, view, pos)
            view, pos = view[n:], pos + n
        with self._lock:
            self.have.add(index)
            self._unsynced += 1
            due = self._unsynced >= have_flush_chunks
        if due:
            self.flush()

    def flush(self) -> None:
        """fsync the data, then record what is verified (in that order): only
        chunks whose bytes were written before the fsync are recorded."""
        with self._lock:
            if self.fd < 0:
                return
            snapshot = set(self.have)
            self._unsynced = 0
        os.fsync(self.fd)
        bits = bytearray((self.tree.chunks + 7) // 8)
        for i in snapshot:
            bits[i >> 3] |= 1 << (i & 7)
        self.store._write_atomic(self.store._part_fd, f"{self.sha256}.have",
                                 encode({"tree": self.tree.to_obj(), "have": bytes(bits)}))

    def close(self) -> None:
        if self.fd >= 0:
            try:
                self.flush()
            finally:
                os.close(self.fd)
                self.fd = -1

    def commit(self, now_ms: int, *, prefix: tuple[Any, int] | None = None) -> BlobTree:
        """Check the whole blob's SHA-256 and move it into the store; on a
        mismatch the partial is deleted and :class:`BlobMismatch` raised.
        ``prefix``: a SHA-256 hasher already fed the file's first bytes, and
        how many (the fetcher hashes chunks in order as they arrive, so the
        end of a download does not read the whole file back)."""
        if len(self.have) != self.tree.chunks:
            raise StoreError("commit before every chunk arrived")
        os.fsync(self.fd)
        h, start = (prefix[0].copy(), prefix[1]) if prefix is not None else (hashlib.sha256(), 0)
        if not 0 <= start <= self.tree.size:
            raise ValueError("prefix beyond the blob")
        os.lseek(self.fd, start, os.SEEK_SET)
        while chunk := os.read(self.fd, _COPY_BYTES):
            h.update(chunk)
        os.close(self.fd)
        self.fd = -1
        sha = self.sha256
        if h.digest() != self.tree.sha256:
            self.store.drop_partial(sha)
            raise BlobMismatch(f"the assembled blob hashes to {h.hexdigest()}, not {sha}")
        st = self.store
        tmp = f".tmp-{os.getpid()}-{os.urandom(6).hex()}"
        try:
            os.rename(f"{sha}.part", tmp, src_dir_fd=st._part_fd, dst_dir_fd=st._data_fd)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            raise StoreError("partial and data directories must be on one file system") from None
        st._commit(tmp, self.tree, now_ms)
        st.drop_partial(sha)
        return self.tree
