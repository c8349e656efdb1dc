"""A hostile libp2p peer in the test process, and the floods it sends.

It is a real py-libp2p host (``open_stack``, with its own identity) that
connects to real node processes and speaks our protocols: it publishes on our
topics, opens our streams, or just holds connections.  Used by the flood and
connection attack tests (``test_flood_*.py``).
"""

from __future__ import annotations

import functools
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import multiaddr
import trio
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.peerinfo import info_from_p2p_addr

from p2pgpu.core import Advert, GpuInfo, Identity, sign_advert
from p2pgpu.node._stack import Stack, open_stack

L4 = GpuInfo(model="NVIDIA L4", memory_mb=23034, compute_capability="8.9")


@asynccontextmanager
async def flood_peer(seed: bytes, *, connect_to: list[str], listen: str = "/ip4/127.0.0.1/tcp/0"
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


@asynccontextmanager
async def sybil_hosts(n: int, *, source_ip: str, target: str, seed: int) -> AsyncIterator[list[str]]:
    """``n`` bare libp2p hosts, each a fresh identity whose TCP connections
    leave from ``source_ip`` (any 127.x.y.z is loopback), each trying to hold
    one connection to ``target``.  Yields the peer ids that got connected.
    Each host lives in its own task (no deep nesting), and its auto-connector
    is stopped: they hold what they got, as in #18.6."""
    connected: list[str] = []
    async with trio.open_nursery() as nursery:
        for k in range(n):
            key = seed.to_bytes(4, "big") + k.to_bytes(4, "big") + bytes(24)
            pid = await nursery.start(_hold_one_connection, key, source_ip, target)
            if pid:
                connected.append(pid)
        yield connected
        nursery.cancel_scope.cancel()


async def _hold_one_connection(seed: bytes, source_ip: str, target: str,
                               task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
    from libp2p.network.config import ConnectionConfig, RetryConfig
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE
    from libp2p.security.noise.transport import Transport as NoiseTransport
    from libp2p.transport.tcp.tcp import TCP

    kp = create_new_key_pair(seed)
    host = new_host(key_pair=kp, sec_opt={NOISE: NoiseTransport(kp, noise_privkey=create_x25519_key_pair().private_key)},
                    muxer_preference="YAMUX", connection_config=ConnectionConfig(max_connections_per_peer=1))
    swarm = host.get_network()
    swarm.retry_config = RetryConfig(max_retries=0)
    for t in swarm.transport_manager.get_transports():
        if isinstance(t, TCP):
            t.dial = functools.partial(t.dial_with_source, source=(source_ip, 0))  # type: ignore[method-assign]
    async with host.run([]):
        await swarm.auto_connector.stop()
        try:
            with trio.fail_after(10):
                await host.connect(info_from_p2p_addr(multiaddr.Multiaddr(target)))
        except (BaseLibp2pError, OSError, trio.TooSlowError):
            task_status.started("")  # refused: what a limit should do
            return
        task_status.started(host.get_id().to_base58())
        try:
            await trio.sleep_forever()
        finally:
            # Leaving host.run() would leave the socket open (see _stack._close_network).
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                for conn in list(swarm.get_connections()):
                    await conn.close()
