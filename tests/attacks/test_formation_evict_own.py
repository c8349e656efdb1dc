"""#18.4: strangers' messages evict a submitter's own jobs.

The attack as it was run: 10,300 manifest-and-cancel pairs, signed by one
stranger, sent over a direct stream to a submitter.  Each manifest made a
job record, each cancel closed the job at once (so the formation table
never filled), and past 10,000 records the oldest went: the submitter's own
jobs with them (one, confirmed, still ran on its worker while the submitter
refused its proof as unknown).

Here a real submitter process runs a real job on a real worker while a
hostile peer sends it the same 10,300 pairs: the job stays listed, settles,
and its proof is owed; a job submitted after the flood forms.
"""

from __future__ import annotations

from pathlib import Path
from random import Random
from typing import Any

import pytest
import trio
from hostile_peer import open_hostile

from p2pgpu.core._formation_messages import Cancel
from p2pgpu.core._manifest import Manifest, sign_manifest
from p2pgpu.localnet import LocalNet
from p2pgpu.node import wall_ms

pytestmark = pytest.mark.processes

MIX = [("Tesla T4", 15360, "7.5", 1), ("NVIDIA L4", 23034, "8.9", 1)]
PAIRS = 10_300


def own_job(name: str, sleep_s: int) -> str:
    return f"""
name = "{name}"
[requirements]
nodes = 1
gpus_per_node = 1
models = ["L4"]
[runtime]
command = ["sh", "-c", "sleep {sleep_s}; echo done"]
duration_s_max = 60
[payment]
price_per_gpu_hour_max = 36000000
"""


def pairs(identity: Any, n: int) -> list[bytes]:
    """``n`` manifests of jobs nobody can serve, each followed by its cancel."""
    rng, now, out = Random(18_4), wall_ms(), []
    for _ in range(n):
        m = Manifest(name="evict", submitter=identity.peer_id, created_at_ms=now, expires_at_ms=now + 600_000,
                     nonce=rng.randbytes(16), nodes=1, gpus_per_node=1, models=("nothing-matches",),
                     command=("true",), price_per_gpu_hour_max=1, payer="11111111111111111111111111111111")
        sm = sign_manifest(identity, m)
        out += [sm.wire, Cancel.sign(identity, job_id=sm.job_id, reason="x", cancelled_at_ms=now).to_bytes()]
    return out


async def _call(node: Any, method: str, params: dict[str, Any] | None = None) -> Any:
    return await trio.to_thread.run_sync(lambda: node.call(method, params, timeout_s=60.0))


async def _wait_state(node: Any, job: str, states: tuple[str, ...], timeout_s: float) -> dict[str, Any]:
    with trio.fail_after(timeout_s):
        while True:
            doc = await _call(node, "job.status", {"job_id": job})
            if doc is not None and doc["state"] in states:
                return doc  # type: ignore[no-any-return]
            await trio.sleep(0.3)


async def _frames_settled(node: Any, quiet_s: float = 2.0) -> int:
    """Wait until the node's count of direct frames stops growing."""
    last, since = -1, trio.current_time()
    with trio.fail_after(120):
        while True:
            got = (await _call(node, "status"))["counters"].get("jobs:frames_in", 0)
            if got != last:
                last, since = got, trio.current_time()
            elif trio.current_time() - since >= quiet_s:
                return int(got)
            await trio.sleep(0.3)


async def test_manifest_and_cancel_floods_do_not_evict_the_submitters_own_jobs(tmp_path: Path) -> None:
    net = LocalNet(tmp_path, 2, gpu_mix=MIX)
    await trio.to_thread.run_sync(net.start)
    try:
        submitter, worker = net.nodes
        job = (await _call(submitter, "job.submit", {"manifest": own_job("own", 4)}))["job_id"]
        await _wait_state(submitter, job, ("confirmed", "running"), 30)
        async with open_hostile(submitter.addrs[0], bytes([84]) * 32) as stranger:
            frames = await trio.to_thread.run_sync(pairs, stranger.identity, PAIRS)
            await stranger.stream_frames(submitter.peer_id, frames)
            assert stranger.sent >= len(frames) * 9 // 10, stranger.errors[-3:]
            await _frames_settled(submitter)  # the node has read everything it was going to read
        listed = [r["job_id"] for r in await _call(submitter, "job.list")]
        assert job in listed
        doc = await _wait_state(submitter, job, ("succeeded", "failed"), 90)
        assert doc["state"] == "succeeded", doc
        assert doc["cluster"]["members"] == [worker.peer_id]  # it ran on the L4 worker, as it was confirmed
        assert [p["status"] for p in doc["proofs"]] == ["owed"], doc["proofs"]
        after = (await _call(submitter, "job.submit", {"manifest": own_job("after", 0)}))["job_id"]
        await _wait_state(submitter, after, ("confirmed", "running", "succeeded"), 30)
        status = await _call(submitter, "status")
        assert not any(k.endswith("internal_error") for k in status["counters"]), status["counters"]
    finally:
        await trio.to_thread.run_sync(net.stop)
