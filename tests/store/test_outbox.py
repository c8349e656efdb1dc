"""The SQLite store helper and the payout outbox: migrations, record_owed inside the
caller's transaction, batch bookkeeping and its state table."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from p2pgpu.core import LocalProtocolError
from p2pgpu.core._payout import plan_batches
from p2pgpu.store import (
    MIGRATIONS,
    OutboxConflict,
    add_migration,
    batch_plan,
    earnings,
    mark_earning_paid,
    mark_expired,
    mark_failed,
    mark_paid,
    mark_sent,
    open_batches,
    open_db,
    owed_rows,
    payouts,
    record_earning,
    record_owed,
    record_signed,
    retry_failed,
    transaction,
)


def h(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest()


@pytest.fixture
def conn(tmp_path: Path):  # type: ignore[no-untyped-def]
    c = open_db(tmp_path / "state.db")
    yield c
    c.close()


def test_wal_and_migrations(conn: sqlite3.Connection, tmp_path: Path) -> None:
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert 100 in [r[0] for r in conn.execute("SELECT version FROM schema_migrations")]
    add_migration(9_999, "CREATE TABLE test_extra (x INTEGER);")
    try:
        c2 = open_db(tmp_path / "state.db")
        assert c2.execute("SELECT COUNT(*) FROM test_extra").fetchone()[0] == 0
        c2.close()
        with pytest.raises(ValueError):
            add_migration(9_999, "CREATE TABLE other (y);")
    finally:
        MIGRATIONS.remove((9_999, "CREATE TABLE test_extra (x INTEGER);"))


def test_record_owed_joins_the_callers_transaction(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE outbox_test_proofs (hash BLOB)")
    with pytest.raises(ValueError):
        record_owed(conn, h(1), "w", "addr", 5, "SOL", "job")  # not inside a transaction
    with pytest.raises(RuntimeError):
        with transaction(conn):
            conn.execute("INSERT INTO outbox_test_proofs VALUES (?)", (h(1),))
            record_owed(conn, h(1), "w", "addr", 5, "SOL", "job")
            raise RuntimeError("crash before commit")
    assert conn.execute("SELECT COUNT(*) FROM outbox_test_proofs").fetchone()[0] == 0
    assert owed_rows(conn) == []
    with transaction(conn):
        assert record_owed(conn, h(1), "w", "addr", 5, "SOL", "job")
        assert not record_owed(conn, h(1), "w", "addr", 5, "SOL", "job")
        with pytest.raises(OutboxConflict):
            record_owed(conn, h(1), "w", "addr", 6, "SOL", "job")
    assert [r.amount for r in owed_rows(conn)] == [5]


def _signed(conn: sqlite3.Connection, n: int, sig: str) -> int:
    plan = plan_batches(owed_rows(conn), balances={}, rent_exempt_min_lamports=0, transfers_max=19).batches[0]
    with transaction(conn):
        return record_signed(conn, plan, signature=sig, blockhash="bh", last_valid_height=150, tx=b"raw", now_ms=n)


def test_batch_life(conn: sqlite3.Connection) -> None:
    with transaction(conn):
        for i in range(3):
            record_owed(conn, h(i), f"w{i}", f"A{i % 2}", 10 + i, "SOL", "job")
    b1 = _signed(conn, 1, "sig1")
    assert owed_rows(conn) == [] and [b.batch_id for b in open_batches(conn)] == [b1]
    assert [len(t.owed_ids) for t in batch_plan(conn, b1).transfers] == [2, 1]
    with transaction(conn):
        mark_sent(conn, b1, now_ms=2)
        mark_sent(conn, b1, now_ms=3)
        mark_expired(conn, b1, now_ms=4)
    assert len(owed_rows(conn)) == 3
    b2 = _signed(conn, 5, "sig2")
    with transaction(conn):
        mark_failed(conn, b2, error="boom", failed=[1], slot=3, fee=5000, now_ms=6)
    assert [r.owed_id for r in owed_rows(conn)] == [2, 3]
    with transaction(conn):
        assert retry_failed(conn) == 1
    b3 = _signed(conn, 7, "sig3")
    with transaction(conn):
        mark_paid(conn, b3, slot=9, fee=5000, now_ms=8)
        with pytest.raises(LocalProtocolError):
            mark_expired(conn, b3, now_ms=9)
    rows = payouts(conn)
    assert {r["status"] for r in rows} == {"paid"} and {r["tx_signature"] for r in rows} == {"sig3"}
    assert set(rows[0]) >= {"proof_hash", "worker", "amount", "tx_signature", "status"}


def test_earnings(conn: sqlite3.Connection) -> None:
    with transaction(conn):
        assert record_earning(conn, h(1), job_id="j", amount=7, currency="SOL", payout_address="A")
        assert not record_earning(conn, h(1), job_id="j", amount=7, currency="SOL", payout_address="A")
        assert mark_earning_paid(conn, h(1), tx_signature="sig")
    (row,) = earnings(conn)
    assert (row["job_id"], row["amount"], row["currency"], row["tx_signature"], row["status"]) == (
        "j", 7, "SOL", "sig", "paid")
