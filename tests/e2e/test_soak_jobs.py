"""A long-running daemon keeps working: one node submits thousands of short
jobs back to back on a small network; every job settles, and its memory
stops growing (#13).

Before: the submitter core never forgot a job (``Submitter.forget`` had no
caller), so after 1,024 submissions every ``job submit`` was refused; the
collections of settled jobs stayed in memory, and so did every job's log
lines and each member's runner logs.

The long run (``-m slow``) submits 5,000 jobs and compares the daemon's
resident memory after 500 with after 5,000: within 20 MB.  The short one in
the default run submits a few hundred and checks that every job settles and
that nothing the daemon keeps per job outlives its bound.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest

from p2pgpu.localnet import LocalNet

pytestmark = pytest.mark.processes
TWO_GPUS = [("NVIDIA L4", 23034, "8.9", 2)]
#: Jobs in flight at once (the daemon submits the next as soon as one ends).
WINDOW = 6
job_wait_s_max = 120.0


def manifest(k: int) -> str:
    return f"""
name = "soak-{k}"
expires_in_s = 300
[requirements]
nodes = 1
gpus_per_node = 1
[runtime]
command = ["true"]
duration_s_max = 5
[payment]
price_per_gpu_hour_max = 36000000
"""


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def soak(tmp_path: Path, jobs: int, marks: tuple[int, ...]) -> dict[str, Any]:
    """Submit ``jobs`` jobs from node 0, ``WINDOW`` at a time; the resident
    memory of node 0 at each count in ``marks`` (after those jobs ended)."""
    with LocalNet(tmp_path, 3, gpu_mix=TWO_GPUS) as net:
        node = net.nodes[0]
        net.wait_until(lambda: node.call("status")["adverts_known"] == 3, timeout_s=60, what="every advert")
        in_flight: dict[str, float] = {}
        states: dict[str, int] = {}
        memory: dict[int, float] = {}
        submitted = ended = 0
        first = ""
        while ended < jobs:
            while submitted < jobs and len(in_flight) < WINDOW:
                job = node.call("job.submit", {"manifest": manifest(submitted)})["job_id"]
                first = first or job
                in_flight[job] = time.monotonic()
                submitted += 1
            time.sleep(0.05)
            for job in list(in_flight):
                doc = node.call("job.status", {"job_id": job})
                if doc["state"] in ("succeeded", "failed", "cancelled"):
                    states[doc["state"]] = states.get(doc["state"], 0) + 1
                    assert doc["state"] == "succeeded", doc
                    del in_flight[job]
                    ended += 1
                    if ended in marks:
                        memory[ended] = rss_mb(node.proc.pid)
                    if ended % 250 == 0:
                        # Progress for the long run (-s shows it): a 25-minute run says where it is.
                        print(f"soak: {ended}/{jobs} jobs ended, daemon RSS {rss_mb(node.proc.pid):.1f} MB, "
                              f"{time.strftime('%H:%M:%S')}", file=sys.stderr, flush=True)
                elif time.monotonic() - in_flight[job] > job_wait_s_max:
                    raise AssertionError(f"job {job[:12]} did not end in {job_wait_s_max} s: {doc}")
        status = node.call("status")
        # Every per-job table of the daemon holds what is in flight (none
        # now), never one entry per job it ever ran: the ended ones are in
        # the store.  Some keep a job a while after it ended: the settlement
        # until its deadline (duration_s_max + 30 s) for late proofs, the
        # submitter and formation cores until formation's own deadline.
        def drained() -> bool:
            held = node.call("status")["jobs_in_memory"]
            return all(held[t] == 0 for t in ("collections", "submitter_jobs", "formation_jobs"))

        net.wait_until(drained, timeout_s=150, what="ended jobs forgotten by the cores after their deadlines")
        held = node.call("status")["jobs_in_memory"]
        return {"states": states, "memory_mb": memory, "counters": status["counters"], "jobs": status["jobs"],
                "held": held, "listed": len(node.call("job.list")),
                "network_listed": len(node.call("network.jobs")),
                "first": node.call("job.status", {"job_id": first})}


#: Ended records of our own jobs a daemon keeps in memory at most
#: (node/_jobs.py), and the runner's logs of the last jobs (node/_runner.py).
ENDED_CACHED_MAX = 64
#: Network rows of ended jobs kept for ``network.jobs`` (node/_jobs.py network_ended_max).
NETWORK_ENDED_MAX = 2_000
LOG_JOBS_KEPT_MAX = 64


def assert_bounded(got: dict[str, Any], jobs: int) -> None:
    """Nothing the daemon keeps per job grew with the number of jobs (#13):
    every ended record stayed, proofs included (~4.7 KB each); now each table holds
    the jobs in flight (none at the end) plus a small cache of ended ones."""
    held = got["held"]
    print(f"per-job tables after {jobs} jobs: {held}")
    assert held["job_records"] <= WINDOW, held
    assert held["job_records_ended_cached"] <= ENDED_CACHED_MAX, held
    for table in ("collections", "member_runs", "deliveries", "submitter_jobs", "formation_jobs"):
        assert held[table] <= WINDOW, (table, held)
    assert held["runner_logs"] <= LOG_JOBS_KEPT_MAX, held
    assert held["network_rows_ended"] <= NETWORK_ENDED_MAX, held
    # ... and still listed by network.jobs (the explorer's network view), the newest 2,000.
    assert got["network_listed"] == min(jobs, NETWORK_ENDED_MAX), got["network_listed"]
    # Ended jobs are still reported, from the store.
    assert got["jobs"] == {"succeeded": jobs} and got["listed"] == jobs
    assert got["first"]["state"] == "succeeded" and got["first"]["proofs"][0]["status"] == "owed"


def test_a_daemon_settles_hundreds_of_jobs_back_to_back(tmp_path: Path) -> None:
    got = soak(tmp_path, 240, (80, 240))
    assert got["states"] == {"succeeded": 240}
    assert got["counters"].get("jobs_settled", 0) >= 240
    assert_bounded(got, 240)
    mem = got["memory_mb"]
    assert mem[240] - mem[80] < 20, mem


@pytest.mark.slow
@pytest.mark.timeout(3600)  # about 25 minutes on the shared 2-core machine
def test_a_daemon_settles_five_thousand_jobs_and_its_memory_stays_flat(tmp_path: Path) -> None:
    got = soak(tmp_path, 5_000, (500, 2_500, 5_000))
    assert got["states"] == {"succeeded": 5_000}
    mem = got["memory_mb"]
    print(f"daemon resident memory after 500, 2500, 5000 jobs: {mem}")
    assert_bounded(got, 5_000)
    assert mem[5_000] - mem[500] <= 20, mem
