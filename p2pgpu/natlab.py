"""A small emulated internet in network namespaces: public hosts and NATed homes.

Every test and the devnet run on 127.0.0.1, where every node can dial every
other.  This lab builds what operators actually face, on one Linux machine,
as root, out of network namespaces, veth pairs and iptables:

- an ``inet`` namespace holding a bridge: the "internet", on the
  documentation prefix 198.51.100.0/24 (RFC 5737);
- public hosts, each a namespace with one veth on that bridge
  (198.51.100.2, .3, ...);
- NAT routers, each a namespace with a ``wan`` veth on the internet
  (198.51.100.11, .12, ...) and a LAN bridge (10.0.<n>.1/24) that its private
  hosts hang off; iptables MASQUERADE on ``wan`` (optionally
  ``--random-fully``: a new random public port for every mapping, which
  defeats hole punching as symmetric NATs do), and a firewall that drops
  unsolicited inbound packets instead of answering them (as home routers do;
  a RST would abort the other side's simultaneous open).  Optional
  ``forwards`` are port forwards (DNAT) to a LAN host, as an operator would
  set on a router;
- private hosts, each a namespace on a NAT's LAN (10.0.<n>.2, .3, ...),
  with a default route through their router.

Nothing connects to the machine's own (root) namespace: traffic stays inside
the lab.  Namespace names start with ``p2pgpu-lab-<pid>-`` so a lab left
behind by a killed run is found and removed by :func:`sweep_stale` (its pid
is gone), and :meth:`NatLab.close` removes everything even after a failure.
Commands run in a host with :meth:`NatLab.cmd` (``ip netns exec``).

:func:`unavailable` says why a lab cannot be built here (not root, no
``ip``/``iptables``, namespaces refused), so callers can skip with a reason.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import ipaddress
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Self, TypeVar

T = TypeVar("T")
_CLONE_NEWNET = 0x40000000

PREFIX = "p2pgpu-lab-"
PUBLIC_NET = ipaddress.IPv4Network("198.51.100.0/24")
#: Public hosts from .2, NAT routers' WAN addresses from .11.
public_first_host = 2
nat_first_wan = 11
command_timeout_s = 30.0
_TOOLS_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


class LabError(Exception):
    """A lab command failed (the message has the command and its stderr)."""


def _run(argv: Sequence[str], *, check: bool = True, timeout_s: float = command_timeout_s) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": _TOOLS_PATH + ":" + os.environ.get("PATH", "")}
    proc = subprocess.run(list(argv), check=False, capture_output=True, text=True, timeout=timeout_s, env=env)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def unavailable() -> str | None:
    """Why a lab cannot be built here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs the tests as root)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool, path=_TOOLS_PATH) is None:
            return f"{tool} is not installed (scripts/test installs iproute2 and iptables)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        _run(["ip", "netns", "add", probe])
    except (LabError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        _run(["ip", "netns", "exec", probe, "iptables", "-t", "nat", "-L", "-n"])
    except (LabError, OSError, subprocess.TimeoutExpired) as exc:
        return f"iptables does not work in a network namespace: {exc}"
    finally:
        _run(["ip", "netns", "del", probe], check=False)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lab_namespaces() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


def sweep_stale() -> list[str]:
    """Remove the namespaces of labs whose process is gone (a run killed
    before its clean-up); return their names."""
    removed = []
    for ns in lab_namespaces():
        m = re.match(rf"{re.escape(PREFIX)}(\d+)-", ns)
        if m and not _pid_alive(int(m.group(1))):
            _kill_namespace_processes(ns)
            _run(["ip", "netns", "del", ns], check=False)
            removed.append(ns)
    return removed


def _kill_namespace_processes(ns: str) -> None:
    pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
    for p in pids:
        try:
            os.kill(int(p), 9)
        except (ProcessLookupError, ValueError):
            continue


@dataclass(frozen=True)
class Host:
    """One machine of the lab: a namespace and its address."""

    name: str
    netns: str
    ip: str
    #: The NAT it sits behind (None: a public host).
    nat: str | None = None


@dataclass
class Nat:
    name: str
    netns: str
    wan_ip: str
    lan: ipaddress.IPv4Network
    random_ports: bool
    hosts: list[Host] = field(default_factory=list)


class NatLab:
    """``with NatLab() as lab: boot = lab.add_public("boot"); nat = lab.add_nat("home1"); a = lab.add_private(nat, "a")``.

    ``delay_ms`` adds that one-way delay to every packet leaving a host or a
    router onto the internet (netem), so a round trip between two homes
    crosses four such hops: closer to the internet than a veth's
    microseconds, and it gives hole punching the timing it has in life."""

    def __init__(self, *, tag: str = "", delay_ms: int = 0) -> None:
        self.run_id = f"{PREFIX}{os.getpid()}-{tag or 'x'}"
        self.delay_ms = delay_ms
        #: Why the delay could not be added (None: added, or none asked for).
        self.delay_missing: str | None = None
        self.inet = f"{self.run_id}-inet"
        self.hosts: dict[str, Host] = {}
        self.nats: dict[str, Nat] = {}
        self._namespaces: list[str] = []
        self._ports = 0
        self._opened = False

    # -------------------------------------------------------------- life

    def __enter__(self) -> Self:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        sweep_stale()
        self._add_ns(self.inet)
        self._ip(self.inet, "link", "add", "br0", "type", "bridge")
        self._ip(self.inet, "link", "set", "br0", "up")
        self._opened = True

    def close(self) -> None:
        """Kill what still runs in the lab and remove every namespace
        (idempotent; never raises for what is already gone)."""
        for ns in reversed(self._namespaces):
            _kill_namespace_processes(ns)
        for ns in reversed(self._namespaces):
            _run(["ip", "netns", "del", ns], check=False)
        self._namespaces.clear()

    # --------------------------------------------------------- building

    def _add_ns(self, ns: str) -> None:
        _run(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        self._ip(ns, "link", "set", "lo", "up")

    @staticmethod
    def _ip(ns: str, *args: str) -> None:
        _run(["ip", "-n", ns, *args])

    def _netem(self, ns: str, dev: str) -> None:
        if self.delay_ms > 0 and self.delay_missing is None:
            proc = _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "netem",
                         "delay", f"{self.delay_ms}ms"], check=False)
            if proc.returncode != 0:  # a kernel without sch_netem: the lab runs without delay
                self.delay_missing = proc.stderr.strip() or "tc netem failed"

    def _port_name(self) -> str:
        self._ports += 1
        return f"p{self._ports}"

    def _plug_into_internet(self, ns: str, dev: str, ip: str) -> None:
        port = self._port_name()
        self._ip(self.inet, "link", "add", port, "type", "veth", "peer", "name", dev, "netns", ns)
        self._ip(self.inet, "link", "set", port, "master", "br0", "up")
        self._ip(ns, "addr", "add", f"{ip}/{PUBLIC_NET.prefixlen}", "dev", dev)
        self._ip(ns, "link", "set", dev, "up")
        self._netem(ns, dev)

    def add_public(self, name: str) -> Host:
        ip = str(PUBLIC_NET[public_first_host + sum(1 for h in self.hosts.values() if h.nat is None)])
        ns = f"{self.run_id}-{name}"
        self._add_ns(ns)
        self._plug_into_internet(ns, "eth0", ip)
        host = Host(name=name, netns=ns, ip=ip)
        self.hosts[name] = host
        return host

    def add_nat(self, name: str, *, random_ports: bool = False) -> Nat:
        n = len(self.nats) + 1
        wan_ip = str(PUBLIC_NET[nat_first_wan + n - 1])
        lan = ipaddress.IPv4Network(f"10.0.{n}.0/24")
        ns = f"{self.run_id}-{name}"
        self._add_ns(ns)
        self._plug_into_internet(ns, "wan", wan_ip)
        self._ip(ns, "link", "add", "lan", "type", "bridge")
        self._ip(ns, "addr", "add", f"{lan[1]}/24", "dev", "lan")
        self._ip(ns, "link", "set", "lan", "up")
        ex = ["ip", "netns", "exec", ns]
        _run([*ex, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        masq = ["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE"]
        _run([*ex, *masq, *(["--random-fully"] if random_ports else [])])
        # A home router drops what nobody inside asked for (no RST: a RST
        # would abort the peer's half of a simultaneous open).
        for chain in ("FORWARD", "INPUT"):
            _run([*ex, "iptables", "-A", chain, "-i", "wan", "-m", "conntrack", "--ctstate",
                  "RELATED,ESTABLISHED,DNAT", "-j", "ACCEPT"])
            _run([*ex, "iptables", "-A", chain, "-i", "wan", "-j", "DROP"])
        nat = Nat(name=name, netns=ns, wan_ip=wan_ip, lan=lan, random_ports=random_ports)
        self.nats[name] = nat
        return nat

    def add_private(self, nat: Nat, name: str) -> Host:
        ip = str(nat.lan[2 + len(nat.hosts)])
        ns = f"{self.run_id}-{name}"
        self._add_ns(ns)
        port = self._port_name()
        self._ip(nat.netns, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        self._ip(nat.netns, "link", "set", port, "master", "lan", "up")
        self._ip(ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        self._ip(ns, "link", "set", "eth0", "up")
        self._ip(ns, "route", "add", "default", "via", str(nat.lan[1]))
        host = Host(name=name, netns=ns, ip=ip, nat=nat.name)
        nat.hosts.append(host)
        self.hosts[name] = host
        return host

    def forward_port(self, nat: Nat, port: int, host: Host) -> None:
        """A port forward on the router: ``wan_ip:port`` -> ``host.ip:port``."""
        _run(["ip", "netns", "exec", nat.netns, "iptables", "-t", "nat", "-A", "PREROUTING", "-i", "wan",
              "-p", "tcp", "--dport", str(port), "-j", "DNAT", "--to-destination", f"{host.ip}:{port}"])

    # ---------------------------------------------------------- running

    def cmd(self, host: Host, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``host``'s namespace."""
        return ["ip", "netns", "exec", host.netns, *argv]

    def run(self, host: Host, argv: Sequence[str], *, check: bool = True,
            timeout_s: float = command_timeout_s) -> subprocess.CompletedProcess[str]:
        return _run(self.cmd(host, argv), check=check, timeout_s=timeout_s)

    def call_in(self, host: Host, fn: Callable[..., T], *args: object, timeout_s: float = 60.0) -> T:
        """``fn(*args)`` run in a thread that joined ``host``'s network
        namespace first: its sockets live there (a node's control API on
        that host's 127.0.0.1, the ledger on the lab's internet), while the
        calling process stays where it is."""
        return call_in_netns(host.netns, fn, *args, timeout_s=timeout_s)

    def conntrack_mappings(self, nat: Nat) -> str:
        """The router's NAT table as the kernel holds it (for reports)."""
        return _run(["ip", "netns", "exec", nat.netns, "cat", "/proc/net/nf_conntrack"], check=False).stdout


def _enter_netns(ns: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise LabError(f"setns into {ns}: {os.strerror(err)}")
    finally:
        os.close(fd)


def call_in_netns(ns: str, fn: Callable[..., T], *args: object, timeout_s: float = 60.0) -> T:
    """``fn(*args)`` in a fresh thread inside network namespace ``ns`` (a
    network namespace is per thread; the thread ends with the call)."""

    def run() -> T:
        _enter_netns(ns)
        return fn(*args)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(run).result(timeout=timeout_s)
