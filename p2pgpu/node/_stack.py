"""The libp2p stack of one node: host, GossipSub, Kademlia DHT, on trio.

Shaped by what was measured (docs/performance.md has the figures):
- Noise only: the library's default security list also accepts plaintext,
  TLS and SECIO; a node must refuse unencrypted connections.
- ``max_connections_per_peer=1`` cuts connect time from ~250 ms to ~10 ms, and
  health monitoring drops a silent peer instead of keeping it forever.
- GossipSub speaks meshsub v1.1 and v1.0 (v1.2's IDONTWANT doubles the CPU
  cost), heartbeats every second (the library's default is 120 s), and its
  spam cap (10 msg/s per topic) is lifted: our own validators are the guard.
- Services start before any peer dials in: a peer that connects before Pubsub
  runs crashes it.
- The library logs multi-line errors for every failed stream: its logger is
  quieted to ERROR unless ``P2PGPU_LIBP2P_DEBUG`` is set.
- The DHT keeps only what the node's own namespaces allow, bounded in count
  and bytes and per peer (``_dhtstore``).
- Topic validators answer a :class:`~p2pgpu.core.GossipVerdict` (accept, ignore,
  reject) through :class:`VerdictPubsub`: py-libp2p's validators return a
  bool, and a ``False`` always costs the forwarder score, while a replay or a
  local limit is nobody's fault (``core/_verdict.py``).
"""

from __future__ import annotations

import logging
import os
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterable

import multiaddr
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.score import ScoreParams, TopicScoreParams
from libp2p.records.validator import NamespacedValidator, Validator
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.tools.anyio_service import background_trio_service

from p2pgpu.core import GossipVerdict

from . import _patches
from ._dhtstore import BoundedProviderStore, BoundedValueStore, DhtLimits, with_sender
from ._linkdelay import LinkDelay, LinkDelaySpec
from ._patches import FastGossipSub, FastPubsub

log = logging.getLogger("p2pgpu.node")


def quiet_libp2p_logs() -> None:
    if not os.environ.get("P2PGPU_LIBP2P_DEBUG"):
        logging.getLogger("libp2p").setLevel(logging.CRITICAL)


#: How far py-libp2p's own connection limits sit above the node's.
connections_margin = 16


@dataclass(frozen=True, kw_only=True)
class StackConfig:
    mesh_degree: int = 6
    mesh_degree_low: int = 4
    mesh_degree_high: int = 12
    heartbeat_interval_s: int = 1
    #: An invalid message costs this much score; at graylist_score the peer's
    #: messages are ignored (GossipSub v1.1 P4).
    invalid_message_weight: float = 10.0
    graylist_score: float = -100.0
    pubsub_rpc_bytes_max: int = 1 << 20
    ping_timeout_s: float = 4.0
    #: Injected one-way delay on every connection (test networks only; ``_linkdelay``).
    link_delay: LinkDelaySpec | None = None
    #: Connections in all (the node's connection manager keeps room for
    #: newcomers below it; py-libp2p's own limits are set to the same).
    connections_max: int = 160
    #: What strangers may store in our DHT (``_dhtstore``).
    dht_limits: DhtLimits = field(default_factory=DhtLimits)


class MessageIgnored(Exception):
    """A topic validator's IGNORE verdict on its way out of py-libp2p's
    validation (which knows only pass or fail) to :meth:`VerdictPubsub.push_msg`."""


VerdictValidator = Callable[[ID, rpc_pb2.Message], GossipVerdict]


class VerdictPubsub(FastPubsub):
    """Pubsub with a third validation answer, IGNORE: the message is dropped
    and marked seen (duplicates cost nothing more), it is not forwarded, and
    the forwarder's score is untouched; py-libp2p's ``False`` (REJECT) still
    counts against it (GossipSub v1.1 P4), as in go-libp2p's
    ``ValidationIgnore`` / ``ValidationReject``.

    How: the validator raises :class:`MessageIgnored`; upstream's
    ``validate_msg`` handles only ``ValidationError``, so the exception leaves
    it uncached and leaves ``push_msg`` before the penalty and before the
    message is marked seen or delivered; this subclass catches it there.
    ``tests/node/test_verdict_pubsub.py`` checks each of these on real hosts.
    """

    ignored: int = 0

    def set_topic_verdict_validator(self, topic: str, fn: VerdictValidator) -> None:
        def validator(forwarder: ID, msg: rpc_pb2.Message) -> bool:
            verdict = fn(forwarder, msg)
            if verdict is GossipVerdict.IGNORE:
                raise MessageIgnored
            return verdict is GossipVerdict.ACCEPT

        self.set_topic_validator(topic, validator, False)

    async def push_msg(self, msg_forwarder: ID, msg: rpc_pb2.Message) -> None:
        try:
            await super().push_msg(msg_forwarder, msg)
        except MessageIgnored:
            self._mark_msg_seen(msg)
            self.ignored += 1


@dataclass
class Stack:
    host: IHost
    pubsub: VerdictPubsub
    gossipsub: GossipSub
    dht: KadDHT

    @property
    def peer_id(self) -> str:
        return self.host.get_id().to_base58()

    def addrs(self) -> list[str]:
        return [str(a) for a in self.host.get_addrs()]


library_handler_errors: dict[str, int] = {}


def guard_library_handlers(host: IHost) -> None:
    """Wrap py-libp2p's own stream handlers (GossipSub, Kademlia, identify,
    ping...) so that nothing they raise reaches the host.

    Upstream's GossipSub reader, for one, lets a protobuf ``DecodeError`` from
    a peer's garbage RPC escape, and one exception in any handler ends the
    whole host (libp2p notes, trap 3).  Our own handlers are wrapped when they
    are registered (``_streams.guarded``); this covers the library's, once the
    services have registered theirs.  The wrapped stream is reset and the error
    counted per protocol (``library_handler_errors``).
    """
    import trio  # noqa: PLC0415

    mux = host.get_mux()
    for protocol, handler in list(mux.handlers.items()):
        if handler is None or getattr(handler, "_p2pgpu_guarded", False):
            continue

        async def run(stream: Any, _handler: Any = handler, _protocol: str = str(protocol)) -> None:
            try:
                await _handler(stream)
            except trio.Cancelled:
                raise
            except Exception as exc:  # noqa: BLE001 - the host must outlive any peer's input
                library_handler_errors[_protocol] = library_handler_errors.get(_protocol, 0) + 1
                log.info("%s handler failed on a peer's input: %s: %s", _protocol, type(exc).__name__, exc)
                try:
                    await stream.reset()
                except Exception:  # noqa: BLE001 - resetting an already broken stream
                    log.debug("resetting the stream after the failure failed too")

        run._p2pgpu_guarded = True  # type: ignore[attr-defined]
        mux.handlers[protocol] = run


async def _close_network(host: IHost) -> None:
    import trio  # noqa: PLC0415

    with trio.CancelScope(shield=True), trio.move_on_after(5):
        await host.get_network().close()


def _apply_patches() -> None:
    _patches.apply()  # speed-ups (P2PGPU_LIBP2P_PATCHES=0 turns them off)
    _patches.apply_fixes()  # correctness fixes: not optional


@asynccontextmanager
async def open_stack(
    seed: bytes,
    listen: list[str],
    *,
    dht_validators: dict[str, Validator],
    config: StackConfig = StackConfig(),
    provider_classes: Callable[[str], Iterable[bytes] | None] = lambda _pid: None,
) -> AsyncIterator[Stack]:
    """Start host, Pubsub, GossipSub and DHT; stop them all on exit.

    The DHT stores values only under ``dht_validators``' namespaces (strict:
    any other key is refused) and within ``config.dht_limits``;
    ``provider_classes(peer_id)`` names the provider keys a peer's advert
    allows, or None when its advert is unknown (``_dhtstore``)."""
    quiet_libp2p_logs()
    _apply_patches()
    key_pair = create_new_key_pair(seed)
    sec_opt = {NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)}
    host = new_host(
        key_pair=key_pair,
        sec_opt=sec_opt,
        muxer_preference="YAMUX",
        connection_config=ConnectionConfig(
            # Our connection manager (_connmgr) decides and counts what it
            # refuses; the library's limits, a little above ours, only back it
            # up (min 0: upstream keeps 50 of 300 slots for its auto-connector,
            # which the node stops).
            max_connections=config.connections_max + connections_margin,
            min_connections=0,
            low_watermark=0,
            high_watermark=config.connections_max + connections_margin,
            max_connections_per_peer=1,
            enable_health_monitoring=True,
            ping_timeout=config.ping_timeout_s,
        ),
    )
    score = ScoreParams(
        p4_invalid_messages=TopicScoreParams(weight=config.invalid_message_weight, cap=100.0, decay=0.9),
        graylist_threshold=config.graylist_score,
    )
    gossipsub = FastGossipSub(
        [PROTOCOL_ID_V11, PROTOCOL_ID],
        degree=config.mesh_degree,
        degree_low=config.mesh_degree_low,
        degree_high=config.mesh_degree_high,
        heartbeat_interval=config.heartbeat_interval_s,
        score_params=score,
        spam_protection_enabled=False,
        # All test peers share 127.0.0.1; IP diversity rules would starve the mesh.
        eclipse_protection_enabled=False,
    )
    pubsub = VerdictPubsub(host, gossipsub, max_inbound_rpc_size=config.pubsub_rpc_bytes_max)
    dht = KadDHT(host, DHTMode.SERVER, validator=NamespacedValidator(dict(dht_validators), strict_validation=True),
                 validator_changed=True, strict_validation=True)
    dht.value_store = BoundedValueStore(host, dht.local_peer_id, config.dht_limits)
    dht.provider_store = BoundedProviderStore(host, dht.peer_routing, config.dht_limits, provider_classes)
    host.set_stream_handler(KAD_PROTOCOL_ID, with_sender(dht.handle_stream))
    async with AsyncExitStack() as stack:
        if config.link_delay is not None:  # outermost: its connection pumps end after the host
            await stack.enter_async_context(LinkDelay(config.link_delay).installed(host))
        await stack.enter_async_context(host.run([multiaddr.Multiaddr(a) for a in listen]))
        # Leaving host.run() cancels the swarm without closing its connections,
        # which leaks their sockets: close them explicitly (runs after the
        # services below have stopped, before the host goes).
        stack.push_async_callback(_close_network, host)
        await stack.enter_async_context(background_trio_service(pubsub))
        await stack.enter_async_context(background_trio_service(gossipsub))
        await stack.enter_async_context(background_trio_service(dht))
        await pubsub.wait_until_ready()
        guard_library_handlers(host)
        try:
            yield Stack(host=host, pubsub=pubsub, gossipsub=gossipsub, dht=dht)
        finally:
            # Pubsub starts a daemon thread for its seen-message cache that
            # nothing stops (libp2p notes, trap 9).
            seen = getattr(pubsub, "seen_messages", None)
            stop = getattr(seen, "stop", None)
            if callable(stop):
                stop()
