"""Pay as you go through real node processes and ``p2pgpu ledger serve`` (issue 16).

A job with ``payment.interval_s = 10`` on a shared ledger: the worker claims
each interval, the submitter's payer pays it, and

- a submitter whose wallet is emptied mid-job (it stops paying) loses its
  worker within one interval plus the grace, and the worker was paid for every
  interval it claimed before the payments stopped, and says why it stopped;
- a submitter killed with SIGKILL mid-interval and right after a payment went
  out, and restarted, pays every interval and the remainder exactly once: the
  worker's balance grows by exactly what its job status says it was owed;
  the submitter's receipt then says the worker was ``paid`` what it was
  paid in all (every installment and the remainder, each transaction
  cited), the worker's own receipt counts the installments too, and the
  worker's score recomputed from the receipts and the ledger alone is that
  total.

The worker's grace is 6 s (``payment_grace_s``); node 0 submits and never
serves (its price is above the job's ceiling).
"""

from __future__ import annotations

import base64
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_jobs import balance, ledger_server
from solders.hash import Hash
from solders.keypair import Keypair
from solders.system_program import TransferParams, transfer
from solders.transaction import Transaction

from p2pgpu.devnet import rpc
from p2pgpu.localnet import LocalNet, NodeProc
from p2pgpu.node import ControlError
from p2pgpu.store import db_path, open_db

pytestmark = pytest.mark.processes

ONE_GPU = [("NVIDIA L4", 23034, "8.9", 1)]
INTERVAL_S = 10
GRACE_S = 6
#: The job's ceiling: 100,000 lamports per GPU-second (a worker's agreed price
#: may be lower; the workers' accounts exist, so no installment waits for rent).
PRICE = 360_000_000
DEAR = {0: f"price_per_gpu_hour = {PRICE * 10}"}


def payg_job(name: str, sleep_s: int) -> str:
    return f"""
name = "{name}"
[requirements]
nodes = 1
gpus_per_node = 1
[runtime]
command = ["sh", "-c", "echo started; sleep {sleep_s}; echo done"]
duration_s_max = 120
[payment]
price_per_gpu_hour_max = {PRICE}
interval_s = {INTERVAL_S}
"""


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[str]:
    with ledger_server(tmp_path) as url:
        yield url



def open_net(tmp_path: Path, ledger: str) -> LocalNet:
    return LocalNet(tmp_path / "net", 2, gpu_mix=ONE_GPU, node_config=DEAR,
                    config_extra=f'ledger = "{ledger}"\npayment_grace_s = {GRACE_S}')


def fund(net: LocalNet, ledger: str) -> tuple[str, str]:
    """The payer's wallet and the worker's payout account exist and hold SOL."""
    payer = net.nodes[0].call("wallet")["address"]
    payout = net.nodes[1].call("wallet")["payout_address"]
    rpc(ledger, "requestAirdrop", [payer, 2_000_000_000])
    rpc(ledger, "requestAirdrop", [payout, 1_000_000_000])
    return payer, payout


def drain(ledger: str, node: NodeProc) -> None:
    """The submitter stops paying: everything in its payer wallet leaves it."""
    key = Keypair.from_bytes(bytes(json.loads((node.home.path / "payer.json").read_text())))
    left = balance(ledger, str(key.pubkey())) - 5_000
    blockhash = rpc(ledger, "getLatestBlockhash", [])["value"]["blockhash"]
    tx = Transaction.new_signed_with_payer(
        [transfer(TransferParams(from_pubkey=key.pubkey(), to_pubkey=Keypair().pubkey(), lamports=left))],
        key.pubkey(), [key], Hash.from_string(blockhash))
    rpc(ledger, "sendTransaction", [base64.b64encode(bytes(tx)).decode(), {"encoding": "base64"}])
    deadline = time.monotonic() + 20
    while balance(ledger, str(key.pubkey())) > 5_000:
        assert time.monotonic() < deadline, "the drain did not land"
        time.sleep(0.2)


def status(node: NodeProc, job_id: str) -> dict[str, Any] | None:
    try:
        doc = node.call("job.status", {"job_id": job_id})
    except ControlError:
        return None
    return doc if isinstance(doc, dict) else None


def stopped(node: NodeProc, job_id: str) -> dict[str, Any] | None:
    """The worker's status once its part is no longer running."""
    d = status(node, job_id)
    return d if d and d.get("member_state") not in ("running", None) else None


def settled(node: NodeProc, job_id: str, *, paid: bool = False) -> dict[str, Any] | None:
    """The submitter's status once the job settled (and, with ``paid``, every payout is paid)."""
    d = status(node, job_id)
    if not d or d["state"] not in ("succeeded", "failed"):
        return None
    if paid and not (d["payouts"] and all(p["status"] == "paid" for p in d["payouts"])):
        return None
    return d


def earnings(node: NodeProc, job_id: str) -> list[dict[str, Any]]:
    """The worker's earnings of a job: one per claimed interval, and one for its proof."""
    conn = open_db(db_path(node.home.path), readonly=True)
    try:
        return [{"proof_hash": bytes(r[0]).hex(), "amount": r[1], "status": r[2], "tx_signature": r[3]}
                for r in conn.execute("SELECT proof_hash, amount, status, tx_signature FROM earnings"
                                      " WHERE job_id = ? ORDER BY created_ms", (job_id,))]
    finally:
        conn.close()


def installments(node: NodeProc, job_id: str) -> list[dict[str, Any]]:
    conn = open_db(db_path(node.home.path), readonly=True)
    try:
        from p2pgpu.store import installments_of

        return installments_of(conn, job_id)
    finally:
        conn.close()


def owed_rows(node: NodeProc, job_id: str) -> list[tuple[str, int]]:
    conn = open_db(db_path(node.home.path), readonly=True)
    try:
        return [(bytes(r[0]).hex(), r[1]) for r in conn.execute(
            "SELECT proof_hash, amount FROM payout_owed WHERE job_id = ? ORDER BY owed_id", (job_id,))]
    finally:
        conn.close()


def paid_intervals(worker: NodeProc, submitter: NodeProc, job_id: str) -> list[int]:
    """The intervals whose payment notice reached the worker."""
    keys = {i["key"]: i["interval"] for i in installments(submitter, job_id)}
    return sorted(keys[e["proof_hash"]] for e in earnings(worker, job_id)
                  if e["status"] == "paid" and e["proof_hash"] in keys)


def test_a_submitter_that_stops_paying_loses_its_worker_within_interval_plus_grace(tmp_path: Path,
                                                                                    ledger: str) -> None:
    with open_net(tmp_path, ledger) as net:
        fund(net, ledger)
        submitter, worker = net.nodes
        job = submitter.call("job.submit", {"manifest": payg_job("unpaid", 100)})["job_id"]
        net.wait_until(lambda: (status(worker, job) or {}).get("member_state") == "running", timeout_s=60,
                       what="the worker to run the job")
        net.wait_until(lambda: paid_intervals(worker, submitter, job) == [1], timeout_s=40,
                       what="the first interval to be paid")
        drain(ledger, submitter)
        drained = time.monotonic()
        doc = net.wait_until(lambda: stopped(worker, job), timeout_s=INTERVAL_S + GRACE_S + 20,
                             what="the worker to stop")
        stopped_after_s = time.monotonic() - drained
        # Interval 2 was claimed at most one interval after the drain and was due
        # GRACE_S later: the worker stops within one interval plus the grace
        # (plus the claim delay and a polling margin).
        assert stopped_after_s <= INTERVAL_S + GRACE_S + 2 + 5, stopped_after_s
        assert "did not pay interval 2" in doc["reason"], doc["reason"]
        served_ms = doc["member_ended_at_ms"] - doc["member_started_at_ms"]
        # What it served unpaid: at most one interval plus the grace (and the claim delay).
        paid = paid_intervals(worker, submitter, job)
        assert paid == [1]
        unpaid_ms = served_ms - len(paid) * INTERVAL_S * 1000
        assert 0 < unpaid_ms <= (INTERVAL_S + GRACE_S + 2) * 1000 + 1_500, unpaid_ms
        # Every interval claimed was owed (recorded once), the paid one at its price.
        rows = installments(submitter, job)
        assert [r["interval"] for r in rows] == [1, 2]
        # At the worker's agreed price, as the worker itself expected it.
        expected = {e["proof_hash"]: e["amount"] for e in earnings(worker, job)}
        assert all(0 < r["amount"] == expected[r["key"]] == rows[0]["amount"] for r in rows), (rows, expected)
        assert len({h for h, _ in owed_rows(submitter, job)}) == len(owed_rows(submitter, job))
        # The submitter's outcome says why the part ended.
        sub = net.wait_until(lambda: settled(submitter, job), timeout_s=60, what="the job to settle")
        line = sub["proofs"][0]
        assert line["end_reason"] == "unpaid" and line.get("prepaid") == 2 * rows[0]["amount"], line


def test_submitter_killed_mid_interval_and_after_a_payment_pays_each_interval_once(tmp_path: Path,
                                                                                    ledger: str) -> None:
    with open_net(tmp_path, ledger) as net:
        _payer, payout = fund(net, ledger)
        before = balance(ledger, payout)
        worker = net.nodes[1]
        job = net.nodes[0].call("job.submit", {"manifest": payg_job("crashy", 36)})["job_id"]
        net.wait_until(lambda: (status(worker, job) or {}).get("member_state") == "running", timeout_s=60,
                       what="the worker to run the job")
        time.sleep(INTERVAL_S / 2)
        net.terminate(0, sig=signal.SIGKILL)  # mid-interval: nothing claimed yet
        net.restart(0)
        net.wait_until(lambda: paid_intervals(worker, net.nodes[0], job) == [1], timeout_s=40,
                       what="the first interval to be paid")
        net.terminate(0, sig=signal.SIGKILL)  # right after a payment went out
        net.restart(0)
        doc = net.wait_until(lambda: settled(net.nodes[0], job, paid=True), timeout_s=90,
                             what="the job to settle and be paid")
        assert doc["state"] == "succeeded", doc["reason"]
        mine = status(worker, job)
        assert mine is not None and mine["member_state"] == "succeeded", mine
        rows = installments(net.nodes[0], job)
        assert [r["interval"] for r in rows] == [1, 2, 3]
        line = doc["proofs"][0]
        assert line["prepaid"] == 3 * rows[0]["amount"] > 0
        total = sum(p["amount"] for p in doc["payouts"])
        assert total == line["prepaid"] + line["amount"]
        # Paid exactly once each: the worker's balance grew by exactly what it was owed.
        assert len({p["proof_hash"] for p in doc["payouts"]}) == len(doc["payouts"]) == 4
        net.wait_until(lambda: balance(ledger, payout) - before == total, timeout_s=30,
                       what="the worker's balance to show every payment")
        time.sleep(3)
        assert balance(ledger, payout) - before == total
        receipts_cite_every_payment(net.nodes[0], worker, ledger, job, doc, total)


def receipts_cite_every_payment(submitter: NodeProc, worker: NodeProc, ledger: str, job: str,
                                doc: dict[str, Any], total: int) -> None:
    """The job's receipts, as each node holds them, against the ledger."""
    from p2pgpu.core._receipt import PublishedReceipt
    from p2pgpu.core._reputation import compute_reputation
    from p2pgpu.node._receipts import decode_item

    def held(node: NodeProc, kind: str, signer: str) -> Any:
        for r in node.call("receipts.list"):
            if r["kind"] == kind and r["job_id"] == job and r["signer"] == signer:
                return decode_item(bytes.fromhex(r["wire"]))
        return None

    me, sub_id = worker.call("status")["peer_id"], submitter.call("status")["peer_id"]
    published = submitter_wait(lambda: held(submitter, "receipt", sub_id), "the submitter's receipt")
    assert isinstance(published, PublishedReceipt)
    (ln,) = published.receipt.lines
    sigs = {p["tx_signature"] for p in doc["payouts"]}
    assert (ln.peer_id, ln.outcome, ln.amount) == (me, "paid", total), ln
    assert set(ln.tx_signatures) == sigs and len(sigs) >= 2, (ln, sigs)  # installments and remainder
    mine = submitter_wait(lambda: held(worker, "member_receipt", me), "the worker's receipt").receipt
    assert mine.received == total and mine.verdict in ("on_time", "late") and mine.tx_signature in sigs, mine
    # Anyone's recomputation: every cited payment checked on the ledger.
    from p2pgpu.solana import open_ledger
    from p2pgpu.solana._verify import PaymentLookup

    async def payments() -> Any:
        led = open_ledger(ledger)
        try:
            return await PaymentLookup(led).payments(sorted(sigs))
        finally:
            await led.aclose()

    import trio

    rep = compute_reputation([published.signed], payments=trio.run(payments), now_ms=published.receipt.settled_at_ms,
                             cert_addresses={published.receipt.cert_hash: published.addresses})
    assert rep.score(me).good == total and rep.score(sub_id).paid == total, rep


def submitter_wait(fn: Any, what: str, timeout_s: float = 30) -> Any:
    deadline = time.monotonic() + timeout_s
    while (got := fn()) is None:
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
    return got


@pytest.mark.slow
def test_member_killed_after_a_payment_is_owed_only_the_rest_of_its_time(tmp_path: Path, ledger: str) -> None:
    with open_net(tmp_path, ledger) as net:
        _payer, payout = fund(net, ledger)
        before = balance(ledger, payout)
        submitter = net.nodes[0]
        job = submitter.call("job.submit", {"manifest": payg_job("victim", 100)})["job_id"]
        net.wait_until(lambda: (status(net.nodes[1], job) or {}).get("member_state") == "running", timeout_s=60,
                       what="the worker to run the job")
        net.wait_until(lambda: paid_intervals(net.nodes[1], submitter, job) == [1], timeout_s=40,
                       what="the first interval to be paid")
        net.terminate(1, sig=signal.SIGKILL)
        net.restart(1)
        mine = status(net.nodes[1], job)
        assert mine is not None and mine["member_state"] == "interrupted"
        doc = net.wait_until(lambda: settled(submitter, job, paid=True), timeout_s=90,
                             what="the job to settle and be paid")
        line = doc["proofs"][0]
        rows = installments(submitter, job)
        assert line["end_reason"] == "interrupted" and line["prepaid"] == len(rows) * rows[0]["amount"]
        total = sum(p["amount"] for p in doc["payouts"])
        assert total == line["prepaid"] + line["amount"]
        assert len({p["proof_hash"] for p in doc["payouts"]}) == len(doc["payouts"])
        net.wait_until(lambda: balance(ledger, payout) - before == total, timeout_s=30,
                       what="the worker's balance to show every payment")
