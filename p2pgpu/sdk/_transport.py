"""The wire to the daemon's control API, and the blocking transport over it.

The control API (``p2pgpu/node/_control.py``) is newline-delimited JSON over
TCP on 127.0.0.1: one request line ``{"token", "method", "params"}``, one
reply line ``{"ok": true, "result": ...}`` or ``{"ok": false, "error", "code",
"details"}``.  The port is in ``<home>/control.json`` (written by the running
daemon), the token in ``<home>/control.token``; both are read at every call,
so a daemon that restarts on another port is found again.

This module holds what both transports share (finding the daemon, encoding a
request, reading a reply) and the blocking one (sockets, for the synchronous
:class:`~p2pgpu.sdk.Client` and the CLI); the trio transport is in
``_async.py``.  It imports neither trio nor libp2p, so a CLI command that
only asks the daemon starts fast.  Every read is bounded in size and time.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from typing import Any

from p2pgpu.home import Home, HomeError, resolve_home

from ._errors import DaemonNotRunning, P2pgpuError, Timeout, error_from_reply

#: A reply line larger than this is refused (16 MiB: 5,000 log lines or 2,000 job rows fit easily).
reply_bytes_max = 16 * 1024 * 1024
connect_timeout_s = 5.0


def home_of(home: str | os.PathLike[str] | Home | None) -> Home:
    """``home`` as a :class:`~p2pgpu.home.Home`: a path, else ``$P2PGPU_HOME``, else ``~/.p2pgpu``."""
    return home if isinstance(home, Home) else Home(resolve_home(home))


@dataclass(frozen=True)
class Endpoint:
    port: int
    token: str


def endpoint(home: Home) -> Endpoint:
    """Where this home's daemon listens, and its token; :class:`DaemonNotRunning` if none runs."""
    start = f"start one with `p2pgpu node run --home {home.path}`"
    if not home.exists():
        raise DaemonNotRunning(f"no node home at {home.path}: run `p2pgpu init --home {home.path}` first",
                               home=str(home.path))
    try:
        doc = json.loads(home.control_path.read_text())
        port = int(doc["port"])
    except FileNotFoundError:
        raise DaemonNotRunning(f"no daemon runs for {home.path}: {start}", home=str(home.path)) from None
    except (OSError, ValueError, KeyError, TypeError):
        raise DaemonNotRunning(f"{home.control_path} is unreadable: is the daemon starting? try again",
                               home=str(home.path)) from None
    try:
        token = home.token()
    except (HomeError, OSError) as exc:
        raise P2pgpuError(f"cannot read the control token of {home.path}: {exc}") from None
    return Endpoint(port, token)


def encode_request(ep: Endpoint, method: str, params: dict[str, Any] | None) -> bytes:
    return json.dumps({"token": ep.token, "method": method, "params": params or {}}).encode() + b"\n"


def decode_reply(line: bytes, method: str) -> tuple[bool, Any]:
    """``(True, result)`` for a final reply line, ``(False, item)`` for a
    streamed item, or the typed error the line carries."""
    try:
        msg = json.loads(line)
    except ValueError:
        raise P2pgpuError(f"the daemon sent a reply to {method} that is not JSON") from None
    if not isinstance(msg, dict):
        raise P2pgpuError(f"the daemon sent a reply to {method} that is not an object")
    if not msg.get("ok"):
        raise error_from_reply(msg, method)
    if "result" in msg:
        return True, msg["result"]
    return False, msg.get("item")


def call(home: Home, method: str, params: dict[str, Any] | None = None, *, timeout_s: float = 30.0) -> Any:
    """One request, blocking: the result, or a :class:`P2pgpuError`."""
    ep = endpoint(home)
    try:
        sock = socket.create_connection(("127.0.0.1", ep.port), timeout=min(connect_timeout_s, timeout_s))
    except OSError as exc:
        raise DaemonNotRunning(f"no daemon answers for {home.path} (port {ep.port}: {exc.strerror or exc}); "
                               f"start one with `p2pgpu node run --home {home.path}`", home=str(home.path)) from None
    # The file made by makefile() holds the socket open: close both.
    with sock, sock.makefile("rb") as f:
        sock.settimeout(timeout_s)
        try:
            sock.sendall(encode_request(ep, method, params))
            while True:
                line = f.readline(reply_bytes_max + 1)
                if not line:
                    raise DaemonNotRunning(f"the daemon of {home.path} closed the connection without answering "
                                           f"{method} (is it stopping?)", home=str(home.path))
                if not line.endswith(b"\n"):
                    raise P2pgpuError(f"the daemon's reply to {method} is larger than {reply_bytes_max} bytes")
                final, result = decode_reply(line, method)
                if final:
                    return result
        except TimeoutError:
            raise Timeout(f"the daemon of {home.path} did not answer {method} within {timeout_s:g} s") from None
        except OSError as exc:
            raise DaemonNotRunning(f"the daemon of {home.path} closed the connection: {exc.strerror or exc}",
                                   home=str(home.path)) from None
