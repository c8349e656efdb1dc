"""Receipts: what a settled job paid, signed by both sides.

After settlement the submitter signs a :class:`Receipt` (``Kind.RECEIPT``):
the job, its certificate, the Solana address that paid, and one line per
member: its outcome, the amount, the address paid and the payout
transaction's signature.  Each member signs a :class:`MemberReceipt`
(``Kind.MEMBER_RECEIPT``) saying what it saw of the submitter: what it was
owed, what it received, in which transaction, and whether that was on time,
late, or never.

Receipts are the evidence reputation is computed from
(``p2pgpu.core._reputation``, ``docs/reputation.md``); anyone holding them
checks them the same way.  :func:`decode_receipt` and
:func:`decode_member_receipt` take bytes from strangers: sizes are checked
before decoding, bodies must be canonical, every field is typed and bounded,
and the signer must be the party the receipt speaks for; any input either
decodes or raises ``PeerMisbehaved``.

What travels (gossip topic ``/p2pgpu/receipts/1``, DHT key
:func:`receipts_key` of each member) is a :class:`PublishedReceipt`: the
signed receipt with the job's signed certificate beside it, so that whoever
holds it can bind each paid line to the payout address its member signed in
its accept (``compute_reputation``'s ``cert_addresses``) without asking
anyone.  :func:`build_receipt` turns what settlement decided and what the
payout outbox paid into a receipt, and :func:`receipt_ready` says when the
submitter signs it (every payable line paid, or the wait is over).

**The payer co-signs** (#16.2).  A receipt whose lines cite payments carries
``payer_signature``: the Ed25519 signature, by the key of the Solana address
``payer`` (the fee payer that signed the payout transactions), over
:func:`payer_message` (the receipt's body without that field, domain-tagged).
Without it a forger could sign, as a sybil submitter, a receipt for a job of
its own citing a victim's real payout under the genuine payer's name (its own
accept naming the victim's address), date it before the victim's receipt and
take the credit, since each ``(transaction, address)`` credits the first
receipt that cites it.  The payer's key is the one thing the ledger ties to
those payments (the transaction is signed by it), so the check needs nothing
but the receipt and the ledger: a receipt citing a payment is credit only
when the key that paid says so.  The decoder refuses a co-signature that does
not verify (``BAD_SIGNATURE``); a receipt without one decodes, and its
payments verify nothing (``compute_reputation``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import base58

from . import _limits as limits
from . import _schema as s
from ._advert import is_solana_address
from ._codec import decode, encode
from ._envelope import Envelope, Kind, body_of, envelope_from_obj, seal
from ._errors import PeerMisbehaved, Reason
from ._formation_messages import Certificate
from ._identity import Identity, Verifier, verify_signature
from ._manifest import members_max

peer_id_len_max = limits.peer_id_len_max
currency_len_max = 64
#: A Solana transaction signature: 64 bytes in base58, 87 or 88 characters.
tx_signature_len_max = 88
#: How a member's part of a job ended for the payer.
LINE_OUTCOMES = ("paid", "outside_quorum", "no_quorum", "proof_refused", "no_proof", "unpaid")
MEMBER_VERDICTS = ("on_time", "late", "unpaid")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_B58 = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{1,88}$")


def _job_id(body: dict[str, Any]) -> str:
    v = s.get_str(body, "job_id", 64, len_min=64)
    if not _HEX64.match(v):
        raise s.fail("job_id", "must be 64 lowercase hex characters")
    return v


def _check_tx(tx: str) -> None:
    if tx and not _B58.match(tx):
        raise ValueError("tx_signature must be base58")


def _check_address(addr: str, what: str) -> None:
    if addr and not is_solana_address(addr):
        raise ValueError(f"{what} is not a Solana address")


#: The payer's Ed25519 co-signature (#16.2).
payer_signature_bytes = 64
_PAYER_TAG = b"p2pgpu/receipt-payer/v1\x00"

#: Payments a receipt line lists at most (the largest; ``amount`` is the total).
line_payments_max = 8
#: Payments one receipt lists at most, over all its lines (so that 64 lines of
#: the longest peer ids still fit ``Kind.RECEIPT``: ``test_the_largest_receipt_fits_its_kind``).
receipt_payments_max = 128


def _payments_rule(payments: tuple[tuple[str, int], ...], amount: int) -> None:
    """A line's payments: unique transactions, each a positive amount, the
    largest first (then by signature: one canonical order), at most
    ``line_payments_max``; together exactly ``amount`` when all are listed,
    at most ``amount`` when the list is full (the smallest left out)."""
    if len(payments) > line_payments_max:
        raise ValueError(f"at most {line_payments_max} payments a line")
    for tx, paid in payments:
        if not (isinstance(tx, str) and tx and isinstance(paid, int) and not isinstance(paid, bool)):
            raise ValueError("a payment is [tx_signature, amount]")
        _check_tx(tx)
        if not 0 < paid <= s.int_max:
            raise ValueError("a payment's amount is positive")
    if len({tx for tx, _ in payments}) != len(payments):
        raise ValueError("one entry per transaction")
    if list(payments) != sorted(payments, key=lambda p: (-p[1], p[0])):
        raise ValueError("payments are listed largest first, then by signature")
    if sum(p for _, p in payments) > amount:
        raise ValueError("amount is the total of the payments (more only when the list is full)")


def payments_cap(paying_lines: int) -> int:
    """Payments listed per line in a receipt with ``paying_lines`` lines that
    cite payments: ``line_payments_max``, less when many lines share the
    receipt's ``receipt_payments_max``."""
    return max(1, min(line_payments_max, receipt_payments_max // max(1, paying_lines)))


@dataclass(frozen=True, kw_only=True, slots=True)
class ReceiptLine:
    """One member's line.  ``outcome`` says how its final part ended for the
    payer; ``amount`` is what it was paid in all (pay-as-you-go installments
    and the final remainder), ``payments`` the transactions that paid it,
    ``(tx_signature, amount)``, largest first, at most ``line_payments_max``."""

    peer_id: str
    outcome: str
    amount: int
    address: str
    payments: tuple[tuple[str, int], ...]
    proof_hash: bytes

    def __post_init__(self) -> None:
        if not 0 < len(self.peer_id) <= peer_id_len_max or self.outcome not in LINE_OUTCOMES:
            raise ValueError(f"peer_id, and outcome one of {', '.join(LINE_OUTCOMES)}")
        if not 0 <= self.amount <= s.int_max or len(self.proof_hash) not in (0, 32):
            raise ValueError("amount in [0, 2^63) and proof_hash empty or 32 bytes")
        _payments_rule(self.payments, self.amount)
        _check_address(self.address, "address")
        if (self.amount > 0) != bool(self.payments) or (self.amount > 0) != bool(self.address):
            raise ValueError("a line that was paid has an amount, an address and its transactions; others none")
        if self.outcome == "paid" and not self.payments:
            raise ValueError("a paid line has an amount, an address and its transactions")

    @property
    def tx_signatures(self) -> list[str]:
        return [tx for tx, _ in self.payments]

    @property
    def tx_signature(self) -> str:
        """The largest payment's transaction ("" when none)."""
        return self.payments[0][0] if self.payments else ""

    def to_obj(self) -> list[Any]:
        return [self.peer_id, self.outcome, self.amount, self.address, [[tx, a] for tx, a in self.payments],
                self.proof_hash]

    @classmethod
    def from_obj(cls, row: Any, where: str) -> ReceiptLine:
        if not (isinstance(row, list) and len(row) == 6):
            raise s.fail(where, "must be [peer_id, outcome, amount, address, payments, proof_hash]")
        body = dict(zip(("peer_id", "outcome", "amount", "address", "payments", "proof_hash"), row))
        try:
            pays = s.get_list(body, "payments", line_payments_max)
            if not all(isinstance(p, list) and len(p) == 2 for p in pays):
                raise ValueError("payments: each is [tx_signature, amount]")
            for tx, _ in pays:
                if not isinstance(tx, str) or not 0 < len(tx) <= tx_signature_len_max:
                    raise ValueError(f"payments: a tx_signature is 1..{tx_signature_len_max} characters")
            return cls(peer_id=s.get_str(body, "peer_id", peer_id_len_max, len_min=1),
                       outcome=s.get_str(body, "outcome", 16), amount=s.get_int(body, "amount"),
                       address=s.get_str(body, "address", 44),
                       payments=tuple((tx, a) for tx, a in pays),
                       proof_hash=s.get_bytes(body, "proof_hash", 32))
        except ValueError as exc:
            raise s.fail(where, str(exc)) from None


@dataclass(frozen=True, kw_only=True, slots=True)
class Receipt:
    """The submitter's account of a settled job (fields: docs/reputation.md)."""

    job_id: str
    cert_hash: bytes
    submitter: str
    payer: str
    currency: str
    settled_at_ms: int
    lines: tuple[ReceiptLine, ...]
    #: The payer key's co-signature of :func:`payer_message` (empty: none; its
    #: payments then verify nothing).  On the wire only when present.
    payer_signature: bytes = b""

    def __post_init__(self) -> None:
        if not _HEX64.match(self.job_id) or len(self.cert_hash) != 32:
            raise ValueError("job_id is 64 hex characters and cert_hash 32 bytes")
        if not 0 < len(self.submitter) <= peer_id_len_max or not 0 < len(self.currency) <= currency_len_max:
            raise ValueError("submitter and currency lengths")
        _check_address(self.payer, "payer")
        if not 1 <= len(self.lines) <= members_max:
            raise ValueError(f"between 1 and {members_max} lines")
        peers = [ln.peer_id for ln in self.lines]
        if peers != sorted(set(peers)):
            raise ValueError("one line per member, sorted by peer id")
        if self.submitter in peers:
            raise ValueError("the submitter is not one of its members")
        if not 0 <= self.settled_at_ms <= s.int_max:
            raise ValueError("settled_at_ms out of range")
        if any(ln.payments for ln in self.lines) and not self.payer:
            raise ValueError("a receipt with payments names its payer")
        if len(self.payer_signature) not in (0, payer_signature_bytes) or (self.payer_signature and not self.payer):
            raise ValueError(f"payer_signature is {payer_signature_bytes} bytes, by the payer named")
        cap = payments_cap(sum(1 for ln in self.lines if ln.payments))
        for ln in self.lines:
            if len(ln.payments) > cap or (sum(p for _, p in ln.payments) != ln.amount and len(ln.payments) < cap):
                raise ValueError(f"a line lists all its payments, or its {cap} largest")

    @property
    def paid_total(self) -> int:
        return sum(ln.amount for ln in self.lines)

    def to_obj(self) -> dict[str, Any]:
        obj = {"job_id": self.job_id, "cert_hash": self.cert_hash, "submitter": self.submitter,
               "payer": self.payer, "currency": self.currency, "settled_at_ms": self.settled_at_ms,
               "lines": [ln.to_obj() for ln in self.lines]}
        if self.payer_signature:
            obj["payer_signature"] = self.payer_signature
        return obj

    @property
    def cosigned(self) -> bool:
        """Whether the payer co-signed it (checked when it was decoded or signed)."""
        return bool(self.payer_signature)

    @classmethod
    def from_obj(cls, body: dict[str, Any]) -> Receipt:
        s.exact_keys(body, {"job_id", "cert_hash", "submitter", "payer", "currency", "settled_at_ms", "lines"},
                     frozenset({"payer_signature"}))
        cosig = b""
        if "payer_signature" in body:
            cosig = s.get_bytes(body, "payer_signature", payer_signature_bytes, len_min=payer_signature_bytes)
        lines = tuple(ReceiptLine.from_obj(row, f"lines[{i}]")
                      for i, row in enumerate(s.get_list(body, "lines", members_max, len_min=1)))
        try:
            return cls(job_id=_job_id(body), cert_hash=s.get_bytes(body, "cert_hash", 32, len_min=32),
                       submitter=s.get_str(body, "submitter", peer_id_len_max, len_min=1),
                       payer=s.get_str(body, "payer", 44), currency=s.get_str(body, "currency", currency_len_max,
                                                                                len_min=1),
                       settled_at_ms=s.get_int(body, "settled_at_ms"), lines=lines, payer_signature=cosig)
        except ValueError as exc:
            raise PeerMisbehaved(Reason.BAD_SCHEMA, str(exc)) from None


def payer_message(receipt: Receipt) -> bytes:
    """What the payer key signs: the receipt's canonical body without its
    co-signature, domain-tagged (never a valid Solana transaction message,
    nor any other kind's signed bytes)."""
    return _PAYER_TAG + encode(replace(receipt, payer_signature=b"").to_obj())


def cosign(receipt: Receipt, sign: Callable[[bytes], bytes]) -> Receipt:
    """``receipt`` co-signed by the payer: ``sign`` is the payer key's
    Ed25519 signing of raw bytes (a ``solders`` keypair's ``sign_message``,
    an :class:`Identity`'s ``sign``).  The caller makes sure the key is the
    payer's; :func:`check_payer_signature` refuses it otherwise."""
    if not receipt.payer:
        raise ValueError("a receipt without a payer has nobody to co-sign it")
    return replace(receipt, payer_signature=bytes(sign(payer_message(receipt))))


def check_payer_signature(receipt: Receipt) -> None:
    """``PeerMisbehaved(BAD_SIGNATURE)`` unless the co-signature, if any, is
    the payer key's over :func:`payer_message` (a Solana address is the
    base58 of its Ed25519 public key)."""
    if not receipt.payer_signature:
        return
    try:
        key = base58.b58decode(receipt.payer)
    except ValueError:
        raise PeerMisbehaved(Reason.BAD_SIGNATURE, "the payer is not a key") from None
    verify_signature(key, payer_message(receipt), receipt.payer_signature)


@dataclass(frozen=True, kw_only=True, slots=True)
class MemberReceipt:
    """What a member saw of the submitter for one job."""

    job_id: str
    cert_hash: bytes
    member: str
    submitter: str
    owed: int
    received: int
    tx_signature: str
    verdict: str
    reported_at_ms: int

    def __post_init__(self) -> None:
        if not _HEX64.match(self.job_id) or len(self.cert_hash) != 32:
            raise ValueError("job_id is 64 hex characters and cert_hash 32 bytes")
        if not (0 < len(self.member) <= peer_id_len_max and 0 < len(self.submitter) <= peer_id_len_max):
            raise ValueError("member and submitter lengths")
        if self.member == self.submitter or self.verdict not in MEMBER_VERDICTS:
            raise ValueError(f"a member is not its submitter; verdict one of {', '.join(MEMBER_VERDICTS)}")
        if not (0 <= self.owed <= s.int_max and 0 <= self.received <= s.int_max and 0 <= self.reported_at_ms):
            raise ValueError("amounts and time must not be negative")
        _check_tx(self.tx_signature)
        if (self.verdict == "unpaid") != (self.received == 0) or bool(self.tx_signature) != (self.received > 0):
            raise ValueError("unpaid means nothing received and no transaction; otherwise both")

    def to_obj(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "cert_hash": self.cert_hash, "member": self.member,
                "submitter": self.submitter, "owed": self.owed, "received": self.received,
                "tx_signature": self.tx_signature, "verdict": self.verdict, "reported_at_ms": self.reported_at_ms}

    @classmethod
    def from_obj(cls, body: dict[str, Any]) -> MemberReceipt:
        s.exact_keys(body, {"job_id", "cert_hash", "member", "submitter", "owed", "received", "tx_signature",
                            "verdict", "reported_at_ms"})
        try:
            return cls(job_id=_job_id(body), cert_hash=s.get_bytes(body, "cert_hash", 32, len_min=32),
                       member=s.get_str(body, "member", peer_id_len_max, len_min=1),
                       submitter=s.get_str(body, "submitter", peer_id_len_max, len_min=1),
                       owed=s.get_int(body, "owed"), received=s.get_int(body, "received"),
                       tx_signature=s.get_str(body, "tx_signature", tx_signature_len_max),
                       verdict=s.get_str(body, "verdict", 16), reported_at_ms=s.get_int(body, "reported_at_ms"))
        except ValueError as exc:
            raise PeerMisbehaved(Reason.BAD_SCHEMA, str(exc)) from None


@dataclass(frozen=True, slots=True)
class SignedReceipt:
    receipt: Receipt
    envelope: Envelope

    @property
    def digest(self) -> bytes:
        return self.envelope.digest

    @property
    def wire(self) -> bytes:
        return self.envelope.to_bytes()


@dataclass(frozen=True, slots=True)
class SignedMemberReceipt:
    receipt: MemberReceipt
    envelope: Envelope

    @property
    def digest(self) -> bytes:
        return self.envelope.digest

    @property
    def wire(self) -> bytes:
        return self.envelope.to_bytes()


def sign_receipt(identity: Identity, receipt: Receipt) -> SignedReceipt:
    if receipt.submitter != identity.peer_id:
        raise ValueError("a receipt is signed by its submitter")
    try:
        check_payer_signature(receipt)
    except PeerMisbehaved as exc:
        raise ValueError(f"the payer's co-signature does not verify ({exc})") from None
    return SignedReceipt(receipt, seal(identity, Kind.RECEIPT, receipt.to_obj()))


def sign_member_receipt(identity: Identity, receipt: MemberReceipt) -> SignedMemberReceipt:
    if receipt.member != identity.peer_id:
        raise ValueError("a member receipt is signed by its member")
    return SignedMemberReceipt(receipt, seal(identity, Kind.MEMBER_RECEIPT, receipt.to_obj()))


def decode_receipt(data: bytes) -> SignedReceipt:
    """Bytes to a signed receipt whose signer is its submitter, or ``PeerMisbehaved``."""
    env = envelope_from_obj(decode(data, size_max=Kind.RECEIPT.bytes_max, canonical=True), expected=Kind.RECEIPT)
    r = Receipt.from_obj(body_of(env))
    if env.signer_peer_id != r.submitter:
        raise PeerMisbehaved(Reason.SIGNER_MISMATCH, "receipt not signed by its submitter")
    check_payer_signature(r)
    return SignedReceipt(r, env)


def decode_member_receipt(data: bytes) -> SignedMemberReceipt:
    """Bytes to a signed member receipt whose signer is its member, or ``PeerMisbehaved``."""
    env = envelope_from_obj(decode(data, size_max=Kind.MEMBER_RECEIPT.bytes_max, canonical=True),
                            expected=Kind.MEMBER_RECEIPT)
    r = MemberReceipt.from_obj(body_of(env))
    if env.signer_peer_id != r.member:
        raise PeerMisbehaved(Reason.SIGNER_MISMATCH, "member receipt not signed by its member")
    return SignedMemberReceipt(r, env)



# -- from settlement to a receipt ----------------------------------------------------------

#: A settlement line's status (``core._settlement``) to a receipt line's outcome
#: when nothing was paid on it.  A payable line that was not paid by the time
#: the receipt is signed says ``unpaid``.
STATUS_OUTCOMES = {"rejected": "proof_refused", "outside_quorum": "outside_quorum", "missing": "no_proof",
                   "no_quorum": "no_quorum", "owed": "unpaid", "no_payout_address": "unpaid"}
#: Settlement statuses whose amount is owed (``core._settlement.PAYABLE``).
PAYABLE_STATUSES = ("owed", "no_quorum")


@dataclass(frozen=True, kw_only=True, slots=True)
class SettledLine:
    """One member's line as the submitter's store has it after settlement:
    its status and amount (pay as you go: only the remainder the
    installments did not cover), the address it is paid at, the payout
    transaction's signature once the outbox paid that line ("" until then),
    and its installments: ``installments`` those paid, ``(tx_signature,
    amount)``, and ``installments_pending`` how many are still in the outbox."""

    peer_id: str
    status: str
    amount: int
    address: str
    proof_hash: bytes
    tx_signature: str = ""
    installments: tuple[tuple[str, int], ...] = ()
    installments_pending: int = 0

    @property
    def payable(self) -> bool:
        return self.amount > 0 and self.status in PAYABLE_STATUSES


def receipt_ready(lines: list[SettledLine], *, settled_at_ms: int, now_ms: int, wait_ms: int) -> bool:
    """Whether the submitter signs its receipt now: every payable line has its
    transaction, no installment is still in the outbox, and no member's proof
    is still missing (one may come late, and be owed, until the collection's
    deadline), or ``wait_ms`` passed since settlement (the receipt then says
    what is true then: ``unpaid``, ``no_proof``, which is what the member's
    own report will say)."""
    if now_ms - settled_at_ms >= wait_ms:
        return True
    return all(ln.tx_signature for ln in lines if ln.payable) and not any(ln.status == "missing" for ln in lines) \
        and not any(ln.installments_pending for ln in lines)


def line_payments(ln: SettledLine, cap: int = line_payments_max) -> tuple[int, tuple[tuple[str, int], ...]]:
    """What a member was paid in all, and the payments a receipt lists: its
    paid installments and its paid final line, one entry per transaction
    (a batch that paid two of its rows is one payment of their sum), the
    ``cap`` largest."""
    by_tx: dict[str, int] = {}
    for tx, amount in ln.installments:
        if tx and amount > 0:
            by_tx[tx] = by_tx.get(tx, 0) + amount
    if ln.payable and ln.tx_signature:
        by_tx[ln.tx_signature] = by_tx.get(ln.tx_signature, 0) + ln.amount
    pays = sorted(by_tx.items(), key=lambda p: (-p[1], p[0]))
    return sum(by_tx.values()), tuple(pays[:max(1, cap)])


def build_receipt(*, job_id: str, cert_hash: bytes, submitter: str, payer: str, currency: str,
                  settled_at_ms: int, lines: list[SettledLine]) -> Receipt | None:
    """The receipt for a settled job (``None`` when the submitter was its only
    member: nobody to speak of).  A line's ``amount`` is what the member was
    paid in all (installments and remainder), its ``payments`` the
    transactions (the largest, bounded per line and per receipt); its
    outcome is ``paid`` when its final line was paid, or needed nothing more
    (installments covered it) and something was paid."""
    kept = [ln for ln in sorted(lines, key=lambda x: x.peer_id) if ln.peer_id != submitter][:members_max]
    # our own part of our own job is no evidence about anyone
    paying = sum(1 for ln in kept if ln.installments or (ln.payable and ln.tx_signature))
    cap = payments_cap(paying)
    out: list[ReceiptLine] = []
    for ln in kept:
        total, pays = line_payments(ln, cap)
        address = ln.address if total > 0 and ln.address else ""
        if not address:
            total, pays = 0, ()
        final_done = ln.status in PAYABLE_STATUSES and (ln.amount == 0 or bool(ln.tx_signature))
        outcome = "paid" if final_done and pays else STATUS_OUTCOMES.get(ln.status, "unpaid")
        out.append(ReceiptLine(peer_id=ln.peer_id, outcome=outcome, amount=total, address=address, payments=pays,
                               proof_hash=ln.proof_hash if len(ln.proof_hash) == 32 else b""))
    if not out:
        return None
    return Receipt(job_id=job_id, cert_hash=cert_hash, submitter=submitter,
                   payer=payer if any(ln.payments for ln in out) else "", currency=currency,
                   settled_at_ms=settled_at_ms, lines=tuple(out))


def member_verdict(*, owed: int, received: int, due_ms: int, paid_at_ms: int | None) -> str:
    """What a member says of its submitter: ``unpaid`` (nothing came), ``late``
    (it came after ``due_ms``, or less than owed came) or ``on_time``."""
    if received <= 0 or paid_at_ms is None:
        return "unpaid"
    return "late" if paid_at_ms > due_ms or received < owed else "on_time"


@dataclass(frozen=True, kw_only=True, slots=True)
class Earning:
    """One row of a member's earnings for a job: an installment (an interval
    it claimed) or its final proof; ``on_ledger`` what the ledger showed the
    paying transaction gave its address (``None`` when the ledger could not
    be asked: the row's amount is believed), ``paid_at_ms`` when the payment
    notice came."""

    amount: int
    installment: bool
    tx_signature: str = ""
    on_ledger: int | None = None
    paid_at_ms: int | None = None
    created_ms: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class MemberAccount:
    owed: int
    received: int
    tx_signature: str
    verdict: str


def member_account(earnings: list[Earning], *, due_ms: int, now_ms: int) -> MemberAccount | None:
    """What a member reports of one job it worked on, or ``None`` when it is
    too early to say.  What it was owed is its final proof's earning (the
    whole part: installments are a part of it paid early), or the
    installments it claimed when it has no final proof; what it received is
    the sum of every payment of the job, installments included, each
    transaction counted once (a batch may pay two rows).  It reports once
    the final proof is in and everything owed came, or at ``due_ms``
    (``unpaid`` when nothing came, ``late`` when less than owed or after
    ``due_ms``); ``tx_signature`` cites the largest payment."""
    final = [e for e in earnings if not e.installment]
    inst = [e for e in earnings if e.installment]
    owed = sum(e.amount for e in final) if final else sum(e.amount for e in inst)
    rows: dict[str, int] = {}
    ledger: dict[str, int] = {}
    last_paid: int | None = None
    for e in earnings:
        if e.tx_signature and e.paid_at_ms is not None:
            rows[e.tx_signature] = rows.get(e.tx_signature, 0) + e.amount
            if e.on_ledger is not None:
                ledger[e.tx_signature] = e.on_ledger
            last_paid = e.paid_at_ms if last_paid is None else max(last_paid, e.paid_at_ms)
    # The ledger shows one transfer per address and transaction: rows paid by
    # one batch share it (counted once, at most what it moved).
    by_tx = {tx: min(n, ledger.get(tx, n)) for tx, n in rows.items()}
    received = sum(by_tx.values())
    if not (final and received >= owed) and now_ms < due_ms:
        return None
    tx = min(((t, n) for t, n in by_tx.items() if n > 0), key=lambda p: (-p[1], p[0]))[0] if received > 0 else ""
    return MemberAccount(owed=owed, received=received, tx_signature=tx,
                         verdict=member_verdict(owed=owed, received=received, due_ms=due_ms, paid_at_ms=last_paid))


# -- what travels: the receipt and its certificate -------------------------------------------

#: A published receipt: the receipt (32 KiB) and the certificate (64 KiB) it names.
published_bytes_max = Kind.RECEIPT.bytes_max + Kind.CERTIFICATE.bytes_max + 1024


def receipts_key(peer_id: str) -> str:
    """DHT key of the newest published receipt naming a peer (49 bytes: keys
    over 50 bytes that are not multihashes are refused by py-libp2p)."""
    return "/p2pgpu/receipts/" + hashlib.sha256(peer_id.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class PublishedReceipt:
    """A signed receipt with the certificate it names (checked against it)."""

    signed: SignedReceipt
    certificate: Certificate
    wire: bytes

    @property
    def receipt(self) -> Receipt:
        return self.signed.receipt

    @property
    def digest(self) -> bytes:
        return self.signed.digest

    @property
    def addresses(self) -> dict[str, str]:
        """Each member's payout address as it signed it in its accept."""
        return {a.peer_id: a.payout_address for a in self.certificate.accepts}

    def names(self, peer_id: str) -> bool:
        return peer_id == self.receipt.submitter or any(ln.peer_id == peer_id for ln in self.receipt.lines)


def publish_wire(signed: SignedReceipt, certificate: Certificate) -> bytes:
    data = encode({"receipt": signed.wire, "certificate": encode(certificate.to_obj())})
    if len(data) > published_bytes_max:
        raise ValueError(f"published receipt of {len(data)} bytes > {published_bytes_max}")
    return data


def decode_published(data: bytes, verify: Verifier | None = None) -> PublishedReceipt:
    """Bytes from a stranger to a :class:`PublishedReceipt`, or ``PeerMisbehaved``:
    size first, canonical bytes, the receipt signed by its submitter, the
    certificate's every signature, and the two agreeing (the certificate's
    hash and job are the receipt's, and the receipt has one line per member
    other than the submitter)."""
    obj = decode(data, size_max=published_bytes_max, canonical=True)
    if not isinstance(obj, dict) or sorted(obj) != ["certificate", "receipt"] \
            or not isinstance(obj["receipt"], bytes) or not isinstance(obj["certificate"], bytes):
        raise PeerMisbehaved(Reason.BAD_SCHEMA, "a published receipt is {receipt: bytes, certificate: bytes}")
    env = envelope_from_obj(decode(obj["receipt"], size_max=Kind.RECEIPT.bytes_max, canonical=True),
                            expected=Kind.RECEIPT, verify=verify)
    r = Receipt.from_obj(body_of(env))
    if env.signer_peer_id != r.submitter:
        raise PeerMisbehaved(Reason.SIGNER_MISMATCH, "receipt not signed by its submitter")
    cert = Certificate.from_obj(decode(obj["certificate"], size_max=Kind.CERTIFICATE.bytes_max, canonical=True),
                                verify)
    if cert.digest != r.cert_hash or cert.job_id != r.job_id:
        raise PeerMisbehaved(Reason.BAD_PROOF, "the certificate is not the one the receipt names")
    if [ln.peer_id for ln in r.lines] != sorted(m for m in cert.members if m != r.submitter):
        raise PeerMisbehaved(Reason.BAD_PROOF, "the receipt's lines are not the certificate's members")
    return PublishedReceipt(SignedReceipt(r, env), cert, bytes(data))
