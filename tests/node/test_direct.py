"""Long-lived direct streams (``p2pgpu/node/_direct.py``) between real libp2p
hosts on 127.0.0.1: frames arrive in order over one stream per peer, a peer
we are not connected to is dialled first, a link reopens after the peer
drops it, and a bad frame costs the sender its stream, not the receiver."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import multiaddr
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr

from p2pgpu.core import PeerMisbehaved, Reason
from p2pgpu.node._direct import DirectLinks, serve_frames
from p2pgpu.node._stack import open_stack
from p2pgpu.node._streams import guarded

PROTOCOL = "/p2pgpu/test-direct/1.0.0"


class Receiver:
    def __init__(self, counts: Counter[str]) -> None:
        self.frames: list[bytes] = []
        self.streams = 0
        self.got = trio.Event()
        self.want = 0
        self.counts = counts

    async def handler(self, stream: Any) -> None:
        self.streams += 1
        await serve_frames(stream, 1024, self.on_frame)

    def on_frame(self, data: bytes) -> None:
        if data == b"bad":
            raise PeerMisbehaved(Reason.MALFORMED, "a test's bad frame")
        self.frames.append(data)
        if len(self.frames) >= self.want:
            self.got.set()

    async def wait_for(self, n: int) -> None:
        self.want = n
        if len(self.frames) < n:
            self.got = trio.Event()
            with trio.fail_after(30):
                await self.got.wait()


@asynccontextmanager
async def two_hosts(counts: Counter[str]) -> AsyncIterator[tuple[Any, Any, Receiver]]:
    """Hosts A and B on 127.0.0.1, not connected; A serves PROTOCOL into a Receiver."""
    async with AsyncExitStack() as ex:
        a = await ex.enter_async_context(open_stack(b"d" * 32, ["/ip4/127.0.0.1/tcp/0"], dht_validators={}))
        b = await ex.enter_async_context(open_stack(b"e" * 32, ["/ip4/127.0.0.1/tcp/0"], dht_validators={}))
        recv = Receiver(counts)
        a.host.set_stream_handler(PROTOCOL, guarded("test", recv.handler, counts, timeout_s=600))
        yield a, b, recv


async def test_frames_in_order_on_one_stream_and_dialing_a_stranger() -> None:
    counts: Counter[str] = Counter()
    async with two_hosts(counts) as (a, b, recv):
        a_id = a.host.get_id().to_base58()
        dialled: list[str] = []

        async def dial(peer_id: str) -> bool:  # what Node.dial_peer does with the advert's addresses
            dialled.append(peer_id)
            await b.host.connect(info_from_p2p_addr(multiaddr.Multiaddr(a.addrs()[0])))
            return True

        links = DirectLinks(b.host, PROTOCOL, counts, prefix="t", dial=dial)
        async with trio.open_nursery() as nursery:
            await nursery.start(links.run)
            assert b.host.get_connected_peers() == []  # B does not know A yet
            for i in range(50):
                assert links.send(a_id, b"frame-%d" % i)
            await recv.wait_for(50)
            assert recv.frames == [b"frame-%d" % i for i in range(50)]
            assert recv.streams == 1 and counts["t:opened"] == 1 and counts["t:sent"] == 50
            assert dialled == [a_id] and counts["t:dialed"] == 1
            assert links.open_links == 1

            # A bad frame resets the stream (counted by reason at A); the link reopens for the next one.
            assert links.send(a_id, b"bad")
            with trio.fail_after(30):
                while not counts["test:malformed"]:
                    await trio.sleep(0.01)
            # What B writes before it has seen A's reset is lost with that stream
            # (formation resends what matters), so keep sending until one arrives.
            with trio.fail_after(30):
                k = 0
                while not any(f.startswith(b"after") for f in recv.frames):
                    links.send(a_id, b"after-%d" % k)
                    k += 1
                    await trio.sleep(0.1)
            assert recv.streams == 2 and counts["t:opened"] == 2
            nursery.cancel_scope.cancel()


async def test_a_warm_link_opens_before_the_first_message_and_is_reused() -> None:
    counts: Counter[str] = Counter()
    async with two_hosts(counts) as (a, b, recv):
        await b.host.connect(info_from_p2p_addr(multiaddr.Multiaddr(a.addrs()[0])))
        links = DirectLinks(b.host, PROTOCOL, counts, prefix="t")
        a_id = a.host.get_id().to_base58()
        async with trio.open_nursery() as nursery:
            await nursery.start(links.run)
            links.warm(a_id)
            with trio.fail_after(30):
                # The receiver may see the stream before new_stream returns on our side.
                while recv.streams < 1 or counts["t:opened"] < 1:
                    await trio.sleep(0.01)
            assert counts["t:opened"] == 1 and recv.frames == []
            links.warm(a_id)  # already open: nothing more
            links.send(a_id, b"first")
            await recv.wait_for(1)
            assert recv.frames == [b"first"] and recv.streams == 1 and counts["t:opened"] == 1
            nursery.cancel_scope.cancel()


async def test_sending_before_running_or_to_a_full_queue_is_refused_and_counted() -> None:
    counts: Counter[str] = Counter()
    links = DirectLinks(None, PROTOCOL, counts, prefix="t")
    assert not links.send("12D3KooWanything", b"x")
    assert counts["t:not_running"] == 1
