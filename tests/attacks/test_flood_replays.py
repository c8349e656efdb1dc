"""#13: a flood of replays: a real node never penalises a peer for forwarding a replay or an expired advert.

Before, the node's advert validator answered a bool, so every refused advert
cost its forwarder GossipSub score (P4, weight 10, graylisted below -100).  A
peer that honestly relays a burst of duplicates of an old advert (a replay is
the receiver's state, not the relay's fault) was graylisted for ~20 s: the
node stopped forwarding it anything.  Here peer P relays 100 copies of an
advert the node already has and 20 expired ones to node 0, then must keep
receiving node 1's advert refreshes through node 0.  Bad bytes from P are
still rejected (counted by reason).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from flood_peer import fresh_identity_adverts, flood_peer, publish_paced

from p2pgpu.core import verify_advert_bytes
from p2pgpu.localnet import LocalNet
from p2pgpu.node import ADVERTS_TOPIC, wall_ms

pytestmark = pytest.mark.processes

MIX = [("NVIDIA L4", 23034, "8.9", 1)]


async def test_relaying_replays_and_expired_adverts_costs_no_score(tmp_path: Path) -> None:
    net = LocalNet(tmp_path, 2, gpu_mix=MIX, advert_ttl_s=4)  # node 1 refreshes every 2 s
    await trio.to_thread.run_sync(net.start)
    try:
        node0, node1 = net.nodes
        async with flood_peer(b"P" * 32, connect_to=[node0.addrs[0]]) as relay:
            sub = await relay.pubsub.subscribe(ADVERTS_TOPIC)
            await trio.sleep(2.5)  # mesh
            old = fresh_identity_adverts(1, now_ms=wall_ms(), seed=5)[0]
            expired = fresh_identity_adverts(20, now_ms=wall_ms() - 3_700_000, seed=6)
            await publish_paced(relay, ADVERTS_TOPIC, [old] * 101 + expired)

            def counted() -> dict[str, int] | None:
                rej = node0.call("status")["rejections"]
                return rej if rej.get("replayed", 0) >= 100 and rej.get("expired", 0) >= 20 else None

            rejections = await trio.to_thread.run_sync(lambda: net.wait_until(counted, timeout_s=30))
            assert rejections["replayed"] >= 100 and rejections["expired"] >= 20
            # Still in node 0's good books: node 1's next refreshes reach P through it.
            node1_pid = node1.peer_id
            after = wall_ms()  # (older refreshes may wait in P's subscription buffer)
            with trio.fail_after(10):
                while True:
                    msg = await sub.get()
                    adv = verify_advert_bytes(msg.data).advert
                    if adv.peer_id == node1_pid and adv.issued_at_ms > after:
                        break
            # Bad bytes are still the relay's fault: rejected and counted.
            await relay.pubsub.publish(ADVERTS_TOPIC, b"\x80" * 9000)
            await trio.to_thread.run_sync(lambda: net.wait_until(
                lambda: node0.call("status")["rejections"].get("oversized", 0) >= 1, timeout_s=30))
    finally:
        await trio.to_thread.run_sync(net.stop)
