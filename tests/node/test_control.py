"""The control API server on real loopback sockets (``node/_control.py``).

Requests with the token are answered; without it, refused at once and
without a handler slot; a 100,000-deep request is refused with a clear error,
never a ``RecursionError``; connections that never send their line, or send
megabytes of it, cannot keep the operator out (#12.4).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from p2pgpu.node import _control
from p2pgpu.node._control import ControlServer, json_depth

TOKEN = "t" * 32


@asynccontextmanager
async def serving(**handlers: Any) -> AsyncIterator[tuple[int, ControlServer]]:
    calls: list[str] = []

    async def status(params: dict[str, Any]) -> dict[str, Any]:
        calls.append("status")
        return {"ok": 1}

    server = ControlServer(token=TOKEN, handlers={"status": status, **handlers}, stream_handlers={})
    async with trio.open_nursery() as n:
        port = await n.start(server.serve, 0)
        yield port, server
        n.cancel_scope.cancel()


async def request(port: int, line: bytes, *, timeout_s: float = 10.0) -> dict[str, Any]:
    with trio.fail_after(timeout_s):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(line)
            buf = b""
            while b"\n" not in buf:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    raise EOFError("closed without a reply")
                buf += chunk
            return json.loads(buf.split(b"\n")[0])  # type: ignore[no-any-return]


def line(token: str = TOKEN, method: str = "status", params: Any = None) -> bytes:
    return json.dumps({"token": token, "method": method, "params": params or {}}).encode() + b"\n"


async def test_token_holder_is_answered_and_stranger_refused() -> None:
    async with serving() as (port, _):
        assert await request(port, line()) == {"ok": True, "result": {"ok": 1}}
        bad = await request(port, line(token="x"))
        assert bad["ok"] is False and "bad control token" in bad["error"]
        assert "unknown method" in (await request(port, line(method="nope")))["error"]
        assert "not JSON" in (await request(port, b"{nope\n"))["error"]


async def test_a_100000_deep_request_gets_a_clear_error() -> None:
    called: list[Any] = []

    async def submit(params: dict[str, Any]) -> dict[str, Any]:
        called.append(params)
        return {}

    async with serving(**{"job.submit": submit}) as (port, _):
        deep = b'{"token": "' + TOKEN.encode() + b'", "method": "job.submit", "params": {"m": ' \
            + b"[" * 100_000 + b"]" * 100_000 + b"}}\n"
        reply = await request(port, deep)
        assert reply["ok"] is False
        assert "nested deeper than 64 levels" in reply["error"] and "RecursionError" not in reply["error"]
        assert called == []
        ok = json.dumps({"token": TOKEN, "method": "job.submit", "params": {"m": [[[1]]]}}).encode() + b"\n"
        assert (await request(port, ok))["ok"] is True


@pytest.mark.parametrize(("text", "depth"), [
    (b"1", 0), (b"[]", 1), (b'{"a": [1, {"b": 2}]}', 3),
    (b'{"a": "[[[[{{{{"}', 1),  # brackets inside strings do not count
    (b'["\\"[[[", [2]]', 2),  # nor after an escaped quote
    (b'["\\\\", [[3]]]', 3),  # an escaped backslash ends before the quote
    (b"[" * 100_000, 100_000),
])
def test_json_depth(text: bytes, depth: int) -> None:
    assert json_depth(text) == depth


async def test_idle_connections_never_lock_the_operator_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: 64 idle connections held every slot (taken before the token
    was read) and the read timeout started only once a slot was granted."""
    monkeypatch.setattr(_control, "pending_max", 32)
    async with serving() as (port, server):
        idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(100)]
        try:
            for _ in range(3):
                assert (await request(port, line(), timeout_s=5))["ok"] is True
            assert server.evicted >= 100 - 32
        finally:
            for s in idle:
                await s.aclose()


async def test_megabytes_without_a_newline_cannot_fill_memory_or_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_control, "pending_bytes_max", 4 * 1024 * 1024)
    async with serving() as (port, server):
        hogs = []
        for _ in range(8):  # 8 MiB offered against a 4 MiB budget
            s = await trio.open_tcp_stream("127.0.0.1", port)
            hogs.append(s)
            with trio.move_on_after(2):
                await s.send_all(b"x" * (1024 * 1024))
        await trio.sleep(0.2)
        assert server._pending_bytes <= 4 * 1024 * 1024
        assert server.evicted >= 4
        assert (await request(port, line(), timeout_s=5))["ok"] is True
        for s in hogs:
            await s.aclose()


async def test_the_read_deadline_starts_at_accept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_control, "request_timeout_s", 0.5)
    async with serving() as (port, _):
        s = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(5):
            assert await s.receive_some(10) == b""  # closed by the server, unanswered
        await s.aclose()
