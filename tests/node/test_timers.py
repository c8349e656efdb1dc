"""The node's timers for the cores (``node/_timers.py``): typed keys, replace
on set, earliest first, on trio's mock clock."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from p2pgpu.core import LocalProtocolError, TimerKey, TimerOwner
from p2pgpu.node import _timers
from p2pgpu.node._timers import Timers


def key(job: str, name: str = "t") -> TimerKey:
    return TimerKey(TimerOwner.FORMATION, job, name)


def test_pop_due_earliest_first_replaced_and_cancelled_skipped() -> None:
    t = Timers(lambda: 0)
    t.set(key("a"), 30)
    t.set(key("b"), 10)
    t.set(key("c"), 20)
    t.set(key("b"), 40)  # replaced: its first deadline no longer counts
    t.cancel(key("c"))
    assert t.pop_due(25) is None
    assert t.pop_due(35) == key("a")
    assert t.pop_due(35) is None
    assert t.pop_due(40) == key("b") and len(t) == 0 and t.next_at() is None


def test_limit_on_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_timers, "timers_max", 2)
    t = Timers(lambda: 0)
    t.set(key("a"), 1)
    t.set(key("b"), 1)
    t.set(key("a"), 5)  # replacing is not a new key
    with pytest.raises(LocalProtocolError):
        t.set(key("c"), 1)


def test_stale_entries_do_not_pile_up() -> None:
    t = Timers(lambda: 0)
    for i in range(10_000):
        t.set(key("a"), i)
    assert len(t) == 1 and len(t._heap) < 100


async def test_run_fires_at_the_deadline(autojump_clock: Any) -> None:
    fired: list[tuple[TimerKey, int]] = []
    t = Timers(lambda: int(trio.current_time() * 1000))
    async with trio.open_nursery() as n:
        n.start_soon(t.run, lambda k, now: fired.append((k, now)))
        t.set(key("a"), 500)
        t.set(key("b"), 200)
        await trio.sleep(0.1)
        t.set(key("b"), 300)
        await trio.sleep(1)
        n.cancel_scope.cancel()
    assert fired == [(key("b"), 300), (key("a"), 500)]
