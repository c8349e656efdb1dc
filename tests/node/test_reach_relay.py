"""Circuit Relay v2 between real hosts on 127.0.0.1 (``p2pgpu/node/_relay.py``):
a private node reserves a slot, a stranger dials it through the relay, and
streams flow over the relayed connection, which both sides see as relayed."""

from __future__ import annotations

import sys
from contextlib import AsyncExitStack
from pathlib import Path

from p2pgpu.core import RelayLimits
from p2pgpu.node._holepunch import connection_kind

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "attacks"))
from reach_relay_helpers import echo_through, relayed


async def test_dial_through_a_relay_and_stream_over_it() -> None:
    async with AsyncExitStack() as ex, relayed(RelayLimits(), ex=ex) as r:
        assert r.circuit.endswith(f"/p2p-circuit/p2p/{r.dest.peer_id}")
        assert f"/p2p/{r.relay.peer_id}/" in r.circuit
        src, client = await r.client(ex, b"s" * 32)
        conn = await client.dial(r.circuit, r.dest.host.get_id(), 20)
        assert connection_kind(conn) == "relayed"
        assert await echo_through(src.host, r.dest.host.get_id(), b"hello through the relay") == \
            b"hello through the relay"
        dest_side = r.dest.host.get_network().connections.get(src.host.get_id(), [])
        assert [connection_kind(c) for c in dest_side] == ["relayed"]
        assert r.admitted == [src.peer_id]  # admitted by the remote peer, not the relay's IP
        assert r.service.status()["circuits"] == 1
        assert r.service.bytes_relayed > 0


async def test_no_reservation_no_circuit() -> None:
    """A peer without a slot on the relay cannot be reached through it."""
    async with AsyncExitStack() as ex, relayed(RelayLimits(), ex=ex) as r:
        other, _ = await r.client(ex, b"o" * 32)
        _src, client = await r.client(ex, b"s" * 32)
        fake = r.circuit.replace(r.dest.peer_id, other.peer_id)
        try:
            await client.dial(fake, other.host.get_id(), 20)
        except Exception as exc:  # noqa: BLE001 - the type is checked below
            assert type(exc).__name__ == "RelayDialFailed" and "no_reservation" in str(exc)
        else:
            raise AssertionError("a circuit to a peer without a reservation was opened")
