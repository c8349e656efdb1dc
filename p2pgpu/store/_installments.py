"""Pay as you go, stored (schema version 230): claims kept, intervals owed once.

* ``collection_items`` accepts the kind ``claim``: a member's signed interval
  claim (``core/_installments.py``) is kept with the job's other items, as
  the bytes received, before the submitter acknowledges it; after a restart
  the node replays the stored claims and gets the same installments.  SQLite
  cannot change a CHECK constraint, so the table is rebuilt, rows kept.
* ``installments``: one row per (job, member, interval) the submitter owes,
  written in the transaction that records its ``payout_owed`` row under the
  same key (``installment_key``), so both exist or neither.  The outbox's
  unique key is what pays an interval at most once; this table is what
  ``job status`` and the tests read.

The member's side needs no table of its own: its claims are deliveries
(resent until acknowledged), and each claim's expected earning is an
``earnings`` row keyed like the submitter's payout, marked paid when the
submitter's notice comes.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from ._outbox import record_owed
from ._sqlite import add_migration

add_migration(230, """
CREATE TABLE collection_items_230 (
    item_id INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES collections(job_id),
    item_hash BLOB NOT NULL CHECK (length(item_hash) = 32),
    kind TEXT NOT NULL CHECK (kind IN ('proof', 'cosign', 'outputs', 'claim')),
    sender TEXT NOT NULL,
    wire BLOB NOT NULL,
    received_ms INTEGER NOT NULL,
    UNIQUE (job_id, item_hash)
);
INSERT INTO collection_items_230 (item_id, job_id, item_hash, kind, sender, wire, received_ms)
    SELECT item_id, job_id, item_hash, kind, sender, wire, received_ms FROM collection_items;
DROP TABLE collection_items;
ALTER TABLE collection_items_230 RENAME TO collection_items;
CREATE TABLE installments (
    key BLOB PRIMARY KEY CHECK (length(key) = 32),
    job_id TEXT NOT NULL,
    peer_id TEXT NOT NULL,
    interval INTEGER NOT NULL CHECK (interval >= 1),
    amount INTEGER NOT NULL CHECK (amount > 0),
    currency TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    UNIQUE (job_id, peer_id, interval)
);
""")


def record_installment(conn: sqlite3.Connection, *, key: bytes, job_id: str, peer_id: str, interval: int,
                       amount: int, currency: str, payout_address: str, now_ms: int) -> bool:
    """Inside the caller's transaction: one interval owed, and its payout row
    under the same key.  Recording it again is a no-op (False)."""
    if not conn.in_transaction:
        raise RuntimeError("record_installment must run inside a transaction")
    cur = conn.execute(
        "INSERT INTO installments (key, job_id, peer_id, interval, amount, currency, created_ms)"
        " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        (key, job_id, peer_id, interval, amount, currency, now_ms))
    record_owed(conn, key, peer_id, payout_address, amount, currency, job_id, created_ms=now_ms)
    return cur.rowcount == 1


def installments_of(conn: sqlite3.Connection, job_id: str) -> list[dict[str, Any]]:
    """A job's installments with their payout status (``owed``, ``batched``, ``paid``, ``failed``)."""
    rows = conn.execute(
        "SELECT i.key, i.peer_id, i.interval, i.amount, i.currency, i.created_ms, o.status, b.signature"
        " FROM installments i LEFT JOIN payout_owed o ON o.proof_hash = i.key"
        " LEFT JOIN payout_batches b ON b.batch_id = o.batch_id"
        " WHERE i.job_id = ? ORDER BY i.peer_id, i.interval", (job_id,)).fetchall()
    return [{"key": bytes(r[0]).hex(), "worker": r[1], "interval": r[2], "amount": r[3], "currency": r[4],
             "created_ms": r[5], "status": r[6], "tx_signature": r[7]} for r in rows]
