"""#12.9: an honest worker went unpaid because cleaning up after its time limit was slow.

A job that leaves a huge tree (300,000 empty directories in the report)
and is killed at its time limit.  The node walked that tree in its event
loop (the watchdog, then the outputs), so ``status`` stalled for seconds,
and it took the run's end time only after hashing: the proof's duration
passed the limit plus its tolerance and the submitter refused it.  Now the
end time is taken when the sandbox dies (``SandboxResult.ended_at_ms``) and
every walk, copy and removal runs in a worker thread.  The event loop is
checked with a trio instrument that measures the CPU time of each task step
(CPU, not wall time, so a busy machine cannot fail the test).
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import pytest
import trio
from job_attack_helpers import job, run_lines

from p2pgpu.runtime import SandboxPolicy, check_sandbox

pytestmark = pytest.mark.skipif(check_sandbox() is not None, reason=f"no sandbox here: {check_sandbox()}")

def many_dirs(n: int) -> str:
    return f"seq -f e%g 1 {n} | xargs mkdir && echo made; sleep 3600"


class StepTimer(trio.abc.Instrument):
    """The longest CPU time any task step took in the event loop's thread."""

    def __init__(self) -> None:
        self.longest_s = 0.0
        self.task = ""
        self._t0 = time.thread_time()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._t0 = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        took = time.thread_time() - self._t0
        if took > self.longest_s:
            self.longest_s, self.task = took, repr(task.coro)


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


# The plain-directory backend is much slower to fill and to empty (a journal
# on the host's disk, one rmdir per entry): fewer entries, still seconds of walking.
@pytest.mark.parametrize("backend,entries", [("loop", 60_000), pytest.param("dir", 30_000, marks=pytest.mark.slow)])
async def test_a_huge_tree_at_the_time_limit_blocks_nothing_and_ends_on_time(tmp_path: Path, backend: str,
                                                                            entries: int) -> None:
    limit_ms = 20_000
    timer = StepTimer()
    # The walks allocate (in their threads) enough to trigger full garbage
    # collections, which run in whichever thread allocates next: freezing
    # the test process's own heap keeps those out of the measure.
    gc.freeze()
    trio.lowlevel.add_instrument(timer)
    try:
        began = wall_ms()
        res, lines = await run_lines(job(tmp_path, many_dirs(entries), time_limit_ms=limit_ms),
                                     SandboxPolicy(disk_backend=backend, scratch_root=tmp_path / "scratch"),
                                     now_ms=wall_ms)
        returned = wall_ms()
    finally:
        trio.lowlevel.remove_instrument(timer)
        gc.unfreeze()
    assert lines == [b"made"], "the job did not get to make its tree (the machine is very slow?)"
    assert res.reason == "time_limit" and res.exit_code == 137
    # The end is when the sandbox died, not after the tree was walked and removed.
    assert 0 < res.ended_at_ms - began <= limit_ms + 3_000, res.ended_at_ms - began
    assert res.ended_at_ms <= returned
    # No step of the event loop did the walking: that many entries take seconds.
    assert timer.longest_s < 0.1, f"one event-loop step took {timer.longest_s:.2f} s of CPU: {timer.task}"
