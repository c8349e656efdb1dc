"""The "check" button: verify one proof from its bytes and the ledger, not from what a node says.

Three steps, each reported on its own so the page can say which one failed:

1. **signature**: the proof's signed envelope (its bytes, as the daemon holds
   them) decodes with :func:`p2pgpu.core.decode_proof`, which checks the
   Ed25519 signature, the schema and that the signer is the member the proof
   describes; its digest must be the proof hash asked about.
2. **inclusion**: the Merkle inclusion proof of that hash (RFC 6962, see
   ``core/_payout.py``) verifies with :func:`verify_inclusion`.  It comes from
   the daemon (a ``proof.inclusion`` method, or an ``inclusion`` or
   ``inclusion_proof`` field of the proof, payout or earning row: a worker
   keeps the one its payer sent with the paid notice) or, on the payer's own home, from its payout store,
   exactly as ``p2pgpu proof inclusion`` builds it.
3. **memo**: the transaction that paid the batch, fetched from the ledger by
   its signature, carries that Merkle root in its memo
   (:func:`p2pgpu.solana.memo_root`).

A step is ``ok: true``, ``ok: false`` (it does not hold: the proof fails) or
``ok: null`` (nothing to check yet, e.g. not paid yet).  The proof passes
only when all three are true.  Parsing and verification are the core's pure
functions; this module only finds the inputs.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from p2pgpu.core import PeerMisbehaved
from p2pgpu.core._payout import InclusionProof, inclusion_proof, verify_inclusion
from p2pgpu.core._proof import decode_proof
from p2pgpu.home import Home, HomeError

from ._source import DaemonSource, MethodMissing, SourceError

_T = TypeVar("_T")
HASH_RE = re.compile(r"[0-9a-f]{64}")
#: Keys under which a proof row may carry the signed proof's bytes (hex or base64).
WIRE_KEYS = ("wire", "envelope", "signed", "proof_bytes")


class CheckInputError(ValueError):
    """The request itself is malformed (not a 64-hex proof hash)."""


def _bytes_of(value: Any) -> bytes | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        pass
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


def _step(name: str, ok: bool | None, detail: str) -> dict[str, Any]:
    return {"name": name, "ok": ok, "detail": detail}


def check_signature(proof_hash: str, wire: bytes | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(step, facts): the signed proof's bytes decode, verify and hash to ``proof_hash``."""
    if wire is None:
        return _step("signature", None, "the daemon does not hold this proof's signed bytes"), {}
    try:
        sp = decode_proof(wire)
    except PeerMisbehaved as exc:
        return _step("signature", False, f"does not verify: {exc}"), {}
    facts = {"signer": sp.envelope.signer_peer_id, "job_id": sp.proof.job_id,
             "gpu_ms": sp.proof.gpu_ms}
    if sp.proof_hash.hex() != proof_hash:
        return _step("signature", False, f"the signed proof hashes to {sp.proof_hash.hex()}, not {proof_hash}"), facts
    return _step("signature", True, f"Ed25519 signature of {facts['signer']} verifies"), facts


def check_inclusion(proof_hash: str, doc: dict[str, Any] | None) -> tuple[dict[str, Any], InclusionProof | None]:
    if doc is None:
        return _step("inclusion", None, "not in a payout batch yet"), None
    try:
        inc = InclusionProof.from_json(doc)
    except ValueError as exc:
        return _step("inclusion", False, f"malformed inclusion proof: {exc}"), None
    if inc.proof_hash.hex() != proof_hash:
        return _step("inclusion", False, "the inclusion proof is of another proof hash"), inc
    if not verify_inclusion(inc):
        return _step("inclusion", False, f"the audit path does not lead to root {inc.root.hex()}"), inc
    return _step("inclusion", True, f"leaf {inc.index} of {inc.size} under root {inc.root.hex()[:16]}…"), inc


def check_memo(root: bytes | None, tx_raw: bytes | None, signature: str | None) -> dict[str, Any]:
    from p2pgpu.solana import memo_root

    if root is None or not signature:
        return _step("memo", None, "no paying transaction yet")
    if tx_raw is None:
        return _step("memo", False, f"the ledger has no transaction {signature}")
    found = memo_root(tx_raw)
    if found != root:
        return _step("memo", False, f"the transaction's memo is {found.hex() if found else 'not a payout root'}")
    return _step("memo", True, f"transaction {signature[:16]}… carries the root in its memo")


class ProofChecker:
    """Finds a proof's inputs (daemon, home) and runs the three steps."""

    def __init__(self, source: DaemonSource, home: Home, *, use_daemon: bool = True) -> None:
        self.source = source
        self.home = home
        #: False in the public mode: a stranger's request never makes the explorer call the daemon.
        self.use_daemon = use_daemon

    async def check(self, proof_hash: str, views: dict[str, Any]) -> dict[str, Any]:
        """Check ``proof_hash`` using the rows of the explorer's current ``views``."""
        proof_hash = proof_hash.lower()
        if not HASH_RE.fullmatch(proof_hash):
            raise CheckInputError("a proof hash is 64 hex characters")
        row = _find(views.get("proofs", {}).get("rows"), proof_hash)
        pay = _find(views.get("payouts", {}).get("rows"), proof_hash)
        wire = None
        for r in (row, pay):
            for key in WIRE_KEYS:
                wire = wire or _bytes_of((r or {}).get(key))
        if wire is None:
            wire = self._wire_from_store(proof_hash)
        sig_step, facts = check_signature(proof_hash, wire)
        inc_doc = await self._inclusion_doc(proof_hash, row, pay)
        inc_step, inc = check_inclusion(proof_hash, inc_doc)
        tx_sig = (inc_doc or {}).get("tx_signature") or (pay or {}).get("tx_signature") \
            or (row or {}).get("tx_signature")
        tx_sig = tx_sig if isinstance(tx_sig, str) else None
        if inc_doc is None and tx_sig:
            inc_step = _step("inclusion", None, f"paid by transaction {tx_sig[:16]}…, but this node holds no "
                                                "inclusion proof of it: check it on the payer's explorer")
        if inc is not None and inc_step["ok"] and tx_sig:
            try:
                tx_raw = await self._transaction(tx_sig)
            except LookupError as exc:
                memo_step = _step("memo", None, str(exc))
            else:
                memo_step = check_memo(inc.root, tx_raw, tx_sig)
        else:
            memo_step = check_memo(None, None, None)
        steps = [sig_step, inc_step, memo_step]
        return {"proof_hash": proof_hash, "valid": all(s["ok"] is True for s in steps),
                "failed": any(s["ok"] is False for s in steps), "steps": steps, "tx_signature": tx_sig,
                "root": inc.root.hex() if inc is not None else None,
                "known": row is not None or pay is not None or wire is not None, **facts}

    async def _inclusion_doc(self, proof_hash: str, row: dict[str, Any] | None,
                             pay: dict[str, Any] | None) -> dict[str, Any] | None:
        for r in (row, pay):
            for key in ("inclusion", "inclusion_proof"):
                doc = _json_object((r or {}).get(key))
                if doc is not None:
                    return {"tx_signature": (r or {}).get("tx_signature"), **doc}
        try:
            doc = await self.source.call("proof.inclusion", {"proof_hash": proof_hash}) if self.use_daemon else None
            if isinstance(doc, dict) and doc.get("root"):
                return doc
        except (MethodMissing, SourceError):
            pass  # no such method, or not this daemon's batch: the payer's store may know
        return self._inclusion_from_store(proof_hash)

    def _read_store(self, fn: Callable[[sqlite3.Connection], _T]) -> _T | None:
        """``fn(conn)`` on this home's store, read-only; None when there is no readable store."""
        from p2pgpu.store import db_path, open_db

        path = db_path(self.home.path)
        if not path.exists():
            return None
        try:
            conn = open_db(path, migrate=False, readonly=True)
        except sqlite3.Error:
            return None  # not a store we can read: the steps say "nothing to check yet"
        try:
            return fn(conn)
        except sqlite3.Error:
            return None  # a store without those tables (this home never paid or settled anything)
        finally:
            conn.close()

    def _wire_from_store(self, proof_hash: str) -> bytes | None:
        """The signed proof's bytes, as the submitter's store recorded them on settlement."""
        from p2pgpu.store import proof_wire

        found = self._read_store(lambda conn: proof_wire(conn, bytes.fromhex(proof_hash)))
        return found[0] if found is not None else None

    def _inclusion_from_store(self, proof_hash: str) -> dict[str, Any] | None:
        """On the payer's home, the same document as ``p2pgpu proof inclusion --json``."""
        from p2pgpu.store import batch_of_proof, batch_plan

        def read(conn: sqlite3.Connection) -> tuple[Any, str, str] | None:
            found = batch_of_proof(conn, proof_hash)
            if found is None:
                return None
            batch_id, signature, state = found
            return batch_plan(conn, batch_id), signature, state

        got = self._read_store(read)
        if got is None:
            return None
        plan, signature, state = got
        doc = inclusion_proof(plan.proof_hashes, bytes.fromhex(proof_hash)).to_json()
        return {**doc, "tx_signature": signature, "batch_state": state}

    async def _transaction(self, signature: str) -> bytes | None:
        from p2pgpu.solana import LedgerUnavailable, open_ledger
        from p2pgpu.wallet import home_ledger_spec

        try:
            spec = home_ledger_spec(self.home)
            ledger = open_ledger(spec, home_path=Path(self.home.path), readonly=True)
        except (HomeError, ValueError, OSError) as exc:
            raise LookupError(f"no ledger to ask: {exc}") from None
        try:
            return await ledger.transaction(signature)  # type: ignore[no-any-return]
        except LedgerUnavailable as exc:
            raise LookupError(f"ledger unreachable: {exc}") from None
        finally:
            await ledger.aclose()


def _json_object(value: Any) -> dict[str, Any] | None:
    """A dict, or a JSON text of one (a worker's store keeps the inclusion proof it was sent as text)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return value if isinstance(value, dict) else None


def _find(rows: list[dict[str, Any]] | None, proof_hash: str) -> dict[str, Any] | None:
    for r in rows or []:
        if str(r.get("proof_hash", "")).lower() == proof_hash:
            return r
    return None
