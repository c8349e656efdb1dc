"""#18.5: the DHT stores only what our namespaces allow, bounded.

The attack, as reported: 300 records of 1 MB each under keys outside the
node's namespaces were accepted and kept; the node went from 117 to 421 MB of
memory and stayed there after the attacker left.

Here a hostile peer PUTs 300 records of ~1 MB to a real node (under a foreign
namespace, under no namespace, and under ours with garbage), then 40 valid
signed advert records of fresh identities.  Nothing foreign is kept, the
node's memory does not grow by the flood, and one peer places at most its
quota of valid records.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from flood_peer import L4, flood_peer
from libp2p.peer.id import ID

from p2pgpu.core import Advert, Identity, advert_key, sign_advert
from p2pgpu.localnet import LocalNet
from p2pgpu.node import wall_ms
from p2pgpu.node._dhtstore import DhtLimits

pytestmark = pytest.mark.processes

MIX = [("NVIDIA L4", 23034, "8.9", 1)]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _advert_record(seed: int) -> tuple[str, bytes]:
    ident = Identity(seed.to_bytes(32, "big"))
    now = wall_ms()
    adv = Advert(peer_id=ident.peer_id, network="local", addrs=(), seq=now, issued_at_ms=now,
                 expires_at_ms=now + 600_000, gpus=(L4,), gpus_free=1, price_per_gpu_hour=1, currency="SOL",
                 payout_address="", region="local", runtimes=("process",), simulated=True)
    return advert_key(ident.peer_id), sign_advert(ident, adv).wire


async def test_dht_keeps_nothing_foreign_and_bounds_what_it_keeps(tmp_path: Path) -> None:
    net = LocalNet(tmp_path, 1, gpu_mix=MIX)
    await trio.to_thread.run_sync(net.start)
    try:
        node = net.nodes[0]
        before_status = await trio.to_thread.run_sync(node.call, "status")
        await trio.sleep(1.0)
        rss_before = rss_mb(node.proc.pid)
        target = ID.from_base58(node.peer_id)
        async with flood_peer(b"D" * 32, connect_to=[node.addrs[0]]) as atk:
            big = b"\xaa" * 1_000_000
            stored = 0
            for i in range(300):
                key = [f"/evil/{i}", f"plain-{i}", f"/p2pgpu/a/{i:032x}"][i % 3].encode()
                if await atk.dht.value_store._store_at_peer(target, key, big):
                    stored += 1
            assert stored == 0
            valid = 0
            for i in range(40):
                key, wire = _advert_record(1000 + i)
                if await atk.dht.value_store._store_at_peer(target, key.encode(), wire):
                    valid += 1
            assert valid == DhtLimits().values_per_peer_max
        await trio.sleep(1.0)
        st = await trio.to_thread.run_sync(node.call, "status")
        grew = rss_mb(node.proc.pid) - rss_before
        assert grew < 60, f"the node's memory grew by {grew:.0f} MB"
        dht = st["dht"]
        # (+1: the node's own advert record, put once it has a peer)
        assert dht["values"] <= before_status["dht"]["values"] + DhtLimits().values_per_peer_max + 1
        assert dht["value_bytes"] < 200_000
        assert dht["refused"].get("values:per_peer", 0) == 40 - valid
        assert st["counters"].get("dht:oversized", 0) >= 100  # our namespace, but not an advert
        assert node.proc.poll() is None
    finally:
        await trio.to_thread.run_sync(net.stop)
