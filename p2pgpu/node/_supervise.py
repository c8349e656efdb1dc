"""Keep a daemon loop running: a crash is logged, counted and restarted.

One failing task must never take the daemon down (issue #12: a refused own
advert ended the advert loop, and with it the whole node).  :func:`supervise`
runs a loop; if it raises, the error is logged with its traceback, counted as
``loop_crashed:<name>`` in the node's counters (``status`` shows them) and the
loop starts again after a backoff that doubles per consecutive crash, from
``backoff_s_min`` to ``backoff_s_max``, and falls back to the minimum once a
run has lasted ``healthy_after_s``.  A loop that returns is done.
Cancellation (shutdown) is never caught: ``trio.Cancelled`` is a
``BaseException``.  Time is trio's clock, so tests run it on ``MockClock``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

log = logging.getLogger("p2pgpu.node")


@dataclass(frozen=True, kw_only=True)
class Backoff:
    backoff_s_min: float = 1.0
    backoff_s_max: float = 60.0
    healthy_after_s: float = 60.0


async def supervise(name: str, fn: Callable[[], Awaitable[None]], counts: Counter[str],
                    backoff: Backoff = Backoff()) -> None:
    delay = backoff.backoff_s_min
    while True:
        started = trio.current_time()
        try:
            await fn()
            return
        except Exception:  # any bug in one loop must not end the node: logged, counted, restarted
            counts[f"loop_crashed:{name}"] += 1
            if trio.current_time() - started >= backoff.healthy_after_s:
                delay = backoff.backoff_s_min
            log.exception("the %s loop failed (a bug: please report it); restarting it in %.0f s", name, delay)
        await trio.sleep(delay)
        delay = min(delay * 2, backoff.backoff_s_max)
