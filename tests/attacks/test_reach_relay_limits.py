"""Attack (#14): a peer abuses a network-run Circuit Relay v2 relay.

Real hosts on 127.0.0.1: a relay with small limits, a private node holding a
slot on it, an attacker and an honest client.  The attacker opens more
circuits than a source may hold, pushes more bytes through one circuit than
a circuit may carry, and holds an idle circuit past its duration.  Each time
it is refused or cut (a reset, not a slow drain), a peer that keeps hitting
limits is banned and disconnected, and the relay goes on serving the honest
client to the same private node."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import trio
from libp2p.exceptions import BaseLibp2pError
from reach_relay_helpers import ECHO, echo_through, relayed

from p2pgpu.core import RelayLimits
from p2pgpu.node._relay import HOP_PROTOCOL, OK, RESOURCE_LIMIT_EXCEEDED, HopMessage, PbPeer, _read, _write


async def _raw_connect(host: Any, relay: Any, dest: Any) -> tuple[int, Any]:
    """A CONNECT through the relay whose stream the attacker then keeps
    without ever finishing the handshake: it holds the circuit open."""
    stream = await host.new_stream(relay, [HOP_PROTOCOL])
    await _write(stream, HopMessage(type=HopMessage.CONNECT, peer=PbPeer(id=dest.to_bytes())))
    answer = await _read(stream, HopMessage)
    return answer.status, stream


async def test_circuits_over_the_per_source_limit_are_refused_and_the_source_is_banned() -> None:
    limits = RelayLimits(circuits_per_peer_max=2, circuits_per_destination_max=8, strikes_max=3,
                         strike_window_ms=60_000, ban_ms=60_000)
    async with AsyncExitStack() as ex, relayed(limits, ex=ex) as r:
        attacker, _ = await r.client(ex, b"a" * 32)
        await attacker.host.connect(_info(r.relay))
        rid, did = r.relay.host.get_id(), r.dest.host.get_id()
        statuses = []
        held = []
        for _ in range(3):
            status, stream = await _raw_connect(attacker.host, rid, did)
            statuses.append(status)
            held.append(stream)
        assert statuses == [OK, OK, RESOURCE_LIMIT_EXCEEDED]
        assert r.service.status()["circuits"] == 2
        # An honest client still reaches the same private node.
        honest, h_client = await r.client(ex, b"h" * 32)
        await h_client.dial(r.circuit, did, 20)
        assert await echo_through(honest.host, did, b"still served") == b"still served"
        # Two more refusals make three strikes: banned and disconnected.
        for _ in range(2):
            try:
                status, _s = await _raw_connect(attacker.host, rid, did)
            except BaseLibp2pError:
                break  # the relay already closed the connection
        with trio.fail_after(10):
            while r.relay.host.get_network().get_connections(attacker.host.get_id()):
                await trio.sleep(0.05)
        assert r.service.book.is_banned(attacker.peer_id, int(trio.current_time() * 1000))
        assert r.counts["relay_peers_banned"] >= 1
        # Banned: a fresh connection gets no circuit either.
        await attacker.host.connect(_info(r.relay))
        try:
            status, _s = await _raw_connect(attacker.host, rid, did)
        except BaseLibp2pError:
            status = -1  # refused and disconnected before the answer arrived
        assert status != OK
        # And the honest client is still served.
        assert await echo_through(honest.host, did, b"and again") == b"and again"


def _info(stack: Any) -> Any:
    import multiaddr
    from libp2p.peer.peerinfo import info_from_p2p_addr

    return info_from_p2p_addr(multiaddr.Multiaddr(stack.addrs()[0]))


async def test_a_circuit_over_its_byte_limit_is_cut_and_others_are_served() -> None:
    limits = RelayLimits(circuit_bytes_max=64 * 1024)
    async with AsyncExitStack() as ex, relayed(limits, ex=ex) as r:
        did = r.dest.host.get_id()
        attacker, a_client = await r.client(ex, b"a" * 32)
        conn = await a_client.dial(r.circuit, did, 20)
        got = b""
        with trio.fail_after(30):
            try:
                stream = await attacker.host.new_stream(did, [ECHO])
                for _ in range(32):  # 32 x 16 KiB = 512 KiB, 8x the circuit's allowance
                    await stream.write(b"x" * 16384)
                    got += await stream.read(65536)
            except BaseLibp2pError:
                pass  # cut: the relay reset the circuit under the stream
        assert len(got) < 64 * 1024
        assert r.counts["relay_circuit_cut:bytes"] == 1
        with trio.fail_after(10):
            while not conn.is_closed:
                await trio.sleep(0.05)
        assert r.service.status()["circuits"] == 0
        honest, h_client = await r.client(ex, b"h" * 32)
        await h_client.dial(r.circuit, did, 20)
        assert await echo_through(honest.host, did, b"y" * 20000) == b"y" * 20000


async def test_an_idle_circuit_is_cut_at_its_duration() -> None:
    limits = RelayLimits(circuit_duration_ms_max=1500)
    async with AsyncExitStack() as ex, relayed(limits, ex=ex) as r:
        did = r.dest.host.get_id()
        _attacker, a_client = await r.client(ex, b"a" * 32)
        conn = await a_client.dial(r.circuit, did, 20)
        with trio.fail_after(15):
            while not conn.is_closed:
                await trio.sleep(0.1)
        assert r.counts["relay_circuit_cut:duration"] == 1
        assert r.service.status()["circuits"] == 0
