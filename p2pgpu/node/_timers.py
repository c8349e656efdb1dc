"""Named timers for the pure cores, on trio.

Cores ask for ``SetTimer(key, at_ms)`` / ``CancelTimer(key)`` in wall-clock
milliseconds (the same ``now_ms`` they are given), keys being typed
``TimerKey`` values; :class:`Timers` keeps one deadline per key and one task
sleeps until the earliest, then calls ``fire(key, now_ms)``.  Setting a key
again replaces its deadline, as the action's contract says.  Deadlines sit in
a heap (a replaced or cancelled entry is skipped when it surfaces), so a
node with thousands of pending timers pays O(log n) per timer, not a scan of
them all.  Bounded: at most ``timers_max`` keys.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

import trio

from p2pgpu.core import LocalProtocolError, TimerKey

timers_max = 100_000


class Timers:
    def __init__(self, now_ms: Callable[[], int]) -> None:
        self.now_ms = now_ms
        #: key -> its deadline (the one that counts).
        self._due: dict[TimerKey, int] = {}
        #: (deadline, key) of every set, stale ones included until they surface.
        self._heap: list[tuple[int, TimerKey]] = []
        self._changed = trio.Event()

    def __len__(self) -> int:
        return len(self._due)

    def due(self) -> dict[TimerKey, int]:
        """Every pending key and its deadline (a copy)."""
        return dict(self._due)

    def set(self, key: TimerKey, at_ms: int) -> None:
        if key not in self._due and len(self._due) >= timers_max:
            raise LocalProtocolError(f"more than {timers_max} timers pending")
        self._due[key] = at_ms
        heapq.heappush(self._heap, (at_ms, key))
        if len(self._heap) > 4 * len(self._due) + 64:
            self._heap = [(at, k) for k, at in self._due.items()]
            heapq.heapify(self._heap)
        self._changed.set()

    def cancel(self, key: TimerKey) -> None:
        if self._due.pop(key, None) is not None:
            self._changed.set()

    def pop_due(self, now_ms: int) -> TimerKey | None:
        """The earliest key due at ``now_ms`` (removed), or ``None``."""
        heap = self._heap
        while heap:
            at_ms, key = heap[0]
            if self._due.get(key) != at_ms:
                heapq.heappop(heap)  # replaced or cancelled since
                continue
            if at_ms > now_ms:
                return None
            heapq.heappop(heap)
            del self._due[key]
            return key
        return None

    def next_at(self) -> int | None:
        heap = self._heap
        while heap and self._due.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    async def run(self, fire: Callable[[TimerKey, int], None]) -> None:
        while True:
            at_ms = self.next_at()
            if at_ms is None:
                await self._changed.wait()
                self._changed = trio.Event()
                continue
            now = self.now_ms()
            if at_ms > now:
                with trio.move_on_after((at_ms - now) / 1000):
                    await self._changed.wait()
                if self._changed.is_set():
                    self._changed = trio.Event()
                continue
            key = self.pop_due(now)
            if key is not None:
                fire(key, now)
            await trio.lowlevel.checkpoint()
