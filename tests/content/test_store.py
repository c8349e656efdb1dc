"""The content store on a real file system and real SQLite: crash safety,
eviction with pins, limits, links refused, resumable partials."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from p2pgpu.content import BlobMismatch, BlobStore, StoreError, StoreFull
from p2pgpu.core._chunks import tree_of_bytes


def blob(n: int, seed: int = 0) -> bytes:
    return hashlib.sha256(bytes([seed])).digest() * (n // 32) + b"\x01" * (n % 32)


def put(store: BlobStore, data: bytes, now: int = 0) -> str:
    sha = hashlib.sha256(data).hexdigest()
    with store.incoming(sha, len(data), now) as inc:
        inc.write(data)
    return sha


def test_incoming_commits_only_a_matching_blob(tmp_path: Path) -> None:
    s = BlobStore(tmp_path / "b")
    data = blob(3 << 20)
    sha = put(s, data)
    assert s.has(sha) and s.info(sha).size == len(data)
    fd = s.open_blob(sha)
    try:
        assert os.pread(fd, 10, 5) == data[5:15]
    finally:
        os.close(fd)
    assert s.tree(sha) == tree_of_bytes(data)
    assert oct(os.stat(s.blob_path(sha)).st_mode & 0o777) == "0o444"
    # Wrong content for a name: refused, and no file of any kind is left behind.
    wrong = "0" * 64
    with pytest.raises(BlobMismatch), s.incoming(wrong, 5, 0) as inc:
        inc.write(b"hello")
    assert not s.has(wrong)
    assert sorted(os.listdir(tmp_path / "b" / "data")) == [sha]
    # More bytes than announced: refused as they arrive.
    with pytest.raises(BlobMismatch), s.incoming(sha, 4, 0) as inc:
        inc.write(b"hello")
    assert sorted(os.listdir(tmp_path / "b" / "data")) == [sha]


def test_oversized_blob_refused_before_writing(tmp_path: Path) -> None:
    s = BlobStore(tmp_path / "b", bytes_max=10 << 20, blob_bytes_max=1 << 20)
    with pytest.raises(StoreFull, match="over this node's limit"), s.incoming("1" * 64, 2 << 20, 0):
        pass
    assert os.listdir(tmp_path / "b" / "data") == []


def test_lru_eviction_spares_pinned_blobs(tmp_path: Path) -> None:
    s = BlobStore(tmp_path / "b", bytes_max=3 << 20)
    a = put(s, blob(1 << 20, 1), now=1)
    b = put(s, blob(1 << 20, 2), now=2)
    c = put(s, blob(1 << 20, 3), now=3)
    s.pin(a, "job-1")          # the oldest, but a job needs it
    s.touch(b, 10)              # used recently
    d = put(s, blob(1 << 20, 4), now=11)
    assert [x.sha256 for x in s.blobs()] == sorted([a, b, d])   # c (least recently used, unpinned) went
    assert not s.has(c)
    s.pin(b, "job-2")
    s.pin(d, "job-2")
    with pytest.raises(StoreFull, match="jobs need"):
        put(s, blob(1 << 20, 5), now=12)
    s.unpin("job-1")
    put(s, blob(1 << 20, 5), now=13)
    assert not s.has(a)


def test_crash_leftovers_are_cleaned_and_an_unindexed_blob_is_rechecked(tmp_path: Path) -> None:
    root = tmp_path / "b"
    s = BlobStore(root)
    good = put(s, blob(100_000, 1))
    s.close()
    # A crash mid-write leaves a temporary file; a crash between the rename
    # and the index insert leaves a complete blob without a row; a forged
    # file under a name it does not hash to must not survive either.
    (root / "data" / ".tmp-123-abc").write_bytes(b"half a blob")
    data2 = blob(50_000, 2)
    sha2 = hashlib.sha256(data2).hexdigest()
    (root / "data" / sha2).write_bytes(data2)
    (root / "data" / ("f" * 64)).write_bytes(b"not what the name says")
    s = BlobStore(root)
    assert sorted(os.listdir(root / "data")) == sorted([good, sha2])
    assert s.has(good) and s.has(sha2) and not s.has("f" * 64)
    assert s.tree(sha2) == tree_of_bytes(data2)


def test_partial_resumes_exactly_the_flushed_chunks(tmp_path: Path) -> None:
    data = blob(5 << 20, 7)
    tree = tree_of_bytes(data)
    s = BlobStore(tmp_path / "b")
    p = s.partial(tree)
    for i in (0, 1, 3):
        off, n = tree.span(i)
        p.write_chunk(i, data[off:off + n])
    p.flush()
    off, n = tree.span(4)
    p.write_chunk(4, data[off:off + n])  # written, never flushed: a crash now loses it
    os.close(p.fd)                        # the process dies: no close(), no flush
    s2 = BlobStore(tmp_path / "b")
    p2 = s2.partial(tree)
    assert p2.have == {0, 1, 3}
    assert s2.partial_have(tree.sha256.hex())[1] == {0, 1, 3}
    for i in (2, 4):
        off, n = tree.span(i)
        p2.write_chunk(i, data[off:off + n])
    p2.commit(now_ms=5)
    assert s2.has(tree.sha256.hex()) and s2.partial_have(tree.sha256.hex()) is None
    assert os.listdir(tmp_path / "b" / "partial") == []


def test_partial_with_wrong_bytes_never_becomes_a_blob(tmp_path: Path) -> None:
    data = blob(2 << 20, 8)
    honest = tree_of_bytes(data)
    # A leaf list made for other bytes under this blob's name (a lying provider).
    forged = type(honest)(sha256=honest.sha256, size=honest.size, chunk_bytes=honest.chunk_bytes,
                          leaves=tree_of_bytes(blob(2 << 20, 9)).leaves)
    s = BlobStore(tmp_path / "b")
    p = s.partial(forged)
    other = blob(2 << 20, 9)
    for i in range(forged.chunks):
        off, n = forged.span(i)
        p.write_chunk(i, other[off:off + n])
    with pytest.raises(BlobMismatch):
        p.commit(now_ms=1)
    assert not s.has(honest.sha256.hex())
    assert os.listdir(tmp_path / "b" / "partial") == [] and os.listdir(tmp_path / "b" / "data") == []


def test_commit_continues_a_prefix_hash_and_still_refuses_a_wrong_one(tmp_path: Path) -> None:
    """The fetcher hashes chunks in order as they arrive (``prefix``); the
    commit hashes only the rest, and a prefix hash of other bytes still
    fails the whole SHA-256: nothing is kept."""
    data = blob(3 << 20, 11)
    tree = tree_of_bytes(data)
    for prefix_bytes, honest in ((1 << 20, True), (len(data), True), (0, True), (1 << 20, False)):
        s = BlobStore(tmp_path / f"b{prefix_bytes}{honest}")
        p = s.partial(tree)
        for i in range(tree.chunks):
            off, n = tree.span(i)
            p.write_chunk(i, data[off:off + n])
        h = hashlib.sha256(data[:prefix_bytes] if honest else blob(prefix_bytes, 12))
        if honest:
            assert p.commit(now_ms=1, prefix=(h, prefix_bytes)).sha256 == tree.sha256
            assert s.has(tree.sha256.hex())
        else:
            with pytest.raises(BlobMismatch):
                p.commit(now_ms=1, prefix=(h, prefix_bytes))
            assert not s.has(tree.sha256.hex()) and os.listdir(s.root / "partial") == []


def test_links_in_the_store_are_not_followed(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"node key")
    s = BlobStore(tmp_path / "b")
    sha = hashlib.sha256(b"node key").hexdigest()
    os.symlink(secret, tmp_path / "b" / "data" / sha)
    s.db.execute("INSERT INTO blobs VALUES (?, 8, 0)", (sha,))
    with pytest.raises(OSError):
        s.open_blob(sha)
    # A store directory replaced by a link is refused when the store opens.
    s.close()
    os.rename(tmp_path / "b" / "tree", tmp_path / "b" / "tree.old")
    os.symlink(tmp_path, tmp_path / "b" / "tree")
    with pytest.raises(OSError):
        BlobStore(tmp_path / "b")


def test_import_file_refuses_links_and_hashes(tmp_path: Path) -> None:
    f = tmp_path / "in.bin"
    f.write_bytes(blob(70_000, 3))
    s = BlobStore(tmp_path / "b")
    seen: list[int] = []
    t = s.import_file(f, 0, progress=lambda done, total: seen.append(done))
    assert t.sha256 == hashlib.sha256(f.read_bytes()).digest() and seen[-1] == 70_000
    os.symlink(f, tmp_path / "link")
    with pytest.raises(OSError):
        s.import_file(tmp_path / "link", 0)
    with pytest.raises(BlobMismatch):
        s.import_file(f, 0, sha256="2" * 64)
    with pytest.raises(ValueError):
        s.has("../../etc/passwd")
    with pytest.raises(StoreError):
        s.open_blob("3" * 64)
