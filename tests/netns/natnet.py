"""Real ``p2pgpu node run`` processes in an emulated internet (``p2pgpu.natlab``).

A helper for the namespace tests and ``benchmarks/reachability.py``: it
builds the lab (two public hosts, two NAT routers, one of them with random
port allocation, two private hosts behind each), starts the ledger on the
bootstrap host and a node on every host, each listening on all interfaces
(``/ip4/0.0.0.0/tcp/4001``), and talks to each node's control API from a
thread inside that node's namespace (``NatLab.call_in``), so nothing of the
lab is reachable from the machine's own network.  Processes are started
with ``p2pgpu.children`` (they die with the test) and the lab is removed on
exit, whatever happened.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pgpu import children
from p2pgpu.devnet import rpc
from p2pgpu.home import Home
from p2pgpu.localnet import inventory_doc
from p2pgpu.natlab import Host, NatLab
from p2pgpu.node import ControlError, DaemonUnavailable, call

NODE_PORT = 4001
LEDGER_PORT = 8899
#: Only the two members' machines (one behind each NAT) carry this GPU, so a
#: job asking for it forms across the NATs.
MEMBER_GPU = ("NVIDIA L4", 23034, "8.9", 1)
OTHER_GPU = ("Tesla T4", 15360, "7.5", 1)


@dataclass
class LabNode:
    name: str
    host: Host
    home: Home
    proc: subprocess.Popen[bytes]
    log_path: Path
    lab: NatLab
    peer_id: str = ""
    control_port: int = 0

    def call(self, method: str, params: dict[str, Any] | None = None, timeout_s: float = 30.0) -> Any:
        port, token = self.control_port, self.home.token()
        return self.lab.call_in(self.host, lambda: call(port, token, method, params, timeout_s=timeout_s),
                                timeout_s=timeout_s + 5)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    @property
    def bootstrap_addr(self) -> str:
        return f"/ip4/{self.host.ip}/tcp/{NODE_PORT}/p2p/{self.peer_id}"


@dataclass
class NatNet:
    lab: NatLab
    root: Path
    nodes: dict[str, LabNode] = field(default_factory=dict)
    ledger_proc: subprocess.Popen[bytes] | None = None

    @property
    def ledger_url(self) -> str:
        return f"http://{self.lab.hosts['boot'].ip}:{LEDGER_PORT}"

    def rpc(self, method: str, params: list[Any]) -> Any:
        return self.lab.call_in(self.lab.hosts["boot"], rpc, self.ledger_url, method, params)

    def start_ledger(self) -> None:
        boot = self.lab.hosts["boot"]
        with open(self.root / "ledger.log", "wb") as log:
            self.ledger_proc = children.spawn(self.lab.cmd(boot, [
                sys.executable, "-m", "p2pgpu.cli", "ledger", "serve", "--host", boot.ip,
                "--port", str(LEDGER_PORT), "--airdrop-total-max", str(10**15), "--airdrop-address-max",
                str(10**14)]), stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: _healthy(self), timeout_s=60, what="the ledger")

    def start_node(self, name: str, gpu: tuple[str, int, str, int], *, bootstrap: list[str],
                   config: str = "") -> LabNode:
        host = self.lab.hosts[name]
        home = Home(self.root / name)
        home.init(network="local")
        with open(home.config_path, "a") as f:
            f.write(f'\nledger = "{self.ledger_url}"\nreach_confirmations = 2\n{config}\n')
        inv = self.root / f"{name}-gpus.json"
        inv.write_text(json.dumps(inventory_doc(*gpu)))
        argv = [sys.executable, "-m", "p2pgpu.cli", "node", "run", "--home", str(home.path),
                "--listen", f"/ip4/0.0.0.0/tcp/{NODE_PORT}", "--gpus-from", str(inv), "--log-level", "INFO",
                "--log-format", "text"]
        for b in bootstrap:
            argv += ["--bootstrap", b]
        log_path = self.root / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = children.spawn(self.lab.cmd(host, argv), stdout=log, stderr=subprocess.STDOUT,
                                  env={"PYTHONUNBUFFERED": "1", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        node = LabNode(name=name, host=host, home=home, proc=proc, log_path=log_path, lab=self.lab)
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"node {name} exited with {proc.returncode}:\n{node.log_tail()}")
            if home.control_path.exists():
                try:
                    node.control_port = int(json.loads(home.control_path.read_text())["port"])
                    node.peer_id = node.call("status", timeout_s=5)["peer_id"]
                    break
                except (ValueError, KeyError, OSError, DaemonUnavailable, ControlError):
                    pass  # still starting
            if time.monotonic() > deadline:
                raise AssertionError(f"node {name} did not start:\n{node.log_tail()}")
            time.sleep(0.2)
        self.nodes[name] = node
        return node

    def stop(self) -> None:
        procs = [n.proc for n in self.nodes.values()]
        if self.ledger_proc is not None:
            procs.append(self.ledger_proc)
        children.stop_all(procs)


def _healthy(net: NatNet) -> bool:
    try:
        net.rpc("getHealth", [])
        return True
    except OSError:
        return False


def wait_until(predicate: Any, *, timeout_s: float, what: str, interval_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def build(lab: NatLab, root: Path) -> NatNet:
    """The topology of issue #14: boot and relay on the internet; home1 (a
    NAT that keeps a port per mapping: hole punching can work) with a1, a2;
    home2 (``--random-fully``: punching fails) with b1, b2.  a1 and b1 are
    the only machines with the member GPU."""
    lab.add_public("boot")
    lab.add_public("relay")
    home1 = lab.add_nat("home1")
    home2 = lab.add_nat("home2", random_ports=True)
    for nat, names in ((home1, ("a1", "a2")), (home2, ("b1", "b2"))):
        for n in names:
            lab.add_private(nat, n)
    net = NatNet(lab=lab, root=root)
    net.start_ledger()
    boot = net.start_node("boot", OTHER_GPU, bootstrap=[])
    net.start_node("relay", OTHER_GPU, bootstrap=[boot.bootstrap_addr])
    for name in ("a1", "a2", "b1", "b2"):
        net.start_node(name, MEMBER_GPU if name in ("a1", "b1") else OTHER_GPU, bootstrap=[boot.bootstrap_addr])
    return net


def connection_kinds(node: LabNode, others: list[LabNode]) -> dict[str, list[str]]:
    """How ``node`` is connected to each of ``others`` (direct, relayed)."""
    rows = {r["peer_id"]: r.get("connections", []) for r in node.call("peers")}
    return {o.name: rows.get(o.peer_id, []) for o in others}
