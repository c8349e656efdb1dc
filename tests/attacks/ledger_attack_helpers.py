"""A real ``p2pgpu ledger serve`` process for the ledger attack tests, and a
few raw JSON-RPC calls.

``start_ledger(..., nofile=1024)`` runs the server under that open-file limit
(``ulimit -n 1024`` is the default of systemd services and many shells), so a
flood of held connections reaches the limit with a few thousand sockets.

For runs of real nodes that pay on it: :func:`fund_wallets` gives the
submitter's payer lamports and makes every worker's payout address exist,
:func:`node_rows` reads a node's own store, and :func:`check_paid_as_recorded`
holds the ledger to the submitter's payout records (every worker's balance
grew by exactly what it was recorded as paid: a payment made twice, lost, or
made to someone never owed shows).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pgpu import children
from p2pgpu.devnet import free_port
from p2pgpu.store import db_path, open_db

_EXEC_WITH_NOFILE = (
    "import os, resource, sys; n = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
)


@dataclass
class Ledger:
    proc: subprocess.Popen[Any]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        children.stop(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def free_port_pair() -> int:
    """A free port on 127.0.0.1 whose successor is free too (the ledger's websocket)."""
    return free_port(pair=True)


def start_ledger(*args: str, state: Path | None = None, nofile: int | None = None, port: int | None = None,
                 log: Path | None = None) -> Ledger:
    """A ledger server on ``port`` (default: a free pair), ready when this returns.
    With ``log`` its output goes to that file (appended: a restarted ledger
    keeps one log) instead of a pipe nobody reads after start-up, which a
    long run would fill."""
    port = port if port is not None else free_port_pair()
    cmd = ["-m", "p2pgpu.cli", "ledger", "serve", "--port", str(port), "--slot-ms", "100", *args]
    if state is not None:
        cmd += ["--state", str(state)]
    argv = [sys.executable, *cmd] if nofile is None else [sys.executable, "-c", _EXEC_WITH_NOFILE, str(nofile), *cmd]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if log is not None:
        return _start_logged(argv, env, port, log)
    proc = children.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    said: list[str] = []
    while not (line := proc.stdout.readline()).startswith("ledger ready"):
        said.append(line)  # warnings before it is ready (e.g. about the file-descriptor limit)
        if not line:
            children.stop(proc)
            proc.stdout.close()
            raise RuntimeError(f"ledger server did not start: {''.join(said)}")
    return Ledger(proc, port)


def _start_logged(argv: list[str], env: dict[str, str], port: int, log: Path) -> Ledger:
    start = log.stat().st_size if log.exists() else 0
    with open(log, "ab") as out:
        proc = children.spawn(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 60
    while b"ledger ready" not in log.read_bytes()[start:]:
        if proc.poll() is not None or time.monotonic() > deadline:
            children.stop(proc)
            raise RuntimeError(f"ledger server did not start: {log.read_bytes()[start:][-2000:]!r}")
        time.sleep(0.05)
    return Ledger(proc, port)


def rpc_doc(url: str, method: str, params: list[Any], timeout_s: float = 10.0) -> dict[str, Any]:
    """The whole JSON-RPC response (``result`` or ``error``)."""
    req = urllib.request.Request(url, data=json.dumps({"jsonrpc": "2.0", "id": 1, "method": method,
                                                       "params": params}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # loopback only
        doc: dict[str, Any] = json.loads(resp.read())
    return doc


def rpc(url: str, method: str, params: list[Any], timeout_s: float = 10.0) -> Any:
    doc = rpc_doc(url, method, params, timeout_s)
    assert "error" not in doc, doc
    return doc["result"]


#: A payout address must exist (rent-exempt) before it is paid.
PAYOUT_ADDRESS_LAMPORTS = 1_000_000_000


def fund_wallets(url: str, payer: Any, workers: list[Any], payer_lamports: int = 50_000_000_000) -> dict[str, int]:
    """Fund node ``payer``'s wallet and open each worker's payout address;
    return the workers' balances by payout address (what they start from)."""
    rpc(url, "requestAirdrop", [payer.call("wallet")["address"], payer_lamports])
    start: dict[str, int] = {}
    for node in workers:
        address = node.call("wallet")["payout_address"]
        rpc(url, "requestAirdrop", [address, PAYOUT_ADDRESS_LAMPORTS])
        start[address] = int(rpc(url, "getBalance", [address])["value"])
    return start


def node_rows(node: Any, read: Any) -> list[dict[str, Any]]:
    """Rows a ``p2pgpu.store`` reader (``payouts``, ``earnings``...) returns
    from a node's own database, read-only while the node runs."""
    conn = open_db(db_path(node.home.path), readonly=True)
    try:
        rows: list[dict[str, Any]] = read(conn)
        return rows
    finally:
        conn.close()


def check_paid_as_recorded(url: str, payout_rows: list[dict[str, Any]], start_balance: dict[str, int]) -> None:
    """Every payout row is paid by a transaction the ledger holds as
    succeeded, and each address in ``start_balance`` grew by exactly the sum
    recorded as paid to it (zero for one never owed)."""
    paid: dict[str, int] = {a: 0 for a in start_balance}
    for p in payout_rows:
        assert p["status"] == "paid" and p["tx_signature"], p
        paid[p["payout_address"]] = paid.get(p["payout_address"], 0) + p["amount"]
    sigs = sorted({p["tx_signature"] for p in payout_rows})
    if sigs:
        statuses = rpc(url, "getSignatureStatuses", [sigs])["value"]
        assert all(s is not None and s.get("err") is None for s in statuses), list(zip(sigs, statuses))
    for address, before in start_balance.items():
        now = int(rpc(url, "getBalance", [address])["value"])
        assert now - before == paid[address], f"{address}: the ledger shows {now - before}, paid {paid[address]}"
