"""Injected link delay for test networks: netem in userspace, per connection.

The simulator's GossipSub and Kademlia are models, calibrated against real
node processes "with the same topology and injected latency"
(``docs/calibration.md``).  On the development machine ``tc qdisc ... netem``
is not available (no ``sch_netem`` module, no root), so the delay is added
inside the node instead: every raw TCP connection of the host is wrapped,
before Noise and Yamux see it, so that each chunk of bytes read from the
socket is handed to the layers above ``link_ms`` (+- ``jitter_pct``) after it
arrived.  Delaying the receiving side only gives each direction of a link one
one-way delay, as netem on the receiver's interface would; when every node
of a test network has the setting, a round trip costs ``2 * link_ms``.

Shape, and why:
- Order is kept: a chunk is never handed up before the one read before it
  (``due = max(previous due, arrival + delay)``).  netem with jitter reorders
  packets, but TCP puts them back in order, so what an application sees is
  exactly this: in-order bytes, each no earlier than its own delay.
- A reader task per connection (the *pump*) reads from the socket as bytes
  arrive and stamps them; without it, bytes that arrive while the layer above
  waits out an earlier chunk's delay would be stamped late, and every chunk
  would add a full ``link_ms`` (a link of one chunk per delay).  The pumps run
  in a nursery that :meth:`LinkDelay.installed` owns for the host's lifetime:
  no task outlives the host.  A closed connection cancels its pump.
- The buffer is bounded (``chunks_max`` chunks of at most ``chunk_bytes``):
  a slow reader stops the pump, and TCP's own flow control does the rest.
- Randomness is an explicit ``random.Random`` per connection, derived from
  the node's seed, so a run is repeatable for the same order of connections.
- Off by default: only a node whose ``config.toml`` sets ``link_delay_ms`` on a
  network that allows simulated GPUs (``local`` and other test networks)
  gets it (:func:`link_delay_from_config`); on any other network the setting
  is ignored with a warning, as the ``adversary`` setting is.

Only the host's connections are affected, through its own upgrader instance:
two hosts in one process (tests) can have different settings.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IRawConnection

log = logging.getLogger("p2pgpu.node")

link_ms_max = 10_000.0
chunk_bytes = 65_536
chunks_max = 64


@dataclass(frozen=True, kw_only=True)
class LinkDelaySpec:
    """One-way delay added to everything a node receives."""

    link_ms: float
    jitter_pct: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.link_ms <= link_ms_max:
            raise ValueError(f"link_delay_ms must be in (0, {link_ms_max:g}], not {self.link_ms!r}")
        if not 0 <= self.jitter_pct <= 100:
            raise ValueError(f"link_jitter_pct must be in [0, 100], not {self.jitter_pct!r}")

    def draw_s(self, rng: random.Random) -> float:
        jitter = self.jitter_pct / 100.0
        return self.link_ms * (1.0 + jitter * (2.0 * rng.random() - 1.0)) / 1000.0


def link_delay_from_config(extra: dict[str, Any], *, allow: bool, network: str, peer_id: str) -> LinkDelaySpec | None:
    """The link delay a node's ``config.toml`` asks for, or None.

    Keys: ``link_delay_ms`` (absent or 0: none), ``link_jitter_pct`` (default
    0), ``link_delay_seed`` (default: derived from the peer id).  ``allow`` is
    the network's ``allow_simulated``: on a real network it is ignored."""
    ms = extra.get("link_delay_ms", 0)
    if not ms:
        return None
    if not allow:
        log.warning("config.toml sets link_delay_ms = %r: ignored on network %s (test networks only)", ms, network)
        return None
    if isinstance(ms, bool) or not isinstance(ms, (int, float)):
        raise ValueError(f"link_delay_ms must be a number, not {ms!r}")
    jitter = extra.get("link_jitter_pct", 0)
    if isinstance(jitter, bool) or not isinstance(jitter, (int, float)):
        raise ValueError(f"link_jitter_pct must be a number, not {jitter!r}")
    seed = extra.get("link_delay_seed")
    if seed is None:
        seed = int.from_bytes(hashlib.sha256(b"p2pgpu-link-delay/" + peer_id.encode()).digest()[:8], "big")
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"link_delay_seed must be an integer, not {seed!r}")
    return LinkDelaySpec(link_ms=float(ms), jitter_pct=float(jitter), seed=seed)


class DelayedConnection(IRawConnection):
    """A raw connection whose reads are delayed; writes pass straight through."""

    def __init__(self, raw: IRawConnection, spec: LinkDelaySpec, rng: random.Random) -> None:
        self.raw = raw
        self.spec = spec
        self.rng = rng
        self.is_initiator = raw.is_initiator
        send, recv = trio.open_memory_channel[tuple[float, Any]](chunks_max)
        self._send = send
        self._recv = recv
        self._head: tuple[float, Any] | None = None  # (due, bytes | exception | b"" for EOF)
        self._ended: Any = None
        self._scope: trio.CancelScope | None = None
        self._closed = False

    # ---------------------------------------------------------- the pump
    async def pump(self) -> None:
        """Read from the socket as bytes arrive; queue them with their due time."""
        last_due = 0.0
        async with self._send:
            with trio.CancelScope() as scope:
                self._scope = scope
                if self._closed:
                    return
                while True:
                    try:
                        data: Any = await self.raw.read(chunk_bytes)
                        if isinstance(data, (bytearray, memoryview)):
                            data = bytes(data)
                    except trio.Cancelled:
                        raise
                    except Exception as exc:  # noqa: BLE001 - handed to the reader, raised there in order
                        data = exc
                    due = max(last_due, trio.current_time() + self.spec.draw_s(self.rng))
                    last_due = due
                    await self._send.send((due, data))
                    if not isinstance(data, bytes) or not data:
                        return  # EOF or a broken connection: nothing more to read

    # ------------------------------------------------------ IRawConnection
    async def read(self, n: int | None = None) -> bytes:
        if n == 0:
            return b""
        if self._ended is not None:
            return self._end()
        if self._head is None:
            try:
                self._head = await self._recv.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                self._ended = b""
                return b""
        due, data = self._head
        await trio.sleep_until(due)
        if not isinstance(data, bytes) or not data:
            self._head = None
            self._ended = data
            return self._end()
        limit = len(data) if n is None or n < 0 else n
        out, rest = data[:limit], data[limit:]
        self._head = (due, rest) if rest else None
        # Bytes that are already due join this read (fewer round trips up the stack).
        now = trio.current_time()
        while self._head is None and len(out) < limit:
            try:
                nxt = self._recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            if nxt[0] > now or not isinstance(nxt[1], bytes) or not nxt[1]:
                self._head = nxt
                break
            take = limit - len(out)
            out += nxt[1][:take]
            if nxt[1][take:]:
                self._head = (nxt[0], nxt[1][take:])
        return out

    def _end(self) -> bytes:
        if isinstance(self._ended, BaseException):
            raise self._ended
        return b""

    async def write(self, data: bytes) -> None:
        await self.raw.write(data)

    async def close(self) -> None:
        self._closed = True
        if self._scope is not None:
            self._scope.cancel()
        await self.raw.close()

    def get_remote_address(self) -> tuple[str, int] | None:
        return self.raw.get_remote_address()

    def get_transport_addresses(self) -> list[Any]:
        return self.raw.get_transport_addresses()

    def get_connection_type(self) -> Any:
        return self.raw.get_connection_type()

    def __getattr__(self, name: str) -> Any:
        # Anything else a transport-specific caller looks up on the raw connection.
        raw = self.__dict__.get("raw")
        if raw is None:
            raise AttributeError(name)
        return getattr(raw, name)


class LinkDelay:
    """Wraps a host's raw connections while :meth:`installed` is entered."""

    def __init__(self, spec: LinkDelaySpec) -> None:
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self.connections_wrapped = 0
        self._nursery: trio.Nursery | None = None

    def wrap(self, raw: IRawConnection) -> IRawConnection:
        if self._nursery is None:
            raise RuntimeError("LinkDelay.wrap outside LinkDelay.installed()")
        conn = DelayedConnection(raw, self.spec, random.Random(self.rng.getrandbits(64)))
        self._nursery.start_soon(conn.pump)
        self.connections_wrapped += 1
        return conn

    @asynccontextmanager
    async def installed(self, host: Any) -> AsyncIterator[LinkDelay]:
        """Delay every connection ``host`` secures from now on (inbound and
        outbound both pass its upgrader); the pumps live in a nursery that
        ends with this context."""
        upgrader = host.get_network().upgrader
        upstream = upgrader.upgrade_security

        async def upgrade_security(raw_conn: IRawConnection, is_initiator: bool, peer_id: Any = None) -> Any:
            return await upstream(self.wrap(raw_conn), is_initiator, peer_id)

        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            upgrader.upgrade_security = upgrade_security
            try:
                yield self
            finally:
                upgrader.upgrade_security = upstream
                self._nursery = None
                nursery.cancel_scope.cancel()
