"""Hole punching (DCUtR, ``/libp2p/dcutr``): turn a relayed connection into a direct one.

Two nodes behind NATs that talk through a relay exchange their (predicted)
public addresses over the relayed connection and dial each other at the
same moment, from their listen ports: each NAT then sees the other's SYN as
the answer to its own, and a direct TCP connection forms (a simultaneous
open).  It works through NATs that keep a port's mapping for every
destination; one that picks a new random port per destination
(``--random-fully``, symmetric NATs) defeats it, and the nodes stay relayed.

py-libp2p 0.8.1's ``DCUtRProtocol`` carries the mechanics (the exchange,
timing by round-trip, dials bound to the listen port, the responder-side
upgrade of a merged connection); :class:`HolePuncher` keeps them and
changes what the node decides itself:

- who starts: not a loop that punches every relayed peer from both sides
  every 2 s (concurrent sessions that strict peers refuse), but the node's
  reachability service, once per new relayed connection from the side that
  accepted it (as the spec says), bounded by the pure
  :class:`~p2pgpu.core.PunchBook`;
- what it sends: predicted public addresses and its listen addresses
  without wildcards (upstream sends ``/ip4/0.0.0.0/...``);
- what it dials: only addresses of its own world (``core.dialable``), in
  the exchange and in the plain dial that comes first (spec step 0): a
  stranger's private address would be dialled on our own LAN;
- when the relayed connection goes: not 60 s after the punch whatever runs
  on it, but when it carries no stream any more (``_reach``).

And one fix to py-libp2p's swarm (:func:`install_trim_fix`): with one
connection per peer allowed, a new connection makes the swarm trim the
peer's connections, fewest streams first; the fresh direct one often lost
to the busy relayed one.  Here a peer may hold one direct and one relayed
connection at once (the relayed one retires when idle), and among direct
connections upstream's rule stands.  The fix replaces exactly one function
whose source is pinned by hash, as ``_patches.py``'s fixes are.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Callable
from typing import Any

import trio
from libp2p.connection_types import ConnectionType
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from multiaddr import Multiaddr

from p2pgpu.core import Scope, dialable

log = logging.getLogger("p2pgpu.reach")

#: Addresses read from (and sent in) one DCUtR message.
addrs_max = 16


class HolePuncher(DCUtRProtocol):
    def __init__(self, host: Any, *, world: Callable[[], Scope | None], own_addrs: Callable[[], list[str]],
                 timeout_s: int = 10, dial_timeout_s: int = 5) -> None:
        super().__init__(host, read_timeout=timeout_s, write_timeout=timeout_s, dial_timeout=dial_timeout_s)
        self.world = world
        self.own_addrs = own_addrs

    async def _auto_drive_loop(self) -> None:
        """Nothing: the reachability service starts each punch (module doc)."""
        return

    def _schedule_relay_close(self, peer_id: ID) -> None:
        """Nothing: the reachability service retires idle relayed connections."""
        return

    async def _try_unilateral_upgrade(self, peer_id: ID) -> bool:
        """Spec step 0 (a plain dial before punching), on the addresses of
        our world only: upstream dials every address the peerstore holds,
        and identify fills it with the peer's own LAN and loopback
        addresses, which a node on the internet must not dial."""
        known = [str(a) for a in self.host.get_peerstore().addrs(peer_id)]
        addrs = [Multiaddr(a) for a in dialable(known, self.world()) if "/p2p-circuit" not in a][:addrs_max]
        if not addrs:
            return False
        with trio.move_on_after(self.dial_timeout):
            async with trio.open_nursery() as nursery:
                for addr in addrs:
                    nursery.start_soon(self._dial_peer, peer_id, addr)
        return bool(await self._verify_direct_connection(peer_id))

    def _decode_observed_addrs(self, addr_bytes: list[bytes]) -> list[Multiaddr]:
        got = super()._decode_observed_addrs(list(addr_bytes)[:addrs_max])
        keep = set(dialable([str(a) for a in got], self.world()))
        return [a for a in got if str(a) in keep and "/p2p-circuit" not in str(a)]

    async def _get_observed_addrs(self) -> list[bytes]:
        out: list[bytes] = []
        seen: set[str] = set()
        for raw in await super()._get_observed_addrs():
            try:
                text = str(Multiaddr(raw))
            except ValueError:
                continue
            if "/ip4/0.0.0.0/" in text or "/ip6/::/" in text or text in seen:
                continue
            seen.add(text)
            out.append(raw)
        for text in self.own_addrs():
            if text not in seen and "/p2p-circuit" not in text:
                seen.add(text)
                out.append(Multiaddr(text).to_bytes())
        return out[:addrs_max]


def connection_kind(conn: Any) -> str:
    """``direct`` or ``relayed`` (what ``peers --json`` shows)."""
    try:
        if conn.get_connection_type() == ConnectionType.RELAYED:
            return "relayed"
        addrs = conn.get_transport_addresses() or []
    except (AttributeError, ValueError):
        return "direct"
    return "relayed" if any("/p2p-circuit" in str(a) for a in addrs) else "direct"


# --- the swarm's per-peer trim ------------------------------------------------

TRIM_SHA256 = "bbc40f6542d221968669b97046013f2fa022bc0eaabcd8a46da46333f0a73b2e"
_trim_undo: list[tuple[Any, str, Any]] = []


class SourceChanged(Exception):
    """The upstream function a fix replaces is not the one it was written for."""


def install_trim_fix() -> bool:
    """Let a peer hold a direct and a relayed connection at once (module
    doc).  Idempotent; False (logged) when upstream's source changed."""
    from libp2p.network.swarm import Swarm

    if _trim_undo:
        return True
    original = Swarm.__dict__["_trim_connections"]
    if hashlib.sha256(inspect.getsource(original).encode()).hexdigest() != TRIM_SHA256:
        log.warning("py-libp2p fix relayed_trim NOT applied: upstream Swarm._trim_connections changed; re-check it")
        return False

    def _trim_connections(self: Any, peer_id: ID) -> None:
        conns = list(self.connections.get(peer_id, []))
        direct = [c for c in conns if connection_kind(c) == "direct"]
        relayed = [c for c in conns if connection_kind(c) == "relayed"]
        limit = self.connection_config.max_connections_per_peer
        if direct and relayed and len(direct) <= limit and len(relayed) <= 1:
            return  # a fresh direct connection beside the relayed one it replaces
        original(self, peer_id)

    _trim_connections.__p2pgpu_patch__ = "relayed_trim"  # type: ignore[attr-defined]
    _trim_undo.append((Swarm, "_trim_connections", original))
    Swarm._trim_connections = _trim_connections  # type: ignore[method-assign]
    return True


def remove_trim_fix() -> None:
    while _trim_undo:
        owner, attr, original = _trim_undo.pop()
        setattr(owner, attr, original)
