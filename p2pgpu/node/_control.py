"""The local control API: how the CLI talks to a running daemon.

Newline-delimited JSON over TCP on 127.0.0.1 only.  A request is one line,
``{"token": ..., "method": ..., "params": {...}}``; the reply is one line
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": ...}``.  Streaming
methods (``job.logs`` with follow) send ``{"ok": true, "item": ...}`` lines and
end with a ``result`` line.  The token is a random secret in the home
(``control.token``, 0600): only a user who can read the home may drive the
node.  Requests are capped in size and each connection's handler catches its
own errors, so a bad client can never take the daemon down.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Union

import trio

log = logging.getLogger("p2pgpu.control")

request_bytes_max = 2 * 1024 * 1024
connections_max = 64
request_timeout_s = 10.0

Result = Union[dict[str, Any], list[Any]]
Handler = Callable[[dict[str, Any]], Awaitable[Result]]
StreamHandler = Callable[[dict[str, Any]], AsyncIterator[Any]]


class ControlError(Exception):
    """A request the daemon refuses; the message goes back to the client, with
    an optional machine-readable ``code`` (e.g. ``bad_manifest``) and
    ``details`` (e.g. ``{"field": "requirements.nodes"}``) for the SDK."""

    def __init__(self, message: str, *, code: str = "", details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.details = dict(details or {})

    def reply(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"ok": False, "error": str(self)}
        if self.code:
            doc["code"] = self.code
        if self.details:
            doc["details"] = self.details
        return doc


@dataclass
class ControlServer:
    token: str
    handlers: dict[str, Handler]
    stream_handlers: dict[str, StreamHandler]

    async def serve(self, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
        bound = listeners[0].socket.getsockname()[1]
        limiter = trio.CapacityLimiter(connections_max)
        task_status.started(bound)

        async def handle(stream: trio.SocketStream) -> None:
            async with limiter:
                await self._handle(stream)

        await trio.serve_listeners(handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(request_timeout_s) as scope:
                line = await _read_line(stream)
            if scope.cancelled_caught or line is None:
                return
            await self._dispatch(stream, line)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the client went away; nothing to answer
        finally:
            await stream.aclose()

    async def _dispatch(self, stream: trio.SocketStream, line: bytes) -> None:
        try:
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("method"), str):
                raise ControlError("bad request: expected {token, method, params}")
            if not hmac.compare_digest(str(req.get("token", "")).encode(), self.token.encode()):
                raise ControlError("bad control token (is this the right --home?)")
            method = req["method"]
            params = req.get("params") or {}
            if not isinstance(params, dict):
                raise ControlError("params must be an object")
            if method in self.stream_handlers:
                async for item in self.stream_handlers[method](params):
                    await _send(stream, {"ok": True, "item": item})
                await _send(stream, {"ok": True, "result": {}})
                return
            handler = self.handlers.get(method)
            if handler is None:
                raise ControlError(f"unknown method {method!r}")
            result = await handler(params)
            await _send(stream, {"ok": True, "result": result})
        except ControlError as exc:
            await _send(stream, exc.reply())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            await _send(stream, {"ok": False, "error": str(exc)})
        except Exception as exc:  # noqa: BLE001 - one bad request must never take the daemon down
            log.exception("control request failed with an internal error (a bug: please report it)")
            await _send(stream, {"ok": False, "error": f"internal error in the daemon: {type(exc).__name__}: {exc}"})


async def _read_line(stream: trio.SocketStream) -> bytes | None:
    buf = bytearray()
    while b"\n" not in buf:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        buf += chunk
        if len(buf) > request_bytes_max:
            await _send(stream, {"ok": False, "error": f"request larger than {request_bytes_max} bytes"})
            return None
    return bytes(buf.split(b"\n", 1)[0])


async def _send(stream: trio.SocketStream, doc: dict[str, Any]) -> None:
    await stream.send_all(json.dumps(doc, sort_keys=True).encode() + b"\n")


# ---------------------------------------------------------------- client side


class DaemonUnavailable(Exception):
    """No daemon answers for this home."""


def call(port: int, token: str, method: str, params: dict[str, Any] | None = None,
         *, timeout_s: float = 30.0) -> Any:
    """Blocking request/response (the CLI is synchronous)."""
    for msg in call_stream(port, token, method, params, timeout_s=timeout_s):
        if "result" in msg:
            return msg["result"]
    raise DaemonUnavailable("the daemon closed the connection without answering")


def call_stream(port: int, token: str, method: str, params: dict[str, Any] | None = None,
                *, timeout_s: float | None = 30.0) -> Any:
    """Yield each reply line (dicts with ``item`` or ``result``)."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5.0)
    except OSError as exc:
        raise DaemonUnavailable(f"cannot reach the daemon's control port {port}: {exc.strerror or exc}") from None
    # The file made by makefile() holds the socket open: close both.
    with sock, sock.makefile("rb") as f:
        sock.settimeout(timeout_s)
        sock.sendall(json.dumps({"token": token, "method": method, "params": params or {}}).encode() + b"\n")
        while True:
            try:
                line = f.readline(request_bytes_max * 8)
            except socket.timeout:
                raise DaemonUnavailable(f"the daemon did not answer {method} within {timeout_s} s") from None
            if not line:
                raise DaemonUnavailable("the daemon closed the connection")
            msg = json.loads(line)
            if not msg.get("ok"):
                details = msg.get("details")
                raise ControlError(msg.get("error", "unknown error"), code=str(msg.get("code") or ""),
                                   details=details if isinstance(details, dict) else None)
            yield msg
            if "result" in msg:
                return
