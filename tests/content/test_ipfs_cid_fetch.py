"""Files by IPFS CID, fetched by the node's Bitswap client (``node/_bitswap.py``)
from a real Helia node (``@helia/unixfs`` 4 ``addBytes`` and ``@helia/bitswap``
2.2 on js-libp2p 2.x, npm) over TCP, Noise and Yamux on 127.0.0.1, into a
real content store: multi-block UnixFS files (raw leaves under dag-pb nodes,
Helia's defaults and a deeper tree of small chunks) arrive whole, every block
checked against its CID, and land in the store under their SHA-256.  Limits
a DAG exceeds end the fetch with the reason and nothing in the store.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import multiaddr
import pytest
import trio
from helia_helpers import helia_dir, helia_process
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.network.config import ConnectionConfig
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
from libp2p.security.noise.transport import Transport as NoiseTransport

from p2pgpu.content import BlobStore
from p2pgpu.core._ipfs import DagLimits
from p2pgpu.node._bitswap import BITSWAP_PROTOCOLS, BitswapService, CidError
from p2pgpu.node._streams import guarded

pytestmark = pytest.mark.processes


@pytest.fixture(scope="module")
def js_dir() -> Path:
    return helia_dir()


@asynccontextmanager
async def bitswap_host(limits: DagLimits | None = None) -> AsyncIterator[BitswapService]:
    kp = create_new_key_pair(os.urandom(32))
    host = new_host(key_pair=kp, sec_opt={NOISE_ID: NoiseTransport(kp, noise_privkey=create_x25519_key_pair().private_key)},
                    muxer_preference="YAMUX", connection_config=ConnectionConfig(max_connections_per_peer=1))
    counts: Counter[str] = Counter()
    svc = BitswapService(host=host, counts=counts, limits=limits or DagLimits())
    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        for proto in BITSWAP_PROTOCOLS:
            host.set_stream_handler(proto, guarded("bitswap", svc.serve, counts, timeout_s=600))
        try:
            yield svc
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await host.get_network().close()


def blobs_in(store: BlobStore) -> list[str]:
    return [b.sha256 for b in store.blobs()]


@pytest.mark.parametrize("chunking", [(), ("65536", "4")], ids=["helia-defaults", "64KiB-leaves-4-links"])
async def test_a_multi_block_unixfs_file_from_helia(js_dir: Path, tmp_path: Path, chunking: tuple[str, ...]) -> None:
    data = os.urandom(3_000_000)
    src = tmp_path / "file.bin"
    src.write_bytes(data)
    store = BlobStore(tmp_path / "blobs")
    async with helia_process(js_dir, "helia_unixfs_serve.mjs", str(src), *chunking) as helia, \
            bitswap_host() as svc:
        assert helia["blocks"] > 2 and helia["cid"].startswith("bafy")  # a dag-pb root over raw leaves
        seen: list[int] = []
        tree = await svc.fetch(store, helia["cid"], len(data), [helia["addr"]], now_ms=1,
                               progress=lambda done, total: seen.append(done))
    assert tree.sha256 == hashlib.sha256(data).digest() and tree.size == len(data)
    assert blobs_in(store) == [hashlib.sha256(data).hexdigest()]
    assert store.blob_path(tree.sha256.hex()).read_bytes() == data
    assert seen[-1] == len(data) and seen == sorted(seen)
    assert svc.counts["bitswap:fetched"] == 1
    # A later job naming the same CID starts from the store: Helia is gone now.
    async with bitswap_host() as svc:
        again = await svc.fetch(store, helia["cid"], len(data), [helia["addr"]], now_ms=2)
        assert again == tree and svc.counts["bitswap:from_store"] == 1
        with pytest.raises(CidError, match="could be reached"):  # another size is another file: fetched
            await svc.fetch(store, helia["cid"], len(data) + 1, [helia["addr"]], now_ms=2)
    store.remove(tree.sha256.hex())
    assert store.blob_of_cid(helia["cid"], len(data)) is None  # the record goes with the blob


async def test_a_dag_deeper_than_the_limit_is_refused_and_nothing_is_kept(js_dir: Path, tmp_path: Path) -> None:
    data = os.urandom(600_000)
    src = tmp_path / "file.bin"
    src.write_bytes(data)
    store = BlobStore(tmp_path / "blobs")
    # 37 leaves of 16 KiB under nodes of at most 2 links: 6 levels; the limit is 3.
    async with helia_process(js_dir, "helia_unixfs_serve.mjs", str(src), "16384", "2") as helia, \
            bitswap_host(DagLimits(depth_max=3)) as svc:
        with pytest.raises(CidError, match="deeper than 3 levels"):
            await svc.fetch(store, helia["cid"], len(data), [helia["addr"]], now_ms=1)
    assert blobs_in(store) == []
    assert [p.name for p in (tmp_path / "blobs" / "data").iterdir()] == []


async def test_a_size_that_the_dag_contradicts_is_refused(js_dir: Path, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    src = tmp_path / "file.bin"
    src.write_bytes(data)
    store = BlobStore(tmp_path / "blobs")
    async with helia_process(js_dir, "helia_unixfs_serve.mjs", str(src), "65536", "4") as helia, \
            bitswap_host() as svc:
        with pytest.raises(CidError, match="declares a file of 300000 bytes, the manifest says 299999"):
            await svc.fetch(store, helia["cid"], len(data) - 1, [helia["addr"]], now_ms=1)
    assert blobs_in(store) == []
