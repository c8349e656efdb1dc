"""A hostile peer against a real node process.

1. Forged, expired and replayed adverts published on the adverts topic are
   rejected by the node's GossipSub validator and counted by reason.
2. Garbage on every stream protocol and topic of the node (empty, truncated,
   absurd length prefixes, wrong schema, deep nesting, hundreds of KiB of
   noise) and on its raw TCP port never stops it from accepting new
   connections and streams or from serving its market.
"""

from __future__ import annotations

import random
import socket
from dataclasses import replace
from pathlib import Path

import multiaddr
import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr

from p2pgpu.core import Advert, GpuInfo, Identity, encode, sign_advert
from p2pgpu.localnet import LocalNet
from p2pgpu.node import ADVERTS_TOPIC, MARKET_PROTOCOL, wall_ms
from p2pgpu.node._stack import open_stack
from p2pgpu.node._streams import request
from p2pgpu.node import STREAM_PROTOCOLS, TOPICS

pytestmark = pytest.mark.processes

MIX = [("NVIDIA L4", 23034, "8.9", 1)]


def advert_for(identity: Identity, *, seq: int, issued_ms: int, ttl_ms: int = 60_000, peer_id: str | None = None) -> Advert:
    return Advert(
        peer_id=peer_id or identity.peer_id, network="local", addrs=(), seq=seq,
        issued_at_ms=issued_ms, expires_at_ms=issued_ms + ttl_ms,
        gpus=(GpuInfo(model="NVIDIA L4", memory_mb=23034, compute_capability="8.9"),), gpus_free=1,
        price_per_gpu_hour=1000, currency="SOL", payout_address="", region="local",
        runtimes=("process",), simulated=True,
    )


async def _attacker(node_addr: str, seed: bytes):
    stack_cm = open_stack(seed, ["/ip4/127.0.0.1/tcp/0"], dht_validators={})
    stack = await stack_cm.__aenter__()
    await stack.host.connect(info_from_p2p_addr(multiaddr.Multiaddr(node_addr)))
    return stack_cm, stack


async def _wait_status(node, pred, timeout_s: float = 30.0):
    with trio.fail_after(timeout_s):
        while True:
            st = await trio.to_thread.run_sync(node.call, "status")
            if pred(st):
                return st
            await trio.sleep(0.2)


async def test_forged_expired_replayed_adverts_are_rejected_and_counted(tmp_path: Path) -> None:
    net = LocalNet(tmp_path, 2, gpu_mix=MIX)
    await trio.to_thread.run_sync(net.start)
    try:
        target = net.nodes[0]
        seed = bytes(range(32))
        cm, atk = await _attacker(target.addrs[0], seed)
        try:
            me = Identity(seed)
            other = Identity(bytes(32))
            await atk.pubsub.subscribe(ADVERTS_TOPIC)
            await trio.sleep(2.5)  # let the GossipSub mesh form (1 s heartbeats)
            now = wall_ms()
            good = sign_advert(me, advert_for(me, seq=now, issued_ms=now)).wire
            await atk.pubsub.publish(ADVERTS_TOPIC, good)
            await _wait_status(target, lambda s: s["adverts_known"] == 3)
            # replayed: the very same signed advert again
            await atk.pubsub.publish(ADVERTS_TOPIC, good)
            # expired: validly signed, but its lifetime ended an hour ago
            old = now - 2 * 3600_000
            await atk.pubsub.publish(ADVERTS_TOPIC, sign_advert(me, advert_for(me, seq=now + 1, issued_ms=old)).wire)
            # forged: claims another peer's id, signed with our key
            forged = sign_advert(me, advert_for(me, seq=now + 2, issued_ms=now))
            body = replace(forged.advert, peer_id=other.peer_id)
            env = forged.envelope
            forged_wire = encode({"k": "advert", "v": 1, "b": encode(body.to_obj()), "s": env.signer, "g": env.signature})
            await atk.pubsub.publish(ADVERTS_TOPIC, forged_wire)
            # tampered: a valid advert with one bit of its signature flipped
            fresh = sign_advert(me, advert_for(me, seq=now + 3, issued_ms=now)).envelope
            bad_sig = bytes([fresh.signature[0] ^ 1]) + fresh.signature[1:]
            await atk.pubsub.publish(ADVERTS_TOPIC, encode({"k": "advert", "v": 1, "b": fresh.body, "s": fresh.signer, "g": bad_sig}))
            st = await _wait_status(target, lambda s: len(s["rejections"]) >= 3)
            st = await _wait_status(target, lambda s: {"replayed", "expired", "bad_signature"} <= set(s["rejections"]))
            assert st["rejections"]["replayed"] >= 1
            assert st["rejections"]["expired"] >= 1
            assert st["rejections"]["bad_signature"] >= 1
            # None of them changed the market: still our one good advert.
            market = await trio.to_thread.run_sync(target.call, "market")
            assert other.peer_id not in {r["peer_id"] for r in market}
            assert len(market) == 3
        finally:
            await cm.__aexit__(None, None, None)
    finally:
        await trio.to_thread.run_sync(net.stop)


def _garbage_payloads(rng: random.Random) -> list[bytes]:
    return [
        b"",
        b"\x80",  # truncated varint
        b"\xff" * 9 + b"\x01",  # absurd length prefix (2^63)
        b"\xff\xff\xff\x7f" + b"x" * 64,  # claims 256 MiB, sends 64 bytes
        b"\x05ab",  # truncated frame
        b"\x04" + encode([1, 2, 3])[:4],  # wrong schema
        b"\x0c" + b"\x91" * 12,  # nesting without end
        (lambda deep: bytes([0x80 | (len(deep) & 0x7F), len(deep) >> 7]) + deep)(b"\x91" * 5000 + b"\xc0"),
        rng.randbytes(300 * 1024),  # hundreds of KiB of noise
        b"\x80\x80\x04" + rng.randbytes(70000),  # valid 64 KiB length, random body
    ]


async def _raw_stream(host, peer: str, protocol: str, data: bytes) -> None:
    with trio.move_on_after(3):
        try:
            stream = await host.new_stream(ID.from_base58(peer), [TProtocol(protocol)])
        except BaseLibp2pError:
            return
        try:
            if data:
                await stream.write(data)
            await stream.close()
            await stream.read(1024)
        except BaseLibp2pError:
            pass  # the node reset the stream: exactly what it should do


def _raw_tcp(addr: str, data: bytes) -> None:
    parts = addr.split("/")
    with socket.create_connection((parts[2], int(parts[4])), timeout=3) as s:
        try:
            s.sendall(data)
            s.recv(1024)
        except OSError:
            pass  # closed by the node


async def test_garbage_on_every_protocol_and_topic_never_stops_the_node(tmp_path: Path) -> None:
    net = LocalNet(tmp_path, 1, gpu_mix=MIX)
    await trio.to_thread.run_sync(net.start)
    try:
        node = net.nodes[0]
        rng = random.Random(7)
        payloads = _garbage_payloads(rng)
        for payload in payloads[:4] + payloads[8:9]:
            await trio.to_thread.run_sync(_raw_tcp, node.addrs[0], payload)
        status = await trio.to_thread.run_sync(node.call, "status")
        # Ours and the library's own (GossipSub, Kademlia, identify, ping...).
        protocols = sorted(set(STREAM_PROTOCOLS) | set(status["protocols"]))
        assert MARKET_PROTOCOL in protocols and any(p.startswith("/meshsub/") for p in protocols)
        assert any("kad" in p for p in protocols)
        cm, atk = await _attacker(node.addrs[0], bytes([9]) * 32)
        try:
            for protocol in protocols:
                for payload in payloads:
                    await _raw_stream(atk.host, node.peer_id, protocol, payload)
            for topic in TOPICS:
                await atk.pubsub.subscribe(topic)
            await trio.sleep(2.5)
            for topic in TOPICS:
                for payload in [*payloads[:8], rng.randbytes(200 * 1024), encode({"k": "advert"}), encode({})]:
                    try:
                        await atk.pubsub.publish(topic, payload)
                    except (BaseLibp2pError, ValueError):
                        pass  # our own pubsub refusing to send it is fine too
            await trio.sleep(1)
        finally:
            await cm.__aexit__(None, None, None)
        # The node still serves: its process lives, its market answers, and a
        # brand-new peer connects and syncs the market over a fresh stream.
        assert node.proc.poll() is None, node.log_tail()
        market = await trio.to_thread.run_sync(node.call, "market")
        assert [r["peer_id"] for r in market] == [node.peer_id]
        cm2, fresh = await _attacker(node.addrs[0], bytes([10]) * 32)
        try:
            frames = await request(fresh.host, node.peer_id, MARKET_PROTOCOL,
                                   encode({"want": "adverts", "limit": 10}), frame_bytes_max=8192, frames_max=10)
            assert len(frames) == 1
        finally:
            await cm2.__aexit__(None, None, None)
        status = await trio.to_thread.run_sync(node.call, "status")
        assert any(k.startswith("market:") for k in status["counters"]), status["counters"]
        assert not any(k.endswith("internal_error") for k in status["counters"]), status["counters"]
    finally:
        await trio.to_thread.run_sync(net.stop)
