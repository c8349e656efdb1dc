"""Payout decisions at their edges (#19): every boundary on both sides and
every field of what ``plan_batches``, ``isolate_failure`` and ``payer_covers``
return, so that a wrong change to who is paid, how much, in which currency,
or for which proofs fails a test.  The known answers of the Merkle tree are in
``tests/data/vectors.json`` (``test_vectors.py``)."""

from __future__ import annotations

import hashlib

import pytest

from p2pgpu.core import LocalProtocolError
from p2pgpu.core._payout import (
    SOL,
    BatchPlan,
    BatchState,
    FailureDecision,
    FailureKind,
    FundsVerdict,
    InclusionProof,
    Owed,
    Transfer,
    amount_max,
    check_transition,
    inclusion_proof,
    isolate_failure,
    leaf_hash,
    merkle_root,
    payer_covers,
    plan_batches,
    transfers_max_ceiling,
    verify_inclusion,
)


def h(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(4, "big")).digest()


def owed(i: int, addr: str, amount: int, currency: str = SOL) -> Owed:
    return Owed(owed_id=i, proof_hash=h(i), payout_address=addr, amount=amount, currency=currency)


def plan_of(rows: list[Owed], **kw: object) -> tuple[BatchPlan, ...]:
    args: dict[str, object] = {"balances": {}, "rent_exempt_min_lamports": 0, "transfers_max": 19}
    args.update(kw)
    return plan_batches(rows, **args).batches  # type: ignore[arg-type]


# --- hashes in and out ------------------------------------------------------


def test_proof_hashes_must_be_32_bytes_of_type_bytes() -> None:
    with pytest.raises(LocalProtocolError, match="a proof hash is 32 bytes"):
        merkle_root([h(1)[:31]])
    with pytest.raises(LocalProtocolError, match="a proof hash is 32 bytes"):
        merkle_root([bytearray(h(1))])  # type: ignore[list-item]  # the right length, not bytes
    with pytest.raises(LocalProtocolError, match="the same proof hash twice in one batch"):
        merkle_root([h(1), h(2), h(1)])
    with pytest.raises(LocalProtocolError, match="that proof hash is not in the batch"):
        inclusion_proof([h(1), h(2)], h(3))


def test_batch_root_is_the_root_of_its_proof_hashes() -> None:
    rows = [owed(1, "A", 5), owed(2, "B", 5), owed(3, "A", 5)]
    (batch,) = plan_of(rows)
    assert batch.merkle_root() == merkle_root([h(1), h(2), h(3)])
    assert batch.merkle_root() != merkle_root([h(1), h(2)])


# --- inclusion proofs -------------------------------------------------------


def test_a_path_longer_than_the_tree_is_refused() -> None:
    # One leaf: the root is the leaf itself and the path must be empty.  An
    # extra step must not be skipped over (nor the root left uncompared).
    a = h(1)
    honest = InclusionProof(proof_hash=a, index=0, size=1, path=(), root=leaf_hash(a))
    assert verify_inclusion(honest)
    padded = InclusionProof(proof_hash=a, index=0, size=1, path=(h(2),), root=leaf_hash(a))
    assert not verify_inclusion(padded)
    # Two leaves, a valid path plus one more step.
    proof = inclusion_proof([h(1), h(2)], h(1))
    longer = InclusionProof(proof_hash=proof.proof_hash, index=proof.index, size=proof.size,
                            path=proof.path + (h(3),), root=proof.root)
    assert verify_inclusion(proof) and not verify_inclusion(longer)


def test_inclusion_proof_fields_are_checked_one_by_one() -> None:
    a, r = h(1), h(2)
    InclusionProof(proof_hash=a, index=0, size=1, path=(), root=r)
    with pytest.raises(LocalProtocolError, match="hashes are 32 bytes"):
        InclusionProof(proof_hash=a[:31], index=0, size=1, path=(), root=r)
    with pytest.raises(LocalProtocolError, match="hashes are 32 bytes"):
        InclusionProof(proof_hash=a, index=0, size=1, path=(), root=r[:31])
    InclusionProof(proof_hash=a, index=4, size=5, path=(), root=r)
    with pytest.raises(LocalProtocolError, match="index out of range"):
        InclusionProof(proof_hash=a, index=5, size=5, path=(), root=r)
    with pytest.raises(LocalProtocolError, match="index out of range"):
        InclusionProof(proof_hash=a, index=-1, size=5, path=(), root=r)
    InclusionProof(proof_hash=a, index=0, size=1, path=(r,) * 64, root=r)  # 64 steps: 2**64 leaves
    with pytest.raises(LocalProtocolError, match="bad audit path"):
        InclusionProof(proof_hash=a, index=0, size=1, path=(r,) * 65, root=r)
    with pytest.raises(LocalProtocolError, match="bad audit path"):
        InclusionProof(proof_hash=a, index=0, size=1, path=(r, r[:31]), root=r)


def test_inclusion_json_errors_say_what_is_wrong() -> None:
    good = inclusion_proof([h(1), h(2), h(3)], h(2)).to_json()
    assert InclusionProof.from_json(good) == inclusion_proof([h(1), h(2), h(3)], h(2))
    with pytest.raises(ValueError, match="path must be a list"):
        InclusionProof.from_json({**good, "path": "ab"})
    with pytest.raises(ValueError, match="index and size must be integers"):
        InclusionProof.from_json({**good, "size": "3"})
    with pytest.raises(ValueError, match="index and size must be integers"):
        InclusionProof.from_json({**good, "index": True})
    with pytest.raises(ValueError, match="missing field root"):
        InclusionProof.from_json({k: v for k, v in good.items() if k != "root"})
    with pytest.raises(ValueError, match="index out of range"):
        InclusionProof.from_json({**good, "index": 3})


# --- owed rows --------------------------------------------------------------


def test_owed_amount_bounds() -> None:
    assert owed(1, "A", amount_max).amount == amount_max
    assert owed(1, "A", 1).amount == 1
    with pytest.raises(LocalProtocolError, match=f"amount {amount_max + 1} out of range"):
        owed(1, "A", amount_max + 1)
    with pytest.raises(LocalProtocolError, match="amount 0 out of range"):
        owed(1, "A", 0)
    with pytest.raises(LocalProtocolError, match="proof_hash is 32 bytes"):
        Owed(owed_id=1, proof_hash=b"\x00" * 31, payout_address="A", amount=1, currency=SOL)


# --- planning ---------------------------------------------------------------


def test_every_field_of_a_plan() -> None:
    rows = [owed(3, "B", 7), owed(1, "A", 5), owed(2, "A", 6), owed(4, "C", 9, "MintX"), owed(5, "B", 1)]
    plan = plan_batches(rows, balances={}, rent_exempt_min_lamports=0, transfers_max=19)
    assert plan.batches == (
        BatchPlan(currency=SOL, transfers=(
            Transfer(address="A", amount=11, owed_ids=(1, 2), proof_hashes=(h(1), h(2))),
            Transfer(address="B", amount=8, owed_ids=(3, 5), proof_hashes=(h(3), h(5))),
        )),
        BatchPlan(currency="MintX", transfers=(
            Transfer(address="C", amount=9, owed_ids=(4,), proof_hashes=(h(4),)),
        )),
    )
    assert plan.waiting == ()
    assert plan.batches[0].owed_ids == (1, 2, 3, 5) and plan.batches[0].total == 19
    assert plan.batches[0].proof_hashes == (h(1), h(2), h(3), h(5))


def test_transfers_max_bounds() -> None:
    rows = [owed(i, f"A{i}", 1) for i in range(70)]
    assert [len(b.transfers) for b in plan_of(rows, transfers_max=1)] == [1] * 70
    assert [len(b.transfers) for b in plan_of(rows, transfers_max=transfers_max_ceiling)] == [62, 8]
    for bad in (0, transfers_max_ceiling + 1):
        with pytest.raises(LocalProtocolError, match=r"transfers_max must be in \[1, 62\]"):
            plan_of(rows, transfers_max=bad)


def test_batches_max_stops_the_plan_at_the_limit() -> None:
    rows = [owed(i, f"A{i}", 1) for i in range(1_001)]
    assert len(plan_of(rows, transfers_max=1)) == 1_000  # the default
    assert len(plan_of(rows, transfers_max=1, batches_max=2)) == 2
    # The cap holds across currencies too: the second currency gets nothing.
    two = [owed(1, "A", 1), owed(2, "B", 1, "MintX")]
    assert [b.currency for b in plan_of(two, batches_max=1)] == [SOL]


def test_rent_rule_at_the_exempt_minimum() -> None:
    plan = plan_batches([owed(1, "new", 890_880)], balances={}, rent_exempt_min_lamports=890_880, transfers_max=19)
    assert plan.waiting == () and plan.batches[0].owed_ids == (1,)
    plan = plan_batches([owed(1, "new", 890_879)], balances={}, rent_exempt_min_lamports=890_880, transfers_max=19)
    assert plan.waiting == (1,) and plan.batches == ()


def test_a_recipient_owed_exactly_the_maximum_is_paid_whole() -> None:
    (batch,) = plan_of([owed(1, "A", amount_max - 1), owed(2, "A", 1)])
    assert batch.transfers == (Transfer(address="A", amount=amount_max, owed_ids=(1, 2), proof_hashes=(h(1), h(2))),)


def test_a_recipient_owed_above_the_maximum_is_paid_what_fits_oldest_first() -> None:
    rows = [owed(1, "A", amount_max - 10), owed(2, "A", 5), owed(3, "A", 10), owed(4, "A", 1), owed(5, "B", 3)]
    plan = plan_batches(rows, balances={}, rent_exempt_min_lamports=0, transfers_max=19)
    assert plan.batches == (BatchPlan(currency=SOL, transfers=(
        Transfer(address="A", amount=amount_max - 5, owed_ids=(1, 2), proof_hashes=(h(1), h(2))),
        Transfer(address="B", amount=3, owed_ids=(5,), proof_hashes=(h(5),)),
    )),)
    # Rows 3 and 4 stay owed for a later plan: neither paid nor waiting.
    assert plan.waiting == ()
    # Exactly the maximum after the first row: the second row no longer fits.
    (batch,) = plan_of([owed(1, "A", amount_max), owed(2, "A", 1)])
    assert batch.transfers == (Transfer(address="A", amount=amount_max, owed_ids=(1,), proof_hashes=(h(1),)),)


# --- after a failure --------------------------------------------------------


def _batch(n: int) -> BatchPlan:
    return plan_of([owed(i, f"A{i}", 10) for i in range(n)])[0]


def _batch_decision(n: int, *, transfer_index: int | None, payer_fault: bool = False,
                    rent_fault: bool = False) -> FailureDecision:
    return isolate_failure(_batch(n), transfer_index=transfer_index, payer_fault=payer_fault, rent_fault=rent_fault)


def test_payer_fault_sends_every_row_back_in_order() -> None:
    d = _batch_decision(3, transfer_index=1, payer_fault=True)
    assert d == FailureDecision(kind=FailureKind.PAYER, retry=(0, 1, 2), failed=())


def test_blamed_transfer_at_both_ends_of_the_batch() -> None:
    assert _batch_decision(3, transfer_index=0) == FailureDecision(
        kind=FailureKind.ONE_TRANSFER, retry=(1, 2), failed=(0,))
    assert _batch_decision(3, transfer_index=2) == FailureDecision(
        kind=FailureKind.ONE_TRANSFER, retry=(0, 1), failed=(2,))
    assert _batch_decision(3, transfer_index=0, rent_fault=True) == FailureDecision(
        kind=FailureKind.ONE_TRANSFER, retry=(1, 2, 0), failed=())


def test_a_blamed_index_outside_the_batch_is_an_unknown_cause() -> None:
    for index in (3, -1):
        assert _batch_decision(3, transfer_index=index) == FailureDecision(
            kind=FailureKind.UNKNOWN, retry=(), failed=(), halves=((0,), (1, 2)))


def test_splitting_stops_at_one_transfer() -> None:
    assert _batch_decision(1, transfer_index=None) == FailureDecision(
        kind=FailureKind.ONE_TRANSFER, retry=(), failed=(0,))
    assert _batch_decision(2, transfer_index=None) == FailureDecision(
        kind=FailureKind.UNKNOWN, retry=(), failed=(), halves=((0,), (1,)))


# --- states and funds -------------------------------------------------------


def test_a_refused_transition_names_both_states() -> None:
    with pytest.raises(LocalProtocolError, match="batch cannot go from paid to sent"):
        check_transition(BatchState.PAID, BatchState.SENT)


def test_payer_covers_every_field() -> None:
    assert payer_covers(balance_lamports=None, needed=1) == FundsVerdict(
        ok=False, reason="payer balance unknown (ledger unreachable)")
    assert payer_covers(balance_lamports=10, needed=8, reserve_lamports=3) == FundsVerdict(
        ok=False, reason="payer balance 10 is below the job's ceiling 8 plus reserve 3")
    assert payer_covers(balance_lamports=11, needed=8, reserve_lamports=3) == FundsVerdict(ok=True, reason="")
    assert payer_covers(balance_lamports=0, needed=0) == FundsVerdict(ok=True, reason="")
