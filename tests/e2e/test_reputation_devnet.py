"""Receipts and reputation through real node processes (issue #16, "done when").

A devnet of four daemons on one ledger server, one of them tampering with its
outputs (``adversary = "tamper_output"``).  Replicated jobs (four replicas, quorum three) run and are paid;
the submitter signs a receipt for each (with the payout transactions) and
publishes it; the members sign what they saw of the payment.  Then:

- every node's receipts, copied out (``receipts.list``), give the very same
  scores the node reports (``reputation``) when recomputed from the copy
  alone and the ledger, by this test's own code;
- a forged receipt (one byte of a line changed) is refused;
- the tampering worker, whose proofs fell outside the quorum, ranks below
  every honest worker, and ``peers --json`` shows the scores and the
  evidence behind them.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from e2e_jobs import ledger_server

from p2pgpu.core import PeerMisbehaved, Reason, decode, encode
from p2pgpu.core._receipt import PublishedReceipt
from p2pgpu.core._reputation import compute_reputation, job_value_max
from p2pgpu.devnet import rpc
from p2pgpu.localnet import LocalNet
from p2pgpu.node._receipts import decode_item
from p2pgpu.solana import open_ledger
from p2pgpu.solana._verify import PaymentLookup

pytestmark = pytest.mark.processes
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "jobs"
ONE_GPU = [("NVIDIA L4", 23034, "8.9", 1)]
LIAR = 3


@pytest.fixture
def ledger_url(tmp_path: Path) -> Iterator[str]:
    with ledger_server(tmp_path) as url:
        yield url


def recompute(url: str, wires: list[bytes], now_ms: int) -> dict[str, dict[str, Any]]:
    """Scores from a copy of receipts and the ledger alone (no node asked)."""
    items = [decode_item(w) for w in wires]
    published = [i for i in items if isinstance(i, PublishedReceipt)]
    members = [i for i in items if not isinstance(i, PublishedReceipt)]

    async def payments() -> Any:
        ledger = open_ledger(url)
        try:
            sigs = [t for p in published for ln in p.receipt.lines for t in ln.tx_signatures]
            return await PaymentLookup(ledger).payments(sigs)
        finally:
            await ledger.aclose()

    rep = compute_reputation([p.signed for p in published], payments=trio.run(payments), now_ms=now_ms,
                             member_receipts=members,
                             cert_addresses={p.receipt.cert_hash: p.addresses for p in published})
    return {pid: s.to_json() | {"job_value_max": job_value_max(s)} for pid, s in rep.scores.items()}


def forge(wire: bytes) -> bytes:
    """The receipt with its first paid amount multiplied by 100, its signature kept."""
    outer = decode(wire, size_max=len(wire))
    env = decode(outer["receipt"], size_max=len(outer["receipt"]))
    body = decode(env["b"], size_max=len(env["b"]))
    row = next(r for r in body["lines"] if r[1] == "paid")
    row[2] *= 100
    env["b"] = encode(body)
    outer["receipt"] = encode(env)
    return encode(outer)


def settled(node: Any, job: str) -> dict[str, Any] | None:
    doc: dict[str, Any] = node.call("job.status", {"job_id": job})
    return doc if doc["state"] in ("succeeded", "failed") else None


def test_scores_recomputed_from_a_copy_match_and_the_liar_ranks_last(tmp_path: Path, ledger_url: str) -> None:
    with LocalNet(tmp_path / "net", 4, gpu_mix=ONE_GPU, config_extra=f'ledger = "{ledger_url}"',
                  node_config={LIAR: 'adversary = "tamper_output"'}) as net:
        for n in net.nodes:
            w = n.call("wallet")
            rpc(ledger_url, "requestAirdrop", [w["payout_address"], 1_000_000_000])
            rpc(ledger_url, "requestAirdrop", [w["address"], 10_000_000_000])
        submitter = net.nodes[0]
        liar = net.nodes[LIAR].peer_id
        # Four replicas, quorum three: every node serves, the tamperer included
        # (a leader would otherwise pick it last once its record is bad).
        manifest = (EXAMPLES / "replicated.toml").read_text().replace("replicas = 3", "replicas = 4") \
            .replace("quorum = 2", "quorum = 3")
        assert "replicas = 4" in manifest and "quorum = 3" in manifest
        jobs, liar_jobs = [], 0
        for _ in range(2):
            job = submitter.call("job.submit", {"manifest": manifest})["job_id"]
            doc = net.wait_until(lambda job=job: settled(submitter, job), timeout_s=120, what="the job to settle")
            jobs.append(job)
            liar_jobs += liar in doc["cluster"]["members"]
        assert liar_jobs, "the tampering node was never chosen"

        def receipts_of(node: Any) -> dict[str, Any]:
            return {r["job_id"]: r for r in node.call("receipts.list") if r["kind"] == "receipt"}

        # The submitter signs each receipt once its payouts are on the ledger,
        # and gossip brings the receipts to every node.
        for node in net.nodes:
            net.wait_until(lambda node=node: set(jobs) <= set(receipts_of(node)) or None, timeout_s=90,
                           what=f"node {node.index} to hold every receipt")
        paid_lines = [ln for r in receipts_of(submitter).values()
                      for ln in decode_item(bytes.fromhex(r["wire"])).receipt.lines]  # type: ignore[union-attr]
        assert any(ln.outcome == "paid" for ln in paid_lines)
        assert any(ln.peer_id == liar and ln.outcome == "outside_quorum" for ln in paid_lines)

        for node in net.nodes:
            rep = node.call("reputation", {"fresh": True})
            copy = [bytes.fromhex(r["wire"]) for r in node.call("receipts.list")]
            reported = {s["peer_id"]: s for s in rep["scores"]}
            assert recompute(ledger_url, copy, rep["computed_at_ms"]) == reported, f"node {node.index}"
            honest_paid = [p for p, s in reported.items() if p != liar and s["good"] > 0]
            assert honest_paid, reported
            assert reported[liar]["bad"] > 0 and reported[liar]["proofs_refused"] >= 1
            for p in honest_paid:
                assert reported[liar]["worker"] < reported[p]["worker"], (liar, p, reported)

        # The submitter's own view: members reported they were paid on time.
        held = submitter.call("receipts.list")
        assert any(r["kind"] == "member_receipt" for r in held)

        # A forged receipt (an amount changed after signing) is refused.
        real = next(bytes.fromhex(r["wire"]) for r in held if r["kind"] == "receipt")
        pr = decode_item(real)
        assert isinstance(pr, PublishedReceipt)
        with pytest.raises(PeerMisbehaved) as refused:
            decode_item(forge(real))
        assert refused.value.reason is Reason.BAD_SIGNATURE

        # What a node holds survives kill -9 and a restart, and scores the same.
        before = net.nodes[2].call("receipts.list")
        net.terminate(2, sig=signal.SIGKILL)
        restarted = net.restart(2)
        assert restarted.call("receipts.list") == before
        rep = restarted.call("reputation", {"fresh": True})
        assert recompute(ledger_url, [bytes.fromhex(r["wire"]) for r in before], rep["computed_at_ms"]) == \
            {s["peer_id"]: s for s in rep["scores"]}

        # The DHT holds the newest receipt naming each member, under its key.
        got = net.nodes[1].call("receipts.fetch", {"peer_id": liar})
        assert got["found"] and got["job_id"] in jobs, got

        # peers --json: each peer's score and the evidence behind it.
        res = subprocess.run([sys.executable, "-m", "p2pgpu.cli", "peers", "--json", "--home",
                              str(net.nodes[1].home.path)], check=False, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        rows = {r["peer_id"]: r for r in json.loads(res.stdout)}
        if liar in rows:
            assert rows[liar]["reputation"]["bad"] > 0 and rows[liar]["reputation"]["evidence"]
        assert any(r["reputation"]["good"] > 0 and r["reputation"]["evidence"] for r in rows.values())
