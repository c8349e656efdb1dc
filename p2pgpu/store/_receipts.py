"""Receipts this node holds, and the receipts it still has to sign (schema 600-609).

``receipts`` keeps the signed evidence reputation is computed from
(``core/_reputation.py``): published receipts (the submitter's receipt with
its certificate) and members' receipts, ours and strangers', as the bytes
that were signed, so a copy of the table is enough to recompute every score.
It is bounded: at most ``kept_max`` rows, and at most ``per_signer_max`` of
one signer (a stranger signing receipts for sybil jobs fills only its own
share); past either, the oldest strangers' rows go first (by the time the
receipt speaks of), and this node's own receipts are never evicted by
strangers'.  ``receipts_due`` lists the jobs this node settled as submitter
whose receipt it has not signed yet (it waits for the payout transaction),
so a restart, even after ``kill -9``, still signs them.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from ._sqlite import add_migration

add_migration(600, """
CREATE TABLE receipts (
    digest BLOB PRIMARY KEY CHECK (length(digest) = 32),
    kind TEXT NOT NULL CHECK (kind IN ('receipt', 'member_receipt')),
    job_id TEXT NOT NULL,
    signer TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    wire BLOB NOT NULL,
    ours INTEGER NOT NULL DEFAULT 0,
    received_ms INTEGER NOT NULL
);
CREATE INDEX receipts_by_age ON receipts (ours, at_ms);
CREATE INDEX receipts_by_signer ON receipts (signer, at_ms);
CREATE INDEX receipts_by_job ON receipts (job_id, kind, signer);
CREATE TABLE receipts_due (
    job_id TEXT PRIMARY KEY,
    settled_at_ms INTEGER NOT NULL,
    currency TEXT NOT NULL,
    added_ms INTEGER NOT NULL
);
""")

#: Rows kept in all, and per signer (a submitter, or a member for its reports).
receipts_kept_max = 20_000
receipts_per_signer_max = 512


def add_receipt(conn: sqlite3.Connection, *, digest: bytes, kind: str, job_id: str, signer: str, at_ms: int,
                wire: bytes, ours: bool, now_ms: int, kept_max: int = receipts_kept_max,
                per_signer_max: int = receipts_per_signer_max) -> bool:
    """Keep one receipt (True if it is new).  Inside the caller's transaction
    or on its own (autocommit).  Evicts within the bounds (module doc)."""
    cur = conn.execute(
        "INSERT INTO receipts (digest, kind, job_id, signer, at_ms, wire, ours, received_ms)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (digest) DO NOTHING",
        (digest, kind, job_id, signer, at_ms, wire, 1 if ours else 0, now_ms))
    if cur.rowcount != 1:
        return False
    if not ours:
        (mine,) = conn.execute("SELECT count(*) FROM receipts WHERE signer = ? AND ours = 0", (signer,)).fetchone()
        if mine > per_signer_max:
            conn.execute("DELETE FROM receipts WHERE digest IN (SELECT digest FROM receipts WHERE signer = ?"
                         " AND ours = 0 ORDER BY at_ms, digest LIMIT ?)", (signer, mine - per_signer_max))
    (total,) = conn.execute("SELECT count(*) FROM receipts").fetchone()
    if total > kept_max:
        conn.execute("DELETE FROM receipts WHERE digest IN (SELECT digest FROM receipts WHERE ours = 0"
                     " ORDER BY at_ms, digest LIMIT ?)", (total - kept_max,))
    (still,) = conn.execute("SELECT count(*) FROM receipts WHERE digest = ?", (digest,)).fetchone()
    return bool(still)


def has_receipt(conn: sqlite3.Connection, digest: bytes) -> bool:
    return conn.execute("SELECT 1 FROM receipts WHERE digest = ?", (digest,)).fetchone() is not None


def receipt_rows(conn: sqlite3.Connection, *, kind: str | None = None,
                 limit: int = receipts_kept_max) -> list[dict[str, Any]]:
    """The receipts held, newest first (at most ``limit``)."""
    where, args = ("WHERE kind = ?", [kind]) if kind is not None else ("", [])
    rows = conn.execute(f"SELECT digest, kind, job_id, signer, at_ms, wire, ours, received_ms FROM receipts {where}"
                        " ORDER BY at_ms DESC, digest LIMIT ?", (*args, limit)).fetchall()
    return [{"digest": bytes(r[0]), "kind": r[1], "job_id": r[2], "signer": r[3], "at_ms": r[4],
             "wire": bytes(r[5]), "ours": bool(r[6]), "received_ms": r[7]} for r in rows]


def receipt_digests(conn: sqlite3.Connection, *, limit: int = receipts_kept_max) -> list[bytes]:
    """The digests of the receipts held, newest first (at most ``limit``)."""
    return [bytes(r[0]) for r in conn.execute("SELECT digest FROM receipts ORDER BY at_ms DESC, digest LIMIT ?",
                                              (limit,))]


def receipt_wires(conn: sqlite3.Connection, digests: list[bytes]) -> dict[bytes, bytes]:
    """The signed bytes of these receipts (those still held)."""
    out: dict[bytes, bytes] = {}
    for i in range(0, len(digests), 500):
        chunk = digests[i:i + 500]
        marks = ",".join("?" * len(chunk))
        for d, w in conn.execute(f"SELECT digest, wire FROM receipts WHERE digest IN ({marks})", chunk):
            out[bytes(d)] = bytes(w)
    return out


def member_reported(conn: sqlite3.Connection, job_id: str, member: str) -> bool:
    """Whether ``member`` signed a member receipt for this job already."""
    return conn.execute("SELECT 1 FROM receipts WHERE job_id = ? AND kind = 'member_receipt' AND signer = ?",
                        (job_id, member)).fetchone() is not None


def add_receipt_due(conn: sqlite3.Connection, *, job_id: str, settled_at_ms: int, currency: str,
                    now_ms: int) -> None:
    conn.execute("INSERT INTO receipts_due (job_id, settled_at_ms, currency, added_ms) VALUES (?, ?, ?, ?)"
                 " ON CONFLICT (job_id) DO NOTHING", (job_id, settled_at_ms, currency, now_ms))


def settled_without_receipt(conn: sqlite3.Connection, *, since_ms: int, limit: int = 1_000) -> list[tuple[str, int]]:
    """Collections settled since ``since_ms`` whose receipt was neither signed
    here nor noted as due: ``(job_id, settled_ms)`` (a crash between the
    settlement's transaction and the note leaves such a job)."""
    return [(r[0], r[1]) for r in conn.execute(
        "SELECT job_id, settled_ms FROM collections WHERE settled = 1 AND settled_ms >= ?"
        " AND job_id NOT IN (SELECT job_id FROM receipts WHERE kind = 'receipt' AND ours = 1)"
        " AND job_id NOT IN (SELECT job_id FROM receipts_due) ORDER BY settled_ms LIMIT ?", (since_ms, limit))]


def receipts_due(conn: sqlite3.Connection, *, limit: int = 1_000) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT job_id, settled_at_ms, currency FROM receipts_due ORDER BY settled_at_ms, job_id"
                        " LIMIT ?", (limit,)).fetchall()
    return [{"job_id": r[0], "settled_at_ms": r[1], "currency": r[2]} for r in rows]


def remove_receipt_due(conn: sqlite3.Connection, job_id: str) -> None:
    conn.execute("DELETE FROM receipts_due WHERE job_id = ?", (job_id,))
