"""The whole network on one machine: ledger, node daemons, explorer, jobs.

:class:`Devnet` starts ``p2pgpu ledger serve`` on a free port, N node daemons
with simulated GPUs of a realistic mix (``p2pgpu.localnet``) that settle on
that ledger, funds every node's wallet with a local airdrop (so workers'
accounts exist and the submitter can pay), optionally an explorer, then
submits sample jobs (single-node, multi-node and replicated) and follows them
until every proof is verified and every payout confirmed on the ledger.
Everything is bounded in time and stops by itself; all on 127.0.0.1.  Every
process is started through :mod:`p2pgpu.children`, so none outlives the
devnet, whatever ends it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from p2pgpu import children
from p2pgpu.localnet import LocalNet

airdrop_lamports = 100_000_000_000  # 100 SOL for every node's wallet
SAMPLE_JOBS = ("hello.toml", "pair.toml", "replicated.toml")


class DevnetError(Exception):
    """The devnet did not reach its goal; the message says where it stopped."""


#: The devnet's pay-as-you-go interval and grace (a node's defaults are
#: ``core._manifest.interval_s_default`` and ``core._installments.InstallmentConfig``).
devnet_interval_s = 10
devnet_grace_s = 15

def free_port(pair: bool = False) -> int:
    """A free TCP port on 127.0.0.1 (and, with ``pair``, port+1 free too)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if not pair:
            return port
        if port >= 65535:
            continue  # no port+1 to pair it with
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise DevnetError("no free port pair on 127.0.0.1")


def rpc(url: str, method: str, params: list[Any], timeout_s: float = 10.0) -> Any:
    req = urllib.request.Request(url, data=json.dumps({"jsonrpc": "2.0", "id": 1, "method": method,
                                                       "params": params}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 - loopback only
        doc = json.loads(resp.read())
    if "error" in doc:
        raise DevnetError(f"ledger {method}: {doc['error']}")
    return doc["result"]


def sample_manifest(name: str) -> str:
    """The shipped example manifests (examples/jobs), also packaged with p2pgpu."""
    repo = Path(__file__).resolve().parent.parent / "examples" / "jobs" / name
    if repo.exists():
        return repo.read_text()
    return resources.files("p2pgpu").joinpath(f"data/jobs/{name}").read_text()


@dataclass
class Devnet:
    root: Path
    nodes: int = 4
    explorer: bool = True
    progress: Callable[[str], None] = lambda msg: None
    ledger_url: str = ""
    explorer_url: str = ""
    net: LocalNet | None = None
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __enter__(self) -> "Devnet":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(self.root / log, "ab") as f:
            proc = children.spawn([sys.executable, "-m", "p2pgpu.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._procs.append(proc)
        return proc

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        port = free_port(pair=True)
        self.ledger_url = f"http://127.0.0.1:{port}"
        self.progress(f"ledger: p2pgpu ledger serve on {self.ledger_url}")
        ledger = self._spawn(["ledger", "serve", "--port", str(port), "--state", str(self.root / "ledger.state")],
                             "ledger.log")
        deadline = time.monotonic() + 60
        while True:
            try:
                rpc(self.ledger_url, "getHealth", [], timeout_s=2)
                break
            except (OSError, DevnetError):
                if ledger.poll() is not None or time.monotonic() > deadline:
                    raise DevnetError(f"the ledger did not start; see {self.root / 'ledger.log'}") from None
                time.sleep(0.2)
        # A short pay-as-you-go interval (docs/payouts.md): installments show within a minute.
        self.net = LocalNet(self.root, 0, config_extra=f'ledger = "{self.ledger_url}"\n'
                                                       f"payment_interval_s = {devnet_interval_s}\n"
                                                       f"payment_grace_s = {devnet_grace_s}")
        for i in range(self.nodes):
            node = self.net.start_node(i, bootstrap=self.net.nodes[0].addrs if self.net.nodes else [])
            self.net.nodes.append(node)
            self.progress(f"node {i}: {node.peer_id} ({self.net.gpu_mix[i % len(self.net.gpu_mix)][0]})")
        for node in self.net.nodes:
            address = node.call("wallet")["address"]
            rpc(self.ledger_url, "requestAirdrop", [address, airdrop_lamports])
        self.progress(f"funded {self.nodes} wallets with {airdrop_lamports // 10**9} SOL each (local airdrop)")
        if self.explorer:
            eport = free_port()
            self._spawn(["explorer", "--home", str(self.net.nodes[0].home.path), "--port", str(eport)], "explorer.log")
            self.explorer_url = f"http://127.0.0.1:{eport}/"
            self.progress(f"explorer: {self.explorer_url}  network view: {self.network_view_url}")

    @property
    def network_view_url(self) -> str:
        """The explorer's network view (GPUs online, jobs per hour, payouts per day, top earners)."""
        return f"{self.explorer_url}#network" if self.explorer_url else ""

    def stop(self) -> None:
        """Stop the nodes, then the explorer and the ledger (each bounded: SIGTERM, then SIGKILL)."""
        if self.net is not None:
            self.net.stop()
        children.stop_all(self._procs)

    def balance(self, address: str) -> int:
        return int(rpc(self.ledger_url, "getBalance", [address])["value"])

    def wait_adverts(self, timeout_s: float) -> float:
        assert self.net is not None
        ids = {n.peer_id for n in self.net.nodes}
        t0 = time.monotonic()
        self.net.wait_until(lambda: all({r["peer_id"] for r in n.call("market")} >= ids for n in self.net.nodes),
                            timeout_s=timeout_s, what="every node to see every other node's GPUs")
        return time.monotonic() - t0

    def run_jobs(self, count: int, timeout_s: float) -> list[dict[str, Any]]:
        """Submit ``count`` sample jobs from node 0 and follow them until every
        one is settled and every payout is confirmed."""
        assert self.net is not None
        submitter = self.net.nodes[0]
        samples = [s for s in SAMPLE_JOBS if not (s == "replicated.toml" and self.nodes < 3)
                   and not (s == "pair.toml" and self.nodes < 2)]
        jobs = []
        deadline = time.monotonic() + timeout_s
        for k in range(count):
            name = samples[k % len(samples)]
            job_id = submitter.call("job.submit", {"manifest": sample_manifest(name)})["job_id"]
            jobs.append(job_id)
            self.progress(f"job {k + 1}/{count}: submitted {name} as {job_id[:12]}")
            # One formation at a time: the demo shows each cluster forming on
            # its own (competing formations are benchmarks/formation.py's topic).
            while submitter.call("job.status", {"job_id": job_id})["state"] == "forming":
                if time.monotonic() > deadline:
                    raise DevnetError(f"job {job_id[:12]} still forming after {timeout_s:.0f} s")
                time.sleep(0.05)
        done: dict[str, dict[str, Any]] = {}
        reported: dict[str, str] = {}
        while len(done) < len(jobs):
            for job_id in jobs:
                if job_id in done:
                    continue
                doc = submitter.call("job.status", {"job_id": job_id})
                owed = [p for p in doc["payouts"]]
                paid = all(p["status"] == "paid" for p in owed) and owed
                line = f"{doc['state']}" + (f", {sum(p['status'] == 'paid' for p in owed)}/{len(owed)} paid"
                                            if owed else "")
                if reported.get(job_id) != line:
                    reported[job_id] = line
                    self.progress(f"job {job_id[:12]}: {line}")
                if doc["state"] == "failed" or (doc["state"] == "succeeded" and paid):
                    done[job_id] = doc
            if time.monotonic() > deadline:
                stuck = {j[:12]: reported.get(j, "?") for j in jobs if j not in done}
                raise DevnetError(f"jobs not settled and paid after {timeout_s:.0f} s: {stuck}")
            time.sleep(0.3)
        return [done[j] for j in jobs]


def summarize(dev: Devnet, docs: list[dict[str, Any]], adverts_s: float) -> dict[str, Any]:
    assert dev.net is not None
    by_peer = {n.peer_id: n for n in dev.net.nodes}
    jobs, owed_to, tx = [], {}, set()
    for d in docs:
        jobs.append({"job_id": d["job_id"], "name": d["name"], "state": d["state"], "reason": d.get("reason", ""),
                     "members": len(d["cluster"]["members"]),
                     "formation_ms": d["timings"].get("formation_ms"),
                     "proofs_verified": sum(1 for p in d["proofs"] if p["status"] in ("owed", "outside_quorum")),
                     "payouts": [{"worker": p["worker"], "amount": p["amount"], "tx_signature": p["tx_signature"]}
                                 for p in d["payouts"]]})
        for p in d["payouts"]:
            owed_to[p["payout_address"]] = owed_to.get(p["payout_address"], 0) + p["amount"]
            if p["tx_signature"]:
                tx.add(p["tx_signature"])
    # Every node started with the same airdrop; what a worker holds above it is what it was paid.
    balances = {a: dev.balance(a) - airdrop_lamports for a in sorted(owed_to)}
    submitter_addr = dev.net.nodes[0].call("wallet")["address"]
    mismatch = {a: (balances[a], owed_to[a]) for a in owed_to if a != submitter_addr and balances[a] != owed_to[a]}
    return {
        "nodes": len(dev.net.nodes),
        "ledger": dev.ledger_url,
        "explorer": dev.explorer_url,
        "network_view": dev.network_view_url,
        "adverts_converged_s": round(adverts_s, 3),
        "adverts_seen": {n.peer_id: n.call("status")["adverts_known"] for n in dev.net.nodes},
        "jobs": jobs,
        "clusters_formed": sum(1 for j in jobs if j["members"]),
        "proofs_verified": sum(j["proofs_verified"] for j in jobs),
        "payouts_confirmed": sum(len(j["payouts"]) for j in jobs),
        "transactions": sorted(tx),
        "paid_by_address": owed_to,
        "ledger_matches_payouts": not mismatch,
        "ledger_mismatch": mismatch,
        "workers": {p: by_peer[p].index for p in by_peer},
    }
