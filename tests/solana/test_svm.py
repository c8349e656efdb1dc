"""The LiteSVM ledger state machine: blockhash window, duplicates, persistence, decoders.

Persistence is checked the hard way: a ledger is abandoned without closing
(as after ``kill -9``), reopened from snapshot + journal, and must hold the
same balances, height and statuses, and still refuse a transaction it already
executed (the LiteSVM short-memory trap), also after a torn journal write.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from solders.keypair import Keypair
from solders.system_program import TransferParams, transfer
from solders.transaction import Transaction

from p2pgpu.solana import LedgerLocked, LedgerServer, SvmLedger
from p2pgpu.solana._rpc import RpcMethods
from p2pgpu.solana._svm import RpcError, blockhash_window


def pay(led: SvmLedger, src: Keypair, lamports: int, dst: Keypair | None = None) -> bytes:
    bh, _ = led.latest_blockhash()
    to = (dst or Keypair()).pubkey()
    return bytes(Transaction.new_signed_with_payer(
        [transfer(TransferParams(from_pubkey=src.pubkey(), to_pubkey=to, lamports=lamports))], src.pubkey(), [src], bh))


def abandon(led: SvmLedger) -> None:
    """Drop a ledger as a killed process would: no compaction, lock released."""
    assert led._journal is not None and led._lock_fd is not None
    led._journal.close()
    led._journal = None
    os.close(led._lock_fd)
    led._lock_fd = None


def test_blockhash_window() -> None:
    led = SvmLedger()
    a = Keypair()
    led.airdrop(a.pubkey(), 10**10)
    bh, lvh = led.latest_blockhash()
    assert lvh == led.height + blockhash_window
    raw = pay(led, a, 10**6)
    led.advance(blockhash_window)
    assert led.blockhash_valid(str(bh))
    led.advance(1)
    assert not led.blockhash_valid(str(bh))
    with pytest.raises(RpcError, match="Blockhash not found"):
        led.send(raw)


def test_restart_replays_journal_and_refuses_old_transactions(tmp_path: Path) -> None:
    state = tmp_path / "ledger.state"
    led = SvmLedger(state)
    with pytest.raises(LedgerLocked):
        SvmLedger(state)
    a, b = Keypair(), Keypair()
    led.airdrop(a.pubkey(), 10**10)
    raws = [pay(led, a, 10**6 + i, b) for i in range(40)]
    for r in raws:
        led.send(r)
    led.advance(3)
    before = (led.balance(a.pubkey()), led.balance(b.pubkey()), led.height, led.tx_count)
    abandon(led)
    led2 = SvmLedger(state)
    assert (led2.balance(a.pubkey()), led2.balance(b.pubkey()), led2.height, led2.tx_count) == before
    for r in raws:  # every one of them, not only LiteSVM's last ~32
        with pytest.raises(RpcError, match="already been processed"):
            led2.send(r)
        led2.send(r, preflight=False)
    assert led2.balance(b.pubkey()) == before[1]
    led2.close()  # compacts: snapshot written, journal emptied
    assert (tmp_path / "ledger.state.journal").stat().st_size == 0
    led3 = SvmLedger(state)
    assert (led3.balance(a.pubkey()), led3.balance(b.pubkey()), led3.height) == before[:3]
    with pytest.raises(RpcError, match="already been processed"):
        led3.send(raws[0])
    # A torn last journal write is dropped on the next open.
    led3.send(pay(led3, a, 10**6, b))
    abandon(led3)
    with open(tmp_path / "ledger.state.journal", "ab") as f:
        f.write(b"\x00\x00\x01\x00partial")
    led4 = SvmLedger(state)
    assert led4.balance(b.pubkey()) == before[1] + 10**6
    led4.close()


def test_dropped_when_fee_payer_cannot_pay() -> None:
    led = SvmLedger()
    broke = Keypair()
    raw = pay(led, broke, 10**6)
    sig = led.send(raw, preflight=False)
    assert led.status(sig) is None  # a leader drops it: no block, no status


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20) | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(RpcMethods(SvmLedger()).methods)), st.lists(json_values, max_size=3), json_values)
def test_any_request_gets_a_response(method: str, params: list, rid: object) -> None:  # type: ignore[type-arg]
    """Fuzz: any params to any method give a JSON-RPC result or error, never an exception."""
    rpc = _shared_rpc()
    out = rpc.handle({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
    assert out is not None and ("result" in out or "error" in out)
    if "error" in out:
        assert out["error"]["code"] != -32603, (method, params, out)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1400))
def test_transaction_decoder(raw: bytes) -> None:
    """Any bytes either parse as a transaction or raise RpcError."""
    try:
        SvmLedger.parse(raw)
    except RpcError:
        pass


_RPC: list[RpcMethods] = []
_SERVER: list[LedgerServer] = []


def _shared_rpc() -> RpcMethods:
    if not _RPC:
        _RPC.append(RpcMethods(SvmLedger()))
    return _RPC[0]


@settings(max_examples=150, deadline=None)
@given(json_values)
def test_any_websocket_request_gets_a_response(req: object) -> None:
    """Fuzz: any JSON on the websocket gives a reply or an error, never an exception."""
    import trio

    from p2pgpu.solana._server import _Socket

    if not _SERVER:
        _SERVER.append(LedgerServer(SvmLedger(), slot_ms=0))
    server = _SERVER[0]
    send, recv = trio.open_memory_channel[str](100)
    sock = _Socket(send=send)
    server._ws_request(sock, json_dumps(req))
    reply = recv.receive_nowait()
    assert '"jsonrpc"' in reply
    server._drop(sock)


def json_dumps(v: object) -> str:
    import json

    return json.dumps(v)
