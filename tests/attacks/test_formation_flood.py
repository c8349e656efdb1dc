"""#18.3: a flood of manifests starves the market.

The attack as it was run: 5,000 signed manifests from one identity in 5.5 s
on the jobs topic.  They filled every node's formation table (1,024 jobs
shared by all strangers) and reserved every GPU for about a minute; a real
job submitted meanwhile failed after 60 s of ``forming``.

Here a hostile peer floods a network of real node processes the same way,
and an honest node submits a real job in the middle of the flood: it forms.
(How fast, compared with a quiet network, is a benchmark's question:
``benchmarks/formation_flood.py``.)
"""

from __future__ import annotations

from pathlib import Path
from random import Random
from typing import Any

import pytest
import trio
from hostile_peer import open_hostile

from p2pgpu.core import Identity
from p2pgpu.core._manifest import Manifest, sign_manifest
from p2pgpu.localnet import LocalNet
from p2pgpu.node import wall_ms
from p2pgpu.node._jobs import JOBS_TOPIC

pytestmark = pytest.mark.processes

FLOOD = 5_000
HONEST_JOB = """
name = "honest"
[requirements]
nodes = 1
gpus_per_node = 1
[runtime]
command = ["true"]
duration_s_max = 30
[payment]
price_per_gpu_hour_max = 36000000
"""


def flood_manifests(identity: Identity, n: int) -> list[bytes]:
    """``n`` valid manifests of 1-GPU jobs every node can serve."""
    rng, now = Random(18_3), wall_ms()
    return [sign_manifest(identity, Manifest(
        name=f"flood-{i}", submitter=identity.peer_id, created_at_ms=now, expires_at_ms=now + 600_000,
        nonce=rng.randbytes(16), nodes=1, gpus_per_node=1, command=("true",), duration_s_max=30,
        price_per_gpu_hour_max=36_000_000, payer="11111111111111111111111111111111")).wire for i in range(n)]


async def _call(node: Any, method: str, params: dict[str, Any] | None = None) -> Any:
    return await trio.to_thread.run_sync(lambda: node.call(method, params, timeout_s=60.0))


async def test_an_honest_job_forms_during_a_flood_of_one_identitys_manifests(tmp_path: Path) -> None:
    net = LocalNet(tmp_path, 4)
    await trio.to_thread.run_sync(net.start)
    try:
        honest = net.nodes[0]
        async with open_hostile(net.nodes[1].addrs[0], bytes([83]) * 32, topics=(JOBS_TOPIC,)) as flooder:
            await flooder.connect(net.nodes[2].addrs[0])
            manifests = await trio.to_thread.run_sync(flood_manifests, flooder.identity, FLOOD)
            await trio.sleep(2.5)  # the mesh forms
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: flooder.flood(JOBS_TOPIC, manifests, seconds=5.5))
                await trio.sleep(2.0)  # well into the flood
                job = (await _call(honest, "job.submit", {"manifest": HONEST_JOB}))["job_id"]
                with trio.fail_after(30):  # it failed after 60 s before; it normally forms in well under 1 s
                    while (doc := await _call(honest, "job.status", {"job_id": job}))["state"] not in (
                            "confirmed", "running", "succeeded", "failed"):
                        await trio.sleep(0.2)
                assert doc["state"] != "failed", doc
                assert flooder.peer_id not in doc["cluster"]["members"]
        counters = [(await _call(n, "status"))["counters"] for n in net.nodes]
        limited = sum(c.get("jobs:limit_exceeded", 0) for c in counters)
        assert limited > 0, "the flood ran into the per-submitter quota"
        for c in counters:
            assert not any(k.endswith("internal_error") for k in c), c
    finally:
        await trio.to_thread.run_sync(net.stop)
