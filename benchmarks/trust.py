"""Trust figures: a hardware challenge's verify cost against its compute cost,
and receipts verified per second.

Challenges (``p2pgpu/gpu/_matmul.py``), per matrix size ``n``, on this machine:

* prove: what an honest prover does: derive ``A`` and ``B`` from the seed,
  multiply (the backend ``pick_backend()`` chooses: NumPy here), reduce mod 251;
* verify: what the challenger does: hash the product against the commitment,
  derive ``A`` and ``B``, run Freivalds with 4 rounds (error <= 251^-4);
* the deadline the table gives the ``cpu`` and ``h100`` entries at that size.

Receipts (``p2pgpu/core/_receipt.py``, ``_reputation.py``): decode and verify
signed receipts of 8 members each, then compute reputation over all of them
(signature checks included) with every payment verified; and what a node
does with each receipt that reaches it (``decode_published``: the receipt
and its job's certificate, every signature checked).  Usage:

    python3 benchmarks/trust.py [--sizes 256,512,832,1024,2048] [--receipts 2000]
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "core"))

from trust_fixtures import IDS, SUBMITTER, address, key_of, line, receipt

from p2pgpu.core._challenge import commitment_of, deadline_ms_for, model_spec
from p2pgpu.core._formation_messages import Accept, Certificate, Proposal
from p2pgpu.core._receipt import (
    SettledLine,
    build_receipt,
    cosign,
    decode_published,
    decode_receipt,
    publish_wire,
    sign_receipt,
)
from p2pgpu.core._reputation import VerifiedPayment, compute_reputation
from p2pgpu.gpu._matmul import Instance, available_backends, pick_backend


def challenges(sizes: list[int]) -> None:
    backend = pick_backend()
    cpu, h100 = model_spec("cpu"), model_spec("h100")
    assert cpu is not None and h100 is not None
    print(f"challenge backend: {backend.name}   (available: {available_backends()})")
    print(f"{'n':>6} {'prove_s':>9} {'GFLOPS':>8} {'verify_s':>9} {'verify/prove':>13} "
          f"{'cpu_deadline_s':>15} {'h100_deadline_s':>16}")
    backend.product_mod_p(bytes(32), 64, should_stop=lambda: False)  # warm-up: BLAS threads, imports
    for n in sizes:
        seed = hashlib.sha256(b"bench%d" % n).digest()
        t0 = time.perf_counter()
        product = backend.product_mod_p(seed, n, should_stop=lambda: False)
        t1 = time.perf_counter()
        digest = b"d" * 32
        commitment = commitment_of(digest, product)
        t2 = time.perf_counter()
        ok = commitment_of(digest, product) == commitment and Instance.from_seed(seed, n).freivalds(
            product, rounds=4, rng=random.Random(n))
        t3 = time.perf_counter()
        assert ok, "an honest product failed its own check"
        prove, verify = t1 - t0, t3 - t2
        print(f"{n:>6} {prove:>9.3f} {2 * n**3 / prove / 1e9:>8.1f} {verify:>9.3f} {verify / prove:>13.3f} "
              f"{deadline_ms_for(n, cpu) / 1000:>15.2f} {deadline_ms_for(n, h100) / 1000:>16.2f}")


def receipts(count: int) -> None:
    members = IDS[1:5] + [type(IDS[0]).from_rng(random.Random(9000 + i)) for i in range(4)]
    wires = []
    for j in range(count):
        lines = [line(m, amount=1_000_000 + j, txname=f"b{j}") for m in members]
        wires.append(sign_receipt(SUBMITTER, receipt(f"bench{j}", lines)).wire)
    payer = address("payer:" + SUBMITTER.peer_id)
    payments = {}
    for w in wires:
        r = decode_receipt(w).receipt
        for ln in r.lines:
            payments.setdefault(ln.tx_signature, VerifiedPayment(tx_signature=ln.tx_signature, payer=payer,
                                                                 transfers={}))
            payments[ln.tx_signature].transfers[ln.address] = ln.amount  # type: ignore[index]
    t0 = time.perf_counter()
    for w in wires:
        decode_receipt(w)
    t1 = time.perf_counter()
    rep = compute_reputation(wires, payments=payments, now_ms=1_700_000_000_000)
    t2 = time.perf_counter()
    assert not rep.refused and len(rep.scores) == len(members) + 1
    size = sum(len(w) for w in wires) / len(wires)
    print(f"receipts of {len(members)} members ({size:.0f} bytes): decoded and verified "
          f"{count / (t1 - t0):,.0f}/s; reputation over {count}: {t2 - t1:.3f} s ({count / (t2 - t1):,.0f} receipts/s)")


def published(count: int, members_n: int = 3) -> None:
    """Published receipts (receipt + certificate of ``members_n``), as gossip brings them."""
    members = [type(IDS[0]).from_rng(random.Random(9100 + i)) for i in range(members_n)]
    wires = []
    for j in range(count):
        job = hashlib.sha256(f"published{j}".encode()).hexdigest()
        prop = Proposal.sign(members[0], job_id=job, view=0, round=0, members=tuple(m.peer_id for m in members),
                             gpus_per_member=1)
        cert = Certificate(proposal=prop, accepts=tuple(
            Accept.sign(m, proposal=prop, lease_until_ms=2**40, price_per_gpu_hour=1,
                        payout_address=address(m.peer_id)) for m in members))
        lines = [SettledLine(peer_id=m.peer_id, status="owed", amount=1000, address=address(m.peer_id),
                             proof_hash=b"p" * 32, tx_signature="5" * 87) for m in members]
        r = build_receipt(job_id=job, cert_hash=cert.digest, submitter=SUBMITTER.peer_id, payer=address("p"),
                          currency="SOL", settled_at_ms=1, lines=lines)
        assert r is not None
        wires.append(publish_wire(sign_receipt(SUBMITTER, cosign(r, key_of(r.payer).sign)), cert))
    t0 = time.perf_counter()
    for w in wires:
        decode_published(w)
    dt = time.perf_counter() - t0
    size = sum(len(w) for w in wires) / len(wires)
    print(f"published receipts of {members_n} members with their certificate ({size:.0f} bytes): "
          f"checked {count / dt:,.0f}/s (the receipt's, its payer's co-signature, the proposal's and "
          f"{members_n} accepts' signatures)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="256,512,832,1024,2048", help="matrix sizes (multiples of 64)")
    ap.add_argument("--receipts", type=int, default=2000)
    args = ap.parse_args()
    challenges([int(x) for x in args.sizes.split(",")])
    receipts(args.receipts)
    published(max(1, args.receipts // 4))


if __name__ == "__main__":
    main()
