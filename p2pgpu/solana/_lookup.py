"""Address lookup tables: how one transaction pays 51 recipients instead of 19.

A v0 transaction can name accounts by a one-byte index into an on-chain
lookup table instead of their 32-byte address.  A payer that pays the same
workers again and again keeps them in a table it owns: created once
(``CreateLookupTable``), extended with up to 30 addresses per transaction
(``ExtendLookupTable``), usable one slot after each extension.  solders 0.29
ships no builders for this program, so the two instructions are encoded here
from the program's (stable) bincode layout:

* create: ``u32 0, u64 recent_slot, u8 bump``; accounts: table (w), authority,
  payer (w, s), System program.  The table's address is the PDA of
  ``[authority, recent_slot as u64 LE]``; ``recent_slot`` must be in SlotHashes.
* extend: ``u32 2, u64 n, n * 32 bytes``; accounts: table (w), authority (s),
  payer (w, s), System program.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import trio
from solders.address_lookup_table_account import AddressLookupTable, AddressLookupTableAccount
from solders.instruction import AccountMeta, Instruction
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.transaction import Transaction

from ._svm import LOOKUP_TABLE_PROGRAM, SYSTEM_PROGRAM

addresses_per_extend_max = 30
table_addresses_max = 256


def create_instruction(authority: Pubkey, payer: Pubkey, recent_slot: int) -> tuple[Instruction, Pubkey]:
    table, bump = Pubkey.find_program_address([bytes(authority), struct.pack("<Q", recent_slot)], LOOKUP_TABLE_PROGRAM)
    ix = Instruction(
        LOOKUP_TABLE_PROGRAM,
        struct.pack("<IQB", 0, recent_slot, bump),
        [AccountMeta(table, False, True), AccountMeta(authority, False, False), AccountMeta(payer, True, True),
         AccountMeta(SYSTEM_PROGRAM, False, False)],
    )
    return ix, table


def extend_instruction(table: Pubkey, authority: Pubkey, payer: Pubkey, addresses: Sequence[Pubkey]) -> Instruction:
    if not 0 < len(addresses) <= addresses_per_extend_max:
        raise ValueError(f"extend with 1 to {addresses_per_extend_max} addresses")
    return Instruction(
        LOOKUP_TABLE_PROGRAM,
        struct.pack("<IQ", 2, len(addresses)) + b"".join(bytes(a) for a in addresses),
        [AccountMeta(table, False, True), AccountMeta(authority, True, False), AccountMeta(payer, True, True),
         AccountMeta(SYSTEM_PROGRAM, False, False)],
    )


async def _send_and_wait(ledger: Any, raw: bytes, poll_s: float) -> None:
    sig = await ledger.send(raw)
    for _ in range(int(60 / poll_s)):
        (st,) = await ledger.statuses([sig])
        if st is not None:
            if st.err is not None:
                raise RuntimeError(f"lookup table transaction failed: {st.err}")
            return
        await trio.sleep(poll_s)
    raise TimeoutError("lookup table transaction not confirmed")


async def _free_table(ledger: Any, payer: Keypair, poll_s: float) -> tuple[Instruction, Pubkey]:
    """One table per (authority, recent slot): use a recent slot not used yet, or wait for one."""
    for _ in range(int(60 / poll_s)):
        slot = await ledger.slot()
        for recent in range(slot, max(-1, slot - 100), -1):
            ix, table = create_instruction(payer.pubkey(), payer.pubkey(), recent)
            (existing,) = await ledger.accounts([table])
            if existing is None:
                return ix, table
        await trio.sleep(poll_s)
    raise TimeoutError("no free recent slot for a new lookup table")


async def create_lookup_table(
    ledger: Any, payer: Keypair, addresses: Sequence[Pubkey], *, poll_s: float = 0.05
) -> Pubkey:
    """Create a table owned by ``payer`` holding ``addresses``; returns its address."""
    if len(addresses) > table_addresses_max:
        raise ValueError(f"a lookup table holds at most {table_addresses_max} addresses")
    ix, table = await _free_table(ledger, payer, poll_s)
    bh, _ = await ledger.latest_blockhash()
    await _send_and_wait(ledger, bytes(Transaction.new_signed_with_payer([ix], payer.pubkey(), [payer], bh)), poll_s)
    for i in range(0, len(addresses), addresses_per_extend_max):
        ext = extend_instruction(table, payer.pubkey(), payer.pubkey(), addresses[i : i + addresses_per_extend_max])
        bh, _ = await ledger.latest_blockhash()
        await _send_and_wait(ledger, bytes(Transaction.new_signed_with_payer([ext], payer.pubkey(), [payer], bh)),
                             poll_s)
    return table


async def load_lookup_table(ledger: Any, table: Pubkey) -> AddressLookupTableAccount:
    (acc,) = await ledger.accounts([table])
    if acc is None:
        raise LookupError(f"lookup table {table} not found")
    return AddressLookupTableAccount(table, list(AddressLookupTable.deserialize(bytes(acc.data)).addresses))
