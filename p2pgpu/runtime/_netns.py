"""A cluster member's network: a namespace of its own, one veth to the host, and rules that let it reach its job's other members and nothing else.

A ``ray`` job's members must talk to each other (Ray's GCS, raylets,
object managers, workers), but a job must never reach the node that runs
it (its control API, its libp2p ports, anything on the host), other jobs,
or the rest of the network.  So each member's sandbox joins a network
namespace made for it (root only):

- one veth pair: ``eth0`` inside with ``subnet[4r+2]/30``, the host's end
  (``pgn<random>``) with ``subnet[4r+1]/30``, where ``subnet`` is the job's
  /24 (from :data:`SUBNET_POOL`) and ``r`` the member's rank; a default
  route through the host's end;
- forwarding enabled on that host interface only (``net.ipv4.conf.<if>.
  forwarding``; the host's global ``ip_forward`` is not touched), so
  packets between two members' sandboxes on this host are routed;
- an nftables table of its own (``inet p2pgpu_<if>``): from that interface,
  only packets to the job's /24 are forwarded and nothing reaches the host
  itself (input dropped); to it, only packets from the job's /24.  Every
  other table's rules still apply (an accept here does not override a drop
  elsewhere).

The job's /24 is chosen by its rank-0 member (:func:`claim_subnet`: the
first candidate derived from the job id that no other job on this host
holds) and sent to the others, which check it is theirs to use
(:func:`open_member_net` refuses a /24 another job holds here: a hostile
member cannot make a node put its sandbox in another job's network).  Who
holds what is written in ``/run/p2pgpu-net/<subnet>/<rank>`` under a lock,
so node processes sharing a host agree.

Members on different hosts would need their sandbox addresses routed
between the hosts; that is not done (yet): such a job fails on the members
that cannot reach the head (``docs/ray.md``).  Everything here blocks and
needs root: the node calls it from a worker thread.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

#: Where job subnets come from: 16,384 /24s of 10.64.0.0/10 (RFC 1918 space,
#: away from the usual 10.0.x and Docker's 172.17).
SUBNET_POOL = ipaddress.IPv4Network("10.64.0.0/10")
#: Ranks in one /24 of /30s.
members_max = 64
subnet_tries_max = 64
REGISTRY = Path("/run/p2pgpu-net")
NETNS_DIR = Path("/run/netns")
_TOOLS_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
command_timeout_s = 30.0


class NetUnavailable(Exception):
    """A member's network could not be made, or a subnet is not ours to use."""


@dataclass(frozen=True, kw_only=True)
class ClusterNet:
    """Where one member stands on its job's network (pure data)."""

    job_id: str
    subnet: ipaddress.IPv4Network
    rank: int

    def __post_init__(self) -> None:
        if self.subnet.prefixlen != 24 or not self.subnet.subnet_of(SUBNET_POOL):
            raise ValueError(f"a job's subnet is a /24 inside {SUBNET_POOL}, not {self.subnet}")
        if not 0 <= self.rank < members_max:
            raise ValueError(f"rank must be in 0..{members_max - 1}")

    @property
    def host_ip(self) -> ipaddress.IPv4Address:
        return self.subnet[4 * self.rank + 1]

    @property
    def sandbox_ip(self) -> ipaddress.IPv4Address:
        return self.subnet[4 * self.rank + 2]


def subnet_candidate(job_id: str, attempt: int) -> ipaddress.IPv4Network:
    """The ``attempt``-th /24 a job tries (the same on every host)."""
    h = hashlib.sha256(f"p2pgpu/net/{job_id}/{attempt}".encode()).digest()
    index = int.from_bytes(h[:4], "big") % (2 ** (24 - SUBNET_POOL.prefixlen))
    return ipaddress.IPv4Network((int(SUBNET_POOL.network_address) + (index << 8), 24))


def parse_subnet(text: object) -> ipaddress.IPv4Network:
    """A subnet another member sent: a /24 of the pool, or ``ValueError``."""
    if not isinstance(text, str) or len(text) > 32:
        raise ValueError("subnet must be a string like 10.64.1.0/24")
    net = ipaddress.IPv4Network(text, strict=True)
    if net.prefixlen != 24 or not net.subnet_of(SUBNET_POOL):
        raise ValueError(f"{text!r} is not a /24 of {SUBNET_POOL}")
    return net


@dataclass(kw_only=True)
class MemberNet:
    """What :func:`open_member_net` made (and :func:`close_member_net` removes)."""

    net: ClusterNet
    netns: str
    host_if: str
    table: str
    claim: Path

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.netns


def _run(argv: list[str], stdin: bytes | None = None) -> str:
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, timeout=command_timeout_s, check=False,
                              env={"PATH": _TOOLS_PATH, "LANG": "C"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetUnavailable(f"{argv[0]} failed: {exc}") from None
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).decode(errors="replace").strip()[-300:]
        raise NetUnavailable(f"{' '.join(argv[:3])} failed (exit {proc.returncode}): {err}")
    return proc.stdout.decode(errors="replace")


def _locked() -> int:
    REGISTRY.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(REGISTRY / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _holders(subnet: ipaddress.IPv4Network) -> dict[str, str]:
    """rank file -> "job_id ifname" for ``subnet`` in the registry."""
    d = REGISTRY / str(subnet.network_address)
    out = {}
    try:
        for f in sorted(d.iterdir()):
            out[f.name] = f.read_text().strip()
    except OSError:
        return {}
    return out


def _addresses_in(subnet: ipaddress.IPv4Network) -> dict[str, str]:
    """Host interfaces with an IPv4 address in ``subnet``: name -> address."""
    out = {}
    for line in _run(["ip", "-4", "-o", "addr", "show"]).splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] == "inet":
            iface = ipaddress.ip_interface(parts[3])
            if iface.ip in subnet:
                out[parts[1].split("@")[0]] = str(iface.ip)
    return out


def _free_for(job_id: str, subnet: ipaddress.IPv4Network) -> bool:
    holders = _holders(subnet)
    if any(v.split()[0] != job_id for v in holders.values()):
        return False
    ours = {v.split()[1] for v in holders.values() if len(v.split()) > 1}
    return all(name in ours for name in _addresses_in(subnet))


def claim_subnet(job_id: str) -> ipaddress.IPv4Network:
    """Rank 0's choice: the first candidate /24 no other job holds here."""
    fd = _locked()
    try:
        for attempt in range(subnet_tries_max):
            subnet = subnet_candidate(job_id, attempt)
            if _free_for(job_id, subnet):
                return subnet
    finally:
        os.close(fd)
    raise NetUnavailable(f"no free /24 for this job in {subnet_tries_max} tries")


def _table_rules(table: str, host_if: str, subnet: ipaddress.IPv4Network) -> str:
    return f"""table inet {table} {{
  chain job_forward {{
    type filter hook forward priority -10; policy accept;
    iifname "{host_if}" ip daddr {subnet} accept
    iifname "{host_if}" drop
    oifname "{host_if}" ip saddr {subnet} accept
    oifname "{host_if}" drop
  }}
  chain job_input {{
    type filter hook input priority -10; policy accept;
    iifname "{host_if}" drop
  }}
}}
"""


def open_member_net(net: ClusterNet) -> MemberNet:
    """Make this member's namespace, veth and rules (blocking, root).
    Raises :class:`NetUnavailable`, also when the subnet is another job's."""
    tag = secrets.token_hex(5)
    m = MemberNet(net=net, netns=f"p2pgpu-{tag}", host_if=f"pgn{tag}", table=f"p2pgpu_{tag}",
                  claim=REGISTRY / str(net.subnet.network_address) / str(net.rank))
    fd = _locked()
    try:
        if not _free_for(net.job_id, net.subnet):
            raise NetUnavailable(f"{net.subnet} is held by another job on this host")
        if m.claim.exists():
            raise NetUnavailable(f"rank {net.rank} of this job already has a network here")
        m.claim.parent.mkdir(mode=0o700, exist_ok=True)
        m.claim.write_text(f"{net.job_id} {m.host_if}\n")
    finally:
        os.close(fd)
    try:
        _run(["ip", "netns", "add", m.netns])
        _run(["ip", "link", "add", m.host_if, "type", "veth", "peer", "name", "eth0", "netns", m.netns])
        Path(f"/proc/sys/net/ipv6/conf/{m.host_if}/disable_ipv6").write_text("1")
        _run(["nft", "-f", "-"], _table_rules(m.table, m.host_if, net.subnet).encode())
        _run(["ip", "addr", "add", f"{net.host_ip}/30", "dev", m.host_if])
        _run(["ip", "link", "set", m.host_if, "up"])
        Path(f"/proc/sys/net/ipv4/conf/{m.host_if}/forwarding").write_text("1")
        inside = ["ip", "-n", m.netns]
        _run([*inside, "link", "set", "lo", "up"])
        _run([*inside, "addr", "add", f"{net.sandbox_ip}/30", "dev", "eth0"])
        _run([*inside, "link", "set", "eth0", "up"])
        _run([*inside, "route", "add", "default", "via", str(net.host_ip)])
    except (NetUnavailable, OSError) as exc:
        close_member_net(m)
        if isinstance(exc, NetUnavailable):
            raise
        raise NetUnavailable(f"cannot set up the job's network: {exc}") from None
    return m


def close_member_net(m: MemberNet) -> str:
    """Remove the rules, the namespace (the veth pair goes with it) and the
    claim.  Returns "" or what could not be removed; never raises."""
    return remove_member_net(netns=m.netns, table=m.table, claim=str(m.claim))


def remove_member_net(*, netns: str, table: str, claim: str) -> str:
    """The same from recorded names (a previous life's leftovers)."""
    problems = []
    try:
        host_if = Path(claim).read_text().split()[1]
    except (OSError, IndexError):
        host_if = ""
    if host_if.startswith("pgn") and Path(f"/sys/class/net/{host_if}").exists():
        try:  # deleting one end deletes the pair now (a namespace's deletion is deferred)
            _run(["ip", "link", "delete", host_if])
        except NetUnavailable as exc:
            problems.append(str(exc))
    if table.startswith("p2pgpu_"):
        try:
            if table in _run(["nft", "list", "tables"]):
                _run(["nft", "delete", "table", "inet", table])
        except NetUnavailable as exc:
            problems.append(str(exc))
    if netns.startswith("p2pgpu-") and (NETNS_DIR / netns).exists():
        try:
            _run(["ip", "netns", "delete", netns])
        except NetUnavailable as exc:
            problems.append(str(exc))
    path = Path(claim)
    if path.is_relative_to(REGISTRY):
        fd = _locked()
        try:
            path.unlink(missing_ok=True)
            try:
                path.parent.rmdir()
            except OSError:
                pass  # other members of the job still hold the subnet here
        finally:
            os.close(fd)
    return "; ".join(problems)


@lru_cache(maxsize=1)
def net_unavailable() -> str | None:
    """``None`` if members' networks can be made here, else why not (then
    the node does not offer ``ray``).  Probes once by making one."""
    if os.geteuid() != 0:
        return "making a job's network namespace and firewall needs root"
    for tool, pkg in (("ip", "iproute2"), ("nft", "nftables"), ("nsenter", "util-linux")):
        if shutil.which(tool, path=_TOOLS_PATH) is None:
            return f"{tool} is not installed (Debian: {pkg})"
    job = "probe-" + secrets.token_hex(8)
    try:
        m = open_member_net(ClusterNet(job_id=job, subnet=claim_subnet(job), rank=0))
    except NetUnavailable as exc:
        return f"cannot make a job's network here: {exc}"
    left = close_member_net(m)
    return f"cannot remove a job's network here: {left}" if left else None
