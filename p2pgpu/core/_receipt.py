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
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from . import _limits as limits
from . import _schema as s
from ._advert import is_solana_address
from ._codec import decode, encode
from ._envelope import Envelope, Kind, body_of, envelope_from_obj, seal
from ._errors import PeerMisbehaved, Reason
from ._formation_messages import Certificate
from ._identity import Identity, Verifier
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


@dataclass(frozen=True, kw_only=True, slots=True)
class ReceiptLine:
    peer_id: str
    outcome: str
    amount: int
    address: str
    tx_signature: str
    proof_hash: bytes

    def __post_init__(self) -> None:
        if not 0 < len(self.peer_id) <= peer_id_len_max or self.outcome not in LINE_OUTCOMES:
            raise ValueError(f"peer_id, and outcome one of {', '.join(LINE_OUTCOMES)}")
        if not 0 <= self.amount <= s.int_max or len(self.proof_hash) not in (0, 32):
            raise ValueError("amount in [0, 2^63) and proof_hash empty or 32 bytes")
        _check_tx(self.tx_signature)
        _check_address(self.address, "address")
        paid = self.outcome == "paid"
        if paid != (self.amount > 0) or paid != bool(self.tx_signature) or paid != bool(self.address):
            raise ValueError("a paid line has an amount, an address and a transaction; others have none")

    def to_obj(self) -> list[Any]:
        return [self.peer_id, self.outcome, self.amount, self.address, self.tx_signature, self.proof_hash]

    @classmethod
    def from_obj(cls, row: Any, where: str) -> ReceiptLine:
        if not (isinstance(row, list) and len(row) == 6):
            raise s.fail(where, "must be [peer_id, outcome, amount, address, tx_signature, proof_hash]")
        body = dict(zip(("peer_id", "outcome", "amount", "address", "tx_signature", "proof_hash"), row))
        try:
            return cls(peer_id=s.get_str(body, "peer_id", peer_id_len_max, len_min=1),
                       outcome=s.get_str(body, "outcome", 16), amount=s.get_int(body, "amount"),
                       address=s.get_str(body, "address", 44), tx_signature=s.get_str(body, "tx_signature",
                                                                                       tx_signature_len_max),
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
        if any(ln.outcome == "paid" for ln in self.lines) and not self.payer:
            raise ValueError("a receipt with paid lines names its payer")

    @property
    def paid_total(self) -> int:
        return sum(ln.amount for ln in self.lines)

    def to_obj(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "cert_hash": self.cert_hash, "submitter": self.submitter,
                "payer": self.payer, "currency": self.currency, "settled_at_ms": self.settled_at_ms,
                "lines": [ln.to_obj() for ln in self.lines]}

    @classmethod
    def from_obj(cls, body: dict[str, Any]) -> Receipt:
        s.exact_keys(body, {"job_id", "cert_hash", "submitter", "payer", "currency", "settled_at_ms", "lines"})
        lines = tuple(ReceiptLine.from_obj(row, f"lines[{i}]")
                      for i, row in enumerate(s.get_list(body, "lines", members_max, len_min=1)))
        try:
            return cls(job_id=_job_id(body), cert_hash=s.get_bytes(body, "cert_hash", 32, len_min=32),
                       submitter=s.get_str(body, "submitter", peer_id_len_max, len_min=1),
                       payer=s.get_str(body, "payer", 44), currency=s.get_str(body, "currency", currency_len_max,
                                                                                len_min=1),
                       settled_at_ms=s.get_int(body, "settled_at_ms"), lines=lines)
        except ValueError as exc:
            raise PeerMisbehaved(Reason.BAD_SCHEMA, str(exc)) from None


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
    its status and amount, the address it is paid at, and the payout
    transaction's signature once the outbox paid it ("" until then)."""

    peer_id: str
    status: str
    amount: int
    address: str
    proof_hash: bytes
    tx_signature: str = ""

    @property
    def payable(self) -> bool:
        return self.amount > 0 and self.status in PAYABLE_STATUSES


def receipt_ready(lines: list[SettledLine], *, settled_at_ms: int, now_ms: int, wait_ms: int) -> bool:
    """Whether the submitter signs its receipt now: every payable line has its
    transaction and no member's proof is still missing (one may come late,
    and be owed, until the collection's deadline), or ``wait_ms`` passed since
    settlement (the receipt then says what is true then: ``unpaid``,
    ``no_proof``, which is what the member's own report will say)."""
    if now_ms - settled_at_ms >= wait_ms:
        return True
    return all(ln.tx_signature for ln in lines if ln.payable) and not any(ln.status == "missing" for ln in lines)


def build_receipt(*, job_id: str, cert_hash: bytes, submitter: str, payer: str, currency: str,
                  settled_at_ms: int, lines: list[SettledLine]) -> Receipt | None:
    """The receipt for a settled job (``None`` when the submitter was its only
    member: nobody to speak of).  A line is ``paid`` only with its transaction."""
    out: list[ReceiptLine] = []
    for ln in sorted(lines, key=lambda x: x.peer_id):
        if ln.peer_id == submitter:
            continue  # our own part of our own job: no evidence about anyone
        paid = ln.payable and bool(ln.tx_signature) and bool(ln.address)
        out.append(ReceiptLine(peer_id=ln.peer_id, outcome="paid" if paid else STATUS_OUTCOMES.get(ln.status, "unpaid"),
                               amount=ln.amount if paid else 0, address=ln.address if paid else "",
                               tx_signature=ln.tx_signature if paid else "",
                               proof_hash=ln.proof_hash if len(ln.proof_hash) == 32 else b""))
    if not out:
        return None
    paid_any = any(ln.outcome == "paid" for ln in out)
    return Receipt(job_id=job_id, cert_hash=cert_hash, submitter=submitter, payer=payer if paid_any else "",
                   currency=currency, settled_at_ms=settled_at_ms, lines=tuple(out[:members_max]))


def member_verdict(*, owed: int, received: int, due_ms: int, paid_at_ms: int | None) -> str:
    """What a member says of its submitter: ``unpaid`` (nothing came), ``late``
    (it came after ``due_ms``, or less than owed came) or ``on_time``."""
    if received <= 0 or paid_at_ms is None:
        return "unpaid"
    return "late" if paid_at_ms > due_ms or received < owed else "on_time"


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
