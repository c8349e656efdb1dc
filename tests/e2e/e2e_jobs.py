"""Manifests the end-to-end tests share (a module, not a test file: the
tests import it by name, as pytest puts this directory on ``sys.path``)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from p2pgpu import children
from p2pgpu.devnet import free_port, rpc


def sleep_job(name: str, *, nodes: int, sleep_s: int, on_member_loss: str = "fail") -> str:
    """A job that prints ``started``, sleeps, prints ``done``: long enough to
    kill or cancel something while it runs."""
    return f"""
name = "{name}"
[requirements]
nodes = {nodes}
gpus_per_node = 1
[runtime]
command = ["sh", "-c", "echo started; sleep {sleep_s}; echo done"]
duration_s_max = 60
[payment]
price_per_gpu_hour_max = 36000000
[verification]
on_member_loss = "{on_member_loss}"
"""


@contextlib.contextmanager
def ledger_server(tmp_path: Path) -> Iterator[str]:
    """A real ``p2pgpu ledger serve`` on a free loopback port, healthy before
    it is handed out, stopped (with its children) afterwards; its log is
    ``tmp_path/ledger.log``."""
    port = free_port(pair=True)
    with open(tmp_path / "ledger.log", "wb") as log:
        proc = children.spawn([sys.executable, "-m", "p2pgpu.cli", "ledger", "serve", "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                rpc(url, "getHealth", [], timeout_s=2)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, \
                    f"ledger serve did not start: {(tmp_path / 'ledger.log').read_text(errors='replace')[-2000:]}"
                time.sleep(0.2)
        yield url
    finally:
        children.stop(proc)


def balance(url: str, address: str) -> int:
    return int(rpc(url, "getBalance", [address])["value"])
