"""Inputs by IPFS CID: a small Bitswap client that fetches one file's DAG
from the providers a manifest names, into the content store.

Bitswap (``/ipfs/bitswap/1.2.0`` and ``1.1.0``; messages are unsigned-varint
length-prefixed protobufs, py-libp2p's ``bitswap_pb2``) is one-way per
stream: we send our wantlist on a stream we open, and a provider sends the
blocks back on a stream *it* opens to us, so the node serves the protocol
(:meth:`BitswapService.serve`) and routes each block to the fetch that asked
that peer.  The decisions (which CIDs to want, whether a block is the one a
CID names, whether the DAG stays within its limits, the file's bytes in
order) are the pure core's (``core/_ipfs.py``); this module only moves
bytes: it dials the providers, sends wants, hands blocks over and writes the
file into the store as it grows (:meth:`BlobStore.incoming`: a failed fetch
leaves nothing behind).  The store remembers which CID a blob was fetched as,
so a later job naming the same CID (and size) starts from the store.

Why not py-libp2p's ``BitswapClient``: it keeps every block in memory, drops
a wrong block silently (the fetch then times out with no reason), and has no
depth, fan-out or size limits for a DAG a stranger made.  The node serves no
blocks itself: a want from a peer is read and ignored.

Failures are :class:`CidError` with the reason: no provider reachable, every
provider dropped (a wrong block, "don't have"), the DAG refused (too deep,
too wide, sizes that lie), or no block from any provider for ``stall_s``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import trio
from google.protobuf.message import DecodeError
from libp2p.bitswap.pb.bitswap_pb2 import Message
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr

from p2pgpu.content import BlobStore, StoreError
from p2pgpu.core import PeerMisbehaved, Reason
from p2pgpu.core._chunks import BlobTree
from p2pgpu.core._ipfs import Cid, DagLimits, DagRefused, DagWalk, parse_cid

from ._streams import StreamGone, read_frame, write_frame

log = logging.getLogger("p2pgpu.bitswap")

BITSWAP_PROTOCOLS = [TProtocol("/ipfs/bitswap/1.2.0"), TProtocol("/ipfs/bitswap/1.1.0")]
#: The spec's largest message.
message_bytes_max = 4 << 20
#: Block payloads and presences read from one message (Helia sends a few).
message_items_max = 1024
stall_s_default = 30.0
connect_timeout_s = 15.0
#: Streams a peer may hold open to us, and all peers together.
streams_per_peer_max = 4
streams_max = 64
serve_idle_s = 120.0
#: Blocks queued between the streams that carry them and the fetch that checks them.
events_queued_max = 64


class CidError(Exception):
    """An input by CID could not be fetched; the message says why and from whom."""


@dataclass
class _Fetch:
    walk: DagWalk
    send: trio.MemorySendChannel[tuple[str, str, Cid, bytes]]
    peers: set[str]


@dataclass
class BitswapService:
    """The node's Bitswap side (see the module doc)."""

    host: Any
    counts: Counter[str]
    limits: DagLimits = field(default_factory=DagLimits)
    _fetches: dict[str, list[_Fetch]] = field(default_factory=dict)
    _streams: Counter[str] = field(default_factory=Counter)

    async def serve(self, stream: Any) -> None:
        """A provider's stream to us: route its blocks and "don't have"s.  At
        most ``streams_per_peer_max`` streams per peer and ``streams_max`` in
        all; a stream idle for ``serve_idle_s`` is closed."""
        peer = stream.muxed_conn.peer_id.to_base58()
        if self._streams[peer] >= streams_per_peer_max or sum(self._streams.values()) >= streams_max:
            self.counts["bitswap:streams_refused"] += 1
            raise PeerMisbehaved(Reason.LIMIT_EXCEEDED, "too many Bitswap streams")
        self._streams[peer] += 1
        try:
            await self._serve(stream, peer)
        finally:
            self._streams[peer] -= 1
            if not self._streams[peer]:
                del self._streams[peer]

    async def _serve(self, stream: Any, peer: str) -> None:
        while True:
            frame = None
            with trio.move_on_after(serve_idle_s):
                try:
                    frame = await read_frame(stream, message_bytes_max)
                except StreamGone:
                    return
            if frame is None:
                return
            msg = Message()
            try:
                msg.ParseFromString(frame)
            except DecodeError:
                raise PeerMisbehaved(Reason.MALFORMED, "not a Bitswap message") from None
            if len(msg.payload) + len(msg.blocks) + len(msg.blockPresences) > message_items_max:
                raise PeerMisbehaved(Reason.LIMIT_EXCEEDED, f"more than {message_items_max} blocks in a message")
            fetches = self._fetches.get(peer, [])
            if not fetches:
                if msg.payload or msg.blocks:
                    self.counts["bitswap:unsolicited"] += 1
                continue
            events: list[tuple[str, str, Cid, bytes]] = []
            for block in msg.payload:
                try:
                    cid = Cid.from_prefix(block.prefix, block.data)
                except ValueError as exc:
                    events.append(("bad", peer, _NO_CID, f"a block with a bad prefix: {exc}".encode()))
                    continue
                events.append(("block", peer, cid, block.data))
            for raw in msg.blocks:  # Bitswap 1.0: CIDv0 dag-pb blocks without a prefix
                events.append(("block", peer, Cid.from_prefix(bytes([0, 0x70, 0x12, 0x20]), raw), raw))
            for presence in msg.blockPresences:
                if presence.type == Message.BlockPresenceType.DontHave:
                    try:
                        events.append(("dont_have", peer, Cid.from_bytes(presence.cid), b""))
                    except ValueError:
                        continue
            for ev in events:
                for f in fetches:
                    try:
                        await f.send.send(ev)
                    except trio.BrokenResourceError:
                        pass  # that fetch has ended (its receiving end is closed): nobody wants this block

    async def fetch(self, store: BlobStore, cid_text: str, size: int, providers: list[str], *, now_ms: int,
                    stall_s: float = stall_s_default,
                    progress: Callable[[int, int], None] | None = None) -> BlobTree:
        """Fetch the file ``cid_text`` (``size`` bytes) from ``providers``
        (multiaddrs ending in ``/p2p/<peer id>``) into ``store``.  Raises
        :class:`CidError`; nothing of a failed fetch stays in the store."""
        try:
            root = parse_cid(cid_text)
        except ValueError as exc:
            raise CidError(f"CID {cid_text}: {exc}") from None
        cached = store.blob_of_cid(str(root), size)
        if cached is not None:  # fetched, and every block checked, for an earlier job
            store.touch(cached.sha256.hex(), now_ms)
            self.counts["bitswap:from_store"] += 1
            return cached
        walk = DagWalk(root, size_bytes=size, limits=self.limits)
        peers, failed = await self._connect(providers)
        if not peers:
            raise CidError(f"CID {cid_text}: none of {len(providers)} providers could be reached ("
                           + "; ".join(f"{a}: {why}" for a, why in failed.items()) + ")")
        send, recv = trio.open_memory_channel[tuple[str, str, Cid, bytes]](events_queued_max)
        fetch = _Fetch(walk=walk, send=send, peers=set(peers))
        for p in peers:
            self._fetches.setdefault(p, []).append(fetch)
        streams: dict[str, Any] = {}
        dropped: dict[str, str] = {}
        try:
            with store.incoming(None, size, now_ms) as inc:
                await self._want(streams, peers, dropped, walk.wants())
                while not walk.done:
                    live = [p for p in peers if p not in dropped]
                    if not live:
                        raise CidError(f"CID {cid_text}: every provider was dropped ("
                                       + "; ".join(f"{p[:16]}: {why}" for p, why in dropped.items()) + ")")
                    with trio.move_on_after(stall_s):
                        kind, peer, cid, data = await recv.receive()
                        if peer in dropped:
                            continue
                        if kind == "dont_have":
                            if cid in walk.outstanding():
                                dropped[peer] = f"does not have block {cid}"
                                self.counts["bitswap:dont_have"] += 1
                            continue
                        if kind == "bad":
                            dropped[peer] = data.decode()
                            continue
                        try:
                            for piece in walk.on_block(cid, data):
                                inc.write(piece)
                        except DagRefused as exc:
                            self.counts[f"bitswap:{exc.reason.name.lower()}"] += 1
                            raise CidError(f"CID {cid_text}: refused, {exc.detail} (from {peer[:16]})") from None
                        except PeerMisbehaved as exc:
                            self.counts[f"bitswap:{exc.reason.name.lower()}"] += 1
                            dropped[peer] = str(exc)
                            continue
                        if progress is not None:
                            progress(walk.bytes_out, size)
                        await self._want(streams, live, dropped, walk.wants())
                        continue
                    raise CidError(f"CID {cid_text}: stalled, no block from "
                                   + ", ".join(p[:16] for p in peers if p not in dropped)
                                   + f" for {stall_s:g} s ({walk.bytes_out} of {size} bytes fetched)")
        except StoreError as exc:
            raise CidError(f"CID {cid_text}: {exc}") from None
        finally:
            recv.close()  # a provider's handler blocked on a full queue is released at once
            for p in peers:
                left = [f for f in self._fetches.get(p, []) if f is not fetch]
                if left:
                    self._fetches[p] = left
                else:
                    self._fetches.pop(p, None)
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                for stream in streams.values():
                    try:
                        await stream.reset()
                    except BaseLibp2pError:
                        pass  # already gone
        assert inc.tree is not None
        store.note_cid(str(root), inc.tree.sha256.hex())
        self.counts["bitswap:fetched"] += 1
        return inc.tree

    async def _connect(self, providers: list[str]) -> tuple[list[str], dict[str, str]]:
        peers: list[str] = []
        failed: dict[str, str] = {}

        async def one(addr: str) -> None:
            try:
                info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
            except (ValueError, BaseLibp2pError) as exc:
                failed[addr] = f"not a multiaddr with /p2p/: {exc}"
                return
            with trio.move_on_after(connect_timeout_s):
                try:
                    await self.host.connect(info)
                except (BaseLibp2pError, OSError) as exc:
                    failed[addr] = f"{type(exc).__name__}: {exc}"[:200]
                    return
                peers.append(info.peer_id.to_base58())
                return
            failed[addr] = f"no connection within {connect_timeout_s:g} s"

        async with trio.open_nursery() as n:
            for addr in dict.fromkeys(providers):
                n.start_soon(one, addr)
        return sorted(dict.fromkeys(peers)), failed

    async def _want(self, streams: dict[str, Any], peers: list[str], dropped: dict[str, str], cids: list[Cid]) -> None:
        if not cids:
            return
        msg = Message()
        msg.wantlist.full = False
        for cid in cids:
            msg.wantlist.entries.add(block=cid.to_bytes(), priority=1, wantType=Message.Wantlist.Block,
                                     sendDontHave=True)
        data = msg.SerializeToString()
        for p in peers:
            if p in dropped:
                continue
            try:
                if p not in streams:
                    streams[p] = await self.host.new_stream(ID.from_base58(p), BITSWAP_PROTOCOLS)
                await write_frame(streams[p], data)
            except (BaseLibp2pError, StreamGone, OSError) as exc:
                dropped[p] = f"cannot send it our wants: {type(exc).__name__}"


_NO_CID = Cid(version=1, codec=0x55, digest=bytes(32))
