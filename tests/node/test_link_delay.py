"""The injected link delay of test networks (``p2pgpu.node._linkdelay``).

Two layers: the delayed connection alone over an in-memory stream, on trio's
virtual clock (order kept, nothing handed up before its delay, end of stream
and errors after the data, a bounded buffer, close ends the pump); and two
real hosts of the node's stack on 127.0.0.1, where a message takes at least
the injected delay and a stack without the setting is left as it was.  The
only timing asserted is the lower bound the delay guarantees.
"""

from __future__ import annotations

import logging
import random
from contextlib import AsyncExitStack
from typing import Any

import multiaddr
import pytest
import trio
import trio.testing
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.transport.upgrader import TransportUpgrader

from p2pgpu.node._linkdelay import (
    DelayedConnection,
    LinkDelay,
    LinkDelaySpec,
    chunks_max,
    link_delay_from_config,
)
from p2pgpu.node._stack import StackConfig, open_stack

PROTOCOL = TProtocol("/p2pgpu/test/link-delay/1")


class FakeRaw:
    """The raw-connection surface DelayedConnection uses, over a memory stream."""

    is_initiator = True

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.closed = False
        self.fail: Exception | None = None

    async def read(self, n: int | None = None) -> bytes:
        if self.fail is not None:
            raise self.fail
        return bytes(await self.stream.receive_some(n))

    async def write(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def close(self) -> None:
        self.closed = True
        await self.stream.aclose()

    def get_remote_address(self) -> tuple[str, int]:
        return ("127.0.0.1", 1)

    def get_transport_addresses(self) -> list[Any]:
        return []

    def get_connection_type(self) -> str:
        return "direct"


def pair(spec: LinkDelaySpec) -> tuple[Any, DelayedConnection, FakeRaw]:
    a, b = trio.testing.memory_stream_pair()
    raw = FakeRaw(b)
    return a, DelayedConnection(raw, spec, random.Random(1)), raw  # type: ignore[arg-type]


# ------------------------------------------------------------ the connection alone


async def test_each_chunk_waits_its_delay_and_order_is_kept(autojump_clock: Any) -> None:
    spec = LinkDelaySpec(link_ms=100, jitter_pct=50)
    sender, conn, _ = pair(spec)
    sent: list[tuple[float, bytes]] = []
    got: list[tuple[float, bytes]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.pump)

        async def send() -> None:
            for i in range(40):
                data = bytes([i]) * (1 + i)
                sent.append((trio.current_time(), data))
                await sender.send_all(data)
                await trio.sleep(0.007 * (i % 5))
            await sender.aclose()

        nursery.start_soon(send)
        while True:
            data = await conn.read(1000)
            if not data:
                break
            got.append((trio.current_time(), data))
    assert b"".join(d for _, d in got) == b"".join(d for _, d in sent)
    # Every byte is handed up at least link_ms * (1 - jitter) after it was sent.
    offset = 0
    starts = []
    for t, d in sent:
        starts.append((offset, t))
        offset += len(d)
    offset = 0
    for t, d in got:
        sent_at = max(st for off, st in starts if off < offset + len(d))
        assert t - sent_at >= 0.050 - 1e-9
        offset += len(d)


async def test_read_limit_splits_a_chunk(autojump_clock: Any) -> None:
    sender, conn, _ = pair(LinkDelaySpec(link_ms=10))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.pump)
        await sender.send_all(b"abcdef")
        t0 = trio.current_time()
        assert await conn.read(2) == b"ab"
        assert trio.current_time() - t0 >= 0.010
        assert await conn.read(None) == b"cdef"
        await sender.aclose()
        assert await conn.read(5) == b""
        assert await conn.read(5) == b""  # end of stream stays the end


async def test_error_after_the_data(autojump_clock: Any) -> None:
    sender, conn, raw = pair(LinkDelaySpec(link_ms=20))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.pump)
        await trio.sleep(0.001)  # the pump waits in the socket read
        raw.fail = ConnectionResetError("peer reset")  # its next read fails
        await sender.send_all(b"last words")
        assert await conn.read(100) == b"last words"
        with pytest.raises(ConnectionResetError):
            await conn.read(100)
        with pytest.raises(ConnectionResetError):
            await conn.read(100)


async def test_a_slow_reader_stops_the_pump(autojump_clock: Any) -> None:
    sender, conn, _ = pair(LinkDelaySpec(link_ms=1))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.pump)
        with trio.move_on_after(5):
            for _ in range(chunks_max * 4):
                await sender.send_all(b"y" * 100)
                await trio.sleep(0.001)
        # The pump holds at most chunks_max chunks plus the one it is sending.
        assert conn._recv.statistics().current_buffer_used <= chunks_max
        await conn.close()


async def test_close_ends_the_pump_and_the_reader(autojump_clock: Any) -> None:
    sender, conn, raw = pair(LinkDelaySpec(link_ms=50))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.pump)
        await trio.sleep(0.01)
        await conn.close()
        assert raw.closed
        assert await conn.read(10) == b""
    await sender.aclose()


async def test_wrap_outside_installed_is_refused() -> None:
    _, _conn, raw = pair(LinkDelaySpec(link_ms=5))
    with pytest.raises(RuntimeError):
        LinkDelay(LinkDelaySpec(link_ms=5)).wrap(raw)  # type: ignore[arg-type]


# ------------------------------------------------------------ configuration


def test_spec_limits() -> None:
    for bad in (0, -1, 10_001):
        with pytest.raises(ValueError):
            LinkDelaySpec(link_ms=bad)
    for bad in (-1, 101):
        with pytest.raises(ValueError):
            LinkDelaySpec(link_ms=5, jitter_pct=bad)


def test_config_default_is_no_delay(caplog: pytest.LogCaptureFixture) -> None:
    assert link_delay_from_config({}, allow=True, network="local", peer_id="p") is None
    assert link_delay_from_config({"link_delay_ms": 0}, allow=True, network="local", peer_id="p") is None
    with caplog.at_level(logging.WARNING, logger="p2pgpu.node"):
        assert link_delay_from_config({"link_delay_ms": 25}, allow=False, network="mainnet", peer_id="p") is None
    assert "test networks only" in caplog.text


def test_config_values_and_seed() -> None:
    spec = link_delay_from_config({"link_delay_ms": 25, "link_jitter_pct": 10}, allow=True, network="local",
                                  peer_id="peer-a")
    assert spec is not None and spec.link_ms == 25 and spec.jitter_pct == 10
    again = link_delay_from_config({"link_delay_ms": 25}, allow=True, network="local", peer_id="peer-a")
    other = link_delay_from_config({"link_delay_ms": 25}, allow=True, network="local", peer_id="peer-b")
    assert again is not None and other is not None and again.seed == spec.seed != other.seed
    fixed = link_delay_from_config({"link_delay_ms": 25, "link_delay_seed": 7}, allow=True, network="local",
                                   peer_id="peer-a")
    assert fixed is not None and fixed.seed == 7
    for extra in ({"link_delay_ms": "25"}, {"link_delay_ms": True}, {"link_delay_ms": 5, "link_jitter_pct": "x"},
                  {"link_delay_ms": 5, "link_delay_seed": 1.5}, {"link_delay_ms": 20_000}):
        with pytest.raises(ValueError):
            link_delay_from_config(extra, allow=True, network="local", peer_id="p")


# ------------------------------------------------------------ real hosts on 127.0.0.1


async def one_message(delay_a: LinkDelaySpec | None, delay_b: LinkDelaySpec | None) -> tuple[float, Any, Any]:
    """Host B sends one frame to host A on an open stream; returns the seconds
    from B's write to A's read, and both stacks' upgraders."""
    got: dict[str, Any] = {}
    done = trio.Event()
    async with AsyncExitStack() as ex:
        a = await ex.enter_async_context(open_stack(b"a" * 32, ["/ip4/127.0.0.1/tcp/0"], dht_validators={},
                                                    config=StackConfig(link_delay=delay_a)))
        b = await ex.enter_async_context(open_stack(b"b" * 32, ["/ip4/127.0.0.1/tcp/0"], dht_validators={},
                                                    config=StackConfig(link_delay=delay_b)))

        async def handler(stream: Any) -> None:
            first = await stream.read(4)
            if first == b"warm":  # the stream is open; the timed message follows
                await stream.write(b"ok")
                data = await stream.read(4)
                got["at"] = trio.current_time()
                got["data"] = data
                done.set()
            await stream.close()

        a.host.set_stream_handler(PROTOCOL, handler)
        await b.host.connect(info_from_p2p_addr(multiaddr.Multiaddr(a.addrs()[0])))
        with trio.fail_after(30):
            stream = await b.host.new_stream(a.host.get_id(), [PROTOCOL])
            await stream.write(b"warm")
            assert await stream.read(2) == b"ok"
            t0 = trio.current_time()
            await stream.write(b"ping")
            await done.wait()
        await stream.close()
        assert got["data"] == b"ping"
        return got["at"] - t0, a.host.get_network().upgrader, b.host.get_network().upgrader  # type: ignore[attr-defined]


async def test_a_message_takes_at_least_the_injected_delay() -> None:
    spec = LinkDelaySpec(link_ms=120, jitter_pct=10, seed=3)
    elapsed_s, up_a, _ = await one_message(spec, spec)
    assert elapsed_s >= 0.120 * 0.9
    # The host's upgrader is restored when the stack closes.
    assert up_a.upgrade_security.__func__ is TransportUpgrader.upgrade_security


async def test_only_the_receiver_delays() -> None:
    elapsed_s, _, _ = await one_message(LinkDelaySpec(link_ms=150), None)
    assert elapsed_s >= 0.150


async def test_no_delay_by_default() -> None:
    """A stack without the setting keeps libp2p's own upgrader: nothing wraps
    its connections (the message arrives; how fast is not asserted)."""
    seen: list[Any] = []
    async with open_stack(b"c" * 32, ["/ip4/127.0.0.1/tcp/0"], dht_validators={}) as stack:
        seen.append(stack.host.get_network().upgrader.upgrade_security)  # type: ignore[attr-defined]
    assert StackConfig().link_delay is None
    assert seen[0].__func__ is TransportUpgrader.upgrade_security
    _, up_a, _up_b = await one_message(None, None)
    assert up_a.upgrade_security.__func__ is TransportUpgrader.upgrade_security
