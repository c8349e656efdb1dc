"""config.toml and ``--announce`` for reachability (``node/_reach_node.reach_config``):
good values make a ReachConfig; every bad one is refused with a message
that names the key."""

from __future__ import annotations

import pytest

from p2pgpu.home import HomeError
from p2pgpu.node._reach import expand_listen
from p2pgpu.node._reach_node import reach_config


def test_defaults_and_settings() -> None:
    c = reach_config({}, announce=[], bootstrap=[])
    assert c.relay_service == "auto" and c.relays_target == 2 and c.hole_punching
    assert c.reach_limits.confirmations == 3
    c = reach_config({"relay_service": "off", "relays_target": 3, "relay_circuit_duration_s_max": 60,
                      "relay_circuit_bytes_max": 4096, "announce": ["/ip4/203.0.113.7/tcp/4001"],
                      "hole_punching": False, "reach_confirmations": 2},
                     announce=["/dns4/gpu.example.org/tcp/4001"], bootstrap=[])
    assert c.relay_service == "off" and c.relays_target == 3 and not c.hole_punching
    assert c.relay_limits.circuit_duration_ms_max == 60_000 and c.relay_limits.circuit_bytes_max == 4096
    assert c.announce == ("/ip4/203.0.113.7/tcp/4001", "/dns4/gpu.example.org/tcp/4001")
    assert c.reach_limits.confirmations == 2


@pytest.mark.parametrize(("extra", "announce", "key"), [
    ({"relay_service": "sometimes"}, [], "relay_service"),
    ({"relays_target": 99}, [], "relays_target"),
    ({"relays_target": "2"}, [], "relays_target"),
    ({"relay_circuit_bytes_max": 10}, [], "relay_circuit_bytes_max"),
    ({"relay_circuits_max": 0}, [], "relay_circuits_max"),
    ({"hole_punching": "yes"}, [], "hole_punching"),
    ({"announce": "/ip4/203.0.113.7/tcp/4001"}, [], "announce"),
    ({}, ["/ip4/0.0.0.0/tcp/4001"], "announce"),  # nobody can dial a wildcard
    ({}, ["/ip4/203.0.113.7/udp/4001/quic"], "announce"),
    ({}, ["/ip4/203.0.113.7/tcp/4001/p2p/QmRelay1111111111111111111/p2p-circuit"], "announce"),
    ({"reach_confirmations": 0}, [], "reach_confirmations"),
])
def test_bad_values_are_refused_with_the_key(extra: dict, announce: list[str], key: str) -> None:
    with pytest.raises(HomeError, match=key):
        reach_config(extra, announce=announce, bootstrap=[])


def test_wildcard_listen_addresses_expand_to_interfaces() -> None:
    ifaces = ["127.0.0.1", "10.0.1.2", "::1", "2001:db8::5", "fe80::1"]
    got = expand_listen(["/ip4/0.0.0.0/tcp/4001", "/ip6/::/tcp/4001", "/ip4/198.51.100.2/tcp/5"], ifaces)
    assert got == ["/ip4/127.0.0.1/tcp/4001", "/ip4/10.0.1.2/tcp/4001", "/ip6/::1/tcp/4001",
                   "/ip6/2001:db8::5/tcp/4001", "/ip4/198.51.100.2/tcp/5"]


async def test_a_node_listens_on_all_ipv4_and_ipv6_interfaces() -> None:
    """``--listen /ip4/0.0.0.0/tcp/0 --listen /ip6/::/tcp/0``: peers reach it
    over IPv4 and over IPv6."""
    from contextlib import AsyncExitStack

    import multiaddr
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import PeerInfo

    from p2pgpu.node._reach import interface_addresses
    from p2pgpu.node._stack import open_stack

    if "::1" not in interface_addresses():
        pytest.skip("no IPv6 loopback on this machine")
    async with AsyncExitStack() as ex:
        node = await ex.enter_async_context(open_stack(b"w" * 32, ["/ip4/0.0.0.0/tcp/0", "/ip6/::/tcp/0"],
                                                       dht_validators={}))
        listen = expand_listen([str(a) for a in node.host.get_transport_addrs()], interface_addresses())
        v4 = next(a for a in listen if a.startswith("/ip4/127.0.0.1/"))
        v6 = next(a for a in listen if a.startswith("/ip6/::1/"))
        for i, addr in enumerate((v4, v6)):
            peer = await ex.enter_async_context(open_stack(bytes([65 + i]) * 32, ["/ip4/127.0.0.1/tcp/0"],
                                                           dht_validators={}))
            await peer.host.connect(PeerInfo(ID.from_base58(node.peer_id), [multiaddr.Multiaddr(addr)]))
            # PeerInfo named only this address: the connection came over it.
            assert peer.host.get_network().get_connections(ID.from_base58(node.peer_id)), addr
