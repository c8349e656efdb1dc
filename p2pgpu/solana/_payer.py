"""The payer: owed rows -> signed batches -> sent -> confirmed -> paid, exactly once.

The order of writes is the whole safety argument:

1. **Sign and record first.**  A batch's transaction is built and signed in
   memory, then its signature, blockhash, last valid block height and bytes
   are committed (``synchronous=FULL``) together with the rows moving to
   ``batched``.  Only then is it sent.  A crash before the commit leaves the
   rows owed and nothing on the wire; a crash after it leaves a record of
   everything that may be on the wire.
2. **Send, then note it** (``sent``): only a counter for operators, the
   decision never depends on it.
3. **Confirm by looking up**, reading the block height *before* the
   signature status (:func:`core._payout.recovery_verdict`): found without
   error -> paid; found with error -> failed (fee charged, no transfer;
   :func:`core._payout.isolate_failure` decides the rows); not found and the
   height already past the last valid height -> expired, the rows are owed
   again and a new transaction (new signature) pays them; otherwise the same
   bytes are sent again (same signature: it can land at most once).
4. **Recovery is step 3** for every open batch, before anything new is
   planned.  The ledger's own duplicate check is never relied on (LiteSVM
   forgets after ~32 transactions).

``hook(step)`` is called after each durable step ("signed", "sent",
"confirmed"); the crash tests use it to ``kill -9`` the process there.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
from solders.keypair import Keypair
from solders.pubkey import Pubkey

from p2pgpu.core._payout import (
    SOL,
    BatchPlan,
    BatchState,
    FailureKind,
    Owed,
    Verdict,
    isolate_failure,
    plan_batches,
    recovery_verdict,
    transfers_max_plain,
)
from p2pgpu.store import (
    BatchRecord,
    batch_plan,
    hold_rows,
    mark_expired,
    mark_failed,
    mark_paid,
    mark_sent,
    open_batches,
    owed_rows,
    record_signed,
    transaction,
)

from ._ledger import Ledger, LedgerRejected, LedgerUnavailable
from ._tx import TokenInfo, TooLarge, ata, blame, build_batch, signature_of

fee_per_batch_lamports = 5_000


class PayerUnderfunded(Exception):
    """The payer's account cannot cover the fee or the amounts: top it up."""


@dataclass
class PayReport:
    signed: int = 0
    paid_batches: int = 0
    paid_rows: int = 0
    failed_rows: int = 0
    expired: int = 0
    waiting_rows: int = 0
    open_batches: int = 0
    errors: list[str] = field(default_factory=list)


class Payer:
    def __init__(
        self,
        conn: sqlite3.Connection,
        ledger: Ledger,
        keypair: Keypair,
        *,
        currency: str | None = None,
        transfers_max: int = transfers_max_plain,
        batches_per_round_max: int = 200,
        sends_in_flight_max: int = 8,
        poll_s: float | None = None,
        resend_s: float = 2.0,
        confirm_timeout_s: float = 90.0,
        now_ms: Callable[[], int] | None = None,
        hook: Callable[[str], None] | None = None,
        lookup: Any = None,
    ) -> None:
        self.conn = conn
        self.ledger = ledger
        self.keypair = keypair
        self.currency = currency
        self.transfers_max = transfers_max
        self.batches_per_round_max = batches_per_round_max
        self.sends_in_flight_max = sends_in_flight_max
        self.poll_s = poll_s if poll_s is not None else float(getattr(ledger, "poll_hint_s", 0.5))
        self.resend_s = resend_s
        self.confirm_timeout_s = confirm_timeout_s
        self.now_ms = now_ms or (lambda: int(time.time() * 1000))
        self.hook = hook or (lambda step: None)
        self.lookup = lookup
        self._tokens: dict[str, TokenInfo] = {}
        self._rent_min: int | None = None
        # batch id -> preflight error of a FIRST send (never forwarded: settle fails it at once)
        self._preflight: dict[int, Any] = {}
        # batch id -> preflight error of a RESEND: an earlier copy may be in flight, so the
        # error is only acted on once the blockhash has expired (see settle)
        self._refused: dict[int, Any] = {}

    # --- public ----------------------------------------------------------

    async def pay_once(self) -> PayReport:
        """Recover open batches, then pay what is owed now; returns what happened."""
        report = PayReport()
        await self.settle(open_batches(self.conn), report, resend_first=True)
        new = await self.sign_owed(report)
        await self.send_all(new)
        await self.settle(new, report, resend_first=False)
        report.open_batches = len(open_batches(self.conn))
        return report

    async def run(self, *, interval_s: float = 2.0) -> None:
        """Pay forever (the node's task); ledger outages are waited out."""
        while True:
            try:
                await self.pay_once()
            except (LedgerUnavailable, PayerUnderfunded):
                pass  # retried next round; the outbox keeps everything
            await trio.sleep(interval_s)

    # --- signing ---------------------------------------------------------

    async def token(self, currency: str) -> TokenInfo | None:
        """None for SOL; the mint's decimals and token program for an SPL currency (cached)."""
        if currency == SOL:
            return None
        if currency not in self._tokens:
            mint = Pubkey.from_string(currency)
            (acc,) = await self.ledger.accounts([mint])
            if acc is None or len(acc.data) < 82:
                raise LedgerRejected(f"mint {currency} not found on {self.ledger.name}")
            self._tokens[currency] = TokenInfo(mint=mint, decimals=bytes(acc.data)[44], program=acc.owner)
        return self._tokens[currency]

    async def _payable(self, rows: list[Owed]) -> list[Owed]:
        """Hold (as failed, with the reason) rows that can never be paid as they
        are, so that one malformed address or unknown mint never blocks the rest."""
        bad: dict[str, list[int]] = {}
        good = []
        for r in rows:
            why = None
            try:
                Pubkey.from_string(r.payout_address)
                if r.currency != SOL:
                    await self.token(r.currency)
            except ValueError:
                why = f"not a Solana address: payout {r.payout_address!r} or currency {r.currency!r}"
            except LedgerRejected as exc:
                why = str(exc)
            if why is None:
                good.append(r)
            else:
                bad.setdefault(why, []).append(r.owed_id)
        if bad:
            with transaction(self.conn):
                for why, ids in bad.items():
                    hold_rows(self.conn, ids, error=why)
        return good

    async def _plan(self, report: PayReport) -> list[BatchPlan]:
        rows = await self._payable(owed_rows(self.conn, currency=self.currency))
        if not rows:
            return []
        addrs = sorted({r.payout_address for r in rows if r.currency == SOL})
        balances: dict[str, int] = {}
        if addrs:
            if self._rent_min is None:
                self._rent_min = await self.ledger.rent_exempt_minimum(0)
            bals = await self.ledger.balances([Pubkey.from_string(a) for a in addrs])
            balances = dict(zip(addrs, bals))
        plan = plan_batches(rows, balances=balances, rent_exempt_min_lamports=self._rent_min or 0,
                            transfers_max=self.transfers_max, batches_max=self.batches_per_round_max)
        report.waiting_rows = len(plan.waiting)
        return list(plan.batches)

    async def _missing_atas(self, plan: BatchPlan, token: TokenInfo | None) -> list[str]:
        if token is None:
            return []
        owners = [t.address for t in plan.transfers]
        accs = await self.ledger.accounts([ata(Pubkey.from_string(o), token) for o in owners])
        return [o for o, a in zip(owners, accs) if a is None]

    async def sign_plans(self, plans: Sequence[BatchPlan], report: PayReport) -> list[BatchRecord]:
        """Sign every plan, then record them all in one durable transaction
        (one fsync per round, not per batch); a plan too large for one
        transaction is cut at the longest prefix that fits."""
        if not plans:
            return []
        bh, lvh = await self.ledger.latest_blockhash()
        signed: list[tuple[BatchPlan, bytes]] = []
        todo = list(plans)
        while todo:
            plan = todo.pop(0)
            token = await self.token(plan.currency)
            missing = await self._missing_atas(plan, token)
            try:
                raw = build_batch(self.keypair, plan, bh, token=token, missing_atas=missing, lookup=self.lookup)
            except TooLarge:
                # Sign the longest prefix that fits (binary search); the rest goes next.
                lo, hi = 0, len(plan.transfers)  # lo fits (0 trivially), hi does not
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    try:
                        build_batch(self.keypair, BatchPlan(currency=plan.currency, transfers=plan.transfers[:mid]),
                                    bh, token=token, missing_atas=missing, lookup=self.lookup)
                        lo = mid
                    except TooLarge:
                        hi = mid
                if lo == 0:
                    raise
                todo[:0] = [BatchPlan(currency=plan.currency, transfers=plan.transfers[:lo]),
                            BatchPlan(currency=plan.currency, transfers=plan.transfers[lo:])]
                continue
            signed.append((plan, raw))
        out: list[BatchRecord] = []
        now = self.now_ms()
        with transaction(self.conn):
            for plan, raw in signed:
                sig = signature_of(raw)
                batch_id = record_signed(self.conn, plan, signature=sig, blockhash=str(bh), last_valid_height=lvh,
                                         tx=raw, now_ms=now)
                out.append(BatchRecord(batch_id=batch_id, currency=plan.currency, state=BatchState.SIGNED,
                                       signature=sig, blockhash=str(bh), last_valid_height=lvh, tx=raw,
                                       merkle_root=plan.merkle_root(), sends=0))
        for _ in out:
            report.signed += 1
            self.hook("signed")
        return out

    async def sign_owed(self, report: PayReport) -> list[BatchRecord]:
        return await self.sign_plans(await self._plan(report), report)

    # --- sending ---------------------------------------------------------

    async def _send(self, b: BatchRecord, *, resend: bool = False) -> None:
        """Send (or resend) the recorded bytes.  A preflight refusal is kept
        for ``settle`` to judge; nothing is decided here.  Only resends are
        noted in the store (state ``sent``, ``sends`` counter): a first send
        needs no write, which keeps a round at two fsyncs."""
        try:
            await self.ledger.send(b.tx, preflight=True)
        except LedgerRejected as exc:
            if exc.err in ("AlreadyProcessed", "BlockhashNotFound") or exc.err is None:
                return  # landed already / not yet or no longer valid: the lookup decides
            if resend:
                self._refused[b.batch_id] = exc.err
            else:
                self._preflight[b.batch_id] = exc.err
            return
        self.hook("sent")
        if resend:
            with transaction(self.conn):
                mark_sent(self.conn, b.batch_id, now_ms=self.now_ms())

    async def send_all(self, batches: Sequence[BatchRecord]) -> None:
        """First sends, ``sends_in_flight_max`` at a time (they are independent:
        each is already recorded).  The first error is re-raised as itself
        after the others finished, so callers can catch ``LedgerUnavailable``."""
        limiter = trio.CapacityLimiter(self.sends_in_flight_max)
        errors: list[Exception] = []

        async def one(b: BatchRecord) -> None:
            async with limiter:
                if errors:
                    return
                try:
                    await self._send(b)
                except (LedgerUnavailable, LedgerRejected) as exc:
                    errors.append(exc)

        async with trio.open_nursery() as nursery:
            for b in batches:
                nursery.start_soon(one, b)
        if errors:
            raise errors[0]

    # --- confirming ------------------------------------------------------

    async def settle(self, batches: Sequence[BatchRecord], report: PayReport, *, resend_first: bool) -> None:
        """Look up each batch until it is paid, failed or expired (or time runs out)."""
        pending = {b.batch_id: b for b in batches}
        last_sent = {b.batch_id: (-1e18 if resend_first else trio.current_time()) for b in batches}
        deadline = trio.current_time() + self.confirm_timeout_s
        while pending:
            height = await self.ledger.block_height()  # before the statuses: see recovery_verdict
            ids = list(pending)
            statuses = await self.ledger.statuses([pending[i].signature for i in ids])
            paid: list[tuple[int, int]] = []
            for batch_id, st in zip(ids, statuses):
                b = pending[batch_id]
                pre_err = self._preflight.pop(batch_id, None)
                if st is None and pre_err is not None:
                    # Refused by preflight: never forwarded, no fee; settle it as failed.
                    await self._failed(b, pre_err, None, None, report)
                    del pending[batch_id]
                    continue
                verdict = recovery_verdict(found=st is not None, err=st is not None and st.err is not None,
                                           block_height=height, last_valid_block_height=b.last_valid_height,
                                           confirmed=st is None or st.confirmed)
                if verdict is Verdict.PAID:
                    assert st is not None
                    self.hook("confirmed")
                    paid.append((batch_id, st.slot))
                    del pending[batch_id]
                elif verdict is Verdict.FAILED:
                    assert st is not None
                    await self._failed(b, st.err, st.slot, fee_per_batch_lamports, report)
                    del pending[batch_id]
                elif verdict is Verdict.EXPIRED and batch_id in self._refused:
                    # It can no longer land, and the ledger said why it would not: isolate the cause.
                    await self._failed(b, self._refused.pop(batch_id), None, None, report)
                    del pending[batch_id]
                elif verdict is Verdict.EXPIRED:
                    with transaction(self.conn):
                        mark_expired(self.conn, batch_id, now_ms=self.now_ms())
                    report.expired += 1
                    del pending[batch_id]
                elif verdict is Verdict.WAIT:
                    pass
                elif trio.current_time() - last_sent[batch_id] >= self.resend_s:
                    last_sent[batch_id] = trio.current_time()
                    await self._send(b, resend=True)
            if paid:  # one durable write for every batch seen paid in this poll
                with transaction(self.conn):
                    for batch_id, slot in paid:
                        mark_paid(self.conn, batch_id, slot=slot, fee=fee_per_batch_lamports, now_ms=self.now_ms())
                        report.paid_rows += self.conn.execute(
                            "SELECT COUNT(*) FROM payout_batch_items WHERE batch_id = ?", (batch_id,)).fetchone()[0]
                report.paid_batches += len(paid)
            if pending:
                if trio.current_time() > deadline:
                    return
                await trio.sleep(self.poll_s)

    async def _failed(self, b: BatchRecord, err: Any, slot: int | None, fee: int | None, report: PayReport) -> None:
        plan = batch_plan(self.conn, b.batch_id)
        who = blame(b.tx, plan, err, token=await self.token(plan.currency))
        decision = isolate_failure(plan, transfer_index=who.transfer_index, payer_fault=who.payer_fault,
                                   rent_fault=who.rent_fault)
        with transaction(self.conn):
            mark_failed(self.conn, b.batch_id, error=json.dumps(err, sort_keys=True), failed=decision.failed,
                        slot=slot, fee=fee, now_ms=self.now_ms())
        report.failed_rows += len(decision.failed)
        report.errors.append(f"batch {b.batch_id}: {json.dumps(err, sort_keys=True)}")
        if decision.kind is FailureKind.PAYER:
            raise PayerUnderfunded(f"payer {self.keypair.pubkey()} cannot pay batch {b.batch_id}: {err}")
        if decision.halves:
            # Retry each half as its own batch right away so they are not merged again.
            by_id = {i: t for t in plan.transfers for i in t.owed_ids}
            halves = []
            for ids in decision.halves:
                transfers = []
                for i in ids:
                    if by_id[i] not in transfers:
                        transfers.append(by_id[i])
                halves.append(BatchPlan(currency=plan.currency, transfers=tuple(transfers)))
            new = await self.sign_plans(halves, report)
            await self.send_all(new)
            await self.settle(new, report, resend_first=False)
