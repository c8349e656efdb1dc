"""The bulk side channel's core (``core/_bulk.py``): tickets, admission, frames, fallback.

Pure: a counter stands in for the random source, ``now`` is a number.
"""

from __future__ import annotations

import itertools

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from p2pgpu.core import PeerMisbehaved, Reason
from p2pgpu.core import _bulk as bulk
from p2pgpu.core._bulk import BulkChoice, ConnectionGate, Fallback, Offer, TicketBook

SHA = bytes(range(32))
OTHER_SHA = bytes(32)


def counter_bytes():
    c = itertools.count(1)
    return lambda n: next(c).to_bytes(n, "big")


def issue(book: TicketBook, *, peer: str = "A", ip: str = "10.0.0.1", now: float = 0.0, rand=None,
          first: int = 0, count: int = 10):
    return book.issue(peer=peer, ip=ip, sha256=SHA, first=first, count=count, now=now,
                      token_bytes=rand or counter_bytes())


def reason(fn, *args, **kw) -> Reason:
    with pytest.raises(PeerMisbehaved) as e:
        fn(*args, **kw)
    return e.value.reason


# ----------------------------------------------------------------- tickets


def test_ticket_redeemed_once_then_replayed() -> None:
    book = TicketBook()
    t = issue(book)
    assert book.check(t.token, ip="10.0.0.1", now=1.0) is t
    book.redeem(t)
    assert len(book) == 0
    assert reason(book.check, t.token, ip="10.0.0.1", now=1.0) == Reason.REPLAYED
    assert reason(book.redeem, t) == Reason.REPLAYED


@pytest.mark.parametrize(("token", "ip", "now", "why"), [
    (b"\x00" * 16, "10.0.0.1", 1.0, Reason.BAD_CONTENT),      # garbage: unknown
    (None, "10.0.0.2", 1.0, Reason.SIGNER_MISMATCH),           # from another address
    (None, "10.0.0.1", bulk.ticket_ttl_s, Reason.EXPIRED),     # too late
])
def test_ticket_check_refuses_without_changing_anything(token, ip, now, why) -> None:
    book = TicketBook()
    t = issue(book)
    assert reason(book.check, token or t.token, ip=ip, now=now) == why
    assert len(book) == 1 and book.check(t.token, ip="10.0.0.1", now=1.0) is t  # still there, still usable


def test_tickets_bounded_per_peer_and_in_total_and_expire() -> None:
    book = TicketBook(per_peer_max=2, total_max=3, ttl_s=10.0)
    rand = counter_bytes()
    issue(book, peer="A", rand=rand)
    issue(book, peer="A", rand=rand)
    assert reason(issue, book, peer="A", rand=rand) == Reason.LIMIT_EXCEEDED
    issue(book, peer="B", rand=rand)
    assert reason(issue, book, peer="C", rand=rand) == Reason.LIMIT_EXCEEDED  # the total
    assert len(book) == 3
    # Expired tickets free their room.
    issue(book, peer="A", now=10.0, rand=rand)
    assert len(book) == 1 and book.held_by("A") == 1


def test_tokens_used_are_remembered_within_a_bound() -> None:
    book = TicketBook(used_kept_max=2)
    rand = counter_bytes()
    used = []
    for _ in range(3):
        t = issue(book, rand=rand)
        book.redeem(t)
        used.append(t.token)
    assert reason(book.check, used[-1], ip="10.0.0.1", now=0) == Reason.REPLAYED
    assert reason(book.check, used[0], ip="10.0.0.1", now=0) == Reason.BAD_CONTENT  # forgotten: unknown


@pytest.mark.parametrize(("first", "count", "ok"), [
    (None, None, (0, 7)), (2, 3, (2, 3)), (0, 7, (0, 7)), (5, 3, None), (-1, 2, None), (0, 0, None), ("0", 1, None),
])
def test_ticket_range(first, count, ok) -> None:
    if ok is None:
        assert reason(bulk.ticket_range, 7, first, count) == Reason.BAD_SCHEMA
    else:
        assert bulk.ticket_range(7, first, count) == ok


def test_ticket_covers_only_its_range_and_the_request_cap() -> None:
    t = issue(TicketBook(), first=4, count=100)
    assert t.covers(4, 1) and t.covers(40, bulk.chunks_per_request_max)
    assert not t.covers(3, 2) and not t.covers(100, 5) and not t.covers(4, 0)
    assert not t.covers(4, bulk.chunks_per_request_max + 1)


# ------------------------------------------------------------- admission


def test_connection_gate_per_ip_and_total() -> None:
    gate = ConnectionGate(per_ip_max=2, total_max=3)
    assert gate.admit("a") and gate.admit("a") and not gate.admit("a")
    assert gate.admit("b") and not gate.admit("c")
    gate.release("a")
    assert gate.admit("c") and gate.open_count() == 3
    for ip in ("a", "b", "c"):
        gate.release(ip)
    assert gate.open_count() == 0 and gate.admit("a")


# ----------------------------------------------------------------- frames


def test_hello_opens_with_the_ticket_key_and_blob_only() -> None:
    t = issue(TicketBook())
    bulk.open_hello(t, bulk.seal_hello(t.key_up, SHA))
    assert len(bulk.seal_hello(t.key_up, SHA)) == bulk.HELLO_SEALED_BYTES
    assert reason(bulk.open_hello, t, bulk.seal_hello(bytes(32), SHA)) == Reason.BAD_SIGNATURE  # another key
    assert reason(bulk.open_hello, t, bulk.seal_hello(t.key_up, OTHER_SHA)) == Reason.BAD_CONTENT
    assert reason(bulk.open_hello, t, b"\x00" * bulk.HELLO_SEALED_BYTES) == Reason.BAD_SIGNATURE


def test_request_frames() -> None:
    t = issue(TicketBook(), count=10)
    up = AESGCM(t.key_up)
    assert bulk.open_request(up, 1, bulk.seal_request(up, 1, 2, 8), t) == (2, 8)
    assert reason(bulk.open_request, up, 2, bulk.seal_request(up, 1, 2, 8), t) == Reason.BAD_SIGNATURE  # replayed
    assert reason(bulk.open_request, up, 1, bulk.seal_request(up, 1, 8, 8), t) == Reason.BAD_SCHEMA  # outside
    assert reason(bulk.open_request, up, 1, b"x" * 100, t) == Reason.OVERSIZED


def test_chunk_frames_are_bound_to_their_counter_and_index() -> None:
    down = AESGCM(bytes(range(32)))
    sealed = bulk.seal_chunk(down, 5, 9, b"chunk")
    assert bulk.open_chunk(down, 5, 9, sealed) == b"chunk"
    assert reason(bulk.open_chunk, down, 6, 9, sealed) == Reason.BAD_SIGNATURE   # reordered
    assert reason(bulk.open_chunk, down, 5, 10, sealed) == Reason.BAD_SIGNATURE  # another chunk
    forged = bytearray(sealed)
    forged[0] ^= 1
    assert reason(bulk.open_chunk, down, 5, 9, forged) == Reason.BAD_SIGNATURE
    assert bulk.open_chunk(down, 0, 3, bulk.seal_chunk(down, 0, 3, b"")) == b""  # "I lack it"


def test_frame_length_bounds() -> None:
    assert bulk.frame_length(bulk.frame_header(100), 100) == 100
    assert reason(bulk.frame_length, bulk.frame_header(101), 100) == Reason.OVERSIZED
    assert reason(bulk.frame_length, bulk.frame_header(2**32 - 1), 1 << 22) == Reason.OVERSIZED
    assert reason(bulk.frame_length, bulk.frame_header(3), 100) == Reason.MALFORMED


def test_offer_validation() -> None:
    good = issue(TicketBook(), count=5).offer(4242)
    offer = Offer.from_obj(good, chunks=5)
    assert offer.port == 4242 and offer.covers(0, 5) and not offer.covers(4, 2)
    for bad in ({**good, "token": b"x"}, {**good, "key_up": b"k" * 31}, {**good, "port": 0},
                {**good, "port": 70000}, {**good, "count": 6}, {**good, "first": -1}, [1, 2], {**good, "port": "1"}):
        assert reason(Offer.from_obj, bad, chunks=5) == Reason.BAD_SCHEMA


# ------------------------------------------------------------------ choice


def test_bulk_choice_falls_back_per_provider() -> None:
    c = BulkChoice(fallbacks_max=1)
    c.offered("old", False, direct=True)
    c.offered("relayed", True, direct=False)
    c.offered("new", True, direct=True)
    c.offered("unreachable", True, direct=True)
    assert [p for p in ("old", "relayed", "new", "unreachable", "unknown") if c.use(p)] == ["new", "unreachable"]
    c.failed("unreachable", Fallback.CONNECT_FAILED)
    assert not c.use("unreachable") and c.use("new")
    assert c.fallbacks() == {"old": "not_offered", "relayed": "no_address", "unreachable": "connect_failed"}
