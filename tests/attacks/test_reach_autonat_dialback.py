"""Attack (#14): AutoNAT used to make a node dial someone else, or to lie.

Real hosts on loopback.  A requester asks our AutoNAT server to dial it back
at addresses that name a victim (another IP, another port): the server
dials only the IP the request came from, on at most a few of the ports
named, so the victim sees nothing; a second request within the interval is
refused.  And the verdict is honest: a requester whose port answers is told
OK (over a *new* connection, though one already exists), one whose port is
closed is told it failed (py-libp2p's own service says OK to everyone)."""

from __future__ import annotations

import socket
from collections import Counter
from contextlib import AsyncExitStack

import multiaddr
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr

from p2pgpu.node._autonat import AUTONAT_PROTOCOL, AutoNatServer, ask
from p2pgpu.node._stack import Stack, open_stack
from p2pgpu.node._streams import guarded


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _server_and_client(ex: AsyncExitStack, counts: Counter[str]) -> tuple[Stack, Stack]:
    server = await ex.enter_async_context(open_stack(b"S" * 32, ["/ip4/127.0.0.1/tcp/0"], dht_validators={}))
    client = await ex.enter_async_context(open_stack(b"C" * 32, ["/ip4/127.0.0.1/tcp/0"], dht_validators={}))
    nat = AutoNatServer(server.host, counts, now_s=trio.current_time)
    server.host.set_stream_handler(AUTONAT_PROTOCOL, guarded("autonat", nat.serve, counts, timeout_s=30))
    await client.host.connect(info_from_p2p_addr(multiaddr.Multiaddr(server.addrs()[0])))
    return server, client


async def test_dial_back_goes_only_to_the_requesters_ip_and_is_rate_limited() -> None:
    counts: Counter[str] = Counter()
    async with AsyncExitStack() as ex:
        server, client = await _server_and_client(ex, counts)
        # The victim: a listener on another loopback IP that counts connections.
        victim = trio.socket.socket()
        await victim.bind(("127.0.0.2", 0))
        victim.listen(16)
        vport = victim.getsockname()[1]
        hits = 0

        async def count_hits() -> None:
            nonlocal hits
            while True:
                conn, _ = await victim.accept()
                hits += 1
                conn.close()

        async with trio.open_nursery() as n:
            n.start_soon(count_hits)
            answer = await ask(client.host, server.host.get_id(),
                               [f"/ip4/127.0.0.2/tcp/{vport}", "/ip4/198.51.100.9/tcp/80"], 20)
            # It dialled 127.0.0.1 (where the request came from) at those ports: nobody there.
            assert answer.judged and not answer.ok
            assert hits == 0
            again = await ask(client.host, server.host.get_id(), [f"/ip4/127.0.0.2/tcp/{vport}"], 20)
            assert not again.judged and "too often" in again.detail
            n.cancel_scope.cancel()
        victim.close()
        assert counts["autonat_served:e_dial_error"] == 1 and counts["autonat_served:e_dial_refused"] == 1


async def test_an_open_port_is_confirmed_over_a_new_connection_and_a_closed_one_is_not() -> None:
    counts: Counter[str] = Counter()
    async with AsyncExitStack() as ex:
        server, client = await _server_and_client(ex, counts)
        listen = [a.split("/p2p/")[0] for a in client.addrs()]
        ok = await ask(client.host, server.host.get_id(), listen, 20)
        assert ok.judged and ok.ok and ok.addr == listen[0]
        # The existing connection was left alone.
        assert client.host.get_network().get_connections(server.host.get_id())

    async with AsyncExitStack() as ex:
        server, client = await _server_and_client(ex, counts)
        bad = await ask(client.host, server.host.get_id(), [f"/ip4/127.0.0.1/tcp/{_closed_port()}"], 20)
        assert bad.judged and not bad.ok and "dial failed" in bad.detail


async def test_garbage_and_foreign_requests_get_no_dial() -> None:
    counts: Counter[str] = Counter()
    async with AsyncExitStack() as ex:
        server, client = await _server_and_client(ex, counts)
        from libp2p.host.autonat.pb.autonat_pb2 import Message
        from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited

        async def send(raw: bytes) -> Message:
            stream = await client.host.new_stream(server.host.get_id(), [AUTONAT_PROTOCOL])
            await stream.write(encode_varint_prefixed(raw))
            m = Message()
            m.ParseFromString(await read_varint_prefixed_bytes_limited(stream, 4096))
            return m

        garbage = await send(b"\xff\x00garbage")
        assert garbage.dialResponse.status == Message.E_BAD_REQUEST
        other = Message(type=Message.DIAL)
        other.dial.peer.id = server.host.get_id().to_bytes()  # asks to dial someone else
        other.dial.peer.addrs.append(multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/1").to_bytes())
        foreign = await send(other.SerializeToString())
        assert foreign.dialResponse.status == Message.E_BAD_REQUEST
        assert not any(k.endswith("internal_error") for k in counts)
