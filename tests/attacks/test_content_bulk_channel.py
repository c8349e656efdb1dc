"""Attack (#15, bulk side channel): hostile clients of a node's bulk TCP port.

An in-process libp2p peer gets real tickets from a real node process over
``/p2pgpu/blobs/1.0.0`` (op ``bulk``) and then connects to the node's bulk
port with plain TCP, misbehaving: garbage, an unknown token, another peer's
ticket (its key unknown), a ticket for another blob, one from another
address, a replayed one, an expired one, too many tickets, too many
connections from one IP, a client that sends nothing or reads nothing,
oversized and forged requests.  Each is closed at once (or after its
timeout), counted, and changes nothing: the tickets it did not prove it
holds stay usable, and the node goes on serving honest connections byte for
byte.  The fetcher's side (a provider that forges or oversizes its frames)
is in ``tests/content/test_bulk_channel_e2e.py``.
"""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import multiaddr
import pytest
import trio
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr

from p2pgpu.core import _bulk as core
from p2pgpu.core import decode, encode
from p2pgpu.localnet import LocalNet
from p2pgpu.node._blobs import BLOBS_PROTOCOL
from p2pgpu.node._stack import open_stack
from p2pgpu.node._streams import read_frame, write_frame

pytestmark = pytest.mark.processes
MIX = [("NVIDIA L4", 23034, "8.9", 1)]
CHUNK = 1 << 20
LIMITS = """bulk_ticket_ttl_s = 3
bulk_tickets_per_peer_max = 6
bulk_connections_per_ip_max = 3
bulk_hello_timeout_s = 2
bulk_idle_timeout_s = 2
bulk_send_timeout_s_min = 2
"""


class Client:
    """A raw TCP client of the bulk port (blocking calls run in a thread)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def closed_by_peer(self, within_s: float = 10.0) -> bool:
        """True if the node closes (or resets) the connection within ``within_s``."""
        self.sock.settimeout(within_s)
        try:
            while self.sock.recv(1 << 16):
                pass
            return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def hello(self, offer: dict, sha: bytes, *, key: bytes | None = None, token: bytes | None = None) -> None:
        sealed = core.seal_hello(key or offer["key_up"], sha)
        self.send(core.MAGIC + (token or offer["token"]) + core.frame_header(len(sealed)) + sealed)

    def chunks(self, offer: dict, first: int, count: int, *, counter: int = 1) -> list[bytes]:
        up, down = AESGCM(offer["key_up"]), AESGCM(offer["key_down"])
        sealed = core.seal_request(up, counter, first, count)
        self.send(core.frame_header(len(sealed)) + sealed)
        out = []
        for k in range(count):
            length = core.frame_length(self._exactly(4), CHUNK + 16)
            out.append(core.open_chunk(down, k, first + k, self._exactly(length)))
        return out

    def _exactly(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            got = self.sock.recv(n - len(buf))
            if not got:
                raise ConnectionError("closed")
            buf += got
        return bytes(buf)

    def close(self) -> None:
        self.sock.close()


async def ticket(host, peer: str, sha: bytes, **extra) -> dict:
    stream = await host.new_stream(ID.from_base58(peer), [TProtocol(BLOBS_PROTOCOL)])
    try:
        await write_frame(stream, encode({"op": "bulk", "sha256": sha, **extra}))
        return decode(await read_frame(stream, 4096))
    finally:
        await stream.close()


async def test_hostile_bulk_clients_are_cut_and_honest_ones_served(tmp_path: Path) -> None:
    data = hashlib.sha256(b"bulk").digest() * (CHUNK // 32) * 3 + b"tail"  # 4 chunks
    other = hashlib.sha256(b"other").digest() * 1000
    (tmp_path / "blob.bin").write_bytes(data)
    (tmp_path / "other.bin").write_bytes(other)
    sha, other_sha = hashlib.sha256(data).digest(), hashlib.sha256(other).digest()
    net = LocalNet(tmp_path / "net", 1, gpu_mix=MIX, node_config={0: LIMITS})
    await trio.to_thread.run_sync(net.start)
    run = trio.to_thread.run_sync
    try:
        node = net.nodes[0]
        for name in ("blob.bin", "other.bin"):
            await run(node.call, "blobs.add", {"path": str(tmp_path / name)})
        port = (await run(node.call, "status"))["bulk"]["port"]

        failed: list[BaseException] = []
        async with open_stack(bytes([9]) * 32, ["/ip4/127.0.0.1/tcp/0"], dht_validators={}) as atk, \
                open_stack(bytes([10]) * 32, ["/ip4/127.0.0.1/tcp/0"], dht_validators={}) as peer_b:
            for h in (atk, peer_b):
                await h.host.connect(info_from_p2p_addr(multiaddr.Multiaddr(node.addrs[0])))
            try:
                await attacks(atk, peer_b, node, port, sha, other_sha, data)
            except Exception as exc:  # noqa: BLE001 - re-raised below
                failed.append(exc)  # raised below: inside the stacks it drowns in nested exception groups
        if failed:
            raise failed[0]
        with trio.fail_after(15):  # every connection above ended and gave its room back
            while (status := await run(node.call, "status"))["bulk"]["connections"]:
                await trio.sleep(0.2)
        assert status["counters"].get("bulk:errors", 0) == 0
        assert node.proc.poll() is None
    finally:
        await trio.to_thread.run_sync(net.stop)


async def attacks(atk, peer_b, node, port: int, sha: bytes, other_sha: bytes, data: bytes) -> None:
    run = trio.to_thread.run_sync

    def counters() -> dict:
        return node.call("status")["counters"]

    mine = await ticket(atk.host, node.peer_id, sha)
    theirs = await ticket(peer_b.host, node.peer_id, sha)
    assert set(mine) >= {"token", "key_up", "key_down", "port"} and mine["port"] == port
    assert (mine["first"], mine["count"]) == (0, 4)
    assert (await ticket(atk.host, node.peer_id, bytes(32))) == {"error": "not_found"}

    async def refused(payload: bytes) -> bool:
        c = await run(Client, port)
        try:
            await run(c.send, payload)
            return await run(c.closed_by_peer, 5.0)
        finally:
            c.close()

    # Garbage; an unknown token; another peer's ticket (its key unknown to us);
    # our ticket naming another blob: each closed at once.
    assert await refused(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(64))
    sealed = core.seal_hello(mine["key_up"], sha)
    assert await refused(core.MAGIC + bytes(16) + core.frame_header(len(sealed)) + sealed)
    sealed = core.seal_hello(mine["key_up"], sha)
    assert await refused(core.MAGIC + theirs["token"] + core.frame_header(len(sealed)) + sealed)
    sealed = core.seal_hello(mine["key_up"], other_sha)
    assert await refused(core.MAGIC + mine["token"] + core.frame_header(len(sealed)) + sealed)
    c = await run(counters)
    assert c["bulk:refused:malformed"] == 1 and c["bulk:refused:bad_content"] == 2, c
    assert c["bulk:refused:bad_signature"] == 1, c
    assert c.get("bulk:connections", 0) == 0  # nothing redeemed

    # ...and changed nothing: both tickets still work, byte for byte.
    for offer in (mine, theirs):
        honest = await run(Client, port)
        await run(lambda o=offer, h=honest: h.hello(o, sha))
        got = await run(lambda o=offer, h=honest: h.chunks(o, 0, 4))
        honest.close()
        assert b"".join(got) == data

    # Replayed: a used ticket is refused.
    assert await refused(core.MAGIC + mine["token"] + core.frame_header(len(sealed)) + sealed)
    assert (await run(counters))["bulk:refused:replayed"] == 1

    # Oversized and forged requests, a range outside the ticket: closed.
    for bad in ("oversized", "forged", "outside"):
        offer = await ticket(atk.host, node.peer_id, sha, first=1, count=2)
        c2 = await run(Client, port)
        await run(lambda o=offer, h=c2: h.hello(o, sha))
        up = AESGCM(offer["key_up"])
        frame = {"oversized": core.frame_header(1 << 31) + bytes(64),
                 "forged": core.frame_header(24) + bytes(24),
                 "outside": core.frame_header(24) + core.seal_request(up, 1, 0, 2)}[bad]
        await run(c2.send, frame)
        assert await run(c2.closed_by_peer, 5.0), bad
        c2.close()
    c = await run(counters)
    assert c["bulk:refused:oversized"] == 1 and c["bulk:refused:bad_signature"] == 2, c
    assert c["bulk:refused:bad_schema"] == 1, c

    # Expired: a ticket not redeemed within bulk_ticket_ttl_s.
    late = await ticket(atk.host, node.peer_id, sha)
    await trio.sleep(3.5)
    sealed = core.seal_hello(late["key_up"], sha)
    assert await refused(core.MAGIC + late["token"] + core.frame_header(len(sealed)) + sealed)
    assert (await run(counters))["bulk:refused:expired"] == 1

    # Tickets per peer are bounded (6 here); expired ones free their room.
    got = [await ticket(atk.host, node.peer_id, sha) for _ in range(7)]
    assert all("token" in g for g in got[:6]) and got[6] == {"error": "limit"}
    assert (await run(counters))["bulk:tickets_refused"] == 1
    assert "token" in await ticket(peer_b.host, node.peer_id, sha)  # another peer is not starved

    # Slowloris: connections that send nothing hold the per-IP room (3
    # here) only until the hello timeout; the one past the room is closed at once.
    idle = [await run(Client, port) for _ in range(3)]
    await trio.sleep(0.3)
    extra = await run(Client, port)
    assert await run(extra.closed_by_peer, 1.0)
    extra.close()
    assert (await run(counters))["bulk:refused:limit_exceeded"] >= 1
    for s in idle:
        assert await run(s.closed_by_peer, 6.0)
        s.close()
    assert (await run(counters))["bulk:timeouts"] >= 3

    # A client that asks for chunks and reads nothing is cut after the send timeout.
    await trio.sleep(3.5)  # the six tickets above expire and free the peer's room
    offer = await ticket(atk.host, node.peer_id, sha)
    reader = await run(Client, port)
    await run(lambda: reader.hello(offer, sha))
    # The same 4 chunks asked 6 times: more than the socket buffers of both ends hold.
    for n in range(1, 7):
        sealed_req = core.seal_request(AESGCM(offer["key_up"]), n, 0, 4)
        await run(reader.send, core.frame_header(len(sealed_req)) + sealed_req)
    with trio.fail_after(60):
        while (await run(counters)).get("bulk:timeouts", 0) < 4:
            await trio.sleep(0.5)
    reader.close()

    # Still serving honest fetchers.
    offer = await ticket(atk.host, node.peer_id, sha)
    honest = await run(Client, port)
    await run(lambda: honest.hello(offer, sha))
    assert b"".join(await run(lambda: honest.chunks(offer, 0, 4))) == data
    honest.close()
