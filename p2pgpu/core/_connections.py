"""Connection slots: who may connect, and whom to drop when slots run short.

Cheap identities used to fill every inbound slot of a node (#18.6: 260 fresh
identities, each holding one idle connection, took 249 of 250 slots and an
honest newcomer had no peer for 40 s).  This core decides, the driver
(``p2pgpu/node/_connmgr.py``) carries it out:

- **Admission by address**, before any handshake: at most
  ``inbound_per_ip_max`` inbound connections (live or handshaking) from one
  IP, ``inbound_per_subnet_max`` from one subnet (IPv4 /24, IPv6 /48 by
  default), and ``connections_max`` in all.
- **Relayed connections are counted by the remote peer**, not by address:
  every connection that comes through a relay arrives over the relay's one
  connection, from the relay's IP, so counting them by IP would let one
  relay's clients exhaust the per-IP limit (and a hostile relay fill it).
  At most ``inbound_relayed_per_peer_max`` from one peer and
  ``inbound_relayed_max`` in all, within ``connections_max``.
- **Room for newcomers**: whenever more than ``connections_max -
  newcomer_headroom`` connections are open, the least useful peers are
  closed until that headroom is free again, so a newcomer always finds a
  slot once the manager has run.  A connection younger than ``grace_ms`` is
  never closed (a newcomer must have time to show what it is).
- **Who is least useful**: never a protected peer (bootstrap peers, peers in
  our jobs: the node says which); then peers without a live advert in our book
  before peers with one; among those, the longest idle first (activity: a
  valid message or request from it), then the youngest connection.

Pure: time comes in as ``now_ms``; iteration is over dicts (insertion order),
so the same events give the same decisions.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from ._errors import LocalProtocolError


@dataclass(frozen=True, kw_only=True)
class ConnectionLimits:
    connections_max: int = 160
    newcomer_headroom: int = 16
    inbound_per_ip_max: int = 32
    inbound_per_subnet_max: int = 64
    subnet_prefix_v4: int = 24
    subnet_prefix_v6: int = 48
    grace_ms: int = 10_000
    #: Connections closed per decision (the rest at the next one).
    close_batch_max: int = 32
    #: Inbound connections through relays, in all and from one peer.
    inbound_relayed_max: int = 64
    inbound_relayed_per_peer_max: int = 2

    def __post_init__(self) -> None:
        if not 0 <= self.newcomer_headroom < self.connections_max:
            raise ValueError("newcomer_headroom must be below connections_max")
        if min(self.inbound_per_ip_max, self.inbound_per_subnet_max, self.close_batch_max,
               self.inbound_relayed_max, self.inbound_relayed_per_peer_max) < 1:
            raise ValueError("per-IP, per-subnet and batch limits must be at least 1")
        if not (0 < self.subnet_prefix_v4 <= 32 and 0 < self.subnet_prefix_v6 <= 128):
            raise ValueError("subnet prefixes out of range")


class Refusal:
    """Why an inbound connection was refused before its handshake."""

    PER_IP = "per_ip"
    PER_SUBNET = "per_subnet"
    FULL = "full"
    RELAYED_PER_PEER = "relayed_per_peer"
    RELAYED_FULL = "relayed_full"


@dataclass(slots=True)
class _Peer:
    inbound: bool
    connected_ms: int
    active_ms: int


@dataclass
class ConnectionTable:
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    #: Inbound connections admitted and not yet released, by IP and by subnet.
    per_ip: dict[str, int] = field(default_factory=dict)
    per_subnet: dict[str, int] = field(default_factory=dict)
    #: Inbound relayed connections admitted and not yet released, by peer.
    relayed: dict[str, int] = field(default_factory=dict)
    peers: dict[str, _Peer] = field(default_factory=dict)
    protected: dict[str, None] = field(default_factory=dict)
    known: dict[str, None] = field(default_factory=dict)

    # ------------------------------------------------------- addresses

    def subnet_of(self, ip: str) -> str:
        addr = ipaddress.ip_address(ip)
        prefix = self.limits.subnet_prefix_v4 if addr.version == 4 else self.limits.subnet_prefix_v6
        return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))

    def inbound_open(self) -> int:
        return sum(self.per_ip.values()) + sum(self.relayed.values())

    def total(self) -> int:
        """Open connections: admitted inbound (handshaking or live, direct or
        relayed) plus outbound."""
        return self.inbound_open() + sum(1 for p in self.peers.values() if not p.inbound)

    def admit(self, ip: str) -> str | None:
        """Admit an inbound connection from ``ip`` (its slot is held until
        :meth:`release`), or say why not (a :class:`Refusal`)."""
        lim = self.limits
        subnet = self.subnet_of(ip)
        if self.per_ip.get(ip, 0) >= lim.inbound_per_ip_max:
            return Refusal.PER_IP
        if self.per_subnet.get(subnet, 0) >= lim.inbound_per_subnet_max:
            return Refusal.PER_SUBNET
        if self.total() >= lim.connections_max:
            return Refusal.FULL
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        self.per_subnet[subnet] = self.per_subnet.get(subnet, 0) + 1
        return None

    def release(self, ip: str) -> None:
        subnet = self.subnet_of(ip)
        if self.per_ip.get(ip, 0) < 1:
            raise LocalProtocolError(f"release of {ip} without an admission")
        for table, key in ((self.per_ip, ip), (self.per_subnet, subnet)):
            table[key] -= 1
            if not table[key]:
                del table[key]

    def admit_relayed(self, peer: str) -> str | None:
        """Admit an inbound connection from ``peer`` through a relay (its
        slot is held until :meth:`release_relayed`), or say why not."""
        lim = self.limits
        if self.relayed.get(peer, 0) >= lim.inbound_relayed_per_peer_max:
            return Refusal.RELAYED_PER_PEER
        if sum(self.relayed.values()) >= lim.inbound_relayed_max:
            return Refusal.RELAYED_FULL
        if self.total() >= lim.connections_max:
            return Refusal.FULL
        self.relayed[peer] = self.relayed.get(peer, 0) + 1
        return None

    def release_relayed(self, peer: str) -> None:
        if self.relayed.get(peer, 0) < 1:
            raise LocalProtocolError(f"release of a relayed connection from {peer} without an admission")
        self.relayed[peer] -= 1
        if not self.relayed[peer]:
            del self.relayed[peer]

    # ----------------------------------------------------------- peers

    def connected(self, peer: str, *, inbound: bool, now_ms: int) -> None:
        if peer not in self.peers:
            self.peers[peer] = _Peer(inbound=inbound, connected_ms=now_ms, active_ms=now_ms)

    def disconnected(self, peer: str) -> None:
        self.peers.pop(peer, None)

    def touch(self, peer: str, now_ms: int) -> None:
        """``peer`` did something useful (a valid message, a request)."""
        p = self.peers.get(peer)
        if p is not None:
            p.active_ms = max(p.active_ms, now_ms)

    def set_valued(self, *, protected: Iterable[str], known: Iterable[str]) -> None:
        """Peers never to drop (``protected``), and peers with a live advert
        in our book (``known``), dropped after the unknown ones."""
        self.protected = dict.fromkeys(protected)
        self.known = dict.fromkeys(known)

    def to_close(self, now_ms: int) -> list[str]:
        """The peers to disconnect now to free the newcomers' headroom."""
        lim = self.limits
        excess = len(self.peers) - (lim.connections_max - lim.newcomer_headroom)
        if excess <= 0:
            return []
        candidates = [(pid in self.known, p.active_ms, -p.connected_ms, pid) for pid, p in self.peers.items()
                      if pid not in self.protected and now_ms - p.connected_ms >= lim.grace_ms]
        candidates.sort()
        return [c[3] for c in candidates[:min(excess, lim.close_batch_max)]]
