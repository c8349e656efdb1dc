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


def load_jobs(conn: sqlite3.Connection, *, limit: int = 10_000, unfinished: bool = False) -> list[sqlite3.Row]:
    """The newest job rows; with ``unfinished`` only those not in a final
    state (what a restarting node keeps in memory)."""
    where = f" WHERE state NOT IN ({', '.join('?' * len(FINAL_STATES))})" if unfinished else ""
    return conn.execute(f"SELECT * FROM jobs{where} ORDER BY updated_ms DESC LIMIT ?",
                        (*(FINAL_STATES if unfinished else ()), limit)).fetchall()


#: Job states after which a record only changes by a late proof line or a
#: paid notice: the node keeps such records here, not in memory (#13).
FINAL_STATES = ("succeeded", "failed", "cancelled", "interrupted")


def job_row(conn: sqlite3.Connection, job_id: str) -> sqlite3.Row | None:
    row: sqlite3.Row | None = conn.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    return row


def job_ids_with_prefix(conn: sqlite3.Connection, prefix: str, *, limit: int = 2) -> list[str]:
    """Stored job ids that start with ``prefix`` (lower-case hex only)."""
    if not prefix or any(ch not in "0123456789abcdef" for ch in prefix):
        return []
    rows = conn.execute("SELECT job_id FROM jobs WHERE job_id >= ? AND job_id < ? ORDER BY job_id LIMIT ?",
                        (prefix, prefix + "g", limit)).fetchall()
    return [str(r[0]) for r in rows]


def job_states(conn: sqlite3.Connection) -> dict[str, int]:
    """How many stored jobs are in each state."""
    return {str(r[0]): int(r[1]) for r in conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")}


def stored_states(conn: sqlite3.Connection, job_ids: list[str]) -> dict[str, str]:
    """The stored state of each of ``job_ids`` that has a row."""
    out: dict[str, str] = {}
    for i in range(0, len(job_ids), 500):
        chunk = job_ids[i:i + 500]
        q = f"SELECT job_id, state FROM jobs WHERE job_id IN ({', '.join('?' * len(chunk))})"
        out.update({str(r[0]): str(r[1]) for r in conn.execute(q, chunk)})
    return out


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
