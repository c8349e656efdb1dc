"""The chunk tree of a blob: how each chunk is checked the moment it arrives.

A blob (a job input, an output, an image layer) is named by the SHA-256 of its
bytes, as manifests and OCI digests name it.  A whole-file hash can only be
checked at the end, so transfer uses a second name bound to the first: the
**tree root**.  The blob is cut into fixed-size chunks (``chunk_bytes``, 1 MiB
by default); leaf *i* is ``sha256(0x00 || chunk_i)``; inner nodes are
``sha256(0x01 || left || right)`` (an odd node is carried up unchanged, as in
RFC 6962); the root is ``sha256("p2pgpu/blobtree/v1\\0" || size as u64 ||
chunk_bytes as u32 || merkle root)``, so a tree names exactly one size and
one chunking.  Leaf and inner hashes are domain-separated, so one can never
pass for the other.

How the two names relate:

- ``p2pgpu job submit`` hashes a local file once and puts **both** in the
  manifest (``sha256``, ``size_bytes``, ``tree``).  A fetcher asks any
  provider for the leaf list, checks it against ``tree`` before using it, and
  then checks every chunk against its leaf as it arrives: one bad chunk is
  caught at once and its sender dropped.  The full SHA-256 is still checked
  before the blob enters the store (the job may rely on it).
- A blob named by ``sha256`` alone (a URL input, an OCI layer, a hand-written
  manifest) has no trusted root: the fetcher takes the leaf list of one
  provider, checks chunks against it (a chunk that does not match *that list*
  still drops its sender), and only the final SHA-256 decides; if it fails,
  the provider of the leaf list is dropped and nothing enters the store.

Everything here is pure (no I/O): the driver reads and hashes bytes and hands
the digests in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ._errors import PeerMisbehaved, Reason

#: Bytes per chunk (the last one may be shorter).
chunk_bytes_default = 1 << 20
chunk_bytes_min = 16 << 10
chunk_bytes_max = 4 << 20
#: The largest blob a tree may describe (the leaf list of 4 TiB at 1 MiB is 128 MiB:
#: nodes refuse far less through their own ``blob_bytes_max``).
blob_bytes_max = 1 << 42
HASH_BYTES = 32
_TREE_DOMAIN = b"p2pgpu/blobtree/v1\0"


def chunk_count(size: int, chunk_bytes: int = chunk_bytes_default) -> int:
    """How many chunks a blob of ``size`` bytes has (0 for an empty blob)."""
    if size < 0 or not chunk_bytes_min <= chunk_bytes <= chunk_bytes_max:
        raise ValueError("size must be >= 0 and chunk_bytes within limits")
    return -(-size // chunk_bytes)


def chunk_span(index: int, size: int, chunk_bytes: int = chunk_bytes_default) -> tuple[int, int]:
    """``(offset, length)`` of chunk ``index``."""
    n = chunk_count(size, chunk_bytes)
    if not 0 <= index < n:
        raise ValueError(f"chunk {index} out of 0..{n - 1}")
    offset = index * chunk_bytes
    return offset, min(chunk_bytes, size - offset)


def leaf_hash(chunk: bytes) -> bytes:
    h = hashlib.sha256(b"\x00")  # no copy of the chunk to prefix it
    h.update(chunk)
    return h.digest()


def merkle_root(leaves: list[bytes]) -> bytes:
    """The Merkle root over ``leaves`` (an odd node is carried up unchanged)."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    level = list(leaves)
    while len(level) > 1:
        nxt = [hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def tree_root(leaves: list[bytes], size: int, chunk_bytes: int = chunk_bytes_default) -> bytes:
    """The tree root that names a blob's chunking (see the module doc)."""
    if len(leaves) != chunk_count(size, chunk_bytes):
        raise ValueError("the leaf count does not match the size")
    return hashlib.sha256(_TREE_DOMAIN + size.to_bytes(8, "big") + chunk_bytes.to_bytes(4, "big")
                          + merkle_root(leaves)).digest()


class TreeHasher:
    """Feed a blob's bytes in any pieces; get its SHA-256 and its chunk tree."""

    def __init__(self, chunk_bytes: int = chunk_bytes_default) -> None:
        chunk_count(0, chunk_bytes)  # checks the chunk size
        self.chunk_bytes = chunk_bytes
        self.size = 0
        self._sha = hashlib.sha256()
        self._leaves: list[bytes] = []
        self._pending = bytearray()

    def update(self, data: bytes) -> None:
        self._sha.update(data)
        self.size += len(data)
        self._pending += data
        while len(self._pending) >= self.chunk_bytes:
            self._leaves.append(leaf_hash(bytes(self._pending[: self.chunk_bytes])))
            del self._pending[: self.chunk_bytes]

    def finish(self) -> BlobTree:
        if self._pending:
            self._leaves.append(leaf_hash(bytes(self._pending)))
            self._pending.clear()
        return BlobTree(sha256=self._sha.digest(), size=self.size, chunk_bytes=self.chunk_bytes,
                        leaves=tuple(self._leaves))


@dataclass(frozen=True, slots=True)
class BlobTree:
    """A blob's name, size and leaf hashes; checks itself when built."""

    sha256: bytes
    size: int
    chunk_bytes: int
    leaves: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if len(self.sha256) != HASH_BYTES or not 0 <= self.size <= blob_bytes_max:
            raise PeerMisbehaved(Reason.BAD_SCHEMA, "blob tree: bad sha256 or size")
        if not chunk_bytes_min <= self.chunk_bytes <= chunk_bytes_max:
            raise PeerMisbehaved(Reason.BAD_SCHEMA, "blob tree: chunk size out of range")
        if len(self.leaves) != chunk_count(self.size, self.chunk_bytes) or any(
                len(x) != HASH_BYTES for x in self.leaves):
            raise PeerMisbehaved(Reason.BAD_SCHEMA, "blob tree: the leaf count does not match the size")

    @property
    def root(self) -> bytes:
        return tree_root(list(self.leaves), self.size, self.chunk_bytes)

    @property
    def chunks(self) -> int:
        return len(self.leaves)

    def span(self, index: int) -> tuple[int, int]:
        return chunk_span(index, self.size, self.chunk_bytes)

    def check_chunk(self, index: int, data: bytes) -> None:
        """Raise ``PeerMisbehaved(BAD_CONTENT)`` unless ``data`` is chunk ``index``."""
        _, length = self.span(index)
        if len(data) != length or leaf_hash(data) != self.leaves[index]:
            raise PeerMisbehaved(Reason.BAD_CONTENT, f"chunk {index} does not match its hash")

    def check_root(self, root: bytes) -> None:
        """Raise ``PeerMisbehaved(BAD_CONTENT)`` unless this tree has ``root``."""
        if self.root != root:
            raise PeerMisbehaved(Reason.BAD_CONTENT, "the leaf list does not hash to the tree root")

    def to_obj(self) -> dict[str, object]:
        return {"sha256": self.sha256, "size": self.size, "chunk_bytes": self.chunk_bytes,
                "leaves": b"".join(self.leaves)}

    @classmethod
    def from_obj(cls, obj: object, *, size_max: int = blob_bytes_max) -> BlobTree:
        """A tree from a decoded wire map, or ``PeerMisbehaved``."""
        if not isinstance(obj, dict) or set(obj) != {"sha256", "size", "chunk_bytes", "leaves"}:
            raise PeerMisbehaved(Reason.BAD_SCHEMA, "blob tree must be {sha256, size, chunk_bytes, leaves}")
        sha, size, cb, leaves = obj["sha256"], obj["size"], obj["chunk_bytes"], obj["leaves"]
        if not (isinstance(sha, bytes) and type(size) is int and type(cb) is int and isinstance(leaves, bytes)):
            raise PeerMisbehaved(Reason.BAD_SCHEMA, "blob tree field types")
        if not 0 <= size <= size_max:
            raise PeerMisbehaved(Reason.OVERSIZED, f"blob of {size} bytes is over {size_max}")
        if len(leaves) % HASH_BYTES:
            raise PeerMisbehaved(Reason.BAD_SCHEMA, "leaves must be whole 32-byte hashes")
        return cls(sha256=sha, size=size, chunk_bytes=cb,
                   leaves=tuple(leaves[i:i + HASH_BYTES] for i in range(0, len(leaves), HASH_BYTES)))


def tree_of_bytes(data: bytes, chunk_bytes: int = chunk_bytes_default) -> BlobTree:
    """The tree of an in-memory blob (tests, small inline data)."""
    h = TreeHasher(chunk_bytes)
    h.update(data)
    return h.finish()
