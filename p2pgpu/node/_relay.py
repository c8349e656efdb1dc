"""Circuit Relay v2: public nodes relay for private ones, with limits.

Three roles, all on the standard wire protocol (``/libp2p/circuit/relay/
0.2.0/hop`` and ``.../stop``, varint-prefixed protobufs, so go, rust and js
relays and clients interoperate):

- **Relay** (:class:`RelayService`, the *hop* side): a public node lends
  slots.  A private node RESERVEs one; anyone may then CONNECT to that node
  through us, and we splice the two streams together.  Every decision is the
  pure :class:`~p2pgpu.core.RelayBook`'s: reservations in all and per IP,
  circuits in all and per peer, bytes and duration per circuit, and a ban
  for a peer that keeps hitting them.  A circuit over its limit is reset;
  the relay serves the others on.  Requests over a relayed connection are
  refused (no relay chains), and a reservation lasts only while its holder
  stays connected.
- **Destination** (:class:`StopHandler`): a private node accepts a relayed
  connection only from a relay it holds a slot on, admits it through the
  connection manager by the *remote peer* (never by the relay's IP), checks
  the Noise handshake proves the peer the relay named, and keeps the slot
  until that connection closes.
- **Client** (:class:`RelayClient`): reserves (and renews) slots, and dials a
  peer through a relay address (``.../p2p/<relay>/p2p-circuit/p2p/<peer>``).

py-libp2p's own relay (``libp2p.relay.circuit_v2``) is not used for the hop
side: it keys its circuits by source peer (a second circuit from one peer
overwrites the first), enforces a circuit's duration only when data flows,
and has no per-IP or per-peer limits.  Its protobufs are.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio
from google.protobuf.message import DecodeError
from libp2p.connection_types import ConnectionType
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, Limit, StopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as PbPeer
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited
from multiaddr import Multiaddr

from p2pgpu.core import CircuitCut, PeerMisbehaved, Reason, RelayBook, RelayLimits, RelayRefusal, parse_addr

from ._autonat import is_relayed, remote_ip

log = logging.getLogger("p2pgpu.reach")

HOP_PROTOCOL = TProtocol("/libp2p/circuit/relay/0.2.0/hop")
STOP_PROTOCOL = TProtocol("/libp2p/circuit/relay/0.2.0/stop")
message_bytes_max = 4096
chunk_bytes = 64 * 1024
handshake_timeout_s = 10.0
relay_addrs_max = 4

# Circuit Relay v2 status codes (circuit.proto).
OK = 100
RESERVATION_REFUSED = 200
RESOURCE_LIMIT_EXCEEDED = 201
PERMISSION_DENIED = 202
CONNECTION_FAILED = 203
NO_RESERVATION = 204
MALFORMED_MESSAGE = 400
UNEXPECTED_MESSAGE = 401

_REFUSAL_STATUS = {
    RelayRefusal.OFF: RESERVATION_REFUSED,
    RelayRefusal.RESERVATIONS_FULL: RESERVATION_REFUSED,
    RelayRefusal.RESERVATIONS_PER_IP: RESERVATION_REFUSED,
    RelayRefusal.CIRCUITS_FULL: RESOURCE_LIMIT_EXCEEDED,
    RelayRefusal.CIRCUITS_PER_PEER: RESOURCE_LIMIT_EXCEEDED,
    RelayRefusal.CIRCUITS_PER_DESTINATION: RESOURCE_LIMIT_EXCEEDED,
    RelayRefusal.NO_RESERVATION: NO_RESERVATION,
    RelayRefusal.BANNED: PERMISSION_DENIED,
    RelayRefusal.SELF: PERMISSION_DENIED,
}


class RelayDialFailed(Exception):
    """A dial through a relay failed (the relay refused, or the handshake)."""


async def _read(stream: Any, cls: Any) -> Any:
    """One varint-prefixed protobuf message; garbage is the peer's fault."""
    msg = cls()
    try:
        msg.ParseFromString(await read_varint_prefixed_bytes_limited(stream, message_bytes_max))
    except DecodeError as exc:
        raise PeerMisbehaved(Reason.MALFORMED, f"not a {cls.__name__}: {exc}") from None
    return msg


async def _write(stream: Any, msg: Any) -> None:
    await stream.write(encode_varint_prefixed(msg.SerializeToString()))


async def _reset(stream: Any) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1.0):
        try:
            await stream.reset()
        except (BaseLibp2pError, OSError, AttributeError):
            log.debug("resetting a relay stream failed (already gone)")


class _Cut(Exception):
    def __init__(self, why: CircuitCut) -> None:
        super().__init__(why.value)
        self.why = why


# ------------------------------------------------------------------ the relay


class RelayService:
    """The hop side.  ``enabled()`` says whether we lend slots now (config
    ``relay_service``: on, off, or auto = only while peers find us public)."""

    def __init__(self, host: Any, limits: RelayLimits, counts: Counter[str], *, now_ms: Callable[[], int],
                 enabled: Callable[[], bool], public_addrs: Callable[[], list[str]]) -> None:
        self.host = host
        self.book = RelayBook(limits)
        self.counts = counts
        self.now_ms = now_ms
        self.enabled = enabled
        self.public_addrs = public_addrs
        self.bytes_relayed = 0

    def peer_gone(self, peer: str) -> None:
        self.book.drop_reservation(peer)

    async def serve(self, stream: Any) -> None:
        src = stream.muxed_conn.peer_id
        if is_relayed(stream):
            await self._status(stream, PERMISSION_DENIED, "relay")
            return
        with trio.fail_after(handshake_timeout_s):
            msg = await _read(stream, HopMessage)
        if msg.type == HopMessage.RESERVE:
            await self._reserve(stream, src)
        elif msg.type == HopMessage.CONNECT:
            await self._connect(stream, src, msg)
        else:
            await self._status(stream, UNEXPECTED_MESSAGE, "relay")

    async def _status(self, stream: Any, status: int, what: str, **fields: Any) -> None:
        self.counts[f"{what}:{_status_name(status)}"] += 1
        await _write(stream, HopMessage(type=HopMessage.STATUS, status=status, **fields))  # type: ignore[arg-type]

    def _limit(self) -> Limit:
        lim = self.book.limits
        return Limit(duration=max(1, lim.circuit_duration_ms_max // 1000), data=lim.circuit_bytes_max)

    async def _reserve(self, stream: Any, src: ID) -> None:
        if not self.enabled():
            await self._status(stream, RESERVATION_REFUSED, "relay_reserve")
            return
        ip = remote_ip(stream) or "?"
        got = self.book.reserve(src.to_base58(), ip, self.now_ms())
        if isinstance(got, RelayRefusal):
            await self._status(stream, _REFUSAL_STATUS[got], "relay_reserve")
            return
        ttl_s = max(1, (got - self.now_ms()) // 1000)
        rsv = HopMessage(type=HopMessage.STATUS).reservation
        rsv.expire = int(time.time()) + ttl_s  # wall clock: the expiry leaves the process
        me = f"/p2p/{self.host.get_id().to_base58()}"
        for a in self.public_addrs()[:relay_addrs_max]:
            try:
                rsv.addrs.append(Multiaddr(a + me if "/p2p/" not in a else a).to_bytes())
            except (ValueError, BaseLibp2pError):
                continue
        await self._status(stream, OK, "relay_reserve", reservation=rsv, limit=self._limit())

    async def _connect(self, stream: Any, src: ID, msg: Any) -> None:
        try:
            dst = ID(msg.peer.id)
        except (ValueError, TypeError):
            await self._status(stream, MALFORMED_MESSAGE, "relay_connect")
            return
        if not self.enabled():
            await self._status(stream, PERMISSION_DENIED, "relay_connect")
            return
        circuit = self.book.open_circuit(src.to_base58(), dst.to_base58(), self.now_ms())
        if isinstance(circuit, RelayRefusal):
            await self._status(stream, _REFUSAL_STATUS[circuit], "relay_connect")
            if self.book.is_banned(src.to_base58(), self.now_ms()):
                await self._disconnect(src)  # this refusal was its last strike, or it came back banned
            return
        if not self.host.get_network().get_connections(dst):
            # A slot holds only while its holder is connected to us.
            self.book.drop_reservation(dst.to_base58())
            self.book.close_circuit(circuit.id)
            await self._status(stream, NO_RESERVATION, "relay_connect")
            return
        dst_stream = None
        try:
            try:
                with trio.fail_after(handshake_timeout_s):
                    dst_stream = await self.host.new_stream(dst, [STOP_PROTOCOL])
                    await _write(dst_stream, StopMessage(type=StopMessage.CONNECT, peer=PbPeer(id=src.to_bytes()),
                                                         limit=self._limit()))
                    answer = await _read(dst_stream, StopMessage)
            except (trio.TooSlowError, BaseLibp2pError, OSError, ValueError, PeerMisbehaved) as exc:
                log.debug("relay: %s unreachable for %s: %s", dst, src, exc)
                await self._status(stream, CONNECTION_FAILED, "relay_connect")
                return
            if answer.type != StopMessage.STATUS or answer.status != OK:
                await self._status(stream, CONNECTION_FAILED, "relay_connect")
                return
            await self._status(stream, OK, "relay_connect", limit=self._limit())
            await self._splice(circuit.id, circuit.opened_ms, stream, dst_stream, src)
        finally:
            self.book.close_circuit(circuit.id)
            if dst_stream is not None:
                await _reset(dst_stream)

    async def _splice(self, cid: int, opened_ms: int, a: Any, b: Any, src: ID) -> None:
        """Copy bytes both ways until both sides are done, the circuit's bytes
        run out (cut: both reset), or its duration ends (cut)."""
        lim = self.book.limits

        async def one_way(reader: Any, writer: Any) -> None:
            while True:
                try:
                    data = await reader.read(chunk_bytes)
                except BaseLibp2pError:
                    data = b""
                if not data:
                    try:
                        await writer.close()  # half-close: the other direction goes on
                    except BaseLibp2pError:
                        log.debug("relay: half-close failed")
                    return
                cut = self.book.allow_bytes(cid, len(data), self.now_ms())
                if cut is not None:
                    raise _Cut(cut)
                self.bytes_relayed += len(data)
                await writer.write(data)

        deadline_s = trio.current_time() + max(0, opened_ms + lim.circuit_duration_ms_max - self.now_ms()) / 1000
        cut: CircuitCut | None = None
        with trio.move_on_at(deadline_s) as scope:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(one_way, a, b)
                    nursery.start_soon(one_way, b, a)
            except* _Cut as group:
                first = group.exceptions[0]
                cut = first.why if isinstance(first, _Cut) else CircuitCut.BYTES
            except* BaseLibp2pError:
                log.debug("relay: a circuit's stream broke")
        if scope.cancelled_caught:
            cut = CircuitCut.DURATION
            self.book.cut_now(cid, cut, self.now_ms())
        if cut is not None:
            self.counts[f"relay_circuit_cut:{cut.value}"] += 1
            log.info("relay: cut a circuit from %s (%s limit)", src, cut.value)
            await _reset(a)
            await _reset(b)
            if self.book.is_banned(src.to_base58(), self.now_ms()):
                await self._disconnect(src)

    async def _disconnect(self, peer: ID) -> None:
        self.counts["relay_peers_banned"] += 1
        with trio.move_on_after(2.0):
            try:
                await self.host.get_network().close_peer(peer)
            except (BaseLibp2pError, OSError):
                log.debug("relay: closing a banned peer failed")

    def status(self) -> dict[str, Any]:
        return {"enabled": self.enabled(), **self.book.status(self.now_ms()), "bytes_relayed": self.bytes_relayed}


def _status_name(status: int) -> str:
    return {OK: "ok", RESERVATION_REFUSED: "reservation_refused", RESOURCE_LIMIT_EXCEEDED: "resource_limit_exceeded",
            PERMISSION_DENIED: "permission_denied", CONNECTION_FAILED: "connection_failed",
            NO_RESERVATION: "no_reservation", MALFORMED_MESSAGE: "malformed_message",
            UNEXPECTED_MESSAGE: "unexpected_message"}.get(status, str(status))


# --------------------------------------------------------- the destination


async def _until_closed(conn: Any) -> None:
    event = getattr(conn, "event_closed", None)
    if isinstance(event, trio.Event):
        await event.wait()
        return
    while not getattr(conn, "is_closed", True):  # a muxer without a close event
        await trio.sleep(1.0)


class StopHandler:
    """Accepts connections relayed to us by relays we hold a slot on."""

    def __init__(self, host: Any, counts: Counter[str], *, holding: Callable[[str], bool],
                 admit: Callable[[str], str | None], release: Callable[[str], None]) -> None:
        self.host = host
        self.counts = counts
        self.holding = holding
        self.admit = admit
        self.release = release

    async def serve(self, stream: Any) -> None:
        relay = stream.muxed_conn.peer_id
        if is_relayed(stream) or not self.holding(relay.to_base58()):
            self.counts["relayed_in:not_our_relay"] += 1
            await _write(stream, StopMessage(type=StopMessage.STATUS, status=PERMISSION_DENIED))  # type: ignore[arg-type]
            return
        with trio.fail_after(handshake_timeout_s):
            msg = await _read(stream, StopMessage)
        try:
            src = ID(msg.peer.id)
        except (ValueError, TypeError):
            src = None
        if msg.type != StopMessage.CONNECT or src is None:
            await _write(stream, StopMessage(type=StopMessage.STATUS, status=MALFORMED_MESSAGE))  # type: ignore[arg-type]
            return
        refusal = self.admit(src.to_base58())
        if refusal is not None:
            self.counts[f"relayed_in_refused:{refusal}"] += 1
            await _write(stream, StopMessage(type=StopMessage.STATUS, status=RESOURCE_LIMIT_EXCEEDED))  # type: ignore[arg-type]
            return
        try:
            await _write(stream, StopMessage(type=StopMessage.STATUS, status=OK))  # type: ignore[arg-type]
            ma = Multiaddr(f"/p2p/{relay.to_base58()}/p2p-circuit/p2p/{src.to_base58()}")
            raw = RawConnection(stream=stream, initiator=False, connection_type=ConnectionType.RELAYED,
                                addresses=[ma])
            with trio.fail_after(handshake_timeout_s):
                muxed = await self.host.get_network().upgrade_inbound_raw_conn(raw, ma)
            if muxed.peer_id != src:
                self.counts["relayed_in:peer_mismatch"] += 1
                await muxed.close()
                return
            self.counts["relayed_in"] += 1
            await _until_closed(muxed)
        finally:
            self.release(src.to_base58())


# -------------------------------------------------------------- the client


@dataclass
class Held:
    """A slot we hold on a relay."""

    relay: str
    expires_s: float
    #: Our circuit addresses through it (``.../p2p/<relay>/p2p-circuit/p2p/<us>``).
    circuit_addrs: list[str]


class RelayClient:
    def __init__(self, host: Any, counts: Counter[str]) -> None:
        self.host = host
        self.counts = counts
        self.holding: dict[str, Held] = {}

    def circuit_addrs(self) -> list[str]:
        return [a for h in self.holding.values() for a in h.circuit_addrs]

    def drop(self, relay: str) -> bool:
        return self.holding.pop(relay, None) is not None

    async def reserve(self, relay: ID, relay_transport_addrs: list[str]) -> str | None:
        """Reserve (or renew) a slot on ``relay``; None on success, else why not.
        ``relay_transport_addrs``: the addresses we know the relay at (those
        we reached it by come first); the circuit addresses we advertise are
        built from them."""
        stream = None
        try:
            with trio.fail_after(handshake_timeout_s):
                stream = await self.host.new_stream(relay, [HOP_PROTOCOL])
                if is_relayed(stream):
                    return "the relay is itself reached through a relay"
                await _write(stream, HopMessage(type=HopMessage.RESERVE))
                answer = await _read(stream, HopMessage)
        except (trio.TooSlowError, BaseLibp2pError, OSError, ValueError, PeerMisbehaved) as exc:
            self.counts["relay_reserve_failed"] += 1
            return f"{type(exc).__name__}: {exc}"[:200]
        finally:
            if stream is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                    try:
                        await stream.close()
                    except BaseLibp2pError:
                        log.debug("closing a reservation stream failed")
        if answer.type != HopMessage.STATUS or answer.status != OK:
            self.counts["relay_reserve_refused"] += 1
            return f"refused: {_status_name(answer.status)}"
        ttl_s = max(1, min(answer.reservation.expire - int(time.time()), 24 * 3600))
        rid = relay.to_base58()
        me = self.host.get_id().to_base58()
        addrs: list[str] = []
        for text in relay_transport_addrs:
            a = parse_addr(text)
            if a is None or a.is_relay:
                continue
            circuit = f"{a.transport()}/p2p/{rid}/p2p-circuit/p2p/{me}"
            if circuit not in addrs:
                addrs.append(circuit)
        self.holding[rid] = Held(relay=rid, expires_s=trio.current_time() + ttl_s, circuit_addrs=addrs[:2])
        self.counts["relay_reserved"] += 1
        return None

    async def dial(self, circuit: str, dest: ID, timeout_s: float) -> Any:
        """Connect to ``dest`` through the relay in ``circuit``; the new
        connection joins the swarm (streams to ``dest`` may use it)."""
        a = parse_addr(circuit)
        if a is None or a.relay is None or a.relay.peer is None:
            raise RelayDialFailed(f"not a relay address: {circuit}")
        relay = ID.from_base58(a.relay.peer)
        stream = None
        try:
            with trio.fail_after(timeout_s):
                await self.host.connect(PeerInfo(relay, [Multiaddr(a.relay.transport())]))
                stream = await self.host.new_stream(relay, [HOP_PROTOCOL])
                await _write(stream, HopMessage(type=HopMessage.CONNECT, peer=PbPeer(id=dest.to_bytes())))
                answer = await _read(stream, HopMessage)
                if answer.type != HopMessage.STATUS or answer.status != OK:
                    raise RelayDialFailed(f"the relay refused: {_status_name(answer.status)}")
                ma = Multiaddr(f"{a.relay}/p2p-circuit/p2p/{dest.to_base58()}")
                raw = RawConnection(stream=stream, initiator=True, connection_type=ConnectionType.RELAYED,
                                    addresses=[ma])
                conn = await self.host.get_network().upgrade_outbound_raw_conn(raw, dest)
                stream = None
        except trio.TooSlowError:
            raise RelayDialFailed("timed out") from None
        except (BaseLibp2pError, OSError, ValueError, PeerMisbehaved) as exc:
            raise RelayDialFailed(f"{type(exc).__name__}: {exc}"[:200]) from None
        finally:
            if stream is not None:
                await _reset(stream)
        self.counts["relayed_out"] += 1
        return conn
