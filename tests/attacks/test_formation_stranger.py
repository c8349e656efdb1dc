"""#18.1: a stranger with no advert and no GPU takes other people's jobs.

The attack as it was run: a libp2p host with its own identity and no advert
reads manifests from the jobs topic and, for each, sends the submitter a
proposal naming itself as the only member plus its own accept.  The
submitter assembled a certificate from them and confirmed it (4 of 5 real
jobs that required an L4 with 20 GB sat ``confirmed`` with no work done).

Here the submitter (a real node process) has a T4, so only an L4 node can
serve the job, and none is up when the job is submitted: the stranger's
certificate is the only one on offer.  It must be refused; when an honest L4
node starts, the job forms with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from hostile_peer import manifests, open_hostile

from p2pgpu.core._formation_messages import Accept, Proposal
from p2pgpu.localnet import LocalNet
from p2pgpu.node._jobs import JOBS_TOPIC

pytestmark = pytest.mark.processes

MIX = [("Tesla T4", 15360, "7.5", 1), ("NVIDIA L4", 23034, "8.9", 1)]
L4_JOB = """
name = "needs-an-l4"
[requirements]
nodes = 1
gpus_per_node = 1
models = ["L4"]
vram_gb_min = 20
[runtime]
command = ["echo", "done"]
duration_s_max = 30
[payment]
price_per_gpu_hour_max = 36000000
"""


async def _status(node: Any, job_id: str) -> dict[str, Any]:
    doc: dict[str, Any] = await trio.to_thread.run_sync(node.call, "job.status", {"job_id": job_id})
    return doc


async def test_a_stranger_without_an_advert_cannot_take_a_job(tmp_path: Path) -> None:
    net = LocalNet(tmp_path, 2, gpu_mix=MIX)
    try:
        submitter = await trio.to_thread.run_sync(lambda: net.start_node(0, bootstrap=[]))
        net.nodes.append(submitter)
        async with open_hostile(submitter.addrs[0], bytes([77]) * 32, topics=(JOBS_TOPIC,)) as stranger:
            attacked: list[str] = []

            async def attack() -> None:
                async for sm in manifests(stranger.subs[JOBS_TOPIC]):
                    prop = Proposal.sign(stranger.identity, job_id=sm.job_id, view=0, round=0,
                                         members=(stranger.peer_id,), gpus_per_member=1)
                    accept = Accept.sign(stranger.identity, proposal=prop, lease_until_ms=sm.manifest.created_at_ms
                                         + 30_000, price_per_gpu_hour=1, payout_address="")
                    for msg in (prop, accept):
                        await stranger.send(sm.manifest.submitter, msg.to_bytes())
                    attacked.append(sm.job_id)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(attack)
                await trio.sleep(2.5)  # the GossipSub mesh forms (1 s heartbeats)
                job = (await trio.to_thread.run_sync(submitter.call, "job.submit", {"manifest": L4_JOB}))["job_id"]
                with trio.fail_after(20):
                    while job not in attacked:
                        await trio.sleep(0.1)
                await trio.sleep(1.0)  # the submitter has had the stranger's proposal and accept for a second
                doc = await _status(submitter, job)
                assert stranger.sent >= 2, stranger.errors
                assert doc["state"] == "forming", doc
                assert stranger.peer_id not in doc["cluster"]["members"]
                assert doc["formation"]["certificates_refused"] >= 1, doc["formation"]
                assert "no signed advert" in doc["formation"]["last_refusal"], doc["formation"]
                # An honest L4 node comes up: the job forms with it (the manifest is republished).
                worker = await trio.to_thread.run_sync(lambda: net.start_node(1, bootstrap=submitter.addrs))
                net.nodes.append(worker)
                with trio.fail_after(45):
                    while (doc := await _status(submitter, job))["state"] not in ("confirmed", "running",
                                                                                   "succeeded", "failed"):
                        await trio.sleep(0.2)
                assert doc["cluster"]["members"] == [worker.peer_id], doc
                nursery.cancel_scope.cancel()
    finally:
        await trio.to_thread.run_sync(net.stop)
