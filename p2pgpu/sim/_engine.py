"""The discrete-event engine: virtual time, one event queue, seeded streams, the trace.

Time is an integer number of microseconds since the start of the run, so
latencies such as 25 ms +-10 % spread events instead of piling them on the
same millisecond, and no float rounding can differ between machines.  An
event is ``(key, fn, arg)``, where ``key`` packs the time in the high bits and
a *seeded permutation* of the insertion counter in the low 40 bits: events
due at the same microsecond run in an order that depends on the seed (as in
TigerBeetle's VOPR, a sweep explores interleavings), yet the keys are unique,
so the queue never compares callbacks and one seed gives one order.

The queue is a calendar of time buckets (``2**bucket_bits`` us each, about a
millisecond): an event is appended to its bucket's list, a small binary heap
holds the numbers of the non-empty buckets, and the bucket due next is sorted
once (C's timsort over unique ints) and consumed from its end; an event due
within the bucket being consumed is inserted in place with ``bisect``.
Pushing is then O(1) and popping O(1) amortised plus a sort per bucket,
instead of the binary heap's O(log n) sift over every pending event, which
cost 5x at 100,000 pending events.  The order is the keys' order, exactly as
a heap would give it, so the queue changes no trace.  Keys are stored negated
so that the earliest event is at the end of the sorted list (``list.pop()``).

Randomness: :meth:`Engine.stream` derives an independent ``random.Random``
for any name (``"net"``, ``"node/17"``) from the run's seed, so adding a
random draw in one subsystem does not shift the draws of another.

The trace is the list of protocol-visible events (deliveries, joins and
crashes, core decisions), each a tuple of ints and strings; it is hashed in
order, ``repr`` by ``repr`` (deterministic for those types, unlike sets), into
the run's ``trace_hash``.
"""

from __future__ import annotations

import hashlib
import random
from bisect import insort
from collections.abc import Callable
from heapq import heappop, heappush
from typing import Any

_TIE_BITS = 40
_TIE_MASK = (1 << _TIE_BITS) - 1
#: log2 of a calendar bucket's width in microseconds (1,024 us)
bucket_bits = 10
_SHIFT = _TIE_BITS + bucket_bits
#: Events scheduled in one run at most (the tie-break counter's range).
events_scheduled_max = _TIE_MASK
_TRACE_FLUSH = 4096

Event = tuple[int, Callable[[Any], None], Any]  # (-key, fn, arg)


class SimulationStopped(Exception):
    """Raised inside a callback to end the run at once (an invariant broke)."""


class Engine:
    """Virtual clock, event calendar and the run's seeded streams."""

    __slots__ = (
        "_bheap",
        "_buckets",
        "_cur",
        "_cur_b",
        "_hash",
        "_mul",
        "_salt",
        "_seq",
        "_trace",
        "events_run",
        "now_us",
        "seed",
        "trace_records",
        "tracing",
    )

    def __init__(self, seed: int, *, tracing: bool = True) -> None:
        if not 0 <= seed < 2**63:
            raise ValueError("seed must be between 0 and 2**63 - 1")
        self.seed = seed
        self.now_us = 0
        #: the bucket being consumed: its events sorted by -key (earliest last)
        self._cur: list[Event] = []
        self._cur_b = -1
        #: every other non-empty bucket (all numbered above _cur_b), unsorted
        self._buckets: dict[int, list[Event]] = {}
        self._bheap: list[int] = []
        self._seq = 0
        tie = self.stream("engine/tiebreak")
        # (seq * odd + salt) mod 2**40 is a bijection: unique keys, seeded order.
        self._mul = tie.getrandbits(_TIE_BITS) | 1
        self._salt = tie.getrandbits(_TIE_BITS)
        self.events_run = 0
        self._trace: list[tuple[Any, ...]] = []
        self._hash = hashlib.sha256(b"p2pgpu-sim-trace/1\x00")
        self.trace_records = 0
        self.tracing = tracing

    # -- randomness -----------------------------------------------------
    def stream(self, name: str) -> random.Random:
        """An independent stream for ``name`` (str seeds hash with SHA-512,
        never with ``hash()``, so this is stable across processes)."""
        return random.Random(f"p2pgpu-sim/{self.seed}/{name}")

    # -- scheduling -------------------------------------------------------
    def at(self, t_us: int, fn: Callable[[Any], None], arg: Any = None) -> None:
        """Run ``fn(arg)`` at virtual time ``t_us`` (never in the past)."""
        if t_us < self.now_us:  # noqa: PLR1730 (hot path: no call)
            t_us = self.now_us
        seq = self._seq = self._seq + 1
        key = (t_us << _TIE_BITS) | ((seq * self._mul + self._salt) & _TIE_MASK)
        b = t_us >> bucket_bits
        if b == self._cur_b:
            insort(self._cur, (-key, fn, arg))
            return
        lst = self._buckets.get(b)
        if lst is None:
            self._new_bucket(b, (-key, fn, arg))
        else:
            lst.append((-key, fn, arg))

    def push_key(self, key: int, fn: Callable[[Any], None], arg: Any) -> None:
        """Queue an event whose key the caller packed (``Network.send`` inlines
        :meth:`at` and calls this only for a bucket that is not the open one)."""
        b = key >> _SHIFT
        if b == self._cur_b:
            insort(self._cur, (-key, fn, arg))
            return
        lst = self._buckets.get(b)
        if lst is None:
            self._new_bucket(b, (-key, fn, arg))
        else:
            lst.append((-key, fn, arg))

    def _new_bucket(self, b: int, ev: Event) -> None:
        if b < self._cur_b:
            # Earlier than the bucket being consumed.  Defensive: run_until
            # opens a bucket only when it starts before the end, so the
            # clock never stops before the open bucket; should that change,
            # the open bucket goes back among the others and none is open.
            if self._cur:
                self._buckets[self._cur_b] = self._cur
                heappush(self._bheap, self._cur_b)
            self._cur = []
            self._cur_b = -1
        self._buckets[b] = [ev]
        heappush(self._bheap, b)

    def after(self, delay_us: int, fn: Callable[[Any], None], arg: Any = None) -> None:
        self.at(self.now_us + max(0, delay_us), fn, arg)

    def run_until(self, end_us: int, *, progress: Callable[[int], None] | None = None,
                  progress_every_us: int = 1_000_000) -> None:
        """Run events due before ``end_us``; the clock then reads ``end_us``."""
        buckets = self._buckets
        bheap = self._bheap
        end_key = end_us << _TIE_BITS
        neg_end = -end_key
        next_report = self.now_us + progress_every_us if progress else end_us + 1
        cur = self._cur
        n = 0
        try:
            while True:
                if not cur:
                    if not bheap or (bheap[0] << _SHIFT) >= end_key:
                        break
                    b = heappop(bheap)
                    cur = buckets.pop(b)
                    cur.sort()
                    self._cur = cur
                    self._cur_b = b
                if cur[-1][0] <= neg_end:
                    break
                nkey, fn, arg = cur.pop()
                now = (-nkey) >> _TIE_BITS
                self.now_us = now
                fn(arg)
                n += 1
                if now >= next_report:
                    assert progress is not None
                    self.events_run += n
                    n = 0
                    progress(now)
                    next_report = now + progress_every_us
        finally:
            self.events_run += n
        self.now_us = max(self.now_us, end_us)

    @property
    def pending(self) -> int:
        return len(self._cur) + sum(len(b) for b in self._buckets.values())

    # -- the canonical trace ------------------------------------------------
    def trace(self, *record: Any) -> None:
        """Append one record ``(kind, ...)``; the time is added here."""
        if self.tracing:
            self._trace.append((self.now_us, *record))
            if len(self._trace) >= _TRACE_FLUSH:
                self._flush()

    def _flush(self) -> None:
        if self._trace:
            self._hash.update(repr(self._trace).encode())
            self.trace_records += len(self._trace)
            self._trace = []

    def trace_hash(self) -> str:
        self._flush()
        return self._hash.hexdigest()
