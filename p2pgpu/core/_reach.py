"""Reachability: which of our addresses others can dial, and whether anyone can.

Most GPU operators sit behind NATs.  A node must advertise only addresses
that others can dial, learn whether it is reachable at all, and, when it is
not, be reached through a relay.  The decisions live here, pure; the driver
(``p2pgpu/node/_reach.py``) runs AutoNAT, the relay and hole punching:

- **Addresses and scopes.**  Multiaddrs are parsed by hand (the cores import
  no libp2p).  Each IP has a *scope*: loopback, private (RFC 1918, CGNAT,
  link-local, ULA) or public (everything a router forwards, documentation
  prefixes included: they stand for the internet in tests).  A node lives in
  one *world*, the widest scope its peers reach it from (its bootstrap
  addresses, the remote addresses of its direct connections, the servers that
  tried to dial it back).  It advertises only addresses of that scope and
  dials only addresses of that scope (and relay addresses): a node on the
  internet never advertises 10.0.0.5, and never dials one a stranger
  advertised; a test network on 127.0.0.1 keeps working on loopback.
- **Reachability** (:class:`ReachabilityTracker`) aggregates AutoNAT
  dial-backs: each server of our world tells whether it could open a *new*
  connection to us.  ``confirmations`` distinct server IPs agreeing make us
  public or private; the latest verdict per server counts, verdicts expire,
  the table is bounded.
- **Advertised addresses** (:func:`advertised_addrs`): the operator's
  ``--announce`` addresses, addresses a server dialled us back on, our listen
  addresses of our world unless we are found private, and relay addresses
  when we hold reservations.
- **The relay service** (:class:`RelayBook`): reservations (in all, per IP,
  with a lifetime), circuits (in all, per source, per destination), bytes and
  duration per circuit.  A peer over a limit is refused or cut; a peer that
  keeps hitting limits is refused for a while; the others are served on.
- **Hole punching** (:class:`PunchBook`): at most a few attempts per peer,
  then a long pause; the outcome is counted.
- **Relay choice** (:func:`choose_relays`): which peers to reserve a slot on.

Time is ``now_ms``; tables are dicts (insertion order), so the same events
give the same decisions.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field
from enum import Enum, IntEnum

# ----------------------------------------------------------------- addresses


class Scope(IntEnum):
    """Where an address can be dialled from; a larger value is a wider world."""

    LOOPBACK = 0
    PRIVATE = 1
    PUBLIC = 2


_PRIVATE_V4 = tuple(ipaddress.IPv4Network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16"))
_NEVER_V4 = tuple(ipaddress.IPv4Network(n) for n in ("0.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4"))
_PRIVATE_V6 = tuple(ipaddress.IPv6Network(n) for n in ("fc00::/7", "fe80::/10"))


def ip_scope(ip: str) -> Scope | None:
    """The scope of an IP address, or None for one nobody can dial
    (unspecified, multicast, reserved) or that is not an IP."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv4Address):
        if addr.is_loopback:
            return Scope.LOOPBACK
        if any(addr in n for n in _NEVER_V4) or addr == ipaddress.IPv4Address("255.255.255.255"):
            return None
        return Scope.PRIVATE if any(addr in n for n in _PRIVATE_V4) else Scope.PUBLIC
    if addr.is_loopback:
        return Scope.LOOPBACK
    if addr.is_unspecified or addr.is_multicast:
        return None
    return Scope.PRIVATE if any(addr in n for n in _PRIVATE_V6) else Scope.PUBLIC


_HOST_PROTOCOLS = ("ip4", "ip6", "dns", "dns4", "dns6")
port_max = 65535
host_len_max = 253


@dataclass(frozen=True, slots=True)
class Addr:
    """A parsed TCP multiaddr: ``/<ip4|ip6|dns*>/<host>/tcp/<port>[/p2p/<id>]``,
    or through a relay: ``<relay addr with /p2p/<relay>>/p2p-circuit[/p2p/<id>]``."""

    proto: str
    host: str
    port: int
    peer: str | None = None
    #: For a relay address: the relay's own address (with its peer id).
    relay: Addr | None = None

    @property
    def is_relay(self) -> bool:
        return self.relay is not None

    @property
    def scope(self) -> Scope | None:
        """The scope of the address that is dialled (a relay address: the relay's)."""
        if self.relay is not None:
            return self.relay.scope
        if self.proto.startswith("dns"):
            return Scope.PUBLIC  # a name an operator announced: meant for the world
        return ip_scope(self.host)

    def transport(self) -> str:
        """The address without any ``/p2p`` part: ``/ip4/1.2.3.4/tcp/4001``."""
        return f"/{self.proto}/{self.host}/tcp/{self.port}"

    def __str__(self) -> str:
        if self.relay is not None:
            tail = f"/p2p/{self.peer}" if self.peer else ""
            return f"{self.relay}/p2p-circuit{tail}"
        return self.transport() + (f"/p2p/{self.peer}" if self.peer else "")


def _peer_id_ok(pid: str) -> bool:
    return 20 <= len(pid) <= 64 and pid.isalnum()


def parse_addr(text: str) -> Addr | None:
    """Parse a multiaddr this project dials (TCP, maybe through one relay);
    None when it is anything else."""
    if not isinstance(text, str) or not text.startswith("/") or len(text) > 512:
        return None
    parts = text.split("/")[1:]
    try:
        circuit = parts.index("p2p-circuit")
    except ValueError:
        return _parse_direct(parts)
    relay = _parse_direct(parts[:circuit])
    if relay is None or relay.peer is None:
        return None
    tail = parts[circuit + 1:]
    if not tail:
        return Addr(proto=relay.proto, host=relay.host, port=relay.port, relay=relay)
    if len(tail) != 2 or tail[0] != "p2p" or not _peer_id_ok(tail[1]) or tail[1] == relay.peer:
        return None
    return Addr(proto=relay.proto, host=relay.host, port=relay.port, peer=tail[1], relay=relay)


def _parse_direct(parts: list[str]) -> Addr | None:
    if len(parts) not in (4, 6) or parts[0] not in _HOST_PROTOCOLS or parts[2] != "tcp":
        return None
    proto, host, port_text = parts[0], parts[1], parts[3]
    if not port_text.isdigit() or not 0 < int(port_text) <= port_max or not 0 < len(host) <= host_len_max:
        return None
    if proto == "ip4" or proto == "ip6":
        try:
            parsed = ipaddress.ip_address(host)
        except ValueError:
            return None
        if (proto == "ip4") != isinstance(parsed, ipaddress.IPv4Address):
            return None
        host = str(parsed)
    elif not all(c.isalnum() or c in "-." for c in host):
        return None
    peer = None
    if len(parts) == 6:
        if parts[4] != "p2p" or not _peer_id_ok(parts[5]):
            return None
        peer = parts[5]
    return Addr(proto=proto, host=host, port=int(port_text), peer=peer)


def check_advert_addr(text: str, peer_id: str) -> str | None:
    """Why an advert of ``peer_id`` may not carry ``text``, or None.  An
    address names no peer but its owner (a relay address names its relay
    too): an advert cannot send dialers to someone else's machine."""
    a = parse_addr(text)
    if a is None:
        return f"not a TCP multiaddr: {text[:80]!r}"
    if a.peer is not None and a.peer != peer_id:
        return "the address names another peer"
    if a.relay is not None and a.relay.peer == peer_id:
        return "a node cannot be its own relay"
    if a.scope is None:
        return f"{a.host} cannot be dialled"
    return None


def world_of(scopes: list[Scope]) -> Scope | None:
    """The widest scope among those our peers reach us from (None: no peer yet)."""
    return max(scopes) if scopes else None


def dialable(addrs: list[str] | tuple[str, ...], world: Scope | None) -> list[str]:
    """The addresses of an advert worth dialling from ``world``: direct ones of
    that very scope first, then relay addresses (whose relay is in it).  Before
    we know our world, every dialable address is tried, narrowest first."""
    direct: list[tuple[Scope, str]] = []
    relayed: list[tuple[Scope, str]] = []
    for text in addrs:
        a = parse_addr(text)
        if a is None or a.scope is None:
            continue
        if world is not None and a.scope != world:
            continue
        (relayed if a.is_relay else direct).append((a.scope, text))
    return [t for _s, t in sorted(direct, key=lambda x: x[0])] + [t for _s, t in relayed]


# -------------------------------------------------------------- reachability


class Reachability(str, Enum):
    PUBLIC = "public"
    PRIVATE = "private"
    UNKNOWN = "unknown"


@dataclass(frozen=True, kw_only=True)
class ReachLimits:
    #: Distinct server IPs that must agree before we call ourselves public or private.
    confirmations: int = 3
    #: A verdict counts this long.
    verdict_ttl_ms: int = 30 * 60_000
    #: Verdicts kept (one per server; the oldest goes).
    servers_max: int = 32
    #: A server is asked again after this long.
    recheck_ms: int = 10 * 60_000
    #: Servers asked per round.
    queries_per_round_max: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.confirmations <= self.servers_max:
            raise ValueError("confirmations must be between 1 and servers_max")
        if min(self.verdict_ttl_ms, self.recheck_ms, self.queries_per_round_max) < 1:
            raise ValueError("reachability limits must be positive")


@dataclass(frozen=True, slots=True)
class DialBack:
    """One server's answer: could it open a new connection to us?"""

    server: str
    server_ip: str
    scope: Scope
    ok: bool
    #: The address it reached us at (a success), or why it failed.
    addr: str
    detail: str
    at_ms: int


@dataclass
class ReachabilityTracker:
    limits: ReachLimits = field(default_factory=ReachLimits)
    verdicts: dict[str, DialBack] = field(default_factory=dict)
    asked_ms: dict[str, int] = field(default_factory=dict)

    def record(self, *, server: str, server_ip: str, ok: bool, addr: str = "", detail: str = "",
               now_ms: int) -> DialBack | None:
        """A server's answer; ignored (None) when its IP has no scope or a
        successful answer names an address we cannot parse."""
        scope = ip_scope(server_ip)
        if scope is None:
            return None
        if ok:
            a = parse_addr(addr)
            if a is None or a.is_relay or a.scope is None:
                return None
            addr = a.transport()
        v = DialBack(server=server, server_ip=server_ip, scope=scope, ok=ok, addr=addr, detail=detail[:200],
                     at_ms=now_ms)
        self.verdicts.pop(server, None)
        self.verdicts[server] = v
        while len(self.verdicts) > self.limits.servers_max:
            del self.verdicts[next(iter(self.verdicts))]
        return v

    def live(self, now_ms: int) -> list[DialBack]:
        return [v for v in self.verdicts.values() if now_ms - v.at_ms <= self.limits.verdict_ttl_ms]

    def scopes(self, now_ms: int) -> list[Scope]:
        return [v.scope for v in self.live(now_ms)]

    def status(self, now_ms: int, world: Scope | None = None) -> tuple[Reachability, str]:
        """Our reachability from ``world`` (default: the widest scope of the
        servers that answered) and why, in words for ``p2pgpu status``."""
        live = self.live(now_ms)
        if world is None:
            world = world_of([v.scope for v in live])
        mine = [v for v in live if v.scope == world]
        ok_ips = list(dict.fromkeys(v.server_ip for v in mine if v.ok))
        bad_ips = list(dict.fromkeys(v.server_ip for v in mine if not v.ok and v.server_ip not in ok_ips))
        k = self.limits.confirmations
        where = "" if world is None else f" ({world.name.lower()} scope)"
        if len(ok_ips) >= k:
            addrs = sorted({v.addr for v in mine if v.ok})
            return Reachability.PUBLIC, (f"{len(ok_ips)} peers at distinct addresses dialled us back{where}"
                                         f" at {', '.join(addrs[:3])}")
        if len(bad_ips) >= k and not ok_ips:
            detail = next((v.detail for v in mine if not v.ok and v.detail), "")
            return Reachability.PRIVATE, (f"{len(bad_ips)} peers at distinct addresses could not dial us back{where}"
                                          + (f" ({detail})" if detail else "")
                                          + ": behind a NAT or firewall; reached through relays")
        if not mine:
            return Reachability.UNKNOWN, "no peer has tried to dial us back yet"
        return Reachability.UNKNOWN, (f"{len(ok_ips)} dial-backs succeeded and {len(bad_ips)} failed;"
                                      f" {k} agreeing peers at distinct addresses are needed")

    def confirmed_addrs(self, now_ms: int, world: Scope | None) -> list[str]:
        """Addresses of ``world`` that servers dialled us back on, most
        confirmed first."""
        count: dict[str, int] = {}
        for v in self.live(now_ms):
            if v.ok and v.scope == world and parse_addr(v.addr) is not None:
                count[v.addr] = count.get(v.addr, 0) + 1
        return sorted(count, key=lambda a: -count[a])

    def due(self, candidates: list[str], now_ms: int) -> list[str]:
        """Which of ``candidates`` (peers directly connected to us, able to
        serve AutoNAT) to ask now: never-asked first, then the longest ago."""
        lim = self.limits
        want = [p for p in candidates if now_ms - self.asked_ms.get(p, -lim.recheck_ms) >= lim.recheck_ms]
        want.sort(key=lambda p: self.asked_ms.get(p, -1))
        chosen = want[:lim.queries_per_round_max]
        for p in chosen:
            self.asked_ms.pop(p, None)
            self.asked_ms[p] = now_ms
        while len(self.asked_ms) > 4 * lim.servers_max:
            del self.asked_ms[next(iter(self.asked_ms))]
        return chosen


def advertised_addrs(*, announce: list[str], confirmed: list[str], listen: list[str], relay: list[str],
                     world: Scope | None, reachability: Reachability, addrs_max: int = 8) -> list[str]:
    """The addresses a node puts in its signed advert, best first:

    - ``announce``: the operator's own word (a forwarded port), always;
    - ``confirmed``: addresses peers dialled us back on, of our world;
    - ``listen``: our listen addresses of our world, unless peers found us
      private (they tried, nobody got through);
    - ``relay``: circuit addresses through the relays we hold slots on.

    Never an address of a narrower scope than our world (loopback or private
    addresses to peers outside them) and never one nobody can dial."""
    out: dict[str, None] = {}
    for a in announce:
        if parse_addr(a) is not None:
            out[a] = None
    for a in confirmed:
        p = parse_addr(a)
        if p is not None and not p.is_relay and p.scope == world:
            out[a] = None
    if reachability is not Reachability.PRIVATE:
        for a in listen:
            p = parse_addr(a)
            if p is not None and not p.is_relay and p.scope is not None and p.scope == world:
                out[a] = None
    for a in relay:
        p = parse_addr(a)
        if p is not None and p.is_relay and (world is None or p.scope == world):
            out[a] = None
    return list(out)[:addrs_max]


def needs_relay(*, advertised_direct: int, reachability: Reachability) -> bool:
    """A node reserves relay slots when peers found it private, or when it has
    no direct address anyone in its world could dial (its listen addresses
    are all narrower: it sits behind a NAT, it need not wait for AutoNAT)."""
    return reachability is Reachability.PRIVATE or advertised_direct == 0


# ------------------------------------------------------------- relay service


class RelayRefusal(str, Enum):
    """Why a relay refused a reservation or a circuit (status codes of
    Circuit Relay v2: RESERVATION_REFUSED, RESOURCE_LIMIT_EXCEEDED,
    NO_RESERVATION, PERMISSION_DENIED)."""

    OFF = "relay_off"
    RESERVATIONS_FULL = "reservations_full"
    RESERVATIONS_PER_IP = "reservations_per_ip"
    CIRCUITS_FULL = "circuits_full"
    CIRCUITS_PER_PEER = "circuits_per_peer"
    CIRCUITS_PER_DESTINATION = "circuits_per_destination"
    NO_RESERVATION = "no_reservation"
    BANNED = "banned"
    SELF = "self"


class CircuitCut(str, Enum):
    BYTES = "bytes"
    DURATION = "duration"


@dataclass(frozen=True, kw_only=True)
class RelayLimits:
    """What a public node lends to private ones (config.toml ``relay_*``)."""

    reservations_max: int = 128
    reservations_per_ip_max: int = 8
    reservation_ttl_ms: int = 3600_000
    circuits_max: int = 64
    #: Open circuits from one source peer.
    circuits_per_peer_max: int = 8
    #: Open circuits to one destination (above the per-source limit, so one
    #: source over its limit cannot lock others out of a destination).
    circuits_per_destination_max: int = 32
    circuit_duration_ms_max: int = 3600_000
    #: Bytes in both directions together, per circuit.
    circuit_bytes_max: int = 1 << 30
    #: Refusals and cuts within ``strike_window_ms`` before a peer is refused
    #: everything for ``ban_ms``.
    strikes_max: int = 8
    strike_window_ms: int = 60_000
    ban_ms: int = 10 * 60_000
    #: Peers whose strikes are remembered.
    strike_table_max: int = 4096

    def __post_init__(self) -> None:
        for name in ("reservations_max", "reservations_per_ip_max", "reservation_ttl_ms", "circuits_max",
                     "circuits_per_peer_max", "circuits_per_destination_max", "circuit_duration_ms_max",
                     "circuit_bytes_max", "strikes_max", "strike_window_ms", "strike_table_max"):
            if getattr(self, name) < 1:
                raise ValueError(f"relay limit {name} must be at least 1")
        if self.ban_ms < 0:
            raise ValueError("relay ban_ms must not be negative")


@dataclass(slots=True)
class _Reservation:
    ip: str
    expires_ms: int


@dataclass(slots=True)
class Circuit:
    id: int
    src: str
    dst: str
    opened_ms: int
    bytes: int = 0


@dataclass
class RelayBook:
    limits: RelayLimits = field(default_factory=RelayLimits)
    reservations: dict[str, _Reservation] = field(default_factory=dict)
    circuits: dict[int, Circuit] = field(default_factory=dict)
    #: peer -> times of its recent strikes; peer -> banned until.
    strikes: dict[str, list[int]] = field(default_factory=dict)
    banned: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    cut: dict[str, int] = field(default_factory=dict)
    _next_id: int = 0

    # --------------------------------------------------------- bookkeeping

    def _count(self, table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1

    def _strike(self, peer: str, now_ms: int) -> None:
        lim = self.limits
        times = [t for t in self.strikes.pop(peer, []) if now_ms - t < lim.strike_window_ms]
        times.append(now_ms)
        self.strikes[peer] = times[-lim.strikes_max:]
        while len(self.strikes) > lim.strike_table_max:
            del self.strikes[next(iter(self.strikes))]
        if len(times) >= lim.strikes_max and lim.ban_ms > 0:
            self.banned[peer] = now_ms + lim.ban_ms
            self.reservations.pop(peer, None)
            while len(self.banned) > lim.strike_table_max:
                del self.banned[next(iter(self.banned))]

    def is_banned(self, peer: str, now_ms: int) -> bool:
        until = self.banned.get(peer)
        if until is not None and now_ms >= until:
            del self.banned[peer]
            return False
        return until is not None

    def _refuse(self, why: RelayRefusal, peer: str, now_ms: int, *, strike: bool) -> RelayRefusal:
        self._count(self.refused, why.value)
        if strike:
            self._strike(peer, now_ms)
        return why

    def expire(self, now_ms: int) -> None:
        for peer in [p for p, r in self.reservations.items() if now_ms >= r.expires_ms]:
            del self.reservations[peer]

    # -------------------------------------------------------- reservations

    def reserve(self, peer: str, ip: str, now_ms: int) -> RelayRefusal | int:
        """A reservation for ``peer`` connected from ``ip``: its expiry
        (ms), or why not.  Renewing one's own reservation always works while
        it lives."""
        lim = self.limits
        self.expire(now_ms)
        if self.is_banned(peer, now_ms):
            return self._refuse(RelayRefusal.BANNED, peer, now_ms, strike=False)
        mine = self.reservations.pop(peer, None)
        if mine is None:
            if len(self.reservations) >= lim.reservations_max:
                return self._refuse(RelayRefusal.RESERVATIONS_FULL, peer, now_ms, strike=False)
            if sum(1 for r in self.reservations.values() if r.ip == ip) >= lim.reservations_per_ip_max:
                return self._refuse(RelayRefusal.RESERVATIONS_PER_IP, peer, now_ms, strike=True)
        expires = now_ms + lim.reservation_ttl_ms
        self.reservations[peer] = _Reservation(ip=ip, expires_ms=expires)
        return expires

    def drop_reservation(self, peer: str) -> None:
        """The peer disconnected: its slot is free (a reservation holds only
        while its connection to the relay lives)."""
        self.reservations.pop(peer, None)

    # ------------------------------------------------------------ circuits

    def open_circuit(self, src: str, dst: str, now_ms: int) -> RelayRefusal | Circuit:
        lim = self.limits
        self.expire(now_ms)
        if src == dst:
            return self._refuse(RelayRefusal.SELF, src, now_ms, strike=True)
        if self.is_banned(src, now_ms):
            return self._refuse(RelayRefusal.BANNED, src, now_ms, strike=False)
        if dst not in self.reservations:
            return self._refuse(RelayRefusal.NO_RESERVATION, src, now_ms, strike=True)
        if len(self.circuits) >= lim.circuits_max:
            return self._refuse(RelayRefusal.CIRCUITS_FULL, src, now_ms, strike=False)
        if sum(1 for c in self.circuits.values() if c.src == src) >= lim.circuits_per_peer_max:
            return self._refuse(RelayRefusal.CIRCUITS_PER_PEER, src, now_ms, strike=True)
        if sum(1 for c in self.circuits.values() if c.dst == dst) >= lim.circuits_per_destination_max:
            return self._refuse(RelayRefusal.CIRCUITS_PER_DESTINATION, src, now_ms, strike=False)
        self._next_id += 1
        c = Circuit(id=self._next_id, src=src, dst=dst, opened_ms=now_ms)
        self.circuits[c.id] = c
        return c

    def allow_bytes(self, circuit_id: int, n: int, now_ms: int) -> CircuitCut | None:
        """``n`` more bytes on a circuit (either direction): None to pass them
        on, or why the circuit must be cut now (the source takes a strike)."""
        c = self.circuits.get(circuit_id)
        if c is None:
            return CircuitCut.DURATION  # already closed: nothing more goes through
        lim = self.limits
        if now_ms - c.opened_ms > lim.circuit_duration_ms_max:
            return self._cut(c, CircuitCut.DURATION, now_ms)
        if c.bytes + n > lim.circuit_bytes_max:
            return self._cut(c, CircuitCut.BYTES, now_ms)
        c.bytes += n
        return None

    def cut_now(self, circuit_id: int, why: CircuitCut, now_ms: int) -> None:
        """The driver cut a circuit itself (its duration ran out while idle)."""
        c = self.circuits.get(circuit_id)
        if c is not None:
            self._cut(c, why, now_ms)

    def _cut(self, c: Circuit, why: CircuitCut, now_ms: int) -> CircuitCut:
        self._count(self.cut, why.value)
        self._strike(c.src, now_ms)
        self.circuits.pop(c.id, None)
        return why

    def overdue(self, now_ms: int) -> list[int]:
        """Circuits past their duration (idle ones too): cut them."""
        lim = self.limits
        late = [c for c in self.circuits.values() if now_ms - c.opened_ms > lim.circuit_duration_ms_max]
        for c in late:
            self._count(self.cut, CircuitCut.DURATION.value)
            self.circuits.pop(c.id, None)
        return [c.id for c in late]

    def close_circuit(self, circuit_id: int) -> None:
        self.circuits.pop(circuit_id, None)

    def status(self, now_ms: int) -> dict[str, object]:
        self.expire(now_ms)
        return {"reservations": len(self.reservations), "circuits": len(self.circuits),
                "circuit_bytes": sum(c.bytes for c in self.circuits.values()),
                "refused": dict(sorted(self.refused.items())), "cut": dict(sorted(self.cut.items())),
                "banned": sum(1 for p in list(self.banned) if self.is_banned(p, now_ms))}


# -------------------------------------------------------------- hole punching


@dataclass(frozen=True, kw_only=True)
class PunchLimits:
    attempts_max: int = 3
    #: After ``attempts_max`` failures, the next try waits this long.
    retry_ms: int = 10 * 60_000
    #: Between two attempts to one peer.
    spacing_ms: int = 5_000
    peers_max: int = 4096


@dataclass(slots=True)
class _Punch:
    attempts: int = 0
    last_ms: int = 0
    ok: bool = False


@dataclass
class PunchBook:
    limits: PunchLimits = field(default_factory=PunchLimits)
    peers: dict[str, _Punch] = field(default_factory=dict)
    succeeded: int = 0
    failed: int = 0

    def should_try(self, peer: str, now_ms: int) -> bool:
        p = self.peers.get(peer)
        if p is None:
            return True
        lim = self.limits
        if p.attempts >= lim.attempts_max:
            if now_ms - p.last_ms < lim.retry_ms:
                return False
            p.attempts = 0
        return now_ms - p.last_ms >= lim.spacing_ms

    def started(self, peer: str, now_ms: int) -> None:
        p = self.peers.pop(peer, None) or _Punch()
        p.attempts += 1
        p.last_ms = now_ms
        self.peers[peer] = p
        while len(self.peers) > self.limits.peers_max:
            del self.peers[next(iter(self.peers))]

    def finished(self, peer: str, ok: bool) -> None:
        p = self.peers.get(peer)
        if ok:
            self.succeeded += 1
            if p is not None:
                p.ok, p.attempts = True, 0
        else:
            self.failed += 1

    def forget(self, peer: str) -> None:
        """The peer left: a later relayed connection to it may punch again."""
        self.peers.pop(peer, None)


# -------------------------------------------------------------- relay choice


def choose_relays(*, candidates: list[str], bootstrap: list[str], holding: list[str], failed_until: dict[str, int],
                  me: str, want: int, now_ms: int) -> list[str]:
    """The peers to ask for a slot now, so that ``want`` are held: bootstrap
    peers first (the operator chose them), then the other candidates in an
    order that differs per node (rank by a hash of both ids, so private nodes
    spread over the relays), never one that refused us recently."""
    need = want - len(holding)
    if need <= 0:
        return []
    pool = [p for p in dict.fromkeys(candidates) if p != me and p not in holding
            and failed_until.get(p, 0) <= now_ms]
    boot = [p for p in pool if p in bootstrap]
    rest = sorted((p for p in pool if p not in bootstrap), key=lambda p: hashlib.sha256((me + p).encode()).digest())
    return (boot + rest)[:need]
