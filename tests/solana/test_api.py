"""The public API of ``p2pgpu.solana`` is its ``__all__``, and the outbox API is exported by ``p2pgpu.store``."""

from __future__ import annotations

from p2pgpu import solana, store

OUTBOX_API = [
    "record_owed", "owed_rows", "record_signed", "mark_sent", "mark_paid", "mark_expired", "mark_failed",
    "retry_failed", "open_batches", "batch_plan", "batch_of_proof", "payouts", "owed_totals", "record_earning",
    "mark_earning_paid", "earnings", "open_db", "db_path", "transaction", "add_migration", "MIGRATIONS",
]


def test_solana_all() -> None:
    assert len(solana.__all__) == len(set(solana.__all__))
    for name in solana.__all__:
        assert hasattr(solana, name), name
    public = {n for n in vars(solana) if not n.startswith("_")}
    assert public - set(solana.__all__) == set()


def test_store_exports_the_outbox() -> None:
    for name in OUTBOX_API:
        assert name in store.__all__ and hasattr(store, name), name
