"""A hostile libp2p peer in the test process, and the floods it sends.

It is a real py-libp2p host (``open_stack``, with its own identity) that
connects to real node processes and speaks our protocols: it publishes on our
topics, opens our streams, or just holds connections.  Used by the flood and
connection attack tests (``test_flood_*.py``).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import multiaddr
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr

from p2pgpu.core import Advert, GpuInfo, Identity, sign_advert
from p2pgpu.node._stack import Stack, open_stack

L4 = GpuInfo(model="NVIDIA L4", memory_mb=23034, compute_capability="8.9")


@asynccontextmanager
async def hostile_peer(seed: bytes, *, connect_to: list[str], listen: str = "/ip4/127.0.0.1/tcp/0"
                       ) -> AsyncIterator[Stack]:
    async with open_stack(seed, [listen], dht_validators={}) as stack:
        for addr in connect_to:
            await stack.host.connect(info_from_p2p_addr(multiaddr.Multiaddr(addr)))
        yield stack


def fresh_identity_adverts(n: int, *, now_ms: int, ttl_ms: int = 3_600_000, network: str = "local",
                           seed: int = 1) -> list[bytes]:
    """``n`` valid signed adverts, each from a fresh identity (what a Sybil
    flood costs: one key and one signature each)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ident = Identity.from_rng(rng)
        adv = Advert(peer_id=ident.peer_id, network=network, addrs=(), seq=now_ms, issued_at_ms=now_ms,
                     expires_at_ms=now_ms + ttl_ms, gpus=(L4,), gpus_free=1, price_per_gpu_hour=1,
                     currency="SOL", payout_address="", region="local", runtimes=("process",), simulated=True)
        out.append(sign_advert(ident, adv).wire)
    return out


async def publish_paced(stack: Stack, topic: str, payloads: list[bytes], *, batch: int = 200) -> None:
    """Publish everything, letting the outbound queues drain between batches
    (py-libp2p drops what overflows them, silently: libp2p notes, trap 2)."""
    for i in range(0, len(payloads), batch):
        for data in payloads[i:i + batch]:
            await stack.pubsub.publish(topic, data)
        with trio.fail_after(120):
            while any(len(q) for q in stack.pubsub.peer_queues.values()):
                await trio.sleep(0.01)
