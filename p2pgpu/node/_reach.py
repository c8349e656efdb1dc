"""The node's reachability service: AutoNAT, relays, hole punching, its addresses.

This is the driver of ``core/_reach.py``'s decisions; it owns the three
protocols (``_autonat``, ``_relay``, ``_holepunch``) and four small loops,
all in the nursery of :meth:`ReachService.run`:

- **autonat**: every ``tick_s``, ask the directly connected peers that are
  due (``ReachabilityTracker.due``) to dial us back; record their verdicts.
- **relay**: when we need a relay (``core.needs_relay``: found private, or
  no direct address of our world to advertise), hold slots on
  ``relays_target`` relays: bootstrap peers and peers whose signed advert
  shows a direct address of our world (learned from the market, which comes
  from bootstrap peers and the DHT), dialled if need be; renew them before
  they expire; drop the ones whose connection died.
- **punch**: for each relayed connection we accepted, try a hole punch
  once (``PunchBook`` bounds retries); when a direct connection to a peer
  exists, close its relayed ones once they carry no stream, or after
  ``retire_busy_after_s`` whatever they carry (new streams open on the
  direct connection meanwhile: the swarm prefers direct ones).
- whenever what we would advertise changes, ``on_addrs_changed`` is called
  (the node re-signs its advert).

Addresses: the listen addresses with wildcards (``0.0.0.0``, ``::``)
expanded to the machine's interface addresses; our *world* (the widest scope
our bootstrap peers, our direct connections and the AutoNAT servers reach
us from); what we advertise (``core.advertised_addrs``).
"""

from __future__ import annotations

import fcntl
import logging
import socket
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.rcmgr import Direction
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from p2pgpu.core import (
    PunchBook,
    Reachability,
    ReachabilityTracker,
    ReachLimits,
    RelayLimits,
    Scope,
    advertised_addrs,
    choose_relays,
    dialable,
    ip_scope,
    needs_relay,
    parse_addr,
    world_of,
)

from ._autonat import AUTONAT_PROTOCOL, AutoNatServer, ask, remote_ip
from ._holepunch import HolePuncher, connection_kind, install_trim_fix
from ._relay import HOP_PROTOCOL, STOP_PROTOCOL, RelayClient, RelayDialFailed, RelayService, StopHandler
from ._streams import guarded

log = logging.getLogger("p2pgpu.reach")

RELAY_MODES = ("auto", "on", "off")
tick_s = 2.0
#: A refused or failed relay is not asked again for this long.
relay_retry_s = 60.0
#: A slot is renewed when less than this share of its life is left.
renew_at_share = 0.25
#: A relayed connection with a direct twin closes once idle and the twin
#: this old; a busy one (long-lived direct-link streams, a transfer) once the
#: twin is ``retire_busy_after_s`` old: new streams already open on the
#: direct one (the swarm prefers direct), and a direct link whose stream is
#: cut reopens it there.
retire_after_s = 2.0
retire_busy_after_s = 60.0
punches_concurrent_max = 4
#: Market peers looked at for relay slots per round.
relay_candidates_max = 256
autonat_answer_timeout_s = 20.0
interfaces_ttl_s = 30.0


@dataclass(frozen=True, kw_only=True)
class ReachConfig:
    #: Transport multiaddrs the operator says the world reaches us at (a forwarded port).
    announce: tuple[str, ...] = ()
    #: auto: lend relay slots while peers find us public; on; off.
    relay_service: str = "auto"
    relay_limits: RelayLimits = field(default_factory=RelayLimits)
    relays_target: int = 2
    reach_limits: ReachLimits = field(default_factory=ReachLimits)
    hole_punching: bool = True
    bootstrap: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.relay_service not in RELAY_MODES:
            raise ValueError(f"relay_service must be one of {', '.join(RELAY_MODES)}, not {self.relay_service!r}")
        if not 0 <= self.relays_target <= 8:
            raise ValueError("relays_target must be from 0 to 8")
        for a in self.announce:
            p = parse_addr(a)
            if p is None or p.is_relay or p.scope is None:
                raise ValueError(f"announce: {a!r} is not a dialable TCP multiaddr such as /ip4/203.0.113.7/tcp/4001")


# ---------------------------------------------------------------- interfaces


def _ipv4_of(name: str) -> str | None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
        return socket.inet_ntoa(packed[20:24])
    except OSError:
        return None  # no IPv4 address on this interface
    finally:
        s.close()


def interface_addresses() -> list[str]:
    """The machine's IP addresses (Linux: one IPv4 per interface by ioctl,
    IPv6 from /proc/net/if_inet6); loopback included."""
    out: list[str] = []
    try:
        names = [n for _i, n in socket.if_nameindex()]
    except OSError:
        names = []
    for n in names:
        ip = _ipv4_of(n)
        if ip and ip not in out:
            out.append(ip)
    try:
        lines = Path("/proc/net/if_inet6").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        raw = line.split()[0] if line.split() else ""
        if len(raw) == 32:
            ip6 = socket.inet_ntop(socket.AF_INET6, bytes.fromhex(raw))
            if ip6 not in out:
                out.append(ip6)
    return out or ["127.0.0.1"]


def expand_listen(addrs: list[str], interfaces: list[str]) -> list[str]:
    """Listen multiaddrs with wildcards replaced by interface addresses
    (``/ip4/0.0.0.0/tcp/4001`` -> one per IPv4 interface); transport form,
    no ``/p2p``."""
    out: list[str] = []
    for text in addrs:
        a = parse_addr(text.split("/p2p/")[0]) if "/p2p/" in text else None
        raw = text.split("/p2p/")[0]
        parts = raw.split("/")
        if len(parts) >= 5 and parts[1] in ("ip4", "ip6") and parts[3] == "tcp":
            proto, host, port = parts[1], parts[2], parts[4]
            if host in ("0.0.0.0", "::"):
                v4 = proto == "ip4"
                for ip in interfaces:
                    if (":" not in ip) == v4 and not ip.startswith("fe80"):
                        out.append(f"/{proto}/{ip}/tcp/{port}")
                continue
            out.append(f"/{proto}/{host}/tcp/{port}")
        elif a is not None:
            out.append(a.transport())
    return list(dict.fromkeys(o for o in out if parse_addr(o) is not None))


# ------------------------------------------------------------------- service


class ReachService:
    def __init__(self, host: Any, *, config: ReachConfig, counts: Counter[str], now_ms: Callable[[], int],
                 on_addrs_changed: Callable[[], None], peer_addrs: Callable[[str], list[str]],
                 admit_relayed: Callable[[str], str | None], release_relayed: Callable[[str], None],
                 on_direct: Callable[[str], None] = lambda _p: None,
                 known_peers: Callable[[], list[str]] = list) -> None:
        self.host = host
        self.me = host.get_id().to_base58()
        self.config = config
        self.counts = counts
        self.now_ms = now_ms
        self.on_addrs_changed = on_addrs_changed
        #: A peer's advertised addresses (from its signed advert), or [].
        self.peer_addrs = peer_addrs
        self.on_direct = on_direct
        #: Peers with a live advert in our market (gossip, market syncs, the DHT).
        self.known_peers = known_peers
        self.tracker = ReachabilityTracker(config.reach_limits)
        self.punches = PunchBook()
        self.autonat = AutoNatServer(host, counts, now_s=lambda: self.now_ms() / 1000)
        self.relay = RelayService(host, config.relay_limits, counts, now_ms=now_ms, enabled=self.relay_enabled,
                                  public_addrs=self._direct_advertised)
        self.client = RelayClient(host, counts)
        self.stop = StopHandler(host, counts, holding=lambda r: r in self.client.holding, admit=admit_relayed,
                                release=release_relayed)
        self.puncher = HolePuncher(host, world=self.world, own_addrs=self._direct_advertised)
        self._relay_failed: dict[str, float] = {}
        self._advertised: list[str] = []
        self._interfaces: tuple[float, list[str]] = (-1e9, [])
        self._punching: set[str] = set()
        self._direct_since: dict[str, float] = {}
        self._punch_slots = trio.Semaphore(punches_concurrent_max)
        self._nursery: trio.Nursery | None = None

    # ------------------------------------------------------------- wiring

    def install(self) -> None:
        """Stream handlers and the swarm fix; call before peers connect."""
        install_trim_fix()
        self.host.set_stream_handler(AUTONAT_PROTOCOL, guarded("autonat", self.autonat.serve, self.counts,
                                                               timeout_s=30))
        lim = self.config.relay_limits
        self.host.set_stream_handler(HOP_PROTOCOL, guarded(
            "relay", self.relay.serve, self.counts, timeout_s=lim.circuit_duration_ms_max / 1000 + 60))
        self.host.set_stream_handler(STOP_PROTOCOL, guarded("relayed_in", self.stop.serve, self.counts,
                                                            timeout_s=7 * 24 * 3600))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.config.hole_punching:
                await nursery.start(self._run_puncher)
            self.refresh()
            task_status.started()
            for loop in (self._autonat_loop, self._relay_loop, self._punch_loop):
                nursery.start_soon(self._supervised, loop)

    async def _run_puncher(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self.puncher):
            task_status.started()
            await trio.sleep_forever()

    async def _supervised(self, loop: Callable[[], Any]) -> None:
        name = loop.__name__.strip("_")
        while True:
            try:
                await loop()
            except (BaseLibp2pError, OSError, ValueError, KeyError, RuntimeError) as exc:
                self.counts[f"{name}:errors"] += 1
                log.warning("%s: %s: %s (restarting in %s s)", name, type(exc).__name__, exc, tick_s)
                await trio.sleep(tick_s)

    # ------------------------------------------------------------ queries

    def relay_enabled(self) -> bool:
        mode = self.config.relay_service
        if mode != "auto":
            return mode == "on"
        return self.reachability()[0] is Reachability.PUBLIC

    def interfaces(self) -> list[str]:
        at, got = self._interfaces
        now = trio.current_time()
        if now - at > interfaces_ttl_s:
            got = interface_addresses()
            self._interfaces = (now, got)
        return got

    def listen_addrs(self) -> list[str]:
        """Our listen addresses, wildcards expanded (transport form)."""
        raw = [str(a) for a in self.host.get_transport_addrs()]
        return expand_listen(raw, self.interfaces())

    def direct_conns(self) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for pid, conns in self.host.get_network().connections.items():
            for c in conns:
                out.setdefault(pid.to_base58(), []).append(c)
        return out

    def world(self) -> Scope | None:
        scopes: list[Scope] = []
        for b in self.config.bootstrap:
            a = parse_addr(b)
            if a is not None and a.scope is not None and not a.is_relay:
                scopes.append(a.scope)
        for conns in self.direct_conns().values():
            for c in conns:
                if connection_kind(c) == "direct":
                    s = ip_scope(remote_ip(c.muxed_conn) or "")
                    if s is not None:
                        scopes.append(s)
        scopes += self.tracker.scopes(self.now_ms())
        return world_of(scopes)

    def reachability(self) -> tuple[Reachability, str]:
        return self.tracker.status(self.now_ms(), self.world())

    def _compute(self) -> list[str]:
        world = self.world()
        state, _why = self.reachability()
        addrs = advertised_addrs(announce=list(self.config.announce),
                                 confirmed=self.tracker.confirmed_addrs(self.now_ms(), world),
                                 listen=self.listen_addrs(), relay=self.client.circuit_addrs(), world=world,
                                 reachability=state)
        return [a if "/p2p/" in a else f"{a}/p2p/{self.me}" for a in addrs]

    def advertised(self) -> list[str]:
        """What goes into our signed advert (full multiaddrs)."""
        return list(self._advertised)

    def _direct_advertised(self) -> list[str]:
        return [a.split("/p2p/")[0] for a in self._advertised if "/p2p-circuit" not in a]

    def refresh(self) -> bool:
        """Recompute what we advertise; tell the node when it changed."""
        new = self._compute()
        if new != self._advertised:
            self._advertised = new
            log.info("advertised addresses now: %s", ", ".join(new) or "none")
            self.counts["addrs_changed"] += 1
            self.on_addrs_changed()
            return True
        return False

    def connections(self) -> dict[str, list[str]]:
        """Per connected peer, the kind of each connection (direct, relayed)."""
        return {pid: [connection_kind(c) for c in conns] for pid, conns in sorted(self.direct_conns().items())}

    def status(self) -> dict[str, Any]:
        state, why = self.reachability()
        world = self.world()
        kinds = Counter(k for ks in self.connections().values() for k in ks)
        return {
            "reachability": state.value,
            "why": why,
            "world": world.name.lower() if world is not None else None,
            "advertised_addrs": self.advertised(),
            "listen_addrs": self.listen_addrs(),
            "dialbacks": [{"server": v.server, "server_ip": v.server_ip, "ok": v.ok, "addr": v.addr,
                           "detail": v.detail} for v in self.tracker.live(self.now_ms())][-8:],
            "relays": [{"relay": h.relay, "expires_in_s": round(h.expires_s - trio.current_time(), 1),
                        "addrs": h.circuit_addrs} for h in self.client.holding.values()],
            "relay_service": self.relay.status(),
            "hole_punch": {"succeeded": self.punches.succeeded, "failed": self.punches.failed},
            "connections": {"direct": kinds.get("direct", 0), "relayed": kinds.get("relayed", 0)},
        }

    # ------------------------------------------------------------- dialing

    async def dial(self, addr: str, timeout_s: float) -> bool:
        """Connect to the peer at ``addr`` (direct, or through its relay)."""
        a = parse_addr(addr)
        if a is None or a.peer is None or a.peer == self.me:
            return False
        dest = ID.from_base58(a.peer)
        if a.is_relay:
            try:
                await self.client.dial(addr, dest, timeout_s)
                return True
            except RelayDialFailed as exc:
                self.counts["relay_dial_failed"] += 1
                log.info("dial %s through its relay failed: %s", a.peer, exc)
                return False
        with trio.move_on_after(timeout_s):
            try:
                await self.host.connect(PeerInfo(dest, [Multiaddr(a.transport())]))
                return True
            except (BaseLibp2pError, OSError) as exc:
                log.info("dial %s failed: %s", addr, exc)
        return False

    def dial_order(self, addrs: list[str] | tuple[str, ...]) -> list[str]:
        """The addresses of an advert worth dialling from our world, direct first."""
        return dialable(addrs, self.world())

    # --------------------------------------------------------------- loops

    async def _autonat_loop(self) -> None:
        await trio.sleep(0.5)
        while True:
            conns = self.direct_conns()
            candidates = [pid for pid, cs in conns.items() if any(connection_kind(c) == "direct" for c in cs)]
            due = self.tracker.due(candidates, self.now_ms())
            if due:
                async with trio.open_nursery() as n:
                    for pid in due:
                        n.start_soon(self._ask_one, pid, conns[pid])
            self.refresh()
            await trio.sleep(tick_s)

    async def _ask_one(self, pid: str, conns: list[Any]) -> None:
        direct = [c for c in conns if connection_kind(c) == "direct"]
        if not direct:
            return
        server_ip = remote_ip(direct[0].muxed_conn)
        listen = self.listen_addrs()
        if server_ip is None or not listen:
            return
        answer = await ask(self.host, ID.from_base58(pid), listen, autonat_answer_timeout_s)
        if answer.judged:
            self.tracker.record(server=pid, server_ip=server_ip, ok=answer.ok, addr=answer.addr,
                                detail=answer.detail, now_ms=self.now_ms())
            self.counts[f"autonat_asked:{'ok' if answer.ok else 'failed'}"] += 1
        else:
            self.counts["autonat_asked:no_verdict"] += 1

    def _relay_candidates(self) -> tuple[list[str], list[str]]:
        """Peers that may lend us a slot: our bootstrap peers, then peers
        (connected, or known from the market) whose signed advert shows a
        direct address of our world.  ``choose_relays`` ranks the others by a
        hash of both ids, so private nodes spread over the network's relays
        instead of all crowding the bootstrap peers."""
        boot = [a.peer for a in (parse_addr(b) for b in self.config.bootstrap) if a is not None and a.peer]
        world = self.world()
        cands = list(boot)
        pool = list(dict.fromkeys([*self.direct_conns(), *self.known_peers()[:relay_candidates_max]]))
        for pid in pool:
            if any("/p2p-circuit" not in x for x in dialable(self.peer_addrs(pid), world)):
                cands.append(pid)
        return cands, boot

    async def _relay_loop(self) -> None:
        await trio.sleep(1.0)
        while True:
            await self._relay_round()
            await trio.sleep(tick_s)

    async def _relay_round(self) -> None:
        changed = False
        conns = self.direct_conns()
        for rid in list(self.client.holding):
            alive = any(connection_kind(c) == "direct" for c in conns.get(rid, []))
            if not alive or self.client.holding[rid].expires_s <= trio.current_time():
                changed |= self.client.drop(rid)
        state, _ = self.reachability()
        if needs_relay(advertised_direct=len(self._direct_advertised()), reachability=state):
            now = trio.current_time()
            for rid, held in list(self.client.holding.items()):
                ttl_left = held.expires_s - now
                if ttl_left < relay_retry_s or ttl_left < renew_at_share * self.config.relay_limits.reservation_ttl_ms / 1000:
                    await self.client.reserve(ID.from_base58(rid), self._relay_addrs(rid))
            cands, boot = self._relay_candidates()
            chosen = choose_relays(candidates=cands, bootstrap=boot, holding=list(self.client.holding),
                                   failed_until={p: int(t * 1000) for p, t in self._relay_failed.items()},
                                   me=self.me, want=self.config.relays_target, now_ms=int(now * 1000))
            for rid in chosen:
                if not await self._ensure_connected(rid):
                    self._relay_failed[rid] = now + relay_retry_s
                    continue
                why = await self.client.reserve(ID.from_base58(rid), self._relay_addrs(rid))
                if why is None:
                    log.info("holding a relay slot on %s", rid)
                    changed = True
                else:
                    log.info("relay %s: %s", rid, why)
                    self._relay_failed[rid] = now + relay_retry_s
            for p in [p for p, t in self._relay_failed.items() if t <= now]:
                del self._relay_failed[p]
        elif self.client.holding:
            self.client.holding.clear()  # reachable directly: relay addresses no longer needed
            changed = True
        if changed:
            self.refresh()

    def _relay_addrs(self, rid: str) -> list[str]:
        """How we know a relay: the address we reached it at first, then its
        advertised direct addresses of our world."""
        out: list[str] = []
        for c in self.direct_conns().get(rid, []):
            if connection_kind(c) != "direct":
                continue
            remote = c.muxed_conn.get_remote_address() if hasattr(c.muxed_conn, "get_remote_address") else None
            if remote:
                ip, port = remote[0], remote[1]
                out.append(f"/ip6/{ip}/tcp/{port}" if ":" in ip else f"/ip4/{ip}/tcp/{port}")
        # An inbound connection's remote port is the relay's ephemeral port:
        # its advert says where it listens.
        adv = [a.split("/p2p/")[0] for a in dialable(self.peer_addrs(rid), self.world()) if "/p2p-circuit" not in a]
        return adv + [o for o in out if o not in adv]

    async def _ensure_connected(self, pid: str) -> bool:
        if any(connection_kind(c) == "direct" for c in self.direct_conns().get(pid, [])):
            return True
        for addr in dialable(self.peer_addrs(pid), self.world()):
            if "/p2p-circuit" in addr:
                continue
            full = addr if "/p2p/" in addr else f"{addr}/p2p/{pid}"
            if await self.dial(full, 5.0):
                return True
        return False

    async def _punch_loop(self) -> None:
        await trio.sleep(0.5)
        while True:
            await self._punch_round()
            await trio.sleep(tick_s / 2)

    async def _punch_round(self) -> None:
        assert self._nursery is not None
        now_s = trio.current_time()
        for pid, conns in self.direct_conns().items():
            direct = [c for c in conns if connection_kind(c) == "direct" and not c.is_closed]
            relayed = [c for c in conns if connection_kind(c) == "relayed" and not c.is_closed]
            if not direct:
                self._direct_since.pop(pid, None)
            if len(relayed) > 1:
                # Both sides dialled through relays at once: keep one, close
                # the idle twins (each holds a relay's circuit).  Both ends
                # must keep the same one: the one the smaller peer id dialled.
                mine = Direction.OUTBOUND if self.me < pid else Direction.INBOUND
                relayed.sort(key=lambda c: (getattr(c, "direction", None) != mine, -len(c.get_streams())))
                for c in relayed[1:]:
                    if not c.get_streams():
                        self.counts["relayed_twin_closed"] += 1
                        with trio.move_on_after(2.0):
                            await c.close()
                relayed = [c for c in relayed if not c.is_closed]
            if direct and relayed:
                since = self._direct_since.setdefault(pid, now_s)
                for c in relayed:
                    idle = not c.get_streams()
                    if (idle and now_s - since >= retire_after_s) or now_s - since >= retire_busy_after_s:
                        self.counts["relayed_retired"] += 1
                        log.info("closing the relayed connection to %s: a direct one took over", pid)
                        self.on_direct(pid)
                        with trio.move_on_after(2.0):
                            await c.close()
                continue
            if not relayed or not self.config.hole_punching or pid in self._punching:
                continue
            inbound = any(getattr(c, "direction", None) == Direction.INBOUND for c in relayed)
            if not inbound or not self.punches.should_try(pid, self.now_ms()):
                continue
            self.punches.started(pid, self.now_ms())
            self._punching.add(pid)
            self._nursery.start_soon(self._punch, pid)

    async def _punch(self, pid: str) -> None:
        ok = False
        try:
            async with self._punch_slots:
                peer = ID.from_base58(pid)
                known = [Multiaddr(a.split("/p2p/")[0]) for a in dialable(self.peer_addrs(pid), self.world())
                         if "/p2p-circuit" not in a]
                if known:
                    self.host.get_peerstore().add_addrs(peer, known, 600)
                with trio.move_on_after(60.0):
                    ok = bool(await self.puncher.initiate_hole_punch(peer))
                # Upstream answers True from a cache of peers it once saw
                # directly connected: count only a direct connection we hold.
                ok = ok and any(connection_kind(c) == "direct" and not c.is_closed
                                for c in self.direct_conns().get(pid, []))
        except (BaseLibp2pError, OSError, ValueError) as exc:
            log.info("hole punch to %s failed: %s", pid, exc)
        finally:
            self._punching.discard(pid)
            self.punches.finished(pid, ok)
            self.counts[f"hole_punch:{'direct' if ok else 'failed'}"] += 1
            log.info("hole punch to %s: %s", pid, "direct" if ok else "stays relayed")

    # --------------------------------------------------------- disconnects

    def peer_gone(self, peer: str) -> None:
        """The last connection to ``peer`` closed."""
        self.relay.peer_gone(peer)
        self.punches.forget(peer)
        self._direct_since.pop(peer, None)
        if self.client.drop(peer):
            self.refresh()

