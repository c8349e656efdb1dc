"""A hostile Bitswap provider, run as its own process: a real py-libp2p host
on 127.0.0.1 that answers ``/ipfs/bitswap/1.2.0`` wants the way an attacker
would, for the attack tests of inputs by IPFS CID.

Usage: ``python bitswap_hostile_peer.py MODE``; prints one JSON line
``{addr, cid, size}`` (the CID and size a manifest would name) when it
listens, and stops at the end of its input.  Modes:

- ``wrong``: answers every want with bytes that are not the block the CID names;
- ``stall``: reads the wants and never answers;
- ``dont_have``: answers every want with DONT_HAVE;
- ``deep``: serves, honestly, a file whose DAG is a chain 24 nodes deep;
- ``wide``: serves a root with 5,000 links (to one 1-byte leaf);
- ``size_lie``: serves a root that says its leaf holds 1,000 bytes, and a
  leaf of 2,000;
- ``flood``: serves the 3-leaf file, each block 200 times over;
- ``honest``: serves a 3-leaf file correctly (the control).

The DAGs are built with the core's dag-pb/UnixFS encoder (``encode_file_node``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.bitswap.pb.bitswap_pb2 import Message
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.network.config import ConnectionConfig
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
from libp2p.security.noise.transport import Transport as NoiseTransport

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from p2pgpu.core._ipfs import CODEC_DAG_PB, CODEC_RAW, Cid
from p2pgpu.core._ipfs import encode_file_node as file_node
from p2pgpu.node._streams import StreamGone, read_frame, write_frame

PROTO = TProtocol("/ipfs/bitswap/1.2.0")


def cid_of(block: bytes, codec: int) -> Cid:
    return Cid(version=1, codec=codec, digest=hashlib.sha256(block).digest())


def build(mode: str) -> tuple[Cid, int, dict[bytes, tuple[Cid, bytes]]]:
    """The root CID, the file size and the blocks a mode serves."""
    blocks: dict[bytes, tuple[Cid, bytes]] = {}

    def put(block: bytes, codec: int) -> Cid:
        c = cid_of(block, codec)
        blocks[c.to_bytes()] = (c, block)
        return c

    if mode == "deep":
        leaf = os.urandom(100)
        cid, size = put(leaf, CODEC_RAW), len(leaf)
        for _ in range(24):
            cid = put(file_node([(cid, size)]), CODEC_DAG_PB)
        return cid, size, blocks
    if mode == "wide":
        leaf = put(b"x", CODEC_RAW)
        return put(file_node([(leaf, 1)] * 5000), CODEC_DAG_PB), 5000, blocks
    if mode == "size_lie":
        leaf = put(os.urandom(2000), CODEC_RAW)
        return put(file_node([(leaf, 1000)]), CODEC_DAG_PB), 1000, blocks
    leaves = [os.urandom(50_000) for _ in range(3)]
    root = put(file_node([(put(x, CODEC_RAW), len(x)) for x in leaves]), CODEC_DAG_PB)
    return root, sum(len(x) for x in leaves), blocks


async def main(mode: str) -> None:
    root, size, blocks = build(mode)
    kp = create_new_key_pair(os.urandom(32))
    host = new_host(key_pair=kp, sec_opt={NOISE_ID: NoiseTransport(kp, noise_privkey=create_x25519_key_pair().private_key)},
                    muxer_preference="YAMUX", connection_config=ConnectionConfig(max_connections_per_peer=1))

    async def answer(peer: Any, msg: Message) -> None:
        out = Message()
        for e in msg.wantlist.entries:
            if e.cancel:
                continue
            want = Cid.from_bytes(e.block)
            if mode == "dont_have":
                out.blockPresences.add(cid=e.block, type=Message.BlockPresenceType.DontHave)
            elif mode == "wrong":
                out.payload.add(prefix=want.prefix(), data=os.urandom(1000))
            elif e.block in blocks:
                c, data = blocks[e.block]
                out.payload.add(prefix=c.prefix(), data=data)
        if out.payload or out.blockPresences:
            back = await host.new_stream(peer, [PROTO])
            for _ in range(200 if mode == "flood" else 1):
                await write_frame(back, out.SerializeToString())
            await back.close()

    async def serve(stream: Any) -> None:
        peer = stream.muxed_conn.peer_id
        try:
            while True:
                msg = Message()
                msg.ParseFromString(await read_frame(stream, 4 << 20))
                if mode != "stall":
                    await answer(peer, msg)
        except (StreamGone, BaseLibp2pError):
            return

    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        host.set_stream_handler(PROTO, serve)
        addr = str(host.get_addrs()[0])
        print(json.dumps({"addr": addr, "cid": str(root), "size": size}), flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)  # until the test closes our input
        with trio.move_on_after(3):
            await host.get_network().close()


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
