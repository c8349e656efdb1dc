"""Payouts through real node processes and ``p2pgpu ledger serve`` (issue 5).

- A worker does not volunteer for a job whose payer cannot cover the job's
  price ceiling, and says why;
- once the payer is funded, a job runs and each worker sees the lamports its
  proof is owed arrive at its payout address, and ``earnings`` on the worker
  shows the transaction signature that paid it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_jobs import balance, ledger_server

from p2pgpu.devnet import rpc
from p2pgpu.localnet import LocalNet
from p2pgpu.node import ControlError

pytestmark = pytest.mark.processes
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "jobs"
ONE_GPU = [("NVIDIA L4", 23034, "8.9", 1)]
BALANCE_TTL_S = 2


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[str]:
    with ledger_server(tmp_path) as url:
        yield url



def test_unfunded_payer_gets_no_volunteers_then_funded_job_pays_workers(tmp_path: Path, ledger: str) -> None:
    # The workers believe a payer's balance for 2 s (payer_balance_ttl_s; 30 s by default).
    with LocalNet(tmp_path / "net", 3, gpu_mix=ONE_GPU,
                  config_extra=f'ledger = "{ledger}"\npayer_balance_ttl_s = {BALANCE_TTL_S}') as net:
        wallets = [n.call("wallet") for n in net.nodes]
        for w in wallets[1:]:  # workers' accounts exist (a new account needs its rent-exempt minimum)
            rpc(ledger, "requestAirdrop", [w["payout_address"], 1_000_000_000])
        submitter = net.nodes[0]
        job = submitter.call("job.submit", {"manifest": (EXAMPLES / "pair.toml").read_text()})["job_id"]
        worker = net.nodes[1]
        def declined() -> dict | None:
            try:
                d = worker.call("job.status", {"job_id": job})
            except ControlError:
                return None  # the manifest has not reached this worker yet
            return d if "payer balance" in d["reason"] else None

        st = net.wait_until(declined, timeout_s=30, what="the worker to decline")
        assert st["reason"].startswith("not volunteering: payer balance 0 is below the job's ceiling")
        assert submitter.call("job.status", {"job_id": job})["state"] == "forming"
        submitter.call("job.cancel", {"job_id": job})

        rpc(ledger, "requestAirdrop", [wallets[0]["address"], 50_000_000_000])
        time.sleep(BALANCE_TTL_S + 1)  # the workers' cached verdict on this payer expires
        before = {w["payout_address"]: balance(ledger, w["payout_address"]) for w in wallets[1:]}
        job = submitter.call("job.submit", {"manifest": (EXAMPLES / "pair.toml").read_text()})["job_id"]
        doc = net.wait_until(lambda: (lambda d: d if d["state"] in ("succeeded", "failed") and d["payouts"] and all(
            p["status"] == "paid" for p in d["payouts"]) else None)(submitter.call("job.status", {"job_id": job})),
            timeout_s=120, what="the job to be paid")
        assert doc["state"] == "succeeded"
        owed = {}
        for p in doc["payouts"]:
            owed[p["payout_address"]] = owed.get(p["payout_address"], 0) + p["amount"]
        for address, amount in owed.items():
            if address in before:
                assert balance(ledger, address) - before[address] == amount
        by_peer = {n.peer_id: n for n in net.nodes}
        for p in doc["payouts"]:
            node = by_peer[p["worker"]]
            out = subprocess.run([sys.executable, "-m", "p2pgpu.cli", "earnings", "--json", "--home",
                                  str(node.home.path)], capture_output=True, text=True, timeout=60)
            rows = [e for e in json.loads(out.stdout) if e["proof_hash"] == p["proof_hash"]]
            assert rows and rows[0]["tx_signature"] == p["tx_signature"] and rows[0]["amount"] == p["amount"]
