"""#18.7: anyone with RPC access to the ledger server could take its faucet's funds.

Two attacks on a real ``p2pgpu ledger serve``:

* **The faucet's key was derived from a constant in the source**
  (``sha256(b"faucet" + genesis)``), so a stranger signed a transfer of 10^17
  lamports out of it.  Now the key is drawn for each ledger, kept in
  ``STATE.faucet`` (0600), and the derivable account holds nothing.
* **899 airdrops of 10^15 lamports emptied the faucet in 0.4 s.**  Now
  airdrops are limited per request, per address and in total: the flood is
  refused with a JSON-RPC error (-32600) saying which limit, the faucet keeps what
  the total limit protects, and honest airdrops within the limits (devnet's,
  ``p2pgpu wallet --airdrop``) still work.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ledger_attack_helpers import rpc, rpc_doc, start_ledger
from solders.hash import Hash
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.system_program import TransferParams, transfer
from solders.transaction import Transaction

from p2pgpu.home import Home

pytestmark = pytest.mark.processes

GENESIS = b"p2pgpu-local-ledger-1"  # the ledger's genesis text, as in p2pgpu/solana/_svm.py
STOLEN = 10**17


def _derived_faucet() -> Keypair:
    """What an attacker computes from the source."""
    return Keypair.from_seed(hashlib.sha256(b"faucet" + GENESIS).digest())


def _balance(url: str, key: Pubkey | str) -> int:
    return int(rpc(url, "getBalance", [str(key)])["value"])


def test_nobody_can_sign_for_the_faucet_with_a_key_derived_from_the_source(tmp_path: Path) -> None:
    state = tmp_path / "ledger.state"
    ledger = start_ledger(state=state)
    other = start_ledger(state=tmp_path / "other.state")
    try:
        thief, derived = Keypair(), _derived_faucet()
        blockhash = rpc(ledger.url, "getLatestBlockhash", [])["value"]["blockhash"]
        tx = Transaction.new_signed_with_payer(
            [transfer(TransferParams(from_pubkey=derived.pubkey(), to_pubkey=thief.pubkey(), lamports=STOLEN))],
            derived.pubkey(), [derived], Hash.from_string(blockhash))
        doc = rpc_doc(ledger.url, "sendTransaction", [base64.b64encode(bytes(tx)).decode(), {"encoding": "base64"}])
        assert "error" in doc, f"a transfer signed with the derived key was accepted: {doc}"
        assert _balance(ledger.url, thief.pubkey()) == 0
        assert _balance(ledger.url, derived.pubkey()) == 0

        # The real faucet is this ledger's own: not the derived one, not another ledger's.
        faucet = rpc(ledger.url, "getIdentity", [])["identity"]
        assert faucet != str(derived.pubkey())
        assert faucet != rpc(other.url, "getIdentity", [])["identity"]
        assert _balance(ledger.url, faucet) > STOLEN
        key_file = state.with_name(state.name + ".faucet")
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert str(Keypair.from_bytes(bytes(json.loads(key_file.read_text()))).pubkey()) == faucet
    finally:
        ledger.stop()
        other.stop()
    # Reopened, the ledger keeps its own faucet, and the derived account stays empty.
    again = start_ledger(state=state)
    try:
        assert rpc(again.url, "getIdentity", [])["identity"] == faucet
        assert _balance(again.url, _derived_faucet().pubkey()) == 0
    finally:
        again.stop()


def test_an_airdrop_flood_takes_no_more_than_the_limits_allow() -> None:
    total_max, address_max = 10**16, 10**14  # the defaults of `ledger serve` on loopback
    ledger = start_ledger()
    try:
        faucet = rpc(ledger.url, "getIdentity", [])["identity"]
        before = _balance(ledger.url, faucet)

        # The attack as reported: 899 airdrops of 10^15 to fresh addresses.
        refused = [rpc_doc(ledger.url, "requestAirdrop", [str(Keypair().pubkey()), 10**15]) for _ in range(899)]
        assert all(d.get("error", {}).get("code") == -32600 for d in refused), refused[0]
        assert "per request" in refused[0]["error"]["message"]

        # The best an attacker can do: the most each fresh address may hold, until the total is spent.
        given = 0
        for _ in range(total_max // address_max + 5):
            doc = rpc_doc(ledger.url, "requestAirdrop", [str(Keypair().pubkey()), address_max])
            if "error" in doc:
                assert doc["error"]["code"] == -32600 and "in total" in doc["error"]["message"], doc
                break
            given += address_max
        assert given == total_max
        assert before - _balance(ledger.url, faucet) <= total_max + 10**6  # plus fees
    finally:
        ledger.stop()


def test_airdrops_can_be_turned_off() -> None:
    ledger = start_ledger("--airdrop-total-max", "0")
    try:
        doc = rpc_doc(ledger.url, "requestAirdrop", [str(Keypair().pubkey()), 10**9])
        assert doc["error"] == {"code": -32600, "message": "airdrops are disabled on this ledger"}
    finally:
        ledger.stop()


def test_wallet_airdrop_works_within_the_limits_and_says_why_when_refused(tmp_path: Path) -> None:
    ledger = start_ledger()
    home = Home(tmp_path / "home")
    home.init(network="local")
    with open(home.config_path, "a") as f:
        f.write(f'ledger = "{ledger.url}"\n')

    def wallet(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "p2pgpu.cli", "wallet", "--home", str(home.path), *args],
                              capture_output=True, text=True, timeout=60, check=False,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})

    try:
        ok = wallet("--json", "--airdrop", str(10**11))  # what devnet gives each node
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["balance"] == 10**11
        over = wallet("--airdrop", str(10**14))  # 10^14 + 10^11 > the 10^14 an address may hold
        assert over.returncode != 0
        assert "per address" in over.stderr and "--airdrop-address-max" in over.stderr, over.stderr
    finally:
        ledger.stop()
