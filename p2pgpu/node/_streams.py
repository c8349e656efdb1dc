"""Direct streams: length-prefixed frames, guarded handlers, one-shot requests.

In py-libp2p one exception escaping any stream handler ends the whole host
(libp2p notes, trap 3), so every handler we register goes through
:func:`guarded`: a peer's bad input (``PeerMisbehaved``) is counted by reason
and the stream reset; a stream that breaks is counted as such; and anything
else is logged as *our* bug with its traceback and counted, but still never
escapes into the library.  Frames are an unsigned varint length and the
bytes; the length is checked against the caller's limit before reading.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Awaitable, Callable

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID

from p2pgpu.core import PeerMisbehaved, Reason
from p2pgpu.core._ipfs import put_uvarint

log = logging.getLogger("p2pgpu.streams")

_VARINT_BYTES_MAX = 10


class StreamGone(Exception):
    """The stream closed, reset or timed out: an operating failure."""


async def _read_exactly(stream: INetStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = await stream.read(n - len(buf))
        except BaseLibp2pError as exc:
            raise StreamGone(type(exc).__name__) from None
        if not chunk:
            raise StreamGone("end of stream")
        buf += chunk
    return bytes(buf)


async def read_frame(stream: INetStream, size_max: int) -> bytes:
    """One frame, or ``PeerMisbehaved`` for a bad length, ``StreamGone`` on EOF."""
    length = 0
    for i in range(_VARINT_BYTES_MAX):
        byte = (await _read_exactly(stream, 1))[0]
        length |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            break
    else:
        raise PeerMisbehaved(Reason.MALFORMED, "frame length varint too long")
    if length > size_max:
        raise PeerMisbehaved(Reason.OVERSIZED, f"frame of {length} bytes > {size_max}")
    return await _read_exactly(stream, length) if length else b""


async def write_frame(stream: INetStream, data: bytes) -> None:
    try:
        await stream.write(put_uvarint(len(data)) + data)
    except BaseLibp2pError as exc:
        raise StreamGone(type(exc).__name__) from None


async def _reset(stream: INetStream) -> None:
    try:
        await stream.reset()
    except BaseLibp2pError:
        pass  # already gone: resetting a dead stream has nothing left to do


StreamHandler = Callable[[INetStream], Awaitable[None]]


def guarded(name: str, handler: StreamHandler, counts: Counter[str], *, timeout_s: float = 30.0) -> StreamHandler:
    """Wrap a stream handler so that nothing it raises reaches libp2p."""

    async def run(stream: INetStream) -> None:
        try:
            with trio.fail_after(timeout_s):
                await handler(stream)
        except PeerMisbehaved as exc:
            counts[f"{name}:{exc.reason.name.lower()}"] += 1
            log.info("%s: rejected input from a peer: %s", name, exc)
            await _reset(stream)
        except (StreamGone, trio.TooSlowError) as exc:
            counts[f"{name}:stream_gone"] += 1
            log.debug("%s: stream ended early: %s", name, exc)
            await _reset(stream)
        except BaseLibp2pError as exc:
            counts[f"{name}:stream_error"] += 1
            log.debug("%s: stream error: %s", name, exc)
            await _reset(stream)
        except Exception:  # noqa: BLE001 - the host must survive our own bugs too
            counts[f"{name}:internal_error"] += 1
            log.exception("%s: internal error in a stream handler (a bug: please report it)", name)
            await _reset(stream)
        else:
            try:
                await stream.close()
            except BaseLibp2pError:
                pass  # the peer closed first: nothing to flush

    return run


async def request(
    host: IHost,
    peer_id: str,
    protocol: str,
    payload: bytes,
    *,
    frame_bytes_max: int,
    frames_max: int = 1,
    timeout_s: float = 5.0,
) -> list[bytes]:
    """Open a stream, send one frame, read up to ``frames_max`` reply frames
    until the peer closes.  Raises ``StreamGone`` or ``PeerMisbehaved``."""
    frames: list[bytes] = []
    with trio.move_on_after(timeout_s) as scope:
        try:
            stream = await host.new_stream(ID.from_base58(peer_id), [TProtocol(protocol)])
        except (BaseLibp2pError, ValueError) as exc:
            raise StreamGone(f"cannot open {protocol} to {peer_id}: {type(exc).__name__}") from None
        try:
            await write_frame(stream, payload)
            while len(frames) < frames_max:
                try:
                    frames.append(await read_frame(stream, frame_bytes_max))
                except StreamGone:
                    break  # the peer closed after its last frame
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await (_reset(stream) if scope.cancel_called else _close(stream))
    if scope.cancelled_caught:
        raise StreamGone(f"{protocol} to {peer_id} timed out after {timeout_s} s")
    return frames


async def _close(stream: INetStream) -> None:
    try:
        await stream.close()
    except BaseLibp2pError:
        pass  # closing a stream the peer already reset
