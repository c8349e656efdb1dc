"""The bounded DHT stores (``node/_dhtstore.py``, #18.5).

Values: only our namespace (strict), a size limit per record, at most N
records and B bytes in all and K per peer that put them; accounting holds
however py-libp2p deletes entries; our own lookups are never refused (just
not cached).  Providers: a key quota per provider, totals, and a key must be
one of the provider's advertised classes when its advert is known.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.kad_dht.pb.kademlia_pb2 import Record
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.records.utils import InvalidRecordType
from libp2p.records.validator import NamespacedValidator, Validator
from multiaddr import Multiaddr

from p2pgpu.node._dhtstore import (
    BoundedProviderStore,
    BoundedValueStore,
    DhtLimits,
    StoreFull,
    current_sender,
)

HOST = new_host(key_pair=create_new_key_pair(b"h" * 32))
ADDR = Multiaddr("/ip4/127.0.0.1/tcp/4001")


def peer(n: int) -> ID:
    return ID.from_pubkey(create_new_key_pair(bytes([n]) * 32).public_key)


@contextmanager
def sent_by(pid: str) -> Iterator[None]:
    token = current_sender.set(pid)
    try:
        yield
    finally:
        current_sender.reset(token)


def record(key: bytes, size: int) -> Record:
    r = Record()
    r.key, r.value = key, b"v" * size
    return r


def values(**kw: int) -> BoundedValueStore:
    return BoundedValueStore(HOST, HOST.get_id(), DhtLimits(**kw))


class _Ours(Validator):
    def validate(self, key: str, value: bytes) -> None:
        return None

    def select(self, key: str, values: list[bytes]) -> int:
        return 0


def test_only_our_namespace_is_accepted() -> None:
    v = NamespacedValidator({"p2pgpu": _Ours()}, strict_validation=True)  # as open_stack builds it
    v.validate("/p2pgpu/a/00", b"x")
    for key in ("/evil/x", "plainkey", "/pk/abc", "/ipns/abc"):
        with pytest.raises(InvalidRecordType):
            v.validate(key, b"x")


def test_a_record_over_the_size_limit_is_refused() -> None:
    s = values(record_bytes_max=100)
    with sent_by("A"):
        s.put_record(b"/p2pgpu/a/1", record(b"/p2pgpu/a/1", 100))
        with pytest.raises(StoreFull):
            s.put_record(b"/p2pgpu/a/2", record(b"/p2pgpu/a/2", 101))
    assert s.refused == {"value_too_large": 1}


def test_per_peer_count_and_byte_limits() -> None:
    s = values(values_per_peer_max=2, values_max=5, value_bytes_max=10_000, record_bytes_max=4_000)
    keys = [f"/p2pgpu/a/{i}".encode() for i in range(10)]
    with sent_by("A"):
        s.put_record(keys[0], record(keys[0], 10))
        s.put_record(keys[1], record(keys[1], 10))
        with pytest.raises(StoreFull):
            s.put_record(keys[2], record(keys[2], 10))
        s.put_record(keys[1], record(keys[1], 20))  # an update of its own key is not a new record
    with sent_by("B"):
        s.put_record(keys[2], record(keys[2], 10))
        s.put_record(keys[3], record(keys[3], 3_900))
    with sent_by("C"):
        s.put_record(keys[4], record(keys[4], 3_900))
        with pytest.raises(StoreFull):  # 5 records: the store is full
            s.put_record(keys[5], record(keys[5], 10))
    with sent_by("D"), pytest.raises(StoreFull):
        s.put_record(keys[6], record(keys[6], 10))
    assert s.refused == {"per_peer": 1, "count": 2}
    assert len(s.store) == 5 and s.store.per_sender == {"A": 2, "B": 2, "C": 1}
    # Bytes: free a record, then one that would pass the byte budget is refused.
    s.remove(keys[0])
    with sent_by("D"), pytest.raises(StoreFull):
        s.put_record(keys[7], record(keys[7], 3_000))
    assert s.refused["bytes"] == 1


def test_accounting_survives_every_way_the_library_deletes() -> None:
    s = values()
    with sent_by("A"):
        for i in range(4):
            k = f"/p2pgpu/a/{i}".encode()
            s.put_record(k, record(k, 100))
    assert s.store.bytes == sum(len(k) + 100 for k in s.store)
    s.remove(b"/p2pgpu/a/0")
    del s.store[b"/p2pgpu/a/1"]
    s.store.pop(b"/p2pgpu/a/2")
    k3 = b"/p2pgpu/a/3"
    s.store[k3] = (s.store[k3][0], time.time() - 1)  # made to expire
    assert s.cleanup_expired() == 1
    assert len(s.store) == 0 and s.store.bytes == 0 and not s.store.per_sender


def test_our_own_records_and_lookups_are_never_refused() -> None:
    s = values(values_max=1)
    with sent_by("A"):
        s.put_record(b"/p2pgpu/a/1", record(b"/p2pgpu/a/1", 10))
    s.put(b"/p2pgpu/a/me", b"our advert")  # our own put: never refused
    s.put_record(b"/p2pgpu/a/2", record(b"/p2pgpu/a/2", 10))  # a lookup's result: not cached, no error
    assert sorted(s.store) == [b"/p2pgpu/a/1", b"/p2pgpu/a/me"]


def providers(classes: dict[str, list[bytes]] | None = None, **kw: int) -> BoundedProviderStore:
    known = classes or {}
    return BoundedProviderStore(HOST, None, DhtLimits(**kw), lambda pid: known.get(pid))


def test_provider_keys_per_peer_and_in_total() -> None:
    s = providers(provider_keys_per_peer_max=2, provider_keys_max=3)
    a, b = peer(1), peer(2)
    for k in (b"k1", b"k2", b"k3"):
        s.add_provider(k, PeerInfo(a, [ADDR]))
    assert sorted(s.providers) == [b"k1", b"k2"]
    s.add_provider(b"k2", PeerInfo(b, [ADDR]))
    s.add_provider(b"k3", PeerInfo(b, [ADDR]))
    s.add_provider(b"k4", PeerInfo(peer(5), [ADDR]))  # a fourth key: over the total
    assert sorted(s.providers) == [b"k1", b"k2", b"k3"]
    assert s.refused == {"per_peer": 1, "keys": 1}
    s.add_provider(b"k9", PeerInfo(HOST.get_id(), [ADDR]))  # our own: never refused
    assert b"k9" in s.providers


def test_a_known_advert_limits_a_provider_to_its_classes() -> None:
    a = peer(3)
    s = providers({a.to_base58(): [b"h100"]})
    s.add_provider(b"h100", PeerInfo(a, [ADDR]))
    s.add_provider(b"a100", PeerInfo(a, [ADDR]))
    assert list(s.providers) == [b"h100"] and s.refused == {"not_its_class": 1}


def test_expired_provider_records_free_the_quota() -> None:
    s = providers(provider_keys_per_peer_max=1)
    a = peer(4)
    s.add_provider(b"k1", PeerInfo(a, [ADDR]))
    s.providers[b"k1"][a.to_base58()].timestamp = 0  # long expired
    s.cleanup_expired()
    s.add_provider(b"k2", PeerInfo(a, [ADDR]))
    assert list(s.providers) == [b"k2"] and not s.refused
