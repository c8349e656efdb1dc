"""The explorer's one data source: the local node daemon's control API.

An async twin of :func:`p2pgpu.node.call` over trio sockets, speaking the same
newline-delimited JSON (``p2pgpu/node/_control.py``).  It reads the port from
``<home>/control.json`` on every call, so a daemon that restarts on another
port is found again without restarting the explorer.  Three outcomes, each
its own type, because the explorer treats them differently:

* the result;
* :class:`MethodMissing`: this daemon does not offer the method (yet); the
  panel says "no data yet" and the explorer keeps asking, so methods that a
  newer daemon adds show up by themselves;
* :class:`DaemonUnavailable` / :class:`ControlError` (from ``p2pgpu.node``):
  no daemon answers, or it refused the request.

Every read is bounded in size and time.
"""

from __future__ import annotations

import json
import time
from typing import Any

import trio

from p2pgpu.home import Home
from p2pgpu.node import ControlError, DaemonUnavailable

#: A reply line larger than this is refused (the daemon's own request cap, times 8, as the CLI client).
reply_bytes_max = 16 * 1024 * 1024
connect_timeout_s = 5.0


class MethodMissing(Exception):
    """The daemon answered "unknown method": it does not offer this one."""


class DaemonSource:
    """``await DaemonSource(home).call("status")``."""

    def __init__(self, home: Home, *, timeout_s: float = 10.0) -> None:
        self.home = home
        self.timeout_s = timeout_s
        #: Seconds the last call of each method took (for ``/metrics``).
        self.last_latency_s: dict[str, float] = {}

    def port(self) -> int:
        try:
            doc = json.loads(self.home.control_path.read_text())
            return int(doc["port"])
        except FileNotFoundError:
            raise DaemonUnavailable(f"no daemon runs for {self.home.path} (no control.json)") from None
        except (OSError, ValueError, KeyError, TypeError):
            raise DaemonUnavailable(f"{self.home.control_path} is unreadable: is the daemon starting?") from None

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        port = self.port()
        token = self.home.token()
        started = time.monotonic()
        try:
            with trio.fail_after(connect_timeout_s):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
        except (OSError, trio.TooSlowError) as exc:
            raise DaemonUnavailable(f"cannot reach the daemon's control port {port}: {exc}") from None
        try:
            request = json.dumps({"token": token, "method": method, "params": params or {}}).encode() + b"\n"
            with trio.fail_after(self.timeout_s):
                await stream.send_all(request)
                line = await _read_line(stream)
        except trio.TooSlowError:
            raise DaemonUnavailable(f"the daemon did not answer {method} within {self.timeout_s} s") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise DaemonUnavailable(f"the daemon closed the connection: {exc}") from None
        finally:
            await stream.aclose()
        self.last_latency_s[method] = time.monotonic() - started
        try:
            msg = json.loads(line)
        except ValueError:
            raise ControlError(f"the daemon sent a reply that is not JSON to {method}") from None
        if not isinstance(msg, dict):
            raise ControlError(f"the daemon sent a reply that is not an object to {method}")
        if not msg.get("ok"):
            error = str(msg.get("error", "unknown error"))
            if error.startswith("unknown method"):
                raise MethodMissing(method)
            raise ControlError(error)
        return msg.get("result")


async def _read_line(stream: trio.SocketStream) -> bytes:
    buf = bytearray()
    while b"\n" not in buf:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise DaemonUnavailable("the daemon closed the connection without answering")
        buf += chunk
        if len(buf) > reply_bytes_max:
            raise ControlError(f"the daemon's reply is larger than {reply_bytes_max} bytes")
    return bytes(buf.split(b"\n", 1)[0])
