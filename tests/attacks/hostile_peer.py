"""A hostile peer for the attack suite: a libp2p host in the test process, with
its own identity, that speaks the node's protocol (after
``tests/node/test_adversary.py``).

It can publish on the adverts and jobs topics, read what arrives there,
send any signed message to a peer over the direct protocol (one fresh stream
per message: a node resets a stream that carried a message it refused), and
receive what nodes send it directly.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import trio
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr

from p2pgpu.core import Identity, PeerMisbehaved
from p2pgpu.core._formation_messages import decode_message
from p2pgpu.core._manifest import SignedManifest
from p2pgpu.node._direct import serve_frames
from p2pgpu.node._jobs import DIRECT_PROTOCOL, frame_bytes_max
from p2pgpu.node._stack import Stack, open_stack
from p2pgpu.node._streams import StreamGone, write_frame

ADVERTS_TOPIC = "/p2pgpu/adverts/1"


@dataclass
class Hostile:
    stack: Stack
    identity: Identity
    #: Frames nodes sent us on the direct protocol.
    inbox_send: Any = None
    inbox: Any = None
    sent: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    #: Subscriptions by topic (``open_hostile(topics=...)``).
    subs: dict[str, Any] = field(default_factory=dict)

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    async def send(self, peer_id: str, data: bytes) -> bool:
        """One message to a peer on a fresh direct stream."""
        try:
            with trio.fail_after(5):
                stream = await self.stack.host.new_stream(ID.from_base58(peer_id), [TProtocol(DIRECT_PROTOCOL)])
                await write_frame(stream, data)
                await stream.close()
        except (BaseLibp2pError, StreamGone, trio.TooSlowError) as exc:
            self.failed += 1
            self.errors.append(f"{type(exc).__name__}: {exc}"[:200])
            return False
        self.sent += 1
        return True

    async def stream_frames(self, peer_id: str, frames: Any) -> int:
        """Write many frames on one direct stream, opening a new one whenever
        the node resets it (it does after a message it refuses).  Returns how
        many streams it took."""
        streams, stream = 0, None
        for data in frames:
            for _ in range(3):
                try:
                    if stream is None:
                        with trio.fail_after(5):
                            stream = await self.stack.host.new_stream(ID.from_base58(peer_id),
                                                                      [TProtocol(DIRECT_PROTOCOL)])
                        streams += 1
                    await write_frame(stream, data)
                    self.sent += 1
                    break
                except (BaseLibp2pError, StreamGone, trio.TooSlowError) as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc}"[:200])
                    stream = None
            else:
                self.failed += 1
        if stream is not None:
            try:
                await stream.close()
            except BaseLibp2pError:
                pass  # reset by the node as we finished: nothing left to send
        return streams

    async def publish(self, topic: str, data: bytes) -> None:
        await self.stack.pubsub.publish(topic, data)

    async def flood(self, topic: str, messages: list[bytes], *, seconds: float, queue_max: int = 24) -> int:
        """Publish ``messages`` on ``topic`` spread over ``seconds``, as fast as
        the peers take them (GossipSub drops what overflows a peer's queue:
        wait while any queue holds ``queue_max``).  Returns how many went out."""
        start = trio.current_time()
        for i, data in enumerate(messages):
            with trio.move_on_after(5):
                while any(len(q) >= queue_max for q in self.stack.pubsub.peer_queues.values()):
                    await trio.sleep(0.001)
            await self.stack.pubsub.publish(topic, data)
            ahead = start + seconds * (i + 1) / len(messages) - trio.current_time()
            if ahead > 0:
                await trio.sleep(ahead)
        return len(messages)

    async def connect(self, addr: str) -> None:
        await self.stack.host.connect(info_from_p2p_addr(multiaddr.Multiaddr(addr)))


@asynccontextmanager
async def open_hostile(node_addr: str, seed: bytes, *, topics: tuple[str, ...] = ()) -> AsyncIterator[Hostile]:
    """A hostile host connected to the node at ``node_addr``, subscribed to
    ``topics`` (wait for the mesh before relying on them)."""
    async with open_stack(seed, ["/ip4/127.0.0.1/tcp/0"], dht_validators={}) as stack:
        send, recv = trio.open_memory_channel[bytes](4096)
        hostile = Hostile(stack=stack, identity=Identity(seed), inbox_send=send, inbox=recv)

        async def serve(stream: Any) -> None:
            def on_frame(data: bytes) -> None:
                try:
                    send.send_nowait(data)
                except trio.WouldBlock:
                    pass  # a test that does not read its inbox does not need it
            try:
                await serve_frames(stream, frame_bytes_max, on_frame)
            except (BaseLibp2pError, PeerMisbehaved):
                pass  # the node went away mid-frame: nothing for a test to do

        stack.host.set_stream_handler(TProtocol(DIRECT_PROTOCOL), serve)
        for topic in topics:
            hostile.subs[topic] = await stack.pubsub.subscribe(topic)
        await stack.host.connect(info_from_p2p_addr(multiaddr.Multiaddr(node_addr)))
        yield hostile


async def manifests(sub: Any) -> AsyncGenerator[SignedManifest, None]:
    """Manifests arriving on a jobs-topic subscription."""
    while True:
        msg = await sub.get()
        try:
            decoded = decode_message(msg.data)
        except PeerMisbehaved:
            continue
        if isinstance(decoded, SignedManifest):
            yield decoded
