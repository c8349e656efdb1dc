"""A local network of real ``p2pgpu node run`` processes on 127.0.0.1.

Used by the multi-process tests, the benchmarks and ``p2pgpu devnet up``: it
creates one home per node (``init``), writes a simulated GPU inventory for
each from a realistic mix, starts the daemons bootstrapping from the first,
waits until each answers on its control API, and stops them all (SIGTERM,
then SIGKILL after a grace period) when closed.  Every wait is bounded.
The daemons are started through :mod:`p2pgpu.children`: whatever ends the
process that started them (SIGKILL included), they go with it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pgpu import children
from p2pgpu.home import Home
from p2pgpu.node import ControlError, DaemonUnavailable, call

#: A realistic mix of simulated machines: (model, memory MiB, cc, GPUs).
GPU_MIX: list[tuple[str, int, str, int]] = [
    ("NVIDIA H100 80GB HBM3", 81559, "9.0", 8),
    ("NVIDIA A100-SXM4-40GB", 40960, "8.0", 4),
    ("NVIDIA GeForce RTX 4090", 24564, "8.9", 2),
    ("NVIDIA L4", 23034, "8.9", 1),
    ("NVIDIA A100-SXM4-80GB", 81920, "8.0", 8),
    ("NVIDIA GeForce RTX 3090", 24576, "8.6", 1),
    ("NVIDIA H200", 143771, "9.0", 8),
    ("Tesla T4", 15360, "7.5", 1),
]


def inventory_doc(model: str, memory_mb: int, cc: str, count: int) -> dict[str, Any]:
    return {"gpus": [{"model": model, "memory_mb": memory_mb, "compute_capability": cc,
                      "driver_version": "550.54.15", "cuda_version": "12.4"} for _ in range(count)],
            "driver_version": "550.54.15", "cuda_version": "12.4"}


def _override_config(path: Path, extra: str) -> None:
    """Set the top-level keys of ``extra`` (TOML lines) in a config.toml,
    replacing a key the file already has (TOML refuses a repeated key)."""
    import tomllib  # noqa: PLC0415

    keys = set(tomllib.loads(extra))
    kept = [ln for ln in path.read_text().splitlines()
            if not any(ln.strip().startswith(f"{k} ") or ln.strip().startswith(f"{k}=") for k in keys)]
    path.write_text("\n".join(kept) + "\n" + extra.strip() + "\n")


class LocalNetError(Exception):
    """A node failed to start or answer in time; the message has its log tail."""


@dataclass
class NodeProc:
    index: int
    home: Home
    proc: subprocess.Popen[bytes]
    log_path: Path
    peer_id: str = ""
    addrs: list[str] = field(default_factory=list)
    control_port: int = 0

    def call(self, method: str, params: dict[str, Any] | None = None, timeout_s: float = 30.0) -> Any:
        return call(self.control_port, self.home.token(), method, params, timeout_s=timeout_s)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class LocalNet:
    """``with LocalNet(root, n) as net: net.nodes[0].call("status")``."""

    def __init__(self, root: Path, n: int, *, gpu_mix: list[tuple[str, int, str, int]] | None = None,
                 advert_ttl_s: int = 600, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None, start_timeout_s: float = 60.0,
                 config_extra: str = "", node_config: dict[int, str] | None = None) -> None:
        self.root = Path(root)
        self.n = n
        self.gpu_mix = gpu_mix or GPU_MIX
        self.advert_ttl_s = advert_ttl_s
        self.extra_args = extra_args or []
        self.env = env or {}
        self.start_timeout_s = start_timeout_s
        #: TOML lines appended to every node's config.toml (e.g. a shared ledger),
        #: and per node (e.g. an adversary on a test network).
        self.config_extra = config_extra
        self.node_config = node_config or {}
        self.nodes: list[NodeProc] = []

    def __enter__(self) -> "LocalNet":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def home(self, i: int) -> Home:
        return Home(self.root / f"node{i}")

    def start(self) -> None:
        for i in range(self.n):
            self.nodes.append(self.start_node(i, bootstrap=self.nodes[0].addrs if self.nodes else []))

    def start_node(self, i: int, *, bootstrap: list[str], wait: bool = True) -> NodeProc:
        home = self.home(i)
        if not home.exists():
            home.init(network="local")
            extra = self.config_extra + "\n" + self.node_config.get(i, "")
            if extra.strip():
                _override_config(home.config_path, extra)
        inv = self.root / f"gpus{i}.json"
        if not inv.exists():
            inv.write_text(json.dumps(inventory_doc(*self.gpu_mix[i % len(self.gpu_mix)])))
        home.control_path.unlink(missing_ok=True)
        args = [sys.executable, "-m", "p2pgpu.cli", "node", "run", "--home", str(home.path),
                "--listen", "/ip4/127.0.0.1/tcp/0", "--gpus-from", str(inv),
                "--advert-ttl", str(self.advert_ttl_s), *self.extra_args]
        for b in bootstrap[:1]:
            args += ["--bootstrap", b]
        log_path = self.root / f"node{i}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with open(log_path, "ab") as log:
            proc = children.spawn(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        node = NodeProc(index=i, home=home, proc=proc, log_path=log_path)
        if wait:
            self.wait_ready(node)
        return node

    def wait_ready(self, node: NodeProc) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if node.proc.poll() is not None:
                raise LocalNetError(f"node {node.index} exited with {node.proc.returncode}:\n{node.log_tail()}")
            if node.home.control_path.exists():
                try:
                    doc = json.loads(node.home.control_path.read_text())
                    node.control_port = int(doc["port"])
                    status = node.call("status", timeout_s=5.0)
                    node.peer_id, node.addrs = status["peer_id"], status["addrs"]
                    return
                except (ValueError, KeyError, OSError, DaemonUnavailable, ControlError):
                    pass  # the daemon is still starting: poll again
            time.sleep(0.1)
        raise LocalNetError(f"node {node.index} did not answer within {self.start_timeout_s} s:\n{node.log_tail()}")

    def restart(self, i: int) -> NodeProc:
        self.terminate(i)
        others = [n for n in self.nodes if n.index != i and n.proc.poll() is None]
        node = self.start_node(i, bootstrap=others[0].addrs if others else [])
        self.nodes[i] = node
        return node

    def terminate(self, i: int, *, sig: int = signal.SIGTERM, grace_s: float = 10.0) -> float:
        """Signal node ``i``; return the seconds it took to exit."""
        node = self.nodes[i]
        start = time.monotonic()
        if node.proc.poll() is None:
            node.proc.send_signal(sig)
            try:
                node.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                children.stop(node.proc, grace_s=0)  # SIGKILL its group
        return time.monotonic() - start

    def stop(self) -> None:
        """SIGTERM every node at once; SIGKILL those still running after the grace."""
        children.stop_all([node.proc for node in self.nodes])

    def wait_until(self, predicate: Any, *, timeout_s: float = 30.0, interval_s: float = 0.2, what: str = "") -> Any:
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(interval_s)
        raise LocalNetError(f"timed out after {timeout_s} s waiting for {what or predicate}")
