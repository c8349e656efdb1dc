"""#12 (held): liars in a replicated job, paid on a real ledger server.

A 3-replica job (quorum 2) runs on three real workers, one of them a liar,
and the submitter pays on a real ``p2pgpu ledger serve`` (both cases run
under ``-m slow``, about 30 s each):

- a liar about time (``adversary = "inflate_time"``: its proof claims it
  started 20 s before it did, on a job that ran for about a second): its
  proof is refused (the submitter's own window, ``over_window``, or the
  co-signers' observations, ``over_observed``) and owed nothing;
- a liar about its output (``adversary = "tamper_output"``):
  its proof is outside the quorum and owed nothing.

In both, the two honest replicas form the quorum and are paid, and the
ledger agrees to the lamport: each honest worker's balance grew by exactly
what the submitter recorded as paid to it, the liar's not at all.

``tests/e2e/test_execution.py`` shows the output liar's proof is marked
``outside_quorum`` (no ledger); ``tests/sim`` shows time inflation refused
for 1- and 2-node clusters in simulation; this is the real-process run of
both against a replicated job with real money moving.

What it guards: the quorum (``core/_proof.py``: ``quorum_digests``, what is
owed), the claim bounds (``verify_proof``: the window and the co-signers),
and the payer paying only what is owed (``solana/_payer.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from ledger_attack_helpers import (
    check_paid_as_recorded,
    free_port_pair,
    fund_wallets,
    node_rows,
    start_ledger,
)

from p2pgpu.localnet import LocalNet
from p2pgpu.runtime import check_sandbox
from p2pgpu.store import payouts

pytestmark = [pytest.mark.processes,
              pytest.mark.skipif(check_sandbox() is not None, reason=f"no sandbox here: {check_sandbox()}")]

ONE_GPU = [("NVIDIA L4", 23034, "8.9", 1)]
LIAR = 3
#: The submitter (node 0) asks more than the job's ceiling: the three workers are the replicas.
DEAR = "price_per_gpu_hour = 360000000"


def replicated(name: str) -> str:
    return f"""
name = "{name}"
[requirements]
nodes = 1
gpus_per_node = 1
[runtime]
command = ["sh", "-c", "sleep 1; echo the same answer"]
duration_s_max = 60
[payment]
price_per_gpu_hour_max = 36000000
[verification]
replicas = 3
quorum = 2
on_member_loss = "continue"
"""


def settled(net: LocalNet, job: str) -> dict[str, Any]:
    """The job once it ended and everything it owes is paid."""
    def done() -> dict[str, Any] | None:
        doc: dict[str, Any] = net.nodes[0].call("job.status", {"job_id": job})
        if doc["state"] not in ("succeeded", "failed") or len(doc["proofs"]) < 3:
            return None
        rows = [p for p in node_rows(net.nodes[0], payouts) if p["job_id"] == job]
        return doc if rows and all(p["status"] == "paid" for p in rows) else None
    result: dict[str, Any] = net.wait_until(done, timeout_s=120, interval_s=0.3, what=f"job {job[:12]} paid")
    return result


def run_liar(tmp_path: Path, adversary: str) -> dict[str, Any]:
    """One replicated job with node ``LIAR`` lying as ``adversary``: checks
    the ledger and returns the liar's proof as the submitter judged it."""
    ledger = start_ledger(port=free_port_pair(), log=tmp_path / "ledger.log")
    net = LocalNet(tmp_path / "net", 4, gpu_mix=ONE_GPU, config_extra=f'ledger = "{ledger.url}"',
                   node_config={0: DEAR, LIAR: f'adversary = "{adversary}"'})
    try:
        net.start()
        start_balance = fund_wallets(ledger.url, net.nodes[0], net.nodes[1:])
        net.wait_until(lambda: net.nodes[0].call("status")["adverts_known"] >= 4, timeout_s=60,
                       what="the submitter to see every worker")
        job = net.nodes[0].call("job.submit", {"manifest": replicated(adversary)})["job_id"]
        doc = settled(net, job)
        liar = net.nodes[LIAR]
        assert sorted(doc["cluster"]["members"]) == sorted(n.peer_id for n in net.nodes[1:]), doc["cluster"]
        proofs = {p["worker"]: p for p in doc["proofs"]}
        honest = [p for w, p in proofs.items() if w != liar.peer_id]
        assert all(p["status"] == "owed" and p["amount"] > 0 for p in honest), honest
        assert doc["state"] == "succeeded", doc
        assert {p["worker"] for p in doc["payouts"]} == {p["worker"] for p in honest}, doc["payouts"]
        # The ledger: honest workers got exactly what was recorded as paid, the liar nothing.
        rows = node_rows(net.nodes[0], payouts)
        check_paid_as_recorded(ledger.url, rows, start_balance)
        liar_address = liar.call("wallet")["payout_address"]
        assert all(p["payout_address"] != liar_address for p in rows), rows
        lie: dict[str, Any] = proofs[liar.peer_id]
        return lie
    finally:
        net.stop()
        ledger.stop()


@pytest.mark.slow  # about 30 s; the default run has test_liar_one_node.py (the window bound) and tests/sim
def test_a_replica_that_claims_more_time_than_it_served_is_not_paid(tmp_path: Path) -> None:
    lie = run_liar(tmp_path, "inflate_time")
    assert lie["status"] == "rejected" and lie["amount"] == 0, lie
    assert "over_window" in lie["reason"] or "over_observed" in lie["reason"], lie


@pytest.mark.slow  # tests/e2e/test_execution.py shows the same quorum (without a ledger) in the default run
def test_a_replica_that_lies_about_its_output_is_not_paid(tmp_path: Path) -> None:
    lie = run_liar(tmp_path, "tamper_output")
    assert lie["status"] == "outside_quorum" and lie["amount"] == 0, lie
