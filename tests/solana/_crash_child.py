"""One life of a payer process for the crash tests (run by test_crash.py).

argv: DB LEDGER KEYFILE SEED NEW_ROWS STEP NTH.  LEDGER is a state file path
(embedded) or an http URL (``p2pgpu ledger serve``).  The process owes
NEW_ROWS new proofs (one transaction; "top-up" owes one payable row to each recipient), then runs the payer; when STEP is one
of owed/signed/sent/confirmed it kills itself with SIGKILL (kill -9) at the
NTH-th time it reaches that step, as a power cut
would; STEP "none" runs clean.  It exits 0 once a round finishes with
nothing open.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sys
from pathlib import Path

import trio

from p2pgpu.solana import EmbeddedLedger, Payer, RpcLedger, load_keypair
from p2pgpu.store import open_db, record_owed, transaction

RECIPIENT_SEEDS = 8


def recipients() -> list[str]:
    from solders.keypair import Keypair

    return [str(Keypair.from_seed(hashlib.sha256(b"recipient%d" % i).digest()).pubkey()) for i in range(RECIPIENT_SEEDS)]


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


async def main() -> int:
    db, ledger_spec, keyfile, seed, new_rows, step, nth_arg = sys.argv[1:8]
    rng = random.Random(int(seed))
    nth = int(nth_arg)
    seen = {"n": 0}

    def hook(s: str) -> None:
        if s == step:
            seen["n"] += 1
            if seen["n"] >= nth:
                die()

    conn = open_db(db)
    addrs = recipients()
    with transaction(conn):
        base = conn.execute("SELECT COUNT(*) FROM payout_owed").fetchone()[0]
        if new_rows == "top-up":  # one payable row per recipient: nothing can wait for rent any more
            for i, addr in enumerate(addrs):
                record_owed(conn, hashlib.sha256(b"topup%d" % i).digest(), "worker", addr, 1_000_000, "SOL", "top-up")
        for i in range(0 if new_rows == "top-up" else int(new_rows)):
            n = base + i
            # Mostly payable amounts, some below the rent-exempt minimum that must accumulate.
            amount = rng.choice([1_000_000 + n, 2_500_000 + 7 * n, 300_000 + n]) if i else 1_000_000 + n
            record_owed(conn, hashlib.sha256(b"proof%d" % n).digest(), f"worker{n % 8}", addrs[rng.randrange(len(addrs))],
                        amount, "SOL", f"job{n // 10}")
    if step == "owed":
        die()
    if ledger_spec.startswith("http"):
        ledger = RpcLedger(ledger_spec)
    else:
        ledger = EmbeddedLedger(Path(ledger_spec), slot_ms=5)
    payer = Payer(conn, ledger, load_keypair(Path(keyfile)), hook=hook, transfers_max=5, resend_s=0.2)
    report = await payer.pay_once()
    await ledger.aclose()
    return 0 if report.open_batches == 0 else 3


if __name__ == "__main__":
    sys.exit(trio.run(main))
