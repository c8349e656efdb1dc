"""#12.8, #12.9 and the time-limit reason, through real node processes.

- #12.9: an honest job that leaves a huge tree and is killed at its time
  limit is paid: its proof's end is when the sandbox died (within the limit
  plus the verifier's 5 s tolerance), not after the tree was walked, and the
  submitter's reason names the time limit (it said "owed").
- #12.8: a job that nests directories past PATH_MAX ends with a reason and a
  proof on the worker, instead of "internal error" and a worker stuck in
  ``running``.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from p2pgpu.localnet import LocalNet, NodeProc
from p2pgpu.node import ControlError
from p2pgpu.runtime import check_sandbox

pytestmark = [pytest.mark.processes,
              pytest.mark.skipif(check_sandbox() is not None, reason=f"no sandbox here: {check_sandbox()}")]

ONE_GPU = [("NVIDIA L4", 23034, "8.9", 1)]
DEAR = {0: "price_per_gpu_hour = 360000000"}
DEEP = r"""
import os
for i in range(40):
    os.mkdir("d" * 200)
    os.chdir("d" * 200)
open("bottom.txt", "w").write("deep")
print("nested", flush=True)
"""


def manifest(name: str, command: list[str], duration_s: int) -> str:
    return f"""
name = "{name}"
[requirements]
nodes = 1
gpus_per_node = 1
[runtime]
command = {json.dumps(command)}
duration_s_max = {duration_s}
[payment]
price_per_gpu_hour_max = 36000000
"""


def ended(doc: dict[str, Any], key: str) -> dict[str, Any] | None:
    """``doc`` once its ``key`` (state or member_state) says the job ended."""
    return doc if doc.get(key) in ("succeeded", "failed") else None


def status(node: NodeProc, job_id: str) -> dict[str, Any]:
    try:
        doc = node.call("job.status", {"job_id": job_id})
    except ControlError:
        return {}
    return doc if isinstance(doc, dict) else {}


def settled(net: LocalNet, job_id: str, timeout_s: float = 120) -> dict[str, Any]:
    doc: dict[str, Any] = net.wait_until(lambda: ended(status(net.nodes[0], job_id), "state"), timeout_s=timeout_s,
                          what=f"job {job_id[:12]} to settle")
    return doc


def test_time_limited_job_with_a_huge_tree_is_paid_and_its_reason_is_the_limit(tmp_path: Path) -> None:
    with LocalNet(tmp_path, 2, gpu_mix=ONE_GPU, node_config=DEAR) as net:
        net.wait_until(lambda: net.nodes[0].call("status")["peers"] >= 1, timeout_s=30, what="a connection")
        worker = net.nodes[1]
        job = net.nodes[0].call("job.submit", {"manifest": manifest(
            "big-tree", ["sh", "-c", "seq -f e%g 1 60000 | xargs mkdir && echo made; sleep 3600"], 15)})["job_id"]
        doc = settled(net, job, timeout_s=180)
        (proof,) = doc["proofs"]
        assert proof["status"] == "owed" and proof["amount"] > 0, (proof, doc["reason"])
        assert proof["end_reason"] == "time_limit" and proof["exit_code"] == 137
        assert doc["state"] == "failed" and "time limit" in doc["reason"] and "owed" not in doc["reason"], doc
        mine = status(worker, job)
        assert mine["member_ended_at_ms"] - mine["member_started_at_ms"] <= 15_000 + 5_000
        assert mine["reason"] == "time_limit"
        net.terminate(0, sig=signal.SIGTERM)


def test_paths_past_path_max_end_with_a_proof_not_a_stuck_worker(tmp_path: Path) -> None:
    with LocalNet(tmp_path, 2, gpu_mix=ONE_GPU, node_config=DEAR) as net:
        net.wait_until(lambda: net.nodes[0].call("status")["peers"] >= 1, timeout_s=30, what="a connection")
        worker = net.nodes[1]
        job = net.nodes[0].call("job.submit", {"manifest": manifest("deep", ["python3", "-c", DEEP], 60)})["job_id"]
        doc = settled(net, job)
        mine = status(worker, job)
        assert mine["member_state"] == "failed" and mine["state"] == "failed", mine
        assert "output_limit" in mine["reason"] or mine["reason"] == "output_limit", mine["reason"]
        assert worker.call("status")["jobs"].get("running", 0) == 0
        (proof,) = doc["proofs"]
        assert proof["end_reason"] == "output_limit" and proof["status"] == "owed", proof
        assert "internal error" not in json.dumps(mine)
