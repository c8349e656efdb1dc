"""A hostile peer that floods the jobs topic with one identity's manifests.

Run by ``benchmarks/formation_flood.py`` as a child process (it dies with
its parent: it reads its stdin and exits when that closes):

    python3 benchmarks/_flood_peer.py --count 5000 --seconds 5.5 ADDR [ADDR...]

It connects to the nodes at ADDR, signs ``--count`` valid manifests of
1-GPU jobs any node can serve (one identity, one payer), waits for the
GossipSub mesh, prints ``ready``, then on a line ``go`` on stdin publishes
them spread over ``--seconds`` (as fast as its peers take them: GossipSub
drops what overflows a peer's queue), and prints ``done N SECONDS``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import multiaddr
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr

from p2pgpu.core import Identity
from p2pgpu.core._manifest import Manifest, sign_manifest
from p2pgpu.node import wall_ms
from p2pgpu.node._jobs import JOBS_TOPIC
from p2pgpu.node._stack import open_stack

queue_max = 24


def manifests(identity: Identity, n: int) -> list[bytes]:
    rng, now = random.Random(183), wall_ms()
    return [sign_manifest(identity, Manifest(
        name=f"flood-{i}", submitter=identity.peer_id, created_at_ms=now, expires_at_ms=now + 600_000,
        nonce=rng.randbytes(16), nodes=1, gpus_per_node=1, command=("true",), duration_s_max=30,
        price_per_gpu_hour_max=36_000_000, payer="11111111111111111111111111111111")).wire for i in range(n)]


async def main(addrs: list[str], count: int, seconds: float) -> None:
    seed = bytes([183]) * 32
    data = manifests(Identity(seed), count)
    async with open_stack(seed, ["/ip4/127.0.0.1/tcp/0"], dht_validators={}) as stack:
        await stack.pubsub.subscribe(JOBS_TOPIC)
        for a in addrs:
            await stack.host.connect(info_from_p2p_addr(multiaddr.Multiaddr(a)))
        await trio.sleep(2.5)  # the mesh forms (1 s heartbeats)
        print("ready", flush=True)
        line = await trio.to_thread.run_sync(sys.stdin.readline)
        if line.strip() != "go":
            return
        start = trio.current_time()
        for i, msg in enumerate(data):
            with trio.move_on_after(5):
                while any(len(q) >= queue_max for q in stack.pubsub.peer_queues.values()):
                    await trio.sleep(0.001)
            await stack.pubsub.publish(JOBS_TOPIC, msg)
            ahead = start + seconds * (i + 1) / count - trio.current_time()
            if ahead > 0:
                await trio.sleep(ahead)
        print(f"done {count} {trio.current_time() - start:.1f}", flush=True)
        await trio.to_thread.run_sync(sys.stdin.readline)  # stay connected until told (or the parent dies)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("addrs", nargs="+")
    ap.add_argument("--count", type=int, default=5000)
    ap.add_argument("--seconds", type=float, default=5.5)
    args = ap.parse_args()
    trio.run(main, args.addrs, args.count, args.seconds)
