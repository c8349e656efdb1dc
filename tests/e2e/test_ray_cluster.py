"""A ``ray`` job on a cluster formed by real node processes (issue 8).

Two confirmed members become one Ray cluster (head on rank 0, the other
joins through the rendezvous the head sends it), each member's Ray in its
own sandbox on the job's own network, the entrypoint sees two Ray nodes and
runs a task on each, the submitter receives its output, and no Ray process
is left afterwards.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from p2pgpu.localnet import LocalNet
from p2pgpu.runtime import ray_unavailable

# Job networks and Ray on this machine: these tests assert that none is left (system-wide), so they
# take turns with every other test that makes them (tests/conftest.py, docs/testing.md).
pytestmark = [pytest.mark.processes, pytest.mark.exclusive("job-networks"),
              pytest.mark.skipif(ray_unavailable(enabled=True) is not None,
                                 reason=f"{ray_unavailable(enabled=True)}")]

ENTRYPOINT = r'''
import os, ray
ray.init()
alive = [n for n in ray.nodes() if n["Alive"]]
world = int(os.environ["P2PGPU_WORLD_SIZE"])
assert len(alive) == world, alive
@ray.remote(num_cpus=0)
def where(rank):
    return rank, ray.get_runtime_context().get_node_id()
got = ray.get([where.options(resources={f"p2pgpu_member_{r}": 0.01}).remote(r) for r in range(world)])
assert len({n for _, n in got}) == world, got
print(f"saw {len(alive)} ray nodes, tasks ran on {len({n for _, n in got})}", flush=True)
'''

MANIFEST = f'''
name = "ray-pair"
[requirements]
nodes = 2
gpus_per_node = 1
[runtime]
kind = "ray"
command = ["python3", "-c", {json.dumps(ENTRYPOINT)}]
duration_s_max = 300
[payment]
price_per_gpu_hour_max = 10000000
'''


def ray_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if "raylet" in ln or "gcs_server" in ln]


def test_two_member_ray_cluster_runs_the_entrypoint_and_leaves_nothing(tmp_path: Path) -> None:
    assert not ray_processes(), "a Ray process from elsewhere is running"
    # Ray jobs are off unless the operator turns them on (docs/ray.md).
    with LocalNet(tmp_path, 3, gpu_mix=[("NVIDIA L4", 23034, "8.9", 1)],
                  config_extra="allow_ray_jobs = true") as net:
        job = net.nodes[0].call("job.submit", {"manifest": MANIFEST})["job_id"]
        doc = net.wait_until(lambda: (lambda d: d if d["state"] in ("succeeded", "failed") else None)(
            net.nodes[0].call("job.status", {"job_id": job})), timeout_s=420, what="the ray job to end")
        logs = net.nodes[0].call("job.logs", {"job_id": job})
        member_logs = {n.index: n.call("job.logs", {"job_id": job}) for n in net.nodes[1:]}
        assert doc["state"] == "succeeded", (doc, logs[-20:], member_logs)
        assert len(doc["cluster"]["members"]) == 2
        assert any(ln["line"] == "saw 2 ray nodes, tasks ran on 2" for ln in logs), logs[-20:]
        assert all(p["status"] == "owed" for p in doc["proofs"]), doc["proofs"]
        net.wait_until(lambda: not ray_processes(), timeout_s=60, what="every Ray process to be gone")
