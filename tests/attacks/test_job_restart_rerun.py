"""#12.6 with real node processes: a worker ``kill -9``ed mid-job and restarted.

Before the fix the first sandbox kept running (bubblewrap under
``timeout`` outlived its node), the restarted worker ran the job a second
time beside it, said the job succeeded and listed an "expected" payment
that never came (the submitter settled on the interrupted proof), and a
scratch directory was left behind.  Now the sandbox dies with its node and
its disk goes with it, the restarted worker never starts the job again, and
worker and submitter agree on what happened and on what is owed.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import multiaddr
import pytest
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr

from p2pgpu.localnet import LocalNet, NodeProc
from p2pgpu.node import ControlError
from p2pgpu.node._jobs import JOBS_TOPIC
from p2pgpu.node._stack import open_stack
from p2pgpu.runtime import check_sandbox
from p2pgpu.runtime._leftovers import RECORD_NAME
from p2pgpu.store import db_path, earnings, load_jobs, open_db

pytestmark = [pytest.mark.processes,
              pytest.mark.skipif(check_sandbox() is not None, reason=f"no sandbox here: {check_sandbox()}")]

ONE_GPU = [("NVIDIA L4", 23034, "8.9", 1)]
DEAR = {0: "price_per_gpu_hour = 360000000"}
MARKER = "1717.2727"
JOB = f"""
name = "restart-victim"
[requirements]
nodes = 1
gpus_per_node = 1
[runtime]
command = ["sh", "-c", "echo started; sleep {MARKER}"]
duration_s_max = 30
[payment]
price_per_gpu_hour_max = 36000000
"""


def job_processes() -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if MARKER.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                continue
    return found


def ended(doc: dict[str, Any], key: str) -> dict[str, Any] | None:
    """``doc`` once its ``key`` (state or member_state) says the job ended."""
    return doc if doc.get(key) in ("succeeded", "failed") else None


def logs(node: NodeProc, job_id: str) -> list[dict[str, Any]]:
    """A node's log lines of a job ([] while the node does not know it yet)."""
    try:
        got = node.call("job.logs", {"job_id": job_id})
    except ControlError:
        return []
    return got if isinstance(got, list) else []


def status(node: NodeProc, job_id: str) -> dict[str, Any]:
    try:
        doc = node.call("job.status", {"job_id": job_id})
    except ControlError:
        return {}
    return doc if isinstance(doc, dict) else {}


def worker_earnings(node: NodeProc, job_id: str) -> list[dict[str, Any]]:
    conn = open_db(db_path(node.home.path), readonly=True)
    try:
        return [e for e in earnings(conn) if e["job_id"] == job_id]
    finally:
        conn.close()


def stored_manifest(node: NodeProc, job_id: str) -> bytes:
    conn = open_db(db_path(node.home.path), readonly=True)
    try:
        return next(bytes(r["manifest"]) for r in load_jobs(conn) if r["job_id"] == job_id)
    finally:
        conn.close()


async def replay_manifest(wire: bytes, peer_addr: str) -> None:
    """Publish a job's signed manifest again on the jobs topic, from a stranger."""
    async with open_stack(b"replayer" * 4, ["/ip4/127.0.0.1/tcp/0"], dht_validators={}) as stack:
        info = info_from_p2p_addr(multiaddr.Multiaddr(peer_addr))
        await stack.host.connect(info)
        await stack.pubsub.subscribe(JOBS_TOPIC)
        with trio.move_on_after(10):
            while info.peer_id not in stack.pubsub.peer_topics.get(JOBS_TOPIC, set()):
                await trio.sleep(0.1)
        await trio.sleep(1.5)  # a heartbeat: the worker grafts us into its mesh
        for _ in range(3):
            await stack.pubsub.publish(JOBS_TOPIC, wire)
            await trio.sleep(0.5)


def test_a_worker_killed_and_restarted_never_runs_the_job_twice(tmp_path: Path) -> None:
    with LocalNet(tmp_path, 2, gpu_mix=ONE_GPU, node_config=DEAR) as net:
        net.wait_until(lambda: net.nodes[0].call("status")["peers"] >= 1, timeout_s=30, what="a connection")
        submitter, worker = net.nodes
        job = submitter.call("job.submit", {"manifest": JOB})["job_id"]
        net.wait_until(lambda: any(ln["line"] == "started" for ln in logs(worker, job)),
                       timeout_s=90, what="the job to start on the worker")
        record = json.loads((worker.home.path / "jobs" / job / RECORD_NAME).read_text())
        scratch = Path(record["scratch"])
        time.sleep(2.5)  # past a checkpoint: the interrupted proof has time to claim
        net.terminate(worker.index, sig=signal.SIGKILL)
        # The sandbox dies with its node, and its disk goes too (before any restart).
        net.wait_until(lambda: not job_processes(), timeout_s=15, what="the dead node's sandbox to die")
        net.wait_until(lambda: not scratch.exists(), timeout_s=15, what="the dead node's job disk to go")

        worker = net.restart(worker.index)
        mine = status(worker, job)
        assert mine["member_state"] == "interrupted" and mine["state"] == "interrupted", mine
        settled = net.wait_until(lambda: ended(status(submitter, job), "state"), timeout_s=90,
                                 what="the submitter to settle")
        # The manifest replayed to the restarted worker: it volunteers again and
        # the submitter answers with its confirmation.  It must not start again.
        trio.run(replay_manifest, stored_manifest(submitter, job), worker.addrs[0])
        time.sleep(5)
        assert not job_processes(), "the restarted worker ran the job a second time"
        assert logs(worker, job) == []
        mine = status(worker, job)
        assert mine["member_state"] == "interrupted" and mine["state"] == "interrupted", mine
        proofs = {p["worker"]: p for p in settled["proofs"]}
        theirs = proofs[worker.peer_id]
        assert theirs["proof_hash"] == mine["proof_hash"] and theirs["status"] == "owed", theirs
        ours = worker_earnings(worker, job)
        # Exactly what the submitter owes it: one earning, the interrupted proof's.
        assert [(e["proof_hash"], e["amount"]) for e in ours] == [(theirs["proof_hash"], theirs["amount"])], ours
        assert not (worker.home.path / "jobs" / job / RECORD_NAME).exists()
