"""Payments as the ledger shows them: the evidence behind a receipt's paid lines.

Reputation (``core/_reputation.py``) counts a paid line only for what the
ledger shows its payer moved to the line's address in the cited transaction.
:func:`system_transfers` reads that from a transaction's bytes (the fee
payer, and each System Program ``transfer`` from it); :class:`PaymentLookup`
asks a ledger for transactions by signature, keeps only those that landed
without error, and caches the answers (bounded, and a miss is asked again
only after ``miss_ttl_s``: a payment just sent may land a moment later).

Only SOL transfers are read.  SPL token transfers, and recipients named
through an address lookup table (v0 messages), are not: such a payment
verifies nothing here and carries no weight (docs/reputation.md).
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import trio
from solders.transaction import VersionedTransaction

from p2pgpu.core._reputation import VerifiedPayment

from ._ledger import LedgerUnavailable
from ._svm import SYSTEM_PROGRAM

#: System Program instruction 2: ``transfer``, then the lamports as u64 LE.
_TRANSFER = struct.pack("<I", 2)
#: Transactions remembered, verified or not.
lookups_cached_max = 50_000
#: Lookups sent to the ledger per :meth:`PaymentLookup.payments` call at most.
lookups_per_call_max = 512


def system_transfers(raw: bytes) -> tuple[str, dict[str, int]]:
    """``(fee payer, {recipient: lamports})`` of the SOL transfers from the
    fee payer in a transaction (``ValueError`` for bytes that are not one)."""
    msg = VersionedTransaction.from_bytes(raw).message
    keys = list(msg.account_keys)
    if not keys:
        raise ValueError("a transaction without accounts")
    payer = keys[0]
    out: dict[str, int] = {}
    for ix in msg.instructions:
        data = bytes(ix.data)
        accounts = list(ix.accounts)
        if ix.program_id_index >= len(keys) or keys[ix.program_id_index] != SYSTEM_PROGRAM:
            continue
        if len(data) != 12 or data[:4] != _TRANSFER or len(accounts) < 2:
            continue
        if accounts[0] >= len(keys) or accounts[1] >= len(keys) or keys[accounts[0]] != payer:
            continue  # a recipient through a lookup table, or not from the payer: unverifiable here
        (lamports,) = struct.unpack("<Q", data[4:12])
        to = str(keys[accounts[1]])
        out[to] = out.get(to, 0) + lamports
    return str(payer), out


class PaymentLookup:
    """Payments by transaction signature, looked up on a ledger and cached."""

    def __init__(self, ledger: Any, *, clock: Callable[[], float] = trio.current_time, miss_ttl_s: float = 10.0,
                 cached_max: int = lookups_cached_max) -> None:
        self.ledger = ledger
        self.clock = clock
        self.miss_ttl_s = miss_ttl_s
        self.cached_max = cached_max
        self._cache: OrderedDict[str, tuple[VerifiedPayment | None, float]] = OrderedDict()
        self.lookups = 0
        self.unavailable = 0

    async def payments(self, signatures: Iterable[str]) -> dict[str, VerifiedPayment]:
        """The verified payments among ``signatures`` (a missing one verifies nothing)."""
        out: dict[str, VerifiedPayment] = {}
        asked = 0
        for sig in dict.fromkeys(signatures):
            hit = self._cache.get(sig)
            if hit is not None and (hit[0] is not None or self.clock() - hit[1] < self.miss_ttl_s):
                self._cache.move_to_end(sig)
                if hit[0] is not None:
                    out[sig] = hit[0]
                continue
            if asked >= lookups_per_call_max:
                continue  # the rest next time; unverified meanwhile
            asked += 1
            found = await self._lookup(sig)
            if found is not None:
                out[sig] = found
        return out

    async def _lookup(self, sig: str) -> VerifiedPayment | None:
        self.lookups += 1
        try:
            (status,) = await self.ledger.statuses([sig])
            raw = await self.ledger.transaction(sig) if status is not None and status.err is None else None
        except (LedgerUnavailable, OSError, ValueError):
            # Unreachable now, or not a signature the ledger can look up:
            # unverified (no weight), counted, asked again after miss_ttl_s.
            self.unavailable += 1
            raw = None
        found: VerifiedPayment | None = None
        if raw is not None:
            try:
                payer, transfers = system_transfers(raw)
                found = VerifiedPayment(tx_signature=sig, payer=payer, transfers=transfers)
            except ValueError:
                found = None
        self._cache[sig] = (found, self.clock())
        self._cache.move_to_end(sig)
        while len(self._cache) > self.cached_max:
            self._cache.popitem(last=False)
        return found
