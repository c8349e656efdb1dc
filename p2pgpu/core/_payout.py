"""Payout decisions: what to pay in which transaction, and how to prove it.

Pure functions, no I/O.  The payer (``p2pgpu/solana/_payer.py``) reads owed
rows from the outbox, asks :func:`plan_batches` which transfers go together,
signs and sends them, and when a batch fails asks :func:`isolate_failure`
which rows to retry, hold or give up on.  Everything that decides behaviour
iterates lists in a fixed order (oldest owed row first), so two runs over the
same outbox make the same batches.

Batches and their Merkle roots
------------------------------
Each Solana transaction pays one batch: one transfer per recipient (the sum of
all its owed rows in that batch), plus one memo carrying the Merkle root of
the proof hashes it pays, 64 lowercase hex characters.  The tree is RFC 6962's
(Certificate Transparency) with SHA-256, over the batch's proof hashes sorted
bytewise:

* leaf  = SHA-256(0x00 || proof_hash)
* node  = SHA-256(0x01 || left || right)
* a list of n > 1 leaves splits at k, the largest power of two below n.

The 0x00/0x01 prefixes keep a leaf from ever being read as an inner node.
:func:`inclusion_proof` gives the audit path of one hash; :func:`verify_inclusion`
checks it against a root (RFC 9162, section 2.1.3.2).

Limits, measured with one 64-hex memo per transaction and 5,000 lamports per
signature: 19 SOL transfers fit the 1,232-byte packet as a legacy or v0
message, 51 with an address lookup table, and 62 is the account-lock ceiling
(64 accounts per transaction).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from itertools import pairwise

from ._errors import LocalProtocolError

SOL = "SOL"
#: SOL transfers per transaction with a memo: legacy or v0 without a lookup table.
transfers_max_plain = 19
#: ... with an address lookup table holding the recipients.
transfers_max_lookup = 51
#: The account-lock ceiling: 64 accounts, minus the payer and the System program.
transfers_max_ceiling = 62
#: Fee of one signature, the only one a payout transaction carries.
fee_per_signature_lamports = 5_000
proof_hash_bytes = 32
#: Above this, one owed row is refused: no single proof is worth more (2**63-1 lamports).
amount_max = 2**63 - 1

_LEAF = b"\x00"
_NODE = b"\x01"


# --- Merkle tree (RFC 6962) -------------------------------------------------


def leaf_hash(proof_hash: bytes) -> bytes:
    return hashlib.sha256(_LEAF + proof_hash).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(_NODE + left + right).digest()


def _split(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def _root(leaves: Sequence[bytes]) -> bytes:
    if len(leaves) == 1:
        return leaves[0]
    k = _split(len(leaves))
    return node_hash(_root(leaves[:k]), _root(leaves[k:]))


def merkle_root(proof_hashes: Sequence[bytes]) -> bytes:
    """Root over the proof hashes sorted bytewise (duplicates are refused)."""
    ordered = _ordered(proof_hashes)
    if not ordered:
        return hashlib.sha256(b"").digest()
    return _root([leaf_hash(h) for h in ordered])


def _ordered(proof_hashes: Sequence[bytes]) -> list[bytes]:
    for h in proof_hashes:
        if not isinstance(h, bytes) or len(h) != proof_hash_bytes:
            raise LocalProtocolError("a proof hash is 32 bytes")
    ordered = sorted(proof_hashes)
    for a, b in pairwise(ordered):
        if a == b:
            raise LocalProtocolError("the same proof hash twice in one batch")
    return ordered


@dataclass(frozen=True, kw_only=True)
class InclusionProof:
    """That ``proof_hash`` is leaf ``index`` of ``size`` under ``root``."""

    proof_hash: bytes
    index: int
    size: int
    path: tuple[bytes, ...]
    root: bytes

    def __post_init__(self) -> None:
        if len(self.proof_hash) != proof_hash_bytes or len(self.root) != 32:
            raise LocalProtocolError("hashes are 32 bytes")
        if not 0 <= self.index < self.size:
            raise LocalProtocolError("index out of range")
        if len(self.path) > 64 or any(len(p) != 32 for p in self.path):
            raise LocalProtocolError("bad audit path")

    def to_json(self) -> dict[str, object]:
        return {
            "proof_hash": self.proof_hash.hex(),
            "index": self.index,
            "size": self.size,
            "path": [p.hex() for p in self.path],
            "root": self.root.hex(),
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, object]) -> InclusionProof:
        """Build from JSON (a user file); raises ``ValueError`` saying what is wrong."""
        try:
            path = doc["path"]
            if not isinstance(path, list):
                raise ValueError("path must be a list")
            index, size = doc["index"], doc["size"]
            if type(index) is not int or type(size) is not int:
                raise ValueError("index and size must be integers")
            return cls(
                proof_hash=bytes.fromhex(str(doc["proof_hash"])),
                index=index,
                size=size,
                path=tuple(bytes.fromhex(str(p)) for p in path),
                root=bytes.fromhex(str(doc["root"])),
            )
        except KeyError as exc:
            raise ValueError(f"missing field {exc.args[0]}") from None
        except LocalProtocolError as exc:
            raise ValueError(str(exc)) from None


def _path(leaves: Sequence[bytes], m: int) -> list[bytes]:
    n = len(leaves)
    if n == 1:
        return []
    k = _split(n)
    if m < k:
        return _path(leaves[:k], m) + [_root(leaves[k:])]
    return _path(leaves[k:], m - k) + [_root(leaves[:k])]


def inclusion_proof(proof_hashes: Sequence[bytes], proof_hash: bytes) -> InclusionProof:
    ordered = _ordered(proof_hashes)
    if proof_hash not in ordered:
        raise LocalProtocolError("that proof hash is not in the batch")
    leaves = [leaf_hash(h) for h in ordered]
    index = ordered.index(proof_hash)
    return InclusionProof(
        proof_hash=proof_hash, index=index, size=len(ordered), path=tuple(_path(leaves, index)), root=_root(leaves)
    )


def verify_inclusion(proof: InclusionProof, root: bytes | None = None) -> bool:
    """True when the audit path leads from the leaf to ``root`` (default: the proof's own)."""
    fn, sn = proof.index, proof.size - 1
    r = leaf_hash(proof.proof_hash)
    for p in proof.path:
        if sn == 0:
            return False
        if fn % 2 == 1 or fn == sn:
            r = node_hash(p, r)
            if fn % 2 == 0:
                while fn % 2 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == (proof.root if root is None else root)


def memo_of_root(root: bytes) -> str:
    """The memo text a payout transaction carries: the root as 64 hex chars."""
    return root.hex()


def root_of_memo(memo: str) -> bytes | None:
    """The root in a memo, or None when the memo is not a payout root."""
    text = memo.strip()
    if len(text) != 64:
        return None
    try:
        return bytes.fromhex(text)
    except ValueError:
        return None


# --- Planning batches -------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Owed:
    """One owed row of the outbox (one verified proof)."""

    owed_id: int
    proof_hash: bytes
    payout_address: str
    amount: int
    currency: str

    def __post_init__(self) -> None:
        if len(self.proof_hash) != proof_hash_bytes:
            raise LocalProtocolError("proof_hash is 32 bytes")
        if not 0 < self.amount <= amount_max:
            raise LocalProtocolError(f"amount {self.amount} out of range")


@dataclass(frozen=True, kw_only=True)
class Transfer:
    """One instruction's worth: all of one recipient's rows in a batch."""

    address: str
    amount: int
    owed_ids: tuple[int, ...]
    proof_hashes: tuple[bytes, ...]


@dataclass(frozen=True, kw_only=True)
class BatchPlan:
    currency: str
    transfers: tuple[Transfer, ...]

    @property
    def owed_ids(self) -> tuple[int, ...]:
        return tuple(i for t in self.transfers for i in t.owed_ids)

    @property
    def proof_hashes(self) -> tuple[bytes, ...]:
        return tuple(h for t in self.transfers for h in t.proof_hashes)

    @property
    def total(self) -> int:
        return sum(t.amount for t in self.transfers)

    def merkle_root(self) -> bytes:
        return merkle_root(self.proof_hashes)


@dataclass(frozen=True, kw_only=True)
class Plan:
    batches: tuple[BatchPlan, ...]
    #: Rows that wait: their recipient's account does not exist yet and the sum
    #: owed to it is below the rent-exempt minimum a new account needs.
    waiting: tuple[int, ...] = field(default=())


def plan_batches(
    owed: Sequence[Owed],
    *,
    balances: Mapping[str, int],
    rent_exempt_min_lamports: int,
    transfers_max: int,
    batches_max: int = 1_000,
) -> Plan:
    """Group owed rows into batches of at most ``transfers_max`` recipients.

    Rows are taken oldest first (by ``owed_id``).  For SOL, a recipient whose
    balance (``balances``, lamports; missing means 0) is 0 and who is owed
    less in total than ``rent_exempt_min_lamports`` waits: such a transfer
    would fail the whole transaction, and the amount accumulates until it is
    payable.  SPL token payouts never wait (the payer creates the recipient's
    token account).  One recipient appears in at most one transfer per plan.
    """
    if not 1 <= transfers_max <= transfers_max_ceiling:
        raise LocalProtocolError(f"transfers_max must be in [1, {transfers_max_ceiling}]")
    by_key: dict[tuple[str, str], list[Owed]] = {}
    for row in sorted(owed, key=lambda o: o.owed_id):
        by_key.setdefault((row.currency, row.payout_address), []).append(row)
    waiting: list[int] = []
    per_currency: dict[str, list[Transfer]] = {}
    for (currency, address), rows in by_key.items():
        total = sum(r.amount for r in rows)
        if currency == SOL and balances.get(address, 0) == 0 and total < rent_exempt_min_lamports:
            waiting.extend(r.owed_id for r in rows)
            continue
        if total > amount_max:
            # Pay what fits now; the rest goes in a later batch.
            acc, kept = 0, []
            for r in rows:
                if acc + r.amount > amount_max:
                    break
                acc += r.amount
                kept.append(r)
            rows, total = kept, acc
        per_currency.setdefault(currency, []).append(
            Transfer(
                address=address,
                amount=total,
                owed_ids=tuple(r.owed_id for r in rows),
                proof_hashes=tuple(r.proof_hash for r in rows),
            )
        )
    batches: list[BatchPlan] = []
    for currency, transfers in per_currency.items():
        for i in range(0, len(transfers), transfers_max):
            if len(batches) >= batches_max:
                break
            batches.append(BatchPlan(currency=currency, transfers=tuple(transfers[i : i + transfers_max])))
    return Plan(batches=tuple(batches), waiting=tuple(sorted(waiting)))


# --- After a failure --------------------------------------------------------


class FailureKind(Enum):
    #: The payer cannot pay (fee or amount): nothing is the recipients' fault;
    #: all rows go back to owed and the payer pauses.
    PAYER = "payer"
    #: One known transfer failed: that recipient's rows are held as failed, or
    #: sent back to wait when its account lacked rent; the rest are retried.
    ONE_TRANSFER = "one_transfer"
    #: Cause unknown: split the batch in two and retry each half alone.
    UNKNOWN = "unknown"


@dataclass(frozen=True, kw_only=True)
class FailureDecision:
    kind: FailureKind
    retry: tuple[int, ...]  # owed ids back to owed (any batch)
    failed: tuple[int, ...]  # owed ids held as failed (need an operator)
    halves: tuple[tuple[int, ...], ...] = ()  # owed ids to retry as separate batches


def isolate_failure(plan: BatchPlan, *, transfer_index: int | None, payer_fault: bool, rent_fault: bool) -> FailureDecision:
    """Decide what to do with the rows of a batch whose transaction failed.

    ``transfer_index`` is the transfer the ledger blamed (from the failing
    instruction or account index), when known.  A batch of one transfer with
    an unknown cause fails that transfer alone: this is where splitting ends.
    """
    all_ids = plan.owed_ids
    if payer_fault:
        return FailureDecision(kind=FailureKind.PAYER, retry=all_ids, failed=())
    if transfer_index is not None and 0 <= transfer_index < len(plan.transfers):
        bad = plan.transfers[transfer_index]
        rest = tuple(i for t in plan.transfers if t is not bad for i in t.owed_ids)
        if rent_fault:
            return FailureDecision(kind=FailureKind.ONE_TRANSFER, retry=rest + bad.owed_ids, failed=())
        return FailureDecision(kind=FailureKind.ONE_TRANSFER, retry=rest, failed=bad.owed_ids)
    if len(plan.transfers) == 1:
        return FailureDecision(kind=FailureKind.ONE_TRANSFER, retry=(), failed=all_ids)
    half = len(plan.transfers) // 2
    left = tuple(i for t in plan.transfers[:half] for i in t.owed_ids)
    right = tuple(i for t in plan.transfers[half:] for i in t.owed_ids)
    return FailureDecision(kind=FailureKind.UNKNOWN, retry=(), failed=(), halves=(left, right))


# --- Batch states -----------------------------------------------------------


class BatchState(str, Enum):
    SIGNED = "signed"  # signature, blockhash, last valid height and tx bytes recorded; maybe sent
    SENT = "sent"  # the ledger accepted it for processing at least once
    PAID = "paid"  # seen on the ledger without error: final
    FAILED = "failed"  # seen on the ledger with an error (fee charged): rows decided by isolate_failure
    EXPIRED = "expired"  # not on the ledger and its blockhash can no longer land: rows back to owed


#: The only allowed moves.  A signed batch may be found paid without a "sent"
#: record (the crash came between the send and its bookkeeping).
BATCH_TRANSITIONS: dict[BatchState, tuple[BatchState, ...]] = {
    BatchState.SIGNED: (BatchState.SENT, BatchState.PAID, BatchState.FAILED, BatchState.EXPIRED),
    BatchState.SENT: (BatchState.PAID, BatchState.FAILED, BatchState.EXPIRED),
    BatchState.PAID: (),
    BatchState.FAILED: (),
    BatchState.EXPIRED: (),
}


def check_transition(old: BatchState, new: BatchState) -> None:
    if new not in BATCH_TRANSITIONS[old]:
        raise LocalProtocolError(f"batch cannot go from {old.value} to {new.value}")


class Verdict(Enum):
    PAID = "paid"
    FAILED = "failed"
    EXPIRED = "expired"
    RESEND = "resend"  # still unknown and can still land: send the same bytes again
    WAIT = "wait"


def recovery_verdict(
    *, found: bool, err: bool, block_height: int, last_valid_block_height: int, confirmed: bool = True
) -> Verdict:
    """What a payer does with a signed batch after looking it up.

    The block height must have been read BEFORE the signature status: if the
    height was already past the last valid height and the status came back
    empty afterwards, the transaction can never land, so rebuilding it cannot
    pay twice.  A status seen only at "processed" (a fork could still drop
    it) is waited on, never taken as paid or failed.
    """
    if found and not confirmed:
        return Verdict.WAIT
    if found:
        return Verdict.FAILED if err else Verdict.PAID
    if block_height > last_valid_block_height:
        return Verdict.EXPIRED
    return Verdict.RESEND


@dataclass(frozen=True, kw_only=True)
class FundsVerdict:
    ok: bool
    reason: str = ""


def payer_covers(*, balance_lamports: int | None, needed: int, open_lamports: int = 0,
                 reserve_lamports: int = 0) -> FundsVerdict:
    """Can a submitter whose balance is ``balance_lamports`` pay ``needed``
    on top of ``open_lamports``, what it may already owe for its other open
    jobs (the sum of their ceilings, as the caller counts them)?  Judging each
    job alone let one payer holding enough for one job open a thousand
    (#18.3)."""
    if balance_lamports is None:
        return FundsVerdict(ok=False, reason="payer balance unknown (ledger unreachable)")
    if balance_lamports < needed + open_lamports + reserve_lamports:
        also = f" plus {open_lamports} for its other open jobs" if open_lamports else ""
        return FundsVerdict(
            ok=False,
            reason=f"payer balance {balance_lamports} is below the job's ceiling {needed}{also} "
                   f"plus reserve {reserve_lamports}",
        )
    return FundsVerdict(ok=True)
