"""IPFS interoperability, checked: py-libp2p 0.8.1's Bitswap client (which a
node would use for inputs by CID) fetches a block by CID from Helia's Bitswap
(``@helia/bitswap`` 2.2, the version helia 5 ships, on js-libp2p 2.x) over
TCP, Noise and Yamux on 127.0.0.1, and the bytes hash to the CID.  A CID the
peer does not have ends in a bounded wait, not a hang.

This is the feasibility check the issue asks for, not a manifest input yet
(``docs/manifest.md``, "IPFS by CID", says what is missing).  Helia's npm
packages: ``helia_helpers.py``.  Multi-block files by CID, as a node fetches
them for a manifest input: ``test_ipfs_cid_fetch.py``.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import multiaddr
import pytest
import trio
from helia_helpers import helia_dir, helia_process
from libp2p import new_host
from libp2p.bitswap import BitswapClient
from libp2p.bitswap.errors import TimeoutError as BitswapTimeout
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.network.config import ConnectionConfig
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
from libp2p.security.noise.transport import Transport as NoiseTransport

pytestmark = pytest.mark.processes


@pytest.fixture(scope="module")
def js_dir() -> Path:
    return helia_dir()


def cid_sha256(cid: str) -> bytes:
    """The sha2-256 digest a CIDv1 (base32, raw codec) names."""
    assert cid.startswith("b")
    raw = base64.b32decode(cid[1:].upper() + "=" * (-len(cid[1:]) % 8))
    assert raw[:4] == bytes([0x01, 0x55, 0x12, 0x20]), raw[:4].hex()  # v1, raw, sha2-256, 32 bytes
    return raw[4:36]


async def fetch(addr: str, cid: str, timeout_s: float) -> bytes:
    kp = create_new_key_pair(os.urandom(32))
    host = new_host(key_pair=kp, sec_opt={NOISE_ID: NoiseTransport(kp, noise_privkey=create_x25519_key_pair().private_key)},
                    muxer_preference="YAMUX", connection_config=ConnectionConfig(max_connections_per_peer=1))
    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]), trio.open_nursery() as nursery:
        try:
            bitswap = BitswapClient(host)
            bitswap.set_nursery(nursery)
            await bitswap.start()
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
            await host.connect(info)
            try:
                return await bitswap.new_session().get_block(cid, info.peer_id, timeout=timeout_s)
            finally:
                await bitswap.stop()
        finally:
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await host.get_network().close()


async def serve_and(js_dir: Path, text: str, body: object) -> object:
    async with helia_process(js_dir, "helia_bitswap_serve.mjs", text) as started:
        return await body(started["addr"], started["cid"])  # type: ignore[operator]


async def test_a_block_by_cid_from_helias_bitswap(js_dir: Path) -> None:
    text = "p2pgpu fetched this from Helia " + os.urandom(8).hex()

    async def body(addr: str, cid: str) -> tuple[str, bytes]:
        return cid, await fetch(addr, cid, timeout_s=30)

    cid, data = await serve_and(js_dir, text, body)  # type: ignore[misc]
    assert data == text.encode()
    assert hashlib.sha256(data).digest() == cid_sha256(cid)  # what a node would check before use


async def test_a_cid_the_peer_lacks_is_a_bounded_wait(js_dir: Path) -> None:
    absent = "b" + base64.b32encode(bytes([0x01, 0x55, 0x12, 0x20]) + hashlib.sha256(b"nobody has this").digest()
                                    ).decode().lower().rstrip("=")
    assert cid_sha256(absent) == hashlib.sha256(b"nobody has this").digest()

    async def body(addr: str, cid: str) -> str:
        assert hashlib.sha256(b"x").digest() != cid_sha256(cid)
        outcome = "fetched?"
        with trio.fail_after(30):
            try:
                await fetch(addr, absent, timeout_s=3)
            except* BitswapTimeout:
                outcome = "timed out"
        return outcome

    assert await serve_and(js_dir, "present", body) == "timed out"
