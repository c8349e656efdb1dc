""""Can the submitter pay?": a cached balance check a node runs before volunteering.

A node volunteering for a job first asks whether the job's payer holds at
least the job's price ceiling on the job's ledger.  Balances are cached for
``ttl_s`` per (payer, currency), so a burst of jobs from one submitter costs
one lookup; the cache is bounded (oldest entry evicted).  An unreachable
ledger is a "no" with its own reason, never an exception: declining is the
safe answer.  The decision itself is :func:`core._payout.payer_covers`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import trio
from solders.pubkey import Pubkey

from p2pgpu.core._payout import SOL, FundsVerdict, payer_covers

from ._ledger import Ledger, LedgerRejected, LedgerUnavailable
from ._tx import TokenInfo, ata


class PayerCheck:
    def __init__(
        self,
        ledger: Ledger,
        *,
        ttl_s: float = 30.0,
        reserve_lamports: int = 0,
        entries_max: int = 10_000,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.ledger = ledger
        self.ttl_s = ttl_s
        self.reserve_lamports = reserve_lamports
        self.entries_max = entries_max
        self.clock = clock
        self._cache: OrderedDict[tuple[str, str], tuple[int | None, float]] = OrderedDict()
        self.lookups = 0

    async def balance(self, payer: str, currency: str = SOL) -> int | None:
        key = (payer, currency)
        hit = self._cache.get(key)
        now = self.clock()
        if hit is not None and now - hit[1] < self.ttl_s:
            return hit[0]
        self.lookups += 1
        value: int | None
        try:
            owner = Pubkey.from_string(payer)
            if currency == SOL:
                (value,) = await self.ledger.balances([owner])
            else:
                mint = Pubkey.from_string(currency)
                (mint_acc,) = await self.ledger.accounts([mint])
                if mint_acc is None:
                    value = 0
                else:
                    token = TokenInfo(mint=mint, decimals=bytes(mint_acc.data)[44], program=mint_acc.owner)
                    (acc,) = await self.ledger.accounts([ata(owner, token)])
                    value = int.from_bytes(bytes(acc.data)[64:72], "little") if acc is not None else 0
        except (LedgerUnavailable, LedgerRejected, ValueError):
            value = None
        self._cache[key] = (value, now)
        self._cache.move_to_end(key)
        while len(self._cache) > self.entries_max:
            self._cache.popitem(last=False)
        return value

    async def check(self, payer: str, needed: int, currency: str = SOL) -> FundsVerdict:
        """Whether ``payer`` holds ``needed`` (plus the reserve, for SOL) now."""
        bal = await self.balance(payer, currency)
        reserve = self.reserve_lamports if currency == SOL else 0
        return payer_covers(balance_lamports=bal, needed=needed, reserve_lamports=reserve)

    def forget(self, payer: str, currency: str = SOL) -> None:
        self._cache.pop((payer, currency), None)
