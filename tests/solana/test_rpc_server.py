"""The local JSON-RPC ledger server, driven by solana-py's own AsyncClient (under trio).

Each test runs a :class:`LedgerServer` on free loopback ports in the test's
nursery and talks to it only through the client a payer uses for devnet:
airdrops, transfers, statuses, transaction look-ups in json and base64, and
the refusals a real node gives (preflight failures with logs, unknown or
expired blockhashes, duplicates, bad signatures), plus the websocket
``signatureSubscribe`` on port + 1.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator

import base58
import httpx
import pytest
import trio
from solana.rpc.async_api import AsyncClient
from solana.rpc.core import RPCException
from solana.rpc.models import TxOpts
from solders.hash import Hash
from solders.instruction import Instruction
from solders.keypair import Keypair
from solders.system_program import TransferParams, transfer
from solders.transaction import Transaction, VersionedTransaction
from trio_websocket import open_websocket_url

from p2pgpu.solana import LedgerServer, SvmLedger
from p2pgpu.solana._svm import MEMO_PROGRAM

SKIP = TxOpts(skip_confirmation=True)
NO_PREFLIGHT = TxOpts(skip_confirmation=True, skip_preflight=True)


@pytest.fixture
async def server(nursery: trio.Nursery) -> AsyncIterator[LedgerServer]:
    srv = LedgerServer(SvmLedger(), slot_ms=0)  # blocks advance only when a test says so
    await nursery.start(srv.serve, 0)
    yield srv


@pytest.fixture
async def client(server: LedgerServer) -> AsyncIterator[AsyncClient]:
    c = AsyncClient(f"http://127.0.0.1:{server.port}")
    yield c
    await c.close()


def pay(src: Keypair, dst: Keypair, lamports: int, bh: Hash, memo: str | None = None) -> Transaction:
    ixs = [transfer(TransferParams(from_pubkey=src.pubkey(), to_pubkey=dst.pubkey(), lamports=lamports))]
    if memo is not None:
        ixs.append(Instruction(MEMO_PROGRAM, memo.encode(), []))
    return Transaction.new_signed_with_payer(ixs, src.pubkey(), [src], bh)


async def funded(client: AsyncClient, lamports: int = 10**10) -> Keypair:
    kp = Keypair()
    sig = (await client.request_airdrop(kp.pubkey(), lamports)).value
    st = (await client.get_signature_statuses([sig])).value[0]
    assert st is not None and st.err is None
    return kp


async def test_airdrop_transfer_status_and_lookup(client: AsyncClient) -> None:
    a = await funded(client)
    b = Keypair()
    assert (await client.get_balance(a.pubkey())).value == 10**10
    latest = (await client.get_latest_blockhash()).value
    assert latest.last_valid_block_height == (await client.get_block_height()).value + 150
    tx = pay(a, b, 2_000_000, latest.blockhash, memo="ab" * 32)
    sig = (await client.send_raw_transaction(bytes(tx), SKIP)).value
    st = (await client.get_signature_statuses([sig])).value[0]
    assert st is not None and st.err is None and st.confirmation_status is not None
    assert (await client.get_balance(b.pubkey())).value == 2_000_000
    assert (await client.get_balance(a.pubkey())).value == 10**10 - 2_000_000 - 5_000
    got = (await client.get_transaction(sig)).value
    assert got is not None and got.transaction.meta is not None
    assert got.transaction.meta.fee == 5_000
    assert got.transaction.meta.post_balances[1] == 2_000_000
    assert any("Memo" in line or "invoke" in line for line in got.transaction.meta.log_messages or [])
    raw = (await client.get_transaction(sig, encoding="base64")).value
    assert raw is not None and bytes(raw.transaction.transaction) == bytes(tx)  # type: ignore[arg-type]
    info = (await client.get_account_info(b.pubkey())).value
    assert info is not None and info.lamports == 2_000_000
    assert (await client.get_fee_for_message(tx.message)).value == 5_000
    assert (await client.get_minimum_balance_for_rent_exemption(0)).value == 890_880
    assert (await client.get_epoch_info()).value.block_height == (await client.get_block_height()).value
    assert await client.is_connected()


async def test_duplicate_is_refused_by_preflight_and_never_paid_twice(client: AsyncClient) -> None:
    a = await funded(client)
    b = Keypair()
    bh = (await client.get_latest_blockhash()).value.blockhash
    tx = pay(a, b, 1_000_000, bh)
    await client.send_raw_transaction(bytes(tx), SKIP)
    with pytest.raises(RPCException) as exc:
        await client.send_raw_transaction(bytes(tx), SKIP)
    assert "already been processed" in str(exc.value)
    # Without preflight a node answers with the signature and drops the copy.
    for _ in range(40):  # more than LiteSVM's own ~32-entry duplicate memory
        await client.send_raw_transaction(bytes(pay(a, Keypair(), 1_000_000, bh)), SKIP)
    again = (await client.send_raw_transaction(bytes(tx), NO_PREFLIGHT)).value
    assert again == tx.signatures[0]
    assert (await client.get_balance(b.pubkey())).value == 1_000_000


async def test_unknown_and_expired_blockhash(client: AsyncClient, server: LedgerServer) -> None:
    a = await funded(client)
    tx = pay(a, Keypair(), 1_000_000, Hash.new_unique())
    with pytest.raises(RPCException) as exc:
        await client.send_raw_transaction(bytes(tx), SKIP)
    assert "Blockhash not found" in str(exc.value)
    # skipPreflight: the node returns the signature, the transaction never lands.
    sig = (await client.send_raw_transaction(bytes(tx), NO_PREFLIGHT)).value
    assert (await client.get_signature_statuses([sig])).value == [None]
    latest = (await client.get_latest_blockhash()).value
    server.ledger.advance(151)
    assert (await client.get_block_height()).value > latest.last_valid_block_height
    old = pay(a, Keypair(), 1_000_000, latest.blockhash)
    with pytest.raises(RPCException) as exc:
        await client.send_raw_transaction(bytes(old), SKIP)
    assert "Blockhash not found" in str(exc.value)


async def test_preflight_failure_carries_err_and_logs(client: AsyncClient) -> None:
    a = await funded(client, 10**7)
    bh = (await client.get_latest_blockhash()).value.blockhash
    too_much = pay(a, Keypair(), 10**9, bh)
    with pytest.raises(RPCException) as exc:
        await client.send_raw_transaction(bytes(too_much), SKIP)
    data = exc.value.args[0].data
    assert json.loads(data.to_json())["err"] == {"InstructionError": [0, {"Custom": 1}]}
    assert data.logs and "insufficient lamports" in " ".join(data.logs)
    below_rent = pay(a, Keypair(), 1_000, bh)
    with pytest.raises(RPCException) as exc:
        await client.send_raw_transaction(bytes(below_rent), SKIP)
    assert "insufficient funds for rent" in str(exc.value)
    # Without preflight the failure lands: fee charged, status carries the error.
    sig = (await client.send_raw_transaction(bytes(below_rent), NO_PREFLIGHT)).value
    st = (await client.get_signature_statuses([sig])).value[0]
    assert st is not None and st.err is not None
    assert (await client.get_balance(a.pubkey())).value == 10**7 - 5_000
    sim = (await client.simulate_transaction(VersionedTransaction.from_legacy(too_much))).value
    assert sim.err is not None and sim.logs


async def test_bad_signature_and_base58(server: LedgerServer, client: AsyncClient) -> None:
    a = await funded(client)
    bh = (await client.get_latest_blockhash()).value.blockhash
    tx = pay(a, Keypair(), 1_000_000, bh)
    forged = bytearray(bytes(tx))
    forged[5] ^= 0xFF  # inside the signature
    url = f"http://127.0.0.1:{server.port}"
    async with httpx.AsyncClient() as h:  # httpx runs under trio through anyio
        r = await h.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "sendTransaction",
                                    "params": [base64.b64encode(bytes(forged)).decode(), {"encoding": "base64"}]})
        assert r.json()["error"]["code"] == -32003
        r = await h.post(url, json={"jsonrpc": "2.0", "id": 2, "method": "sendTransaction",
                                    "params": [base58.b58encode(bytes(tx)).decode()]})
        assert r.json()["result"] == str(tx.signatures[0])
        r = await h.post(url, json=[{"jsonrpc": "2.0", "id": 3, "method": "getSlot"},
                                    {"jsonrpc": "2.0", "id": 4, "method": "noSuchMethod"}])
        assert [x.get("error", {}).get("code") for x in r.json()] == [None, -32601]


async def test_signature_subscribe(server: LedgerServer, client: AsyncClient) -> None:
    a = await funded(client)
    bh = (await client.get_latest_blockhash()).value.blockhash
    tx = pay(a, Keypair(), 1_000_000, bh)
    async with open_websocket_url(f"ws://127.0.0.1:{server.ws_port}") as ws:
        await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "signatureSubscribe",
                                          "params": [str(tx.signatures[0]), {"commitment": "confirmed"}]}))
        sub = json.loads(await ws.get_message())["result"]
        await client.send_raw_transaction(bytes(tx), SKIP)
        note = json.loads(await ws.get_message())
        assert note["method"] == "signatureNotification"
        assert note["params"]["subscription"] == sub
        assert note["params"]["result"]["value"] == {"err": None}


async def test_websocket_clients_that_leave_do_not_stop_the_server(server: LedgerServer, client: AsyncClient) -> None:
    a = await funded(client)
    for _ in range(3):
        async with open_websocket_url(f"ws://127.0.0.1:{server.ws_port}") as ws:
            await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "slotSubscribe"}))
            await ws.send_message("not json")
            await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": 2, "method": "accountSubscribe",
                                              "params": [str(a.pubkey())]}))
            for _ in range(3):
                await ws.get_message()
        bh = (await client.get_latest_blockhash()).value.blockhash
        await client.send_raw_transaction(bytes(pay(a, Keypair(), 1_000_000, bh)), SKIP)  # touches `a`
    assert (await client.get_balance(a.pubkey())).value == 10**10 - 3 * 1_005_000


async def test_simulate_an_unsigned_transaction(client: AsyncClient) -> None:
    from solders.message import Message
    from solders.signature import Signature

    a = await funded(client)
    bh = (await client.get_latest_blockhash()).value.blockhash
    msg = Message.new_with_blockhash(
        [transfer(TransferParams(from_pubkey=a.pubkey(), to_pubkey=Keypair().pubkey(), lamports=10**6))], a.pubkey(), bh)
    unsigned = VersionedTransaction.populate(msg, [Signature.default()])
    sim = (await client.simulate_transaction(unsigned, sig_verify=False)).value
    assert sim.err is None and sim.units_consumed == 150
    with pytest.raises(RPCException) as exc:  # with sigVerify a node refuses it, as here
        await client.simulate_transaction(unsigned, sig_verify=True)
    assert "SignatureVerificationFailure" in str(exc.value)
