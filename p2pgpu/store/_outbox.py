"""The payout outbox: what is owed, the transactions that pay it, and earnings.

What is owed is written by :func:`record_owed` inside the caller's own SQLite
transaction, next to the verified proof, so a proof is never recorded without
its debt nor a debt without its proof.  The payer (``p2pgpu/solana/_payer.py``)
then moves rows through these tables; every function here runs inside a
transaction the caller opened (``with transaction(conn): ...``) and never
commits on its own, so the payer can make each step atomic:

* ``payout_owed``: one row per proof, ``status`` owed -> batched -> paid, or
  failed (held for an operator) or back to owed (expired batch, retry).
* ``payout_batches``: one row per signed Solana transaction, written with its
  signature, blockhash, last valid block height and the signed bytes BEFORE
  it is sent; ``state`` follows ``BATCH_TRANSITIONS`` in ``core/_payout.py``.
* ``payout_batch_items``: which rows a batch paid (history kept when a row is
  re-batched after an expiry), and at which transfer index.
* ``earnings``: the worker's side, what its proofs should be paid and the
  transaction that paid them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from p2pgpu.core._payout import BatchPlan, BatchState, Owed, check_transition

from ._sqlite import add_migration

add_migration(
    100,
    """
CREATE TABLE payout_owed (
    owed_id INTEGER PRIMARY KEY,
    proof_hash BLOB NOT NULL UNIQUE CHECK (length(proof_hash) = 32),
    worker TEXT NOT NULL,
    payout_address TEXT NOT NULL,
    amount INTEGER NOT NULL CHECK (amount > 0),
    currency TEXT NOT NULL,
    job_id TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'owed' CHECK (status IN ('owed', 'batched', 'paid', 'failed')),
    batch_id INTEGER REFERENCES payout_batches(batch_id),
    error TEXT
);
CREATE INDEX payout_owed_by_status ON payout_owed (status, owed_id);
CREATE TABLE payout_batches (
    batch_id INTEGER PRIMARY KEY,
    currency TEXT NOT NULL,
    state TEXT NOT NULL,
    signature TEXT NOT NULL UNIQUE,
    blockhash TEXT NOT NULL,
    last_valid_height INTEGER NOT NULL,
    tx BLOB NOT NULL,
    merkle_root BLOB NOT NULL,
    transfers INTEGER NOT NULL,
    total INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    sends INTEGER NOT NULL DEFAULT 0,
    slot INTEGER,
    fee INTEGER,
    error TEXT
);
CREATE INDEX payout_batches_by_state ON payout_batches (state, batch_id);
CREATE TABLE payout_batch_items (
    batch_id INTEGER NOT NULL REFERENCES payout_batches(batch_id),
    owed_id INTEGER NOT NULL REFERENCES payout_owed(owed_id),
    transfer_index INTEGER NOT NULL,
    PRIMARY KEY (batch_id, owed_id)
);
CREATE TABLE earnings (
    proof_hash BLOB PRIMARY KEY CHECK (length(proof_hash) = 32),
    job_id TEXT NOT NULL,
    amount INTEGER NOT NULL,
    currency TEXT NOT NULL,
    payout_address TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'expected' CHECK (status IN ('expected', 'paid')),
    tx_signature TEXT,
    paid_ms INTEGER,
    inclusion_proof TEXT
);
""",
)

OPEN_STATES = (BatchState.SIGNED.value, BatchState.SENT.value)


class OutboxConflict(Exception):
    """The same proof was recorded twice with different terms."""


def _hash(proof_hash: bytes | str) -> bytes:
    h = bytes.fromhex(proof_hash) if isinstance(proof_hash, str) else bytes(proof_hash)
    if len(h) != 32:
        raise ValueError("proof_hash must be 32 bytes (or 64 hex characters)")
    return h


def record_owed(
    conn: sqlite3.Connection,
    proof_hash: bytes | str,
    worker: str,
    payout_address: str,
    amount: int,
    currency: str,
    job_id: str,
    *,
    created_ms: int = 0,
) -> bool:
    """Owe ``amount`` for one proof; call inside the transaction that stores the proof.

    Idempotent: recording the same proof again with the same terms does
    nothing and returns False; different terms raise :class:`OutboxConflict`.
    Returns True when a new row was written.
    """
    h = _hash(proof_hash)
    if type(amount) is not int or amount <= 0:
        raise ValueError("amount must be a positive integer (smallest unit)")
    if not conn.in_transaction:
        raise ValueError("record_owed must run inside the caller's transaction")
    cur = conn.execute(
        "INSERT INTO payout_owed (proof_hash, worker, payout_address, amount, currency, job_id, created_ms)"
        " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (proof_hash) DO NOTHING",
        (h, worker, payout_address, amount, currency, job_id, created_ms),
    )
    if cur.rowcount == 1:
        return True
    row = conn.execute(
        "SELECT worker, payout_address, amount, currency, job_id FROM payout_owed WHERE proof_hash = ?", (h,)
    ).fetchone()
    if tuple(row) != (worker, payout_address, amount, currency, job_id):
        raise OutboxConflict(f"proof {h.hex()} is already owed with different terms")
    return False


def owed_rows(conn: sqlite3.Connection, *, currency: str | None = None, limit: int = 10_000) -> list[Owed]:
    """Rows not yet in a batch, oldest first."""
    q = "SELECT owed_id, proof_hash, payout_address, amount, currency FROM payout_owed WHERE status = 'owed'"
    args: list[Any] = []
    if currency is not None:
        q += " AND currency = ?"
        args.append(currency)
    q += " ORDER BY owed_id LIMIT ?"
    args.append(limit)
    return [
        Owed(owed_id=r[0], proof_hash=bytes(r[1]), payout_address=r[2], amount=r[3], currency=r[4])
        for r in conn.execute(q, args)
    ]


@dataclass(frozen=True, kw_only=True)
class BatchRecord:
    batch_id: int
    currency: str
    state: BatchState
    signature: str
    blockhash: str
    last_valid_height: int
    tx: bytes
    merkle_root: bytes
    sends: int


def _batch(r: sqlite3.Row) -> BatchRecord:
    return BatchRecord(
        batch_id=r["batch_id"],
        currency=r["currency"],
        state=BatchState(r["state"]),
        signature=r["signature"],
        blockhash=r["blockhash"],
        last_valid_height=r["last_valid_height"],
        tx=bytes(r["tx"]),
        merkle_root=bytes(r["merkle_root"]),
        sends=r["sends"],
    )


def record_signed(
    conn: sqlite3.Connection,
    plan: BatchPlan,
    *,
    signature: str,
    blockhash: str,
    last_valid_height: int,
    tx: bytes,
    now_ms: int,
) -> int:
    """Write a signed, not yet sent, batch and move its rows to 'batched'."""
    ids = plan.owed_ids
    cur = conn.execute(
        "INSERT INTO payout_batches (currency, state, signature, blockhash, last_valid_height, tx, merkle_root,"
        " transfers, total, created_ms, updated_ms) VALUES (?, 'signed', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (plan.currency, signature, blockhash, last_valid_height, tx, plan.merkle_root(), len(plan.transfers),
         plan.total, now_ms, now_ms),
    )
    batch_id = int(cur.lastrowid or 0)
    for index, t in enumerate(plan.transfers):
        for owed_id in t.owed_ids:
            conn.execute(
                "INSERT INTO payout_batch_items (batch_id, owed_id, transfer_index) VALUES (?, ?, ?)",
                (batch_id, owed_id, index),
            )
    n = conn.executemany(
        "UPDATE payout_owed SET status = 'batched', batch_id = ? WHERE owed_id = ? AND status = 'owed'",
        [(batch_id, i) for i in ids],
    ).rowcount
    if n != len(ids):
        raise RuntimeError("a planned row was not owed any more: refusing to batch it twice")
    return batch_id


def _move(conn: sqlite3.Connection, batch_id: int, new: BatchState, now_ms: int, **cols: Any) -> None:
    row = conn.execute("SELECT state FROM payout_batches WHERE batch_id = ?", (batch_id,)).fetchone()
    check_transition(BatchState(row[0]), new)
    sets = ", ".join(f"{k} = ?" for k in cols)
    conn.execute(
        f"UPDATE payout_batches SET state = ?, updated_ms = ?{', ' + sets if sets else ''} WHERE batch_id = ?",
        (new.value, now_ms, *cols.values(), batch_id),
    )


def mark_sent(conn: sqlite3.Connection, batch_id: int, *, now_ms: int) -> None:
    row = conn.execute("SELECT state FROM payout_batches WHERE batch_id = ?", (batch_id,)).fetchone()
    if row[0] == BatchState.SENT.value:
        conn.execute(
            "UPDATE payout_batches SET sends = sends + 1, updated_ms = ? WHERE batch_id = ?", (now_ms, batch_id)
        )
        return
    _move(conn, batch_id, BatchState.SENT, now_ms)
    conn.execute("UPDATE payout_batches SET sends = sends + 1 WHERE batch_id = ?", (batch_id,))


def mark_paid(conn: sqlite3.Connection, batch_id: int, *, slot: int | None, fee: int | None, now_ms: int) -> None:
    _move(conn, batch_id, BatchState.PAID, now_ms, slot=slot, fee=fee)
    conn.execute("UPDATE payout_owed SET status = 'paid' WHERE batch_id = ? AND status = 'batched'", (batch_id,))


def mark_expired(conn: sqlite3.Connection, batch_id: int, *, now_ms: int) -> None:
    """The transaction can never land: its rows are owed again."""
    _move(conn, batch_id, BatchState.EXPIRED, now_ms)
    conn.execute(
        "UPDATE payout_owed SET status = 'owed', batch_id = NULL WHERE batch_id = ? AND status = 'batched'",
        (batch_id,),
    )


def mark_failed(
    conn: sqlite3.Connection,
    batch_id: int,
    *,
    error: str,
    failed: Sequence[int],
    slot: int | None,
    fee: int | None,
    now_ms: int,
) -> None:
    """The transaction landed with an error (no transfer happened, the fee was
    charged).  ``failed`` rows are held with the error; the others are owed again."""
    _move(conn, batch_id, BatchState.FAILED, now_ms, error=error, slot=slot, fee=fee)
    conn.executemany(
        "UPDATE payout_owed SET status = 'failed', error = ? WHERE owed_id = ? AND batch_id = ?",
        [(error, i, batch_id) for i in failed],
    )
    conn.execute(
        "UPDATE payout_owed SET status = 'owed', batch_id = NULL WHERE batch_id = ? AND status = 'batched'",
        (batch_id,),
    )


def hold_rows(conn: sqlite3.Connection, owed_ids: Sequence[int], *, error: str) -> int:
    """Owed rows that can never be paid as they are (a malformed address, an
    unknown mint) are held as failed with the reason, for an operator."""
    return conn.executemany(
        "UPDATE payout_owed SET status = 'failed', error = ? WHERE owed_id = ? AND status = 'owed'",
        [(error, i) for i in owed_ids],
    ).rowcount


def retry_failed(conn: sqlite3.Connection, owed_ids: Sequence[int] | None = None) -> int:
    """An operator fixed the cause: failed rows (all, or these) are owed again."""
    if owed_ids is None:
        return conn.execute("UPDATE payout_owed SET status = 'owed', error = NULL WHERE status = 'failed'").rowcount
    return conn.executemany(
        "UPDATE payout_owed SET status = 'owed', error = NULL WHERE owed_id = ? AND status = 'failed'",
        [(i,) for i in owed_ids],
    ).rowcount


def open_batches(conn: sqlite3.Connection) -> list[BatchRecord]:
    """Batches signed or sent and not yet resolved, oldest first."""
    rows = conn.execute(
        "SELECT * FROM payout_batches WHERE state IN (?, ?) ORDER BY batch_id", OPEN_STATES
    ).fetchall()
    return [_batch(r) for r in rows]


def batch_plan(conn: sqlite3.Connection, batch_id: int) -> BatchPlan:
    """Rebuild the plan a batch was signed from (its transfers in order)."""
    from p2pgpu.core._payout import Transfer

    rows = conn.execute(
        "SELECT i.transfer_index, o.owed_id, o.proof_hash, o.payout_address, o.amount, b.currency"
        " FROM payout_batch_items i JOIN payout_owed o USING (owed_id) JOIN payout_batches b USING (batch_id)"
        " WHERE i.batch_id = ? ORDER BY i.transfer_index, o.owed_id",
        (batch_id,),
    ).fetchall()
    by_index: dict[int, list[sqlite3.Row]] = {}
    for r in rows:
        by_index.setdefault(r[0], []).append(r)
    transfers = tuple(
        Transfer(
            address=rs[0][3],
            amount=sum(r[4] for r in rs),
            owed_ids=tuple(r[1] for r in rs),
            proof_hashes=tuple(bytes(r[2]) for r in rs),
        )
        for _, rs in sorted(by_index.items())
    )
    currency = rows[0][5] if rows else ""
    return BatchPlan(currency=currency, transfers=transfers)


def batch_of_proof(conn: sqlite3.Connection, proof_hash: bytes | str) -> tuple[int, str, str] | None:
    """(batch_id, signature, state) of the batch that paid (or is paying) a proof."""
    row = conn.execute(
        "SELECT b.batch_id, b.signature, b.state FROM payout_owed o JOIN payout_batches b ON b.batch_id = o.batch_id"
        " WHERE o.proof_hash = ?",
        (_hash(proof_hash),),
    ).fetchone()
    return (row[0], row[1], row[2]) if row else None


def payouts(conn: sqlite3.Connection, *, limit: int = 10_000, job_id: str | None = None,
            newest: bool = False) -> list[dict[str, Any]]:
    """What this node owes and paid, for ``p2pgpu payouts`` (keys fixed by docs/cli.md):
    every row (oldest first, at most ``limit``), one job's (``job_id``), or the
    ``limit`` newest (``newest``: a long-running node's recent payouts)."""
    where, args = ("WHERE o.job_id = ?", [job_id]) if job_id is not None else ("", [])
    order = "DESC" if newest else "ASC"
    rows = conn.execute(
        "SELECT o.proof_hash, o.worker, o.payout_address, o.amount, o.currency, o.job_id, o.status, o.error,"
        " b.signature, b.state, o.created_ms, b.updated_ms"
        " FROM payout_owed o LEFT JOIN payout_batches b ON b.batch_id = o.batch_id"
        f" {where} ORDER BY o.owed_id {order} LIMIT ?",
        (*args, limit),
    ).fetchall()
    if newest:
        rows = rows[::-1]
    out = []
    for r in rows:
        out.append(
            {
                "proof_hash": bytes(r[0]).hex(),
                "worker": r[1],
                "payout_address": r[2],
                "amount": r[3],
                "currency": r[4],
                "job_id": r[5],
                "status": r[6],
                "error": r[7],
                "tx_signature": r[8] if r[6] in ("paid", "batched") else None,
                "created_ms": r[10],
                # When the paying batch was seen on the ledger (its last state change).
                "paid_ms": r[11] if r[6] == "paid" else None,
            }
        )
    return out


def unsettled_count(conn: sqlite3.Connection) -> int:
    """Rows the payer still has work on (``owed`` or ``batched``)."""
    return int(conn.execute("SELECT count(*) FROM payout_owed WHERE status IN ('owed', 'batched')").fetchone()[0])


def paid_since(conn: sqlite3.Connection, since_ms: int, *, limit: int = 1_000) -> list[dict[str, Any]]:
    """Rows whose batch was seen paid at or after ``since_ms`` (oldest first),
    with the keys of :func:`payouts` and ``paid_ms``: what a long-running node
    tells its workers, without reading every row it ever paid."""
    rows = conn.execute(
        "SELECT o.proof_hash, o.worker, o.payout_address, o.amount, o.currency, o.job_id, o.status, o.error,"
        " b.signature, b.state, o.created_ms, b.updated_ms"
        " FROM payout_owed o JOIN payout_batches b ON b.batch_id = o.batch_id"
        " WHERE o.status = 'paid' AND b.updated_ms >= ? ORDER BY b.updated_ms, o.owed_id LIMIT ?",
        (since_ms, limit),
    ).fetchall()
    return [{"proof_hash": bytes(r[0]).hex(), "worker": r[1], "payout_address": r[2], "amount": r[3],
             "currency": r[4], "job_id": r[5], "status": r[6], "error": r[7], "tx_signature": r[8],
             "created_ms": r[10], "paid_ms": r[11]} for r in rows]


def owed_totals(conn: sqlite3.Connection, *, currency: str) -> dict[str, dict[str, int]]:
    """Per payout address: lamports (or token units) by status."""
    out: dict[str, dict[str, int]] = {}
    for addr, status, total in conn.execute(
        "SELECT payout_address, status, SUM(amount) FROM payout_owed WHERE currency = ?"
        " GROUP BY payout_address, status ORDER BY payout_address, status",
        (currency,),
    ):
        out.setdefault(addr, {})[status] = int(total)
    return out


# --- The worker's side ------------------------------------------------------


def record_earning(
    conn: sqlite3.Connection,
    proof_hash: bytes | str,
    *,
    job_id: str,
    amount: int,
    currency: str,
    payout_address: str,
    created_ms: int = 0,
) -> bool:
    """A proof this node produced and what it expects for it (idempotent)."""
    cur = conn.execute(
        "INSERT INTO earnings (proof_hash, job_id, amount, currency, payout_address, created_ms)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (proof_hash) DO NOTHING",
        (_hash(proof_hash), job_id, amount, currency, payout_address, created_ms),
    )
    return cur.rowcount == 1


def mark_earning_paid(
    conn: sqlite3.Connection,
    proof_hash: bytes | str,
    *,
    tx_signature: str,
    now_ms: int = 0,
    inclusion_proof: str | None = None,
) -> bool:
    cur = conn.execute(
        "UPDATE earnings SET status = 'paid', tx_signature = ?, paid_ms = ?, inclusion_proof = ?"
        " WHERE proof_hash = ?",
        (tx_signature, now_ms, inclusion_proof, _hash(proof_hash)),
    )
    return cur.rowcount == 1


def earnings(conn: sqlite3.Connection, *, limit: int = 10_000) -> list[dict[str, Any]]:
    """For ``p2pgpu earnings`` (keys fixed by docs/cli.md)."""
    return [
        {
            "proof_hash": bytes(r[0]).hex(),
            "job_id": r[1],
            "amount": r[2],
            "currency": r[3],
            "payout_address": r[4],
            "status": r[5],
            "tx_signature": r[6],
            "created_ms": r[7],
            "paid_ms": r[8],
        }
        for r in conn.execute(
            "SELECT proof_hash, job_id, amount, currency, payout_address, status, tx_signature, created_ms, paid_ms"
            " FROM earnings"
            " ORDER BY created_ms, proof_hash LIMIT ?",
            (limit,),
        )
    ]
