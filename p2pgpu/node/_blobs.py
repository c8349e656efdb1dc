"""Blobs between peers: ``/p2pgpu/blobs/1.0.0``, served and fetched.

Wire (each frame an unsigned-varint length and the bytes, ``_streams``): the
fetcher sends requests, one msgpack frame each, on a stream it keeps for many
requests:

- ``{op: "tree", sha256}`` -> one frame ``{tree: {sha256, size, chunk_bytes,
  leaves}, have: bytes | nil}`` (``have``: a bitmap of the chunks a partial
  holder has verified; nil when it holds the whole blob), or ``{error}``;
- ``{op: "get", sha256, first, count}`` -> ``count`` frames, the raw bytes of
  chunks ``first .. first+count-1``; a holder that lacks one ends the stream.

A node serves any blob it holds (whole, or the verified chunks of a partial)
to any peer that names it by hash, as IPFS and BitTorrent do: a manifest is
gossiped to the whole network, so its inputs' hashes are no secret, and
access by job would not protect them (docs/security.md, "Content and
images").  It serves at most ``serve_streams_per_peer_max`` streams per peer
and ``serve_streams_max`` in all, paced to ``serve_bytes_per_s_max``.  Providers
are found among the peers the job names (submitter, other members) and in the
DHT, under :func:`blob_key` (a sha256 multihash: py-libp2p refuses other keys
over 50 bytes).

:func:`fetch_blob` drives the scheduler core (``core/_fetch.py``): a few
workers per provider, every chunk checked against its leaf as it arrives
(``core/_chunks.py``), a provider that sends one bad chunk dropped at once,
verified chunks written to a resumable partial in the store, the whole
SHA-256 checked before the blob is committed.  The fetcher reads its streams
in large pieces and cuts frames out of them (:class:`FrameReader`); the
server asks py-libp2p for chunk-sized Yamux frames on its streams
(``_patches.py``, "Bulk transfer").
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID

from p2pgpu.content import BlobMismatch, BlobStore, StoreError
from p2pgpu.core import PeerMisbehaved, Reason, decode, encode
from p2pgpu.core._bulk import BulkChoice, Fallback, Offer, chunk_frame_bytes_max, open_chunk, seal_chunk
from p2pgpu.core._chunks import BlobTree, chunk_bytes_max
from p2pgpu.core._fetch import Drop, FetchPlan

from ._autonat import remote_ip
from ._bulk import BulkConn, BulkGone, BulkServer
from ._holepunch import connection_kind
from ._streams import StreamGone, read_frame, write_frame

if TYPE_CHECKING:
    from ._ports import NodePorts as Node

log = logging.getLogger("p2pgpu.blobs")

BLOBS_PROTOCOL = TProtocol("/p2pgpu/blobs/1.0.0")
request_bytes_max = 1024
#: A leaf list frame: 32 bytes per chunk (16 GiB at 1 MiB chunks is 512 KiB).
tree_frame_bytes_max = 8 << 20
chunks_per_request_max = 64
serve_streams_per_peer_max = 4
serve_streams_max = 64
#: 0: no pacing.  Otherwise the node's total upload rate for blobs.
serve_bytes_per_s_max = 0
serve_idle_timeout_s = 60.0
#: Fetching: streams per provider, providers per blob, blobs at once.
streams_per_provider = 2
fetch_providers_max = 16
#: A run of chunks must arrive at least this fast or the run fails.
fetch_bytes_per_s_min = 256 * 1024
fetch_request_timeout_s_min = 10.0
#: How long a fetch waits with chunks missing and no provider that has them.
fetch_stuck_timeout_s = 30.0
#: Yamux receive window asked for on a fetch stream (upstream's 256 KiB
#: default caps one stream at ~35 MB/s on loopback; benchmarks/transfer.py).
fetch_window_bytes = 16 << 20
partial_refresh_s = 0.5


class FetchError(Exception):
    """A blob could not be fetched; the message says why (and from whom)."""


class NoSourceError(FetchError):
    """None of the peers asked served the blob's leaf list: none answered, or
    none holds it (yet).  Unlike a bad provider, worth asking again later."""


def blob_key(sha256_hex: str) -> str:
    """DHT provider key of a blob: the hex of a sha256 multihash of
    ``/p2pgpu/blob/<sha256>`` (34 bytes)."""
    return "1220" + hashlib.sha256(f"/p2pgpu/blob/{sha256_hex}".encode()).hexdigest()


def _bitmap(have: set[int], chunks: int) -> bytes:
    bits = bytearray((chunks + 7) // 8)
    for i in have:
        bits[i >> 3] |= 1 << (i & 7)
    return bytes(bits)


def _from_bitmap(bits: bytes, chunks: int) -> frozenset[int]:
    if len(bits) != (chunks + 7) // 8:
        raise PeerMisbehaved(Reason.BAD_SCHEMA, "have bitmap of the wrong length")
    return frozenset(i for i in range(chunks) if bits[i >> 3] >> (i & 7) & 1)


@dataclass
class Pacer:
    """A token bucket for the bytes we serve (0: unlimited)."""

    bytes_per_s: int
    _level: float = 0.0
    _t: float = 0.0

    async def take(self, n: int) -> None:
        if self.bytes_per_s <= 0:
            return
        now = trio.current_time()
        self._level = max(0.0, self._level - (now - self._t) * self.bytes_per_s)
        self._t = now
        self._level += n
        wait = (self._level - self.bytes_per_s) / self.bytes_per_s  # a second of burst
        if wait > 0:
            await trio.sleep(wait)


@dataclass
class BlobService:
    """The node's side of ``/p2pgpu/blobs/1.0.0`` (see the module doc)."""

    node: Node
    store: BlobStore
    counts: Counter[str]
    #: Test networks only: ``corrupt_chunks`` flips a byte in every chunk we serve.
    adversary: str = ""
    streams_per_peer_max: int = serve_streams_per_peer_max
    streams_max: int = serve_streams_max
    pacer: Pacer = field(default_factory=lambda: Pacer(serve_bytes_per_s_max))
    _streams: Counter[str] = field(default_factory=Counter)
    #: Bytes served and fetched per blob (for progress in ``job status``).
    served: Counter[str] = field(default_factory=Counter)
    fetching: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: Downloads in progress: their verified chunks are served at once, before
    #: they reach the partial's on-disk record.
    active: dict[str, Any] = field(default_factory=dict)
    #: The last fetches: sha256 -> verified chunks per provider, and who was dropped why.
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    sources_kept_max: int = 256
    #: The bulk side channel's listener (``node/_bulk.py``); None: turned off.
    bulk: BulkServer | None = None
    #: Whether our fetches use providers' side channels (off: libp2p only).
    bulk_fetch: bool = True

    # ------------------------------------------------------------- serving

    async def serve(self, stream: Any) -> None:
        peer = stream.muxed_conn.peer_id.to_base58()
        if self._streams[peer] >= self.streams_per_peer_max or sum(self._streams.values()) >= self.streams_max:
            self.counts["blobs:streams_refused"] += 1
            raise PeerMisbehaved(Reason.LIMIT_EXCEEDED, "too many blob streams")
        self._streams[peer] += 1
        muxed = getattr(stream, "muxed_stream", None)
        if muxed is not None:
            # A chunk and its length prefix in one Yamux frame (_patches.py, B1).
            muxed.p2pgpu_frame_bytes_max = chunk_bytes_max + 16
        try:
            while True:
                with trio.move_on_after(serve_idle_timeout_s) as idle:
                    try:
                        frame = await read_frame(stream, request_bytes_max)
                    except StreamGone:
                        return  # the fetcher is done with this stream
                if idle.cancelled_caught:
                    return
                req = decode(frame, size_max=request_bytes_max)
                if not isinstance(req, dict) or not isinstance(req.get("sha256"), bytes) or len(req["sha256"]) != 32:
                    raise PeerMisbehaved(Reason.BAD_SCHEMA, "blob request needs op and a 32-byte sha256")
                sha = req["sha256"].hex()
                if req.get("op") == "tree":
                    await self._serve_tree(stream, sha)
                elif req.get("op") == "bulk":
                    await self._serve_bulk_ticket(stream, peer, sha, req)
                elif req.get("op") == "get":
                    first, count = req.get("first"), req.get("count")
                    if type(first) is not int or type(count) is not int or not 1 <= count <= chunks_per_request_max:
                        raise PeerMisbehaved(Reason.BAD_SCHEMA, f"get needs first and count 1..{chunks_per_request_max}")
                    if not await self._serve_chunks(stream, sha, first, count):
                        return
                else:
                    raise PeerMisbehaved(Reason.BAD_SCHEMA, "op must be tree, get or bulk")
        finally:
            self._streams[peer] -= 1
            if not self._streams[peer]:
                del self._streams[peer]

    def _holding(self, sha: str) -> tuple[BlobTree, set[int] | None] | None:
        partial = self.active.get(sha)
        if partial is not None:
            return partial.tree, set(partial.have)
        if self.store.has(sha):
            tree = self.store.tree(sha)
            return None if tree is None else (tree, None)
        return self.store.partial_have(sha)

    async def _serve_tree(self, stream: Any, sha: str) -> None:
        held = self._holding(sha)
        if held is None:
            await write_frame(stream, encode({"error": "not_found"}))
            return
        tree, have = held
        answer: dict[str, Any] = {"tree": tree.to_obj(), "have": None if have is None else _bitmap(have, tree.chunks)}
        if self.bulk is not None:
            answer["bulk"] = 1  # we issue tickets for the side channel (op bulk)
        await write_frame(stream, encode(answer))

    async def _serve_bulk_ticket(self, stream: Any, peer: str, sha: str, req: dict[str, Any]) -> None:
        """A ticket for the bulk side channel (``core/_bulk.py``), or ``{error}``:
        the fetcher then goes on over this stream."""
        held = self._holding(sha)
        ip = direct_ip(stream)
        if self.bulk is None or held is None or ip is None:
            why = "bulk_off" if self.bulk is None else "not_found" if held is None else "relayed"
            await write_frame(stream, encode({"error": why}))
            return
        try:
            offer = self.bulk.ticket_offer(peer=peer, ip=ip, sha256=bytes.fromhex(sha), chunks=held[0].chunks,
                                           first=req.get("first"), count=req.get("count"))
        except PeerMisbehaved as exc:
            if exc.reason != Reason.LIMIT_EXCEEDED:
                raise
            self.counts["bulk:tickets_refused"] += 1
            await write_frame(stream, encode({"error": "limit"}))
            return
        await write_frame(stream, encode(offer))

    def bulk_held(self, sha: str) -> tuple[BlobTree, set[int] | None] | None:
        """What we hold of ``sha`` (asked once per bulk request, as per ``get``)."""
        return self._holding(sha)

    async def bulk_chunk(self, sha: str, held: tuple[BlobTree, set[int] | None] | None, index: int, aead: Any,
                         counter: int) -> bytes:
        """Chunk ``index`` of ``sha`` read and sealed as bulk frame ``counter``
        (sealed empty when we do not hold it)."""
        if held is None or (held[1] is not None and index not in held[1]):
            return seal_chunk(aead, counter, index, b"")
        tree, have = held
        offset, length = tree.span(index)
        await self.pacer.take(length)

        def read_and_seal() -> bytes:
            data = self._read(sha, have is None, offset, length)
            if len(data) != length:
                raise StoreError(f"blob {sha[:12]} is shorter on disk than its tree")
            if self.adversary == "corrupt_chunks" and data:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            return seal_chunk(aead, counter, index, data)

        frame = await trio.to_thread.run_sync(read_and_seal)
        self.served[sha] += length
        self.counts["blobs:bytes_served"] += length
        return frame

    async def _serve_chunks(self, stream: Any, sha: str, first: int, count: int) -> bool:
        held = self._holding(sha)
        if held is None:
            return False
        tree, have = held
        if not (0 <= first and first + count <= tree.chunks):
            raise PeerMisbehaved(Reason.BAD_SCHEMA, "chunk range outside the blob")
        for i in range(first, first + count):
            if have is not None and i not in have:
                return False  # we do not hold it (yet): the fetcher asks elsewhere
            offset, length = tree.span(i)
            data = await trio.to_thread.run_sync(self._read, sha, have is None, offset, length)
            if len(data) != length:
                raise StoreError(f"blob {sha[:12]} is shorter on disk than its tree")
            if self.adversary == "corrupt_chunks" and data:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            await self.pacer.take(length)
            await write_frame(stream, data)
            self.served[sha] += length
            self.counts["blobs:bytes_served"] += length
        return True

    def _read(self, sha: str, complete: bool, offset: int, length: int) -> bytes:
        import os

        if not complete:
            return self.store.read_partial_chunk(sha, offset, length)
        fd = self.store.open_blob(sha)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    # ------------------------------------------------------------ the DHT

    async def announce(self, sha: str) -> None:
        """Tell the DHT we provide ``sha`` (best effort, bounded)."""
        stack = self.node.stack
        if stack is None or not stack.host.get_connected_peers():
            return
        with trio.move_on_after(10):
            try:
                await stack.dht.provide(blob_key(sha))
                self.counts["blobs:announced"] += 1
            except (BaseLibp2pError, ValueError, OSError) as exc:
                self.counts["blobs:announce_failed"] += 1
                log.info("DHT provide of blob %s failed: %s", sha[:12], exc)

    async def find_providers(self, sha: str) -> list[str]:
        """Peers that announced ``sha`` in the DHT: our provider store plus the
        answers of connected peers (py-libp2p's own lookup stops at the first
        local record)."""
        stack = self.node.stack
        if stack is None:
            return []
        dht = stack.dht
        key = bytes.fromhex(blob_key(sha))
        found = [p.peer_id.to_base58() for p in dht.provider_store.get_providers(key)]

        async def ask(peer: ID) -> None:
            with trio.move_on_after(5.0):
                try:
                    providers, _closer = await dht.provider_store._get_providers_from_peer_with_closers(peer, key)
                except (BaseLibp2pError, OSError) as exc:
                    log.debug("GET_PROVIDERS from %s failed: %s", peer, exc)
                    return
                for p in providers or []:
                    found.append(p.peer_id.to_base58())

        async with trio.open_nursery() as n:
            for peer in stack.host.get_connected_peers()[:32]:
                n.start_soon(ask, peer)
        me = self.node.identity.peer_id
        return [p for p in dict.fromkeys(found) if p != me][:fetch_providers_max]

    # ------------------------------------------------------------ fetching

    async def fetch(self, sha: str, size: int, *, root: bytes | None, sources: list[str],
                    progress: Callable[[int, int], None] | None = None, use_dht: bool = True) -> BlobTree:
        """Fetch blob ``sha`` (``size`` bytes) into the store, unless it is
        there already; ``root`` is the tree root the manifest names, if any.
        Raises :class:`FetchError` with the reason."""
        now = self.node.now_ms()
        if self.store.has(sha):
            self.store.touch(sha, now)
            tree = self.store.tree(sha)
            if tree is not None:
                return tree
        if size > self.store.blob_bytes_max:
            raise FetchError(f"blob {sha[:12]} is {size} bytes, over this node's limit of "
                             f"{self.store.blob_bytes_max} bytes")
        me = self.node.identity.peer_id
        peers = [p for p in dict.fromkeys(sources) if p != me]
        if use_dht:
            peers += [p for p in await self.find_providers(sha) if p not in peers]
        if not peers:
            raise FetchError(f"blob {sha[:12]}: no peer to fetch it from")
        fetch = _Fetch(self, sha, size, root, progress)
        try:
            tree = await fetch.run(peers[:fetch_providers_max])
        finally:
            self.fetching.pop(sha, None)
            if fetch.plan is not None:
                if len(self.sources) >= self.sources_kept_max:
                    del self.sources[next(iter(self.sources))]
                self.sources[sha] = {"chunks_from": fetch.plan.chunks_from(),
                                     "bulk_chunks_from": dict(fetch.bulk_chunks),
                                     "bulk_fallbacks": fetch.bulk.fallbacks(),
                                     "dropped": {p: d.value for p, d in fetch.plan.dropped().items()},
                                     "resumed_chunks": fetch.resumed}
        nursery = getattr(self.node, "_nursery", None)
        if nursery is not None:
            nursery.start_soon(self.announce, sha)
        return tree


class _Fetch:
    """One blob's download (see :meth:`BlobService.fetch`)."""

    def __init__(self, svc: BlobService, sha: str, size: int, root: bytes | None,
                 progress: Callable[[int, int], None] | None) -> None:
        self.svc, self.sha, self.size, self.root, self.progress = svc, sha, size, root, progress
        self.tree: BlobTree | None = None
        self.tree_from = ""
        self.plan: FetchPlan | None = None
        self.partial: Any = None
        self.bad_trees: dict[str, str] = {}
        self.changed = trio.Event()
        self.verified = 0
        self.resumed = 0
        #: The bulk side channel: who offers it, at which IP; chunks that came over it.
        self.bulk = BulkChoice()
        self.bulk_ip: dict[str, str] = {}
        self.bulk_chunks: Counter[str] = Counter()
        #: The whole blob's SHA-256 over its first ``prefix_chunks`` chunks, fed
        #: as chunks arrive in order (the commit then hashes only the rest).
        self.prefix = hashlib.sha256()
        self.prefix_chunks = 0
        self._prefix_lock = threading.Lock()

    def _check_tree(self, peer: str, obj: Any) -> tuple[BlobTree, frozenset[int] | None]:
        if not isinstance(obj, dict) or "tree" not in obj:
            raise PeerMisbehaved(Reason.BAD_SCHEMA, "tree answer must be {tree, have}")
        tree = BlobTree.from_obj(obj["tree"], size_max=self.svc.store.blob_bytes_max)
        if tree.sha256.hex() != self.sha or tree.size != self.size:
            raise PeerMisbehaved(Reason.BAD_CONTENT, "a tree for another blob or size")
        if tree.chunk_bytes > chunk_bytes_max:
            raise PeerMisbehaved(Reason.BAD_SCHEMA, "chunk size")
        if self.root is not None:
            tree.check_root(self.root)
        elif self.tree is not None and tree != self.tree:
            raise PeerMisbehaved(Reason.BAD_CONTENT, "a leaf list that differs from the one in use")
        have = obj.get("have")
        return tree, (None if have is None else _from_bitmap(have, tree.chunks) if isinstance(have, bytes)
                      else _raise_schema())

    async def _open(self, peer: str) -> Any:
        stack = self.svc.node.stack
        assert stack is not None
        try:
            stream = await stack.host.new_stream(ID.from_base58(peer), [BLOBS_PROTOCOL])
        except (BaseLibp2pError, ValueError, OSError) as exc:
            raise StreamGone(f"cannot open a blob stream to {peer[:12]}: {type(exc).__name__}") from None
        muxed = getattr(stream, "muxed_stream", None)
        if muxed is not None and hasattr(muxed, "target_recv_window"):
            muxed.target_recv_window = max(muxed.target_recv_window, fetch_window_bytes)
        return stream

    async def _ask_tree(self, stream: Any, peer: str) -> tuple[BlobTree, frozenset[int] | None] | None:
        await write_frame(stream, encode({"op": "tree", "sha256": bytes.fromhex(self.sha)}))
        obj = decode(await frame_reader(stream).frame(tree_frame_bytes_max), size_max=tree_frame_bytes_max)
        if isinstance(obj, dict) and "error" in obj:
            return None
        got = self._check_tree(peer, obj)
        ip = direct_ip(stream)
        if ip is not None:
            self.bulk_ip[peer] = ip
        self.bulk.offered(peer, obj.get("bulk") == 1 and self.svc.bulk_fetch, direct=ip is not None)
        return got

    async def _open_bulk(self, peer: str, stream: Any) -> BulkConn | None:
        """A bulk connection to ``peer`` (a ticket asked over ``stream``), or
        None: the fallback is recorded and the fetch goes on over ``stream``."""
        assert self.tree is not None
        counts = self.svc.counts
        with trio.fail_after(fetch_request_timeout_s_min):
            await write_frame(stream, encode({"op": "bulk", "sha256": self.tree.sha256}))
            obj = decode(await frame_reader(stream).frame(request_bytes_max), size_max=request_bytes_max)
        try:
            if isinstance(obj, dict) and "error" in obj:
                raise PeerMisbehaved(Reason.LIMIT_EXCEEDED, f"ticket refused: {obj['error']!r:.40}")
            offer = Offer.from_obj(obj, chunks=self.tree.chunks)
        except PeerMisbehaved as exc:
            counts["blobs:bulk_fallbacks:refused"] += 1
            log.info("blob %s: %s gave no bulk ticket (%s): over libp2p", self.sha[:12], peer[:12], exc)
            self.bulk.failed(peer, Fallback.REFUSED)
            return None
        try:
            conn = await BulkConn.open(self.bulk_ip[peer], offer, self.tree.sha256)
        except BulkGone as exc:
            counts["blobs:bulk_fallbacks:connect_failed"] += 1
            log.info("blob %s: bulk connection to %s failed (%s): over libp2p", self.sha[:12], peer[:12], exc)
            self.bulk.failed(peer, Fallback.CONNECT_FAILED)
            return None
        counts["blobs:bulk_connections"] += 1
        return conn

    async def _bulk_run(self, conn: BulkConn, peer: str, run: list[int]) -> None:
        """Fetch ``run`` over the side channel; every chunk opened, checked and
        written as it arrives (``PeerMisbehaved`` on a bad one, after marking it)."""
        plan, tree = self.plan, self.tree
        assert plan is not None and tree is not None
        counts = self.svc.counts
        timeout = fetch_request_timeout_s_min + len(run) * tree.chunk_bytes / fetch_bytes_per_s_min
        with trio.fail_after(timeout):
            await conn.request(run[0], len(run))
            while run:
                i = run[0]
                try:
                    counter, sealed = await conn.frame(chunk_frame_bytes_max(tree.chunk_bytes))
                    n = await trio.to_thread.run_sync(self._open_verify_write, conn, counter, i, sealed)
                except PeerMisbehaved:  # oversized, forged or a bad chunk: the provider goes
                    counts["blobs:bad_chunks"] += 1
                    log.warning("blob %s: chunk %d from %s (bulk) does not open or match its hash: "
                                "provider dropped", self.sha[:12], i, peer[:12])
                    plan.chunk_bad(peer, i)
                    run.clear()
                    raise
                if n == 0:
                    raise BulkGone(f"the provider lacks chunk {i}")
                plan.chunk_ok(peer, i)
                run.pop(0)
                self.verified += n
                self.bulk_chunks[peer] += 1
                counts["blobs:bytes_fetched"] += n
                counts["blobs:bulk_bytes_fetched"] += n
                self._report()
                self.changed.set()

    def _open_verify_write(self, conn: BulkConn, counter: int, index: int, sealed: bytearray) -> int:
        data = open_chunk(conn.down, counter, index, sealed)
        if data:
            self._verify_and_write(index, data)
        return len(data)

    async def run(self, peers: list[str]) -> BlobTree:
        store = self.svc.store
        counts = self.svc.counts
        # 1. A leaf list we can trust (checked against the manifest's root when there is one).
        first: dict[str, tuple[Any, frozenset[int] | None]] = {}
        #: Peers that do not hold it yet: a member starting the same fetch may soon.
        later: list[str] = []
        for peer in peers:
            try:
                with trio.fail_after(fetch_request_timeout_s_min):
                    stream = await self._open(peer)
                    got = await self._ask_tree(stream, peer)
            except PeerMisbehaved as exc:
                self.bad_trees[peer] = str(exc)
                counts[f"blobs:bad_tree:{exc.reason.name.lower()}"] += 1
                continue
            except (StreamGone, trio.TooSlowError) as exc:
                log.info("blob %s: %s did not answer: %s", self.sha[:12], peer[:12], exc)
                continue
            if got is None:
                await _close(stream)
                later.append(peer)
                continue
            tree, has = got
            if self.tree is None:
                self.tree, self.tree_from = tree, peer
            first[peer] = (stream, has)
        if self.tree is None:
            why = "; ".join(f"{p[:12]}: {w}" for p, w in self.bad_trees.items())
            error = FetchError if self.bad_trees else NoSourceError  # a liar is not asked again
            raise error(f"blob {self.sha[:12]}: none of {len(peers)} peers has it" + (f" ({why})" if why else ""))
        tree = self.tree
        # 2. Resume what is on disk; schedule the rest across the providers.
        try:
            self.partial = await trio.to_thread.run_sync(store.partial, tree)
        except StoreError as exc:
            raise FetchError(f"blob {self.sha[:12]}: {exc}") from None
        # Start where no other fetcher of this blob is likely to (see core/_fetch.py).
        me = self.svc.node.identity.peer_id
        start = int.from_bytes(hashlib.sha256(f"{me}/{self.sha}".encode()).digest()[:8], "big")
        plan = self.plan = FetchPlan(chunks=tree.chunks, have=set(self.partial.have),
                                     providers_max=fetch_providers_max,
                                     start=start % tree.chunks // 8 * 8 if tree.chunks else 0)
        self.resumed = len(plan.have)
        self.svc.active[self.sha] = self.partial
        self.verified = sum(tree.span(i)[1] for i in plan.have)
        for peer, (_, has) in first.items():
            plan.add_provider(peer, has)
        self._report()
        try:
            async with trio.open_nursery() as nursery:
                for peer, (stream, _) in first.items():
                    for k in range(streams_per_provider):
                        nursery.start_soon(self._worker, peer, stream if k == 0 else None)
                for peer in later:
                    nursery.start_soon(self._join_later, peer, nursery)
                nursery.start_soon(self._watch, nursery.cancel_scope)
        finally:
            self.svc.active.pop(self.sha, None)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.partial.close)
        if not plan.done:
            raise FetchError(f"blob {self.sha[:12]}: {plan.failure_reason()}")
        try:
            done = await trio.to_thread.run_sync(self._commit)
        except BlobMismatch as exc:
            plan.drop(self.tree_from, Drop.BAD_TREE)
            raise FetchError(f"blob {self.sha[:12]}: {exc} (leaf list from {self.tree_from[:12]}); "
                             "nothing was kept") from None
        counts["blobs:fetched"] += 1
        return done

    async def _join_later(self, peer: str, nursery: trio.Nursery) -> None:
        """Ask a peer that had nothing again, now and then, until it has part
        of the blob (a fellow member fetching it too) or we are done."""
        plan = self.plan
        assert plan is not None
        while not plan.done:
            await trio.sleep(partial_refresh_s)
            try:
                with trio.fail_after(fetch_request_timeout_s_min):
                    stream = await self._open(peer)
                    got = await self._ask_tree(stream, peer)
            except (PeerMisbehaved, StreamGone, trio.TooSlowError, BaseLibp2pError) as exc:
                log.info("blob %s: %s: %s", self.sha[:12], peer[:12], exc)
                return
            if got is not None and got[1] != frozenset() and plan.add_provider(peer, got[1]):
                for k in range(streams_per_provider):
                    nursery.start_soon(self._worker, peer, stream if k == 0 else None)
                return
            await _close(stream)

    def _commit(self) -> BlobTree:
        p = self.svc.store.partial(self.partial.tree)  # reopen: close() flushed and released it
        assert self.tree is not None
        with self._prefix_lock:
            done = self.prefix_chunks
            prefix = (self.prefix, self.tree.span(done - 1)[0] + self.tree.span(done - 1)[1] if done else 0)
        return p.commit(self.svc.node.now_ms(), prefix=prefix)

    def _report(self) -> None:
        self.svc.fetching[self.sha] = (self.verified, self.size)
        if self.progress is not None:
            self.progress(self.verified, self.size)

    async def _watch(self, scope: trio.CancelScope) -> None:
        plan = self.plan
        assert plan is not None
        stuck_since: float | None = None
        while not plan.done:
            with trio.move_on_after(1.0):
                await self.changed.wait()
            self.changed = trio.Event()
            if plan.stuck() and not plan.live_providers():
                break
            if plan.stuck():
                stuck_since = stuck_since if stuck_since is not None else trio.current_time()
                if trio.current_time() - stuck_since > fetch_stuck_timeout_s:
                    break
            else:
                stuck_since = None
        scope.cancel()

    async def _worker(self, peer: str, stream: Any) -> None:
        plan, tree = self.plan, self.tree
        assert plan is not None and tree is not None
        counts = self.svc.counts
        run: list[int] = []
        conn: BulkConn | None = None
        try:
            if stream is None:
                with trio.fail_after(fetch_request_timeout_s_min):
                    stream = await self._open(peer)
            while not plan.done and peer in plan.live_providers():
                run = plan.take(peer)
                if not run:
                    await trio.sleep(partial_refresh_s)
                    if plan.done or peer not in plan.live_providers():
                        break
                    with trio.fail_after(fetch_request_timeout_s_min):
                        got = await self._ask_tree(stream, peer)
                    if got is None:
                        plan.drop(peer, Drop.GONE)
                        break
                    plan.add_provider(peer, got[1])
                    continue
                if conn is None and self.bulk.use(peer):
                    conn = await self._open_bulk(peer, stream)
                if conn is not None:
                    try:
                        await self._bulk_run(conn, peer, run)
                        continue
                    except (BulkGone, trio.TooSlowError) as exc:
                        # The side channel broke: this run failed; the rest goes over libp2p.
                        log.info("blob %s: bulk connection to %s: %s: over libp2p", self.sha[:12], peer[:12], exc)
                        conn.close()
                        conn = None
                        self.bulk.failed(peer, Fallback.BROKEN)
                        counts["blobs:bulk_fallbacks:broken"] += 1
                        if plan.run_failed(peer, run) is not None:
                            counts["blobs:providers_dropped"] += 1
                        run = []
                        continue
                reader = frame_reader(stream)
                timeout = fetch_request_timeout_s_min + len(run) * tree.chunk_bytes / fetch_bytes_per_s_min
                with trio.fail_after(timeout):
                    await write_frame(stream, encode({"op": "get", "sha256": tree.sha256, "first": run[0],
                                                      "count": len(run)}))
                    while run:
                        i = run[0]
                        data = await reader.frame(tree.chunk_bytes)
                        try:
                            await trio.to_thread.run_sync(self._verify_and_write, i, data)
                        except PeerMisbehaved:
                            counts["blobs:bad_chunks"] += 1
                            log.warning("blob %s: chunk %d from %s does not match its hash: provider dropped",
                                        self.sha[:12], i, peer[:12])
                            plan.chunk_bad(peer, i)
                            run = []
                            await _reset(stream)
                            return
                        plan.chunk_ok(peer, i)
                        run.pop(0)
                        self.verified += len(data)
                        counts["blobs:bytes_fetched"] += len(data)
                        self._report()
                        self.changed.set()
        except (StreamGone, trio.TooSlowError, PeerMisbehaved, BaseLibp2pError) as exc:
            log.info("blob %s: fetching from %s failed: %s", self.sha[:12], peer[:12], exc)
            if plan.run_failed(peer, run) is not None:
                counts["blobs:providers_dropped"] += 1
            run = []
            if stream is not None:
                await _reset(stream)
            stream = None
        finally:
            if conn is not None:
                conn.close()
            plan.release(peer, run)
            self.changed.set()
            if stream is not None:
                with trio.CancelScope(shield=True):
                    await _close(stream)

    def _verify_and_write(self, index: int, data: bytes) -> None:
        assert self.tree is not None
        self.tree.check_chunk(index, data)
        self.partial.write_chunk(index, data)
        self._extend_prefix(index, data)

    def _extend_prefix(self, index: int, data: bytes) -> None:
        """Feed the whole-blob hash: ``data`` if it is the next chunk in order,
        then the verified chunks after it, read back from the partial while
        they are in the page cache (in a worker thread, beside the download)."""
        tree, partial = self.tree, self.partial
        assert tree is not None
        with self._prefix_lock:
            if index != self.prefix_chunks:
                return
            self.prefix.update(data)
            k = index + 1
            while k < tree.chunks and k in partial.have and partial.fd >= 0:
                offset, length = tree.span(k)
                piece = os.pread(partial.fd, length, offset)
                if len(piece) != length:
                    break  # not all on disk after all: the commit reads it
                self.prefix.update(piece)
                k += 1
            self.prefix_chunks = k


#: Bytes asked of a fetch stream per read (what Yamux has buffered, up to this).
fetch_read_bytes = 4 << 20
_readers: weakref.WeakKeyDictionary[Any, FrameReader] = weakref.WeakKeyDictionary()


class FrameReader:
    """Frames (``_streams``' varint length and bytes) cut from large reads of
    one stream: a chunk costs one read of what is buffered and one copy,
    where reading the length a byte at a time and the body in pieces cost a
    muxer read (a lock, a window update) each and several copies."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def _fill(self) -> None:
        try:
            got = await self.stream.read(fetch_read_bytes)
        except BaseLibp2pError as exc:
            raise StreamGone(type(exc).__name__) from None
        if not got:
            raise StreamGone("end of stream")
        self.buf += got

    async def frame(self, size_max: int) -> bytes:
        """One frame, or ``PeerMisbehaved`` for a bad length, ``StreamGone`` on EOF."""
        while True:
            length, used = _uvarint_prefix(self.buf)
            if used:
                break
            await self._fill()
        if length > size_max:
            raise PeerMisbehaved(Reason.OVERSIZED, f"frame of {length} bytes > {size_max}")
        while len(self.buf) < used + length:
            await self._fill()
        data = bytes(memoryview(self.buf)[used:used + length])
        del self.buf[:used + length]
        return data


def _uvarint_prefix(buf: bytearray) -> tuple[int, int]:
    """(value, bytes used) of the varint at the start of ``buf``; (0, 0) when
    it is not complete yet; ``PeerMisbehaved`` past 10 bytes."""
    value = 0
    for i in range(min(len(buf), 10)):
        byte = buf[i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, i + 1
    if len(buf) >= 10:
        raise PeerMisbehaved(Reason.MALFORMED, "frame length varint too long")
    return 0, 0


def frame_reader(stream: Any) -> FrameReader:
    """The one reader of ``stream`` (bytes it read ahead stay with it)."""
    reader = _readers.get(stream)
    if reader is None:
        reader = _readers[stream] = FrameReader(stream)
    return reader


def direct_ip(stream: Any) -> str | None:
    """The peer's IP address on a stream's connection; None when it is
    relayed (no address of the peer itself to open a bulk connection to)."""
    muxed = getattr(stream, "muxed_conn", None)
    if muxed is None or connection_kind(muxed) != "direct":
        return None
    return remote_ip(muxed)


def job_blobs(rec: Any) -> set[str]:
    """The blobs a job names: by-hash inputs, this member's outputs, image layers."""
    out = {i.sha256 for i in rec.manifest.manifest.inputs if i.sha256}
    for o in rec.extra.get("outputs") or []:
        if isinstance(o, dict) and isinstance(o.get("sha256"), str):
            out.add(o["sha256"])
    for members in (rec.extra.get("member_outputs") or {}).values():
        for o in members if isinstance(members, list) else []:
            if isinstance(o, dict) and isinstance(o.get("sha256"), str):
                out.add(o["sha256"])
    out.update(x for x in rec.extra.get("image_blobs") or [] if isinstance(x, str))
    return out


def _raise_schema() -> frozenset[int]:
    raise PeerMisbehaved(Reason.BAD_SCHEMA, "have must be a bitmap or nil")


async def _reset(stream: Any) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1.0):
        try:
            await stream.reset()
        except BaseLibp2pError:
            pass  # already gone


async def _close(stream: Any) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1.0):
        try:
            await stream.close()
        except BaseLibp2pError:
            pass  # the peer closed first


def blob_handlers(node: Node) -> dict[str, Any]:
    """Control methods: ``blobs.add`` (serve a local file), ``blobs.fetch``
    (fetch a blob by hash into the store), ``blobs.status``."""
    from pathlib import Path

    from ._control import ControlError

    def svc() -> BlobService:
        if node.blobs is None:
            raise ControlError("the content store is not open yet")
        return node.blobs

    def sha_param(params: dict[str, Any]) -> str:
        sha = params.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ControlError("sha256 (64 lowercase hex digits) is required", code="bad_params")
        return sha

    async def add(params: dict[str, Any]) -> dict[str, Any]:
        path = params.get("path")
        if not isinstance(path, str) or not path.startswith("/"):
            raise ControlError("path (an absolute path to a local file) is required", code="bad_params")
        s = svc()
        try:
            tree = await trio.to_thread.run_sync(lambda: s.store.import_file(Path(path), node.now_ms()))
        except (OSError, StoreError) as exc:
            raise ControlError(f"cannot add {path}: {exc}") from None
        sha = tree.sha256.hex()
        await s.announce(sha)
        return {"sha256": sha, "size_bytes": tree.size, "tree": tree.root.hex()}

    async def fetch(params: dict[str, Any]) -> dict[str, Any]:
        sha, size, tree_hex = sha_param(params), params.get("size_bytes"), params.get("tree")
        sources = params.get("sources") or []
        if type(size) is not int or size < 0:
            raise ControlError("size_bytes (a whole number) is required", code="bad_params")
        if tree_hex is not None and (not isinstance(tree_hex, str) or len(tree_hex) != 64):
            raise ControlError("tree must be 64 hex digits", code="bad_params")
        if not isinstance(sources, list) or not all(isinstance(p, str) for p in sources) or len(sources) > 16:
            raise ControlError("sources: at most 16 peer ids", code="bad_params")
        try:
            tree = await svc().fetch(sha, size, root=bytes.fromhex(tree_hex) if tree_hex else None,
                                     sources=list(sources))
        except FetchError as exc:
            raise ControlError(str(exc), code="fetch_failed") from None
        return {"sha256": sha, "size_bytes": tree.size, "tree": tree.root.hex(), **svc().sources.get(sha, {})}

    async def status(params: dict[str, Any]) -> dict[str, Any]:
        s = svc()
        partials = {}
        for name in sorted(p for p in (s.store.root / "partial").iterdir() if p.name.endswith(".have"))[:256]:
            held = s.store.partial_have(name.name[:-5])
            if held is not None:
                partials[name.name[:-5]] = {"chunks": held[0].chunks, "have": len(held[1])}
        return {"used_bytes": s.store.used_bytes(), "bytes_max": s.store.bytes_max,
                "blob_bytes_max": s.store.blob_bytes_max,
                "blobs": [{"sha256": b.sha256, "size_bytes": b.size, "pins": b.pins} for b in s.store.blobs()[:1000]],
                "partials": partials, "fetching": {k: {"done": v[0], "total": v[1]} for k, v in s.fetching.items()},
                "sources": s.sources, "served": dict(s.served)}

    return {"blobs.add": add, "blobs.fetch": fetch, "blobs.status": status}
