"""The ledger a payer talks to: one async interface, two backends.

* :class:`EmbeddedLedger`: an :class:`SvmLedger` in this process, persisted
  in a state file in the node home (the offline default).  Blocks advance
  with time, one per ``slot_ms`` (read lazily on each call, from an
  injectable clock), so blockhashes expire as on a real cluster.
* :class:`RpcLedger`: solana-py's ``AsyncClient`` against any JSON-RPC
  endpoint: ``p2pgpu ledger serve``, devnet or mainnet.  It runs under trio;
  it never calls ``confirm_transaction`` (asyncio-only when it polls): the
  payer polls ``getSignatureStatuses`` itself with ``trio.sleep``.  Reads use
  ``finalized`` commitment where a decision depends on them (the block height
  that says a blockhash can no longer land).

Errors: :class:`LedgerRejected` is a refusal from the ledger (preflight
failure: ``err`` holds the JSON error); :class:`LedgerUnavailable` is an
operating failure (endpoint unreachable, timeout) after which nothing is
known and the caller retries later.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from solders.account import Account
from solders.hash import Hash
from solders.pubkey import Pubkey

from ._svm import RpcError, SvmLedger


class LedgerRejected(Exception):
    def __init__(self, message: str, err: Any = None) -> None:
        super().__init__(message)
        self.err = err


class LedgerUnavailable(Exception):
    """The ledger could not be reached or did not answer in time."""


@dataclass(frozen=True, kw_only=True)
class SigStatus:
    slot: int
    err: Any  # JSON error form, None when the transaction succeeded
    confirmed: bool = True  # False while only "processed" (a fork could still drop it)


class Ledger(Protocol):
    name: str

    async def latest_blockhash(self) -> tuple[Hash, int]: ...
    async def block_height(self) -> int: ...
    async def slot(self) -> int: ...
    async def send(self, raw: bytes, *, preflight: bool = True) -> str: ...
    async def statuses(self, signatures: Sequence[str]) -> list[SigStatus | None]: ...
    async def balances(self, pubkeys: Sequence[Pubkey]) -> list[int]: ...
    async def accounts(self, pubkeys: Sequence[Pubkey]) -> list[Account | None]: ...
    async def rent_exempt_minimum(self, data_len: int) -> int: ...
    async def airdrop(self, pubkey: Pubkey, lamports: int) -> str: ...
    async def transaction(self, signature: str) -> bytes | None: ...
    async def aclose(self) -> None: ...


class EmbeddedLedger:
    """An in-process LiteSVM ledger (see ``_svm.py``); one process per state file."""

    def __init__(
        self,
        state: Path | None = None,
        *,
        slot_ms: int = 400,
        clock_ms: Callable[[], int] | None = None,
        readonly: bool = False,
    ) -> None:
        self._clock = clock_ms or (lambda: int(time.time() * 1000))
        self.svm = SvmLedger(state, now_ms=self._clock(), readonly=readonly)
        self.slot_ms = slot_ms
        self._last_ms = self._clock()
        self.name = f"embedded:{state}" if state else "embedded"
        self.poll_hint_s = 0.005  # how often a payer should look up statuses

    def _tick(self) -> None:
        if self.slot_ms <= 0:
            return
        now = self._clock()
        blocks = (now - self._last_ms) // self.slot_ms
        if blocks > 0:
            self.svm.advance(min(blocks, 10_000), now_ms=now)
            self._last_ms += blocks * self.slot_ms

    async def latest_blockhash(self) -> tuple[Hash, int]:
        self._tick()
        return self.svm.latest_blockhash()

    async def block_height(self) -> int:
        self._tick()
        return self.svm.height

    async def slot(self) -> int:
        self._tick()
        return self.svm.slot

    async def send(self, raw: bytes, *, preflight: bool = True) -> str:
        self._tick()
        try:
            return self.svm.send(raw, preflight=preflight)
        except RpcError as exc:
            raise LedgerRejected(exc.message, (exc.data or {}).get("err") if isinstance(exc.data, dict) else None) from None

    async def statuses(self, signatures: Sequence[str]) -> list[SigStatus | None]:
        out: list[SigStatus | None] = []
        for s in signatures:
            st = self.svm.status(s)
            out.append(None if st is None else SigStatus(slot=st[0], err=st[1]))
        return out

    async def balances(self, pubkeys: Sequence[Pubkey]) -> list[int]:
        return [self.svm.balance(k) for k in pubkeys]

    async def accounts(self, pubkeys: Sequence[Pubkey]) -> list[Account | None]:
        return [self.svm.account(k) for k in pubkeys]

    async def rent_exempt_minimum(self, data_len: int) -> int:
        return self.svm.rent_exempt_minimum(data_len)

    async def airdrop(self, pubkey: Pubkey, lamports: int) -> str:
        self._tick()
        try:
            return self.svm.airdrop(pubkey, lamports)
        except RpcError as exc:
            raise LedgerRejected(exc.message) from None

    async def transaction(self, signature: str) -> bytes | None:
        rec = self.svm.record(signature)
        return rec.tx if rec is not None else None

    async def aclose(self) -> None:
        self.svm.close()


class RpcLedger:
    """Any Solana JSON-RPC endpoint through solana-py's AsyncClient, under trio."""

    def __init__(self, url: str, *, timeout_s: float = 10.0) -> None:
        from solana.rpc.async_api import AsyncClient
        from solana.rpc.commitment import Finalized

        self.url = url
        self.name = url
        local = url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]"))
        # Public endpoints rate-limit (devnet: ~100 requests per 10 s): poll them gently.
        self.poll_hint_s = 0.02 if local else 1.0
        self._commitment = Finalized
        self.client = AsyncClient(url, commitment=Finalized, timeout=timeout_s)

    async def _call(self, coro: Any) -> Any:
        from solana.exceptions import SolanaRpcException
        from solana.rpc.core import RPCException

        try:
            return await coro
        except SolanaRpcException as exc:
            raise LedgerUnavailable(f"{self.url}: {exc}") from None
        except RPCException as exc:
            raise LedgerRejected(*_rpc_exception(exc)) from None

    async def latest_blockhash(self) -> tuple[Hash, int]:
        r = await self._call(self.client.get_latest_blockhash())
        return r.value.blockhash, r.value.last_valid_block_height

    async def block_height(self) -> int:
        r = await self._call(self.client.get_block_height())
        return int(r.value)

    async def slot(self) -> int:
        r = await self._call(self.client.get_slot())
        return int(r.value)

    async def send(self, raw: bytes, *, preflight: bool = True) -> str:
        from solana.rpc.models import TxOpts

        opts = TxOpts(skip_confirmation=True, skip_preflight=not preflight, preflight_commitment=self._commitment,
                      max_retries=0)
        r = await self._call(self.client.send_raw_transaction(raw, opts))
        return str(r.value)

    async def statuses(self, signatures: Sequence[str]) -> list[SigStatus | None]:
        from solders.signature import Signature

        out: list[SigStatus | None] = []
        for i in range(0, len(signatures), 256):
            chunk = [Signature.from_string(s) for s in signatures[i : i + 256]]
            r = await self._call(self.client.get_signature_statuses(chunk, search_transaction_history=True))
            for st in r.value:
                if st is None:
                    out.append(None)
                else:
                    doc = json.loads(st.to_json())
                    confirmed = doc.get("confirmationStatus") in ("confirmed", "finalized")
                    out.append(SigStatus(slot=st.slot, err=doc["err"], confirmed=confirmed))
        return out

    async def accounts(self, pubkeys: Sequence[Pubkey]) -> list[Account | None]:
        out: list[Account | None] = []
        for i in range(0, len(pubkeys), 100):
            r = await self._call(self.client.get_multiple_accounts(list(pubkeys[i : i + 100])))
            for a in r.value:
                out.append(None if a is None else Account(a.lamports, bytes(a.data), a.owner, a.executable, 0))
        return out

    async def balances(self, pubkeys: Sequence[Pubkey]) -> list[int]:
        return [a.lamports if a is not None else 0 for a in await self.accounts(pubkeys)]

    async def rent_exempt_minimum(self, data_len: int) -> int:
        r = await self._call(self.client.get_minimum_balance_for_rent_exemption(data_len))
        return int(r.value)

    async def airdrop(self, pubkey: Pubkey, lamports: int) -> str:
        r = await self._call(self.client.request_airdrop(pubkey, lamports))
        return str(r.value)

    async def transaction(self, signature: str) -> bytes | None:
        from solders.signature import Signature

        r = await self._call(
            self.client.get_transaction(Signature.from_string(signature), encoding="base64",
                                        max_supported_transaction_version=0)
        )
        if r.value is None:
            return None
        return bytes(r.value.transaction.transaction)

    async def aclose(self) -> None:
        await self.client.close()


def _rpc_exception(exc: Exception) -> tuple[str, Any]:
    arg = exc.args[0] if exc.args else None
    message = getattr(arg, "message", str(exc))
    data = getattr(arg, "data", None)
    err = None
    if data is not None and hasattr(data, "to_json"):
        try:
            err = json.loads(data.to_json()).get("err")
        except (ValueError, AttributeError):
            err = None
    return str(message), err


def open_ledger(spec: str, *, home_path: Path | None = None, slot_ms: int = 400, readonly: bool = False) -> Any:
    """``"embedded"`` (state in the home) or an http(s) JSON-RPC URL."""
    if spec == "embedded":
        state = Path(home_path) / "ledger.state" if home_path is not None else None
        return EmbeddedLedger(state, slot_ms=slot_ms, readonly=readonly)
    if spec.startswith(("http://", "https://")):
        return RpcLedger(spec)
    raise ValueError(f"unknown ledger {spec!r}: use \"embedded\" or an http(s) JSON-RPC URL")
