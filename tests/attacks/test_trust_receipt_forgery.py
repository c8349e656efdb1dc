"""#16: receipts forged, oversized, non-canonical or replayed on the receipts topic.

A hostile libp2p host publishes on ``/p2pgpu/receipts/1`` to a real node
process.  A receipt it really signed (for a job of its own sybils, with a
valid certificate) is kept: that is the happy path, and it still weighs
nothing because no payment behind it verifies on the ledger.  Then it
publishes the same receipt with an amount raised after signing, padded past
the size limit, re-encoded non-canonically, and again as it was.  Each is
refused with its own reason (the node counts them by reason), and none
changes what the node holds or the scores it reports.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from hostile_peer import open_hostile

from p2pgpu.core import Identity, decode, encode
from p2pgpu.core._formation_messages import Accept, Certificate, Proposal
from p2pgpu.core._receipt import SettledLine, build_receipt, publish_wire, published_bytes_max, sign_receipt
from p2pgpu.localnet import LocalNet
from p2pgpu.node._receipts import RECEIPTS_TOPIC

pytestmark = pytest.mark.processes
ONE_GPU = [("NVIDIA L4", 23034, "8.9", 1)]
PAYER = "11111111111111111111111111111112"


def sybil_receipt(forger: Identity) -> bytes:
    """A receipt the forger really signs, for a job its own sybils 'ran'."""
    sybils = [Identity(bytes([90 + i]) * 32) for i in range(2)]
    job = hashlib.sha256(b"sybil job").hexdigest()
    prop = Proposal.sign(sybils[0], job_id=job, view=0, round=0, members=tuple(s.peer_id for s in sybils),
                         gpus_per_member=1)
    cert = Certificate(proposal=prop, accepts=tuple(
        Accept.sign(s, proposal=prop, lease_until_ms=2**40, price_per_gpu_hour=1, payout_address=PAYER)
        for s in sybils))
    lines = [SettledLine(peer_id=s.peer_id, status="owed", amount=10**12, address=PAYER, proof_hash=b"p" * 32,
                         tx_signature="5" * 87) for s in sybils]
    r = build_receipt(job_id=job, cert_hash=cert.digest, submitter=forger.peer_id, payer=PAYER, currency="SOL",
                      settled_at_ms=1_700_000_000_000, lines=lines)
    assert r is not None
    return publish_wire(sign_receipt(forger, r), cert)


def raise_amount(wire: bytes) -> bytes:
    outer = decode(wire, size_max=len(wire))
    env = decode(outer["receipt"], size_max=len(outer["receipt"]))
    body = decode(env["b"], size_max=len(env["b"]))
    body["lines"][0][2] *= 100
    env["b"] = encode(body)
    outer["receipt"] = encode(env)
    return encode(outer)


def non_canonical(wire: bytes) -> bytes:
    outer = decode(wire, size_max=len(wire))
    out: bytes = msgpack.packb(dict(reversed(list(outer.items()))), use_bin_type=True)
    assert out != wire and decode(out, size_max=len(out)) == outer
    return out


async def call(node: Any, method: str, params: dict[str, Any] | None = None) -> Any:
    return await trio.to_thread.run_sync(node.call, method, params)


async def counters(node: Any) -> dict[str, int]:
    return {k: v for k, v in (await call(node, "status"))["counters"].items() if k.startswith("receipts:")}


async def test_forged_oversized_non_canonical_and_replayed_receipts_change_nothing(tmp_path: Path) -> None:
    net = LocalNet(tmp_path, 1, gpu_mix=ONE_GPU)
    try:
        node = await trio.to_thread.run_sync(lambda: net.start_node(0, bootstrap=[]))
        net.nodes.append(node)
        forger = Identity(bytes([66]) * 32)
        async with open_hostile(node.addrs[0], forger.seed, topics=(RECEIPTS_TOPIC,)) as hostile:
            await trio.sleep(2.5)  # the GossipSub mesh forms (1 s heartbeats)
            real = sybil_receipt(forger)
            await hostile.publish(RECEIPTS_TOPIC, real)
            with trio.fail_after(20):
                while not await call(node, "receipts.list"):
                    await trio.sleep(0.2)
            held = await call(node, "receipts.list")
            assert [r["signer"] for r in held] == [forger.peer_id]
            rep = await call(node, "reputation", {"fresh": True})
            assert rep["scores"] == [] and rep["refused"], rep  # no payment verified: no weight

            attacks = {"bad_signature": raise_amount(real),
                       "oversized": real + b"\x00" * (published_bytes_max - len(real) + 1),
                       "non_canonical": non_canonical(real), "replayed": real}
            for data in attacks.values():
                await hostile.publish(RECEIPTS_TOPIC, data)
                await trio.sleep(0.3)
            with trio.fail_after(20):
                while True:
                    seen = await counters(node)
                    if all(seen.get(f"receipts:refused_{why}", 0) >= 1 for why in attacks):
                        break
                    await trio.sleep(0.2)
            assert await call(node, "receipts.list") == held
            after = await call(node, "reputation", {"fresh": True})
            assert after["scores"] == rep["scores"]
            assert seen.get("receipts:kept") == 1, seen
    finally:
        await trio.to_thread.run_sync(net.__exit__, None, None, None)
