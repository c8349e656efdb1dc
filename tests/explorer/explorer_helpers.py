"""Helpers of the explorer tests: a LocalNet of real node daemons with homes
in two regions, and a real ``p2pgpu explorer`` process over node 0.

The net starts with two nodes; :func:`ensure_third` adds a third one (the
metrics test watches counters move when it joins; the browser test wants all
three).  Node 0's wallet is funded on the embedded ledger in its home before it
starts, so the job it submits (:func:`ensure_job`) is paid and its proof
checks.  Everything runs on 127.0.0.1 and is stopped at the end of the module.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import trio

from p2pgpu import children
from p2pgpu.home import Home
from p2pgpu.localnet import LocalNet, NodeProc
from p2pgpu.solana import load_or_create_keypair, open_ledger, payer_keypair_path

#: (model, memory MiB, cc, GPUs) and region of each node.
MIX = [
    ("NVIDIA H100 80GB HBM3", 81559, "9.0", 8),
    ("NVIDIA GeForce RTX 4090", 24564, "8.9", 2),
    ("NVIDIA H100 80GB HBM3", 81559, "9.0", 4),
]
REGIONS = ["eu-west", "us-east", "us-east"]

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "explorer"
HELLO = REPO / "examples" / "jobs" / "hello.toml"
_jobs: dict[int, str] = {}


class Explorer:
    def __init__(self, proc: subprocess.Popen[str], url: str) -> None:
        self.proc = proc
        self.url = url

    def get(self, path: str, *, method: str = "GET") -> Any:
        req = urllib.request.Request(self.url + path, method=method)
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read().decode()
            return json.loads(body) if r.headers.get_content_type() == "application/json" else body


#: Lamports airdropped to node 0's wallet on its embedded ledger: it submits the jobs and pays for them.
FUNDS_LAMPORTS = 5_000_000_000


def prepare_homes(root: Path, n: int) -> None:
    """Create the homes before LocalNet does, each with its region, and fund every wallet on node 0's ledger."""
    for i in range(n):
        home = Home(root / f"node{i}")
        home.init(network="local")
        cfg = dataclasses.replace(home.config(), region=REGIONS[i])
        home.config_path.write_text(cfg.to_toml())
    # Node 0 pays on the embedded ledger in its home.  Every node's wallet (its default payout address)
    # must exist there: a payout of a few lamports to an account that does not exist yet is below the
    # rent-exempt minimum and the ledger refuses it.
    trio.run(_fund, root, n)


async def _fund(root: Path, n: int) -> None:
    ledger = open_ledger("embedded", home_path=root / "node0")
    try:
        for i in range(n):
            home = Home(root / f"node{i}")
            wallet = load_or_create_keypair(payer_keypair_path(home.path, home.config().extra))
            await ledger.airdrop(wallet.pubkey(), FUNDS_LAMPORTS if i == 0 else 1_000_000_000)
    finally:
        await ledger.aclose()


def start_explorer(home: Home, *, poll_interval_s: float = 0.3, args: tuple[str, ...] = ()) -> Explorer:
    proc = children.spawn(
        [sys.executable, "-m", "p2pgpu.cli", "explorer", "--home", str(home.path), "--port", "0",
         "--poll-interval", str(poll_interval_s), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("explorer ready "):
        proc.kill()
        raise RuntimeError(f"the explorer did not start: {line!r} {proc.stdout.read()}")
    return Explorer(proc, line.split()[-1])


def stop_explorer(ex: Explorer) -> int:
    ex.proc.send_signal(signal.SIGTERM)
    try:
        code = ex.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(ex.proc.pid, signal.SIGKILL)
        ex.proc.wait(timeout=5)
        raise
    finally:
        assert ex.proc.stdout is not None
        ex.proc.stdout.close()
    return code


def ensure_third(net: LocalNet) -> NodeProc:
    if len(net.nodes) < 3:
        net.nodes.append(net.start_node(2, bootstrap=net.nodes[0].addrs))
    return net.nodes[2]


def wait_for(predicate: Any, *, timeout_s: float = 60.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; last: {last!r}")




def ensure_job(net: LocalNet) -> str:
    """Submit examples/jobs/hello.toml from node 0 once per net; return its job id."""
    if id(net) not in _jobs:
        _jobs[id(net)] = net.nodes[0].call("job.submit", {"manifest": HELLO.read_text()})["job_id"]
    return _jobs[id(net)]
