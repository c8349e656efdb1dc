"""The bulk side channel's bytes: a TCP listener per node, and the fetcher's connections.

The decisions (tickets, limits, frame formats, when to fall back) are in
``core/_bulk.py``; this module only moves bytes.  The provider's
:class:`BulkServer` listens on the interface of the node's first TCP libp2p
listen address (``bulk_port``, 0: any free port); the ``/p2pgpu/blobs/1.0.0``
service issues its tickets (op ``bulk``).  A connection must present a ticket
within ``hello_timeout_s``; then it sends sealed requests and receives one
sealed frame per chunk, read from the store in a worker thread and sealed
there (AES-GCM releases the GIL).  :class:`BulkConn` is the fetcher's end:
the chunk frames are received into one buffer each and opened, checked and
written by the caller (``_blobs._Fetch``), in a thread.

Wire (docs/protocol.md, "Bulk side channel"): fetcher -> provider
``MAGIC || token(16) || u32 len || seal(key_up, 0, hello)``, then per request
``u32 len || seal(key_up, n, first u32 || count u32)``; provider -> fetcher per
chunk ``u32 len || seal(key_down, k, chunk)`` with the chunk's index in the
associated data (an empty chunk: "I do not hold it").
"""

from __future__ import annotations

import logging
import os
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from p2pgpu.core import PeerMisbehaved, Reason
from p2pgpu.core import _bulk as core
from p2pgpu.core._bulk import ConnectionGate, Offer, TicketBook
from p2pgpu.home import HomeError

if TYPE_CHECKING:
    from ._blobs import BlobService

log = logging.getLogger("p2pgpu.bulk")

#: How long a fetcher waits for the TCP connection to a provider's bulk port.
connect_timeout_s = 3.0
#: Socket buffers asked for on bulk connections (loopback and LAN rates).
socket_buffer_bytes = 4 << 20


#: config.toml's limits of the side channel: (default, lowest, highest).
BULK_LIMITS: dict[str, tuple[int, int, int]] = {
    "bulk_ticket_ttl_s": (int(core.ticket_ttl_s), 1, 3600),
    "bulk_tickets_per_peer_max": (core.tickets_per_peer_max, 1, 1024),
    "bulk_tickets_max": (core.tickets_max, 1, 1 << 16),
    "bulk_connections_per_ip_max": (core.connections_per_ip_max, 1, 1024),
    "bulk_connections_max": (core.connections_max, 1, 4096),
    "bulk_hello_timeout_s": (int(core.hello_timeout_s), 1, 60),
    "bulk_idle_timeout_s": (int(core.idle_timeout_s), 1, 3600),
    "bulk_send_timeout_s_min": (int(core.send_timeout_s_min), 1, 600),
}


@dataclass(frozen=True)
class BulkConfig:
    """Where the side channel listens, or that it is off (``enabled``)."""

    enabled: bool
    host: str = "127.0.0.1"
    port: int = 0
    #: Test networks only (adversary ``bulk_dead_port``): a port offered where nothing listens.
    offered_port: int = 0
    limits: dict[str, int] = field(default_factory=lambda: {k: v[0] for k, v in BULK_LIMITS.items()})

    def server(self, blobs: BlobService, counts: Counter[str], adversary: str = "") -> BulkServer:
        lim = self.limits
        return BulkServer(blobs=blobs, counts=counts, host=self.host, port=self.port, offered_port=self.offered_port,
                          book=TicketBook(ttl_s=float(lim["bulk_ticket_ttl_s"]),
                                          per_peer_max=lim["bulk_tickets_per_peer_max"],
                                          total_max=lim["bulk_tickets_max"]),
                          gate=ConnectionGate(per_ip_max=lim["bulk_connections_per_ip_max"],
                                              total_max=lim["bulk_connections_max"]),
                          hello_timeout_s=float(lim["bulk_hello_timeout_s"]),
                          idle_timeout_s=float(lim["bulk_idle_timeout_s"]),
                          send_timeout_s_min=float(lim["bulk_send_timeout_s_min"]), adversary=adversary)


def bulk_config(extra: dict[str, Any], options: Any, *, limits: dict[str, int], adversary: str = "") -> BulkConfig:
    """The side channel's settings: config.toml's ``bulk_enabled`` (default
    true) and ``bulk_port`` (default 0: any free port), ``--bulk-port`` over
    them (-1: off); it listens on the host of the node's first TCP listen
    address (none: off)."""
    enabled, port = extra.get("bulk_enabled", True), extra.get("bulk_port", 0)
    if type(enabled) is not bool:
        raise HomeError("config.toml: bulk_enabled must be true or false")
    if type(port) is not int or not 0 <= port <= 65535:
        raise HomeError("config.toml: bulk_port must be a TCP port, 0..65535 (0: any free port)")
    cli = getattr(options, "bulk_port", None)
    if cli is not None:
        enabled, port = cli >= 0, max(cli, 0)
    host = next((a.split("/")[2] for a in options.listen
                 if a.startswith(("/ip4/", "/ip6/")) and a.split("/")[3:4] == ["tcp"]), None)
    if not enabled or host is None:
        return BulkConfig(enabled=False)
    return BulkConfig(enabled=True, host=host, port=port, offered_port=1 if adversary == "bulk_dead_port" else 0,
                      limits=limits)


class BulkGone(Exception):
    """The bulk connection closed, broke or timed out: an operating failure."""


async def _recv_exactly(sock: Any, n: int) -> bytearray:
    """``n`` bytes from a trio socket, into one buffer; ``BulkGone`` on EOF."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        try:
            k = await sock.recv_into(view[got:])
        except OSError as exc:
            raise BulkGone(f"receive failed: {exc.strerror or exc}") from None
        if not k:
            raise BulkGone("end of stream")
        got += k
    return buf


async def _send_all(sock: Any, *parts: bytes) -> None:
    for data in parts:
        view = memoryview(data)
        while view:
            try:
                k = await sock.send(view)
            except OSError as exc:
                raise BulkGone(f"send failed: {exc.strerror or exc}") from None
            view = view[k:]


def _tune(sock: Any) -> None:
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, socket_buffer_bytes)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass
class BulkServer:
    """The provider's bulk listener and its tickets (see the module doc)."""

    blobs: BlobService
    counts: Counter[str]
    host: str = "127.0.0.1"
    port: int = 0
    book: TicketBook = field(default_factory=TicketBook)
    gate: ConnectionGate = field(default_factory=ConnectionGate)
    token_bytes: Callable[[int], bytes] = os.urandom
    hello_timeout_s: float = core.hello_timeout_s
    idle_timeout_s: float = core.idle_timeout_s
    send_timeout_s_min: float = core.send_timeout_s_min
    #: Test networks only: the port offered in tickets (a closed port: fallback tests).
    offered_port: int = 0
    #: Test networks only: ``bulk_forge_frames`` (a flipped bit in every chunk
    #: frame), ``bulk_oversized_frames`` (a length far over any chunk),
    #: ``bulk_break`` (each connection closed after its first chunk).
    adversary: str = ""

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; ``task_status`` gets the bound port."""
        sock = trio.socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                await sock.bind((self.host, self.port))
            except OSError as exc:
                # Blobs still flow over libp2p: a busy port must not stop the node.
                log.warning("bulk side channel off: cannot listen on %s port %d (%s); set bulk_port "
                            "(or --bulk-port) to a free port, or 0 for any", self.host, self.port, exc.strerror or exc)
                self.counts["bulk:listen_failed"] += 1
                self.blobs.bulk = None
                task_status.started(0)
                return
            sock.listen(128)
            self.port = sock.getsockname()[1]
            task_status.started(self.port)
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        conn, addr = await sock.accept()
                    except OSError as exc:  # EMFILE and the like: wait, do not spin
                        self.counts["bulk:accept_errors"] += 1
                        log.warning("bulk listener: accept failed: %s", exc)
                        await trio.sleep(0.5)
                        continue
                    ip = str(addr[0]).split("%", 1)[0]
                    if ip.startswith("::ffff:") and "." in ip:
                        ip = ip[7:]  # an IPv4 peer on a dual-stack socket: as libp2p names it
                    if not self.gate.admit(ip):
                        self.counts["bulk:refused:limit_exceeded"] += 1
                        conn.close()
                        continue
                    nursery.start_soon(self._handle, conn, ip)

    def ticket_offer(self, *, peer: str, ip: str, sha256: bytes, chunks: int, first: int | None,
                     count: int | None) -> dict[str, object]:
        """A ticket for ``peer`` (asking over libp2p from ``ip``), as sent back."""
        lo, n = core.ticket_range(chunks, first, count)
        ticket = self.book.issue(peer=peer, ip=ip, sha256=sha256, first=lo, count=n,
                                 now=trio.current_time(), token_bytes=self.token_bytes)
        self.counts["bulk:tickets_issued"] += 1
        return ticket.offer(self.offered_port or self.port)

    async def _handle(self, conn: Any, ip: str) -> None:
        try:
            with conn:
                _tune(conn)
                await self._session(conn, ip)
        except PeerMisbehaved as exc:
            self.counts[f"bulk:refused:{exc.reason.name.lower()}"] += 1
            log.info("bulk connection from %s closed: %s", ip, exc)
        except trio.TooSlowError:
            self.counts["bulk:timeouts"] += 1
        except BulkGone:
            self.counts["bulk:connections_gone"] += 1
        except OSError as exc:
            self.counts["bulk:connections_gone"] += 1
            log.info("bulk connection from %s: %s", ip, exc)
        except Exception:  # our bug (a store error...): logged, never ends the listener
            self.counts["bulk:errors"] += 1
            log.exception("bulk connection from %s failed on our side", ip)
        finally:
            self.gate.release(ip)

    async def _session(self, conn: Any, ip: str) -> None:
        with trio.fail_after(self.hello_timeout_s):
            head = await _recv_exactly(conn, len(core.MAGIC) + core.TOKEN_BYTES + core.LENGTH_BYTES)
            if bytes(head[: len(core.MAGIC)]) != core.MAGIC:
                raise PeerMisbehaved(Reason.MALFORMED, "not a p2pgpu bulk connection")
            token = bytes(head[len(core.MAGIC): -core.LENGTH_BYTES])
            length = core.frame_length(bytes(head[-core.LENGTH_BYTES:]), core.HELLO_SEALED_BYTES)
            # Looked up before the hello is read: an unknown token is refused at once.
            ticket = self.book.check(token, ip=ip, now=trio.current_time())
            hello = bytes(await _recv_exactly(conn, length))
        core.open_hello(ticket, hello)
        self.book.redeem(ticket)
        self.counts["bulk:connections"] += 1
        up, down = AESGCM(ticket.key_up), AESGCM(ticket.key_down)
        sha = ticket.sha256.hex()
        received, sent = 1, 0
        while True:
            with trio.move_on_after(self.idle_timeout_s) as idle:
                try:
                    header = bytes(await _recv_exactly(conn, core.LENGTH_BYTES))
                except BulkGone:
                    return  # the fetcher is done with this connection
            if idle.cancelled_caught:
                self.counts["bulk:idle_closed"] += 1
                return
            length = core.frame_length(header, core.REQUEST_SEALED_BYTES)
            with trio.fail_after(self.hello_timeout_s):
                sealed = bytes(await _recv_exactly(conn, length))
            first, count = core.open_request(up, received, sealed, ticket)
            received += 1
            held = self.blobs.bulk_held(sha)
            for i in range(first, first + count):
                frame = await self.blobs.bulk_chunk(sha, held, i, down, sent)
                sent += 1
                timeout = self.send_timeout_s_min + len(frame) / core.send_bytes_per_s_min
                header = core.frame_header(len(frame))
                if self.adversary == "bulk_forge_frames":
                    frame = frame[:-1] + bytes([frame[-1] ^ 1])
                elif self.adversary == "bulk_oversized_frames":
                    header = core.frame_header(1 << 30)
                with trio.fail_after(timeout):
                    await _send_all(conn, header, frame)
                if len(frame) == core.TAG_BYTES:
                    return  # we lack that chunk (a partial): the fetcher asks elsewhere
                if self.adversary == "bulk_break":
                    return  # one chunk, then the connection drops (a middlebox, a crash)
                self.counts["bulk:bytes_served"] += len(frame) - core.TAG_BYTES


class BulkConn:
    """The fetcher's end of one bulk connection (one ticket)."""

    def __init__(self, sock: Any, offer: Offer) -> None:
        self.sock = sock
        self.offer = offer
        self.up = AESGCM(offer.key_up)
        self.down = AESGCM(offer.key_down)
        self.sent = 1
        self.received = 0

    @classmethod
    async def open(cls, ip: str, offer: Offer, sha256: bytes) -> BulkConn:
        """Connect to ``ip``:``offer.port`` and present the ticket; ``BulkGone`` if it cannot be made."""
        sock = trio.socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
        try:
            _tune(sock)
            with trio.fail_after(connect_timeout_s):
                await sock.connect((ip, offer.port))
            hello = core.seal_hello(offer.key_up, sha256)
            await _send_all(sock, core.MAGIC + offer.token + core.frame_header(len(hello)) + hello)
        except (OSError, trio.TooSlowError, BulkGone) as exc:
            sock.close()
            raise BulkGone(f"cannot connect to {ip} port {offer.port}: {exc}") from None
        return cls(sock, offer)

    async def request(self, first: int, count: int) -> None:
        if not self.offer.covers(first, count):
            raise BulkGone("the run lies outside the ticket")
        sealed = core.seal_request(self.up, self.sent, first, count)
        self.sent += 1
        await _send_all(self.sock, core.frame_header(len(sealed)) + sealed)

    async def frame(self, size_max: int) -> tuple[int, bytearray]:
        """The next sealed chunk frame and its counter (opened by the caller, in a thread)."""
        length = core.frame_length(bytes(await _recv_exactly(self.sock, core.LENGTH_BYTES)), size_max)
        data = await _recv_exactly(self.sock, length)
        counter = self.received
        self.received += 1
        return counter, data

    def close(self) -> None:
        self.sock.close()
