"""The local ledger's faucet: its own private key, limits on airdrops that
survive restarts, and the retirement of the faucet earlier ledgers derived
from a constant (#18.7).  Real SvmLedger state files, no server."""

from __future__ import annotations

import struct
from pathlib import Path

import msgpack
import pytest
from solders.keypair import Keypair
from solders.system_program import TransferParams, transfer
from solders.transaction import Transaction

from p2pgpu.solana._faucet import AirdropLimits, AirdropRefused, faucet_path, legacy_faucet
from p2pgpu.solana._svm import RpcError, SvmLedger, faucet_lamports

GENESIS = b"p2pgpu-local-ledger-1"


def _crash(led: SvmLedger) -> None:
    """Leave the ledger as kill -9 would: journal flushed, no compaction, lock released."""
    assert led._journal is not None and led._lock_fd is not None
    led._journal.close()
    led._journal = None
    import os

    os.close(led._lock_fd)
    led._lock_fd = None


@pytest.mark.parametrize(("lamports", "balance", "given", "faucet", "why"), [
    (10**15 + 1, 0, 0, 10**18, "per request"),
    (10**14, 1, 0, 10**18, "per address"),
    (10**14, 0, 10**16 - 10**14 + 1, 10**18, "in total"),
    (10**14, 0, 0, 10**14 - 1, "holds only"),
])
def test_limits_refuse_with_a_reason(lamports: int, balance: int, given: int, faucet: int, why: str) -> None:
    with pytest.raises(AirdropRefused, match=why):
        AirdropLimits().check(lamports=lamports, recipient_balance=balance, airdropped_total=given,
                              faucet_balance=faucet)


def test_limits_allow_what_they_allow_and_reject_nonsense() -> None:
    AirdropLimits().check(lamports=10**14, recipient_balance=0, airdropped_total=10**16 - 10**14,
                          faucet_balance=10**14)
    with pytest.raises(ValueError):
        AirdropLimits(total_lamports_max=-1)


def test_each_ledger_has_its_own_private_faucet(tmp_path: Path) -> None:
    a, b, mem = SvmLedger(tmp_path / "a.state"), SvmLedger(tmp_path / "b.state"), SvmLedger()
    keys = {a.faucet.pubkey(), b.faucet.pubkey(), mem.faucet.pubkey(), legacy_faucet(GENESIS).pubkey()}
    assert len(keys) == 4
    for led in (a, b, mem):
        assert led.balance(led.faucet.pubkey()) == faucet_lamports
        assert led.balance(legacy_faucet(GENESIS).pubkey()) == 0
    assert faucet_path(tmp_path / "a.state").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.glob("*.faucet")) == ["a.state.faucet", "b.state.faucet"]
    a.close()
    b.close()


@pytest.mark.parametrize("how", ["close", "crash"])
def test_the_airdropped_total_survives_a_restart(tmp_path: Path, how: str) -> None:
    limits = AirdropLimits(total_lamports_max=3 * 10**10)
    led = SvmLedger(tmp_path / "l.state", airdrop_limits=limits)
    faucet = led.faucet.pubkey()
    led.airdrop(Keypair().pubkey(), 10**10)
    led.airdrop(Keypair().pubkey(), 10**10)
    led.close() if how == "close" else _crash(led)
    led = SvmLedger(tmp_path / "l.state", airdrop_limits=limits)
    assert led.faucet.pubkey() == faucet
    assert led.airdropped == 2 * 10**10
    assert led.balance(faucet) == faucet_lamports - 2 * 10**10 - 2 * 5000  # moved once, not once per open
    led.airdrop(Keypair().pubkey(), 10**10)
    with pytest.raises(RpcError, match="in total"):
        led.airdrop(Keypair().pubkey(), 1)
    led.close()


def test_a_ledger_from_before_keeps_its_history_and_loses_its_derivable_faucet(tmp_path: Path) -> None:
    # What an earlier ledger left after kill -9: a journal whose airdrop was signed by the derived faucet.
    legacy, friend = legacy_faucet(GENESIS), Keypair()
    probe = SvmLedger()
    bh, _ = probe.latest_blockhash()
    tx = Transaction.new_signed_with_payer(
        [transfer(TransferParams(from_pubkey=legacy.pubkey(), to_pubkey=friend.pubkey(), lamports=10**12))],
        legacy.pubkey(), [legacy], bh)
    body = msgpack.packb([1, "tx", bytes(tx), 0, 0])
    state = tmp_path / "old.state"
    state.with_name("old.state.journal").write_bytes(struct.pack(">I", len(body)) + body)

    led = SvmLedger(state)
    assert led.balance(friend.pubkey()) == 10**12  # history replayed as before
    assert led.airdropped == 10**12  # and counted against the total
    assert led.balance(legacy.pubkey()) == 0  # nobody can sign the rest away
    assert led.faucet.pubkey() != legacy.pubkey()
    assert led.balance(led.faucet.pubkey()) == faucet_lamports - 10**12 - 5000
    faucet = led.faucet.pubkey()
    _crash(led)
    for _ in range(2):  # reopened after a crash and after a clean close: moved exactly once
        led = SvmLedger(state)
        assert led.faucet.pubkey() == faucet
        assert led.balance(faucet) == faucet_lamports - 10**12 - 5000
        assert led.balance(legacy.pubkey()) == 0
        led.close()
