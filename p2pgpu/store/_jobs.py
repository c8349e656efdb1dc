"""Jobs and verified proofs in the node's store (schema versions 200-299).

A job row holds the signed manifest, this node's roles, its state and a JSON
record (cluster, timings, outputs); it is upserted at every state change, so
a restart (even after ``kill -9``) finds every job it knew.  A proof row holds
the proof's signed bytes and co-signatures, the verdict and the amount; it is
written by :func:`record_proof` in the same transaction as the payout
outbox's ``record_owed``, so a proof is never recorded without what it is
owed, nor owed twice (its hash is the key).
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from ._sqlite import add_migration

add_migration(200, """
CREATE TABLE jobs (
    job_id TEXT PRIMARY KEY,
    manifest BLOB NOT NULL,
    roles TEXT NOT NULL,
    state TEXT NOT NULL,
    record TEXT NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE proofs (
    proof_hash BLOB PRIMARY KEY,
    job_id TEXT NOT NULL,
    peer_id TEXT NOT NULL,
    wire BLOB NOT NULL,
    cosigns TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT NOT NULL,
    amount INTEGER NOT NULL,
    currency TEXT NOT NULL,
    gpu_ms INTEGER NOT NULL,
    recorded_ms INTEGER NOT NULL
);
CREATE INDEX proofs_by_job ON proofs (job_id);
""")


def save_job(conn: sqlite3.Connection, *, job_id: str, manifest: bytes, roles: list[str], state: str,
             record: dict[str, Any], now_ms: int) -> None:
    conn.execute(
        "INSERT INTO jobs (job_id, manifest, roles, state, record, updated_ms) VALUES (?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (job_id) DO UPDATE SET roles = excluded.roles, state = excluded.state,"
        " record = excluded.record, updated_ms = excluded.updated_ms",
        (job_id, manifest, ",".join(roles), state, json.dumps(record, sort_keys=True), now_ms),
    )


def load_jobs(conn: sqlite3.Connection, *, limit: int = 10_000) -> list[sqlite3.Row]:
    return conn.execute("SELECT * FROM jobs ORDER BY updated_ms DESC LIMIT ?", (limit,)).fetchall()


def record_proof(conn: sqlite3.Connection, *, proof_hash: bytes, job_id: str, peer_id: str, wire: bytes,
                 cosigns: list[bytes], status: str, reason: str, amount: int, currency: str, gpu_ms: int,
                 now_ms: int) -> bool:
    """Store one proof's verdict; call inside the transaction that owes it.
    Idempotent: a proof already recorded is left as it is (returns False)."""
    if not conn.in_transaction:
        raise ValueError("record_proof must run inside the caller's transaction")
    cur = conn.execute(
        "INSERT INTO proofs (proof_hash, job_id, peer_id, wire, cosigns, status, reason, amount, currency,"
        " gpu_ms, recorded_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (proof_hash) DO NOTHING",
        (proof_hash, job_id, peer_id, wire, json.dumps([c.hex() for c in cosigns]), status, reason, amount,
         currency, gpu_ms, now_ms),
    )
    return cur.rowcount == 1


def proofs_of(conn: sqlite3.Connection, job_id: str | None = None) -> list[dict[str, Any]]:
    sql = ("SELECT proof_hash, job_id, peer_id, status, reason, amount, currency, gpu_ms, recorded_ms FROM proofs")
    rows = conn.execute(sql + (" WHERE job_id = ?" if job_id else "") + " ORDER BY recorded_ms, proof_hash",
                        (job_id,) if job_id else ()).fetchall()
    return [{"proof_hash": bytes(r["proof_hash"]).hex(), "job_id": r["job_id"], "worker": r["peer_id"],
             "status": r["status"], "reason": r["reason"], "amount": r["amount"], "currency": r["currency"],
             "gpu_ms": r["gpu_ms"], "recorded_ms": r["recorded_ms"]} for r in rows]


def proof_wire(conn: sqlite3.Connection, proof_hash: bytes) -> tuple[bytes, list[bytes]] | None:
    r = conn.execute("SELECT wire, cosigns FROM proofs WHERE proof_hash = ?", (proof_hash,)).fetchone()
    if r is None:
        return None
    return bytes(r["wire"]), [bytes.fromhex(c) for c in json.loads(r["cosigns"])]
