"""``p2pgpu ledger serve``: a local Solana JSON-RPC node over an :class:`SvmLedger`.

HTTP JSON-RPC on ``port`` and websocket subscriptions on ``port + 1`` (the
convention every Solana client follows), on 127.0.0.1 by default.  Built on
trio's own sockets with h11 for HTTP (trio's ``SocketStream`` sets
``TCP_NODELAY``, without which each reply waits ~40 ms for Nagle) and
trio-websocket for the subscriptions: a request is parsed, handed to
:class:`RpcMethods` and answered inline, with no thread hop, because one
LiteSVM call is tens of microseconds.

Blocks: a ticker advances one block every ``slot_ms`` (400 ms like a real
cluster), so blockhashes expire after 150 blocks (60 s).  Subscriptions:
``signatureSubscribe`` (notified once when the signature executes, or at
once if it already has), ``slotSubscribe``, ``rootSubscribe`` and
``accountSubscribe`` (notified when a transaction touches the account).
Each websocket has a bounded outbox; a client that does not read is
disconnected rather than allowed to grow memory.

Strangers who reach the ports (issue #18.7): every wait has a bound
(:class:`ServerLimits`): an HTTP connection with no request under way is
closed after ``idle_timeout_s``, a request must arrive whole within
``request_timeout_s`` of its first byte, a reply or notification must leave
within ``send_timeout_s``, a websocket handshake within
``handshake_timeout_s``, and a websocket without subscriptions idles no
longer than an HTTP connection.  At most ``connections_max`` connections
(HTTP and websocket together, kept below the process's file-descriptor
limit) are held; a full table closes its longest-idle connection to admit a
newcomer (``_conns.py``), so held-open connections cannot starve new
clients.  Airdrops are limited by the ledger (``_faucet.py``).
"""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

import h11
import trio
from solders.pubkey import Pubkey
from solders.transaction import VersionedTransaction
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, wrap_server_stream

from ._conns import Conn, ConnectionTable
from ._faucet import AirdropLimits
from ._rpc import RpcMethods, _pubkey
from ._svm import RpcError, SvmLedger

log = logging.getLogger("p2pgpu.ledger")
request_bytes_max = 1024 * 1024
ws_outbox_max = 1024
subscriptions_per_socket_max = 10_000
#: File descriptors kept free for everything but connections (state files, listeners, trio).
fd_reserve = 64


@dataclass(frozen=True, kw_only=True)
class ServerLimits:
    """Bounds on what one client can hold (see the module docstring)."""

    connections_max: int = 1024
    idle_timeout_s: float = 30.0
    request_timeout_s: float = 10.0
    send_timeout_s: float = 10.0
    handshake_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.connections_max < 1:
            raise ValueError("connections_max must be at least 1")
        for name in ("idle_timeout_s", "request_timeout_s", "send_timeout_s", "handshake_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")


def connection_budget(wanted: int) -> int:
    """``wanted`` connections, or fewer if the process's file-descriptor limit
    would not leave ``fd_reserve`` free (accepting into EMFILE stalls every client)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - fd_reserve))
_CORS = [
    (b"access-control-allow-origin", b"*"),
    (b"access-control-allow-methods", b"POST, GET, OPTIONS"),
    (b"access-control-allow-headers", b"content-type, solana-client"),
]


@dataclass(eq=False)
class _Socket:
    send: trio.MemorySendChannel[str]
    subs: dict[int, tuple[str, Any]] = field(default_factory=dict)


class _SlowRequest(Exception):
    """A request did not arrive whole within the request timeout."""


class LedgerServer:
    def __init__(self, ledger: SvmLedger, *, slot_ms: int = 400, host: str = "127.0.0.1",
                 limits: ServerLimits | None = None) -> None:
        self.ledger = ledger
        self.slot_ms = slot_ms
        self.host = host
        self.limits = limits or ServerLimits()
        self.conns = ConnectionTable(connection_budget(self.limits.connections_max))
        self.rpc = RpcMethods(ledger, on_executed=self._executed)
        self._ids = count(1)
        self._sig_subs: dict[str, list[tuple[_Socket, int]]] = {}
        self._acct_subs: dict[str, list[tuple[_Socket, int, str]]] = {}
        self._slot_subs: list[tuple[_Socket, int, str]] = []
        self.port = 0
        self.ws_port = 0
        self.requests = 0

    # --- lifecycle -------------------------------------------------------

    async def serve(self, port: int = 8899, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        if self.conns.capacity < self.limits.connections_max:
            log.warning("at most %d connections: the file-descriptor limit (ulimit -n) leaves no room for %d",
                        self.conns.capacity, self.limits.connections_max)
        async with trio.open_nursery() as nursery:
            for _attempt in range(50):
                listeners = await trio.open_tcp_listeners(port, host=self.host)
                self.port = listeners[0].socket.getsockname()[1]
                try:
                    ws_listeners = await trio.open_tcp_listeners(self.port + 1, host=self.host)
                except OSError:
                    for lst in listeners:
                        await lst.aclose()
                    if port != 0:
                        raise
                    continue
                break
            self.ws_port = self.port + 1
            nursery.start_soon(trio.serve_listeners, self._http_conn, listeners)
            nursery.start_soon(trio.serve_listeners, self._ws_conn, ws_listeners)
            if self.slot_ms > 0:
                nursery.start_soon(self._ticker)
            task_status.started(self.port)

    async def _ticker(self) -> None:
        while True:
            await trio.sleep(self.slot_ms / 1000)
            self.ledger.advance(1, now_ms=int(time.time() * 1000))
            slot = self.ledger.slot
            for sock, sub, kind in list(self._slot_subs):
                if kind == "root":
                    self._notify(sock, "rootNotification", sub, slot)
                else:
                    self._notify(sock, "slotNotification", sub, {"parent": slot - 1, "root": slot, "slot": slot})

    # --- HTTP ------------------------------------------------------------

    def _admit(self, kind: str, scope: trio.CancelScope) -> Conn:
        """Hold a new connection; a full table closes its longest-idle one."""
        conn, victim = self.conns.admit(kind=kind, close=scope.cancel, now=trio.current_time())
        if victim is not None:
            victim.close()
        return conn

    async def _http_conn(self, stream: trio.SocketStream) -> None:
        with trio.CancelScope() as scope:  # cancelled when evicted to make room
            held = self._admit("http", scope)
            try:
                await self._http_session(stream, held)
            finally:
                self.conns.release(held)
                await stream.aclose()

    async def _http_session(self, stream: trio.SocketStream, held: Conn) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
        try:
            while True:
                req, body = await self._read_request(conn, stream, held)
                if req is None:
                    return
                status, payload = self._respond(req, body)
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
                with trio.move_on_after(self.limits.send_timeout_s) as sending:
                    await stream.send_all(
                        conn.send(h11.Response(status_code=status, headers=headers + _CORS))
                        + conn.send(h11.Data(data=payload))
                        + conn.send(h11.EndOfMessage())
                    )
                if sending.cancelled_caught:
                    return  # a client that does not read its reply loses the connection
                self.conns.touch(held, busy=False, now=trio.current_time())
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (h11.RemoteProtocolError, h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError,
                _SlowRequest):
            return
        except Exception:  # a bug of ours costs this connection, never the ledger
            log.exception("HTTP connection failed")
            return

    async def _read_request(self, conn: h11.Connection, stream: trio.SocketStream,
                            held: Conn) -> tuple[h11.Request | None, bytes]:
        """The next request, or (None, b"") when the client closed or idled
        out; raises :class:`_SlowRequest` when a started request stalls."""
        req: h11.Request | None = None
        body = bytearray()
        deadline: float | None = None  # set by the request's first byte
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                data = await self._receive(stream, deadline)
                if data is None:
                    if deadline is None:
                        return None, b""  # idle past the idle timeout
                    raise _SlowRequest
                now = trio.current_time()
                if deadline is None:
                    deadline = now + self.limits.request_timeout_s
                self.conns.touch(held, busy=True, now=now)
                conn.receive_data(data)
                if not data and conn.their_state is h11.IDLE:
                    return None, b""
                continue
            if isinstance(ev, h11.Request):
                req = ev
            elif isinstance(ev, h11.Data):
                body += ev.data
                if len(body) > request_bytes_max:
                    raise h11.RemoteProtocolError("request too large")
            elif isinstance(ev, h11.EndOfMessage):
                return req, bytes(body)
            elif isinstance(ev, h11.ConnectionClosed):
                return None, b""

    async def _receive(self, stream: trio.SocketStream, deadline: float | None) -> bytes | None:
        """The next bytes, or None at ``deadline`` (or after the idle timeout when None)."""
        at = deadline if deadline is not None else trio.current_time() + self.limits.idle_timeout_s
        with trio.move_on_at(at):
            return await stream.receive_some(65536)
        return None

    def _respond(self, req: h11.Request, body: bytes) -> tuple[int, bytes]:
        if req.method == b"OPTIONS":
            return 200, b""
        if req.method == b"GET":
            if req.target == b"/health":
                return 200, b"ok"
            return 405, b'{"error":"use POST with a JSON-RPC body"}'
        self.requests += 1
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return 200, b'{"jsonrpc":"2.0","error":{"code":-32700,"message":"Parse error"},"id":null}'
        if doc == []:
            return 200, b'{"jsonrpc":"2.0","error":{"code":-32600,"message":"Invalid request"},"id":null}'
        if isinstance(doc, list):
            out: Any = [r for r in (self.rpc.handle(x) for x in doc[:100]) if r is not None]
        else:
            out = self.rpc.handle(doc)
        return 200, json.dumps(out, separators=(",", ":")).encode()

    # --- websocket -------------------------------------------------------

    async def _ws_conn(self, stream: trio.SocketStream) -> None:
        with trio.CancelScope() as scope:  # cancelled when evicted to make room
            held = self._admit("ws", scope)
            try:
                async with trio.open_nursery() as nursery:  # holds the connection's reader task
                    try:
                        await self._ws_session(nursery, stream, held)
                    except ConnectionClosed:
                        pass
                    except Exception:  # a bug of ours costs this connection, never the ledger
                        log.exception("websocket connection failed")
                    nursery.cancel_scope.cancel()
            finally:
                self.conns.release(held)
                await stream.aclose()

    async def _ws_session(self, nursery: trio.Nursery, stream: trio.SocketStream, held: Conn) -> None:
        ws: WebSocketConnection | None = None
        # A connection that sends nothing is idle: the handshake gets no longer than the idle timeout either.
        with trio.move_on_after(min(self.limits.handshake_timeout_s, self.limits.idle_timeout_s)):
            request: WebSocketRequest = await wrap_server_stream(nursery, stream)
            ws = await request.accept()
        if ws is None:
            return  # no handshake in time
        send, recv = trio.open_memory_channel[str](ws_outbox_max)
        sock = _Socket(send=send)

        async def writer(scope: trio.CancelScope) -> None:
            assert ws is not None
            try:
                async for text in recv:
                    with trio.move_on_after(self.limits.send_timeout_s) as sending:
                        await ws.send_message(text)
                    if sending.cancelled_caught:
                        break  # the client does not read: it loses the connection
                else:
                    await ws.aclose()  # our outbox was closed: the client did not keep up
            except ConnectionClosed:
                pass
            scope.cancel()

        try:
            async with trio.open_nursery() as session:
                session.start_soon(writer, session.cancel_scope)
                try:
                    while True:
                        msg = None
                        with trio.move_on_after(self.limits.idle_timeout_s):
                            msg = await ws.get_message()
                        if msg is None:
                            if sock.subs:
                                continue  # waiting for notifications is what a subscriber does
                            break  # idle, with nothing to wait for
                        self._ws_request(sock, msg)
                        self.conns.touch(held, busy=bool(sock.subs), now=trio.current_time())
                except ConnectionClosed:
                    pass
                session.cancel_scope.cancel()
        finally:
            self._drop(sock)
            with trio.move_on_after(self.limits.handshake_timeout_s):
                await ws.aclose()

    def _ws_request(self, sock: _Socket, msg: str | bytes) -> None:
        try:
            req = json.loads(msg)
        except (ValueError, UnicodeDecodeError):
            self._push(sock, {"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}, "id": None})
            return
        if req == []:
            self._push(sock, {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid request"}, "id": None})
            return
        reqs = req if isinstance(req, list) else [req]
        for r in reqs[:100]:
            self._push(sock, self._ws_call(sock, r))

    def _ws_call(self, sock: _Socket, req: Any) -> dict[str, Any]:
        if not isinstance(req, dict):
            return {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid request"}, "id": None}
        rid, method, params = req.get("id"), req.get("method"), req.get("params") or []
        try:
            if not isinstance(params, list):
                raise RpcError(code=-32602, message="Invalid params")
            if method in ("signatureUnsubscribe", "slotUnsubscribe", "accountUnsubscribe", "rootUnsubscribe"):
                return {"jsonrpc": "2.0", "result": self._unsubscribe(sock, params[0]), "id": rid}
            if len(sock.subs) >= subscriptions_per_socket_max:
                raise RpcError(code=-32602, message="Too many subscriptions on this connection")
            sub = next(self._ids)
            if method == "signatureSubscribe":
                sig = str(params[0])
                sock.subs[sub] = ("sig", sig)
                self._sig_subs.setdefault(sig, []).append((sock, sub))
                if self.ledger.status(sig) is not None:
                    self._fire_sig(sig)
            elif method in ("slotSubscribe", "rootSubscribe"):
                kind = "root" if method == "rootSubscribe" else "slot"
                sock.subs[sub] = (kind, None)
                self._slot_subs.append((sock, sub, kind))
            elif method == "accountSubscribe":
                pk = str(_pubkey(params[0]))
                enc = params[1].get("encoding", "base64") if len(params) > 1 and isinstance(params[1], dict) else "base64"
                sock.subs[sub] = ("acct", pk)
                self._acct_subs.setdefault(pk, []).append((sock, sub, enc))
            else:
                return {"jsonrpc": "2.0", "error": {"code": -32601, "message": "Method not found"}, "id": rid}
            return {"jsonrpc": "2.0", "result": sub, "id": rid}
        except RpcError as exc:
            return {"jsonrpc": "2.0", "error": {"code": exc.code, "message": exc.message}, "id": rid}
        except (IndexError, TypeError):
            return {"jsonrpc": "2.0", "error": {"code": -32602, "message": "Invalid params"}, "id": rid}

    def _unsubscribe(self, sock: _Socket, sub: Any) -> bool:
        entry = sock.subs.pop(sub, None) if isinstance(sub, int) else None
        if entry is None:
            raise RpcError(code=-32602, message="Invalid subscription id.")
        kind, key = entry
        if kind == "sig":
            self._sig_subs[key] = [x for x in self._sig_subs.get(key, []) if x[1] != sub]
            if not self._sig_subs[key]:
                del self._sig_subs[key]
        elif kind == "acct":
            self._acct_subs[key] = [x for x in self._acct_subs.get(key, []) if x[1] != sub]
            if not self._acct_subs[key]:
                del self._acct_subs[key]
        else:
            self._slot_subs = [x for x in self._slot_subs if x[1] != sub]
        return True

    def _drop(self, sock: _Socket) -> None:
        for sub in list(sock.subs):
            self._unsubscribe(sock, sub)
        sock.send.close()

    def _push(self, sock: _Socket, doc: Any) -> None:
        try:
            sock.send.send_nowait(json.dumps(doc, separators=(",", ":")))
        except trio.WouldBlock:
            sock.send.close()  # a client that does not read loses its connection
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def _notify(self, sock: _Socket, method: str, sub: int, result: Any) -> None:
        self._push(sock, {"jsonrpc": "2.0", "method": method, "params": {"result": result, "subscription": sub}})

    def _fire_sig(self, sig: str) -> None:
        st = self.ledger.status(sig)
        if st is None:
            return
        slot, err = st
        for sock, sub in self._sig_subs.pop(sig, []):
            sock.subs.pop(sub, None)
            self._notify(sock, "signatureNotification", sub, {"context": {"slot": slot}, "value": {"err": err}})

    def _executed(self, sig: str) -> None:
        if sig in self._sig_subs:
            self._fire_sig(sig)
        if self._acct_subs:
            rec = self.ledger.record(sig)
            if rec is None:
                return
            keys = [str(k) for k in VersionedTransaction.from_bytes(rec.tx).message.account_keys]
            for k in keys + rec.loaded_writable:
                for sock, sub, enc in self._acct_subs.get(k, []):
                    value = self.rpc._account_json(Pubkey.from_string(k), enc)
                    self._notify(sock, "accountNotification", sub, {"context": {"slot": rec.slot}, "value": value})


async def serve_ledger(
    port: int,
    state: Path | None,
    *,
    slot_ms: int = 400,
    host: str = "127.0.0.1",
    ready: Any = None,
    fsync: bool = False,
    limits: ServerLimits | None = None,
    airdrop_limits: AirdropLimits | None = None,
) -> None:
    """Run a ledger server until cancelled; the state is compacted on the way out."""
    ledger = SvmLedger(state, now_ms=int(time.time() * 1000), fsync=fsync, airdrop_limits=airdrop_limits)
    try:
        server = LedgerServer(ledger, slot_ms=slot_ms, host=host, limits=limits)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, port)
            if ready is not None:
                ready(server)
    finally:
        ledger.close()
