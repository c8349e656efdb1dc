"""The proof check's three steps, on real signed proofs, real Merkle paths and a
real signed Solana transaction (built by the payer's own ``build_batch``).

Each step must say true when the thing holds, false when it does not (a
flipped byte, another root, another memo), and null when there is nothing to
check yet; the proof passes only when all three are true.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from solders.hash import Hash
from solders.keypair import Keypair

from p2pgpu.core import Identity
from p2pgpu.core._payout import BatchPlan, Transfer, inclusion_proof
from p2pgpu.core._proof import CheckpointChain, Proof, sign_proof
from p2pgpu.explorer import ProofChecker, Raw, build_views
from p2pgpu.explorer._check import check_inclusion, check_memo, check_signature
from p2pgpu.home import Home
from p2pgpu.solana import build_batch

RNG = random.Random(7)
WORKER = Identity.from_rng(RNG)
JOB = "cd" * 32
CERT = bytes(range(32))
T0 = 1_700_000_000_000


def signed_proof(identity: Identity = WORKER, gpu_ms: int = 60_000) -> Any:
    chain = CheckpointChain(JOB, CERT, identity.peer_id)
    chain.add(T0 + 10_000, b"")
    p = Proof(job_id=JOB, cert_hash=CERT, peer_id=identity.peer_id, gpus=("g0",), started_at_ms=T0,
              ended_at_ms=T0 + gpu_ms, gpu_ms=gpu_ms, exit_code=0, end_reason="exited", output_digest=bytes(32),
              checkpoints=tuple(chain.checkpoints), chain_head=chain.head)
    return sign_proof(identity, p)


SP = signed_proof()
H = SP.proof_hash.hex()
OTHERS = [signed_proof(Identity.from_rng(RNG), 1000 * (i + 1)).proof_hash for i in range(4)]
BATCH = [SP.proof_hash, *OTHERS]


def paying_tx(hashes: list[bytes]) -> bytes:
    plan = BatchPlan(currency="SOL", transfers=(Transfer(address=str(Keypair().pubkey()), amount=1000,
                                                          owed_ids=tuple(range(len(hashes))),
                                                          proof_hashes=tuple(hashes)),))
    return build_batch(Keypair(), plan, Hash.default())


def test_signature_holds_for_the_signed_bytes_only() -> None:
    step, facts = check_signature(H, SP.wire)
    assert step["ok"] is True and facts["signer"] == WORKER.peer_id and facts["job_id"] == JOB
    flipped = bytearray(SP.wire)
    flipped[-5] ^= 1
    assert check_signature(H, bytes(flipped))[0]["ok"] is False
    assert check_signature(OTHERS[0].hex(), SP.wire)[0]["ok"] is False  # genuine, but another proof
    assert check_signature(H, b"\x00garbage")[0]["ok"] is False
    assert check_signature(H, None)[0]["ok"] is None


def test_inclusion_holds_on_the_audit_path_only() -> None:
    doc = inclusion_proof(BATCH, SP.proof_hash).to_json()
    step, inc = check_inclusion(H, doc)
    assert step["ok"] is True and inc is not None and inc.size == 5
    wrong_root = {**doc, "root": "00" * 32}
    assert check_inclusion(H, wrong_root)[0]["ok"] is False
    other = inclusion_proof(BATCH, OTHERS[1]).to_json()
    assert check_inclusion(H, other)[0]["ok"] is False
    assert check_inclusion(H, {"index": 0})[0]["ok"] is False
    assert check_inclusion(H, None)[0]["ok"] is None


def test_memo_must_carry_the_root() -> None:
    root = inclusion_proof(BATCH, SP.proof_hash).root
    assert check_memo(root, paying_tx(BATCH), "sig")["ok"] is True
    assert check_memo(root, paying_tx(OTHERS), "sig")["ok"] is False
    assert check_memo(root, None, "sig")["ok"] is False
    assert check_memo(None, None, None)["ok"] is None


async def test_checker_reads_the_rows_and_refuses_bad_hashes(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    home.init(network="local")

    class NoDaemon:
        async def call(self, method: str, params: Any = None) -> Any:
            from p2pgpu.explorer import MethodMissing

            raise MethodMissing(method)

    checker = ProofChecker(NoDaemon(), home)  # type: ignore[arg-type]
    inc = inclusion_proof(BATCH, SP.proof_hash).to_json()
    raw = Raw(proofs=[{"proof_hash": H, "wire": SP.wire.hex()}],
              payouts=[{"proof_hash": H, "inclusion": inc, "status": "paid", "tx_signature": None}])
    views = build_views(raw, now_ms=0, version=1)
    doc = await checker.check(H.upper(), views)
    assert [s["ok"] for s in doc["steps"]] == [True, True, None] and doc["valid"] is False
    assert doc["failed"] is False and doc["known"] is True and doc["root"] == inc["root"]
    with pytest.raises(ValueError, match="64 hex"):
        await checker.check("xyz", views)
    unknown = await checker.check("00" * 32, views)
    assert unknown["known"] is False and [s["ok"] for s in unknown["steps"]] == [None, None, None]


async def test_a_workers_earning_row_carries_its_inclusion_proof_as_text(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    home.init(network="local")

    class NoDaemon:
        async def call(self, method: str, params: Any = None) -> Any:
            from p2pgpu.explorer import MethodMissing

            raise MethodMissing(method)

    inc = inclusion_proof(BATCH, SP.proof_hash).to_json()
    raw = Raw(earnings=[{"proof_hash": H, "wire": SP.wire.hex(), "inclusion_proof": json.dumps(inc),
                         "status": "paid", "tx_signature": None}])
    doc = await ProofChecker(NoDaemon(), home).check(H, build_views(raw, now_ms=0, version=1))  # type: ignore[arg-type]
    assert [s["ok"] for s in doc["steps"]] == [True, True, None] and doc["root"] == inc["root"]


async def test_a_paid_proof_without_an_inclusion_proof_here_says_where_to_check(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    home.init(network="local")

    class NoDaemon:
        async def call(self, method: str, params: Any = None) -> Any:
            from p2pgpu.explorer import MethodMissing

            raise MethodMissing(method)

    raw = Raw(earnings=[{"proof_hash": H, "status": "paid", "tx_signature": "5" * 88}])
    doc = await ProofChecker(NoDaemon(), home).check(H, build_views(raw, now_ms=0, version=1))  # type: ignore[arg-type]
    assert [s["ok"] for s in doc["steps"]] == [None, None, None] and doc["valid"] is False
    assert "payer's explorer" in doc["steps"][1]["detail"] and doc["tx_signature"] == "5" * 88
