"""Attack (#16, pay as you go): a member claims more intervals than it served.

Real node processes on a shared ledger (``p2pgpu ledger serve``). The worker
runs with ``adversary = "claim_ahead"`` (test networks only): at each
boundary it sends its honest claim for interval k and a signed claim for
k + 1 at once. The submitter refuses every claim ahead of the time that passed
since it confirmed the cluster (``BAD_PROOF``), never records or pays an
interval for it, and pays the member exactly its installments for the
intervals it served plus the rest at settlement, once each.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from ledger_attack_helpers import rpc, start_ledger

from p2pgpu.localnet import LocalNet, NodeProc
from p2pgpu.node import ControlError
from p2pgpu.store import db_path, installments_of, open_db

# 30-90 s: under -m slow; tests/core/test_installments.py keeps the window check in the default run.
pytestmark = [pytest.mark.processes, pytest.mark.slow]

ONE_GPU = [("NVIDIA L4", 23034, "8.9", 1)]
PRICE = 360_000_000
JOB = f"""
name = "ahead"
[requirements]
nodes = 1
gpus_per_node = 1
[runtime]
command = ["sh", "-c", "sleep 26"]
duration_s_max = 120
[payment]
price_per_gpu_hour_max = {PRICE}
interval_s = 10
"""


def _settled_and_paid(node: NodeProc, job_id: str) -> dict[str, Any] | None:
    try:
        d = node.call("job.status", {"job_id": job_id})
    except ControlError:
        return None
    if d["state"] not in ("succeeded", "failed") or not d["payouts"]:
        return None
    return d if all(p["status"] == "paid" for p in d["payouts"]) else None


def test_a_member_claiming_intervals_it_did_not_serve_is_refused_and_not_paid(tmp_path: Path) -> None:
    ledger = start_ledger()
    try:
        node_config = {0: f"price_per_gpu_hour = {PRICE * 10}", 1: 'adversary = "claim_ahead"'}
        with LocalNet(tmp_path / "net", 2, gpu_mix=ONE_GPU, node_config=node_config,
                      config_extra=f'ledger = "{ledger.url}"\npayment_grace_s = 8') as net:
            submitter, worker = net.nodes
            rpc(ledger.url, "requestAirdrop", [submitter.call("wallet")["address"], 2_000_000_000])
            payout = worker.call("wallet")["payout_address"]
            rpc(ledger.url, "requestAirdrop", [payout, 1_000_000_000])
            before = int(rpc(ledger.url, "getBalance", [payout])["value"])
            job = submitter.call("job.submit", {"manifest": JOB})["job_id"]
            doc = net.wait_until(lambda: _settled_and_paid(submitter, job), timeout_s=120,
                                 what="the job to settle and be paid")
            ahead = worker.call("status")["counters"].get("adversary:claims_ahead", 0)
            refused = submitter.call("status")["counters"].get("jobs:bad_proof", 0)
            assert ahead >= 2 and refused >= ahead, (ahead, refused)  # every claim ahead was refused
            conn = open_db(db_path(submitter.home.path), readonly=True)
            try:
                rows = installments_of(conn, job)
            finally:
                conn.close()
            line = doc["proofs"][0]
            served_ms = line["gpu_ms"]
            # Only intervals it served were owed: 26 s of work holds two 10 s intervals.
            assert [r["interval"] for r in rows] == [1, 2] and served_ms < 3 * 10_000, (rows, served_ms)
            assert doc["state"] == "succeeded" and line["prepaid"] == sum(r["amount"] for r in rows)
            total = sum(p["amount"] for p in doc["payouts"])
            assert total == line["prepaid"] + line["amount"]
            # Paid once each: the balance grew by exactly that.
            deadline = time.monotonic() + 30
            while int(rpc(ledger.url, "getBalance", [payout])["value"]) - before != total:
                assert time.monotonic() < deadline, "the worker's balance does not show what it was owed"
                time.sleep(0.5)
    finally:
        ledger.stop()
