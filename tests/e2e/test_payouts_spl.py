"""SPL-token payouts through real node processes and ``p2pgpu ledger serve`` (issue 5).

The token twin of tests/e2e/test_payouts.py: three nodes advertise a price in
the base units of an SPL mint created on the shared ledger (``currency`` in
their config.toml is the mint's address); the submitter's wallet holds SOL
(fees and the rent of the workers' new token accounts) and tokens; a job
priced in that mint runs, and each worker sees exactly what its proof is owed
arrive in the associated token account of its payout address (created by the
payer in the payout transaction: the workers hold no SOL at all), and
``earnings`` on the worker shows the transaction signature.  First, a job
whose payer holds SOL but none of the tokens gets no volunteers: the workers'
"can the submitter pay?" check reads the payer's token account.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from solders.keypair import Keypair
from spl_helpers import create_mint, token_balance
from test_payouts import ledger  # noqa: F401 - the `p2pgpu ledger serve` fixture, shared

from p2pgpu.devnet import rpc
from p2pgpu.home import Config
from p2pgpu.localnet import LocalNet
from p2pgpu.node import ControlError
from p2pgpu.solana import load_or_create_keypair, payer_keypair_path

pytestmark = pytest.mark.processes
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "jobs"
ONE_GPU = [("NVIDIA L4", 23034, "8.9", 1)]
DECIMALS = 6
SUPPLY = 10**12  # one million tokens, in the submitter's token account
PRICE = 360_000_000  # base units per GPU-hour the nodes ask: 100 per GPU-millisecond
CEILING = 1_000_000_000  # the job's price_per_gpu_hour_max, in base units


def token_manifest(mint: str, payer: str = "") -> str:
    """examples/jobs/pair.toml priced in ``mint`` (paid by ``payer`` when given,
    else by the submitting node's wallet)."""
    text = (EXAMPLES / "pair.toml").read_text()
    text, n_currency = re.subn(r'(?m)^currency = "SOL"$', f'currency = "{mint}"', text)
    text, n_price = re.subn(r"(?m)^price_per_gpu_hour_max = \d+$", f"price_per_gpu_hour_max = {CEILING}", text)
    assert (n_currency, n_price) == (1, 1), "examples/jobs/pair.toml changed shape"
    if payer:
        text = text.replace(f'currency = "{mint}"', f'currency = "{mint}"\npayer = "{payer}"')
    return text


def earnings_of(home: Path) -> list[dict[str, Any]]:
    out = subprocess.run([sys.executable, "-m", "p2pgpu.cli", "earnings", "--json", "--home", str(home)],
                         check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout))


def test_token_job_pays_each_worker_its_tokens(tmp_path: Path, ledger: str) -> None:  # noqa: F811
    net = LocalNet(tmp_path / "net", 3, gpu_mix=ONE_GPU)
    # The homes are made here rather than by LocalNet(config_extra=...): that
    # appends lines to config.toml, which already sets `currency` and
    # `price_per_gpu_hour` (a duplicate TOML key is an error).  Each node's
    # wallet is made here too, the way the node makes it, so that the mint can
    # exist (with the submitter's tokens) before any node starts.
    homes = [net.home(i) for i in range(net.n)]
    for home in homes:
        home.init(network="local")
    payer = str(load_or_create_keypair(payer_keypair_path(homes[0].path, {})).pubkey())
    token = create_mint(ledger, payer, SUPPLY, decimals=DECIMALS)
    mint = str(token.mint)
    rpc(ledger, "requestAirdrop", [payer, 10_000_000_000])  # fees and the workers' token-account rent
    for home in homes:
        cfg = Config(network="local", price_per_gpu_hour=PRICE, currency=mint)
        home.config_path.write_text(cfg.to_toml() + f'ledger = "{ledger}"\n')
    with net:
        wallets = [n.call("wallet") for n in net.nodes]
        assert wallets[0]["address"] == payer
        submitter = net.nodes[0]
        assert token_balance(ledger, payer, token) == SUPPLY
        before = {w["payout_address"]: token_balance(ledger, w["payout_address"], token) for w in wallets}

        # A payer with SOL but no tokens: the workers read its token account, not its lamports, and decline.
        broke = str(Keypair().pubkey())
        rpc(ledger, "requestAirdrop", [broke, 10_000_000_000])
        unpaid = submitter.call("job.submit", {"manifest": token_manifest(mint, payer=broke)})["job_id"]

        def declined() -> str | None:
            for worker in net.nodes[1:]:
                try:
                    reason = str(worker.call("job.status", {"job_id": unpaid})["reason"])
                except ControlError:
                    continue  # the manifest has not reached this worker yet
                if "payer balance" in reason:
                    return reason
            return None

        reason = net.wait_until(declined, timeout_s=60, interval_s=0.5, what="a worker to decline the unfunded payer")
        ceiling = -(-2 * 1 * 30_000 * CEILING // 3_600_000)  # 2 members x 1 GPU x duration_s_max 30 at the ceiling
        assert reason.startswith(f"not volunteering: payer balance 0 is below the job's ceiling {ceiling} ")
        assert submitter.call("job.status", {"job_id": unpaid})["state"] == "forming"
        submitter.call("job.cancel", {"job_id": unpaid})

        job = submitter.call("job.submit", {"manifest": token_manifest(mint)})["job_id"]

        def settled() -> dict[str, Any] | None:
            d = submitter.call("job.status", {"job_id": job})
            if d["state"] == "failed":
                return d
            if d["state"] == "succeeded" and d["payouts"] and all(p["status"] == "paid" for p in d["payouts"]):
                return d
            return None

        doc = net.wait_until(settled, timeout_s=150, interval_s=0.5, what="the token job to be paid")
        assert doc["state"] == "succeeded", doc
        assert len(doc["payouts"]) == 2
        assert all(p["currency"] == mint and p["amount"] > 0 and p["tx_signature"] for p in doc["payouts"])
        owed: dict[str, int] = {}
        for p in doc["payouts"]:
            owed[p["payout_address"]] = owed.get(p["payout_address"], 0) + p["amount"]
        paid_to_others = sum(a for addr, a in owed.items() if addr != payer)
        for address, amount in owed.items():
            if address != payer:  # a worker's token account rose by exactly what it is owed
                assert token_balance(ledger, address, token) - before[address] == amount
                assert int(rpc(ledger, "getBalance", [address])["value"]) == 0  # its account's rent: the payer's
        # The payer's tokens went down by exactly what others were paid (a payout to itself moves nothing).
        assert token_balance(ledger, payer, token) == SUPPLY - paid_to_others

        by_peer = {n.peer_id: n for n in net.nodes}
        for p in doc["payouts"]:
            home = by_peer[p["worker"]].home.path

            def noted(home: Path = home, p: dict[str, Any] = p) -> dict[str, Any] | None:
                rows = [e for e in earnings_of(home) if e["proof_hash"] == p["proof_hash"]]
                return rows[0] if rows and rows[0]["status"] == "paid" else None

            row = net.wait_until(noted, timeout_s=60, interval_s=1.0, what="the worker to note its payment")
            assert row["tx_signature"] == p["tx_signature"]
            assert row["amount"] == p["amount"] and row["currency"] == mint
            assert row["payout_address"] == p["payout_address"]
