"""``p2pgpu devnet up --once``: the whole network on one machine (issues 5 and 7).

Eight daemons, a ledger server and an explorer; five sample jobs (single,
two-node and replicated) are formed, run, proven and paid.  The summary's
payouts must match the ledger's balances, and every worker's ``earnings``
must show the transaction signature that paid it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.processes


def test_devnet_once_8_nodes_5_jobs_all_paid(tmp_path: Path) -> None:
    root = tmp_path / "devnet"
    res = subprocess.run([sys.executable, "-m", "p2pgpu.cli", "devnet", "up", "--once", "--nodes", "8", "--jobs", "5",
                          "--dir", str(root), "--json"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads(res.stdout)
    assert doc["ok"] and doc["nodes"] == 8 and len(doc["jobs"]) == 5
    assert all(j["state"] == "succeeded" for j in doc["jobs"])
    assert {j["name"] for j in doc["jobs"]} == {"hello", "pair", "replicated"}
    assert doc["clusters_formed"] == 5
    assert doc["ledger_matches_payouts"] is True and doc["ledger_mismatch"] == {}
    assert doc["payouts_confirmed"] == sum(j["members"] for j in doc["jobs"])
    paid_tx = {p["tx_signature"] for j in doc["jobs"] for p in j["payouts"]}
    assert None not in paid_tx and paid_tx == set(doc["transactions"])
    # Every worker's own store shows what it earned and the signature that paid it.
    seen_tx: set[str] = set()
    for i in range(8):
        out = subprocess.run([sys.executable, "-m", "p2pgpu.cli", "earnings", "--json", "--home", str(root / f"node{i}")],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        for e in json.loads(out.stdout):
            assert e["status"] == "paid", e
            seen_tx.add(e["tx_signature"])
    assert seen_tx == paid_tx
