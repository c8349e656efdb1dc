"""The ledger and payout commands on a real home: wallet (with airdrop), payouts,
earnings, proof inclusion / proof check, against the embedded ledger and a
``p2pgpu ledger serve`` process."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from ledger_helpers import start_server, stop_server
from solders.keypair import Keypair

from p2pgpu.cli import main
from p2pgpu.home import Home
from p2pgpu.solana import EmbeddedLedger, Payer, load_or_create_keypair, payer_keypair_path
from p2pgpu.store import db_path, open_db, record_earning, record_owed, transaction


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    code = main(list(argv))
    out = capsys.readouterr().out
    return code, (json.loads(out) if "--json" in argv and out.strip() else {})


@pytest.fixture
def home(tmp_path: Path) -> Home:
    h = Home(tmp_path / "home")
    h.init()
    return h


def test_wallet_payouts_earnings_and_proofs_embedded(home: Home, capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = run_cli(capsys, "wallet", "--home", str(home.path), "--json", "--airdrop", str(10**12))
    assert code == 0 and doc["balance"] == 10**12 and doc["airdrop_signature"]
    assert set(doc) >= {"address", "balance", "ledger"}
    # Owe and pay through the embedded ledger in this home, as the daemon would.
    conn = open_db(db_path(home.path))
    recipients = [str(Keypair().pubkey()) for _ in range(3)]
    with transaction(conn):
        for i in range(5):
            record_owed(conn, hashlib.sha256(b"%d" % i).digest(), f"w{i}", recipients[i % 3], 10**6, "SOL", "job1")
        record_earning(conn, hashlib.sha256(b"mine").digest(), job_id="job1", amount=7, currency="SOL",
                       payout_address=recipients[0])

    async def pay() -> None:
        ledger = EmbeddedLedger(home.path / "ledger.state")
        kp = load_or_create_keypair(payer_keypair_path(home.path))
        assert str(kp.pubkey()) == doc["address"]
        await Payer(conn, ledger, kp).pay_once()
        await ledger.aclose()

    trio.run(pay)
    code, doc = run_cli(capsys, "payouts", "--home", str(home.path), "--json")
    assert code == 0 and isinstance(doc, list) and len(doc) == 5
    row = doc[0]
    assert set(row) >= {"proof_hash", "worker", "amount", "tx_signature", "status"} and row["status"] == "paid"
    code, doc = run_cli(capsys, "earnings", "--home", str(home.path), "--json")
    assert isinstance(doc, list) and set(doc[0]) >= {"job_id", "amount", "currency", "tx_signature", "status"}
    code, proof = run_cli(capsys, "proof", "inclusion", row["proof_hash"], "--home", str(home.path), "--json")
    assert code == 0 and proof["tx_signature"] == row["tx_signature"] and proof["size"] == 5
    pf = home.path / "proof.json"
    pf.write_text(json.dumps(proof))
    code, check = run_cli(capsys, "proof", "check", str(pf), "--home", str(home.path), "--json")
    assert code == 0 and check == {**check, "valid": True, "path_valid": True, "memo_matches": True}
    proof["root"] = "00" * 32
    pf.write_text(json.dumps(proof))
    code, check = run_cli(capsys, "proof", "check", str(pf), "--json")
    assert code == 1 and check["valid"] is False


def test_wallet_against_ledger_serve(home: Home, tmp_path: Path) -> None:
    server = start_server(tmp_path / "srv.state", slot_ms=100)
    try:
        with open(home.config_path, "a") as f:
            f.write(f'ledger = "{server.url}"\n')
        r = subprocess.run([sys.executable, "-m", "p2pgpu.cli", "wallet", "--home", str(home.path), "--json",
                            "--airdrop", "5000000"], capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["balance"] == 5_000_000 and doc["ledger"] == server.url
    finally:
        stop_server(server)
    r = subprocess.run([sys.executable, "-m", "p2pgpu.cli", "wallet", "--home", str(home.path)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode != 0 and "ledger unreachable" in r.stderr


def test_ledger_serve_state_survives_a_restart(tmp_path: Path) -> None:
    """SIGTERM compacts the state; a new server on the same file has the same
    balances and still refuses a transaction it executed before."""
    from solana.rpc.async_api import AsyncClient
    from solana.rpc.core import RPCException
    from solana.rpc.models import TxOpts
    from solders.system_program import TransferParams, transfer
    from solders.transaction import Transaction

    state = tmp_path / "ledger.state"
    a, b = Keypair(), Keypair()

    async def first(url: str) -> bytes:
        c = AsyncClient(url)
        await c.request_airdrop(a.pubkey(), 10**10)
        bh = (await c.get_latest_blockhash()).value.blockhash
        tx = Transaction.new_signed_with_payer(
            [transfer(TransferParams(from_pubkey=a.pubkey(), to_pubkey=b.pubkey(), lamports=10**6))],
            a.pubkey(), [a], bh)
        await c.send_raw_transaction(bytes(tx), TxOpts(skip_confirmation=True))
        await c.close()
        return bytes(tx)

    async def second(url: str, raw: bytes) -> tuple[int, str]:
        c = AsyncClient(url)
        bal = (await c.get_balance(b.pubkey())).value
        try:
            await c.send_raw_transaction(raw, TxOpts(skip_confirmation=True))
            msg = "accepted"
        except RPCException as exc:
            msg = str(exc)
        await c.close()
        return bal, msg

    s1 = start_server(state, slot_ms=50)
    try:
        raw = trio.run(first, s1.url)
    finally:
        stop_server(s1)
    assert state.exists()
    s2 = start_server(state, slot_ms=50)
    try:
        bal, msg = trio.run(second, s2.url, raw)
    finally:
        stop_server(s2)
    assert bal == 10**6
    assert "already been processed" in msg
