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
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

import h11
import trio
from solders.pubkey import Pubkey
from solders.transaction import VersionedTransaction
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from ._rpc import RpcMethods, _pubkey
from ._svm import RpcError, SvmLedger

log = logging.getLogger("p2pgpu.ledger")
request_bytes_max = 1024 * 1024
ws_outbox_max = 1024
subscriptions_per_socket_max = 10_000
_CORS = [
    (b"access-control-allow-origin", b"*"),
    (b"access-control-allow-methods", b"POST, GET, OPTIONS"),
    (b"access-control-allow-headers", b"content-type, solana-client"),
]


@dataclass(eq=False)
class _Socket:
    send: trio.MemorySendChannel[str]
    subs: dict[int, tuple[str, Any]] = field(default_factory=dict)


class LedgerServer:
    def __init__(self, ledger: SvmLedger, *, slot_ms: int = 400, host: str = "127.0.0.1") -> None:
        self.ledger = ledger
        self.slot_ms = slot_ms
        self.host = host
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
        async with trio.open_nursery() as nursery:
            for attempt in range(50):
                listeners = await trio.open_tcp_listeners(port, host=self.host)
                self.port = listeners[0].socket.getsockname()[1]
                try:
                    await nursery.start(
                        lambda task_status: serve_websocket(
                            self._ws_handler, self.host, self.port + 1, None,
                            handler_nursery=nursery, task_status=task_status,
                        )
                    )
                except OSError:
                    for lst in listeners:
                        await lst.aclose()
                    if port != 0:
                        raise
                    continue
                break
            self.ws_port = self.port + 1
            nursery.start_soon(trio.serve_listeners, self._http_conn, listeners)
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

    async def _http_conn(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
        try:
            while True:
                req, body = await self._read_request(conn, stream)
                if req is None:
                    return
                status, payload = self._respond(req, body)
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
                await stream.send_all(
                    conn.send(h11.Response(status_code=status, headers=headers + _CORS))
                    + conn.send(h11.Data(data=payload))
                    + conn.send(h11.EndOfMessage())
                )
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (h11.RemoteProtocolError, h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        except Exception:  # a bug of ours costs this connection, never the ledger
            log.exception("HTTP connection failed")
            return
        finally:
            await stream.aclose()

    async def _read_request(self, conn: h11.Connection, stream: trio.SocketStream) -> tuple[h11.Request | None, bytes]:
        req: h11.Request | None = None
        body = bytearray()
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                data = await stream.receive_some(65536)
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

    async def _ws_handler(self, request: WebSocketRequest) -> None:
        # serve_websocket runs handlers in the server's nursery: an escaping error would stop the ledger.
        try:
            await self._ws_session(request)
        except ConnectionClosed:
            pass
        except Exception:  # a bug of ours costs this connection, never the ledger
            log.exception("websocket connection failed")

    async def _ws_session(self, request: WebSocketRequest) -> None:
        ws = await request.accept()
        send, recv = trio.open_memory_channel[str](ws_outbox_max)
        sock = _Socket(send=send)

        async def writer(scope: trio.CancelScope) -> None:
            try:
                async for text in recv:
                    await ws.send_message(text)
                await ws.aclose()  # our outbox was closed: the client did not keep up
            except ConnectionClosed:
                pass
            scope.cancel()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer, nursery.cancel_scope)
                try:
                    while True:
                        self._ws_request(sock, await ws.get_message())
                except ConnectionClosed:
                    pass
                nursery.cancel_scope.cancel()
        finally:
            self._drop(sock)

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
) -> None:
    """Run a ledger server until cancelled; the state is compacted on the way out."""
    ledger = SvmLedger(state, now_ms=int(time.time() * 1000), fsync=fsync)
    try:
        server = LedgerServer(ledger, slot_ms=slot_ms, host=host)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, port)
            if ready is not None:
                ready(server)
    finally:
        ledger.close()
