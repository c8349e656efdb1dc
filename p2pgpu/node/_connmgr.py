"""The connection manager: carries out ``core/_connections.py``'s decisions.

The core decides who may connect (per IP, per subnet, in total) and whom to
drop to keep room for newcomers; this driver feeds it and acts:

- the swarm asks :meth:`ConnectionManager.admit` before the handshake of
  every inbound connection, and :meth:`release` when it ends (through the
  ``inbound_slot_release`` fix in ``_patches.py``, which also stops
  py-libp2p from holding every inbound slot until the node exits);
- a notifee tells the table of connections made and lost;
- :meth:`touch` is called when a peer does something useful (a valid
  advert it forwarded, a market it served us);
- :meth:`run` hands the core the peers the node values (protected: bootstrap
  and job peers; known: a live advert in our book) and closes what it says,
  every ``interval_s``.  It also stops py-libp2p's auto-connector, which
  would dial every peer its peerstore learns of (up to 150 by default): the
  node chooses its own peers (``_daemon._connect_loop``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import trio
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID
from libp2p.rcmgr import Direction
from multiaddr import Multiaddr

from p2pgpu.core import ConnectionLimits, ConnectionTable

log = logging.getLogger("p2pgpu.node")

#: How often the manager frees the newcomers' headroom.
interval_s = 1.0

Valued = Callable[[], tuple[list[str], list[str]]]


class _Notifee(INotifee):
    def __init__(self, manager: ConnectionManager) -> None:
        self.manager = manager

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        inbound = getattr(conn, "direction", Direction.UNKNOWN) == Direction.INBOUND
        self.manager.table.connected(conn.muxed_conn.peer_id.to_base58(), inbound=inbound,
                                     now_ms=self.manager.now_ms())

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        peer = conn.muxed_conn.peer_id
        if not network.get_connections(peer):
            self.manager.table.disconnected(peer.to_base58())

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        return None

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        return None


class ConnectionManager:
    def __init__(self, host: Any, limits: ConnectionLimits, *, now_ms: Callable[[], int], counts: Counter[str],
                 valued: Valued) -> None:
        self.host = host
        self.table = ConnectionTable(limits)
        self.now_ms = now_ms
        self.counts = counts
        self.valued = valued

    # -- the swarm's inbound gate (see _patches.inbound_slot_release) --------------
    def admit(self, ip: str) -> bool:
        refusal = self.table.admit(ip)
        if refusal is not None:
            self.counts[f"connections_refused:{refusal}"] += 1
            return False
        return True

    def release(self, ip: str) -> None:
        self.table.release(ip)

    # -- relayed connections: counted by the remote peer, not the relay's IP ------
    def admit_relayed(self, peer: str) -> str | None:
        """Admit a connection from ``peer`` through a relay (``_relay.StopHandler``);
        the refusal, or None."""
        refusal = self.table.admit_relayed(peer)
        if refusal is not None:
            self.counts[f"connections_refused:{refusal}"] += 1
        return refusal

    def release_relayed(self, peer: str) -> None:
        self.table.release_relayed(peer)

    def touch(self, peer_id: str) -> None:
        self.table.touch(peer_id, self.now_ms())

    async def install(self) -> None:
        """Take charge of the swarm's connections (before any peer is dialled)."""
        swarm = self.host.get_network()
        swarm.p2pgpu_inbound_gate = self
        swarm.register_notifee(_Notifee(self))
        auto = getattr(swarm, "auto_connector", None)
        if auto is not None:
            await auto.stop()

    async def run(self) -> None:
        swarm = self.host.get_network()
        while True:
            protected, known = self.valued()
            self.table.set_valued(protected=protected, known=known)
            for pid in self.table.to_close(self.now_ms()):
                self.counts["connections_closed_for_room"] += 1
                log.info("closing the connection to %s: room for newcomers", pid)
                try:
                    await swarm.close_peer(ID.from_base58(pid))
                except (BaseLibp2pError, OSError) as exc:
                    log.debug("closing %s failed: %s", pid, exc)
                self.table.disconnected(pid)
            await trio.sleep(interval_s)

    def status(self) -> dict[str, Any]:
        t = self.table
        return {"open": len(t.peers), "inbound_admitted": t.inbound_open(),
                "connections_max": t.limits.connections_max, "newcomer_headroom": t.limits.newcomer_headroom}
