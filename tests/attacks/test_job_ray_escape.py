"""#18.2: a ``ray`` job's driver ran outside the sandbox, read the node's keys and called its control API.

Real node processes, a real two-member Ray cluster.  The stranger's driver
(rank 0) and a Ray task it pins on the other member both try what the
reported attack did: find the node's home (through ``/proc``, and here the
test even hands every home path over), read ``identity.key``,
``payer.json`` and ``control.token``, and reach the control API and the
libp2p port of every node (on loopback and on the host's own address).
Before the fix every process of a Ray job ran as the node, outside
bubblewrap, with the host's network.  Now every one of them runs in its
member's sandbox, on a network that reaches only the job's other members:
the job gets nothing, and still forms its cluster and runs on both members.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from p2pgpu.localnet import LocalNet, NodeProc
from p2pgpu.node import ControlError
from p2pgpu.runtime import check_sandbox
from p2pgpu.runtime._ray import ray_unavailable
from p2pgpu.solana._keys import PAYER_FILE

WHY_NOT = check_sandbox() or ray_unavailable(enabled=True)
# Job networks and Ray on this machine: these tests assert that none is left (system-wide), so they
# take turns with every other test that makes them (tests/conftest.py, docs/testing.md).
pytestmark = [pytest.mark.processes, pytest.mark.exclusive("job-networks"), pytest.mark.skipif(WHY_NOT is not None, reason=f"{WHY_NOT}")]

ONE_GPU = [("NVIDIA L4", 23034, "8.9", 1)]
#: The submitter (node 0) never serves; the workers offer ray.
CONFIG = {0: "price_per_gpu_hour = 360000000", 1: "allow_ray_jobs = true", 2: "allow_ray_jobs = true"}

PROBE = r'''
import glob, json, os, socket

def probe(where):
    found = []
    homes = [h for h in os.environ["NODE_HOMES"].split(":") if h]
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):  # how the reported attack found the home
        try:
            args = open(cmdline, "rb").read().split(b"\0")
        except OSError:
            continue
        if b"--home" in args:
            homes.append(args[args.index(b"--home") + 1].decode())
            found.append(f"{where}: SAW-NODE-PROCESS")
    for home in homes:
        for name in ("identity.key", "payer.json", "control.token", "control.json", "state.db"):
            try:
                data = open(os.path.join(home, name), "rb").read()
                found.append(f"{where}: READ {name} {data.hex()}")
            except OSError:
                pass
    for host, port in json.loads(os.environ["NODE_PORTS"]):
        try:
            socket.create_connection((host, port), timeout=2).close()
            found.append(f"{where}: REACHED {host}:{port}")
        except OSError:
            pass
    return found
'''

DRIVER = PROBE + r'''
import ray
ray.init()
alive = [n for n in ray.nodes() if n["Alive"]]

@ray.remote(num_cpus=0)
def remote_probe():
    return probe("member 1")

found = probe("driver") + ray.get(remote_probe.options(resources={"p2pgpu_member_1": 0.01}).remote())
for line in found:
    print(line, flush=True)
print(f"saw {len(alive)} ray nodes, {len(found)} findings", flush=True)
'''


def host_address() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # no packet is sent: this picks the host's own outward address
        return str(s.getsockname()[0])


def manifest(homes: list[Path], ports: list[tuple[str, int]]) -> str:
    return f"""
name = "ray-escape"
[requirements]
nodes = 2
gpus_per_node = 1
[runtime]
kind = "ray"
command = ["python", "-c", {json.dumps(DRIVER)}]
duration_s_max = 300
[runtime.env]
NODE_HOMES = {json.dumps(":".join(str(h) for h in homes))}
NODE_PORTS = {json.dumps(json.dumps(ports))}
[payment]
price_per_gpu_hour_max = 36000000
"""


def status(node: NodeProc, job_id: str) -> dict[str, Any]:
    try:
        doc = node.call("job.status", {"job_id": job_id})
    except ControlError:
        return {}
    return doc if isinstance(doc, dict) else {}


def ended(doc: dict[str, Any]) -> dict[str, Any] | None:
    return doc if doc.get("state") in ("succeeded", "failed") else None


def test_a_ray_job_cannot_read_the_nodes_keys_or_reach_its_ports(tmp_path: Path) -> None:
    with LocalNet(tmp_path, 3, gpu_mix=ONE_GPU, node_config=CONFIG) as net:
        net.wait_until(lambda: all(n.call("status")["peers"] >= 2 for n in net.nodes), timeout_s=30,
                       what="a full mesh")
        here = host_address()
        ports: list[tuple[str, int]] = []
        for n in net.nodes:
            libp2p = int(n.addrs[0].split("/")[4])
            ports += [("127.0.0.1", n.control_port), (here, n.control_port), ("127.0.0.1", libp2p), (here, libp2p)]
        homes = [n.home.path for n in net.nodes]
        secrets = [(n.home.path / name).read_bytes().hex() for n in net.nodes
                   for name in ("identity.key", "control.token", PAYER_FILE) if (n.home.path / name).exists()]
        assert len(secrets) >= 6
        job = net.nodes[0].call("job.submit", {"manifest": manifest(homes, ports)})["job_id"]
        doc = net.wait_until(lambda: ended(status(net.nodes[0], job)), timeout_s=420, what="the ray job to end")
        logs = [ln["line"] for ln in net.nodes[0].call("job.logs", {"job_id": job})]
        assert doc["state"] == "succeeded", (doc.get("reason"), logs[-20:])
        # The members' own Ray traffic works: two nodes, a task on the other member.
        assert "saw 2 ray nodes, 0 findings" in logs, logs[-20:]
        text = "\n".join(logs)
        assert not [s for s in secrets if s in text], "a key or token left the node"
        assert "READ " not in text and "REACHED " not in text and "SAW-NODE-PROCESS" not in text, logs[-20:]
