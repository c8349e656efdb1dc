"""The payer on a real LiteSVM ledger: batching, waiting for rent, isolating failures, SPL tokens.

Embedded ledger in process (no sockets), real SQLite outbox.  SPL payouts
also run through the RPC server with solana-py (``getTokenAccountBalance``).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.system_program import CreateAccountParams, create_account
from solders.transaction import Transaction
from spl.token.constants import MINT_LEN, TOKEN_PROGRAM_ID
from spl.token.instructions import create_idempotent_associated_token_account, initialize_mint2, mint_to
from spl.token.models import InitializeMint2Params, MintToParams

from p2pgpu.core._payout import InclusionProof, inclusion_proof, verify_inclusion
from p2pgpu.solana import (
    EmbeddedLedger,
    LedgerServer,
    Payer,
    PayerCheck,
    RpcLedger,
    SvmLedger,
    TokenInfo,
    ata,
    memo_root,
)
from p2pgpu.store import batch_of_proof, batch_plan, open_db, owed_totals, payouts, record_owed, transaction


def h(i: int | str) -> bytes:
    return hashlib.sha256(str(i).encode()).digest()


@pytest.fixture
def conn(tmp_path: Path):  # type: ignore[no-untyped-def]
    c = open_db(tmp_path / "state.db")
    yield c
    c.close()


@pytest.fixture
async def ledger() -> AsyncIterator[EmbeddedLedger]:
    led = EmbeddedLedger(None, slot_ms=0)
    yield led
    await led.aclose()


async def funded(ledger: EmbeddedLedger, lamports: int = 10**13) -> Keypair:
    kp = Keypair()
    await ledger.airdrop(kp.pubkey(), lamports)
    return kp


def owe(conn, rows: list[tuple[str, int]], currency: str = "SOL", start: int = 0) -> None:  # type: ignore[no-untyped-def]
    with transaction(conn):
        for i, (addr, amount) in enumerate(rows):
            record_owed(conn, h(f"{currency}{start + i}"), f"w{i}", addr, amount, currency, "job")


async def test_batches_of_19_with_merkle_memo_and_inclusion(conn, ledger: EmbeddedLedger) -> None:  # type: ignore[no-untyped-def]
    payer = await funded(ledger)
    addrs = [str(Keypair().pubkey()) for _ in range(40)]
    owe(conn, [(a, 1_000_000 + i) for i, a in enumerate(addrs)] + [(addrs[0], 5)])  # second row for addrs[0]
    report = await Payer(conn, ledger, payer).pay_once()
    assert report.paid_rows == 41 and report.paid_batches == 3  # 19 + 19 + 2 recipients
    assert (await ledger.balances([Pubkey.from_string(addrs[0])]))[0] == 1_000_005
    batch_id, sig, state = batch_of_proof(conn, h("SOL40"))  # type: ignore[misc]
    assert state == "paid"
    proof = inclusion_proof(batch_plan(conn, batch_id).proof_hashes, h("SOL40"))
    raw = await ledger.transaction(sig)
    assert raw is not None and memo_root(raw) == proof.root
    assert verify_inclusion(InclusionProof.from_json(proof.to_json()))
    assert all(r["status"] == "paid" and r["tx_signature"] for r in payouts(conn))


async def test_small_amounts_wait_until_rent_exempt(conn, ledger: EmbeddedLedger) -> None:  # type: ignore[no-untyped-def]
    payer = await funded(ledger)
    new = str(Keypair().pubkey())
    owe(conn, [(new, 400_000), (new, 400_000)])
    report = await Payer(conn, ledger, payer).pay_once()
    assert report.waiting_rows == 2 and report.paid_rows == 0
    owe(conn, [(new, 100_000)], start=2)  # now 900,000 >= 890,880
    report = await Payer(conn, ledger, payer).pay_once()
    assert report.paid_rows == 3
    assert (await ledger.balances([Pubkey.from_string(new)]))[0] == 900_000


async def test_one_bad_recipient_is_isolated(conn, ledger: EmbeddedLedger) -> None:  # type: ignore[no-untyped-def]
    payer = await funded(ledger)
    good = [str(Keypair().pubkey()) for _ in range(5)]
    # The memo program's address cannot receive lamports (it is executable and invoked in the same tx).
    bad = "MemoSq4gqABAXKb96qnH8TysNcWxMyWCqXgDLGmfcHr"
    owe(conn, [(good[0], 1_000_000), (good[1], 1_000_000), (bad, 1_000_000), (good[2], 1_000_000),
               (good[3], 1_000_000), (good[4], 1_000_000)])
    p = Payer(conn, ledger, payer)
    await p.pay_once()
    await p.pay_once()
    totals = owed_totals(conn, currency="SOL")
    assert totals[bad] == {"failed": 1_000_000}
    assert all(totals[g] == {"paid": 1_000_000} for g in good)
    assert await ledger.balances([Pubkey.from_string(g) for g in good]) == [1_000_000] * 5


async def test_underfunded_payer_keeps_rows_owed(conn, ledger: EmbeddedLedger) -> None:  # type: ignore[no-untyped-def]
    from p2pgpu.solana import PayerUnderfunded

    payer = await funded(ledger, 2_000_000)
    owe(conn, [(str(Keypair().pubkey()), 1_500_000), (str(Keypair().pubkey()), 1_500_000)])
    with pytest.raises(PayerUnderfunded):
        await Payer(conn, ledger, payer).pay_once()
    assert {s for t in owed_totals(conn, currency="SOL").values() for s in t} == {"owed"}


async def test_payer_check_is_cached(ledger: EmbeddedLedger) -> None:
    payer = await funded(ledger, 5_000_000)
    clock = [0.0]
    check = PayerCheck(ledger, ttl_s=10, clock=lambda: clock[0])
    assert (await check.check(str(payer.pubkey()), 4_000_000)).ok
    v = await check.check(str(payer.pubkey()), 6_000_000)
    assert not v.ok and "below" in v.reason
    await ledger.airdrop(payer.pubkey(), 5_000_000)
    assert not (await check.check(str(payer.pubkey()), 6_000_000)).ok  # still cached
    clock[0] = 11.0
    assert (await check.check(str(payer.pubkey()), 6_000_000)).ok
    assert check.lookups == 2


def make_mint(svm: SvmLedger, payer: Keypair, supply: int, decimals: int = 6) -> TokenInfo:
    mint = Keypair()
    bh, _ = svm.latest_blockhash()
    rent = svm.rent_exempt_minimum(MINT_LEN)
    token = TokenInfo(mint=mint.pubkey(), decimals=decimals)
    ixs = [
        create_account(CreateAccountParams(from_pubkey=payer.pubkey(), to_pubkey=mint.pubkey(), lamports=rent,
                                           space=MINT_LEN, owner=TOKEN_PROGRAM_ID)),
        initialize_mint2(InitializeMint2Params(program_id=TOKEN_PROGRAM_ID, mint=mint.pubkey(), decimals=decimals,
                                               mint_authority=payer.pubkey(), freeze_authority=None)),
        create_idempotent_associated_token_account(payer.pubkey(), payer.pubkey(), mint.pubkey()),
        mint_to(MintToParams(program_id=TOKEN_PROGRAM_ID, mint=mint.pubkey(), dest=ata(payer.pubkey(), token),
                             mint_authority=payer.pubkey(), amount=supply)),
    ]
    svm.send(bytes(Transaction.new_signed_with_payer(ixs, payer.pubkey(), [payer, mint], bh)))
    return token


def token_balance(svm: SvmLedger, owner: str, token: TokenInfo) -> int:
    acc = svm.account(ata(Pubkey.from_string(owner), token))
    return int.from_bytes(bytes(acc.data)[64:72], "little") if acc is not None else 0


async def test_spl_payouts_create_missing_token_accounts(conn, ledger: EmbeddedLedger) -> None:  # type: ignore[no-untyped-def]
    payer = await funded(ledger)
    token = make_mint(ledger.svm, payer, 10**12)
    mint = str(token.mint)
    addrs = [str(Keypair().pubkey()) for _ in range(25)]
    owe(conn, [(a, 1_000 + i) for i, a in enumerate(addrs)] + [(addrs[3], 7)], currency=mint)
    report = await Payer(conn, ledger, payer, currency=mint).pay_once()
    assert report.paid_rows == 26
    assert [token_balance(ledger.svm, a, token) for a in addrs] == [1_000 + i + (7 if i == 3 else 0) for i in range(25)]
    # Second round: the accounts exist now, no creation needed.
    owe(conn, [(a, 1) for a in addrs], currency=mint, start=100)
    await Payer(conn, ledger, payer, currency=mint).pay_once()
    assert token_balance(ledger.svm, addrs[0], token) == 1_001


async def test_spl_through_rpc_server(conn, nursery: trio.Nursery) -> None:  # type: ignore[no-untyped-def]
    from solana.rpc.async_api import AsyncClient

    svm = SvmLedger()
    server = LedgerServer(svm, slot_ms=0)
    await nursery.start(server.serve, 0)
    url = f"http://127.0.0.1:{server.port}"
    payer = Keypair()
    svm.airdrop(payer.pubkey(), 10**12)
    token = make_mint(svm, payer, 10**9)
    addrs = [str(Keypair().pubkey()) for _ in range(3)]
    owe(conn, [(a, 500) for a in addrs], currency=str(token.mint))
    led = RpcLedger(url)
    report = await Payer(conn, led, payer, currency=str(token.mint)).pay_once()
    assert report.paid_rows == 3
    client = AsyncClient(url)
    bal = (await client.get_token_account_balance(ata(Pubkey.from_string(addrs[0]), token))).value
    assert bal.amount == "500" and bal.decimals == 6 and bal.ui_amount_string == "0.0005"
    from solana.rpc.models import TokenAccountOpts

    held = (await client.get_token_accounts_by_owner(Pubkey.from_string(addrs[1]), TokenAccountOpts(mint=token.mint))).value
    assert [str(a.pubkey) for a in held] == [str(ata(Pubkey.from_string(addrs[1]), token))]
    await client.close()
    await led.aclose()


async def test_one_payer_pays_sol_and_tokens_and_fills_spl_batches(conn, ledger: EmbeddedLedger) -> None:  # type: ignore[no-untyped-def]
    payer = await funded(ledger)
    token = make_mint(ledger.svm, payer, 10**12)
    addrs = [str(Keypair().pubkey()) for _ in range(30)]
    owe(conn, [(a, 2_000_000) for a in addrs])
    owe(conn, [(a, 10) for a in addrs], currency=str(token.mint))
    report = await Payer(conn, ledger, payer).pay_once()  # currency=None: every currency owed
    assert report.paid_rows == 60
    sizes = [r[0] for r in conn.execute(
        "SELECT transfers FROM payout_batches WHERE currency = ? ORDER BY batch_id", (str(token.mint),))]
    assert sum(sizes) == 30 and max(sizes) >= 8  # each cut at the longest prefix that fits 1,232 bytes
    assert all(token_balance(ledger.svm, a, token) == 10 for a in addrs)
    assert await ledger.balances([Pubkey.from_string(a) for a in addrs]) == [2_000_000] * 30


async def test_recovery_resends_expires_and_never_pays_twice(conn, ledger: EmbeddedLedger) -> None:  # type: ignore[no-untyped-def]
    from p2pgpu.solana import PayReport
    from p2pgpu.store import open_batches

    payer = await funded(ledger)
    a, b, c = (str(Keypair().pubkey()) for _ in range(3))
    # 1. Signed and recorded, then the process "dies" before sending; a new payer
    #    finds the blockhash still valid and sends the very same bytes.
    owe(conn, [(a, 1_000_000)])
    (rec,) = await Payer(conn, ledger, payer).sign_owed(PayReport())
    report = await Payer(conn, ledger, payer).pay_once()
    assert report.paid_batches == 1 and report.signed == 0
    assert conn.execute("SELECT signature FROM payout_batches WHERE state = 'paid'").fetchone()[0] == rec.signature
    # 2. Signed, never sent, and the blockhash expires: rows are owed again and paid by a new transaction.
    owe(conn, [(b, 1_000_000)], start=1)
    (rec,) = await Payer(conn, ledger, payer).sign_owed(PayReport())
    ledger.svm.advance(151)
    report = await Payer(conn, ledger, payer).pay_once()
    assert report.expired == 1 and report.paid_rows == 1
    assert conn.execute("SELECT state FROM payout_batches WHERE signature = ?", (rec.signature,)).fetchone()[0] == "expired"
    # 3. Sent (it landed) but the process died before noting anything: recovery marks it paid, no second payment.
    owe(conn, [(c, 1_000_000)], start=2)
    p = Payer(conn, ledger, payer)
    (rec,) = await p.sign_owed(PayReport())
    await ledger.send(rec.tx)
    ledger.svm.advance(151)  # even after expiry: found beats expired
    report = await Payer(conn, ledger, payer).pay_once()
    assert report.paid_batches == 1 and report.expired == 0 and open_batches(conn) == []
    assert await ledger.balances([Pubkey.from_string(x) for x in (a, b, c)]) == [1_000_000] * 3


async def test_malformed_address_or_unknown_mint_is_held_not_blocking(conn, ledger: EmbeddedLedger) -> None:  # type: ignore[no-untyped-def]
    payer = await funded(ledger)
    good = str(Keypair().pubkey())
    owe(conn, [("not-an-address", 1_000_000), (good, 1_000_000)])
    owe(conn, [(good, 5)], currency=str(Keypair().pubkey()), start=10)  # a mint that does not exist
    report = await Payer(conn, ledger, payer).pay_once()
    assert report.paid_rows == 1
    rows = {r["payout_address"] + r["currency"][:3]: r for r in payouts(conn)}
    assert rows["not-an-addressSOL"]["status"] == "failed" and "not a Solana address" in rows["not-an-addressSOL"]["error"]
    assert [r["status"] for r in payouts(conn) if r["currency"] not in ("SOL",)] == ["failed"]


async def test_unknown_cause_splits_the_batch_down_to_the_bad_transfer(
    conn, ledger: EmbeddedLedger, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    """When the error names no transfer, the batch is halved until the failing transfer is alone."""
    import p2pgpu.solana._payer as payer_module
    from p2pgpu.solana._tx import Blame

    monkeypatch.setattr(payer_module, "blame", lambda *a, **k: Blame(transfer_index=None, payer_fault=False,
                                                                     rent_fault=False))
    payer = await funded(ledger)
    good = [str(Keypair().pubkey()) for _ in range(7)]
    bad = "MemoSq4gqABAXKb96qnH8TysNcWxMyWCqXgDLGmfcHr"
    owe(conn, [(g, 1_000_000) for g in good[:5]] + [(bad, 1_000_000)] + [(g, 1_000_000) for g in good[5:]])
    await Payer(conn, ledger, payer).pay_once()
    totals = owed_totals(conn, currency="SOL")
    assert totals[bad] == {"failed": 1_000_000}
    assert all(totals[g] == {"paid": 1_000_000} for g in good)
    sizes = [r[0] for r in conn.execute("SELECT transfers FROM payout_batches WHERE state = 'failed' ORDER BY batch_id")]
    assert sizes[0] == 8 and sizes[-1] == 1  # 8 -> 4 -> 2 -> 1
