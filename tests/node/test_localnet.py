"""Real ``p2pgpu node run`` processes on 127.0.0.1 (issue 2's "done when").

Six daemons bootstrap from one another; each must list the others' GPUs in
``market --json``; a DHT provider lookup for a GPU class must return exactly
the nodes of that class; a restarted node keeps its peer id; SIGTERM ends
every process within seconds with nothing left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from p2pgpu.core import GpuInfo
from p2pgpu.localnet import LocalNet

pytestmark = pytest.mark.processes

#: Three classes, two nodes each, so "exactly the nodes of that class" means something.
MIX = [
    ("NVIDIA H100 80GB HBM3", 81559, "9.0", 2),
    ("NVIDIA A100-SXM4-40GB", 40960, "8.0", 4),
    ("NVIDIA L4", 23034, "8.9", 1),
]


def cli(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "p2pgpu.cli", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def gpu_class(model: str, memory_mb: int, cc: str) -> str:
    return GpuInfo(model=model, memory_mb=memory_mb, compute_capability=cc).gpu_class


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("localnet")
    with LocalNet(root, 6, gpu_mix=MIX) as net:
        yield net


def _markets_complete(net: LocalNet) -> bool:
    ids = {n.peer_id for n in net.nodes}
    return all({r["peer_id"] for r in n.call("market")} >= ids for n in net.nodes)


def test_every_market_lists_every_other_node(net: LocalNet) -> None:
    net.wait_until(lambda: _markets_complete(net), timeout_s=60, what="all markets complete")
    for node in net.nodes:
        rows = json.loads(cli("market", "--json", "--home", str(node.home.path)))
        by_peer = {r["peer_id"]: r for r in rows}
        for other in net.nodes:
            model, memory_mb, _cc, count = MIX[other.index % len(MIX)]
            row = by_peer[other.peer_id]
            assert row["gpus"] == [{"model": model, "memory_mb": memory_mb, "count": count}]
            assert row["region"] == "local" and row["expires_at"] > 0 and row["price"] > 0
    status = json.loads(cli("status", "--json", "--home", str(net.nodes[3].home.path)))
    assert status["peers"] >= 1 and status["adverts_known"] == 6
    assert all(a.endswith("/p2p/" + status["peer_id"]) for a in status["addrs"])
    filtered = json.loads(cli("market", "--json", "--home", str(net.nodes[0].home.path), "--min-vram-gb", "60"))
    assert {r["peer_id"] for r in filtered} == {n.peer_id for n in net.nodes if n.index % 3 == 0}


def test_dht_provider_lookup_returns_exactly_the_class(net: LocalNet) -> None:
    for k, (model, memory_mb, cc, _count) in enumerate(MIX):
        want = sorted(n.peer_id for n in net.nodes if n.index % len(MIX) == k)
        cls = gpu_class(model, memory_mb, cc)
        asker = net.nodes[(k + 1) % 6]
        got = net.wait_until(
            lambda: (lambda r: r if r == want else None)(asker.call("dht.providers", {"gpu_class": cls})),
            timeout_s=60, what=f"providers of {cls}")
        assert got == want


def test_dht_holds_each_signed_advert(net: LocalNet) -> None:
    target = net.nodes[4]
    doc = net.wait_until(lambda: (lambda d: d if d["found"] else None)(
        net.nodes[1].call("dht.get_advert", {"peer_id": target.peer_id})), timeout_s=60, what="DHT advert")
    assert doc["advert"]["peer_id"] == target.peer_id


def test_restart_keeps_peer_id_and_rejoins(net: LocalNet) -> None:
    before = net.nodes[5].peer_id
    node = net.restart(5)
    assert node.peer_id == before
    net.wait_until(lambda: node.call("status")["adverts_known"] == 6, timeout_s=60, what="rejoined market")


def test_sigterm_stops_every_process_quickly(tmp_path: Path) -> None:
    with LocalNet(tmp_path, 3, gpu_mix=MIX) as net:
        for i in range(3):
            took = net.terminate(i, sig=signal.SIGTERM, grace_s=15)
            node = net.nodes[i]
            assert node.proc.returncode == 0, node.log_tail()
            assert took < 10, f"node {i} took {took:.1f} s to stop"
            with pytest.raises(ProcessLookupError):
                os.killpg(node.proc.pid, 0)  # nothing of its process group is left
            assert not node.home.control_path.exists()
