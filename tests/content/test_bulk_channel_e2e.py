"""The bulk side channel for blob chunks, through real node processes on loopback (#15).

- a blob fetched from one provider comes over the side channel (the
  fetcher's ``status`` counts its bytes, the provider's counts what it
  served, ``blobs.fetch`` says which chunks came that way);
- with the side channel off on the provider, or on the fetcher, the same
  fetch still works, over the libp2p stream;
- a provider whose ticket names a port where nothing listens (a firewall, a
  NAT) still serves the blob, over libp2p, without failing the fetch;
- a bulk connection that breaks mid-fetch: the rest comes over libp2p;
- a bulk port already taken turns the side channel off, not the node;
- a provider that corrupts its chunks, forges its frames or sends a frame
  longer than any chunk over the side channel is dropped at its first frame
  and the blob is fetched from the honest one.
"""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import pytest

from p2pgpu.localnet import LocalNet

pytestmark = pytest.mark.processes
MIX = [("NVIDIA L4", 23034, "8.9", 1)]
MIB = 1 << 20


def make_blob(path: Path, size: int) -> str:
    block = hashlib.sha256(path.name.encode()).digest() * (MIB // 32)
    data = b"".join(i.to_bytes(8, "big") + block[8:] for i in range(size // MIB)) + block[: size % MIB]
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def fetch(net: LocalNet, fetcher: int, providers: list[int], blob: Path, sha: str) -> dict:
    tree = ""
    for i in providers:
        tree = net.nodes[i].call("blobs.add", {"path": str(blob)}, timeout_s=120)["tree"]
    return net.nodes[fetcher].call("blobs.fetch", {
        "sha256": sha, "size_bytes": blob.stat().st_size, "tree": tree,
        "sources": [net.nodes[i].peer_id for i in providers]}, timeout_s=240)


def test_blob_comes_over_the_bulk_channel(tmp_path: Path) -> None:
    blob = tmp_path / "blob.bin"
    sha = make_blob(blob, 20 * MIB + 12345)
    with LocalNet(tmp_path / "net", 2, gpu_mix=MIX) as net:
        got = fetch(net, 1, [0], blob, sha)
        provider = net.nodes[0].peer_id
        assert got["chunks_from"] == {provider: 21}
        assert got["bulk_chunks_from"] == {provider: 21}, got
        assert got["bulk_fallbacks"] == {}
        fetcher_status = net.nodes[1].call("status")
        assert fetcher_status["bulk"]["bytes_fetched"] == blob.stat().st_size
        provider_status = net.nodes[0].call("status")
        assert provider_status["bulk"]["enabled"] is True and provider_status["bulk"]["port"] > 0
        assert provider_status["bulk"]["bytes_served"] == blob.stat().st_size
        assert provider_status["counters"]["bulk:connections"] >= 1
        assert provider_status["bulk"]["tickets"] == 0  # each one used once
        stored = net.nodes[1].home.path / "blobs"
        assert any(p.name == sha for p in stored.rglob(sha)), "the blob is in the fetcher's store"


@pytest.mark.parametrize("off_on", ["provider", "fetcher"])
def test_blob_fetch_works_with_the_bulk_channel_off_on_one_side(tmp_path: Path, off_on: str) -> None:
    blob = tmp_path / "blob.bin"
    sha = make_blob(blob, 6 * MIB)
    side = 0 if off_on == "provider" else 1
    with LocalNet(tmp_path / "net", 2, gpu_mix=MIX, node_config={side: "bulk_enabled = false"}) as net:
        got = fetch(net, 1, [0], blob, sha)
        assert got["chunks_from"] == {net.nodes[0].peer_id: 6}
        assert got["bulk_chunks_from"] == {}
        assert got["bulk_fallbacks"] == {net.nodes[0].peer_id: "not_offered"}
        assert net.nodes[1].call("status")["bulk"]["bytes_fetched"] == 0
        assert net.nodes[side].call("status")["bulk"]["enabled"] is False


def test_blob_fetch_falls_back_when_the_bulk_port_cannot_be_reached(tmp_path: Path) -> None:
    blob = tmp_path / "blob.bin"
    sha = make_blob(blob, 6 * MIB)
    with LocalNet(tmp_path / "net", 2, gpu_mix=MIX, node_config={0: 'adversary = "bulk_dead_port"'}) as net:
        got = fetch(net, 1, [0], blob, sha)
        assert got["chunks_from"] == {net.nodes[0].peer_id: 6}
        assert got["bulk_chunks_from"] == {}
        assert got["bulk_fallbacks"] == {net.nodes[0].peer_id: "connect_failed"}
        counters = net.nodes[1].call("status")["counters"]
        assert counters["blobs:bulk_fallbacks:connect_failed"] >= 1


def test_a_bulk_connection_that_breaks_mid_fetch_falls_back_to_libp2p(tmp_path: Path) -> None:
    blob = tmp_path / "blob.bin"
    sha = make_blob(blob, 12 * MIB)
    with LocalNet(tmp_path / "net", 2, gpu_mix=MIX, node_config={0: 'adversary = "bulk_break"'}) as net:
        got = fetch(net, 1, [0], blob, sha)
        provider = net.nodes[0].peer_id
        assert got["chunks_from"] == {provider: 12} and got["dropped"] == {}
        assert 1 <= got["bulk_chunks_from"][provider] <= 2  # one per bulk connection, then libp2p
        assert got["bulk_fallbacks"] == {provider: "broken"}
        assert net.nodes[1].call("status")["counters"]["blobs:bulk_fallbacks:broken"] >= 1


@pytest.mark.parametrize("adversary", ["corrupt_chunks", "bulk_forge_frames", "bulk_oversized_frames"])
def test_provider_sending_bad_bulk_frames_is_dropped(tmp_path: Path, adversary: str) -> None:
    """A wrong chunk sealed correctly, a frame whose tag does not open, a
    length over any chunk: the provider is dropped at its first frame."""
    blob = tmp_path / "blob.bin"
    sha = make_blob(blob, 12 * MIB)
    with LocalNet(tmp_path / "net", 3, gpu_mix=MIX * 3, node_config={0: f'adversary = "{adversary}"'}) as net:
        got = fetch(net, 2, [0, 1], blob, sha)
        bad, good = net.nodes[0].peer_id, net.nodes[1].peer_id
        assert got["dropped"] == {bad: "sent a chunk that does not match its hash"}
        assert got["chunks_from"] == {good: 12}
        assert got["bulk_chunks_from"] == {good: 12}


def test_a_busy_bulk_port_turns_the_side_channel_off_not_the_node(tmp_path: Path) -> None:
    blob = tmp_path / "blob.bin"
    sha = make_blob(blob, 3 * MIB)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with LocalNet(tmp_path / "net", 2, gpu_mix=MIX, node_config={0: f"bulk_port = {port}"}) as net:
            status = net.nodes[0].call("status")
            assert status["bulk"]["enabled"] is False and status["counters"]["bulk:listen_failed"] == 1
            assert "bulk side channel off: cannot listen" in net.nodes[0].log_tail(200)
            got = fetch(net, 1, [0], blob, sha)
            assert got["chunks_from"] == {net.nodes[0].peer_id: 3}
            assert got["bulk_fallbacks"] == {net.nodes[0].peer_id: "not_offered"}
