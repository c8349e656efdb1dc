"""#12.6: a sandbox outlived its node (``kill -9``), and a restarted node ran the job beside it.

Real bubblewrap sandboxes started by a real process (``job_node_stub.py``,
which runs one job through ``run_job`` exactly as the node does), killed
with SIGKILL.  Before the fix bubblewrap ran under ``timeout`` and kept
running (and writing) for the job's whole time limit after its node died.
Now the job keeper notices the node's death at once, kills the sandbox and
removes its disk; and if even the keeper is stopped, the node's next start
(``reap_leftovers``) finishes the job and cleans up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2pgpu.runtime import check_sandbox
from p2pgpu.runtime._leftovers import RECORD_NAME, reap_leftovers

pytestmark = pytest.mark.skipif(check_sandbox() is not None, reason=f"no sandbox here: {check_sandbox()}")
STUB = Path(__file__).with_name("job_node_stub.py")


def processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                continue
    return found


def wait_for(predicate: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def start_stub(tmp_path: Path, marker: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
    job = tmp_path / "jobs" / "j1"
    (job / "work").mkdir(parents=True)
    state = job / RECORD_NAME
    scratch_root = tmp_path / "scratch"
    stub = subprocess.Popen([sys.executable, str(STUB), str(state), str(job / "work"), str(scratch_root), marker])
    wait_for(lambda: processes_with(marker) and state.exists() and "keeper_pid" in state.read_text(), 30,
             "the job to start")
    return stub, state, scratch_root


def test_sandbox_dies_with_its_node_killed_9(tmp_path: Path) -> None:
    marker = "4321.0987"
    stub, state, scratch_root = start_stub(tmp_path, marker)
    scratch = Path(json.loads(state.read_text())["scratch"])
    assert scratch.exists()
    stub.send_signal(signal.SIGKILL)
    stub.wait()
    # Before the fix the job ran on for its whole time limit (10 minutes).
    wait_for(lambda: not processes_with(marker), 15, "the orphaned sandbox to die")
    wait_for(lambda: not scratch.exists(), 15, "the orphaned job's disk to be removed")
    assert list(scratch_root.iterdir()) == []


def test_restart_stops_a_previous_lifes_sandbox_and_removes_its_disk(tmp_path: Path) -> None:
    marker = "4322.0987"
    stub, state, _scratch_root = start_stub(tmp_path, marker)
    doc = json.loads(state.read_text())
    keeper, scratch, mount = doc["keeper_pid"], Path(doc["scratch"]), doc["mount"]
    # Even the keeper cannot act (stopped), then the node dies: everything is left.
    os.kill(keeper, signal.SIGSTOP)
    stub.send_signal(signal.SIGKILL)
    stub.wait()
    time.sleep(0.5)
    assert processes_with(marker) and scratch.exists()
    done = reap_leftovers(tmp_path / "jobs")  # what the restarted node does first
    assert any("stopped keeper" in line for line in done), done
    wait_for(lambda: not processes_with(marker), 15, "the previous life's sandbox to die")
    assert not scratch.exists() and not (mount and os.path.ismount(mount))
    assert not state.exists()
    assert reap_leftovers(tmp_path / "jobs") == []


def test_a_record_never_touches_a_reused_pid(tmp_path: Path) -> None:
    # A record whose keeper pid now belongs to another process (start time differs).
    other = subprocess.Popen(["sleep", "30"])
    try:
        job = tmp_path / "jobs" / "j2"
        job.mkdir(parents=True)
        (job / RECORD_NAME).write_text(json.dumps({"keeper_pid": other.pid, "keeper_start": 1, "cgroups": [],
                                                   "scratch": str(tmp_path / "not-a-job"), "mount": ""}))
        (tmp_path / "not-a-job").mkdir()
        assert reap_leftovers(tmp_path / "jobs") == []
        assert other.poll() is None and (tmp_path / "not-a-job").exists()
        assert not (job / RECORD_NAME).exists()
    finally:
        other.kill()
        other.wait()
