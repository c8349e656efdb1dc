"""A single-node Solana ledger over LiteSVM, persisted as snapshot + journal.

This is the state machine behind both the embedded ledger and ``p2pgpu ledger
serve``: it executes transactions with LiteSVM and adds what LiteSVM lacks to
behave like a real cluster for the clients we serve:

* **Blocks and blockhashes of our own.**  LiteSVM's blockhash check is turned
  off; we keep a window of the last ``blockhash_window`` (150) blockhashes,
  each valid until ``last_valid_block_height = height + 150``, like a real
  cluster.  Blockhashes are SHA-256(genesis || height), so they are the same
  after a restart and a restored ledger never accepts an old signed
  transaction twice (the notes' "blockhash replay" trap does not arise).
* **Duplicate and status memory of our own.**  LiteSVM remembers only ~32
  transactions.  The status (slot, error) of the last ``statuses_max``
  (1,000,000) executed transactions is kept, and their full record (bytes,
  fee, balances, logs) for the last ``history_max`` (50,000):
  ``getSignatureStatuses`` answers from the first, ``getTransaction`` from
  the second, and a resend of a known signature is refused as
  ``AlreadyProcessed``.  A payer deciding whether its transaction landed
  needs the status to outlive its downtime: a million transactions is far
  beyond the 150-block blockhash window, so nothing executes twice.
* **Only includable failures are recorded.**  A transaction whose fee payer
  cannot pay is dropped as a real leader drops it (nothing recorded, no fee);
  one that fails after paying its fee is recorded with its error.
* **Persistence.**  Every executed transaction and every block advance is
  appended to ``STATE.journal`` (length-prefixed msgpack) before the caller
  hears of it; replaying the journal on a snapshot re-executes the same
  transactions and reproduces the same state.  ``compact()`` writes
  the state file itself (the System, Token, Token-2022 and lookup-table accounts,
  our metadata and history) atomically and empties the journal; entries carry
  a sequence number so a crash between the two never replays twice.  State
  files are private (0600).
* **A faucet of its own.**  ``requestAirdrop`` pays from a faucet whose key is
  made for this ledger and kept in ``STATE.faucet`` (0600), within
  :class:`~p2pgpu.solana._faucet.AirdropLimits`; what earlier ledgers' faucet
  (derived from a constant) still holds is moved to it on open (``_faucet.py``).

Not thread-safe: callers hold one lock (the notes measured no gain from more).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import msgpack
from solders.account import Account
from solders.address_lookup_table_account import AddressLookupTable
from solders.hash import Hash
from solders.instruction import Instruction
from solders.litesvm import LiteSVM
from solders.message import Message, MessageV0
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.system_program import TransferParams, transfer
from solders.transaction import Transaction, VersionedTransaction
from solders.transaction_metadata import FailedTransactionMetadata
from solders.transaction_status import TransactionConfirmationStatus, TransactionStatus

from ._faucet import AIRDROP_REFUSED_CODE, AirdropLimits, AirdropRefused, legacy_faucet, load_or_create_faucet

blockhash_window = 150
history_max = 50_000
statuses_max = 1_000_000
packet_bytes_max = 1232
slots_per_epoch = 432_000
faucet_lamports = 10**18
journal_entries_max = 50_000  # compact when the journal grows past this

MEMO_PROGRAM = Pubkey.from_string("MemoSq4gqABAXKb96qnH8TysNcWxMyWCqXgDLGmfcHr")
SYSTEM_PROGRAM = Pubkey.from_string("11111111111111111111111111111111")
TOKEN_PROGRAM = Pubkey.from_string("TokenkegQfeZyiNwAJbNbGKPFXCWuBvf9Ss623VQ5DA")
TOKEN_2022_PROGRAM = Pubkey.from_string("TokenzQdBNbLqP5VEhdkAS6EPFLC1PHnBqCXEpPxuEb")
LOOKUP_TABLE_PROGRAM = Pubkey.from_string("AddressLookupTab1e1111111111111111111111111")
SNAPSHOT_OWNERS = (SYSTEM_PROGRAM, TOKEN_PROGRAM, TOKEN_2022_PROGRAM, LOOKUP_TABLE_PROGRAM)

#: Errors that keep a transaction out of any block: a real leader drops it.
_DROPPED = ("AccountNotFound", "InsufficientFundsForFee", "InvalidAccountForFee", "BlockhashNotFound",
            "AlreadyProcessed", "SignatureFailure")


class LedgerLocked(Exception):
    """Another process holds this ledger's state directory."""


def err_json(err: Any) -> Any:
    """The JSON form a real RPC node gives a TransactionError (None when ok)."""
    if err is None:
        return None
    st = TransactionStatus(0, None, None, err, TransactionConfirmationStatus.Finalized)
    import json

    return json.loads(st.to_json())["err"]


def _is_panic(exc: BaseException) -> bool:
    # LiteSVM raises pyo3's PanicException (a BaseException) on a wrong signer set.
    return type(exc).__name__ == "PanicException"


@dataclass(kw_only=True)
class TxRecord:
    """What the ledger remembers of one executed transaction."""

    signature: str
    slot: int
    block_time_s: int
    tx: bytes
    err: Any  # JSON form, None when ok
    fee: int
    pre_balances: list[int]
    post_balances: list[int]
    logs: list[str]
    compute_units: int
    loaded_writable: list[str] = field(default_factory=list)
    loaded_readonly: list[str] = field(default_factory=list)

    def to_obj(self) -> list[Any]:
        return [self.signature, self.slot, self.block_time_s, self.tx, msgpack.packb(self.err), self.fee,
                self.pre_balances, self.post_balances, self.logs, self.compute_units,
                self.loaded_writable, self.loaded_readonly]

    @classmethod
    def from_obj(cls, o: list[Any]) -> TxRecord:
        return cls(signature=o[0], slot=o[1], block_time_s=o[2], tx=o[3], err=msgpack.unpackb(o[4]), fee=o[5],
                   pre_balances=o[6], post_balances=o[7], logs=o[8], compute_units=o[9],
                   loaded_writable=o[10], loaded_readonly=o[11])


@dataclass(frozen=True, kw_only=True)
class RpcError(Exception):
    """A JSON-RPC error as a real node words it."""

    code: int
    message: str
    data: Any = None

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, kw_only=True)
class SimResult:
    err: Any
    logs: list[str]
    units: int
    accounts: list[Any] | None = None


class SvmLedger:
    def __init__(
        self,
        state_path: Path | None = None,
        *,
        genesis: bytes = b"p2pgpu-local-ledger-1",
        now_ms: int = 0,
        fsync: bool = False,
        readonly: bool = False,
        airdrop_limits: AirdropLimits | None = None,
    ) -> None:
        self.genesis_hash = Hash(hashlib.sha256(b"genesis" + genesis).digest())
        self._genesis = genesis
        self.airdrop_limits = airdrop_limits or AirdropLimits()
        #: Lamports the faucet gave over the ledger's life (persisted; recounted on replay).
        self.airdropped = 0
        # Genesis as every earlier ledger had it: the faucet derived from a
        # constant holds the funds.  Replaying an old journal needs it; once
        # the state is loaded its funds move to this ledger's own faucet.
        self._legacy_faucet = legacy_faucet(genesis)
        self.faucet = self._legacy_faucet  # until the state is loaded: see _adopt_faucet
        self.svm = LiteSVM().with_blockhash_check(False)
        self.svm.set_account(self._legacy_faucet.pubkey(), Account(faucet_lamports, b"", SYSTEM_PROGRAM, False, 0))
        self.height = 0
        self.time_ms = now_ms
        self.blockhashes: OrderedDict[str, int] = OrderedDict()
        self.history: OrderedDict[str, TxRecord] = OrderedDict()
        self.sigs: OrderedDict[str, tuple[int, Any]] = OrderedDict()  # signature -> (slot, JSON error)
        self.tx_count = 0
        self._seq = 0
        self._fsync = fsync
        self._journal: BinaryIO | None = None
        self._journal_entries = 0
        self._lock_fd: int | None = None
        self.state_path = Path(state_path) if state_path is not None else None
        self._replaying = False
        self._new_blockhash()
        self._sync_sysvars()
        if self.state_path is not None:
            self._open_state(readonly)
        else:
            self.faucet = load_or_create_faucet(None, create=False)
        self._retire_legacy_faucet()

    # --- blocks ----------------------------------------------------------

    def _blockhash_at(self, height: int) -> Hash:
        return Hash(hashlib.sha256(self._genesis + struct.pack(">Q", height)).digest())

    def _new_blockhash(self) -> None:
        self.blockhashes[str(self._blockhash_at(self.height))] = self.height
        while len(self.blockhashes) > blockhash_window + 1:
            self.blockhashes.popitem(last=False)

    def latest_blockhash(self) -> tuple[Hash, int]:
        """(blockhash, last valid block height), as getLatestBlockhash answers."""
        return self._blockhash_at(self.height), self.height + blockhash_window

    def blockhash_valid(self, blockhash: str) -> bool:
        return blockhash in self.blockhashes

    def advance(self, blocks: int = 1, *, now_ms: int | None = None) -> None:
        """Produce ``blocks`` new blocks (slots); the oldest blockhashes expire."""
        if blocks <= 0:
            return
        for _ in range(blocks):
            self.height += 1
            self._new_blockhash()
        if now_ms is not None:
            self.time_ms = max(self.time_ms, now_ms)
        self._sync_sysvars()
        self._journal_append(["adv", blocks, self.time_ms])

    def _sync_sysvars(self) -> None:
        """Clock and SlotHashes follow our blocks (lookup tables need a recent slot in SlotHashes)."""
        self.svm.warp_to_slot(self.height)
        lo = max(0, self.height - blockhash_window)
        self.svm.set_slot_hashes([(h, self._blockhash_at(h)) for h in range(self.height, lo - 1, -1)])

    @property
    def slot(self) -> int:
        return self.height

    def epoch_info(self) -> dict[str, int]:
        return {
            "absoluteSlot": self.height,
            "blockHeight": self.height,
            "epoch": self.height // slots_per_epoch,
            "slotIndex": self.height % slots_per_epoch,
            "slotsInEpoch": slots_per_epoch,
            "transactionCount": self.tx_count,
        }

    # --- accounts --------------------------------------------------------

    def balance(self, pubkey: Pubkey) -> int:
        acc = self.svm.get_account(pubkey)
        return acc.lamports if acc is not None else 0

    def account(self, pubkey: Pubkey) -> Account | None:
        acc = self.svm.get_account(pubkey)
        if acc is None or (acc.lamports == 0 and not acc.data and acc.owner == SYSTEM_PROGRAM):
            return None
        return acc

    def rent_exempt_minimum(self, data_len: int) -> int:
        return int(self.svm.minimum_balance_for_rent_exemption(data_len))

    def set_account(self, pubkey: Pubkey, account: Account) -> None:
        """Write an account directly (tests, genesis); journaled."""
        self.svm.set_account(pubkey, account)
        self._journal_append(["acct", bytes(pubkey), bytes(account)])

    # --- transactions ----------------------------------------------------

    @staticmethod
    def parse(raw: bytes) -> VersionedTransaction:
        if len(raw) > packet_bytes_max:
            raise RpcError(
                code=-32602,
                message=f"base64 encoded solana_sdk::transaction::versioned::VersionedTransaction too large: "
                f"{len(raw)} bytes (max: encoded/raw 1644/{packet_bytes_max})",
            )
        try:
            tx = VersionedTransaction.from_bytes(raw)
            tx.sanitize()
        except (ValueError, TypeError) as exc:
            raise RpcError(code=-32602, message=f"failed to deserialize transaction: {exc}") from None
        except BaseException as exc:
            if _is_panic(exc):
                raise RpcError(code=-32602, message="failed to deserialize transaction") from None
            raise
        return tx

    @staticmethod
    def _signatures_ok(tx: VersionedTransaction) -> bool:
        try:
            return all(tx.verify_with_results())
        except BaseException as exc:
            if _is_panic(exc) or isinstance(exc, (ValueError, TypeError)):
                return False
            raise

    def _loaded(self, tx: VersionedTransaction) -> tuple[list[Pubkey], list[Pubkey]]:
        msg = tx.message
        if not isinstance(msg, MessageV0):
            return [], []
        writable: list[Pubkey] = []
        readonly: list[Pubkey] = []
        for lookup in msg.address_table_lookups:
            acc = self.svm.get_account(lookup.account_key)
            if acc is None:
                raise RpcError(code=-32002, message="Transaction simulation failed: Transaction loads an address table account that doesn't exist", data={"err": "AddressLookupTableNotFound"})
            addrs = AddressLookupTable.deserialize(bytes(acc.data)).addresses
            try:
                writable += [addrs[i] for i in bytes(lookup.writable_indexes)]
                readonly += [addrs[i] for i in bytes(lookup.readonly_indexes)]
            except IndexError:
                raise RpcError(code=-32002, message="Transaction simulation failed: Transaction address table lookup uses an invalid index", data={"err": "InvalidAddressLookupTableIndex"}) from None
        return writable, readonly

    def account_keys(self, tx: VersionedTransaction) -> list[Pubkey]:
        w, r = self._loaded(tx)
        return list(tx.message.account_keys) + w + r

    def simulate(self, tx: VersionedTransaction, *, sig_verify: bool = True, replace_blockhash: bool = False) -> SimResult:
        if sig_verify and not self._signatures_ok(tx):
            raise RpcError(code=-32003, message="Transaction signature verification failure")
        if replace_blockhash:
            pass  # LiteSVM ignores the blockhash (its check is off): nothing to replace
        elif str(tx.message.recent_blockhash) not in self.blockhashes:
            return SimResult(err="BlockhashNotFound", logs=[], units=0)
        if tx.signatures and str(tx.signatures[0]) in self.sigs:
            return SimResult(err="AlreadyProcessed", logs=[], units=0)
        if not sig_verify:
            self.svm.with_sigverify(False)  # clients simulate unsigned transactions (zero signatures)
        try:
            res = self.svm.simulate_transaction(tx)
        except BaseException as exc:
            if _is_panic(exc):
                raise RpcError(code=-32003, message="Transaction signature verification failure") from None
            raise
        finally:
            self.svm.with_sigverify(True)
        if isinstance(res, FailedTransactionMetadata):
            meta = res.meta()
            return SimResult(err=err_json(res.err()), logs=list(meta.logs()), units=meta.compute_units_consumed())
        meta = res.meta()
        return SimResult(err=None, logs=list(meta.logs()), units=meta.compute_units_consumed())

    def send(self, raw: bytes, *, preflight: bool = True) -> str:
        """Process one wire transaction as a node's sendTransaction does; returns its signature.

        With ``preflight`` a failing simulation raises :class:`RpcError`
        (-32002, with ``err`` and ``logs``) and changes nothing; without it
        the transaction is executed, and recorded when it could pay its fee.
        """
        tx = self.parse(raw)
        sig = str(tx.signatures[0])
        if not self._signatures_ok(tx):
            raise RpcError(code=-32003, message="Transaction signature verification failure")
        if sig in self.sigs:
            if preflight:
                raise _sim_failed("AlreadyProcessed", [], 0)
            return sig
        if str(tx.message.recent_blockhash) not in self.blockhashes:
            if preflight:
                raise _sim_failed("BlockhashNotFound", [], 0)
            return sig  # a real leader drops it
        if preflight:
            sim = self.simulate(tx)
            if sim.err is not None:
                raise _sim_failed(sim.err, sim.logs, sim.units)
        self._execute(tx, raw)
        return sig

    def _execute(self, tx: VersionedTransaction, raw: bytes) -> TxRecord | None:
        keys = self.account_keys(tx)
        pre = [self.balance(k) for k in keys]
        try:
            res = self.svm.send_transaction(tx)
        except BaseException as exc:
            if _is_panic(exc):
                raise RpcError(code=-32003, message="Transaction signature verification failure") from None
            raise
        post = [self.balance(k) for k in keys]
        if isinstance(res, FailedTransactionMetadata):
            err = err_json(res.err())
            meta = res.meta()
            if pre[0] == post[0] and (err in _DROPPED or (isinstance(err, str) and err in _DROPPED)):
                return None  # never in a block
        else:
            err, meta = None, res
            if keys[0] in (self.faucet.pubkey(), self._legacy_faucet.pubkey()):
                self.airdropped += pre[0] - post[0] - meta.fee()  # only the faucet's own airdrops are signed by it
        w, r = self._loaded(tx)
        rec = TxRecord(
            signature=str(tx.signatures[0]),
            slot=self.height,
            block_time_s=self.time_ms // 1000,
            tx=raw,
            err=err,
            fee=pre[0] - post[0] if err is not None else meta.fee(),
            pre_balances=pre,
            post_balances=post,
            logs=list(meta.logs()),
            compute_units=meta.compute_units_consumed(),
            loaded_writable=[str(k) for k in w],
            loaded_readonly=[str(k) for k in r],
        )
        self.history[rec.signature] = rec
        while len(self.history) > history_max:
            self.history.popitem(last=False)
        self.sigs[rec.signature] = (rec.slot, rec.err)
        while len(self.sigs) > statuses_max:
            self.sigs.popitem(last=False)
        self.tx_count += 1
        self._journal_append(["tx", raw, self.height, self.time_ms])
        return rec

    def status(self, signature: str) -> tuple[int, Any] | None:
        """(slot, JSON error or None) of an executed transaction."""
        return self.sigs.get(signature)

    def record(self, signature: str) -> TxRecord | None:
        """The full record, while it is among the last ``history_max``."""
        return self.history.get(signature)

    def airdrop(self, pubkey: Pubkey, lamports: int) -> str:
        """Pay ``lamports`` from the faucet in a real, recorded transaction,
        within :attr:`airdrop_limits` (else :class:`RpcError` -32600 saying which limit)."""
        try:
            self.airdrop_limits.check(lamports=lamports, recipient_balance=self.balance(pubkey),
                                      airdropped_total=self.airdropped,
                                      faucet_balance=self.balance(self.faucet.pubkey()))
        except AirdropRefused as exc:
            raise RpcError(code=AIRDROP_REFUSED_CODE, message=str(exc)) from None
        bh, _ = self.latest_blockhash()
        ixs = [
            transfer(TransferParams(from_pubkey=self.faucet.pubkey(), to_pubkey=pubkey, lamports=lamports)),
            Instruction(MEMO_PROGRAM, f"airdrop {self.height}.{self.tx_count}".encode(), []),
        ]
        tx = Transaction.new_signed_with_payer(ixs, self.faucet.pubkey(), [self.faucet], bh)
        return self.send(bytes(tx), preflight=True)

    # --- persistence -----------------------------------------------------

    def _open_state(self, readonly: bool) -> None:
        assert self.state_path is not None
        if not readonly:
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._side("lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise LedgerLocked(f"ledger state {self.state_path} is in use by another process") from None
            self._lock_fd = fd
        # Before the replay: the faucet's own airdrops in the journal are counted as they re-execute.
        self.faucet = load_or_create_faucet(self.state_path, create=not readonly)
        snap = self.state_path
        if snap.exists():
            self._load_snapshot(snap.read_bytes())
        jpath = self._side("journal")
        self._replaying = True
        try:
            if jpath.exists():
                good = self._replay(jpath.read_bytes())
                if not readonly and good < jpath.stat().st_size:
                    with open(jpath, "r+b") as f:  # drop a torn last entry
                        f.truncate(good)
        finally:
            self._replaying = False
        if not readonly:
            fd = os.open(jpath, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._journal = os.fdopen(fd, "ab")  # held open for the ledger's lifetime

    def _retire_legacy_faucet(self) -> None:
        """Move what the derivable faucet of earlier ledgers holds to this
        ledger's own faucet, so that nobody can sign it away (journaled)."""
        legacy = self._legacy_faucet.pubkey()
        held = self.balance(legacy)
        if held == 0 or self.faucet.pubkey() == legacy:
            return
        mine = self.balance(self.faucet.pubkey())
        self.set_account(self.faucet.pubkey(), Account(mine + held, b"", SYSTEM_PROGRAM, False, 0))
        self.set_account(legacy, Account(0, b"", SYSTEM_PROGRAM, False, 0))

    def _replay(self, data: bytes) -> int:
        pos = 0
        while pos + 4 <= len(data):
            (n,) = struct.unpack_from(">I", data, pos)
            if pos + 4 + n > len(data):
                break
            try:
                entry = msgpack.unpackb(data[pos + 4 : pos + 4 + n])
            except (ValueError, msgpack.UnpackException):
                break
            pos += 4 + n
            seq, kind, *rest = entry
            if seq <= self._seq:
                continue
            self._seq = seq
            self._journal_entries += 1
            if kind == "adv":
                blocks, t = rest
                for _ in range(blocks):
                    self.height += 1
                    self._new_blockhash()
                self.time_ms = max(self.time_ms, t)
                self._sync_sysvars()
            elif kind == "tx":
                raw, _height, t = rest
                self.time_ms = t
                self._execute(VersionedTransaction.from_bytes(raw), raw)
            elif kind == "acct":
                self.svm.set_account(Pubkey.from_bytes(rest[0]), Account.from_bytes(rest[1]))
        return pos

    def _journal_append(self, entry: list[Any]) -> None:
        if self._replaying or self._journal is None:
            return
        self._seq += 1
        body = msgpack.packb([self._seq, *entry])
        self._journal.write(struct.pack(">I", len(body)) + body)
        self._journal.flush()
        if self._fsync:
            os.fsync(self._journal.fileno())
        self._journal_entries += 1
        if self._journal_entries >= journal_entries_max:
            self.compact()

    def _snapshot_bytes(self) -> bytes:
        accounts = []
        for owner in SNAPSHOT_OWNERS:
            for pk, acc in self.svm.get_program_accounts(owner):
                accounts.append([bytes(pk), bytes(acc)])
        return bytes(msgpack.packb(
            {
                "seq": self._seq,
                "height": self.height,
                "time_ms": self.time_ms,
                "tx_count": self.tx_count,
                "accounts": accounts,
                "history": [r.to_obj() for r in self.history.values()],
                "sigs": [[k, slot, msgpack.packb(err)] for k, (slot, err) in self.sigs.items()],
                "airdropped": self.airdropped,
            }
        ))

    def _load_snapshot(self, data: bytes) -> None:
        s = msgpack.unpackb(data)
        self._seq = s["seq"]
        self.height = s["height"]
        self.time_ms = s["time_ms"]
        self.tx_count = s["tx_count"]
        self.airdropped = s.get("airdropped", 0)  # absent from snapshots written before #18.7
        # The snapshot holds every System account as it was: the genesis value of
        # the legacy faucet must not survive if the snapshot no longer has it.
        self.svm.set_account(self._legacy_faucet.pubkey(), Account(0, b"", SYSTEM_PROGRAM, False, 0))
        for pk, acc in s["accounts"]:
            self.svm.set_account(Pubkey.from_bytes(pk), Account.from_bytes(acc))
        self.history = OrderedDict((o[0], TxRecord.from_obj(o)) for o in s["history"])
        self.sigs = OrderedDict((k, (slot, msgpack.unpackb(err))) for k, slot, err in s["sigs"])
        self.blockhashes.clear()
        for h in range(max(0, self.height - blockhash_window), self.height + 1):
            self.blockhashes[str(self._blockhash_at(h))] = h
        self._sync_sysvars()

    def compact(self) -> None:
        """Write a snapshot atomically, then empty the journal."""
        if self.state_path is None or self._journal is None:
            return
        tmp = self._side("tmp")
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(self._snapshot_bytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)
        self._journal.close()
        fd = os.open(self._side("journal"), os.O_WRONLY | os.O_TRUNC | os.O_CREAT, 0o600)
        self._journal = os.fdopen(fd, "wb")  # held open, see above
        self._journal_entries = 0

    def _side(self, suffix: str) -> Path:
        assert self.state_path is not None
        return self.state_path.with_name(self.state_path.name + "." + suffix)

    def close(self) -> None:
        if self._journal is not None:
            self.compact()
            self._journal.close()
            self._journal = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _sim_failed(err: Any, logs: list[str], units: int) -> RpcError:
    words = {
        "BlockhashNotFound": "Blockhash not found",
        "AlreadyProcessed": "This transaction has already been processed",
        "AccountNotFound": "Attempt to debit an account but found no record of a prior credit.",
        "InsufficientFundsForFee": "Insufficient funds for fee",
    }
    text = words.get(err) if isinstance(err, str) else None
    if text is None and isinstance(err, dict) and "InstructionError" in err:
        idx, ierr = err["InstructionError"]
        detail = f"custom program error: {hex(ierr['Custom'])}" if isinstance(ierr, dict) and "Custom" in ierr else str(ierr)
        text = f"Error processing Instruction {idx}: {detail}"
    if text is None and isinstance(err, dict) and "InsufficientFundsForRent" in err:
        idx = err["InsufficientFundsForRent"].get("account_index")
        text = f"Transaction results in an account ({idx}) with insufficient funds for rent"
    if text is None:
        text = str(err)
    return RpcError(
        code=-32002,
        message=f"Transaction simulation failed: {text}",
        data={
            "accounts": None,
            "err": err,
            "innerInstructions": None,
            "logs": logs,
            "replacementBlockhash": None,
            "returnData": None,
            "unitsConsumed": units,
        },
    )


def signature_of(raw: bytes) -> Signature:
    return VersionedTransaction.from_bytes(raw).signatures[0]


def is_legacy(tx: VersionedTransaction) -> bool:
    return isinstance(tx.message, Message)
