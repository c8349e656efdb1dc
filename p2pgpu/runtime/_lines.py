"""A job's output, read from its pipes: hashed, tailed, forwarded line by line.

Shared by the sandbox (``_sandbox.py``) and the Ray driver (``_ray.py``): each
stream's bytes are hashed (the proof's stdout digest) and keep a 4 KiB tail
(for error messages); lines go to ``on_line`` until ``log_bytes_max`` bytes
were forwarded, lines longer than ``line_bytes_max`` in pieces.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

LineCallback = Callable[[str, bytes], Awaitable[None]]
tail_bytes_max = 4096


@dataclass
class StreamState:
    name: str
    hash: "hashlib._Hash" = field(default_factory=hashlib.sha256)
    bytes: int = 0
    tail: bytearray = field(default_factory=bytearray)


@dataclass
class LineForwarder:
    on_line: LineCallback | None
    log_bytes_max: int
    line_bytes_max: int
    forwarded: int = 0
    truncated: bool = False

    async def emit(self, stream: str, line: bytes) -> None:
        if self.on_line is None:
            return
        if self.forwarded + len(line) > self.log_bytes_max:
            self.truncated = True
            return
        self.forwarded += len(line)
        await self.on_line(stream, line)

    async def pump(self, source: trio.abc.ReceiveStream, st: StreamState) -> None:
        line_max = self.line_bytes_max
        buf = b""
        while chunk := await source.receive_some(65536):
            st.hash.update(chunk)
            st.bytes += len(chunk)
            st.tail = (st.tail + chunk)[-tail_bytes_max:]
            buf += chunk
            while True:
                i = buf.find(b"\n")
                if 0 <= i <= line_max:
                    line, buf = buf[:i], buf[i + 1:]
                elif len(buf) >= line_max:
                    line, buf = buf[:line_max], buf[line_max:]
                else:
                    break
                await self.emit(st.name, line)
        if buf:
            await self.emit(st.name, buf)
