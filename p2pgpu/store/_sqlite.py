"""Opening the node's SQLite store, and its schema migrations.

One file per home (``state.db``), in WAL mode so readers (the CLI, the
explorer) never block the daemon's writer.  It is private to the node's
user (0600, issue #12): :func:`open_db` creates it so before SQLite opens it,
and SQLite gives its ``-wal`` and ``-shm`` files the database's own mode;
files an earlier version left readable are tightened on open.  ``synchronous=FULL``: the payout
outbox records a transaction's signature *before* sending it, and that record
must survive a power cut, or a restart could pay the same proof twice.

Connections are opened in autocommit mode (``isolation_level=None``); write
with ``with transaction(conn): ...`` (``BEGIN IMMEDIATE`` ... ``COMMIT``), so
that a caller can put several modules' writes (a proof and what it owes) in one
atomic transaction.

Migrations: :data:`MIGRATIONS` is a list of ``(version, sql)``.  A module that
owns tables appends its entries at import time with :func:`add_migration`
(``p2pgpu/store/__init__.py`` imports every such module).  Applied versions are
recorded in ``schema_migrations``, so an entry added later with a lower number
is still applied.  Versions are blocks per owner so that parallel work never
collides: 100-199 the payout outbox and earnings, 200-299 jobs and proofs,
300-399 certificates and clusters, 400-499 the explorer, 500+ free.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DB_FILE = "state.db"
busy_timeout_ms = 10_000
#: The database and its WAL and shared-memory files: the node's user only.
db_file_mode = 0o600

#: (version, sql): applied in ascending version order, each once, each in its own transaction.
MIGRATIONS: list[tuple[int, str]] = []


def add_migration(version: int, sql: str) -> None:
    """Register a schema step; refuses a version that is already taken."""
    for v, existing in MIGRATIONS:
        if v == version:
            if existing == sql:
                return
            raise ValueError(f"schema migration {version} is already taken")
    MIGRATIONS.append((version, sql))


def db_path(home_path: Path) -> Path:
    return Path(home_path) / DB_FILE


def open_db(path: Path | str, *, migrate: bool = True, readonly: bool = False) -> sqlite3.Connection:
    """Open (creating if needed) the store at ``path`` with WAL and sane pragmas."""
    if readonly:
        uri = f"file:{Path(path).as_posix()}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=busy_timeout_ms / 1000)
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        make_private(Path(path))
        conn = sqlite3.connect(str(path), isolation_level=None, timeout=busy_timeout_ms / 1000)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
    conn.execute("PRAGMA foreign_keys = ON")
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        if migrate:
            apply_migrations(conn)
    return conn


def make_private(path: Path) -> None:
    """Create ``path`` with mode 0600 if it is missing, and take group and
    other permissions off it and its ``-wal`` and ``-shm`` files if present."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, db_file_mode))
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            mode = p.stat().st_mode & 0o777
        except FileNotFoundError:
            continue
        if mode & 0o077:
            os.chmod(p, mode & 0o700)


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on any exception.

    Nested use is an error (SQLite has no nested BEGIN): helpers that must run
    inside a caller's transaction, such as ``record_owed``, take the
    connection and do not open one.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def apply_migrations(conn: sqlite3.Connection) -> list[int]:
    """Apply every registered migration not yet applied; returns those applied."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY)")
    done = {int(r[0]) for r in conn.execute("SELECT version FROM schema_migrations")}
    applied = []
    for version, sql in sorted(MIGRATIONS):
        if version in done:
            continue
        with transaction(conn):
            # executescript would COMMIT on its own; split statements instead.
            for stmt in _statements(sql):
                conn.execute(stmt)
            conn.execute("INSERT INTO schema_migrations (version) VALUES (?)", (version,))
        applied.append(version)
    return applied


def _statements(sql: str) -> list[str]:
    out, buf = [], ""
    for line in sql.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                out.append(buf.strip())
            buf = ""
    if buf.strip():
        raise ValueError(f"incomplete SQL statement in migration: {buf.strip()[:60]!r}")
    return out
