"""#16.3, attack: payment notices forged by the submitter, or lost on the way.

Real node processes on a shared ledger (``p2pgpu ledger serve``), a job paid
as it goes (10 s intervals, the worker's grace 6 s):

- **Forged.** The submitter runs with ``adversary = "forge_notices"`` (test
  networks only) and its payer wallet is emptied once the job runs: it pays
  nothing, but tells the worker each interval was paid, citing a
  transaction that never was.  The worker looks each notice up on the
  ledger, refuses it (``installments:notice_refused``), and stops at its
  grace with end reason ``unpaid``, as it would without a notice.  Before
  #16.3 it believed the notice and worked on for nothing.
- **Lost.** The submitter runs with ``adversary = "lose_notices"``: the
  first send of every notice is lost.  Its host resends each notice until
  the worker acknowledges it; the worker is paid every interval, never stops,
  and the job succeeds.  Before #16.3 a notice went once, and the worker
  stopped at its grace although it was paid.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest
from ledger_attack_helpers import rpc, start_ledger
from solders.hash import Hash
from solders.keypair import Keypair
from solders.system_program import TransferParams, transfer
from solders.transaction import Transaction

from p2pgpu.localnet import LocalNet, NodeProc
from p2pgpu.node import ControlError

pytestmark = [pytest.mark.processes, pytest.mark.slow]

ONE_GPU = [("NVIDIA L4", 23034, "8.9", 1)]
PRICE = 360_000_000
GRACE_S = 6


def job(sleep_s: int) -> str:
    return f"""
name = "notices"
[requirements]
nodes = 1
gpus_per_node = 1
[runtime]
command = ["sh", "-c", "sleep {sleep_s}"]
duration_s_max = 120
[payment]
price_per_gpu_hour_max = {PRICE}
interval_s = 10
"""


def status(node: NodeProc, job_id: str) -> dict[str, Any] | None:
    try:
        doc = node.call("job.status", {"job_id": job_id})
    except ControlError:
        return None
    return doc if isinstance(doc, dict) else None


def member_stopped(node: NodeProc, job_id: str) -> dict[str, Any] | None:
    d = status(node, job_id)
    return d if d and d.get("member_state") not in ("running", None) else None


def ended(node: NodeProc, job_id: str) -> dict[str, Any] | None:
    d = status(node, job_id)
    return d if d and d["state"] in ("succeeded", "failed") else None


def counter(node: NodeProc, name: str) -> int:
    return int(node.call("status")["counters"].get(name, 0))


def drain(url: str, node: NodeProc) -> None:
    """Everything in the node's payer wallet leaves it: it cannot pay."""
    key = Keypair.from_bytes(bytes(json.loads((node.home.path / "payer.json").read_text())))
    left = int(rpc(url, "getBalance", [str(key.pubkey())])["value"]) - 5_000
    blockhash = rpc(url, "getLatestBlockhash", [])["value"]["blockhash"]
    tx = Transaction.new_signed_with_payer(
        [transfer(TransferParams(from_pubkey=key.pubkey(), to_pubkey=Keypair().pubkey(), lamports=left))],
        key.pubkey(), [key], Hash.from_string(blockhash))
    rpc(url, "sendTransaction", [base64.b64encode(bytes(tx)).decode(), {"encoding": "base64"}])
    deadline = time.monotonic() + 20
    while int(rpc(url, "getBalance", [str(key.pubkey())])["value"]) > 5_000:
        assert time.monotonic() < deadline, "the drain did not land"
        time.sleep(0.2)


def open_net(tmp_path: Path, url: str, adversary: str) -> LocalNet:
    node_config = {0: f'price_per_gpu_hour = {PRICE * 10}\nadversary = "{adversary}"'}
    return LocalNet(tmp_path / "net", 2, gpu_mix=ONE_GPU, node_config=node_config,
                    config_extra=f'ledger = "{url}"\npayment_grace_s = {GRACE_S}')


def fund(net: LocalNet, url: str) -> None:
    rpc(url, "requestAirdrop", [net.nodes[0].call("wallet")["address"], 2_000_000_000])
    rpc(url, "requestAirdrop", [net.nodes[1].call("wallet")["payout_address"], 1_000_000_000])


def test_a_forged_payment_notice_does_not_keep_the_worker_working(tmp_path: Path) -> None:
    ledger = start_ledger()
    try:
        with open_net(tmp_path, ledger.url, "forge_notices") as net:
            fund(net, ledger.url)
            submitter, worker = net.nodes
            job_id = submitter.call("job.submit", {"manifest": job(60)})["job_id"]
            net.wait_until(lambda: (status(worker, job_id) or {}).get("member_state") == "running", timeout_s=60,
                           what="the worker to run the job")
            drain(ledger.url, submitter)  # before interval 1 is claimed (10 s + 2 s after the start)
            doc = net.wait_until(lambda: member_stopped(worker, job_id), timeout_s=60, what="the worker to stop")
            assert counter(submitter, "adversary:notices_forged") >= 1
            assert counter(worker, "installments:notice_refused") >= 1
            assert counter(worker, "jobs:payment_not_on_ledger") >= 1
            assert "did not pay interval 1" in doc["reason"], doc["reason"]
            served_s = (doc["member_ended_at_ms"] - doc["member_started_at_ms"]) / 1000
            assert served_s <= 10 + 2 + GRACE_S + 3, served_s  # stopped at interval 1's grace, not later
    finally:
        ledger.stop()


def test_a_lost_payment_notice_is_resent_and_the_worker_keeps_working(tmp_path: Path) -> None:
    ledger = start_ledger()
    try:
        with open_net(tmp_path, ledger.url, "lose_notices") as net:
            fund(net, ledger.url)
            submitter, worker = net.nodes
            job_id = submitter.call("job.submit", {"manifest": job(26)})["job_id"]
            doc = net.wait_until(lambda: ended(submitter, job_id), timeout_s=120, what="the job to end")
            line = doc["proofs"][0]
            assert doc["state"] == "succeeded" and line["end_reason"] != "unpaid", doc
            assert line.get("prepaid", 0) > 0  # installments were paid while it ran
            assert counter(submitter, "adversary:notices_lost") >= 2  # intervals 1 and 2: first sends lost
            assert counter(submitter, "notices:resent") >= 2 and counter(submitter, "notices:acked") >= 2
            assert counter(worker, "installments:paid") >= 2
            assert counter(worker, "installments:notice_refused") == 0  # the real payments checked out
    finally:
        ledger.stop()
