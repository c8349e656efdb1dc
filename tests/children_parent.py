"""A parent process for tests/test_children.py: starts children three ways,
prints their pids as one JSON line, then waits to be killed.

* ``thread``: :func:`p2pgpu.children.spawn` called from a thread that exits at once;
* ``trio``: :func:`p2pgpu.children.open_process` under trio, after which trio's
  worker threads are made to retire (their idle timeout is lowered to 0.2 s);
* ``trap``: the naive way, ``trio.lowlevel.open_process`` with a parent-death
  signal set in ``preexec_fn``: forked by a trio worker thread, it is killed
  when that thread retires.  It shows that the test can see the trap.
"""

from __future__ import annotations

import ctypes
import json
import signal
import subprocess
import sys
import threading

import trio
import trio._core._thread_cache as thread_cache

from p2pgpu import children


def _naive_pdeathsig() -> None:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)


async def main() -> None:
    pids: dict[str, int] = {}

    def in_thread() -> None:
        pids["thread"] = children.spawn(["sleep", "300"]).pid

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    thread_cache.IDLE_TIMEOUT = 0.2  # type: ignore[assignment]
    proc = await children.open_process(["sh", "-c", "echo ready; exec sleep 300"], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    pids["trio_says"] = len(await proc.stdout.receive_some(100))
    pids["trio"] = proc.pid
    trap = await trio.lowlevel.open_process(["sleep", "300"], preexec_fn=_naive_pdeathsig)
    pids["trap"] = trap.pid
    await trio.sleep(1.0)  # trio's worker threads retire meanwhile
    print(json.dumps(pids), flush=True)
    await trio.sleep(300)


if __name__ == "__main__":
    sys.exit(trio.run(main))
