"""Payout decisions (core/_payout.py): Merkle roots and inclusion proofs, batch planning,
failure isolation, recovery verdicts and the batch state table."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pgpu.core import LocalProtocolError
from p2pgpu.core._payout import (
    BATCH_TRANSITIONS,
    SOL,
    BatchState,
    FailureKind,
    InclusionProof,
    Owed,
    Verdict,
    check_transition,
    inclusion_proof,
    isolate_failure,
    leaf_hash,
    memo_of_root,
    merkle_root,
    node_hash,
    payer_covers,
    plan_batches,
    recovery_verdict,
    root_of_memo,
    verify_inclusion,
)


def h(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(4, "big")).digest()


def test_root_of_known_shapes() -> None:
    a, b, c = sorted([h(1), h(2), h(3)])
    assert merkle_root([a]) == leaf_hash(a)
    assert merkle_root([b, a]) == node_hash(leaf_hash(a), leaf_hash(b))
    # RFC 6962: three leaves split 2 + 1.
    assert merkle_root([c, a, b]) == node_hash(node_hash(leaf_hash(a), leaf_hash(b)), leaf_hash(c))
    assert merkle_root([]) == hashlib.sha256(b"").digest()
    with pytest.raises(LocalProtocolError):
        merkle_root([a, a])


@given(st.integers(min_value=1, max_value=70), st.data())
def test_every_leaf_proves_and_tampering_fails(n: int, data: st.DataObject) -> None:
    hashes = [h(i) for i in range(n)]
    k = data.draw(st.integers(min_value=0, max_value=n - 1))
    proof = inclusion_proof(hashes, hashes[k])
    assert proof.root == merkle_root(hashes)
    assert verify_inclusion(proof)
    assert verify_inclusion(InclusionProof.from_json(proof.to_json()))
    assert not verify_inclusion(proof, root=h(999))
    other = InclusionProof(proof_hash=h(10_000), index=proof.index, size=proof.size, path=proof.path, root=proof.root)
    assert not verify_inclusion(other)
    if proof.path:
        bent = InclusionProof(proof_hash=proof.proof_hash, index=proof.index, size=proof.size,
                              path=(h(5000),) + proof.path[1:], root=proof.root)
        assert not verify_inclusion(bent)


@given(st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(), st.lists(st.text()))))
def test_inclusion_json_decoder_never_crashes(doc: dict) -> None:  # type: ignore[type-arg]
    try:
        InclusionProof.from_json(doc)
    except ValueError:
        pass


def test_memo_round_trip() -> None:
    assert root_of_memo(memo_of_root(h(1))) == h(1)
    assert root_of_memo("hello") is None
    assert root_of_memo("zz" * 32) is None


def owed(i: int, addr: str, amount: int, currency: str = SOL) -> Owed:
    return Owed(owed_id=i, proof_hash=h(i), payout_address=addr, amount=amount, currency=currency)


def test_plan_groups_recipients_and_caps_batches() -> None:
    rows = [owed(i, f"A{i % 45}", 1_000_000) for i in range(90)]
    plan = plan_batches(rows, balances={}, rent_exempt_min_lamports=890_880, transfers_max=19)
    assert [len(b.transfers) for b in plan.batches] == [19, 19, 7]
    assert all(t.amount == 2_000_000 and len(t.owed_ids) == 2 for b in plan.batches for t in b.transfers)
    assert sorted(i for b in plan.batches for i in b.owed_ids) == list(range(90))


def test_plan_rent_rule_waits_and_accumulates() -> None:
    rows = [owed(1, "new", 500_000), owed(2, "new", 300_000), owed(3, "funded", 1), owed(4, "tok", 1, "MintX")]
    plan = plan_batches(rows, balances={"funded": 5}, rent_exempt_min_lamports=890_880, transfers_max=19)
    assert plan.waiting == (1, 2)
    assert sorted(i for b in plan.batches for i in b.owed_ids) == [3, 4]  # SPL never waits
    rows.append(owed(5, "new", 100_000))
    plan = plan_batches(rows, balances={"funded": 5}, rent_exempt_min_lamports=890_880, transfers_max=19)
    assert plan.waiting == ()


def test_plan_limits() -> None:
    with pytest.raises(LocalProtocolError):
        plan_batches([], balances={}, rent_exempt_min_lamports=0, transfers_max=63)
    with pytest.raises(LocalProtocolError):
        owed(1, "a", 0)


def test_isolate_failure() -> None:
    plan = plan_batches([owed(i, f"A{i}", 10**6) for i in range(6)], balances={}, rent_exempt_min_lamports=0,
                        transfers_max=19).batches[0]
    d = isolate_failure(plan, transfer_index=2, payer_fault=False, rent_fault=False)
    assert d.kind is FailureKind.ONE_TRANSFER and d.failed == (2,) and sorted(d.retry) == [0, 1, 3, 4, 5]
    d = isolate_failure(plan, transfer_index=2, payer_fault=False, rent_fault=True)
    assert d.failed == () and sorted(d.retry) == list(range(6))
    d = isolate_failure(plan, transfer_index=None, payer_fault=True, rent_fault=False)
    assert d.kind is FailureKind.PAYER and d.failed == ()
    d = isolate_failure(plan, transfer_index=None, payer_fault=False, rent_fault=False)
    assert d.kind is FailureKind.UNKNOWN and d.halves == ((0, 1, 2), (3, 4, 5))


def test_recovery_verdicts_and_states() -> None:
    assert recovery_verdict(found=True, err=False, block_height=10, last_valid_block_height=5) is Verdict.PAID
    assert recovery_verdict(found=True, err=True, block_height=1, last_valid_block_height=5) is Verdict.FAILED
    assert recovery_verdict(found=False, err=False, block_height=6, last_valid_block_height=5) is Verdict.EXPIRED
    assert recovery_verdict(found=False, err=False, block_height=5, last_valid_block_height=5) is Verdict.RESEND
    check_transition(BatchState.SIGNED, BatchState.PAID)
    with pytest.raises(LocalProtocolError):
        check_transition(BatchState.PAID, BatchState.EXPIRED)
    assert all(BATCH_TRANSITIONS[s] == () for s in (BatchState.PAID, BatchState.FAILED, BatchState.EXPIRED))


def test_payer_covers() -> None:
    assert payer_covers(balance_lamports=10, needed=10).ok
    assert not payer_covers(balance_lamports=10, needed=10, reserve_lamports=1).ok
    assert "unknown" in payer_covers(balance_lamports=None, needed=1).reason
