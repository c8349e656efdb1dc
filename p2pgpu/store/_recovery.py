"""What a job needs to survive ``kill -9`` mid-way (schema version 210).

Three small tables, one per side of the result path:

* ``collections`` and ``collection_items``: the submitter's open collection
  of a confirmed job.  The certificate's wire bytes and the settle deadline
  are written when the job is confirmed (before any confirm leaves the node);
  every proof, co-signature and outputs list a member sends is written, as
  the signed bytes received, before the submitter acknowledges it.  After a
  restart the node rebuilds each unsettled collection from these rows.  The
  ``settled`` flag is set in the same transaction that records the proofs'
  verdicts and what they owe, so a collection is settled at most once.
* ``deliveries``: a member's signed messages to the submitter (its proof, its
  outputs list, its co-signatures), kept until the submitter acknowledges
  them, so that they are resent after either side restarts.
* ``member_runs``: what a member needs to prove the time it served if it dies
  mid-job: the chain of checkpoints so far and what it observed of the other
  members, rewritten at every checkpoint (before the new chain head is shown
  to anyone in a heartbeat).

* ``collected_logs`` (schema version 220): the log batches the submitter
  collected, as the signed bytes received, so ``job logs`` still answers
  after the submitter restarts (batches sent while it was down are lost:
  members do not resend logs).

Every write function runs in whatever transaction the caller holds (or in
autocommit); those that must be atomic with another write say so.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from p2pgpu.core import decode, encode

from ._sqlite import add_migration

add_migration(210, """
CREATE TABLE collections (
    job_id TEXT PRIMARY KEY,
    certificate BLOB NOT NULL,
    members TEXT NOT NULL,
    payout_addresses TEXT NOT NULL,
    confirmed_at_ms INTEGER NOT NULL,
    deadline_ms INTEGER NOT NULL,
    settled INTEGER NOT NULL DEFAULT 0,
    settled_ms INTEGER
);
CREATE INDEX collections_open ON collections (settled);
CREATE TABLE collection_items (
    item_id INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES collections(job_id),
    item_hash BLOB NOT NULL CHECK (length(item_hash) = 32),
    kind TEXT NOT NULL CHECK (kind IN ('proof', 'cosign', 'outputs')),
    sender TEXT NOT NULL,
    wire BLOB NOT NULL,
    received_ms INTEGER NOT NULL,
    UNIQUE (job_id, item_hash)
);
CREATE TABLE deliveries (
    item_hash BLOB PRIMARY KEY CHECK (length(item_hash) = 32),
    job_id TEXT NOT NULL,
    dest TEXT NOT NULL,
    kind TEXT NOT NULL,
    wire BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    acked_ms INTEGER,
    ack_status TEXT
);
CREATE INDEX deliveries_open ON deliveries (acked_ms, created_ms);
CREATE TABLE member_runs (
    job_id TEXT PRIMARY KEY,
    cert_hash BLOB NOT NULL,
    submitter TEXT NOT NULL,
    members TEXT NOT NULL,
    price_per_gpu_hour INTEGER NOT NULL,
    currency TEXT NOT NULL,
    started_at_ms INTEGER NOT NULL,
    gpus TEXT NOT NULL,
    checkpoints BLOB NOT NULL,
    observed TEXT NOT NULL,
    proof_signed INTEGER NOT NULL DEFAULT 0,
    cosigned INTEGER NOT NULL DEFAULT 0,
    updated_ms INTEGER NOT NULL
);
""")

#: "claim": an interval claim (pay as you go; the kind is allowed from schema version 230 on).
ITEM_KINDS = ("proof", "cosign", "outputs", "claim")


# --- the submitter's collections -------------------------------------------------


def save_collection(conn: sqlite3.Connection, *, job_id: str, certificate: bytes, members: list[str],
                    payout_addresses: dict[str, str], confirmed_at_ms: int, deadline_ms: int) -> bool:
    """A confirmed job's collection opens (idempotent: the first write wins).
    ``payout_addresses``: each member's, from its advert at confirmation (a
    restarted submitter may settle before it hears the adverts again)."""
    cur = conn.execute(
        "INSERT INTO collections (job_id, certificate, members, payout_addresses, confirmed_at_ms, deadline_ms)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (job_id) DO NOTHING",
        (job_id, certificate, json.dumps(list(members)), json.dumps(payout_addresses, sort_keys=True),
         confirmed_at_ms, deadline_ms))
    return cur.rowcount == 1


def add_collection_item(conn: sqlite3.Connection, *, job_id: str, item_hash: bytes, kind: str, sender: str,
                        wire: bytes, now_ms: int) -> bool:
    """One signed message a member sent; True when it is new."""
    if kind not in ITEM_KINDS:
        raise ValueError(f"item kind must be one of {', '.join(ITEM_KINDS)}")
    cur = conn.execute(
        "INSERT INTO collection_items (job_id, item_hash, kind, sender, wire, received_ms)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (job_id, item_hash) DO NOTHING",
        (job_id, item_hash, kind, sender, wire, now_ms))
    return cur.rowcount == 1


def has_collection_item(conn: sqlite3.Connection, job_id: str, item_hash: bytes) -> bool:
    return conn.execute("SELECT 1 FROM collection_items WHERE job_id = ? AND item_hash = ?",
                        (job_id, item_hash)).fetchone() is not None


def mark_collection_settled(conn: sqlite3.Connection, job_id: str, *, now_ms: int) -> bool:
    """Call inside the transaction that records the proofs' verdicts and what they owe."""
    if not conn.in_transaction:
        raise ValueError("mark_collection_settled must run inside the caller's transaction")
    cur = conn.execute("UPDATE collections SET settled = 1, settled_ms = ? WHERE job_id = ? AND settled = 0",
                       (now_ms, job_id))
    return cur.rowcount == 1


def collection_row(conn: sqlite3.Connection, job_id: str) -> dict[str, Any] | None:
    r = conn.execute("SELECT * FROM collections WHERE job_id = ?", (job_id,)).fetchone()
    return _collection(r) if r is not None else None


def open_collections(conn: sqlite3.Connection, *, limit: int = 10_000) -> list[dict[str, Any]]:
    """Unsettled collections, oldest first, each with its items in the order received."""
    rows = conn.execute("SELECT * FROM collections WHERE settled = 0 ORDER BY confirmed_at_ms, job_id LIMIT ?",
                        (limit,)).fetchall()
    out = []
    for r in rows:
        doc = _collection(r)
        doc["items"] = [{"item_hash": bytes(i["item_hash"]), "kind": i["kind"], "sender": i["sender"],
                         "wire": bytes(i["wire"]), "received_ms": i["received_ms"]} for i in conn.execute(
            "SELECT item_hash, kind, sender, wire, received_ms FROM collection_items WHERE job_id = ?"
            " ORDER BY item_id",
            (r["job_id"],))]
        out.append(doc)
    return out


def _collection(r: sqlite3.Row) -> dict[str, Any]:
    return {"job_id": r["job_id"], "certificate": bytes(r["certificate"]), "members": json.loads(r["members"]),
            "payout_addresses": json.loads(r["payout_addresses"]),
            "confirmed_at_ms": r["confirmed_at_ms"], "deadline_ms": r["deadline_ms"],
            "settled": bool(r["settled"])}


# --- the member's deliveries -----------------------------------------------------------


def add_delivery(conn: sqlite3.Connection, *, item_hash: bytes, job_id: str, dest: str, kind: str, wire: bytes,
                 now_ms: int) -> bool:
    """A signed message to resend until ``dest`` acknowledges it (idempotent)."""
    cur = conn.execute(
        "INSERT INTO deliveries (item_hash, job_id, dest, kind, wire, created_ms) VALUES (?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (item_hash) DO NOTHING", (item_hash, job_id, dest, kind, wire, now_ms))
    return cur.rowcount == 1


def ack_delivery(conn: sqlite3.Connection, item_hash: bytes, *, status: str, now_ms: int) -> bool:
    """Acknowledged (or given up on, ``status = 'expired'``): never resent again."""
    cur = conn.execute("UPDATE deliveries SET acked_ms = ?, ack_status = ? WHERE item_hash = ? AND acked_ms IS NULL",
                       (now_ms, status[:32], item_hash))
    return cur.rowcount == 1


def pending_deliveries(conn: sqlite3.Connection, *, limit: int = 10_000) -> list[dict[str, Any]]:
    """Deliveries not yet acknowledged, oldest first."""
    return [{"item_hash": bytes(r["item_hash"]), "job_id": r["job_id"], "dest": r["dest"], "kind": r["kind"],
             "wire": bytes(r["wire"]), "created_ms": r["created_ms"]}
            for r in conn.execute("SELECT * FROM deliveries WHERE acked_ms IS NULL ORDER BY created_ms, item_hash"
                                  " LIMIT ?", (limit,))]


def deliveries_of(conn: sqlite3.Connection, job_id: str) -> list[dict[str, Any]]:
    """Every delivery of one job, acknowledged or not (for tests and the operator)."""
    return [{"item_hash": bytes(r["item_hash"]).hex(), "kind": r["kind"], "dest": r["dest"],
             "created_ms": r["created_ms"], "acked_ms": r["acked_ms"], "ack_status": r["ack_status"]}
            for r in conn.execute("SELECT * FROM deliveries WHERE job_id = ? ORDER BY created_ms, item_hash",
                                  (job_id,))]


# --- the member's running jobs ----------------------------------------------------------


def save_member_run(conn: sqlite3.Connection, *, job_id: str, cert_hash: bytes, submitter: str, members: list[str],
                    price_per_gpu_hour: int, currency: str, started_at_ms: int, gpus: list[str],
                    checkpoints: list[tuple[int, bytes]], observed: dict[str, list[Any]], now_ms: int) -> None:
    """Upsert a member's progress (its checkpoints and observations so far)."""
    conn.execute(
        "INSERT INTO member_runs (job_id, cert_hash, submitter, members, price_per_gpu_hour, currency,"
        " started_at_ms, gpus, checkpoints, observed, updated_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (job_id) DO UPDATE SET checkpoints = excluded.checkpoints, observed = excluded.observed,"
        " updated_ms = excluded.updated_ms",
        (job_id, cert_hash, submitter, json.dumps(list(members)), price_per_gpu_hour, currency, started_at_ms,
         json.dumps(list(gpus)), encode([[t, i] for t, i in checkpoints]), json.dumps(observed, sort_keys=True),
         now_ms))


def set_member_run(conn: sqlite3.Connection, job_id: str, *, proof_signed: bool | None = None,
                   cosigned: bool | None = None, observed: dict[str, list[Any]] | None = None) -> None:
    """Mark the proof signed / co-signatures made (inside the transaction that stores them)."""
    if proof_signed:
        conn.execute("UPDATE member_runs SET proof_signed = 1 WHERE job_id = ?", (job_id,))
    if cosigned:
        conn.execute("UPDATE member_runs SET cosigned = 1 WHERE job_id = ?", (job_id,))
    if observed is not None:
        conn.execute("UPDATE member_runs SET observed = ? WHERE job_id = ?",
                     (json.dumps(observed, sort_keys=True), job_id))


def unfinished_member_runs(conn: sqlite3.Connection, *, limit: int = 1_000) -> list[dict[str, Any]]:
    """Runs whose proof or co-signatures were never signed (the node died mid-job)."""
    out = []
    for r in conn.execute("SELECT * FROM member_runs WHERE proof_signed = 0 OR cosigned = 0"
                          " ORDER BY started_at_ms, job_id LIMIT ?", (limit,)):
        cps = decode(bytes(r["checkpoints"]), size_max=1 << 20)
        out.append({"job_id": r["job_id"], "cert_hash": bytes(r["cert_hash"]), "submitter": r["submitter"],
                    "members": json.loads(r["members"]), "price_per_gpu_hour": r["price_per_gpu_hour"],
                    "currency": r["currency"], "started_at_ms": r["started_at_ms"], "gpus": json.loads(r["gpus"]),
                    "checkpoints": [(int(c[0]), bytes(c[1])) for c in cps], "observed": json.loads(r["observed"]),
                    "proof_signed": bool(r["proof_signed"]), "cosigned": bool(r["cosigned"])})
    return out


add_migration(220, """
CREATE TABLE collected_logs (
    job_id TEXT NOT NULL,
    member TEXT NOT NULL,
    seq INTEGER NOT NULL,
    lines INTEGER NOT NULL,
    wire BLOB NOT NULL,
    received_ms INTEGER NOT NULL,
    PRIMARY KEY (job_id, member, seq)
);
""")


def add_log_batch(conn: sqlite3.Connection, *, job_id: str, member: str, seq: int, lines: int, wire: bytes,
                  now_ms: int) -> bool:
    """One signed log batch a member sent; True when it is new."""
    cur = conn.execute(
        "INSERT INTO collected_logs (job_id, member, seq, lines, wire, received_ms) VALUES (?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (job_id, member, seq) DO NOTHING", (job_id, member, seq, lines, wire, now_ms))
    return cur.rowcount == 1


def log_batches(conn: sqlite3.Connection, job_id: str, *, limit: int = 100_000) -> list[bytes]:
    """A job's collected log batches (signed bytes), in the order received."""
    return [bytes(r[0]) for r in conn.execute(
        "SELECT wire FROM collected_logs WHERE job_id = ? ORDER BY rowid LIMIT ?",
        (job_id, limit))]


def prune_recovery(conn: sqlite3.Connection, *, before_ms: int) -> int:
    """Forget what no longer matters: deliveries acknowledged (or given up)
    before ``before_ms``, finished member runs last written before it, and the
    items of collections settled before it (their proofs stay in ``proofs``).
    Returns the rows deleted."""
    n = conn.execute("DELETE FROM deliveries WHERE acked_ms IS NOT NULL AND acked_ms < ?", (before_ms,)).rowcount
    n += conn.execute("DELETE FROM member_runs WHERE proof_signed = 1 AND cosigned = 1 AND updated_ms < ?",
                      (before_ms,)).rowcount
    n += conn.execute("DELETE FROM collection_items WHERE job_id IN (SELECT job_id FROM collections"
                      " WHERE settled = 1 AND settled_ms < ?)", (before_ms,)).rowcount
    n += conn.execute("DELETE FROM collected_logs WHERE received_ms < ? AND job_id IN (SELECT job_id FROM"
                      " collections WHERE settled = 1)", (before_ms,)).rowcount
    return n
