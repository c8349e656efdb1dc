"""The node's SQLite store: one WAL database per home, with schema migrations.

Each owner of tables has a private module here that registers its migrations
when imported; importing ``p2pgpu.store`` imports them all, so ``open_db``
always brings the schema up to date.  This file names the public API.
"""

from ._outbox import (
    BatchRecord,
    OutboxConflict,
    batch_of_proof,
    batch_plan,
    earnings,
    hold_rows,
    mark_earning_paid,
    mark_expired,
    mark_failed,
    mark_paid,
    mark_sent,
    open_batches,
    owed_rows,
    owed_totals,
    payouts,
    record_earning,
    record_owed,
    record_signed,
    retry_failed,
)
from ._jobs import load_jobs, proof_wire, proofs_of, record_proof, save_job
from ._sqlite import DB_FILE, MIGRATIONS, add_migration, apply_migrations, db_path, open_db, transaction

__all__ = [
    "DB_FILE",
    "MIGRATIONS",
    "BatchRecord",
    "OutboxConflict",
    "add_migration",
    "apply_migrations",
    "batch_of_proof",
    "batch_plan",
    "db_path",
    "earnings",
    "hold_rows",
    "load_jobs",
    "proof_wire",
    "proofs_of",
    "record_proof",
    "save_job",
    "mark_earning_paid",
    "mark_expired",
    "mark_failed",
    "mark_paid",
    "mark_sent",
    "open_batches",
    "open_db",
    "owed_rows",
    "owed_totals",
    "payouts",
    "record_earning",
    "record_owed",
    "record_signed",
    "retry_failed",
    "transaction",
]
