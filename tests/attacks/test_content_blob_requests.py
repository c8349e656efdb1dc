"""Attack: hostile requests on ``/p2pgpu/blobs/1.0.0`` against a real node.

An in-process libp2p peer asks a node process for blobs in bad ways: too many
streams at once, chunk ranges outside the blob or over the request cap,
requests for blobs it does not hold, malformed frames.  Each is refused
(counted, the stream reset) and the node goes on serving honest requests.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import multiaddr
import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr

from p2pgpu.core import decode, encode
from p2pgpu.localnet import LocalNet
from p2pgpu.node._blobs import BLOBS_PROTOCOL, serve_streams_per_peer_max
from p2pgpu.node._stack import open_stack
from p2pgpu.node._streams import StreamGone, read_frame, write_frame

pytestmark = pytest.mark.processes
MIX = [("NVIDIA L4", 23034, "8.9", 1)]


async def ask(host, peer: str, req: dict, frames: int = 1, size_max: int = 2 << 20) -> list[bytes]:
    try:
        stream = await host.new_stream(ID.from_base58(peer), [TProtocol(BLOBS_PROTOCOL)])
    except BaseLibp2pError:
        return []  # refused before the protocol was agreed (a stream over the limit)
    out = []
    try:
        await write_frame(stream, encode(req))
        for _ in range(frames):
            out.append(await read_frame(stream, size_max))
    except StreamGone:
        pass
    finally:
        with contextlib.suppress(BaseLibp2pError):  # the node may have reset it first
            await stream.reset()
    return out


async def test_hostile_blob_requests_are_refused_and_honest_ones_still_served(tmp_path: Path) -> None:
    data = hashlib.sha256(b"seed").digest() * 100_000  # 3.2 MB: 4 chunks
    (tmp_path / "blob.bin").write_bytes(data)
    sha = hashlib.sha256(data).digest()
    net = LocalNet(tmp_path / "net", 1, gpu_mix=MIX)
    await trio.to_thread.run_sync(net.start)
    try:
        node = net.nodes[0]
        await trio.to_thread.run_sync(node.call, "blobs.add", {"path": str(tmp_path / "blob.bin")})
        async with open_stack(bytes([7]) * 32, ["/ip4/127.0.0.1/tcp/0"], dht_validators={}) as atk:
            await atk.host.connect(info_from_p2p_addr(multiaddr.Multiaddr(node.addrs[0])))
            host = atk.host
            # Outside the blob, over the cap, garbage, unknown blob: nothing served.
            assert await ask(host, node.peer_id, {"op": "get", "sha256": sha, "first": 3, "count": 2}) == []
            assert await ask(host, node.peer_id, {"op": "get", "sha256": sha, "first": 0, "count": 10_000}) == []
            assert await ask(host, node.peer_id, {"op": "get", "sha256": sha, "first": -1, "count": 1}) == []
            assert await ask(host, node.peer_id, {"op": "delete", "sha256": sha}) == []
            assert await ask(host, node.peer_id, {"op": "tree", "sha256": b"short"}) == []
            unknown = decode((await ask(host, node.peer_id, {"op": "tree", "sha256": bytes(32)}))[0])
            assert unknown == {"error": "not_found"}
            # More streams at once than a peer may hold: the extra ones are refused.
            streams = []
            for _ in range(serve_streams_per_peer_max):
                s = await host.new_stream(ID.from_base58(node.peer_id), [TProtocol(BLOBS_PROTOCOL)])
                await write_frame(s, encode({"op": "tree", "sha256": sha}))
                await read_frame(s, 1 << 20)  # served: the stream is open and counted
                streams.append(s)
            assert await ask(host, node.peer_id, {"op": "tree", "sha256": sha}) == []
            for s in streams:
                await s.reset()
            await trio.sleep(0.5)
            # An honest request still works, byte for byte.
            tree = decode((await ask(host, node.peer_id, {"op": "tree", "sha256": sha}))[0])
            assert tree["tree"]["size"] == len(data) and tree["have"] is None
            chunks = await ask(host, node.peer_id, {"op": "get", "sha256": sha, "first": 0, "count": 4}, frames=4)
            assert b"".join(chunks) == data
        status = await trio.to_thread.run_sync(node.call, "status")
        c = status["counters"]
        assert c["blobs:bad_schema"] >= 3 and c["blobs:limit_exceeded"] >= 1, c
        assert c["blobs:streams_refused"] >= 1
        assert not any(k.endswith("internal_error") for k in c), c
        assert node.proc.poll() is None
    finally:
        await trio.to_thread.run_sync(net.stop)
