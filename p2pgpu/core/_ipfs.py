"""IPFS content by CID: CIDs, dag-pb and UnixFS decoding, and the walk of a
file's DAG, as a pure core (no I/O, no clock).

A manifest input ``{ cid = "bafy...", size_bytes = N, providers = [...] }``
names a file the way IPFS does: a raw block, or a UnixFS file whose root is a
dag-pb node linking to more nodes and, at the bottom, raw leaves (what
Helia's ``unixfs.addBytes`` writes).  The node's Bitswap driver
(``node/_bitswap.py``) asks providers for the CIDs :meth:`DagWalk.wants`
names and hands every block that arrives to :meth:`DagWalk.on_block`, which
checks its hash against the CID that named it, decodes it, and returns the
file's bytes strictly in order, so the driver can write them straight into
the content store.

Everything a provider sends is hostile until checked: a block that hashes to
no CID we asked for, a node that is not a UnixFS file, a DAG deeper than
``depth_max`` or a node with more than ``links_per_node_max`` links, more
than ``blocks_max`` blocks in all, a block over ``block_bytes_max``, sizes
that do not add up (the root's file size against the manifest's
``size_bytes``, each child's length against the size its parent declared):
each raises :class:`PeerMisbehaved` with a reason, before anything beyond
the checked prefix of the file is returned.  Memory is bounded by the
``window`` blocks wanted at once; the queue of blocks still to fetch by
``blocks_max``.  Only sha2-256 CIDs (v0 and v1, codecs raw and dag-pb) are
accepted: what IPFS implementations write by default.
"""

from __future__ import annotations

import hashlib
from collections import Counter, deque
from dataclasses import dataclass

from ._errors import PeerMisbehaved, Reason

CODEC_RAW = 0x55
CODEC_DAG_PB = 0x70
_SHA2_256 = 0x12
#: Longest CID text accepted (a v1 base32 sha2-256 CID is 59 characters).
cid_len_max = 100
#: Bitswap's largest block (the spec's 2 MiB); IPFS writes 256 KiB or 1 MiB leaves.
block_bytes_max = 2 << 20
#: Levels below the root (Helia's balanced layout: 3 for 1 GiB at 256 KiB leaves).
depth_max = 16
#: Links of one dag-pb node (Helia and Kubo write 174 or 1024).
links_per_node_max = 4096
#: Blocks of one file, the root included (64 GiB at 256 KiB leaves).
blocks_max = 262_144
#: Blocks asked for and not yet used, at most (bounds memory: ``window * block_bytes_max``).
window_default = 32

_B32 = "abcdefghijklmnopqrstuvwxyz234567"
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def _uvarint(buf: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for i in range(10):
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            return value, pos
    raise ValueError("varint longer than 10 bytes")


def put_uvarint(n: int) -> bytes:
    """``n`` as an unsigned LEB128 varint (multiformats; libp2p's length prefixes too)."""
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


@dataclass(frozen=True, slots=True)
class Cid:
    """A sha2-256 CID: ``version`` 0 or 1, ``codec`` raw or dag-pb, ``digest`` 32 bytes."""

    version: int
    codec: int
    digest: bytes

    def __post_init__(self) -> None:
        if self.version not in (0, 1) or len(self.digest) != 32:
            raise ValueError("a CID of version 0 or 1 with a 32-byte sha2-256 digest")
        if self.codec not in (CODEC_RAW, CODEC_DAG_PB) or (self.version == 0 and self.codec != CODEC_DAG_PB):
            raise ValueError(f"codec 0x{self.codec:x} (only raw 0x55 and dag-pb 0x70 are read)")

    def to_bytes(self) -> bytes:
        mh = bytes([_SHA2_256, 32]) + self.digest
        return mh if self.version == 0 else put_uvarint(1) + put_uvarint(self.codec) + mh

    def prefix(self) -> bytes:
        """Bitswap 1.1's block prefix: version, codec, hash function, length."""
        return bytes([self.version]) + put_uvarint(self.codec) + bytes([_SHA2_256, 32])

    def __str__(self) -> str:
        if self.version == 0:
            return _b58encode(self.to_bytes())
        return "b" + _b32encode(self.to_bytes())

    @classmethod
    def from_bytes(cls, raw: bytes) -> Cid:
        """A binary CID (as dag-pb links carry them); ``ValueError`` if not one we read."""
        if len(raw) == 34 and raw[0] == _SHA2_256 and raw[1] == 32:
            return cls(version=0, codec=CODEC_DAG_PB, digest=raw[2:])
        version, pos = _uvarint(raw, 0)
        codec, pos = _uvarint(raw, pos)
        fn, pos = _uvarint(raw, pos)
        length, pos = _uvarint(raw, pos)
        if version != 1 or fn != _SHA2_256 or length != 32 or len(raw) != pos + 32:
            raise ValueError("a CIDv1 with a sha2-256 multihash")
        return cls(version=1, codec=codec, digest=raw[pos:])

    @classmethod
    def from_prefix(cls, prefix: bytes, data: bytes) -> Cid:
        """The CID of a Bitswap 1.1 block: its prefix and the hash of its bytes."""
        version, pos = _uvarint(prefix, 0)
        codec, pos = _uvarint(prefix, pos)
        fn, pos = _uvarint(prefix, pos)
        length, pos = _uvarint(prefix, pos)
        if fn != _SHA2_256 or length != 32 or pos != len(prefix):
            raise ValueError("a block prefix that is not sha2-256")
        return cls(version=version, codec=codec, digest=hashlib.sha256(data).digest())


def parse_cid(text: str) -> Cid:
    """A CID as people write it: ``Qm...`` (v0, base58) or ``b...`` (v1, base32).
    ``ValueError`` saying what is wrong."""
    if not isinstance(text, str) or not 2 <= len(text) <= cid_len_max:
        raise ValueError(f"a CID of at most {cid_len_max} characters")
    if text.startswith("Qm") and len(text) == 46:
        raw = _b58decode(text)
        if len(raw) != 34 or raw[:2] != bytes([_SHA2_256, 32]):
            raise ValueError("a CIDv0 is a base58 sha2-256 multihash")
        return Cid(version=0, codec=CODEC_DAG_PB, digest=raw[2:])
    if text[0] != "b":
        raise ValueError("a CIDv1 in base32 (starting with 'b', as 'bafy...') or a CIDv0 ('Qm...')")
    try:
        return Cid.from_bytes(_b32decode(text[1:]))
    except ValueError as exc:
        raise ValueError(f"not a CID we can read: {exc}") from None


def _b32encode(raw: bytes) -> str:
    bits, n, out = 0, 0, []
    for byte in raw:
        n = (n << 8) | byte
        bits += 8
        while bits >= 5:
            bits -= 5
            out.append(_B32[(n >> bits) & 31])
    if bits:
        out.append(_B32[(n << (5 - bits)) & 31])
    return "".join(out)


def _b32decode(text: str) -> bytes:
    bits, n, out = 0, 0, bytearray()
    for ch in text:
        v = _B32.find(ch)
        if v < 0:
            raise ValueError(f"{ch!r} is not a base32 (lowercase) digit")
        n = ((n << 5) | v) & 0xFFFF
        bits += 5
        if bits >= 8:
            bits -= 8
            out.append((n >> bits) & 0xFF)
    return bytes(out)


def _b58encode(raw: bytes) -> str:
    n = int.from_bytes(raw, "big")
    out = ""
    while n:
        n, r = divmod(n, 58)
        out = _B58[r] + out
    return "1" * (len(raw) - len(raw.lstrip(b"\0"))) + out


def _b58decode(text: str) -> bytes:
    n = 0
    for ch in text:
        v = _B58.find(ch)
        if v < 0:
            raise ValueError(f"{ch!r} is not a base58 digit")
        n = n * 58 + v
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return b"\0" * (len(text) - len(text.lstrip("1"))) + body


# ------------------------------------------------------------ protobuf bits

def _fields(buf: bytes) -> list[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of a protobuf message; varints and
    length-delimited fields only (all dag-pb and UnixFS use)."""
    out: list[tuple[int, int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _uvarint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _uvarint(buf, pos)
            out.append((num, wire, value))
        elif wire == 2:
            length, pos = _uvarint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("a field runs past the end of the block")
            out.append((num, wire, buf[pos:pos + length]))
            pos += length
        else:
            raise ValueError(f"protobuf wire type {wire} (dag-pb and UnixFS use 0 and 2)")
    return out


@dataclass(frozen=True, slots=True)
class FileNode:
    """A decoded UnixFS file node: inline ``data``, then ``links`` with the
    byte count each stands for (``blocksizes``); ``filesize`` as declared."""

    data: bytes
    links: tuple[Cid, ...]
    blocksizes: tuple[int, ...]
    filesize: int | None


_UNIXFS_RAW, _UNIXFS_FILE = 0, 2
_UNIXFS_NAMES = {1: "a directory", 3: "metadata", 4: "a symbolic link", 5: "a sharded directory"}


def decode_file_node(block: bytes, *, links_max: int = links_per_node_max) -> FileNode:
    """A dag-pb block holding a UnixFS file (or raw) node; ``PeerMisbehaved``
    (MALFORMED, BAD_SCHEMA or LIMIT_EXCEEDED) for anything else."""
    try:
        fields = _fields(block)
        links: list[Cid] = []
        unixfs: bytes | None = None
        for num, wire, value in fields:
            if num == 2 and wire == 2 and isinstance(value, bytes):
                if len(links) >= links_max:
                    raise PeerMisbehaved(Reason.LIMIT_EXCEEDED, f"a node with more than {links_max} links")
                links.append(_decode_link(value))
            elif num == 1 and wire == 2 and isinstance(value, bytes) and unixfs is None:
                unixfs = value
            else:
                raise ValueError(f"unexpected dag-pb field {num}")
        if unixfs is None:
            raise PeerMisbehaved(Reason.BAD_SCHEMA, "a dag-pb node without UnixFS data is not a file")
        kind, data, filesize, sizes = _UNIXFS_RAW, b"", None, []
        for num, wire, value in _fields(unixfs):
            if num == 1 and wire == 0 and isinstance(value, int):
                kind = value
            elif num == 2 and wire == 2 and isinstance(value, bytes):
                data = value
            elif num == 3 and wire == 0 and isinstance(value, int):
                filesize = value
            elif num == 4 and wire == 0 and isinstance(value, int):
                sizes.append(value)
            elif num == 4 and wire == 2 and isinstance(value, bytes):  # packed
                pos = 0
                while pos < len(value):
                    n, pos = _uvarint(value, pos)
                    sizes.append(n)
            if len(sizes) > links_max:
                raise PeerMisbehaved(Reason.LIMIT_EXCEEDED, f"more than {links_max} block sizes")
    except ValueError as exc:
        raise PeerMisbehaved(Reason.MALFORMED, f"not a dag-pb block: {exc}") from None
    if kind not in (_UNIXFS_RAW, _UNIXFS_FILE):
        raise PeerMisbehaved(Reason.BAD_SCHEMA, f"the CID names {_UNIXFS_NAMES.get(kind, f'UnixFS type {kind}')}, "
                             "not a file")
    if len(sizes) != len(links):
        raise PeerMisbehaved(Reason.BAD_SCHEMA, f"{len(links)} links but {len(sizes)} block sizes")
    return FileNode(data=data, links=tuple(links), blocksizes=tuple(sizes), filesize=filesize)


def _field(num: int, value: bytes | int) -> bytes:
    if isinstance(value, int):
        return put_uvarint(num << 3) + put_uvarint(value)
    return put_uvarint(num << 3 | 2) + put_uvarint(len(value)) + value


def encode_file_node(links: list[tuple[Cid, int]], *, data: bytes = b"", filesize: int | None = None) -> bytes:
    """A dag-pb block holding a UnixFS file node: inline ``data``, then
    ``links`` as (CID, bytes under it); ``filesize`` defaults to the sum (a
    caller may lie, as the attack tests do).  Links come first, as dag-pb's
    canonical form has them."""
    unixfs = _field(1, _UNIXFS_FILE) + (_field(2, data) if data else b"")
    unixfs += _field(3, filesize if filesize is not None else len(data) + sum(size for _, size in links))
    unixfs += b"".join(_field(4, size) for _, size in links)
    body = b"".join(_field(2, _field(1, c.to_bytes()) + _field(2, b"") + _field(3, size)) for c, size in links)
    return body + _field(1, unixfs)


def _decode_link(buf: bytes) -> Cid:
    target = None
    for num, wire, value in _fields(buf):
        if num == 1 and wire == 2 and isinstance(value, bytes):
            target = value
    if target is None:
        raise ValueError("a link without a hash")
    try:
        return Cid.from_bytes(target)
    except ValueError as exc:
        raise ValueError(f"a link's CID: {exc}") from None


# ---------------------------------------------------------------- the walk

class DagRefused(PeerMisbehaved):
    """The content a CID names is itself unacceptable (not a file, too deep,
    too wide, sizes that lie): every provider would send the same blocks, so
    the whole fetch ends, not just one provider."""


@dataclass(frozen=True, slots=True)
class DagLimits:
    """What one file's DAG may cost (module constants by default)."""

    depth_max: int = depth_max
    links_per_node_max: int = links_per_node_max
    blocks_max: int = blocks_max
    block_bytes_max: int = block_bytes_max
    window: int = window_default


@dataclass(slots=True)
class _Pending:
    cid: Cid
    depth: int
    size: int  # the bytes this block stands for, as its parent (or the manifest) says


class DagWalk:
    """Fetch order and checks for one file by CID (see the module doc).

    The driver loops: send :meth:`wants`; feed each block to
    :meth:`on_block`, which returns the next bytes of the file in order;
    stop when :attr:`done`.  Blocks arrive in any order; at most
    ``limits.window`` (plus one) are asked for or held at a time, the next
    block of the file always among them, so memory stays bounded and the walk
    always makes progress.  A block that appears several times in a file
    (zeros, repeated content) is fetched once while it is still needed."""

    def __init__(self, root: Cid, *, size_bytes: int, limits: DagLimits = DagLimits()) -> None:
        self.root = root
        self.size_bytes = size_bytes
        self.limits = limits
        self._queue: deque[_Pending] = deque([_Pending(root, 0, size_bytes)])
        self._in_queue: Counter[bytes] = Counter({root.to_bytes(): 1})
        self._ever_asked: set[bytes] = set()
        self._inflight: dict[bytes, Cid] = {}
        self._held: dict[bytes, bytes] = {}
        self.blocks_named = 1
        self.blocks_used = 0
        self.bytes_out = 0

    @property
    def done(self) -> bool:
        return not self._queue

    def wants(self) -> list[Cid]:
        """CIDs to ask for now: the first blocks of the file not yet asked for
        or held, within the window (the next block always)."""
        out = []
        for i, p in enumerate(self._queue):
            if i >= self.limits.window:
                break
            key = p.cid.to_bytes()
            if key in self._inflight or key in self._held:
                continue
            if i > 0 and len(self._inflight) + len(self._held) >= self.limits.window:
                break
            self._inflight[key] = p.cid
            self._ever_asked.add(key)
            out.append(p.cid)
        return out

    def outstanding(self) -> list[Cid]:
        """CIDs asked for and not yet received (for a provider that joins late)."""
        return list(self._inflight.values())

    def on_block(self, cid: Cid, data: bytes) -> list[bytes]:
        """Take the block ``data`` that claims to be ``cid``; return the file
        bytes that are now ready, in order.  Raises :class:`PeerMisbehaved`.
        A block asked for before and no longer needed (a duplicate from a
        second provider) is ignored."""
        key = cid.to_bytes()
        if key not in self._ever_asked:
            raise PeerMisbehaved(Reason.BAD_CONTENT, f"block {cid} was not asked for (a wrong block?)")
        if len(data) > self.limits.block_bytes_max:
            raise PeerMisbehaved(Reason.OVERSIZED, f"block {cid} is {len(data)} bytes, over "
                                 f"{self.limits.block_bytes_max}")
        if hashlib.sha256(data).digest() != cid.digest:
            raise PeerMisbehaved(Reason.BAD_CONTENT, f"block does not hash to {cid}")
        if self._inflight.pop(key, None) is None:
            return []
        self._held[key] = data
        out: list[bytes] = []
        while self._queue:
            head = self._queue[0]
            hkey = head.cid.to_bytes()
            got = self._held.get(hkey)
            if got is None:
                break
            self._queue.popleft()
            self._in_queue[hkey] -= 1
            if not self._in_queue[hkey]:
                del self._in_queue[hkey], self._held[hkey]
            self.blocks_used += 1
            try:
                out.extend(self._expand(head, got))
            except PeerMisbehaved as exc:
                raise DagRefused(exc.reason, exc.detail) from None
        return [b for b in out if b]

    def _expand(self, p: _Pending, data: bytes) -> list[bytes]:
        if p.cid.codec == CODEC_RAW:
            if len(data) != p.size:
                raise PeerMisbehaved(Reason.BAD_CONTENT, f"leaf {p.cid} holds {len(data)} bytes, its parent "
                                     f"says {p.size}" if p.depth else
                                     f"the file is {len(data)} bytes, the manifest says {p.size}")
            self.bytes_out += len(data)
            return [data]
        node = decode_file_node(data, links_max=self.limits.links_per_node_max)
        where = f"node {p.cid}"
        if node.filesize is not None and node.filesize != p.size:
            raise PeerMisbehaved(Reason.BAD_CONTENT, f"{where} declares a file of {node.filesize} bytes, "
                                 + (f"its parent says {p.size}" if p.depth else f"the manifest says {p.size}"))
        if 0 in node.blocksizes:
            raise PeerMisbehaved(Reason.BAD_SCHEMA, f"{where} links an empty block")
        if len(node.data) + sum(node.blocksizes) != p.size:
            raise PeerMisbehaved(Reason.BAD_CONTENT, f"{where}: its data and block sizes add up to "
                                 f"{len(node.data) + sum(node.blocksizes)} bytes, not {p.size}")
        if node.links and p.depth + 1 > self.limits.depth_max:
            raise PeerMisbehaved(Reason.LIMIT_EXCEEDED, f"the DAG is deeper than {self.limits.depth_max} levels")
        if self.blocks_named + len(node.links) > self.limits.blocks_max:
            raise PeerMisbehaved(Reason.LIMIT_EXCEEDED, f"the DAG names more than {self.limits.blocks_max} blocks")
        self.blocks_named += len(node.links)
        self._queue.extendleft(reversed([_Pending(c, p.depth + 1, s) for c, s in zip(node.links, node.blocksizes,
                                                                                      strict=True)]))
        self._in_queue.update(c.to_bytes() for c in node.links)
        self.bytes_out += len(node.data)
        return [node.data]


__all__ = ["CODEC_DAG_PB", "CODEC_RAW", "Cid", "DagLimits", "DagRefused", "DagWalk", "FileNode", "decode_file_node",
           "encode_file_node",
           "parse_cid"]
