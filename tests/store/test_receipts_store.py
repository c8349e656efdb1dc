"""The receipts table (store/_receipts.py): bounded, fair between signers,
our own rows never evicted by strangers', and kept across a reopen."""

from __future__ import annotations

import hashlib
from pathlib import Path

from p2pgpu.store import (
    add_receipt,
    add_receipt_due,
    has_receipt,
    open_db,
    receipt_rows,
    receipts_due,
    remove_receipt_due,
)


def digest(i: int, who: str = "x") -> bytes:
    return hashlib.sha256(f"{who}{i}".encode()).digest()


def put(conn, i: int, signer: str, *, ours: bool = False, **limits: int) -> bool:
    return add_receipt(conn, digest=digest(i, signer), kind="receipt", job_id=f"{i:064x}", signer=signer, at_ms=i,
                       wire=b"w" * 10, ours=ours, now_ms=i, **limits)


def test_a_replay_is_not_kept_twice(tmp_path: Path) -> None:
    conn = open_db(tmp_path / "state.db")
    assert put(conn, 1, "a")
    assert not put(conn, 1, "a")
    assert len(receipt_rows(conn)) == 1


def test_one_signer_fills_only_its_share(tmp_path: Path) -> None:
    conn = open_db(tmp_path / "state.db")
    put(conn, 0, "honest")
    for i in range(1, 30):
        put(conn, i, "sybil", kept_max=100, per_signer_max=5)
    rows = receipt_rows(conn)
    sybil = [r for r in rows if r["signer"] == "sybil"]
    assert len(sybil) == 5 and sorted(r["at_ms"] for r in sybil) == [25, 26, 27, 28, 29]  # the newest
    assert has_receipt(conn, digest(0, "honest"))


def test_the_total_is_bounded_and_our_own_rows_stay(tmp_path: Path) -> None:
    conn = open_db(tmp_path / "state.db")
    for i in range(3):
        put(conn, i, "me", ours=True)
    for i in range(3, 40):
        put(conn, i, f"s{i}", kept_max=10, per_signer_max=5)
    rows = receipt_rows(conn)
    assert len(rows) == 10
    assert sum(r["ours"] for r in rows) == 3  # the oldest of all, yet kept


def test_receipts_and_due_jobs_survive_a_reopen(tmp_path: Path) -> None:
    conn = open_db(tmp_path / "state.db")
    put(conn, 1, "a")
    add_receipt_due(conn, job_id="ab" * 32, settled_at_ms=5, currency="SOL", now_ms=6)
    conn.close()
    conn = open_db(tmp_path / "state.db")
    assert has_receipt(conn, digest(1, "a"))
    assert receipts_due(conn) == [{"job_id": "ab" * 32, "settled_at_ms": 5, "currency": "SOL"}]
    remove_receipt_due(conn, "ab" * 32)
    assert receipts_due(conn) == []
