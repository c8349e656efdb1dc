"""Pay as you go, stored (schema 230): claims allowed among a collection's
items (old rows kept by the table rebuild), each interval recorded once with
its payout row under the same key."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from p2pgpu.store import (
    MIGRATIONS,
    OutboxConflict,
    add_collection_item,
    apply_migrations,
    installments_of,
    open_db,
    record_installment,
    save_collection,
    transaction,
)
from p2pgpu.store._sqlite import _statements

JOB = "ab" * 32
ADDR = "So11111111111111111111111111111111111111112"


def _collection(conn: sqlite3.Connection) -> None:
    save_collection(conn, job_id=JOB, certificate=b"c", members=["w"], payout_addresses={"w": ADDR},
                    confirmed_at_ms=1, deadline_ms=2)


def test_migration_230_keeps_old_items_and_allows_claims(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "old.db", isolation_level=None)
    conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY)")
    for version, sql in sorted(MIGRATIONS):
        if version < 230:  # a home written before pay as you go
            for stmt in _statements(sql):
                conn.execute(stmt)
            conn.execute("INSERT INTO schema_migrations (version) VALUES (?)", (version,))
    _collection(conn)
    add_collection_item(conn, job_id=JOB, item_hash=b"\x01" * 32, kind="proof", sender="w", wire=b"p", now_ms=5)
    with pytest.raises(sqlite3.IntegrityError):  # the old table refuses a claim
        conn.execute("INSERT INTO collection_items (job_id, item_hash, kind, sender, wire, received_ms)"
                     " VALUES (?, ?, 'claim', 'w', x'00', 6)", (JOB, b"\x02" * 32))
    assert 230 in apply_migrations(conn)
    rows = conn.execute("SELECT item_id, kind, wire, received_ms FROM collection_items").fetchall()
    assert rows == [(1, "proof", b"p", 5)]
    add_collection_item(conn, job_id=JOB, item_hash=b"\x02" * 32, kind="claim", sender="w", wire=b"c", now_ms=6)
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO collection_items (job_id, item_hash, kind, sender, wire, received_ms)"
                     " VALUES (?, ?, 'bogus', 'w', x'00', 7)", (JOB, b"\x03" * 32))


def test_an_interval_is_recorded_once_with_its_payout_row(tmp_path: Path) -> None:
    conn = open_db(tmp_path / "state.db")
    key = b"\x09" * 32
    args = {"key": key, "job_id": JOB, "peer_id": "w", "interval": 1, "amount": 1_000, "currency": "SOL",
            "payout_address": ADDR, "now_ms": 10}
    with pytest.raises(RuntimeError):
        record_installment(conn, **args)  # type: ignore[arg-type]
    with transaction(conn):
        assert record_installment(conn, **args) is True  # type: ignore[arg-type]
    with transaction(conn):  # a replay after a restart: a no-op
        assert record_installment(conn, **args) is False  # type: ignore[arg-type]
    with pytest.raises(OutboxConflict), transaction(conn):  # the same key with other terms
        record_installment(conn, **{**args, "amount": 2_000})  # type: ignore[arg-type]
    rows = installments_of(conn, JOB)
    assert [(r["interval"], r["amount"], r["status"]) for r in rows] == [(1, 1_000, "owed")]
    assert conn.execute("SELECT COUNT(*) FROM payout_owed WHERE proof_hash = ?", (key,)).fetchone()[0] == 1
