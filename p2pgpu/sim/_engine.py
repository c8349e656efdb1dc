"""The discrete-event engine: virtual time, one event heap, seeded streams, the trace.

Time is an integer number of microseconds since the start of the run, so
latencies such as 25 ms +-10 % spread events instead of piling them on the
same millisecond, and no float rounding can differ between machines.  An
event is ``(key, fn, arg)`` on a binary heap, where ``key`` packs the time in
the high bits and a *seeded permutation* of the insertion counter in the low
40 bits: events due at the same microsecond run in an order that depends on
the seed (as in TigerBeetle's VOPR, a sweep explores interleavings), yet the
keys are unique, so the heap never compares callbacks and one seed gives one
order.  Packing both into one ``int`` keeps the inner loop at about a million
events per second in CPython.

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
import heapq
import random
from collections.abc import Callable
from typing import Any

_TIE_BITS = 40
_TIE_MASK = (1 << _TIE_BITS) - 1
#: Events scheduled in one run at most (the tie-break counter's range).
events_scheduled_max = _TIE_MASK
_TRACE_FLUSH = 4096


class SimulationStopped(Exception):
    """Raised inside a callback to end the run at once (an invariant broke)."""


class Engine:
    """Virtual clock, event heap and the run's seeded streams."""

    __slots__ = (
        "_hash",
        "_heap",
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
        self._heap: list[tuple[int, Callable[[Any], None], Any]] = []
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
        self._seq += 1
        heapq.heappush(self._heap, ((t_us << _TIE_BITS) | ((self._seq * self._mul + self._salt) & _TIE_MASK),
                                    fn, arg))

    def after(self, delay_us: int, fn: Callable[[Any], None], arg: Any = None) -> None:
        self.at(self.now_us + max(0, delay_us), fn, arg)

    def run_until(self, end_us: int, *, progress: Callable[[int], None] | None = None,
                  progress_every_us: int = 1_000_000) -> None:
        """Run events due before ``end_us``; the clock then reads ``end_us``."""
        heap = self._heap
        pop = heapq.heappop
        end_key = end_us << _TIE_BITS
        next_report = self.now_us + progress_every_us if progress else end_us + 1
        n = 0
        try:
            while heap and heap[0][0] < end_key:
                key, fn, arg = pop(heap)
                now = key >> _TIE_BITS
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
        return len(self._heap)

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
