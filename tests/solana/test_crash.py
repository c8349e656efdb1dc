"""Crash test: ``kill -9`` the payer at every step, many times; every owed payout is paid exactly once.

Each life of the payer is a separate process (``_crash_child.py``) that owes
a few new proofs and runs the payer, killing itself with SIGKILL at a step
chosen from a seed: after owing, after signing, after sending, or after
seeing the confirmation.  After the crashes, clean lives run until nothing is
open.  Then each recipient's balance on the ledger must equal exactly what
the outbox owed it (recipients start at zero): a double payment or a lost one
would show.  Run against the embedded ledger (state file shared by the lives)
and against ``p2pgpu ledger serve`` in its own process.  Blocks advance fast
(5-10 ms) so that some lives find their blockhash expired and must rebuild.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from ledger_helpers import ServerProc, start_server, stop_server
from solders.keypair import Keypair
from solders.pubkey import Pubkey

from p2pgpu.solana import EmbeddedLedger, RpcLedger
from p2pgpu.solana._keys import save_keypair
from p2pgpu.store import open_db, owed_totals

CHILD = str(Path(__file__).with_name("_crash_child.py"))


STEPS = ["owed", "signed", "sent", "confirmed"]


def run_child(db: Path, ledger: str, keyfile: Path, seed: int, new_rows: int | str, step: str, nth: int = 1) -> int:
    r = subprocess.run([sys.executable, CHILD, str(db), ledger, str(keyfile), str(seed), str(new_rows), step, str(nth)],
                       capture_output=True, text=True, timeout=120, check=False)
    if r.returncode not in (0, -9, 3):
        raise AssertionError(f"payer life failed ({r.returncode}): {r.stderr[-2000:]}")
    return r.returncode


def crash_lives(db: Path, ledger: str, keyfile: Path, lives: int, seed: int) -> dict[str, int]:
    """Lives that each try to die at one step (the steps in turn, the rest at random);
    returns how many lives were killed at each step."""
    rng = random.Random(seed)
    killed = {s: 0 for s in STEPS}
    for i in range(lives):
        step = STEPS[i % len(STEPS)]
        nth = 1 if i < len(STEPS) else rng.choice([1, 2, 3])  # each step surely reached once, then at random
        if run_child(db, ledger, keyfile, rng.randrange(2**32), rng.randint(1, 12), step, nth) == -9:
            killed[step] += 1
    run_child(db, ledger, keyfile, 0, "top-up", "none")  # rows waiting for rent become payable
    for i in range(10):
        if run_child(db, ledger, keyfile, i, 0, "none") == 0:
            break
    return killed


def check_exactly_once(db: Path, balances: dict[str, int]) -> None:
    conn = open_db(db)
    totals = owed_totals(conn, currency="SOL")
    statuses = {s for t in totals.values() for s in t}
    assert statuses <= {"paid"}, f"rows left unpaid: {totals}"
    assert {a: t["paid"] for a, t in totals.items()} == {a: balances[a] for a in totals}
    n = conn.execute("SELECT COUNT(*) FROM payout_owed").fetchone()[0]
    assert n > 0
    # Every paid row is in exactly one paid batch.
    assert conn.execute(
        "SELECT COUNT(*) FROM payout_owed o WHERE (SELECT COUNT(*) FROM payout_batch_items i JOIN payout_batches b"
        " USING (batch_id) WHERE i.owed_id = o.owed_id AND b.state = 'paid') != 1"
    ).fetchone()[0] == 0


async def fund(ledger: object, payer: Keypair) -> None:
    await ledger.airdrop(payer.pubkey(), 10**13)  # type: ignore[attr-defined]


def _setup(tmp_path: Path) -> tuple[Path, Path, Keypair]:
    payer = Keypair()
    keyfile = tmp_path / "payer.json"
    save_keypair(keyfile, payer)
    return tmp_path / "state.db", keyfile, payer


def _balances_embedded(state: Path, addrs: list[str]) -> dict[str, int]:
    led = EmbeddedLedger(state, slot_ms=0)
    try:
        return {a: led.svm.balance(Pubkey.from_string(a)) for a in addrs}
    finally:
        led.svm.close()


def _recipients(db: Path) -> list[str]:
    return sorted(owed_totals(open_db(db), currency="SOL"))


def test_crash_embedded(tmp_path: Path) -> None:
    _crash_embedded(tmp_path, lives=8, seed=1)


def _crash_embedded(tmp_path: Path, lives: int, seed: int) -> None:
    db, keyfile, payer = _setup(tmp_path)
    state = tmp_path / "ledger.state"
    led = EmbeddedLedger(state, slot_ms=0)
    trio.run(fund, led, payer)
    led.svm.close()
    killed = crash_lives(db, str(state), keyfile, lives, seed=seed)
    assert all(n > 0 for n in killed.values()), killed
    check_exactly_once(db, _balances_embedded(state, _recipients(db)))


def _crash_server(tmp_path: Path, lives: int, seed: int) -> None:
    db, keyfile, payer = _setup(tmp_path)
    server: ServerProc = start_server(tmp_path / "ledger.state", slot_ms=10)
    try:
        async def go() -> dict[str, int]:
            led = RpcLedger(server.url)
            await fund(led, payer)
            await led.aclose()
            return {}

        trio.run(go)
        killed = crash_lives(db, server.url, keyfile, lives, seed=seed)
        assert all(n > 0 for n in killed.values()), killed

        async def bals() -> dict[str, int]:
            led = RpcLedger(server.url)
            addrs = _recipients(db)
            out = dict(zip(addrs, await led.balances([Pubkey.from_string(a) for a in addrs])))
            await led.aclose()
            return out

        check_exactly_once(db, trio.run(bals))
    finally:
        stop_server(server)


def test_crash_ledger_server(tmp_path: Path) -> None:
    _crash_server(tmp_path, lives=8, seed=2)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_crash_soak_ledger_server(tmp_path: Path) -> None:
    _crash_server(tmp_path, lives=120, seed=3)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_crash_soak_embedded(tmp_path: Path) -> None:
    _crash_embedded(tmp_path, lives=120, seed=4)
