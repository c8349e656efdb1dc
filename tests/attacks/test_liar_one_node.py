"""#12.3: a one-node job is paid for time that never ran.

The attack as it was run: a lone worker (no other member, so no
co-signatures) ran ``echo`` for 67 ms and signed a proof claiming an hour;
the submitter paid it for the hour (1,000,000 lamports), because nothing
checked a proof's start and end against what the submitter itself saw.

Here the lone worker is a hostile peer with a matching advert (a real
``FormationNode`` is not needed: as the only volunteer it is the rightful
leader, so it proposes itself and accepts) and the submitter is a real node
process: the lie is refused (``over_window``) and nothing is owed for it,
while an honest claim made the same way is owed no more than the window
allows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from hostile_peer import ADVERTS_TOPIC, Hostile, manifests, open_hostile

from p2pgpu.core import Advert, GpuInfo, PeerMisbehaved, sign_advert
from p2pgpu.core._formation_messages import Accept, Confirm, Proposal, decode_message
from p2pgpu.core._manifest import SignedManifest
from p2pgpu.core._proof import Proof, chain_heads, sign_proof
from p2pgpu.localnet import LocalNet
from p2pgpu.node import wall_ms
from p2pgpu.node._jobs import JOBS_TOPIC

pytestmark = pytest.mark.processes

MIX = [("Tesla T4", 15360, "7.5", 1)]
HOUR_MS = 3_600_000
PRICE = 3_600_000  # per GPU-hour: one lamport per GPU-ms
PAYOUT = "So11111111111111111111111111111111111111112"


def l4_job(name: str) -> str:
    return f"""
name = "{name}"
[requirements]
nodes = 1
gpus_per_node = 1
models = ["L4"]
[runtime]
command = ["echo", "hi"]
duration_s_max = 3600
[payment]
price_per_gpu_hour_max = {PRICE}
"""


def l4_advert(h: Hostile) -> bytes:
    now = wall_ms()
    return sign_advert(h.identity, Advert(
        peer_id=h.peer_id, network="local", addrs=(), seq=now, issued_at_ms=now, expires_at_ms=now + 600_000,
        gpus=(GpuInfo(model="NVIDIA L4", memory_mb=23034, compute_capability="8.9"),), gpus_free=1,
        price_per_gpu_hour=PRICE, currency="SOL", payout_address=PAYOUT, region="local", runtimes=("process",),
        simulated=True)).wire


async def lone_worker(h: Hostile, claims: dict[str, tuple[float, int]]) -> None:
    """For each manifest: propose itself and accept; on the CONFIRM, "work"
    ``claims[name][0]`` seconds, then prove ``claims[name][1]`` ms ending now."""
    confirms: dict[str, Confirm] = {}
    seen: dict[str, SignedManifest] = {}

    async def on_confirms() -> None:
        async for data in h.inbox:
            try:
                msg = decode_message(data)
            except PeerMisbehaved:
                continue  # not a formation message (a proof_ack, say)
            if isinstance(msg, Confirm):
                confirms.setdefault(msg.job_id, msg)

    async def serve(sm: SignedManifest) -> None:
        prop = Proposal.sign(h.identity, job_id=sm.job_id, view=0, round=0, members=(h.peer_id,),
                             gpus_per_member=1)
        accept = Accept.sign(h.identity, proposal=prop, lease_until_ms=wall_ms() + 10_000,
                             price_per_gpu_hour=PRICE, payout_address=PAYOUT)
        for msg in (prop, accept):
            await h.send(sm.manifest.submitter, msg.to_bytes())
        with trio.fail_after(20):
            while sm.job_id not in confirms:
                await trio.sleep(0.01)
        work_s, claimed_ms = claims[sm.manifest.name]
        await trio.sleep(work_s)
        end = wall_ms()
        cert_hash = confirms[sm.job_id].certificate.digest
        proof = Proof(job_id=sm.job_id, cert_hash=cert_hash, peer_id=h.peer_id, gpus=("NVIDIA L4",),
                      started_at_ms=end - claimed_ms, ended_at_ms=end, gpu_ms=claimed_ms, exit_code=0,
                      end_reason="exited", output_digest=b"", checkpoints=(),
                      chain_head=chain_heads(sm.job_id, cert_hash, h.peer_id, ())[-1])
        await h.send(sm.manifest.submitter, sign_proof(h.identity, proof).wire)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(on_confirms)
        async for sm in manifests(h.subs[JOBS_TOPIC]):
            if sm.job_id not in seen and sm.manifest.name in claims:
                seen[sm.job_id] = sm
                nursery.start_soon(serve, sm)


async def _call(node: Any, method: str, params: dict[str, Any] | None = None) -> Any:
    return await trio.to_thread.run_sync(lambda: node.call(method, params, timeout_s=60.0))


async def _settled(node: Any, job: str) -> dict[str, Any]:
    with trio.fail_after(60):
        while True:
            doc: dict[str, Any] = await _call(node, "job.status", {"job_id": job})
            if doc["state"] in ("succeeded", "failed") and doc["proofs"]:
                return doc
            await trio.sleep(0.2)


async def test_a_lone_worker_is_paid_no_more_than_the_submitter_saw(tmp_path: Path) -> None:
    net = LocalNet(tmp_path, 1, gpu_mix=MIX)
    await trio.to_thread.run_sync(net.start)
    try:
        submitter = net.nodes[0]
        async with open_hostile(submitter.addrs[0], bytes([123]) * 32, topics=(JOBS_TOPIC, ADVERTS_TOPIC)) as liar:
            await trio.sleep(2.5)  # the mesh forms
            await liar.publish(ADVERTS_TOPIC, l4_advert(liar))
            with trio.fail_after(20):
                while (await _call(submitter, "status"))["adverts_known"] < 2:
                    await trio.sleep(0.2)
            claims = {"echo-for-an-hour": (0.067, HOUR_MS), "one-second": (1.0, 1_000)}
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lone_worker, liar, claims)
                lie = (await _call(submitter, "job.submit", {"manifest": l4_job("echo-for-an-hour")}))["job_id"]
                fair = (await _call(submitter, "job.submit", {"manifest": l4_job("one-second")}))["job_id"]
                lied, honest = await _settled(submitter, lie), await _settled(submitter, fair)
                nursery.cancel_scope.cancel()
        (proof,) = lied["proofs"]
        assert proof["worker"] == liar.peer_id
        assert proof["status"] == "rejected" and "over_window" in proof["reason"], proof
        assert proof["amount"] == 0 and lied["payouts"] == []
        # The honest claim: owed, and no more than the window the submitter saw allows.
        (fair_proof,) = honest["proofs"]
        t = honest["timings"]
        window_ms = t["ended_at_ms"] - t["confirmed_at_ms"]  # settled when the proof arrived
        assert fair_proof["status"] == "owed", fair_proof
        assert fair_proof["amount"] == 1_000 <= window_ms + max(1_000, window_ms // 20)
    finally:
        await trio.to_thread.run_sync(net.stop)
