"""A small GossipSub host for the advert benchmarks, importable and runnable.

``benchmarks/adverts.py`` needs libp2p hosts built the way the node builds
them (Noise only, Yamux, GossipSub with meshsub v1.1 and v1.0, a 1 s
heartbeat, one connection per peer) but must not depend on the node driver
while that is being written, so this module builds them itself with
:func:`open_gossip_node`.  Run as a script it is one peer process of a local
multi-process network, driven by JSON lines on stdin and reporting JSON lines
on stdout:

    python3 benchmarks/_gossip_peer.py --seed-index 3 [--no-patches]

prints ``{"ev": "ready", "addr": ...}``, then accepts ``{"cmd": "connect",
"addrs": [...]}``, ``{"cmd": "publish", "data": <hex>}``, ``{"cmd":
"publish_many", "count": N, "first": i, "rate": r}``, ``{"cmd": "stats"}`` and
``{"cmd": "quit"}``.  Every advert accepted by the topic validator (the full
:class:`p2pgpu.core.AdvertBook` check, Ed25519 included) is reported as
``{"ev": "recv", "tag": ..., "t": <time.time()>}`` when ``--report-each`` is
given; ``stats`` reports counts and the process CPU time.  ``--no-validate``
makes a peer that relays without the advert check (a cheap publisher for the
ingest benchmark).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import resource
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

TOPIC = "/p2pgpu/adverts/1"
NETWORK = "bench"


def cpu_s() -> float:
    """User + system CPU seconds of this process so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def seed_for(index: int) -> bytes:
    return hashlib.sha256(b"p2pgpu-bench-peer-%d" % index).digest()


@asynccontextmanager
async def open_gossip_node(
    seed: bytes,
    *,
    port: int = 0,
    degree: int = 6,
    degree_low: int = 4,
    degree_high: int = 12,
    heartbeat_interval_s: int = 1,
) -> AsyncIterator[tuple[Any, Any, Any]]:
    """A running ``(host, pubsub, gossipsub)`` on 127.0.0.1, built as the node
    builds it.  Spam protection is off: upstream's limit (10 msg/s per
    forwarder and topic) would cap ingest far below the goal; the topic
    validator and peer scoring are what guard the node."""
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.crypto.x25519 import create_new_key_pair as create_x25519
    from libp2p.network.config import ConnectionConfig
    from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
    from libp2p.security.noise.transport import Transport as NoiseTransport
    from libp2p.tools.anyio_service import background_trio_service
    from multiaddr import Multiaddr

    # The node's classes: with their patches off they are upstream's.
    from p2pgpu.node._patches import FastGossipSub as GossipSub
    from p2pgpu.node._patches import FastPubsub as Pubsub

    key_pair = create_new_key_pair(seed)
    sec_opt = {NOISE_ID: NoiseTransport(key_pair, noise_privkey=create_x25519().private_key)}
    host = new_host(
        key_pair=key_pair,
        sec_opt=sec_opt,
        muxer_preference="YAMUX",
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )
    gossipsub = GossipSub(
        [PROTOCOL_ID_V11, PROTOCOL_ID],
        degree=degree,
        degree_low=degree_low,
        degree_high=degree_high,
        heartbeat_interval=heartbeat_interval_s,
        spam_protection_enabled=False,
        eclipse_protection_enabled=False,  # every benchmark peer is on 127.0.0.1
    )
    pubsub = Pubsub(host, gossipsub)
    try:
        async with host.run([Multiaddr(f"/ip4/127.0.0.1/tcp/{port}")]):
            try:
                async with background_trio_service(pubsub), background_trio_service(gossipsub):
                    await pubsub.wait_until_ready()
                    yield host, pubsub, gossipsub
            finally:
                # leaving host.run() leaves the swarm's sockets open: close them
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await host.get_network().close()
    finally:
        pubsub.seen_messages.stop()


async def connect(host: Any, addr: str) -> None:
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from multiaddr import Multiaddr

    await host.connect(info_from_p2p_addr(Multiaddr(addr)))


async def wait_drained(pubsub: Any, timeout_s: float = 5.0) -> None:
    """Wait until every outbound peer queue is empty (bounded)."""
    with trio.move_on_after(timeout_s):
        while any(len(q) for q in pubsub.peer_queues.values()):
            await trio.sleep(0.002)


def make_adverts(index: int, count: int, first: int, now_ms: int) -> list[bytes]:
    """``count`` signed adverts from identities derived from ``index``: each
    identity signs increasing sequence numbers so none is a replay."""
    import random

    from p2pgpu.core import Advert, GpuInfo, Identity, sign_advert

    idents = [Identity(hashlib.sha256(b"adv-%d-%d" % (index, k)).digest()) for k in range(16)]
    rng = random.Random(index)
    out = []
    for i in range(first, first + count):
        ident = idents[i % len(idents)]
        adv = Advert(
            peer_id=ident.peer_id, network=NETWORK, addrs=(f"/ip4/127.0.0.1/tcp/{4000 + index}",),
            seq=now_ms + i, issued_at_ms=now_ms, expires_at_ms=now_ms + 600_000,
            gpus=(GpuInfo(model="NVIDIA H100 80GB HBM3", memory_mb=81559, compute_capability="9.0",
                          driver_version="550.54", cuda_version="12.4", uuid_hash=f"{rng.getrandbits(128):032x}"),),
            gpus_free=1, price_per_gpu_hour=2_000_000, currency="SOL", payout_address="",
            region="eu-west", runtimes=("process",), simulated=True,
        )
        out.append(sign_advert(ident, adv).wire)
    return out


class AdvertSink:
    """The topic validator and subscriber of a benchmark peer."""

    def __init__(self) -> None:
        from p2pgpu.core import AdvertBook

        self.book = AdvertBook(network=NETWORK, allow_simulated=True, adverts_max=100_000)
        self.valid = 0
        self.invalid = 0
        self.delivered = 0
        self.first_valid_t = 0.0
        self.last_valid_t = 0.0

    def validator(self, forwarder: Any, msg: Any) -> bool:
        from p2pgpu.core import PeerMisbehaved

        try:
            self.book.ingest(msg.data, int(time.time() * 1000))
        except PeerMisbehaved:
            self.invalid += 1
            return False
        self.valid += 1
        self.last_valid_t = time.time()
        if not self.first_valid_t:
            self.first_valid_t = self.last_valid_t
        return True


async def _serve(args: argparse.Namespace) -> None:
    if not args.no_patches:
        from p2pgpu.node import _patches

        _patches.apply()
    sink = AdvertSink()
    out = sys.stdout

    def emit(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    async with open_gossip_node(seed_for(args.seed_index)) as (host, pubsub, _gs):
        if not args.no_validate:
            pubsub.set_topic_validator(TOPIC, sink.validator, is_async_validator=False)
        sub = await pubsub.subscribe(TOPIC)
        emit({"ev": "ready", "addr": str(host.get_addrs()[0]), "pid": os.getpid()})

        async def consume() -> None:
            while True:
                msg = await sub.get()
                sink.delivered += 1
                if args.report_each:
                    emit({"ev": "recv", "tag": hashlib.sha256(msg.data).hexdigest()[:16], "t": time.time()})

        stdin = trio.wrap_file(sys.stdin)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            async for line in stdin:
                cmd = json.loads(line)
                op = cmd["cmd"]
                if op == "connect":
                    for addr in cmd["addrs"]:
                        await connect(host, addr)
                    emit({"ev": "connected", "n": len(cmd["addrs"])})
                elif op == "peers":
                    mesh = pubsub.router.mesh.get(TOPIC, set())
                    emit({"ev": "peers", "pubsub": len(pubsub.peers), "mesh": len(mesh),
                          "topic_peers": len(pubsub.peer_topics.get(TOPIC, ()))})
                elif op == "publish":
                    data = bytes.fromhex(cmd["data"])
                    emit({"ev": "published", "tag": hashlib.sha256(data).hexdigest()[:16], "t": time.time()})
                    await pubsub.publish(TOPIC, data)
                elif op == "publish_many":
                    wires = make_adverts(args.seed_index, cmd["count"], cmd.get("first", 0),
                                         int(time.time() * 1000))
                    t0, c0 = time.time(), cpu_s()
                    for i, wire in enumerate(wires):
                        await pubsub.publish(TOPIC, wire)
                        if i % 16 == 15:
                            await wait_drained(pubsub)
                    await wait_drained(pubsub)
                    emit({"ev": "published_many", "n": len(wires), "wall_s": time.time() - t0,
                          "cpu_s": cpu_s() - c0})
                elif op == "stats":
                    emit({"ev": "stats", "valid": sink.valid, "invalid": sink.invalid,
                          "delivered": sink.delivered, "cpu_s": cpu_s(), "t": time.time(),
                          "first_valid_t": sink.first_valid_t, "last_valid_t": sink.last_valid_t})
                elif op == "quit":
                    break
            nursery.cancel_scope.cancel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed-index", type=int, required=True)
    ap.add_argument("--no-patches", action="store_true")
    ap.add_argument("--report-each", action="store_true")
    ap.add_argument("--no-validate", action="store_true", help="relay without the advert validator")
    args = ap.parse_args()
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    trio.run(_serve, args)


if __name__ == "__main__":
    main()
