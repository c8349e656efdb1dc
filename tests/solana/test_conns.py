"""The ledger server's connection table: a full table makes room by closing
the longest-idle connection, never by refusing the newcomer (#18.7)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from p2pgpu.solana._conns import Conn, ConnectionTable


def _table(capacity: int, n: int) -> tuple[ConnectionTable, list[str], list[Conn]]:
    closed: list[str] = []
    t = ConnectionTable(capacity)

    def closer(i: int) -> Callable[[], None]:
        return lambda: closed.append(f"c{i}")

    conns = [t.admit(kind="http", close=closer(i), now=float(i))[0] for i in range(n)]
    return t, closed, conns


def test_below_capacity_nobody_is_evicted() -> None:
    t, _, _ = _table(3, 3)
    assert len(t) == 3 and t.evicted == 0


def test_a_full_table_evicts_the_longest_idle_and_admits_the_newcomer() -> None:
    t, closed, conns = _table(3, 3)
    t.touch(conns[0], busy=False, now=10.0)  # c0 was used recently: c1 is now the longest idle
    _, victim = t.admit(kind="http", close=lambda: None, now=11.0)
    assert victim is conns[1]
    assert closed == []  # the table only names the victim: the driver closes it
    assert len(t) == 3 and t.evicted == 1
    assert t.victim() is conns[2]


def test_busy_connections_go_only_when_no_idle_one_is_left() -> None:
    t, _, conns = _table(2, 2)
    t.touch(conns[0], busy=True, now=5.0)
    t.touch(conns[1], busy=True, now=6.0)
    _, victim = t.admit(kind="ws", close=lambda: None, now=7.0)
    assert victim is conns[0]  # least recently active of the busy ones
    new_conn = t.victim()
    assert new_conn is not None and new_conn.kind == "ws"  # the idle newcomer is next, before the busy c1


def test_a_flood_of_newcomers_pushes_out_old_holders_first() -> None:
    t, _, conns = _table(100, 100)
    honest, first = t.admit(kind="http", close=lambda: None, now=100.0)
    assert first is conns[0]
    evicted = [t.admit(kind="http", close=lambda: None, now=101.0 + i)[1] for i in range(99)]
    assert evicted == conns[1:100]  # the old holders, oldest first
    assert t.victim() is honest  # 99 newer connections came after it and it is still held


def test_touching_or_releasing_an_evicted_connection_is_harmless() -> None:
    t, _, conns = _table(1, 1)
    _, victim = t.admit(kind="http", close=lambda: None, now=1.0)
    assert victim is conns[0]
    t.touch(conns[0], busy=True, now=2.0)  # its task may still report activity on its way out
    t.release(conns[0])
    assert len(t) == 1


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ConnectionTable(0)
