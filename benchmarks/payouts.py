"""Payout figures: payouts per transaction, fee per payout, payouts settled per second.

Runs the real payer (SQLite outbox with synchronous=FULL, LiteSVM) over:

* the embedded ledger, in this process;
* ``p2pgpu ledger serve`` in a separate process, through solana-py's
  AsyncClient (the path used for devnet and mainnet).

Each run owes N proofs to N distinct new recipients (the worst case: no two
rows share a transfer), pays them, checks that every balance equals what was
owed, and reports wall time from the first signature to the last confirmation.
"With a lookup table" first puts the recipients in an address lookup table
owned by the payer (its creation is not timed).  Usage:

    python3 benchmarks/payouts.py [--payouts 3876] [--skip-server]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from solders.keypair import Keypair

from p2pgpu import children
from p2pgpu.core._payout import fee_per_signature_lamports, transfers_max_lookup, transfers_max_plain
from p2pgpu.solana import EmbeddedLedger, Payer, RpcLedger, create_lookup_table, load_lookup_table
from p2pgpu.store import open_db, record_owed, transaction

AMOUNT = 1_000_000


def owe(conn: Any, recipients: list[str]) -> None:
    with transaction(conn):
        for i, addr in enumerate(recipients):
            record_owed(conn, hashlib.sha256(b"bench%d" % i).digest(), f"w{i}", addr, AMOUNT + i, "SOL", "bench")


async def run(ledger: Any, n: int, *, lookup: bool, workdir: Path, tag: str) -> dict[str, float]:
    payer = Keypair()
    await ledger.airdrop(payer.pubkey(), 10**13)  # within the faucet's per-address limit (10^14)
    recipients = [Keypair() for _ in range(n)]
    tables = None
    if lookup:
        # 255 = 5 batches of 51 per table, so that no batch spans two tables.
        addrs = [await create_lookup_table(ledger, payer, [r.pubkey() for r in recipients[i : i + 255]])
                 for i in range(0, n, 255)]
        await trio.sleep(0.45)  # usable one slot after the last extension
        tables = [await load_lookup_table(ledger, a) for a in addrs]
    db = workdir / f"{tag}.db"
    conn = open_db(db)
    owe(conn, [str(r.pubkey()) for r in recipients])
    p = Payer(conn, ledger, payer, transfers_max=transfers_max_lookup if lookup else transfers_max_plain,
              lookup=tables, poll_s=0.005, batches_per_round_max=10_000)
    t0 = time.perf_counter()
    report = await p.pay_once()
    dt = time.perf_counter() - t0
    balances = await ledger.balances([r.pubkey() for r in recipients])
    assert balances == [AMOUNT + i for i in range(n)], "a balance differs from what was owed"
    assert report.paid_rows == n, report
    fees = conn.execute("SELECT SUM(fee), COUNT(*) FROM payout_batches WHERE state = 'paid'").fetchone()
    conn.close()
    return {"payouts": n, "transactions": fees[1], "payouts_per_tx": n / fees[1], "fee_per_payout": fees[0] / n,
            "seconds": dt, "payouts_per_s": n / dt}


def free_port_pair() -> int:
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def line(name: str, r: dict[str, float]) -> str:
    unbatched = fee_per_signature_lamports
    return (f"{name:<34} {r['payouts']:>6.0f} payouts  {r['transactions']:>5.0f} tx  {r['payouts_per_tx']:>5.1f}/tx  "
            f"fee {r['fee_per_payout']:>6.1f} lamports/payout (1/{unbatched / r['fee_per_payout']:.1f} of unbatched)  "
            f"{r['payouts_per_s']:>8.0f} payouts/s")


async def main(args: argparse.Namespace) -> None:
    n = args.payouts
    work = Path(tempfile.mkdtemp(prefix="p2pgpu-bench-payouts-"))
    print(f"unbatched: 1 payout/tx, fee {fee_per_signature_lamports} lamports/payout")
    for lookup in (False, True):
        led = EmbeddedLedger(None, slot_ms=400)
        r = await run(led, n, lookup=lookup, workdir=work, tag=f"emb{int(lookup)}")
        print(line("embedded" + (" + lookup table" if lookup else ""), r), flush=True)
        await led.aclose()
    if args.skip_server:
        return
    port = free_port_pair()
    proc = children.spawn(  # started once, before timing
        [sys.executable, "-m", "p2pgpu.cli", "ledger", "serve", "--port", str(port)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("ledger ready")
        for lookup in (False, True):
            led = RpcLedger(f"http://127.0.0.1:{port}")
            r = await run(led, n, lookup=lookup, workdir=work, tag=f"rpc{int(lookup)}")
            print(line("ledger serve (solana-py RPC)" + (" + lookup table" if lookup else ""), r), flush=True)
            await led.aclose()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--payouts", type=int, default=3876)
    ap.add_argument("--skip-server", action="store_true")
    trio.run(main, ap.parse_args())
