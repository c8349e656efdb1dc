"""Building payout transactions, and reading them back.

One batch (``core._payout.BatchPlan``) becomes one transaction signed by the
payer alone (one signature, 5,000 lamports of fee): a SOL ``transfer`` per
recipient, or for an SPL token a ``create_idempotent`` associated token
account instruction for each recipient whose account does not exist yet and a
``transfer_checked`` per recipient; then one memo carrying the batch's Merkle
root in hex.  The memo comes last, so that for SOL instruction ``i`` is
transfer ``i``.  With an address lookup table the message is v0 and the
recipients found in the table cost one byte each instead of 32, which is what
lifts a batch from 19 to 51 transfers.

:func:`blame` reads a failed transaction's error back to the transfer that
caused it (or to the payer), which is what lets a batch failure be isolated
without guessing.  :func:`memo_root` finds the root in a transaction, for
checking an inclusion proof against what is on the ledger.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from solders.address_lookup_table_account import AddressLookupTableAccount
from solders.hash import Hash
from solders.instruction import Instruction
from solders.keypair import Keypair
from solders.message import CompileError, MessageV0
from solders.pubkey import Pubkey
from solders.system_program import TransferParams, transfer
from solders.transaction import Transaction, VersionedTransaction
from spl.token.instructions import (
    create_idempotent_associated_token_account,
    get_associated_token_address,
    transfer_checked,
)
from spl.token.models import TransferCheckedParams

from p2pgpu.core._payout import SOL, BatchPlan, memo_of_root, root_of_memo

from ._svm import MEMO_PROGRAM, SYSTEM_PROGRAM, TOKEN_PROGRAM, packet_bytes_max


class TooLarge(Exception):
    """The batch does not fit one 1,232-byte transaction."""


@dataclass(frozen=True, kw_only=True)
class TokenInfo:
    mint: Pubkey
    decimals: int
    program: Pubkey = TOKEN_PROGRAM


def ata(owner: Pubkey, token: TokenInfo) -> Pubkey:
    return get_associated_token_address(owner, token.mint, token.program)


def build_batch(
    payer: Keypair,
    plan: BatchPlan,
    blockhash: Hash,
    *,
    token: TokenInfo | None = None,
    missing_atas: Sequence[str] = (),
    lookup: AddressLookupTableAccount | Sequence[AddressLookupTableAccount] | None = None,
) -> bytes:
    """The signed wire bytes of one batch; raises :class:`TooLarge`."""
    ixs: list[Instruction] = []
    if plan.currency == SOL:
        for t in plan.transfers:
            ixs.append(transfer(TransferParams(from_pubkey=payer.pubkey(), to_pubkey=Pubkey.from_string(t.address),
                                               lamports=t.amount)))
    else:
        if token is None or str(token.mint) != plan.currency:
            raise ValueError("an SPL batch needs the mint's TokenInfo")
        source = ata(payer.pubkey(), token)
        for t in plan.transfers:
            owner = Pubkey.from_string(t.address)
            if t.address in missing_atas:
                ixs.append(create_idempotent_associated_token_account(payer.pubkey(), owner, token.mint, token.program))
            ixs.append(
                transfer_checked(
                    TransferCheckedParams(program_id=token.program, source=source, mint=token.mint,
                                          dest=ata(owner, token), owner=payer.pubkey(), amount=t.amount,
                                          decimals=token.decimals, signers=[])
                )
            )
    ixs.append(Instruction(MEMO_PROGRAM, memo_of_root(plan.merkle_root()).encode(), []))
    if lookup is None:
        raw = bytes(Transaction.new_signed_with_payer(ixs, payer.pubkey(), [payer], blockhash))
    else:
        try:
            tables = [lookup] if isinstance(lookup, AddressLookupTableAccount) else list(lookup)
            msg = MessageV0.try_compile(payer.pubkey(), ixs, tables, blockhash)
        except CompileError as exc:  # more than 256 accounts, or similar
            raise TooLarge(str(exc)) from None
        raw = bytes(VersionedTransaction(msg, [payer]))
    if len(raw) > packet_bytes_max:
        raise TooLarge(f"{len(raw)} bytes > {packet_bytes_max}")
    return raw


def signature_of(raw: bytes) -> str:
    return str(VersionedTransaction.from_bytes(raw).signatures[0])


def blockhash_of(raw: bytes) -> str:
    return str(VersionedTransaction.from_bytes(raw).message.recent_blockhash)


def memo_root(raw: bytes) -> bytes | None:
    """The Merkle root in a payout transaction's memo, if it has one."""
    msg = VersionedTransaction.from_bytes(raw).message
    keys = list(msg.account_keys)
    for ix in msg.instructions:
        if ix.program_id_index < len(keys) and keys[ix.program_id_index] == MEMO_PROGRAM:
            try:
                root = root_of_memo(bytes(ix.data).decode())
            except UnicodeDecodeError:
                continue
            if root is not None:
                return root
    return None


@dataclass(frozen=True, kw_only=True)
class Blame:
    transfer_index: int | None
    payer_fault: bool
    rent_fault: bool


_PAYER_ERRORS = ("InsufficientFundsForFee", "AccountNotFound", "InvalidAccountForFee")


def blame(raw: bytes, plan: BatchPlan, err: Any, *, token: TokenInfo | None = None) -> Blame:
    """Which transfer of ``plan`` a transaction error points at (JSON error form)."""
    if isinstance(err, str) and err in _PAYER_ERRORS:
        return Blame(transfer_index=None, payer_fault=True, rent_fault=False)
    tx = VersionedTransaction.from_bytes(raw)
    msg = tx.message
    keys = [str(k) for k in msg.account_keys]
    payer = keys[0]
    index_of = {t.address: i for i, t in enumerate(plan.transfers)}
    if token is not None:
        index_of.update({str(ata(Pubkey.from_string(t.address), token)): i for i, t in enumerate(plan.transfers)})
    if isinstance(err, dict) and "InsufficientFundsForRent" in err:
        k = err["InsufficientFundsForRent"].get("account_index", -1)
        key = keys[k] if 0 <= k < len(keys) else None
        if key == payer:
            return Blame(transfer_index=None, payer_fault=True, rent_fault=False)
        return Blame(transfer_index=index_of.get(key or ""), payer_fault=False, rent_fault=True)
    if isinstance(err, dict) and "InstructionError" in err:
        i, ierr = err["InstructionError"]
        if not 0 <= i < len(msg.instructions):
            return Blame(transfer_index=None, payer_fault=False, rent_fault=False)
        ix = msg.instructions[i]
        program = keys[ix.program_id_index] if ix.program_id_index < len(keys) else ""
        accts = [keys[a] if a < len(keys) else "" for a in bytes(ix.accounts)]
        # System transfer Custom(1) / Token Custom(1): the source lacks funds: the payer's fault.
        if ierr == {"Custom": 1} and program in (str(SYSTEM_PROGRAM), str(TOKEN_PROGRAM)):
            return Blame(transfer_index=None, payer_fault=True, rent_fault=False)
        for a in accts[1:]:
            if a in index_of and a != payer:
                return Blame(transfer_index=index_of[a], payer_fault=False, rent_fault=False)
    return Blame(transfer_index=None, payer_fault=False, rent_fault=False)
