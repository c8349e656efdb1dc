"""Named timers for the pure cores, on trio.

Cores ask for ``SetTimer(key, at_ms)`` / ``CancelTimer(key)`` in wall-clock
milliseconds (the same ``now_ms`` they are given); :class:`Timers` keeps one
deadline per key and one task sleeps until the earliest, then calls
``fire(key, now_ms)``.  Setting a key again replaces its deadline, as the
action's contract says.  Bounded: at most ``timers_max`` keys.
"""

from __future__ import annotations

from typing import Callable

import trio

from p2pgpu.core import LocalProtocolError

timers_max = 100_000


class Timers:
    def __init__(self, now_ms: Callable[[], int]) -> None:
        self.now_ms = now_ms
        self._due: dict[str, int] = {}
        self._changed = trio.Event()

    def __len__(self) -> int:
        return len(self._due)

    def set(self, key: str, at_ms: int) -> None:
        if key not in self._due and len(self._due) >= timers_max:
            raise LocalProtocolError(f"more than {timers_max} timers pending")
        self._due[key] = at_ms
        self._changed.set()

    def cancel(self, key: str) -> None:
        if self._due.pop(key, None) is not None:
            self._changed.set()

    async def run(self, fire: Callable[[str, int], None]) -> None:
        while True:
            if not self._due:
                await self._changed.wait()
                self._changed = trio.Event()
                continue
            key, at_ms = min(self._due.items(), key=lambda kv: (kv[1], kv[0]))
            now = self.now_ms()
            if at_ms > now:
                with trio.move_on_after((at_ms - now) / 1000):
                    await self._changed.wait()
                if self._changed.is_set():
                    self._changed = trio.Event()
                continue
            del self._due[key]
            fire(key, now)
            await trio.lowlevel.checkpoint()
