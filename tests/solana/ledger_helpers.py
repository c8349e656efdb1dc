"""Helpers for the Solana tests: a `p2pgpu ledger serve` process on free loopback ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from p2pgpu import children


def free_port_pair() -> int:
    """A port p with p and p+1 both free (RPC and websocket)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p >= 65535:
            continue
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no free port pair")


class ServerProc:
    def __init__(self, proc: subprocess.Popen[str], port: int) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port + 1}"


def start_server(state: Path | None, *, slot_ms: int = 50) -> ServerProc:
    port = free_port_pair()
    cmd = [sys.executable, "-m", "p2pgpu.cli", "ledger", "serve", "--port", str(port), "--slot-ms", str(slot_ms)]
    if state is not None:
        cmd += ["--state", str(state)]
    proc = children.spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("ledger ready"):
        proc.kill()
        rest = proc.stdout.read()
        proc.stdout.close()
        proc.wait()
        raise RuntimeError(f"ledger server did not start: {line!r} {rest}")
    return ServerProc(proc, port)


def stop_server(s: ServerProc) -> None:
    s.proc.terminate()
    try:
        s.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        s.proc.kill()
        s.proc.wait()
    if s.proc.stdout is not None:
        s.proc.stdout.close()

