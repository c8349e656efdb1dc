"""#12 (held): a local user without the token abuses a real daemon's control API.

Beside the lockout (``test_control_lockout.py``) and the unit tests of the
server (``tests/node/test_control.py``), what a local user tried and what
held, here against a real ``node run`` process:

- a wrong token, and a brute force of 2,000 guesses on parallel connections
  (near misses included: the token's prefix, its upper case, the token with
  a suffix or a newline, a number, a list, nothing): every one is refused
  with ``bad_token``, nothing else is answered, and the operator is served
  throughout;
- requests that are not what the protocol says: not JSON, invalid UTF-8,
  a JSON array, a method that is not text, params that are not an object,
  and a request over the 2 MiB limit: each gets a clear error, never an
  "internal error";
- methods that do not exist: without the token they are refused as a bad
  token (a stranger cannot learn which methods exist); with it they are
  named as unknown.

What it guards: the token check before dispatch (``ControlServer._authenticate``),
the request size limit (``request_bytes_max``), and the daemon's own
survival.  If the token check were skipped or weakened (a prefix, a case
fold), a guess would be answered with a result.
"""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from p2pgpu.localnet import LocalNet
from p2pgpu.node._control import request_bytes_max

pytestmark = pytest.mark.processes

MIX = [("NVIDIA L4", 23034, "8.9", 1)]
GUESSES = 2_000


def raw(port: int, line: bytes, timeout_s: float = 10.0) -> dict[str, Any] | None:
    """Send one raw request line; the daemon's one reply line (None if it closed without one)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(line)
        with s.makefile("rb") as f:
            reply = f.readline(1 << 20)
    return json.loads(reply) if reply else None


def request(token: Any, method: str = "status", params: Any = None) -> bytes:
    return json.dumps({"token": token, "method": method, "params": params or {}}).encode() + b"\n"


def test_wrong_tokens_and_a_brute_force_are_refused_and_the_operator_is_served(tmp_path: Path) -> None:
    with LocalNet(tmp_path, 1, gpu_mix=MIX) as net:
        node = net.nodes[0]
        token = node.home.token()
        near = [token[:-1], token[:32], token.upper(), token + "0", token + "\n", "", " " + token, 0, [token],
                {"token": token}, None, token[::-1]]
        guesses: list[Any] = near + [f"{i:064x}" for i in range(GUESSES - len(near))]

        def guess(g: Any) -> dict[str, Any] | None:
            return raw(node.control_port, request(g, "job.list"))

        with ThreadPoolExecutor(max_workers=16) as pool:
            replies = list(pool.map(guess, guesses))
            # Meanwhile, and after, the operator is answered.
            assert node.call("status", timeout_s=10.0)["peer_id"] == node.peer_id
        assert all(r is not None and r["ok"] is False and r["code"] == "bad_token" for r in replies), \
            [r for r in replies if not r or r.get("code") != "bad_token"][:3]
        assert not any("result" in r for r in replies if r)
        assert node.call("job.list", timeout_s=10.0) == []
        assert node.proc.poll() is None


def test_malformed_and_oversized_requests_get_clear_errors(tmp_path: Path) -> None:
    with LocalNet(tmp_path, 1, gpu_mix=MIX) as net:
        node = net.nodes[0]
        token = node.home.token()
        port = node.control_port
        cases: dict[str, tuple[bytes, str]] = {
            "not json": (b"status please\n", "bad_request"),
            "invalid utf-8": (b'{"token": "\xff\xfe", "method": "status"}\n', "bad_request"),
            "an array": (b'["status"]\n', "bad_request"),
            "a method that is not text": (json.dumps({"token": token, "method": 7}).encode() + b"\n",
                                          "bad_request"),
            "params not an object": (request(token, "status", [1, 2]), "bad_params"),
            "NUL bytes": (b'{"token": "' + token.encode() + b'\x00", "method": "status"}\n', "bad_request"),
        }
        for what, (line, code) in cases.items():
            reply = raw(port, line)
            assert reply is not None and reply["ok"] is False, (what, reply)
            assert reply.get("code") == code, (what, reply)
            assert "internal error" not in reply["error"], (what, reply)
        # Over the size limit, with the right token: refused before it is parsed.
        big = request(token, "status", {"pad": "x" * (request_bytes_max + 10)})
        reply = raw(port, big)
        assert reply is not None and reply["code"] == "bad_request" and "larger than" in reply["error"], reply
        # Methods that do not exist.
        for method in ("shutdown_now", "__init__", "status.__class__", "", "job.submit\n"):
            stranger = raw(port, request("0" * 64, method))
            assert stranger is not None and stranger["code"] == "bad_token", (method, stranger)
            known = raw(port, request(token, method))
            assert known is not None and known["ok"] is False and "unknown method" in known["error"], (method, known)
        st = node.call("status")
        assert st["peer_id"] == node.peer_id and node.proc.poll() is None
