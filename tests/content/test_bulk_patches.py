"""The bulk-transfer patches (``node/_patches.py``, B1-B3) keep the wire and
do less work per byte.

- interoperability: a patched host and an *unpatched* py-libp2p host (a child
  process that never imports our patch layer) move 6 MiB each way on one
  stream, intact, with bulk frames on;
- the gain, counted (not timed): a 4 MiB write on a bulk stream costs a few
  socket writes and Yamux frames instead of upstream's 64 of each, and the
  Noise reader asks the socket far fewer times;
- the buffered Noise reader cuts messages at any split of the byte stream,
  and a connection that closes mid-message raises upstream's error;
- a patch whose upstream source changed is skipped with a warning.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import multiaddr
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.io import trio as trio_io
from libp2p.io.exceptions import IncompleteReadError
from libp2p.network.config import ConnectionConfig
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise import io as nio
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux import yamux as ymod

from p2pgpu.node import _patches

BULK = ["yamux_bulk_frames", "noise_write_once", "noise_buffered_reads"]
PROTO = TProtocol("/p2pgpu/test-bulk/1")
MIB = 1 << 20


@pytest.fixture
def bulk(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(_patches.DISABLE_ENV, raising=False)
    before = _patches.installed()
    _patches.remove()
    assert _patches.apply(only=BULK) == BULK
    yield
    _patches.remove()
    _patches.apply(only=before)


@pytest.fixture
def upstream() -> Iterator[None]:
    before = _patches.installed()
    _patches.remove()
    yield
    _patches.apply(only=before)


def _host(seed: bytes) -> Any:
    kp = create_new_key_pair(seed)
    return new_host(key_pair=kp, sec_opt={NOISE_ID: NoiseTransport(kp, noise_privkey=create_x25519_key_pair().private_key)},
                    muxer_preference="YAMUX", connection_config=ConnectionConfig(max_connections_per_peer=1))


def _payload(n: int, tag: bytes) -> bytes:
    block = hashlib.sha256(tag).digest() * (MIB // 32)
    return b"".join(i.to_bytes(4, "big") + block[4:] for i in range(n // MIB))


@asynccontextmanager
async def _running(host: Any) -> AsyncIterator[Any]:
    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        try:
            yield host
        finally:
            # leaving host.run() leaves the swarm's sockets open: close them
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await host.get_network().close()


async def _read_n(stream: Any, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        got = await stream.read(min(n - len(buf), MIB))
        if not got:
            break
        buf += got
    return bytes(buf)


# --- interoperability with an unpatched py-libp2p ------------------------------

_PLAIN_PEER = textwrap.dedent("""
    # A py-libp2p host as released (this process never imports p2pgpu's patches):
    # it reads N bytes, answers their sha256, then sends N bytes of its own.
    import hashlib, sys
    import multiaddr, trio
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.crypto.x25519 import create_new_key_pair as x25519
    from libp2p.network.config import ConnectionConfig
    from libp2p.security.noise.transport import PROTOCOL_ID, Transport
    assert "p2pgpu" not in sys.modules
    N = int(sys.argv[1])
    async def main():
        kp = create_new_key_pair(b"u" * 32)
        host = new_host(key_pair=kp, sec_opt={PROTOCOL_ID: Transport(kp, noise_privkey=x25519().private_key)},
                        muxer_preference="YAMUX", connection_config=ConnectionConfig(max_connections_per_peer=1))
        done = trio.Event()
        async def handler(stream):
            h, got = hashlib.sha256(), 0
            while got < N:
                d = await stream.read(1 << 20)
                h.update(d); got += len(d)
            await stream.write(h.digest())
            block = hashlib.sha256(b"back").digest() * (1 << 15)
            for i in range(N >> 20):
                await stream.write(i.to_bytes(4, "big") + block[4:])
            await stream.close()
            done.set()
        async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            host.set_stream_handler("/p2pgpu/test-bulk/1", handler)
            print(host.get_addrs()[0], flush=True)
            with trio.fail_after(60):
                await done.wait()
            await trio.sleep(0.5)
    trio.run(main)
""")


async def test_patched_host_interoperates_with_unpatched_py_libp2p(bulk: None) -> None:
    n = 6 * MIB
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = await trio.lowlevel.open_process([sys.executable, "-c", _PLAIN_PEER, str(n)],
                                            stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        line = b""
        with trio.fail_after(30):
            while not line.endswith(b"\n"):
                line += await proc.stdout.receive_some(1)
        async with _running(_host(b"p" * 32)) as host:
            info = info_from_p2p_addr(multiaddr.Multiaddr(line.decode().strip()))
            await host.connect(info)
            stream = await host.new_stream(info.peer_id, [PROTO])
            stream.muxed_stream.p2pgpu_frame_bytes_max = MIB + 16
            stream.muxed_stream.target_recv_window = 16 * MIB
            out = _payload(n, b"there")
            with trio.fail_after(60):
                await stream.write(out)
                assert await _read_n(stream, 32) == hashlib.sha256(out).digest()
                back = await _read_n(stream, n)
            assert back == _payload(n, b"back")
            # The bulk stream really sent large frames (not upstream's 64 KiB).
            assert stream.muxed_stream.send_window >= 0
            await stream.close()
        with trio.fail_after(30):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# --- the gain, counted -------------------------------------------------------------


@asynccontextmanager
async def _pair() -> AsyncIterator[tuple[Any, Any]]:
    """(sender stream, receiver stream) between two in-process hosts."""
    a, b = _host(b"a" * 32), _host(b"b" * 32)
    accepted: trio.MemorySendChannel[Any]
    accepted, incoming = trio.open_memory_channel[Any](1)

    async def handler(stream: Any) -> None:
        await accepted.send(stream)
        await trio.sleep_forever()

    async with _running(a), _running(b):
        b.set_stream_handler(PROTO, handler)
        info = info_from_p2p_addr(b.get_addrs()[0])
        await a.connect(info)
        out = await a.new_stream(info.peer_id, [PROTO])
        await out.write(b"hi")
        inn = await incoming.receive()
        assert await inn.read(2) == b"hi"
        inn.muxed_stream.target_recv_window = 16 * MIB
        yield out, inn


async def _count_transfer(monkeypatch: pytest.MonkeyPatch, frame_bytes: int) -> dict[str, int]:
    counts = {"socket_writes": 0, "socket_reads": 0, "yamux_data_frames": 0}
    real_write, real_read = trio_io.TrioTCPStream.write, trio_io.TrioTCPStream.read
    real_frame = ymod.Yamux._write_frame

    async def write(self: Any, data: bytes) -> None:
        counts["socket_writes"] += 1
        await real_write(self, data)

    async def read(self: Any, n: int | None = None) -> bytes:
        counts["socket_reads"] += 1
        return await real_read(self, n)

    async def write_frame(self: Any, data: bytes) -> None:
        if data[1] == ymod.TYPE_DATA and len(data) > ymod.HEADER_SIZE:
            counts["yamux_data_frames"] += 1
        await real_frame(self, data)

    payload = _payload(4 * MIB, b"count")
    async with _pair() as (out, inn):
        # The receiver opens its window first (a 16 MiB target, sent on its first read).
        out.muxed_stream.p2pgpu_frame_bytes_max = frame_bytes
        monkeypatch.setattr(trio_io.TrioTCPStream, "write", write)
        monkeypatch.setattr(trio_io.TrioTCPStream, "read", read)
        monkeypatch.setattr(ymod.Yamux, "_write_frame", write_frame)
        async with trio.open_nursery() as n:
            n.start_soon(out.write, payload)
            with trio.fail_after(60):
                got = await _read_n(inn, len(payload))
        monkeypatch.undo()
        assert got == payload
    return counts


async def test_bulk_stream_costs_few_frames_writes_and_reads(bulk: None, monkeypatch: pytest.MonkeyPatch) -> None:
    patched = await _count_transfer(monkeypatch, MIB + 16)
    # 4 MiB in 1 MiB frames: ~4 DATA frames (a window update may split one),
    # each one socket write; reads in 256 KiB pieces.
    assert patched["yamux_data_frames"] <= 8, patched
    assert patched["socket_writes"] <= 24, patched  # data frames plus a few window updates
    assert patched["socket_reads"] <= 64, patched


async def test_upstream_costs_many_more(upstream: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # The same transfer without the patches: what the gain test above is against.
    counts = await _count_transfer(monkeypatch, MIB + 16)
    assert counts["yamux_data_frames"] >= 64, counts
    assert counts["socket_writes"] >= 128, counts  # each 64 KiB frame is two Noise messages, two sends
    assert counts["socket_reads"] >= 128, counts


async def test_streams_that_do_not_ask_keep_64_kib_frames(bulk: None, monkeypatch: pytest.MonkeyPatch) -> None:
    counts = await _count_transfer(monkeypatch, 0)
    assert counts["yamux_data_frames"] >= 64, counts


# --- the buffered Noise reader --------------------------------------------------------


class _Conn:
    """A raw connection serving fixed bytes in the given cut sizes."""

    def __init__(self, data: bytes, cuts: list[int]) -> None:
        self.data, self.cuts, self.pos, self.reads = data, cuts or [len(data) or 1], 0, 0

    async def read(self, n: int | None = None) -> bytes:
        size = self.cuts[self.reads % len(self.cuts)]
        self.reads += 1
        take = min(n if n is not None else len(self.data), max(size, 1))
        chunk = self.data[self.pos:self.pos + take]
        self.pos += len(chunk)
        return chunk


class _Plain(nio.NoiseTransportReadWriter):
    """The transport reader with the cipher left out (the reader under test
    cuts messages; decryption is upstream's, unchanged)."""

    def decrypt(self, data: bytes) -> bytes:
        return data


async def _messages(reader: Any) -> tuple[list[bytes], str | None]:
    out = []
    try:
        for _ in range(1000):
            out.append(await reader.read_msg())
    except IncompleteReadError as exc:
        return out, f"incomplete:{exc.is_clean_close}"
    return out, None


@settings(max_examples=100, deadline=None)
@given(messages=st.lists(st.binary(max_size=3000), max_size=8), tail=st.binary(max_size=5),
       cuts=st.lists(st.integers(64, 5000), max_size=5))
def test_buffered_noise_reader_matches_upstream(messages: list[bytes], tail: bytes, cuts: list[int]) -> None:
    wire = b"".join(len(m).to_bytes(2, "big") + m for m in messages) + tail
    before = _patches.installed()
    _patches.remove()
    try:
        upstream_read = nio.BaseNoiseMsgReadWriter.read_msg
        _patches.apply(only=["noise_buffered_reads"])
        patched_read = nio.BaseNoiseMsgReadWriter.read_msg
    finally:
        _patches.remove()
        _patches.apply(only=before)

    async def both() -> None:
        a, b = _Plain.__new__(_Plain), _Plain.__new__(_Plain)
        a.read_writer = nio.NoisePacketReadWriter(_Conn(wire, cuts))  # type: ignore[arg-type]
        b.read_writer = nio.NoisePacketReadWriter(_Conn(wire, cuts))  # type: ignore[arg-type]
        want = await _messages(_Bound(a, upstream_read))
        got = await _messages(_Bound(b, patched_read))
        # Same messages; at the end both raise the same error (a clean close
        # only when nothing of a message had arrived).
        assert got == want

    trio.run(both)


class _Bound:
    def __init__(self, rw: Any, fn: Any) -> None:
        self.rw, self.fn = rw, fn

    async def read_msg(self) -> bytes:
        return await self.fn(self.rw)  # type: ignore[no-any-return]


async def test_buffered_noise_reader_reads_ahead(bulk: None) -> None:
    messages = [bytes([i]) * 60_000 for i in range(8)]
    conn = _Conn(b"".join(len(m).to_bytes(2, "big") + m for m in messages), [1 << 20])
    rw = _Plain.__new__(_Plain)
    rw.read_writer = nio.NoisePacketReadWriter(conn)  # type: ignore[arg-type]
    assert [await rw.read_msg() for _ in messages] == messages
    assert conn.reads <= 3  # upstream: two reads per message (16)


async def test_buffered_noise_reader_cut_mid_message(bulk: None) -> None:
    rw = _Plain.__new__(_Plain)
    rw.read_writer = nio.NoisePacketReadWriter(_Conn(b"\x00\x05abc", []))  # type: ignore[arg-type]
    with pytest.raises(IncompleteReadError) as err:
        await rw.read_msg()
    assert not err.value.is_clean_close


# --- pinning ---------------------------------------------------------------------------


def test_changed_upstream_source_skips_the_patch(upstream: None, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv(_patches.DISABLE_ENV, raising=False)
    monkeypatch.setattr(_patches, "YAMUX_WRITE_SHA256", "0" * 64)
    original = ymod.YamuxStream.write
    with caplog.at_level(logging.WARNING, logger=_patches.__name__):
        assert _patches.apply(only=BULK) == ["noise_write_once", "noise_buffered_reads"]
    assert ymod.YamuxStream.write is original
    assert "yamux_bulk_frames NOT applied" in caplog.text
    _patches.remove()


def test_bulk_patches_pinned_to_the_installed_source() -> None:
    # If this fails, py-libp2p changed: re-read the upstream functions and
    # update the patches and their hashes together.
    # Read in a fresh interpreter: in this one an earlier test may have the
    # patches on, and then the attributes are ours, not upstream's.
    code = (
        "from libp2p.stream_muxer.yamux import yamux as ymod\n"
        "from libp2p.security.noise import io as nio\n"
        "from p2pgpu.node import _patches as p\n"
        "print(p._source_sha256(ymod.YamuxStream.write))\n"
        "print(p._source_sha256(nio.BaseNoiseMsgReadWriter.write_msg))\n"
        "print(p._source_sha256(nio.BaseNoiseMsgReadWriter.read_msg))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == [_patches.YAMUX_WRITE_SHA256, _patches.NOISE_WRITE_SHA256,
                                  _patches.NOISE_READ_SHA256]


_MALLINFO = textwrap.dedent("""
    import ctypes, sys
    from p2pgpu.node import _patches

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    tuned = _patches.tune_malloc() if sys.argv[1] == "tuned" else False
    freed = []
    for _ in range(3):  # what a fetch does per frame: a large buffer, used and freed
        buf = bytearray(8 << 20)
        freed.append(libc.mallinfo2().hblkhd)
        del buf
    print(tuned, max(freed))
""")


@pytest.mark.parametrize("mode", ["tuned", "default"])
def test_tune_malloc_keeps_large_transfer_buffers_in_the_heap(mode: str) -> None:
    """B4: after ``tune_malloc`` an 8 MiB buffer comes from the heap (reused),
    not from an mmap of its own that glibc unmaps when it is freed."""
    if not hasattr(__import__("ctypes").CDLL(None), "mallinfo2"):
        pytest.skip("mallinfo2 needs glibc 2.33 or later")
    r = subprocess.run([sys.executable, "-c", _MALLINFO, mode], capture_output=True, text=True, timeout=60,
                       check=True, env={**os.environ, _patches.DISABLE_ENV: ""})
    tuned, mmapped = r.stdout.split()
    if mode == "tuned":
        assert tuned == "True" and int(mmapped) < 8 << 20, r.stdout
    else:
        assert int(mmapped) >= 8 << 20, r.stdout  # glibc's default: a mapping of its own


@pytest.mark.parametrize("env", [_patches.DISABLE_ENV, _patches.MALLOC_TUNE_ENV])
def test_tune_malloc_is_off_with_the_patches_or_on_its_own(env: str) -> None:
    r = subprocess.run([sys.executable, "-c", "from p2pgpu.node import _patches; print(_patches.tune_malloc())"],
                       capture_output=True, text=True, timeout=60, check=True, env={**os.environ, env: "0"})
    assert r.stdout.strip() == "False"
