"""A failed job always says why, in the record ``job status`` and the devnet summary read.

Before: a job whose command failed, or that was stopped at its time limit,
settled as ``failed`` with the reason ``12D3KooW...: owed`` (the verdict on
its proof, which was valid), and the devnet summary printed only
``devnet FAILED: 1 job(s) failed: <id>``.  The words come from the
settlement core (``core/_settlement.py``), the same in the simulator.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pgpu.cli._devnet import _human
from p2pgpu.localnet import LocalNet

pytestmark = pytest.mark.processes
ONE_GPU = [("NVIDIA L4", 23034, "8.9", 1)]


def manifest(name: str, command: str, duration_s: int) -> str:
    return f"""
name = "{name}"
[requirements]
nodes = 1
gpus_per_node = 1
[runtime]
command = ["sh", "-c", "{command}"]
duration_s_max = {duration_s}
[payment]
price_per_gpu_hour_max = 36000000
"""


def run_to_end(net: LocalNet, text: str) -> dict[str, object]:
    job = net.nodes[0].call("job.submit", {"manifest": text})["job_id"]

    def ended() -> dict[str, object] | None:
        doc: dict[str, object] = net.nodes[0].call("job.status", {"job_id": job})
        return doc if doc["state"] in ("succeeded", "failed") else None

    done: dict[str, object] = net.wait_until(ended, timeout_s=120, what=f"job {job[:12]} to end")
    return done


def test_a_failed_command_and_a_time_limit_say_why(tmp_path: Path) -> None:
    with LocalNet(tmp_path, 1, gpu_mix=ONE_GPU) as net:
        failed = run_to_end(net, manifest("fails", "echo nope; exit 3", 30))
        worker = net.nodes[0].peer_id[:12]
        assert failed["state"] == "failed"
        assert failed["reason"] == f"member 0 ({worker}): the command exited with code 3", failed
        slow = run_to_end(net, manifest("slow", "sleep 60", 2))
        assert slow["state"] == "failed"
        assert slow["reason"] == f"member 0 ({worker}): time limit reached", slow
        proofs = slow["proofs"]
        assert isinstance(proofs, list) and proofs[0]["end_reason"] == "time_limit"


def test_devnet_summary_prints_each_failed_jobs_reason() -> None:
    doc = {"ok": False, "dir": "/tmp/x", "error": "1 job(s) failed: 0d8685301b7f (hello): 12D3KooWAbc: the command "
                                                  "failed (exit code 3)",
           "jobs": [{"job_id": "0d8685301b7f41094cc6", "name": "hello", "state": "failed",
                     "reason": "12D3KooWAbc: the command failed (exit code 3)"},
                    {"job_id": "6babef15a96ef1440013", "name": "pair", "state": "succeeded", "reason": ""}]}
    text = _human(doc)
    assert "  job 0d8685301b7f hello       failed: 12D3KooWAbc: the command failed (exit code 3)" in text
    assert "6babef15a96e" not in text
    assert text.endswith("logs: /tmp/x")
