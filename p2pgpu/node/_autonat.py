"""AutoNAT v1 (``/libp2p/autonat/1.0.0``): ask peers to dial us back, and dial them back.

A node cannot see from the inside whether the world can dial it.  So it asks
peers it is directly connected to: "open a *new* connection to me at my
addresses, and tell me whether it worked".  Their answers go into the
:class:`~p2pgpu.core.ReachabilityTracker` (``core/_reach.py``), which decides
public / private / unknown once several peers at distinct addresses agree.

Why not py-libp2p's ``AutoNATService``: its server dials back with
``host.connect``, which returns at once when a connection to the peer
exists, and one always does (the request came over it), so every node is
told it is public.  Here the dial-back is a fresh TCP connection and a
Noise handshake that must prove the peer's identity, then closed: nothing
else is opened, and the peer's existing connection is left alone.

The server follows the spec's safety rules and adds limits:

- it refuses requests that come over a relayed connection (it cannot know
  the requester's address);
- it dials only the IP the request came from (never an address the requester
  names: no amplification), on at most ``ports_max`` of the ports it names;
- at most one request per peer per ``peer_interval_s``, ``concurrent_max``
  dial-backs at once, each bounded by ``dial_timeout_s``; the request is at
  most ``request_bytes_max`` bytes.

Wire format: varint-length-prefixed protobuf ``Message`` as in go-libp2p and
js-libp2p (py-libp2p's generated ``autonat_pb2``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio
from google.protobuf.message import DecodeError
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.host.autonat.pb.autonat_pb2 import Message
from libp2p.peer.id import ID
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited
from multiaddr import Multiaddr
from multiaddr.exceptions import Error as MultiaddrError

from p2pgpu.core import parse_addr

log = logging.getLogger("p2pgpu.reach")

AUTONAT_PROTOCOL = TProtocol("/libp2p/autonat/1.0.0")
request_bytes_max = 4096
ports_max = 4
addrs_sent_max = 8


@dataclass(frozen=True, kw_only=True)
class AutoNatLimits:
    peer_interval_s: float = 30.0
    concurrent_max: int = 4
    dial_timeout_s: float = 5.0
    #: Peers whose last request time is remembered.
    peers_max: int = 4096
    #: A client waits this long for a server's verdict.
    answer_timeout_s: float = 20.0


@dataclass(frozen=True, slots=True)
class Answer:
    """A server's verdict: ``ok`` with the address it reached us at, ``ok``
    False with why; ``judged`` False when the server declined to judge
    (refused, bad request, internal error): no verdict either way."""

    judged: bool
    ok: bool
    addr: str
    detail: str


def is_relayed(conn_or_stream: Any) -> bool:
    """Whether a connection (or a stream's connection) runs through a relay.
    Fails closed: when it cannot tell, it says relayed."""
    conn = getattr(conn_or_stream, "muxed_conn", conn_or_stream)
    get = getattr(conn, "get_transport_addresses", None)
    if not callable(get):
        return True
    try:
        addrs = get() or []
    except (AttributeError, ValueError, OSError):
        return True
    return not addrs or any("/p2p-circuit" in str(a) for a in addrs)


def remote_ip(stream: Any) -> str | None:
    get = getattr(stream, "get_remote_address", None)
    try:
        remote = get() if callable(get) else None
    except (OSError, AttributeError, BaseLibp2pError):
        return None
    if isinstance(remote, (tuple, list)) and remote and isinstance(remote[0], str):
        return remote[0].split("%", 1)[0]
    return None


def _ip_multiaddr(ip: str, port: int) -> Multiaddr:
    return Multiaddr(f"/ip6/{ip}/tcp/{port}" if ":" in ip else f"/ip4/{ip}/tcp/{port}")


async def dial_back(host: Any, peer: ID, maddr: Multiaddr, timeout_s: float) -> str:
    """Open a new TCP connection to ``maddr`` and run the Noise handshake
    expecting ``peer``; close it.  '' on success, else why it failed."""
    swarm = host.get_network()
    transport = swarm.transport_manager.transport_for_dialing(maddr)
    if transport is None:
        return "no transport for the address"
    raw = None
    try:
        with trio.fail_after(timeout_s):
            raw = await transport.dial(maddr.encapsulate(Multiaddr(f"/p2p/{peer.to_base58()}")))
            secured = await swarm.upgrader.upgrade_security(raw, True, peer)
            await secured.close()
            raw = None
        return ""
    except trio.TooSlowError:
        return "dial timed out"
    except (BaseLibp2pError, OSError) as exc:
        return f"dial failed: {type(exc).__name__}"
    finally:
        if raw is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                try:
                    await raw.close()
                except (BaseLibp2pError, OSError):
                    log.debug("closing a failed dial-back connection failed")


class AutoNatServer:
    """Answers other peers' dial-back requests (``serve`` is the stream handler)."""

    def __init__(self, host: Any, counts: Counter[str], *, now_s: Callable[[], float],
                 limits: AutoNatLimits = AutoNatLimits()) -> None:
        self.host = host
        self.counts = counts
        self.now_s = now_s
        self.limits = limits
        self._last: dict[str, float] = {}
        self._slots = trio.Semaphore(limits.concurrent_max)

    async def serve(self, stream: Any) -> None:
        data = await read_varint_prefixed_bytes_limited(stream, request_bytes_max)
        reply = await self._answer(stream, data)
        await stream.write(encode_varint_prefixed(reply.SerializeToString()))

    def _reply(self, status: int, text: str = "", addr: bytes = b"") -> Message:
        m = Message(type=Message.DIAL_RESPONSE)
        m.dialResponse.status = status  # type: ignore[assignment]
        if text:
            m.dialResponse.statusText = text
        if addr:
            m.dialResponse.addr = addr
        name = Message.ResponseStatus.Name(status)  # type: ignore[arg-type]
        self.counts[f"autonat_served:{name.lower()}"] += 1
        return m

    async def _answer(self, stream: Any, data: bytes) -> Message:
        req = Message()
        try:
            req.ParseFromString(data)
            peer = ID(req.dial.peer.id)
        except (DecodeError, ValueError, TypeError) as exc:
            return self._reply(Message.E_BAD_REQUEST, f"bad request: {type(exc).__name__}")
        requester = stream.muxed_conn.peer_id
        if req.type != Message.DIAL or peer != requester:
            return self._reply(Message.E_BAD_REQUEST, "a peer may only ask to be dialled itself")
        if is_relayed(stream):
            return self._reply(Message.E_DIAL_REFUSED, "dial requests over relayed connections are refused")
        ip = remote_ip(stream)
        if ip is None:
            return self._reply(Message.E_DIAL_REFUSED, "cannot see the requester's address")
        key, now = requester.to_base58(), self.now_s()
        last = self._last.pop(key, None)
        self._last[key] = now if last is None or now - last >= self.limits.peer_interval_s else last
        while len(self._last) > self.limits.peers_max:
            del self._last[next(iter(self._last))]
        if last is not None and now - last < self.limits.peer_interval_s:
            return self._reply(Message.E_DIAL_REFUSED, "asked too often")
        ports: list[int] = []
        for raw in list(req.dial.peer.addrs)[:32]:
            try:
                a = parse_addr(str(Multiaddr(bytes(raw))))
            except (ValueError, TypeError, LookupError, MultiaddrError, BaseLibp2pError):
                continue
            if a is not None and not a.is_relay and a.port not in ports:
                ports.append(a.port)
        if not ports:
            return self._reply(Message.E_BAD_REQUEST, "no TCP address to dial")
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            return self._reply(Message.E_DIAL_REFUSED, "too many dial-backs at once")
        try:
            why = "no port"
            for port in ports[:ports_max]:
                maddr = _ip_multiaddr(ip, port)
                why = await dial_back(self.host, requester, maddr, self.limits.dial_timeout_s)
                if not why:
                    return self._reply(Message.OK, addr=maddr.to_bytes())
            return self._reply(Message.E_DIAL_ERROR, why)
        finally:
            self._slots.release()


async def ask(host: Any, server: ID, addrs: list[str], timeout_s: float) -> Answer:
    """Ask ``server`` to dial us back at ``addrs`` (transport addresses)."""
    req = Message(type=Message.DIAL)
    req.dial.peer.id = host.get_id().to_bytes()
    for a in addrs[:addrs_sent_max]:
        req.dial.peer.addrs.append(Multiaddr(a).to_bytes())
    stream = None
    try:
        with trio.fail_after(timeout_s):
            stream = await host.new_stream(server, [AUTONAT_PROTOCOL])
            await stream.write(encode_varint_prefixed(req.SerializeToString()))
            data = await read_varint_prefixed_bytes_limited(stream, request_bytes_max)
    except trio.TooSlowError:
        return Answer(judged=False, ok=False, addr="", detail="no answer in time")
    except (BaseLibp2pError, OSError) as exc:
        return Answer(judged=False, ok=False, addr="", detail=f"{type(exc).__name__}")
    finally:
        if stream is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                try:
                    await stream.close()
                except BaseLibp2pError:
                    log.debug("closing the autonat stream failed")
    resp = Message()
    try:
        resp.ParseFromString(data)
    except (DecodeError, ValueError):
        return Answer(judged=False, ok=False, addr="", detail="garbled answer")
    status, text = resp.dialResponse.status, resp.dialResponse.statusText[:200]
    if status == Message.OK:
        try:
            addr = str(Multiaddr(bytes(resp.dialResponse.addr)))
        except (ValueError, TypeError, LookupError, MultiaddrError, BaseLibp2pError):
            return Answer(judged=False, ok=False, addr="", detail="answer with a garbled address")
        return Answer(judged=True, ok=True, addr=addr, detail="")
    if status == Message.E_DIAL_ERROR:
        return Answer(judged=True, ok=False, addr="", detail=text or "dial failed")
    return Answer(judged=False, ok=False, addr="", detail=text or "refused")
