"""#12 (held): malformed, expired, replayed, mis-signed and oversized manifests.

A hostile peer reads a real job's manifest off the jobs topic while the job
runs on a real worker, then, once the job has been paid, sends the worker
(and so the network) every bad variant of a manifest it can make, once on
the jobs topic and once over the direct protocol:

- noise, and the honest manifest's bytes cut short (``malformed``);
- a body signed by the stranger that is not a manifest's (``bad_schema``);
- a body over the manifest size limit (``oversized``);
- its own manifests, expired an hour ago (``expired``) and made a day ahead
  (``not_yet_valid``);
- the honest manifest with a byte of its signature flipped, and with its
  nonce changed under the honest signature (``bad_signature``);
- the honest manifest with a changed nonce signed by the stranger, naming
  the honest submitter (``signer_mismatch``);
- the honest manifest itself again, after its job was paid (a replay).

Each is refused, counted under its reason on the path it came by (the
topic validator's ``jobs:<reason>``, the direct stream's
``formation:<reason>``), and nothing changes: no job is added on either
node, the paid job is not run again nor owed twice, no GPU is reserved.

What it guards: the manifest checks of ``core/_manifest.py`` (envelope,
schema, signer, time), the formation core's replay guard and the node's
drop of a manifest it already holds (``node/_jobs.py``), and their counting
by reason.
"""

from __future__ import annotations

from contextlib import aclosing
from pathlib import Path
from random import Random
from typing import Any

import pytest
import trio
from hostile_peer import manifests, open_hostile
from ledger_attack_helpers import node_rows

from p2pgpu.core import Identity, encode
from p2pgpu.core._envelope import Kind, protocol_version, seal
from p2pgpu.core._manifest import Manifest, SignedManifest, sign_manifest
from p2pgpu.localnet import LocalNet, NodeProc
from p2pgpu.node import wall_ms
from p2pgpu.node._jobs import JOBS_TOPIC
from p2pgpu.store import earnings, payouts

pytestmark = pytest.mark.processes

MIX = [("NVIDIA L4", 23034, "8.9", 1)]
#: The submitter (node 0) asks more than the job's ceiling: the job runs on the worker.
DEAR = {0: "price_per_gpu_hour = 360000000"}
HONEST_JOB = """
name = "honest"
[requirements]
nodes = 1
gpus_per_node = 1
[runtime]
command = ["sh", "-c", "sleep 1; echo done"]
duration_s_max = 30
[payment]
price_per_gpu_hour_max = 36000000
"""
HOUR_MS = 3_600_000


def _own(stranger: Identity, *, created_ms: int, expires_ms: int, rng: Random) -> SignedManifest:
    return sign_manifest(stranger, Manifest(
        name="stranger", submitter=stranger.peer_id, created_at_ms=created_ms, expires_at_ms=expires_ms,
        nonce=rng.randbytes(16), nodes=1, gpus_per_node=1, command=("true",), duration_s_max=30,
        price_per_gpu_hour_max=36_000_000, payer="11111111111111111111111111111111"))


def _envelope(kind: str, body: bytes, signer: bytes, signature: bytes) -> bytes:
    return encode({"k": kind, "v": protocol_version, "b": body, "s": signer, "g": signature})


def hostile_variants(honest: SignedManifest, stranger: Identity) -> dict[str, list[bytes]]:
    """Every bad manifest, by the reason it must be refused with."""
    rng, now = Random(12), wall_ms()
    env = honest.envelope
    body = honest.manifest.to_obj()
    renonced = encode({**body, "nonce": rng.randbytes(16)})
    not_a_manifest = seal(stranger, Kind.MANIFEST, {"name": "x", "submitter": stranger.peer_id}).to_bytes()
    big_body = encode({**body, "submitter": stranger.peer_id, "name": "x" * (80 * 1024)})
    oversized = _envelope("manifest", big_body, stranger.public_key,
                          stranger.sign(Kind.MANIFEST.domain_tag + big_body))
    flipped = bytearray(env.signature)
    flipped[7] ^= 0x01
    # The honest body with a new nonce, sealed by the stranger: the signer is not the submitter.
    stolen = _envelope("manifest", renonced, stranger.public_key, stranger.sign(Kind.MANIFEST.domain_tag + renonced))
    return {
        "malformed": [rng.randbytes(300), honest.wire[: len(honest.wire) // 2]],
        "bad_schema": [not_a_manifest],
        "oversized": [oversized],
        "expired": [_own(stranger, created_ms=now - 2 * HOUR_MS, expires_ms=now - HOUR_MS, rng=rng).wire],
        "not_yet_valid": [_own(stranger, created_ms=now + 24 * HOUR_MS, expires_ms=now + 25 * HOUR_MS,
                               rng=rng).wire],
        "bad_signature": [_envelope("manifest", env.body, env.signer, bytes(flipped)),
                          _envelope("manifest", renonced, env.signer, env.signature)],
        "signer_mismatch": [stolen],
    }


async def _call(node: NodeProc, method: str, params: dict[str, Any] | None = None) -> Any:
    return await trio.to_thread.run_sync(lambda: node.call(method, params, timeout_s=30.0))


async def _snapshot(submitter: NodeProc, worker: NodeProc) -> dict[str, Any]:
    """What a bad manifest must not change on either node."""
    out: dict[str, Any] = {}
    for role, node in (("submitter", submitter), ("worker", worker)):
        status = await _call(node, "status")
        out[role] = {"jobs": status["jobs"], "gpus_free": status["gpus_free"],
                     "listed": sorted(r["job_id"] for r in await _call(node, "job.list"))}
    out["earnings"] = [(e["job_id"], e["proof_hash"], e["amount"]) for e in node_rows(worker, earnings)]
    # (Whether a payout has gone out yet is the payer's business, not the attack's.)
    out["payouts"] = [(p["job_id"], p["proof_hash"], p["amount"]) for p in node_rows(submitter, payouts)]
    return out


async def _wait_counters(node: NodeProc, want: dict[str, int], timeout_s: float = 30.0) -> dict[str, int]:
    with trio.fail_after(timeout_s):
        while True:
            counters: dict[str, int] = (await _call(node, "status"))["counters"]
            if all(counters.get(k, 0) >= n for k, n in want.items()):
                return counters
            await trio.sleep(0.3)


async def test_bad_and_replayed_manifests_are_refused_by_reason_and_change_nothing(tmp_path: Path) -> None:
    net = LocalNet(tmp_path, 2, gpu_mix=MIX, node_config=DEAR)
    await trio.to_thread.run_sync(net.start)
    try:
        submitter, worker = net.nodes
        stranger_seed = bytes([121]) * 32
        async with open_hostile(worker.addrs[0], stranger_seed, topics=(JOBS_TOPIC,)) as stranger:
            await trio.sleep(2.5)  # the GossipSub mesh forms (1 s heartbeats)
            job = (await _call(submitter, "job.submit", {"manifest": HONEST_JOB}))["job_id"]
            with trio.fail_after(30):
                async with aclosing(manifests(stranger.subs[JOBS_TOPIC])) as arriving:
                    async for sm in arriving:
                        if sm.job_id == job:
                            honest = sm
                            break
            with trio.fail_after(60):
                while (doc := await _call(submitter, "job.status", {"job_id": job}))["state"] not in (
                        "succeeded", "failed") or not node_rows(worker, earnings):
                    await trio.sleep(0.3)
            assert doc["state"] == "succeeded", doc
            assert doc["cluster"]["members"] == [worker.peer_id], doc
            before = await _snapshot(submitter, worker)
            counters_before: dict[str, int] = (await _call(worker, "status"))["counters"]

            variants = hostile_variants(honest, stranger.identity)
            for frames in variants.values():
                for data in frames:
                    await stranger.publish(JOBS_TOPIC, data)
                    assert await stranger.send(worker.peer_id, data), stranger.errors[-1:]
            # The replay, on both paths: the job is over and paid.
            await stranger.publish(JOBS_TOPIC, honest.wire)
            assert await stranger.send(worker.peer_id, honest.wire), stranger.errors[-1:]

            want = {}
            for reason, frames in variants.items():
                want[f"jobs:{reason}"] = counters_before.get(f"jobs:{reason}", 0) + len(frames)
                want[f"formation:{reason}"] = counters_before.get(f"formation:{reason}", 0) + len(frames)
            counters = await _wait_counters(worker, want)
            frames_in = counters_before.get("jobs:frames_in", 0) + sum(map(len, variants.values())) + 1
            await _wait_counters(worker, {"jobs:frames_in": frames_in})  # the replay was read too
            await trio.sleep(1.0)  # a replay that started the job again would show within a second

        after = await _snapshot(submitter, worker)
        assert after == before, (before, after)
        # The job ran once: one proof, owed once; the worker expects exactly that.
        assert len(after["payouts"]) == 1, after["payouts"]
        assert after["earnings"] == after["payouts"]
        for node in (submitter, worker):
            got = (await _call(node, "status"))["counters"]
            assert not any(k.endswith("internal_error") for k in got), got
        assert counters.get("jobs:wrong_kind", 0) == counters_before.get("jobs:wrong_kind", 0), counters
    finally:
        await trio.to_thread.run_sync(net.stop)
