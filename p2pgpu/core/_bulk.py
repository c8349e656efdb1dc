"""The bulk side channel for blob chunks: tickets, admission, frames, fallback.

py-libp2p's Noise and Yamux framing, written in Python, costs more CPU per
byte than the rest of a blob transfer together (docs/performance.md, "Blob
transfer").  So chunk data may leave the libp2p stream: over the already
authenticated, encrypted ``/p2pgpu/blobs/1.0.0`` stream the fetcher asks for
a **ticket** (op ``bulk``); the provider answers with a random token, the
blob and chunk range it covers, an expiry, two fresh AES-256-GCM keys (one
per direction) and the port of its bulk TCP listener.  The fetcher opens a
plain TCP connection to the IP it already talks to the provider at, presents
the token and a hello sealed with its key (proof that it holds the ticket,
not just saw the token), then sends sealed requests ``(first, count)`` and
receives one sealed frame per chunk.  Every chunk is still checked against
the blob's hash tree as it arrives, by the same code as over libp2p.

This module decides, and does no I/O: the driver (``node/_bulk.py``) moves
bytes and hands in the time (``now``, seconds) and its randomness
(``token_bytes``).  It holds:

- :class:`TicketBook`: tickets issued (per peer and in total, each bounded),
  checked (token known, not expired, not used before, from the IP it was
  issued to, for the blob it names) and redeemed once;
- :class:`ConnectionGate`: bulk connections per IP and in total;
- the frame formats (:func:`seal_chunk`, :func:`open_chunk`, the hello and
  requests), sealed with the counter of frames in that direction as nonce;
- :class:`BulkChoice`: on the fetcher, whether to use the side channel with a
  provider, and when to stop trying (fallback to the libp2p stream).

A provider that answers with a frame whose tag does not open is dropped like
one that sends a bad chunk; a connection that presents anything but a valid
ticket is closed at once and changes nothing.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ._errors import PeerMisbehaved, Reason

#: The first bytes of a bulk connection (its protocol and version).
MAGIC = b"P2PGBLK1"
TOKEN_BYTES = 16
KEY_BYTES = 32
TAG_BYTES = 16
#: Every frame after the token: a u32 length (big-endian), then that many sealed bytes.
LENGTH_BYTES = 4
#: Tickets: how long one may wait to be redeemed, how many a peer and the node hold.
ticket_ttl_s = 30.0
tickets_per_peer_max = 16
tickets_max = 1024
#: Tokens remembered after use (to say "replayed" rather than "unknown").
tokens_used_kept_max = 4096
#: Bulk connections at once, per source IP and in all.
connections_per_ip_max = 8
connections_max = 64
#: Seconds a new connection has to present its token and hello (slowloris).
hello_timeout_s = 5.0
#: Seconds a connection may sit without a request before it is closed.
idle_timeout_s = 30.0
#: A chunk frame must be taken by the fetcher within this + its size at this rate.
send_timeout_s_min = 10.0
send_bytes_per_s_min = 256 * 1024
#: Chunks one request may ask for.
chunks_per_request_max = 64
#: Sealed sizes of the fixed frames.
_HELLO_PLAIN = b"p2pgpu-bulk-hello" + bytes(32)
HELLO_SEALED_BYTES = len(_HELLO_PLAIN) + TAG_BYTES
REQUEST_SEALED_BYTES = 8 + TAG_BYTES
#: Bulk connection attempts per provider that may fail before a fetch stops trying.
fallbacks_per_provider_max = 1

_AD_HELLO = b"p2pgpu-bulk-hello"
_AD_REQUEST = b"p2pgpu-bulk-request"
_AD_CHUNK = b"p2pgpu-bulk-chunk"


def nonce(counter: int) -> bytes:
    """The AES-GCM nonce of frame ``counter`` in one direction (keys are fresh per ticket)."""
    return counter.to_bytes(12, "big")


@dataclass(frozen=True, kw_only=True)
class BulkTicket:
    """One ticket: who may redeem it (peer, IP), for what, until when, with what keys."""

    token: bytes
    peer: str
    ip: str
    sha256: bytes
    first: int
    count: int
    expires_s: float
    #: fetcher -> provider (hello, requests) and provider -> fetcher (chunks).
    key_up: bytes
    key_down: bytes

    def __post_init__(self) -> None:
        if len(self.token) != TOKEN_BYTES or len(self.key_up) != KEY_BYTES or len(self.key_down) != KEY_BYTES:
            raise ValueError("token of 16 bytes and keys of 32 bytes")
        if len(self.sha256) != 32 or self.first < 0 or self.count < 0:
            raise ValueError("a 32-byte sha256 and a range of chunks")

    def covers(self, first: int, count: int) -> bool:
        return 1 <= count <= chunks_per_request_max and self.first <= first and \
            first + count <= self.first + self.count

    def offer(self, port: int) -> dict[str, object]:
        """What the provider sends the fetcher over the libp2p stream (op ``bulk``)."""
        return {"token": self.token, "key_up": self.key_up, "key_down": self.key_down, "port": port,
                "first": self.first, "count": self.count}


@dataclass(frozen=True, kw_only=True)
class Offer:
    """A ticket as the fetcher received it (validated)."""

    token: bytes
    key_up: bytes
    key_down: bytes
    port: int
    first: int
    count: int

    @classmethod
    def from_obj(cls, obj: object, *, chunks: int) -> Offer:
        if not isinstance(obj, dict):
            raise PeerMisbehaved(Reason.BAD_SCHEMA, "a bulk offer is a map")
        token, up, down = obj.get("token"), obj.get("key_up"), obj.get("key_down")
        port, first, count = obj.get("port"), obj.get("first"), obj.get("count")
        if not (isinstance(token, bytes) and len(token) == TOKEN_BYTES and isinstance(up, bytes)
                and len(up) == KEY_BYTES and isinstance(down, bytes) and len(down) == KEY_BYTES):
            raise PeerMisbehaved(Reason.BAD_SCHEMA, "a bulk offer needs a 16-byte token and two 32-byte keys")
        if type(port) is not int or not 1 <= port <= 65535:
            raise PeerMisbehaved(Reason.BAD_SCHEMA, "a bulk offer needs a TCP port")
        if type(first) is not int or type(count) is not int or first < 0 or count < 0 or first + count > chunks:
            raise PeerMisbehaved(Reason.BAD_SCHEMA, "a bulk offer's range is outside the blob")
        return cls(token=token, key_up=up, key_down=down, port=port, first=first, count=count)

    def covers(self, first: int, count: int) -> bool:
        return self.first <= first and first + count <= self.first + self.count


# ----------------------------------------------------------------- tickets


def ticket_range(chunks: int, first: int | None, count: int | None) -> tuple[int, int]:
    """The chunks a ticket covers: what the fetcher asked for, or the whole blob."""
    if first is None and count is None:
        return 0, chunks
    if type(first) is not int or type(count) is not int or first < 0 or count < 1 or first + count > chunks:
        raise PeerMisbehaved(Reason.BAD_SCHEMA, "a bulk ticket's range must lie within the blob")
    return first, count


@dataclass
class TicketBook:
    """The provider's outstanding tickets (see the module doc)."""

    ttl_s: float = ticket_ttl_s
    per_peer_max: int = tickets_per_peer_max
    total_max: int = tickets_max
    used_kept_max: int = tokens_used_kept_max
    _tickets: OrderedDict[bytes, BulkTicket] = field(default_factory=OrderedDict)
    _used: OrderedDict[bytes, None] = field(default_factory=OrderedDict)

    def __len__(self) -> int:
        return len(self._tickets)

    def held_by(self, peer: str) -> int:
        return sum(1 for t in self._tickets.values() if t.peer == peer)

    def expire(self, now: float) -> int:
        """Forget tickets past their expiry; how many went."""
        gone = [tok for tok, t in self._tickets.items() if t.expires_s <= now]
        for tok in gone:
            del self._tickets[tok]
        return len(gone)

    def issue(self, *, peer: str, ip: str, sha256: bytes, first: int, count: int, now: float,
              token_bytes: Callable[[int], bytes]) -> BulkTicket:
        """A new ticket for ``peer`` (who asked over an authenticated stream
        from ``ip``); ``PeerMisbehaved(LIMIT_EXCEEDED)`` past the quotas (the
        fetcher then stays on the libp2p stream)."""
        self.expire(now)
        if self.held_by(peer) >= self.per_peer_max:
            raise PeerMisbehaved(Reason.LIMIT_EXCEEDED, f"{self.per_peer_max} bulk tickets outstanding for this peer")
        if len(self._tickets) >= self.total_max:
            raise PeerMisbehaved(Reason.LIMIT_EXCEEDED, f"{self.total_max} bulk tickets outstanding")
        ticket = BulkTicket(token=token_bytes(TOKEN_BYTES), peer=peer, ip=ip, sha256=sha256, first=first,
                            count=count, expires_s=now + self.ttl_s, key_up=token_bytes(KEY_BYTES),
                            key_down=token_bytes(KEY_BYTES))
        self._tickets[ticket.token] = ticket
        return ticket

    def check(self, token: bytes, *, ip: str, now: float) -> BulkTicket:
        """The ticket ``token`` names, if a connection from ``ip`` may redeem it
        now; changes nothing (the hello must open first: :meth:`redeem`)."""
        ticket = self._tickets.get(token)
        if ticket is None:
            if token in self._used:
                raise PeerMisbehaved(Reason.REPLAYED, "bulk ticket already used")
            raise PeerMisbehaved(Reason.BAD_CONTENT, "unknown bulk ticket")
        if ticket.expires_s <= now:
            raise PeerMisbehaved(Reason.EXPIRED, "bulk ticket expired")
        if ticket.ip != ip:
            raise PeerMisbehaved(Reason.SIGNER_MISMATCH, "bulk ticket issued to another address")
        return ticket

    def redeem(self, ticket: BulkTicket) -> None:
        """Use ``ticket`` up (once: a second connection with it is refused)."""
        if self._tickets.pop(ticket.token, None) is None:
            raise PeerMisbehaved(Reason.REPLAYED, "bulk ticket already used")
        self._used[ticket.token] = None
        while len(self._used) > self.used_kept_max:
            self._used.popitem(last=False)


@dataclass
class ConnectionGate:
    """Bulk connections at once, per source IP and in total."""

    per_ip_max: int = connections_per_ip_max
    total_max: int = connections_max
    _open: dict[str, int] = field(default_factory=dict)

    def admit(self, ip: str) -> bool:
        if sum(self._open.values()) >= self.total_max or self._open.get(ip, 0) >= self.per_ip_max:
            return False
        self._open[ip] = self._open.get(ip, 0) + 1
        return True

    def release(self, ip: str) -> None:
        n = self._open.get(ip, 0) - 1
        if n > 0:
            self._open[ip] = n
        else:
            self._open.pop(ip, None)

    def open_count(self) -> int:
        return sum(self._open.values())


# ------------------------------------------------------------------ frames


def seal_hello(key_up: bytes, sha256: bytes) -> bytes:
    """The fetcher's first sealed frame (nonce 0): proof it holds the ticket's key."""
    return AESGCM(key_up).encrypt(nonce(0), _AD_HELLO + sha256, _AD_HELLO)


def open_hello(ticket: BulkTicket, sealed: bytes) -> None:
    """Check the hello against ``ticket``: its key, and the blob it names."""
    try:
        plain = AESGCM(ticket.key_up).decrypt(nonce(0), sealed, _AD_HELLO)
    except InvalidTag:
        raise PeerMisbehaved(Reason.BAD_SIGNATURE, "bulk hello not sealed with the ticket's key") from None
    if plain[: len(_AD_HELLO)] != _AD_HELLO or plain[len(_AD_HELLO):] != ticket.sha256:
        raise PeerMisbehaved(Reason.BAD_CONTENT, "bulk hello names another blob than its ticket")


def seal_request(aead: AESGCM, counter: int, first: int, count: int) -> bytes:
    return aead.encrypt(nonce(counter), struct.pack(">II", first, count), _AD_REQUEST)


def open_request(aead: AESGCM, counter: int, sealed: bytes, ticket: BulkTicket) -> tuple[int, int]:
    """``(first, count)`` of a sealed request, checked against the ticket."""
    if len(sealed) != REQUEST_SEALED_BYTES:
        raise PeerMisbehaved(Reason.OVERSIZED, "a bulk request is 24 bytes")
    try:
        first, count = struct.unpack(">II", aead.decrypt(nonce(counter), sealed, _AD_REQUEST))
    except InvalidTag:
        raise PeerMisbehaved(Reason.BAD_SIGNATURE, "bulk request does not open") from None
    if not ticket.covers(first, count):
        raise PeerMisbehaved(Reason.BAD_SCHEMA, f"chunks {first}+{count} outside the ticket or over "
                                                f"{chunks_per_request_max} per request")
    return first, count


def chunk_ad(index: int) -> bytes:
    return _AD_CHUNK + index.to_bytes(8, "big")


def seal_chunk(aead: AESGCM, counter: int, index: int, data: bytes) -> bytes:
    """Chunk ``index`` sealed as frame ``counter``; empty ``data``: "I lack it"."""
    return aead.encrypt(nonce(counter), data, chunk_ad(index))


def open_chunk(aead: AESGCM, counter: int, index: int, sealed: bytes | bytearray | memoryview) -> bytes:
    """The chunk in a sealed frame; ``PeerMisbehaved`` (the provider is
    dropped) if its tag does not open: forged, reordered, or another chunk."""
    try:
        return aead.decrypt(nonce(counter), sealed, chunk_ad(index))
    except InvalidTag:
        raise PeerMisbehaved(Reason.BAD_SIGNATURE, f"bulk frame for chunk {index} does not open") from None


def frame_length(header: bytes, size_max: int) -> int:
    """The length in a frame header; ``PeerMisbehaved(OVERSIZED)`` over ``size_max``."""
    length = int(struct.unpack(">I", header)[0])
    if length > size_max:
        raise PeerMisbehaved(Reason.OVERSIZED, f"bulk frame of {length} bytes > {size_max}")
    if length < TAG_BYTES:
        raise PeerMisbehaved(Reason.MALFORMED, "bulk frame shorter than its tag")
    return length


def frame_header(sealed_bytes: int) -> bytes:
    return struct.pack(">I", sealed_bytes)


def chunk_frame_bytes_max(chunk_bytes: int) -> int:
    return chunk_bytes + TAG_BYTES


# ---------------------------------------------------------------- fetcher


class Fallback(Enum):
    """Why a fetch went on over the libp2p stream with one provider."""

    NOT_OFFERED = "the provider does not offer the side channel (off, or an older version)"
    NO_ADDRESS = "no direct IP address of the provider (a relayed connection)"
    REFUSED = "the provider refused a ticket"
    CONNECT_FAILED = "the bulk connection could not be made"
    BROKEN = "the bulk connection broke"


@dataclass
class BulkChoice:
    """Per fetch: which providers to fetch from over the side channel."""

    fallbacks_max: int = fallbacks_per_provider_max
    _offered: dict[str, bool] = field(default_factory=dict)
    _failures: dict[str, int] = field(default_factory=dict)
    _why: dict[str, Fallback] = field(default_factory=dict)

    def offered(self, peer: str, offers: bool, *, direct: bool) -> None:
        """What the provider's tree answer said (``bulk: 1``), and whether we
        reach it at a plain IP address (not through a relay)."""
        self._offered[peer] = offers and direct
        if not offers:
            self._why.setdefault(peer, Fallback.NOT_OFFERED)
        elif not direct:
            self._why.setdefault(peer, Fallback.NO_ADDRESS)

    def use(self, peer: str) -> bool:
        return self._offered.get(peer, False) and self._failures.get(peer, 0) < self.fallbacks_max

    def failed(self, peer: str, why: Fallback) -> None:
        """A bulk attempt with ``peer`` failed: after ``fallbacks_max`` the
        fetch stays on the libp2p stream with it."""
        self._failures[peer] = self._failures.get(peer, 0) + 1
        self._why[peer] = why

    def fallbacks(self) -> dict[str, str]:
        """Providers fetched from over libp2p, and why (for ``blobs.fetch``'s answer)."""
        return {p: w.name.lower() for p, w in self._why.items() if not self.use(p)}
