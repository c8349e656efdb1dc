"""p2pgpu.children: children die with their parent, whatever ends it (#12.5).

Real processes only: a parent process (``children_parent.py``) starts
children, the test kills it with SIGKILL, and /proc must show every child gone
within a bound.  The kernel's parent-death signal follows the *thread* that
forked; the tests check that a child survives the exit of the thread (or trio
worker thread) that asked for it, and that the naive way does not.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pgpu import children

HERE = Path(__file__).parent


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def _wait_dead(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def test_children_die_with_a_parent_killed_by_sigkill_but_not_with_the_thread_that_asked() -> None:
    parent = subprocess.Popen([sys.executable, str(HERE / "children_parent.py")], stdout=subprocess.PIPE, text=True)
    pids: dict[str, int] = {}
    try:
        assert parent.stdout is not None
        pids = json.loads(parent.stdout.readline())
        assert pids["trio_says"] == len("ready\n")  # open_process's pipes work like trio's
        assert not _alive(pids["trap"]), "the naive child should have died with trio's worker thread"
        assert _alive(pids["thread"]) and _alive(pids["trio"]), "a child died with the thread that started it"
        parent.kill()
        parent.wait()
        assert _wait_dead([pids["thread"], pids["trio"]], 5.0) == []
    finally:
        for key in ("thread", "trio", "trap"):
            if key in pids and _alive(pids[key]):
                os.kill(pids[key], signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
        parent.wait()
        assert parent.stdout is not None
        parent.stdout.close()


def test_a_parent_that_exits_normally_takes_its_children_too() -> None:
    code = ("import sys; from p2pgpu import children; "
            "p = children.spawn(['sleep', '300']); print(p.pid, flush=True)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert _wait_dead([int(out.stdout)], 5.0) == []


def test_stop_kills_the_group_of_a_child_that_ignores_sigterm() -> None:
    # The child ignores SIGTERM and starts a grandchild in its own group.
    proc = children.spawn(["sh", "-c", "trap '' TERM; sleep 300 & echo $!; wait"], stdout=subprocess.PIPE,
                          text=True)
    assert proc.stdout is not None
    grandchild = int(proc.stdout.readline())
    t0 = time.monotonic()
    code = children.stop(proc, grace_s=0.5)
    assert code == -signal.SIGKILL
    assert time.monotonic() - t0 < 5
    assert _wait_dead([grandchild], 5.0) == []
    proc.stdout.close()


def test_stop_all_shares_one_grace_and_lets_a_clean_child_exit_cleanly() -> None:
    clean = children.spawn(["sleep", "300"])
    stubborn = [children.spawn(["sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"]) for _ in range(3)]
    time.sleep(0.3)  # let the shells install their trap
    t0 = time.monotonic()
    children.stop_all([clean, *stubborn], grace_s=1.0)
    took = time.monotonic() - t0
    assert clean.returncode == -signal.SIGTERM
    assert [p.returncode for p in stubborn] == [-signal.SIGKILL] * 3
    assert took < 4, f"one shared grace, not one each: {took:.1f} s"


def test_spawn_refuses_a_preexec_fn_of_its_own() -> None:
    options: dict[str, Any] = {"preexec_fn": lambda: None}
    with pytest.raises(TypeError, match="preexec_fn"):
        children.spawn(["true"], **options)


def test_sigterm_as_interrupt_runs_the_cleanup_and_ignores_a_second_signal(tmp_path: Path) -> None:
    script = tmp_path / "stopper.py"
    script.write_text(
        "import sys, time\n"
        "from p2pgpu.children import sigterm_as_interrupt\n"
        "with sigterm_as_interrupt():\n"
        "    try:\n"
        "        print('ready', flush=True)\n"
        "        time.sleep(300)\n"
        "    except KeyboardInterrupt as exc:\n"
        "        print('cleanup', exc, flush=True)\n"
        "        time.sleep(1.0)\n"  # a second SIGTERM arrives here and must not cut the cleanup short
        "        print('cleaned', flush=True)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout.readline() == "cleanup stopped by SIGTERM\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout.readline() == "cleaned\n"
    assert proc.wait(timeout=10) == 0
    proc.stdout.close()


async def test_open_process_gives_a_trio_process() -> None:
    proc = await children.open_process(["sh", "-c", "cat; echo err >&2"], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert isinstance(proc, trio.Process)
    assert proc.stdin is not None and proc.stdout is not None
    await proc.stdin.send_all(b"hello\n")
    await proc.stdin.aclose()
    got = b""
    while chunk := await proc.stdout.receive_some(100):
        got += chunk
    assert got == b"hello\nerr\n"
    assert await proc.wait() == 0
    await proc.stdout.aclose()
