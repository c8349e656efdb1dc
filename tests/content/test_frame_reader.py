"""The fetcher's frame reader (``node/_blobs.FrameReader``): the same frames
and errors as ``_streams.read_frame`` for any split of the byte stream, in
far fewer reads of the stream."""

from __future__ import annotations

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pgpu.core import PeerMisbehaved, Reason
from p2pgpu.core._ipfs import put_uvarint
from p2pgpu.node._blobs import FrameReader, frame_reader
from p2pgpu.node._streams import StreamGone, read_frame


class Pieces:
    """A stream that returns its bytes in the given piece sizes (at most what is asked)."""

    def __init__(self, data: bytes, cuts: list[int]) -> None:
        self.data, self.cuts, self.pos, self.reads = data, cuts or [1 << 30], 0, 0

    async def read(self, n: int = -1) -> bytes:
        size = self.cuts[self.reads % len(self.cuts)]
        self.reads += 1
        got = self.data[self.pos:self.pos + min(n, size)]
        self.pos += len(got)
        return got


async def _all(read: object, size_max: int) -> tuple[list[bytes], str]:
    out = []
    try:
        while True:
            out.append(await read(size_max))  # type: ignore[operator]
    except StreamGone:
        return out, "gone"
    except PeerMisbehaved as exc:
        return out, exc.reason.name


@settings(max_examples=200, deadline=None)
@given(frames=st.lists(st.binary(max_size=3000), max_size=6), tail=st.binary(max_size=12),
       cuts=st.lists(st.integers(1, 5000), max_size=4), size_max=st.sampled_from([0, 100, 5000]))
def test_same_frames_and_errors_as_read_frame(frames: list[bytes], tail: bytes, cuts: list[int],
                                              size_max: int) -> None:
    wire = b"".join(put_uvarint(len(f)) + f for f in frames) + tail

    async def both() -> None:
        plain = Pieces(wire, cuts)
        want = await _all(lambda m: read_frame(plain, m), size_max)  # type: ignore[arg-type]
        got = await _all(FrameReader(Pieces(wire, cuts)).frame, size_max)
        assert got == want

    trio.run(both)


async def test_a_megabyte_frame_in_few_reads() -> None:
    chunk = bytes(range(256)) * 4096
    stream = Pieces((put_uvarint(len(chunk)) + chunk) * 4, [4 << 20])
    reader = frame_reader(stream)
    assert [await reader.frame(1 << 20) for _ in range(4)] == [chunk] * 4
    assert stream.reads <= 2 and frame_reader(stream) is reader  # read_frame: a read per length byte, more per body


@pytest.mark.parametrize("wire, reason", [
    (b"\xff" * 11, Reason.MALFORMED),          # a varint longer than 10 bytes
    (put_uvarint(2000) + b"x" * 2000, Reason.OVERSIZED),
])
async def test_hostile_lengths(wire: bytes, reason: Reason) -> None:
    with pytest.raises(PeerMisbehaved) as err:
        await FrameReader(Pieces(wire, [3])).frame(1000)
    assert err.value.reason is reason


async def test_end_of_stream_mid_frame() -> None:
    with pytest.raises(StreamGone):
        await FrameReader(Pieces(put_uvarint(10) + b"abc", [])).frame(100)
