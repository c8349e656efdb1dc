"""Ports and processes of one job's Ray node: choosing ports, finding and killing what it started.

Two jobs (or two members of one job) may run Ray on the same machine, so no
Ray default port can be used: each node gets its own set of ports.  They are
drawn at random *below* the kernel's ephemeral range (``ip_local_port_range``),
where no outgoing connection can take one of them between our check and Ray's
bind, and each one is checked by binding it.  Worker ports are one contiguous
range, as Ray wants.  A node that still fails to bind is restarted with fresh
ports by the caller.

``ray stop`` kills every Ray process on the machine, so it is never used.
Instead ``ray start --block`` runs as the leader of a new session (``setsid``):
every process Ray starts (GCS, raylet, agents, workers) inherits that session
id; Ray's workers change their process *group* but never their session.  So a
node's processes are exactly the processes whose session is the node's (plus,
to be safe, descendants of its leader), read from ``/proc``; killing them all
with SIGKILL until none is left is the reliable teardown, and
:func:`session_processes` is also how the tests check that nothing of a job
survived.  Where a cgroup is available the node also runs in one, which
catches a process that called ``setsid`` itself.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

from ._limits import descendants

#: Where our ports are drawn from when the ephemeral range can't be read.
port_floor = 10_000
worker_ports_default = 64
pick_tries_max = 200


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports."""
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def port_free(port: int, host: str = "") -> bool:
    """Whether a TCP listener could bind ``port`` on all addresses now."""
    for family, addr in ((socket.AF_INET, host or "0.0.0.0"),):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((addr, port))
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
                    return False
                raise
    return True


def _pool() -> tuple[int, int]:
    lo, hi = ephemeral_range()
    if lo - port_floor >= 2048:
        return port_floor, lo - 1
    return max(1024, hi + 1), 65535  # an unusual kernel range: take what is above it


def pick_ports(count: int, *, rng: random.Random, avoid: tuple[int, ...] = ()) -> list[int]:
    """``count`` distinct free ports outside the ephemeral range."""
    lo, hi = _pool()
    out: list[int] = []
    for _ in range(pick_tries_max * max(1, count)):
        if len(out) == count:
            return out
        p = rng.randint(lo, hi)
        if p not in out and p not in avoid and port_free(p):
            out.append(p)
    raise OSError(f"could not find {count} free ports in {lo}..{hi}")


def pick_port_range(size: int, *, rng: random.Random, avoid: tuple[int, ...] = ()) -> tuple[int, int]:
    """A contiguous range of ``size`` free ports (first, last)."""
    lo, hi = _pool()
    for _ in range(pick_tries_max):
        first = rng.randint(lo, hi - size)
        ports = range(first, first + size)
        if not any(p in avoid for p in ports) and all(port_free(p) for p in ports):
            return first, first + size - 1
    raise OSError(f"could not find {size} contiguous free ports in {lo}..{hi}")


@dataclass(frozen=True, kw_only=True)
class NodePorts:
    """Every port one Ray node binds.  ``gcs``, ``dashboard``, ``client`` and
    ``master`` are used on the head only (``master`` is not Ray's: it is the
    port handed to the job as ``MASTER_PORT``)."""

    object_manager: int
    node_manager: int
    agent_listen: int
    agent_grpc: int
    metrics_export: int
    runtime_env_agent: int
    worker_min: int
    worker_max: int
    gcs: int = 0
    dashboard: int = 0
    client: int = 0
    master: int = 0

    def all(self) -> list[int]:
        singles = [self.object_manager, self.node_manager, self.agent_listen, self.agent_grpc,
                   self.metrics_export, self.runtime_env_agent, self.gcs, self.dashboard, self.client, self.master]
        return [p for p in singles if p] + list(range(self.worker_min, self.worker_max + 1))

    def start_args(self, head: bool) -> list[str]:
        a = [f"--object-manager-port={self.object_manager}", f"--node-manager-port={self.node_manager}",
             f"--dashboard-agent-listen-port={self.agent_listen}", f"--dashboard-agent-grpc-port={self.agent_grpc}",
             f"--metrics-export-port={self.metrics_export}", f"--runtime-env-agent-port={self.runtime_env_agent}",
             f"--min-worker-port={self.worker_min}", f"--max-worker-port={self.worker_max}"]
        if head:
            a += [f"--port={self.gcs}", f"--dashboard-port={self.dashboard}",
                  f"--ray-client-server-port={self.client}"]
        return a


def choose_ports(*, head: bool, gcs_port: int, rng: random.Random, worker_ports: int = worker_ports_default) -> NodePorts:
    """Fresh ports for one node.  ``gcs_port`` is the rendezvous port when the
    cluster fixed it (0: choose one)."""
    avoid = (gcs_port,) if gcs_port else ()
    singles = pick_ports(6 + (4 if head else 0), rng=rng, avoid=avoid)
    first, last = pick_port_range(worker_ports, rng=rng, avoid=avoid + tuple(singles))
    extra: dict[str, int] = {}
    if head:
        extra = {"gcs": gcs_port or singles[6], "dashboard": singles[7], "client": singles[8], "master": singles[9]}
    return NodePorts(object_manager=singles[0], node_manager=singles[1], agent_listen=singles[2],
                     agent_grpc=singles[3], metrics_export=singles[4], runtime_env_agent=singles[5],
                     worker_min=first, worker_max=last, **extra)


def _session_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    # state ppid pgrp session ...
    return int(fields[3]) if len(fields) > 3 and fields[3].lstrip("-").isdigit() else None


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2:].startswith("Z")


def session_processes(sid: int) -> list[int]:
    """Live processes of session ``sid`` and descendants of ``sid`` (sorted;
    zombies, already dead, are left out)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _session_of(int(entry)) == sid:
            found.add(int(entry))
    if Path(f"/proc/{sid}").exists():
        found.update(descendants(sid))
    return sorted(p for p in found if not _is_zombie(p))


def signal_session(sid: int, sig: int) -> int:
    """Send ``sig`` to every process of the session; how many were signalled."""
    n = 0
    for pid in session_processes(sid):
        try:
            os.kill(pid, sig)
            n += 1
        except ProcessLookupError:
            continue
    return n


def kill_session(sid: int) -> None:
    signal_session(sid, signal.SIGKILL)
