"""A crashing daemon loop is logged, counted and restarted with backoff (#12.2).

Before: one exception in any of the node's loops (the advert loop, when its
own advert was refused by a full book) ended the nursery and the daemon.
On trio's MockClock the restarts happen at exact virtual times.
"""

from __future__ import annotations

from collections import Counter

import pytest
import trio
import trio.testing

from p2pgpu.node._supervise import Backoff, supervise


def test_crashes_restart_with_doubling_backoff_then_a_return_ends_it() -> None:
    counts: Counter[str] = Counter()
    starts: list[float] = []

    async def crashing() -> None:
        starts.append(trio.current_time())
        if len(starts) <= 4:
            raise RuntimeError("a bug in the loop")
        await trio.sleep(100)  # runs fine for a while, then returns

    async def main() -> None:
        await supervise("crashing", crashing, counts, Backoff(backoff_s_min=1, backoff_s_max=4))

    clock = trio.testing.MockClock(autojump_threshold=0)
    trio.run(main, clock=clock)
    assert starts == [0, 1, 3, 7, 11]  # waits 1, 2, 4, then capped at 4
    assert counts == {"loop_crashed:crashing": 4}  # and the run ended: a loop that returns is done


def test_a_long_healthy_run_resets_the_backoff() -> None:
    counts: Counter[str] = Counter()
    starts: list[float] = []

    async def sometimes() -> None:
        starts.append(trio.current_time())
        if len(starts) in (3, 4):
            await trio.sleep(50)  # healthy for 50 s, then crashes
        if len(starts) < 6:
            raise ValueError("boom")

    async def main() -> None:
        await supervise("s", sometimes, counts, Backoff(backoff_s_min=1, backoff_s_max=60, healthy_after_s=30))

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    # 0 crash, +1: 1 crash, +2: 3 (healthy 50 s) crash at 53, backoff back to 1: 54 (healthy) crash
    # at 104, again 1: 105 crash, +2: 107 returns.
    assert starts == [0, 1, 3, 54, 105, 107]
    assert counts["loop_crashed:s"] == 5


def test_cancellation_is_not_caught() -> None:
    counts: Counter[str] = Counter()

    async def forever() -> None:
        await trio.sleep_forever()

    async def main() -> None:
        with trio.move_on_after(5):
            await supervise("f", forever, counts)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert counts == {}


def test_base_exceptions_pass_through() -> None:
    async def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trio.run(supervise, "k", interrupted, Counter())
