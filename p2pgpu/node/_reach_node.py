"""How the node daemon takes up the reachability service (``_reach.py``).

Kept apart from ``_daemon.py`` so that the daemon holds only a few hook-up
lines: build a :class:`ReachService` from config.toml and ``node run``'s
flags (:func:`reach_config`), wire it to the node's connection manager and
advert loop (:func:`attach`), and answer the parts of ``status`` and
``peers`` that say how we are reached (:func:`peer_connections`).

config.toml keys (docs/operating.md, "Behind a NAT"):

- ``announce``: list of transport multiaddrs the world reaches us at (a
  forwarded port), e.g. ``["/ip4/203.0.113.7/tcp/4001"]``;
- ``relay_service``: ``auto`` (default: lend relay slots while peers find us
  public), ``on`` or ``off``;
- ``relays_target``: relay slots a private node holds (default 2);
- ``hole_punching``: true (default) or false;
- ``relay_reservations_max``, ``relay_reservations_per_ip_max``,
  ``relay_circuits_max``, ``relay_circuits_per_peer_max``,
  ``relay_circuit_bytes_max``, ``relay_circuit_duration_s_max``: the relay's
  limits (``core.RelayLimits``);
- ``reach_confirmations``: distinct peers that must agree before we call
  ourselves public or private (default 3).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from multiaddr import Multiaddr

from p2pgpu.core import ReachLimits, RelayLimits
from p2pgpu.home import HomeError

from ._holepunch import connection_kind
from ._reach import RELAY_MODES, ReachConfig, ReachService

if TYPE_CHECKING:
    from p2pgpu.core import AdvertBook

    from ._connmgr import ConnectionManager
    from ._stack import Stack


class ReachPorts(Protocol):
    """What :func:`attach` needs of the node (``_daemon.Node`` has it)."""

    stack: Stack | None
    connmgr: ConnectionManager | None
    book: AdvertBook
    counts: Counter[str]
    now_ms: Callable[[], int]

    def addrs_changed(self) -> None: ...

_RL = RelayLimits()
#: config.toml key -> (RelayLimits field, default, lowest, highest, scale to the field's unit).
RELAY_LIMITS: dict[str, tuple[str, int, int, int, int]] = {
    "relay_reservations_max": ("reservations_max", _RL.reservations_max, 1, 100_000, 1),
    "relay_reservations_per_ip_max": ("reservations_per_ip_max", _RL.reservations_per_ip_max, 1, 10_000, 1),
    "relay_circuits_max": ("circuits_max", _RL.circuits_max, 1, 100_000, 1),
    "relay_circuits_per_peer_max": ("circuits_per_peer_max", _RL.circuits_per_peer_max, 1, 10_000, 1),
    "relay_circuit_bytes_max": ("circuit_bytes_max", _RL.circuit_bytes_max, 1024, 1 << 40, 1),
    "relay_circuit_duration_s_max": ("circuit_duration_ms_max", _RL.circuit_duration_ms_max // 1000, 1,
                                     7 * 24 * 3600, 1000),
}


def _int(extra: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = extra.get(key, default)
    if type(value) is not int or not low <= value <= high:
        raise HomeError(f"config.toml: {key} must be an integer from {low} to {high}, not {value!r}")
    return value


def reach_config(extra: dict[str, Any], *, announce: list[str], bootstrap: list[str]) -> ReachConfig:
    """The reachability settings from config.toml and ``node run``'s
    ``--announce`` (which adds to config.toml's list); ``HomeError`` says
    what is wrong."""
    relay: dict[str, int] = {}
    for key, (name, default, low, high, scale) in RELAY_LIMITS.items():
        relay[name] = _int(extra, key, default, low, high) * scale
    mode = extra.get("relay_service", "auto")
    if mode not in RELAY_MODES:
        raise HomeError(f"config.toml: relay_service must be one of {', '.join(RELAY_MODES)}, not {mode!r}")
    punch = extra.get("hole_punching", True)
    if type(punch) is not bool:
        raise HomeError(f"config.toml: hole_punching must be true or false, not {punch!r}")
    listed = extra.get("announce", [])
    if not isinstance(listed, list) or not all(isinstance(a, str) for a in listed):
        raise HomeError("config.toml: announce must be a list of multiaddrs such as [\"/ip4/203.0.113.7/tcp/4001\"]")
    try:
        return ReachConfig(
            announce=tuple(dict.fromkeys([*listed, *announce])),
            relay_service=mode,
            relay_limits=RelayLimits(**relay),
            relays_target=_int(extra, "relays_target", 2, 0, 8),
            reach_limits=ReachLimits(confirmations=_int(extra, "reach_confirmations", 3, 1, 32)),
            hole_punching=punch,
            bootstrap=tuple(bootstrap),
        )
    except ValueError as exc:
        raise HomeError(f"config.toml or --announce: {exc}") from None


class _Watch(INotifee):
    """Tells the service when a connection opens (our world may have grown:
    what we advertise is recomputed at once) and when a peer's last
    connection closed."""

    def __init__(self, service: ReachService) -> None:
        self.service = service

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self.service.refresh()

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        peer = conn.muxed_conn.peer_id
        if not network.get_connections(peer):
            self.service.peer_gone(peer.to_base58())

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        return None

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        return None


def attach(node: ReachPorts, config: ReachConfig) -> ReachService:
    """The node's reachability service, its handlers installed (call after
    the connection manager is, before any peer is dialled; start it with
    ``nursery.start(service.run)``)."""
    assert node.stack is not None and node.connmgr is not None
    connmgr = node.connmgr

    def peer_addrs(pid: str) -> list[str]:
        sa = node.book.adverts.get(pid)
        return list(sa.advert.addrs) if sa is not None else []

    def addrs_changed() -> None:
        node.addrs_changed()

    service = ReachService(node.stack.host, config=config, counts=node.counts, now_ms=node.now_ms,
                           on_addrs_changed=addrs_changed, peer_addrs=peer_addrs,
                           admit_relayed=connmgr.admit_relayed, release_relayed=connmgr.release_relayed,
                           known_peers=lambda: list(node.book.adverts))
    service.install()
    node.stack.host.get_network().register_notifee(_Watch(service))
    return service


def peer_connections(service: ReachService | None, host: Any, peer: Any) -> list[str]:
    """``direct`` / ``relayed`` for each connection to ``peer``."""
    if service is None:
        return [connection_kind(c) for c in host.get_network().get_connections(peer)]
    return service.connections().get(peer.to_base58(), [])
