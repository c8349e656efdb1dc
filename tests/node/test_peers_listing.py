"""`p2pgpu peers` lists every connected peer, also one the peerstore holds no
address for (a relayed connection, or one made a moment ago): py-libp2p's
``PeerStore.addrs`` raises PeerStoreError for such a peer, and the control call
used to fail with an internal error (seen once in the hole-punching netns test).
A real PeerStore; the rest of the node is the few attributes ``_peers`` reads."""

from __future__ import annotations

from types import SimpleNamespace

import multiaddr
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.peer.peerstore import PeerStore, PeerStoreError

from p2pgpu.core._reputation import Reputation
from p2pgpu.node._daemon import Node


def _peer() -> ID:
    return ID.from_pubkey(create_new_key_pair().public_key)


def test_a_connected_peer_without_a_stored_address_is_listed_without_addresses() -> None:
    store = PeerStore()
    known, unknown = _peer(), _peer()
    store.add_addrs(known, [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/4001")], 3600)
    try:
        store.addrs(unknown)
    except PeerStoreError:
        pass  # the case under test: the store really has nothing for it
    else:
        raise AssertionError("the peerstore was expected to raise for a peer it never saw")
    host = SimpleNamespace(get_peerstore=lambda: store, get_connected_peers=lambda: [known, unknown],
                           get_network=lambda: SimpleNamespace(get_connections=lambda peer: []))
    node = SimpleNamespace(stack=SimpleNamespace(host=host), reach=None, latency_ms={},
                           receipts=SimpleNamespace(last=Reputation(scores={}, refused=[])))
    rows = trio.run(Node._peers, node, {})  # type: ignore[arg-type]
    by_id = {row["peer_id"]: row for row in rows}
    assert set(by_id) == {known.to_base58(), unknown.to_base58()}
    assert by_id[known.to_base58()]["addrs"] == ["/ip4/127.0.0.1/tcp/4001"]
    assert by_id[unknown.to_base58()]["addrs"] == []
    assert by_id[unknown.to_base58()]["connections"] == []
