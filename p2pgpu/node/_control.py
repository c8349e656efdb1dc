"""The local control API: how the CLI talks to a running daemon.

Newline-delimited JSON over TCP on 127.0.0.1 only.  A request is one line,
``{"token": ..., "method": ..., "params": {...}}``; the reply is one line
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": ...}``.  Streaming
methods (``job.logs`` with follow) send ``{"ok": true, "item": ...}`` lines and
end with a ``result`` line.  The token is a random secret in the home
(``control.token``, 0600): only a user who can read the home may drive the
node.

Any local user can reach the port, so a connection without the token must
never deny the operator service (issue #12: idle connections used to take
every slot before their token was checked, and the read timeout only started
once a slot was granted):

- A new connection is *pending* until its request line has been read and its
  token checked.  Its read deadline (``request_timeout_s``) starts when it is
  accepted.  At most ``pending_max`` connections and ``pending_bytes_max``
  bytes are pending; past either, the oldest pending connection is closed, so
  a newcomer (the operator's CLI, which sends its line at once) always gets
  read.
- Only an authenticated request takes one of the ``connections_max`` handler
  slots; a wrong token is answered at once, without a slot.
- Nesting is checked on the raw bytes before parsing (``json_depth_max``): a
  100,000-deep request is refused with a clear error instead of a
  ``RecursionError``.

Each connection's handler catches its own errors, so a bad client can never
take the daemon down.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import trio

log = logging.getLogger("p2pgpu.control")

request_bytes_max = 2 * 1024 * 1024
#: Authenticated requests handled at once.
connections_max = 64
#: From accept to a complete request line, for every connection.
request_timeout_s = 10.0
#: Connections whose request is not read and authenticated yet, and their bytes.
pending_max = 256
pending_bytes_max = 8 * 1024 * 1024
#: Deepest nesting of arrays and objects a request may have.
json_depth_max = 64
#: An error reply to an unauthenticated client is not worth waiting for.
error_send_timeout_s = 1.0

Result = dict[str, Any] | list[Any]
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


_JSON_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_DEPTH_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def json_depth(line: bytes) -> int:
    """How deeply arrays and objects nest in JSON text, without parsing it
    (strings are skipped, so brackets inside them do not count).  Linear,
    never recursive."""
    brackets = _JSON_STRINGS.sub(b"", line).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    return max(accumulate(_DEPTH_STEP[b] for b in brackets))


@dataclass(eq=False)
class _Pending:
    scope: trio.CancelScope
    bytes: int = 0


@dataclass
class ControlServer:
    token: str
    handlers: dict[str, Handler]
    stream_handlers: dict[str, StreamHandler]
    #: Connections closed to make room (``status`` may report it).
    evicted: int = 0
    _pending: dict[_Pending, None] = field(default_factory=dict, init=False, repr=False)
    _pending_bytes: int = field(default=0, init=False, repr=False)

    async def serve(self, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
        bound = listeners[0].socket.getsockname()[1]
        limiter = trio.CapacityLimiter(connections_max)
        task_status.started(bound)

        async def handle(stream: trio.SocketStream) -> None:
            await self._handle(stream, limiter)

        await trio.serve_listeners(handle, listeners)

    async def _handle(self, stream: trio.SocketStream, limiter: trio.CapacityLimiter) -> None:
        conn = _Pending(trio.CancelScope(deadline=trio.current_time() + request_timeout_s))
        self._admit(conn)
        line: bytes | None = None
        try:
            with conn.scope:
                line = await self._read_line(stream, conn)
            self._release(conn)
            if line is None:
                return  # timed out, evicted, too large, or the client went away
            try:
                method, params = self._authenticate(line)
            except ControlError as exc:
                with trio.move_on_after(error_send_timeout_s):
                    await _send(stream, exc.reply())
                return
            async with limiter:
                await self._dispatch(stream, method, params)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the client went away; nothing to answer
        finally:
            self._release(conn)
            await stream.aclose()

    def _admit(self, conn: _Pending) -> None:
        self._pending[conn] = None
        while len(self._pending) > pending_max:
            self._evict_oldest(but=conn)

    def _release(self, conn: _Pending) -> None:
        if self._pending.pop(conn, 0) is None:
            self._pending_bytes -= conn.bytes

    def _evict_oldest(self, *, but: _Pending) -> None:
        oldest = next(iter(self._pending))
        if oldest is but:
            return
        self._release(oldest)
        oldest.scope.cancel()
        self.evicted += 1

    async def _read_line(self, stream: trio.SocketStream, conn: _Pending) -> bytes | None:
        buf = bytearray()
        while b"\n" not in buf:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return None
            buf += chunk
            conn.bytes += len(chunk)
            self._pending_bytes += len(chunk)
            while self._pending_bytes > pending_bytes_max and next(iter(self._pending)) is not conn:
                self._evict_oldest(but=conn)
            if len(buf) > request_bytes_max:
                with trio.move_on_after(error_send_timeout_s):
                    await _send(stream, {"ok": False, "error": f"request larger than {request_bytes_max} bytes",
                                         "code": "bad_request"})
                return None
        return bytes(buf.split(b"\n", 1)[0])

    def _authenticate(self, line: bytes) -> tuple[str, dict[str, Any]]:
        """The request's method and params, once its token is checked."""
        if json_depth(line) > json_depth_max:
            raise ControlError(f"request nested deeper than {json_depth_max} levels: refused", code="bad_request")
        try:
            req = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ControlError(f"request is not JSON: {exc}", code="bad_request") from None
        if not isinstance(req, dict) or not isinstance(req.get("method"), str):
            raise ControlError("bad request: expected {token, method, params}", code="bad_request")
        if not hmac.compare_digest(str(req.get("token", "")).encode(), self.token.encode()):
            raise ControlError("bad control token (is this the right --home?)", code="bad_token")
        params = req.get("params") or {}
        if not isinstance(params, dict):
            raise ControlError("params must be an object", code="bad_params")
        return req["method"], params

    async def _dispatch(self, stream: trio.SocketStream, method: str, params: dict[str, Any]) -> None:
        try:
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
        except Exception as exc:  # noqa: BLE001 - one bad request must never take the daemon down
            log.exception("control request failed with an internal error (a bug: please report it)")
            await _send(stream, {"ok": False, "error": f"internal error in the daemon: {type(exc).__name__}: {exc}"})


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
