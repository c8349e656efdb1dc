"""#12.4: a local user without the token cannot deny the operator the control API.

The attack, as reported: any local user opens idle TCP connections to the
daemon's control port (127.0.0.1) and holds them.  Each took one of the 64
handler slots before its token was read, and the read timeout started only
once a slot was granted, so ``p2pgpu status`` timed out for the whole attack.
Also: a 100,000-deep JSON request answered "internal error ...
RecursionError", and ``control.json`` was world-readable (0644).

Here a real daemon is held by 300 idle connections (and 8 that trickle a
megabyte each without a newline) while the operator's ``status`` must answer
every time within 5 s, across more than one old read timeout.
"""

from __future__ import annotations

import json
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2pgpu.localnet import LocalNet

pytestmark = pytest.mark.processes

MIX = [("NVIDIA L4", 23034, "8.9", 1)]


def test_idle_connections_do_not_lock_the_operator_out(tmp_path: Path) -> None:
    with LocalNet(tmp_path, 1, gpu_mix=MIX) as net:
        node = net.nodes[0]
        mode = stat.S_IMODE(node.home.control_path.stat().st_mode)
        assert mode == 0o600, f"control.json is {oct(mode)}"
        held: list[socket.socket] = []
        try:
            for _ in range(300):
                held.append(socket.create_connection(("127.0.0.1", node.control_port), timeout=5))
            for _ in range(8):
                s = socket.create_connection(("127.0.0.1", node.control_port), timeout=5)
                held.append(s)
                try:
                    s.sendall(b"x" * (1024 * 1024))
                except OSError:
                    pass  # closed by the daemon: fine
            start = time.monotonic()
            answered = 0
            while time.monotonic() - start < 12:  # past the old 10 s read timeout
                st = node.call("status", timeout_s=5.0)
                assert st["peer_id"] == node.peer_id
                answered += 1
                time.sleep(1)
            assert answered >= 5
            # The CLI, as an operator runs it, too.
            out = subprocess.run([sys.executable, "-m", "p2pgpu.cli", "status", "--json", "--home",
                                  str(node.home.path)], check=False, capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            assert node.call("status")["control_evicted"] >= 300 - 256
        finally:
            for s in held:
                s.close()
        assert node.proc.poll() is None


def test_a_deeply_nested_request_gets_a_clear_error(tmp_path: Path) -> None:
    with LocalNet(tmp_path, 1, gpu_mix=MIX) as net:
        node = net.nodes[0]
        token = node.home.token()
        deep = b"[" * 100_000 + b"]" * 100_000
        req = b'{"token": "' + token.encode() + b'", "method": "status", "params": {"x": ' + deep + b"}}\n"
        with socket.create_connection(("127.0.0.1", node.control_port), timeout=10) as s:
            s.sendall(req)
            reply = json.loads(s.makefile("rb").readline())
        assert reply["ok"] is False
        assert "nested deeper than" in reply["error"], reply
        assert "internal error" not in reply["error"] and "RecursionError" not in reply["error"]
        assert node.call("status")["peer_id"] == node.peer_id
