"""A submitter's local inputs stay pinned in its store while its job needs them.

``job submit`` with a local file copies it into the submitter's store, from
where the members fetch it.  It is pinned for the job (owner
``submit:<job id>``, a row in the store's SQLite index) so that eviction never
takes it while members may still fetch it; the pin survives a ``kill -9`` of
the submitter; it is released once the job ended (or, for a job a restart
interrupted, once no member can still run it).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from p2pgpu.core._fetch import input_pin_grace_ms, submitted_inputs_done
from p2pgpu.localnet import LocalNet

# Node 1 has two GPUs: the first job holds one for 600 s, the second job needs the other
# (with one GPU the second job found no volunteer: the first still ran).
MIX = [("NVIDIA L4", 23034, "8.9", 0), ("NVIDIA L4", 23034, "8.9", 2)]


def job(path: Path, seconds: int, duration_s_max: int = 60) -> str:
    return f"""
name = "pinned-input"
[requirements]
nodes = 1
[runtime]
command = ["sh", "-c", "sleep {seconds}; sha256sum \\"$P2PGPU_IN/data.bin\\""]
duration_s_max = {duration_s_max}
[inputs]
"data.bin" = {{ path = {json.dumps(str(path))} }}
[payment]
price_per_gpu_hour_max = 36000000
"""


def pins_of(net: LocalNet, sha: str) -> int:
    blobs = net.nodes[0].call("blobs.status")["blobs"]
    return next((b["pins"] for b in blobs if b["sha256"] == sha), -1)


@pytest.mark.processes
def test_local_inputs_are_pinned_for_the_job_across_a_crash_and_released_when_it_ends(tmp_path: Path) -> None:
    first, second = tmp_path / "first.bin", tmp_path / "second.bin"
    first.write_bytes(b"first input\n" * 100_000)
    second.write_bytes(b"second input\n" * 100_000)
    with LocalNet(tmp_path / "net", 2, gpu_mix=MIX) as net:
        net.wait_until(lambda: len(net.nodes[0].call("market")) >= 1, timeout_s=30, what="market")
        # Far longer than the rest of the test, however slow the machine: it must still run at the end.
        a = net.nodes[0].call("job.submit", {"manifest": job(first, 600, duration_s_max=900)})
        sha_a = a["inputs"][0]["sha256"]
        assert pins_of(net, sha_a) == 1  # pinned as soon as it is submitted
        # The submitter dies (kill -9) while its job runs: the pin is on disk.
        net.terminate(0, sig=signal.SIGKILL)
        net.nodes[0] = net.start_node(0, bootstrap=net.nodes[1].addrs)
        assert pins_of(net, sha_a) == 1
        # The restarted submitter sees node 1's free GPU (so it hands it the manifest directly).
        # Its second job once found no volunteer 3 runs in 7 (#13.1): killed before it confirmed
        # the first job, it forgot it while node 1 held a GPU for it under a lease, and at
        # holds_per_submitter_max node 1 offered for none of its other jobs (it now resumes a
        # job that was forming: tests/core/test_submitter_restart.py); once node 1 failed the
        # first job at once, its input's only source being down (it now asks again:
        # tests/node/test_inputs_source_retry.py).
        net.wait_until(lambda: any(r["gpus_free"] >= 1 for r in net.nodes[0].call("market")), timeout_s=60,
                       what="node 1's free GPU in the restarted submitter's market")
        # A job that ends releases its input's pin (the loop checks every 2 s).
        b = net.nodes[0].call("job.submit", {"manifest": job(second, 0)})
        sha_b = b["inputs"][0]["sha256"]
        assert pins_of(net, sha_b) == 1
        st = net.wait_until(lambda: (d := net.nodes[0].call("job.status", {"job_id": b["job_id"]}))["state"]
                            in ("succeeded", "failed") and d, timeout_s=90, what="second job ends")
        if st["state"] != "succeeded":
            # Say what both sides knew: the first job on each node and their formation counters.
            def formation_counters(i: int) -> dict[str, int]:
                return {k: v for k, v in net.nodes[i].call("status")["counters"].items()
                        if k.startswith(("formation", "jobs", "inputs", "host"))}
            raise AssertionError({"reason": st["reason"], "formation": st["formation"],
                                  "first_job_submitter": net.nodes[0].call("job.status", {"job_id": a["job_id"]}),
                                  "node1_jobs": net.nodes[1].call("job.list"),
                                  "node0_counters": formation_counters(0), "node1_counters": formation_counters(1)})
        net.wait_until(lambda: pins_of(net, sha_b) == 0, timeout_s=20, what="the ended job's pin released")
        # The interrupted first job is still running on its member: still pinned.
        assert pins_of(net, sha_a) == 1
        assert net.nodes[0].call("status")["counters"]["inputs:pins_released"] >= 1


D = 61_000  # the manifest's expiry plus its longest run
G = input_pin_grace_ms


@pytest.mark.parametrize("state, now_ms, done", [
    ("succeeded", 0, True),
    ("failed", 0, True),
    ("cancelled", 0, True),
    ("forming", 0, False),
    ("running", 10_000, False),
    ("interrupted", 10_000, False),       # our restart: members may still fetch
    (None, 10_000, False),                # killed before the job was first saved
    ("interrupted", D + G, False),
    ("interrupted", D + G + 1, True),     # no member can still run it
    ("running", D + G + 1, True),
    (None, D + G + 1, True),
])
def test_when_a_submitters_input_pins_may_go(state: str | None, now_ms: int, done: bool) -> None:
    assert submitted_inputs_done(state, deadline_ms=D, now_ms=now_ms) is done
