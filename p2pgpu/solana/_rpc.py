"""Solana JSON-RPC methods over an :class:`SvmLedger`: request dict in, response dict out.

No sockets here: ``_server.py`` feeds parsed JSON to :meth:`RpcMethods.handle`
and writes back what it returns.  The response shapes are the real node's
(Agave 2.x), checked against solana-py's parsers (solders) and
``@solana/web3.js`` 1.x in ``tests/solana``: ``context`` carries ``slot`` and
``apiVersion``, errors use the node's codes (-32002 preflight failure with
``err`` and ``logs`` in ``data``, -32003 signature failure, -32602 bad params,
-32601 unknown method, -32015 unsupported transaction version).

Everything is final as soon as it executes (one node, no forks), so every
status says ``confirmationStatus: "finalized"`` and any commitment is met.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from typing import Any

import base58
from solders.message import MessageV0, from_bytes_versioned
from solders.pubkey import Pubkey
from solders.transaction import VersionedTransaction

from ._svm import TOKEN_2022_PROGRAM, TOKEN_PROGRAM, RpcError, SvmLedger, TxRecord

log = logging.getLogger("p2pgpu.ledger")
API_VERSION = "2.2.0"
FEATURE_SET = 3294202862
RENT_EPOCH_EXEMPT = 18446744073709551615
signatures_per_request_max = 256
accounts_per_request_max = 100


def _bad(msg: str) -> RpcError:
    return RpcError(code=-32602, message=msg)


def _pubkey(v: Any) -> Pubkey:
    try:
        return Pubkey.from_string(str(v))
    except ValueError:
        raise _bad(f"Invalid param: {v!r} is not a valid public key") from None


def _decode(data: Any, encoding: str) -> bytes:
    if not isinstance(data, str):
        raise _bad("Invalid params: transaction data must be a string")
    try:
        if encoding == "base64":
            return base64.b64decode(data, validate=True)
        if encoding == "base58":
            return base58.b58decode(data)
    except ValueError:
        raise _bad(f"invalid {encoding} encoding") from None
    raise _bad(f"unsupported encoding: {encoding}. Supported encodings: base58, base64")


def _cfg(params: list[Any], i: int) -> dict[str, Any]:
    v = params[i] if len(params) > i else None
    if isinstance(v, dict):
        return dict(v)
    return {}


class RpcMethods:
    """Dispatch of one JSON-RPC request; ``on_executed`` hears of each new transaction."""

    def __init__(self, ledger: SvmLedger, *, on_executed: Callable[[str], None] | None = None) -> None:
        self.ledger = ledger
        self.on_executed = on_executed or (lambda sig: None)
        self.methods: dict[str, Callable[[list[Any]], Any]] = {
            name[3:]: getattr(self, name) for name in dir(self) if name.startswith("rpc")
        }

    def ctx(self, value: Any) -> dict[str, Any]:
        return {"context": {"apiVersion": API_VERSION, "slot": self.ledger.slot}, "value": value}

    def handle(self, req: Any) -> dict[str, Any] | None:
        """One request object -> one response object (None for a notification)."""
        if not isinstance(req, dict) or req.get("jsonrpc") != "2.0" or not isinstance(req.get("method"), str):
            return {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid request"}, "id": None}
        rid = req.get("id")
        params = req.get("params", [])
        if params is None:
            params = []
        fn = self.methods.get(req["method"])
        if fn is None:
            return {"jsonrpc": "2.0", "error": {"code": -32601, "message": "Method not found"}, "id": rid}
        if not isinstance(params, list):
            return {"jsonrpc": "2.0", "error": {"code": -32602, "message": "Invalid params"}, "id": rid}
        try:
            result = fn(params)
        except RpcError as exc:
            err: dict[str, Any] = {"code": exc.code, "message": exc.message}
            if exc.data is not None:
                err["data"] = exc.data
            return {"jsonrpc": "2.0", "error": err, "id": rid}
        except (IndexError, KeyError, TypeError, ValueError):
            return {"jsonrpc": "2.0", "error": {"code": -32602, "message": "Invalid params"}, "id": rid}
        except Exception:  # a bug of ours must not take the ledger down: answer, and say so on stderr
            log.exception("internal error in %s", req["method"])
            return {"jsonrpc": "2.0", "error": {"code": -32603, "message": "Internal error"}, "id": rid}
        return {"jsonrpc": "2.0", "result": result, "id": rid}

    # --- cluster ---------------------------------------------------------

    def rpcgetHealth(self, p: list[Any]) -> str:
        return "ok"

    def rpcgetVersion(self, p: list[Any]) -> dict[str, Any]:
        return {"solana-core": API_VERSION, "feature-set": FEATURE_SET}

    def rpcgetGenesisHash(self, p: list[Any]) -> str:
        return str(self.ledger.genesis_hash)

    def rpcgetIdentity(self, p: list[Any]) -> dict[str, str]:
        return {"identity": str(self.ledger.faucet.pubkey())}

    def rpcgetSlot(self, p: list[Any]) -> int:
        return self.ledger.slot

    def rpcgetBlockHeight(self, p: list[Any]) -> int:
        return self.ledger.height

    def rpcgetEpochInfo(self, p: list[Any]) -> dict[str, int]:
        return self.ledger.epoch_info()

    def rpcgetTransactionCount(self, p: list[Any]) -> int:
        return self.ledger.tx_count

    def rpcminimumLedgerSlot(self, p: list[Any]) -> int:
        return 0

    def rpcgetFirstAvailableBlock(self, p: list[Any]) -> int:
        return 0

    def rpcgetRecentPrioritizationFees(self, p: list[Any]) -> list[Any]:
        return []

    def rpcgetEpochSchedule(self, p: list[Any]) -> dict[str, Any]:
        return {"firstNormalEpoch": 0, "firstNormalSlot": 0, "leaderScheduleSlotOffset": 432000,
                "slotsPerEpoch": 432000, "warmup": False}

    # --- blockhashes and fees ---------------------------------------------

    def rpcgetLatestBlockhash(self, p: list[Any]) -> dict[str, Any]:
        bh, lvh = self.ledger.latest_blockhash()
        return self.ctx({"blockhash": str(bh), "lastValidBlockHeight": lvh})

    def rpcisBlockhashValid(self, p: list[Any]) -> dict[str, Any]:
        return self.ctx(self.ledger.blockhash_valid(str(p[0])))

    def rpcgetFeeForMessage(self, p: list[Any]) -> dict[str, Any]:
        raw = _decode(p[0], "base64")
        try:
            msg = from_bytes_versioned(raw)
        except ValueError:
            raise _bad("invalid message") from None
        if not self.ledger.blockhash_valid(str(msg.recent_blockhash)):
            return self.ctx(None)
        return self.ctx(5000 * msg.header.num_required_signatures)

    def rpcgetMinimumBalanceForRentExemption(self, p: list[Any]) -> int:
        n = p[0] if p else 0
        if type(n) is not int or not 0 <= n <= 10 * 1024 * 1024:
            raise _bad("Invalid params: data length")
        return self.ledger.rent_exempt_minimum(n)

    # --- accounts --------------------------------------------------------

    def rpcgetBalance(self, p: list[Any]) -> dict[str, Any]:
        return self.ctx(self.ledger.balance(_pubkey(p[0])))

    def _account_json(self, pk: Pubkey, encoding: str) -> dict[str, Any] | None:
        acc = self.ledger.account(pk)
        if acc is None:
            return None
        data = bytes(acc.data)
        if encoding == "base58":
            enc: Any = [base58.b58encode(data).decode(), "base58"]
        else:
            enc = [base64.b64encode(data).decode(), "base64"]
        return {
            "data": enc,
            "executable": acc.executable,
            "lamports": acc.lamports,
            "owner": str(acc.owner),
            "rentEpoch": RENT_EPOCH_EXEMPT,
            "space": len(data),
        }

    def rpcgetAccountInfo(self, p: list[Any]) -> dict[str, Any]:
        enc = _cfg(p, 1).get("encoding", "base58")
        return self.ctx(self._account_json(_pubkey(p[0]), enc))

    def rpcgetMultipleAccounts(self, p: list[Any]) -> dict[str, Any]:
        keys = p[0]
        if not isinstance(keys, list) or len(keys) > accounts_per_request_max:
            raise _bad(f"Too many inputs provided; max {accounts_per_request_max}")
        enc = _cfg(p, 1).get("encoding", "base64")
        return self.ctx([self._account_json(_pubkey(k), enc) for k in keys])

    def rpcgetTokenAccountsByOwner(self, p: list[Any]) -> dict[str, Any]:
        owner = bytes(_pubkey(p[0]))
        filt = p[1] if len(p) > 1 and isinstance(p[1], dict) else {}
        enc = _cfg(p, 2).get("encoding", "base64")
        if "mint" in filt:
            mint: bytes | None = bytes(_pubkey(filt["mint"]))
            programs = [TOKEN_PROGRAM, TOKEN_2022_PROGRAM]
        elif "programId" in filt:
            mint, programs = None, [_pubkey(filt["programId"])]
        else:
            raise _bad("Invalid params: either mint or programId must be given")
        out = []
        for program in programs:
            for pk, acc in self.ledger.svm.get_program_accounts(program):
                data = bytes(acc.data)
                if len(data) >= 165 and data[32:64] == owner and (mint is None or data[0:32] == mint):
                    out.append({"account": self._account_json(pk, enc), "pubkey": str(pk)})
        return self.ctx(out)

    def rpcgetBlockTime(self, p: list[Any]) -> int | None:
        slot = p[0]
        if type(slot) is not int or slot < 0:
            raise _bad("Invalid params: slot")
        if slot > self.ledger.slot:
            raise RpcError(code=-32004, message=f"Block not available for slot {slot}")
        return self.ledger.time_ms // 1000

    def rpcgetTokenAccountBalance(self, p: list[Any]) -> dict[str, Any]:
        pk = _pubkey(p[0])
        acc = self.ledger.account(pk)
        data = bytes(acc.data) if acc is not None else b""
        if len(data) < 165:
            raise _bad("Invalid param: not a Token account")
        mint = self.ledger.account(Pubkey.from_bytes(data[0:32]))
        decimals = bytes(mint.data)[44] if mint is not None and len(mint.data) >= 82 else 0
        amount = int.from_bytes(data[64:72], "little")
        return self.ctx(_ui_amount(amount, decimals))

    # --- transactions ----------------------------------------------------

    def rpcsendTransaction(self, p: list[Any]) -> str:
        cfg = _cfg(p, 1)
        raw = _decode(p[0], cfg.get("encoding", "base58"))
        sig = self.ledger.send(raw, preflight=not cfg.get("skipPreflight", False))
        self.on_executed(sig)
        return sig

    def rpcsimulateTransaction(self, p: list[Any]) -> dict[str, Any]:
        cfg = _cfg(p, 1)
        raw = _decode(p[0], cfg.get("encoding", "base58"))
        tx = self.ledger.parse(raw)
        replace = bool(cfg.get("replaceRecentBlockhash", False))
        sim = self.ledger.simulate(tx, sig_verify=bool(cfg.get("sigVerify", False)), replace_blockhash=replace)
        replacement = None
        if replace:
            bh, lvh = self.ledger.latest_blockhash()
            replacement = {"blockhash": str(bh), "lastValidBlockHeight": lvh}
        return self.ctx(
            {
                "accounts": None,
                "err": sim.err,
                "innerInstructions": None,
                "logs": sim.logs,
                "replacementBlockhash": replacement,
                "returnData": None,
                "unitsConsumed": sim.units,
            }
        )

    def rpcrequestAirdrop(self, p: list[Any]) -> str:
        pk = _pubkey(p[0])
        lamports = p[1]
        if type(lamports) is not int or lamports <= 0:
            raise _bad("Invalid params: lamports must be a positive integer")
        sig = self.ledger.airdrop(pk, lamports)  # the ledger's AirdropLimits refuse with -32600
        self.on_executed(sig)
        return sig

    def rpcgetSignatureStatuses(self, p: list[Any]) -> dict[str, Any]:
        sigs = p[0]
        if not isinstance(sigs, list) or len(sigs) > signatures_per_request_max:
            raise _bad(f"Too many inputs provided; max {signatures_per_request_max}")
        return self.ctx([self._status(str(s)) for s in sigs])

    def _status(self, sig: str) -> dict[str, Any] | None:
        st = self.ledger.status(sig)
        if st is None:
            return None
        slot, err = st
        return {
            "slot": slot,
            "confirmations": None,
            "err": err,
            "status": {"Ok": None} if err is None else {"Err": err},
            "confirmationStatus": "finalized",
        }

    def rpcgetSignaturesForAddress(self, p: list[Any]) -> list[dict[str, Any]]:
        addr = str(_pubkey(p[0]))
        limit = min(int(_cfg(p, 1).get("limit", 1000)), 1000)
        out = []
        for rec in reversed(self.ledger.history.values()):
            keys = [str(k) for k in VersionedTransaction.from_bytes(rec.tx).message.account_keys]
            if addr in keys or addr in rec.loaded_writable or addr in rec.loaded_readonly:
                out.append({"blockTime": rec.block_time_s, "confirmationStatus": "finalized", "err": rec.err,
                            "memo": None, "signature": rec.signature, "slot": rec.slot})
                if len(out) >= limit:
                    break
        return out

    def rpcgetTransaction(self, p: list[Any]) -> dict[str, Any] | None:
        cfg = _cfg(p, 1)
        encoding = p[1] if len(p) > 1 and isinstance(p[1], str) else cfg.get("encoding", "json")
        rec = self.ledger.record(str(p[0]))
        if rec is None:
            return None
        tx = VersionedTransaction.from_bytes(rec.tx)
        v0 = isinstance(tx.message, MessageV0)
        if v0 and cfg.get("maxSupportedTransactionVersion") is None:
            raise RpcError(
                code=-32015,
                message="Transaction version (0) is not supported by the requesting client. Please try the request "
                'again with the following configuration parameter: "maxSupportedTransactionVersion": 0',
            )
        if encoding in ("base64", "base58"):
            data = base64.b64encode(rec.tx).decode() if encoding == "base64" else base58.b58encode(rec.tx).decode()
            tx_json: Any = [data, encoding]
        elif encoding == "jsonParsed":
            tx_json = _tx_json_parsed(tx, rec)
        else:
            tx_json = _tx_json(tx)
        out: dict[str, Any] = {
            "blockTime": rec.block_time_s,
            "meta": _meta_json(rec, v0),
            "slot": rec.slot,
            "transaction": tx_json,
        }
        if cfg.get("maxSupportedTransactionVersion") is not None:
            out["version"] = 0 if v0 else "legacy"
        return out


def _ui_amount(amount: int, decimals: int) -> dict[str, Any]:
    s = str(amount).rjust(decimals + 1, "0")
    text = (s[:-decimals] + "." + s[-decimals:]).rstrip("0").rstrip(".") if decimals else s
    return {"amount": str(amount), "decimals": decimals, "uiAmount": amount / 10**decimals, "uiAmountString": text}


def _tx_json(tx: VersionedTransaction) -> dict[str, Any]:
    msg = tx.message
    h = msg.header
    message: dict[str, Any] = {
        "accountKeys": [str(k) for k in msg.account_keys],
        "header": {
            "numReadonlySignedAccounts": h.num_readonly_signed_accounts,
            "numReadonlyUnsignedAccounts": h.num_readonly_unsigned_accounts,
            "numRequiredSignatures": h.num_required_signatures,
        },
        "instructions": [
            {
                "accounts": list(bytes(ix.accounts)),
                "data": base58.b58encode(bytes(ix.data)).decode(),
                "programIdIndex": ix.program_id_index,
                "stackHeight": None,
            }
            for ix in msg.instructions
        ],
        "recentBlockhash": str(msg.recent_blockhash),
    }
    if isinstance(msg, MessageV0):
        message["addressTableLookups"] = [
            {
                "accountKey": str(lk.account_key),
                "readonlyIndexes": list(bytes(lk.readonly_indexes)),
                "writableIndexes": list(bytes(lk.writable_indexes)),
            }
            for lk in msg.address_table_lookups
        ]
    return {"message": message, "signatures": [str(s) for s in tx.signatures]}


def _static_writable(msg: Any, i: int) -> bool:
    h = msg.header
    n = len(msg.account_keys)
    if i < h.num_required_signatures:
        return bool(i < h.num_required_signatures - h.num_readonly_signed_accounts)
    return bool(i < n - h.num_readonly_unsigned_accounts)


def _tx_json_parsed(tx: VersionedTransaction, rec: TxRecord) -> dict[str, Any]:
    """``jsonParsed``: account keys with their roles; System transfers and memos
    parsed, every other instruction in the partially decoded form."""
    msg = tx.message
    static = [str(k) for k in msg.account_keys]
    keys = static + rec.loaded_writable + rec.loaded_readonly
    account_keys = []
    for i, k in enumerate(keys):
        source = "transaction" if i < len(static) else "lookupTable"
        writable = _static_writable(msg, i) if i < len(static) else k in rec.loaded_writable
        account_keys.append({"pubkey": k, "signer": msg.is_signer(i), "source": source, "writable": writable})
    instructions: list[dict[str, Any]] = []
    for ix in msg.instructions:
        program = keys[ix.program_id_index]
        accts = [keys[a] for a in bytes(ix.accounts)]
        data = bytes(ix.data)
        if program.startswith("Memo"):
            try:
                instructions.append({"parsed": data.decode(), "program": "spl-memo", "programId": program,
                                     "stackHeight": None})
                continue
            except UnicodeDecodeError:
                pass
        if program == "11111111111111111111111111111111" and len(data) == 12 and data[:4] == b"\x02\0\0\0":
            instructions.append({
                "parsed": {"info": {"destination": accts[1], "lamports": int.from_bytes(data[4:], "little"),
                                    "source": accts[0]}, "type": "transfer"},
                "program": "system", "programId": program, "stackHeight": None})
            continue
        instructions.append({"accounts": accts, "data": base58.b58encode(data).decode(), "programId": program,
                             "stackHeight": None})
    message: dict[str, Any] = {"accountKeys": account_keys, "instructions": instructions,
                               "recentBlockhash": str(msg.recent_blockhash)}
    if isinstance(msg, MessageV0):
        message["addressTableLookups"] = _tx_json(tx)["message"]["addressTableLookups"]
    return {"message": message, "signatures": [str(s) for s in tx.signatures]}


def _meta_json(rec: TxRecord, v0: bool) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "computeUnitsConsumed": rec.compute_units,
        "err": rec.err,
        "fee": rec.fee,
        "innerInstructions": [],
        "logMessages": rec.logs,
        "postBalances": rec.post_balances,
        "postTokenBalances": [],
        "preBalances": rec.pre_balances,
        "preTokenBalances": [],
        "rewards": [],
        "status": {"Ok": None} if rec.err is None else {"Err": rec.err},
    }
    if v0:
        meta["loadedAddresses"] = {"readonly": rec.loaded_readonly, "writable": rec.loaded_writable}
    else:
        meta["loadedAddresses"] = {"readonly": [], "writable": []}
    return meta
