"""The advert book's flood defences (#12.2) at their edges (#19): protection
of our own and already protected peers, the eviction counter, the largest
share of an empty book, expiry of our own advert at its exact instant, the
live count at its instant, and that forgotten peers leave nothing behind in
the book's indexes (a flood that expires must not leave memory in use).
Found by a mutation run of ``core/_advert.py`` after #12.2 landed; the
last section by the sample of 300 (its own verifier, the default shares,
our own advert's room, the local source, an image's length)."""

from __future__ import annotations

import dataclasses
import random

import pytest
from test_advert import ALICE, BOB, MALLORY, T0, TTL, book, make_advert, signed_body, wire

from p2pgpu.core import Advert, AdvertBook, Identity, PeerMisbehaved, Reason, sign_advert
from p2pgpu.core._advert import verify_advert, verify_advert_bytes

PEERS = [Identity.from_rng(random.Random(7000 + i)) for i in range(8)]
OWN = Identity.from_rng(random.Random(7100))


def test_protecting_our_own_or_an_already_protected_peer_is_true_and_adds_nothing() -> None:
    b = book(adverts_max=4)  # protected_max: 2
    b.add_own(sign_advert(OWN, make_advert(OWN)))
    assert b.protect(OWN.peer_id) is True
    assert b.protected() == []  # our own advert needs no protection and takes no slot
    p0, p1, p2 = (p.peer_id for p in PEERS[:3])
    assert b.protect(p0) is True and b.protect(p0) is True  # twice: still protected, one slot
    assert b.protect(p1) is True
    assert b.protected() == [p0, p1]
    assert b.protect(p2) is False  # the two slots are taken
    assert b.protect(p0) is True and b.protect(OWN.peer_id) is True  # full, yet these are protected already


def test_every_eviction_is_counted_once() -> None:
    b = book(adverts_max=2, adverts_per_forwarder_max=2)
    b.ingest(wire(PEERS[0]), T0, forwarder="F")
    b.ingest(wire(PEERS[1]), T0, forwarder="F")
    assert b.evicted == 0
    b.ingest(wire(PEERS[2]), T0, forwarder="G")  # F holds two more than G: F's newest goes
    assert b.evicted == 1 and sorted(b.adverts) == sorted([PEERS[0].peer_id, PEERS[2].peer_id])
    with pytest.raises(PeerMisbehaved, match="advert book is full"):
        b.ingest(wire(PEERS[3]), T0, forwarder="H")  # F and G hold one each: H is refused
    assert b.evicted == 1
    b2 = book(adverts_max=3, adverts_per_forwarder_max=3)
    for p in PEERS[:3]:
        b2.ingest(wire(p), T0, forwarder="F")
    b2.ingest(wire(PEERS[3]), T0, forwarder="G")
    b2.ingest(wire(PEERS[4]), T0, forwarder="H")
    assert b2.evicted == 2


def test_the_largest_share_of_an_empty_book_is_zero() -> None:
    b = book(adverts_max=8)
    assert b.largest_share() == 0
    b.ingest(wire(PEERS[0]), T0, forwarder="F")
    assert b.largest_share() == 1
    b.ingest(wire(PEERS[1]), T0, forwarder="F")
    b.ingest(wire(PEERS[2]), T0, forwarder="G")
    assert b.largest_share() == 2
    b.protect(PEERS[0].peer_id)  # protected: in nobody's share
    assert b.largest_share() == 1
    b.expire(T0 + TTL)
    assert b.largest_share() == 0


def test_our_own_advert_expires_at_its_exact_instant_and_is_named_last() -> None:
    b = book(adverts_max=8)
    b.add_own(sign_advert(OWN, make_advert(OWN, expires_at_ms=T0 + 1_000)))
    b.ingest(wire(PEERS[1], expires_at_ms=T0 + 1_000), T0, forwarder="F")
    b.ingest(wire(PEERS[0], expires_at_ms=T0 + 1_000), T0, forwarder="F")
    assert b.expire(T0 + 999) == []
    assert OWN.peer_id in b.adverts
    gone = b.expire(T0 + 1_000)
    assert gone == [*sorted([PEERS[0].peer_id, PEERS[1].peer_id]), OWN.peer_id]
    assert b.adverts == {}
    assert b.expire(T0 + 2_000) == []


def test_the_live_count_at_its_instant() -> None:
    b = book(adverts_max=8)
    assert b.live_count(T0) == 0
    b.add_own(sign_advert(OWN, make_advert(OWN, expires_at_ms=T0 + 2_000)))
    b.ingest(wire(PEERS[0], expires_at_ms=T0 + 1_000), T0, forwarder="F")
    b.ingest(wire(PEERS[1], expires_at_ms=T0 + 1_001), T0, forwarder="G")
    assert b.live_count(T0) == 3
    assert b.live_count(T0 + 999) == 3
    assert b.live_count(T0 + 1_000) == 2  # expires_at_ms is the first instant it is dead
    assert b.live_count(T0 + 1_001) == 1
    assert b.live_count(T0 + 2_000) == 0
    assert b.live_count(T0 + 1_000) == len(b.live(T0 + 1_000))


def test_forgotten_peers_leave_nothing_in_the_books_indexes() -> None:
    b = book(adverts_max=4, adverts_per_forwarder_max=4)
    for i, p in enumerate(PEERS[:4]):
        b.ingest(wire(p, expires_at_ms=T0 + 1_000), T0, forwarder="FG"[i % 2])
    b.ingest(wire(PEERS[4]), T0, forwarder="H")  # evicts one
    assert b.evicted == 1
    b.expire(T0 + 1_000)
    assert list(b.adverts) == [PEERS[4].peer_id]
    assert list(b._first_seen) == [PEERS[4].peer_id]
    assert list(b._forwarder_of) == [PEERS[4].peer_id]
    assert b.held_by("F") == b.held_by("G") == 0 and b.held_by("H") == 1
    assert [sa.advert.peer_id for sa in b.by_age(T0 + 1_000, 10)] == [PEERS[4].peer_id]


def _check_indexes(b: AdvertBook) -> None:
    """The book's indexes agree with each other and with the adverts it holds."""
    shares = {f: len(ids) for f, ids in b._by_forwarder.items()}
    assert all(shares.values()), "a forwarder with no identities is forgotten"
    assert b._count_max == max(shares.values(), default=0)
    assert {n: sorted(fs) for n, fs in b._buckets.items()} == {
        n: sorted(f for f, k in shares.items() if k == n) for n in set(shares.values())}
    evictable = {p for ids in b._by_forwarder.values() for p in ids}
    assert evictable == set(b.adverts) - set(b._protected) - {b.own_peer_id}
    assert set(b._first_seen) == set(b.adverts) - {b.own_peer_id}
    assert set(b._forwarder_of) <= set(b.adverts)
    assert b.largest_share() == b._count_max


def test_the_indexes_stay_consistent_through_a_random_run() -> None:
    rng = random.Random(19)
    pool = [Identity.from_rng(random.Random(7200 + i)) for i in range(24)]
    b = book(adverts_max=8, adverts_per_forwarder_max=4)
    for step in range(400):
        now = T0 + step * 100
        op = rng.random()
        who = rng.choice(pool)
        seq = step + 1
        if op < 0.55:
            try:
                b.ingest(wire(who, seq=seq, issued_at_ms=now, expires_at_ms=now + rng.choice((500, 5_000))), now,
                         forwarder=rng.choice("FGHK"))
            except PeerMisbehaved:
                pass
        elif op < 0.7:
            b.protect(who.peer_id)
        elif op < 0.85:
            b.unprotect(who.peer_id)
        else:
            b.expire(now)
        _check_indexes(b)
    b.expire(T0 + 10**9)
    _check_indexes(b)
    assert b.adverts == {} and b._buckets == {} and b._by_forwarder == {} and b._count_max == 0


def test_our_own_advert_first_heard_from_the_network_leaves_every_index() -> None:
    b = book(adverts_max=8)
    b.ingest(wire(OWN), T0, forwarder="F")
    b.protect(OWN.peer_id)
    b.add_own(sign_advert(OWN, make_advert(OWN, seq=2)))
    assert b.protected() == [] and OWN.peer_id not in b._first_seen and OWN.peer_id not in b._forwarder_of
    _check_indexes(b)


def test_a_market_sync_serves_only_adverts_alive_at_that_instant() -> None:
    b = book(adverts_max=8)
    b.ingest(wire(PEERS[0], expires_at_ms=T0 + 1_000), T0, forwarder="F")
    b.ingest(wire(PEERS[1], expires_at_ms=T0 + 1_001), T0, forwarder="F")
    assert [sa.advert.peer_id for sa in b.by_age(T0 + 999, 10)] == [PEERS[0].peer_id, PEERS[1].peer_id]
    assert [sa.advert.peer_id for sa in b.by_age(T0 + 1_000, 10)] == [PEERS[1].peer_id]


def test_live_adverts_are_shown_through_the_view() -> None:
    seen: list[tuple[str, int]] = []

    def view(adv: Advert, now_ms: int) -> Advert:
        seen.append((adv.peer_id, now_ms))
        return dataclasses.replace(adv, gpus_free=0)

    b = book(adverts_max=8, view=view)
    b.ingest(wire(PEERS[0]), T0, forwarder="F")
    (shown,) = b.live(T0 + 5)
    assert shown.gpus_free == 0 and shown.peer_id == PEERS[0].peer_id
    assert seen == [(PEERS[0].peer_id, T0 + 5)]
    assert b.market(T0 + 5) == [shown]


def test_every_stored_advert_is_counted_as_accepted_updates_too() -> None:
    b = book(adverts_max=8)
    b.ingest(wire(PEERS[0], seq=1), T0, forwarder="F")
    b.ingest(wire(PEERS[0], seq=2), T0, forwarder="F")  # an update of a known peer
    b.ingest(wire(PEERS[1], seq=1), T0, forwarder="G")
    b.ingest(wire(PEERS[0], seq=3), T0, forwarder="G")
    assert b.accepted == 4


# -- written against the sample of 300 (seed 1) of core/_advert.py at 21b91e2 ----------------


def test_advert_bytes_are_checked_with_the_verifier_handed_in() -> None:
    """``verify_advert_bytes__mutmut_12``, ``_15``: the verifier given (the
    simulator's memoised one, a test's) is the one that checks."""
    def refuse(key: bytes, message: bytes, signature: bytes) -> None:
        raise PeerMisbehaved(Reason.BAD_SIGNATURE, "refused by this test")

    with pytest.raises(PeerMisbehaved, match="refused by this test"):
        verify_advert_bytes(wire(), verify=refuse)
    assert verify_advert_bytes(wire()).advert == make_advert()


@pytest.mark.parametrize(("adverts_max", "share"), [(2, 1), (7, 1), (8, 2), (11, 2), (12, 3)])
def test_a_forwarders_default_share_is_a_quarter_of_the_book_at_least_one(adverts_max: int, share: int) -> None:
    """``__post_init____mutmut_12`` (at least 2 instead of 1)."""
    assert book(adverts_max=adverts_max).adverts_per_forwarder_max == share


def test_protected_peers_are_at_most_half_the_book_in_whole_peers() -> None:
    """``__post_init____mutmut_32`` (``//`` to ``/``: half of an odd book)."""
    b = book(adverts_max=5, protected_max=10)
    assert b.protected_max == 2 and isinstance(b.protected_max, int)
    assert book(adverts_max=5, protected_max=1).protected_max == 1


def test_our_own_advert_takes_no_room_in_the_book() -> None:
    """``_size__mutmut_1``: a book of 2 holds our own advert and two others."""
    b = book(adverts_max=2, adverts_per_forwarder_max=1)
    b.add_own(sign_advert(ALICE, make_advert(ALICE)))
    b.ingest(wire(BOB), T0, forwarder="f1")
    b.ingest(wire(MALLORY), T0, forwarder="f2")
    assert sorted(b.adverts) == sorted(i.peer_id for i in (ALICE, BOB, MALLORY)) and b.evicted == 0


def test_an_advert_from_no_forwarder_is_attributed_to_the_local_source() -> None:
    """``ingest__mutmut_1``: the default forwarder is ``""`` (a local source)."""
    b = book()
    b.ingest(wire(BOB), T0)
    assert b.held_by("") == 1 and b.held_by("XXXX") == 0


def test_an_image_of_65_characters_is_refused_by_the_schema() -> None:
    """``Advert.from_obj__mutmut_199``: each image is at most 64 characters,
    refused by the schema reader with the field named (the constructor's
    own check would refuse it later with other words)."""
    body = dict(make_advert(runtimes=("process", "oci")).to_obj())
    body["images"] = ["a" * 65]
    with pytest.raises(PeerMisbehaved, match=r"images\[0\]: must be a string of 1 to 64 characters"):
        verify_advert_bytes(signed_body(body))


# -- written against the whole run of core/_advert.py at edbee40 ------------------------------


def _refuse(key: bytes, message: bytes, signature: bytes) -> None:
    raise PeerMisbehaved(Reason.BAD_SIGNATURE, "refused by this test")


def test_adverts_are_time_checked_and_booked_with_the_verifier_handed_in() -> None:
    """``verify_advert__mutmut_3``, ``_5`` and ``AdvertBook.check_record__mutmut_4``,
    ``_7``: the verifier given to ``verify_advert`` and to the book is the one
    that checks."""
    with pytest.raises(PeerMisbehaved, match="refused by this test"):
        verify_advert(wire(), now_ms=T0, verify=_refuse)
    with pytest.raises(PeerMisbehaved, match="refused by this test"):
        book(verify=_refuse).ingest(wire(), T0)


def test_a_book_may_protect_no_peer_at_all() -> None:
    """``__post_init____mutmut_27`` (at least one protected peer)."""
    b = book(protected_max=0)
    assert b.protected_max == 0 and not b.protect(BOB.peer_id)
