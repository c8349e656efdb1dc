"""Long-lived direct streams: one outbound stream per peer, frames in order.

Formation is a chain of one-peer messages (accept, certificate, confirm) and
each hop is on the critical path of ``job submit``.  Opening a libp2p stream
per message costs a ``new_stream`` and a multistream-select round trip, and
under load that open was the largest single cost of forming a cluster
(``docs/formation.md``: p50 0.5-1.3 s on 16 busy processes).  So a node
keeps one stream per peer it talks to and writes every message to that peer
as one more frame on it:

- :class:`DirectLinks` owns a task per peer with a bounded queue; a message
  waits only for the messages to the same peer queued before it (FIFO per
  peer, which also keeps a peer's log batches in order).
- A link opens its stream when the peer connects (``warm``), or on its
  first message (connecting first, by the
  peer's advert, when there is no connection: formation writes to the
  candidates its advert book names, not only to GossipSub neighbours),
  reopens it once when a write
  fails (the peer restarted, say) and closes after ``idle_s`` without
  messages; at most ``links_max`` links live at once (the least recently
  used one closes to make room).
- The reading side (:func:`serve_frames`) reads frames until the peer closes
  or is idle for ``read_idle_s``, handing each to the caller; a bad frame
  resets the stream (``guarded`` counts it by reason).

Every task runs in the nursery given to :meth:`DirectLinks.run`: nothing is
fire-and-forget, and closing the service closes every link.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID

from ._streams import StreamGone, read_frame, write_frame

log = logging.getLogger("p2pgpu.direct")

links_max = 256
link_queue_max = 1024
idle_s = 300.0
read_idle_s = 600.0
open_timeout_s = 5.0
write_timeout_s = 5.0


class _Link:
    __slots__ = ("peer_id", "recv", "send")

    def __init__(self, peer_id: str) -> None:
        self.peer_id = peer_id
        self.send, self.recv = trio.open_memory_channel[bytes](link_queue_max)


class DirectLinks:
    """Outbound frames to peers over one long-lived stream each."""

    def __init__(self, host: Any, protocol: str, counts: Counter[str], *, prefix: str = "direct",
                 dial: Callable[[str], Awaitable[bool]] | None = None) -> None:
        self.host = host
        #: Connects to a peer we have no connection to (by its advert's addresses).
        self.dial = dial
        self.protocol = TProtocol(protocol)
        self.counts = counts
        self.prefix = prefix
        self._links: OrderedDict[str, _Link] = OrderedDict()
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve links until cancelled (every link task lives in this nursery)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def warm(self, peer_id: str) -> None:
        """Open the stream to a peer now, before there is anything to send (a
        newly connected peer): the first formation message to it then does
        not wait for a stream's negotiation, a round trip on a real link."""
        if self._nursery is not None and peer_id not in self._links and len(self._links) < links_max:
            self._link(peer_id, warm=True)

    def _link(self, peer_id: str, *, warm: bool = False) -> _Link:
        assert self._nursery is not None
        link = self._links.get(peer_id)
        if link is None:
            while len(self._links) >= links_max:
                _, old = self._links.popitem(last=False)
                old.send.close()  # it drains what is queued, then ends
                self.counts[f"{self.prefix}:link_evicted"] += 1
            link = _Link(peer_id)
            self._links[peer_id] = link
            self._nursery.start_soon(self._serve_link, link, warm)
        else:
            self._links.move_to_end(peer_id)
        return link

    def send(self, peer_id: str, data: bytes) -> bool:
        """Queue one frame for ``peer_id``; ``False`` (counted) when it cannot be queued."""
        if self._nursery is None:
            self.counts[f"{self.prefix}:not_running"] += 1
            return False
        link = self._link(peer_id)
        try:
            link.send.send_nowait(data)
        except trio.WouldBlock:
            self.counts[f"{self.prefix}:queue_full"] += 1
            return False
        except trio.ClosedResourceError:
            self.counts[f"{self.prefix}:link_closing"] += 1
            return False
        return True

    @property
    def open_links(self) -> int:
        return len(self._links)

    async def _open(self, peer_id: str, *, dial: bool = True) -> Any:
        with trio.move_on_after(open_timeout_s):
            connected = any(p.to_base58() == peer_id for p in self.host.get_connected_peers())
            if dial and self.dial is not None and not connected and await self.dial(peer_id):
                self.counts[f"{self.prefix}:dialed"] += 1
            try:
                stream = await self.host.new_stream(ID.from_base58(peer_id), [self.protocol])
            except (BaseLibp2pError, ValueError, OSError) as exc:
                log.info("cannot open a direct stream to %s: %s", peer_id, exc)
                return None
            self.counts[f"{self.prefix}:opened"] += 1
            return stream
        log.info("opening a direct stream to %s timed out", peer_id)
        return None

    async def _serve_link(self, link: _Link, warm: bool = False) -> None:
        stream: Any = None
        try:
            if warm:
                stream = await self._open(link.peer_id, dial=False)
                if stream is None:
                    return  # it opens again on the first message
            while True:
                data = None
                with trio.move_on_after(idle_s):
                    try:
                        data = await link.recv.receive()
                    except trio.EndOfChannel:
                        return  # evicted: what was queued has been written
                if data is None:
                    return  # idle
                for attempt in (0, 1):
                    if stream is None:
                        stream = await self._open(link.peer_id)
                        if stream is None:
                            self.counts[f"{self.prefix}:send_failed"] += 1
                            break
                    try:
                        with trio.fail_after(write_timeout_s):
                            await write_frame(stream, data)
                    except (StreamGone, BaseLibp2pError, trio.TooSlowError) as exc:
                        log.info("direct write to %s failed (%s)%s", link.peer_id, exc,
                                 ", reopening" if attempt == 0 else "")
                        await _abandon(stream)
                        stream = None
                        if attempt == 1:
                            self.counts[f"{self.prefix}:send_failed"] += 1
                        continue
                    self.counts[f"{self.prefix}:sent"] += 1
                    break
        finally:
            if self._links.get(link.peer_id) is link:
                del self._links[link.peer_id]
            link.send.close()
            if stream is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                    try:
                        await stream.close()
                    except BaseLibp2pError:
                        pass  # the peer went first: nothing to flush


async def _abandon(stream: Any) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1.0):
        try:
            await stream.reset()
        except BaseLibp2pError:
            pass  # already gone


async def serve_frames(stream: Any, frame_bytes_max: int, on_frame: Callable[[bytes], None]) -> None:
    """Read frames from a peer's long-lived stream until it closes or idles.

    ``on_frame`` may raise ``PeerMisbehaved``: the stream is then reset by
    ``guarded`` (a peer that sends one bad message loses its stream, not
    the node's other state)."""
    while True:
        data = None
        with trio.move_on_after(read_idle_s):
            try:
                data = await read_frame(stream, frame_bytes_max)
            except StreamGone:
                return
        if data is None:
            return  # idle: the sender closes after idle_s, so this one is gone
        on_frame(data)
