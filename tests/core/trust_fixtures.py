"""Shared fixtures of the receipt and reputation tests: identities, Solana
addresses and transaction signatures, and builders of valid receipts.

Every address here is a real Ed25519 key (``key_of`` holds its private
half), so a receipt's payer can co-sign it (#16.2): :func:`receipt` does so
by default, as a submitter's node does with its payer keypair."""

from __future__ import annotations

import hashlib
import random

import base58

from p2pgpu.core import Identity
from p2pgpu.core._receipt import MemberReceipt, Receipt, ReceiptLine, cosign

T0 = 1_700_000_000_000
IDS = [Identity.from_rng(random.Random(1000 + i)) for i in range(8)]
SUBMITTER, ALICE, BOB, CAROL, DAVE, MALLORY = IDS[:6]


_KEYS: dict[str, Identity] = {}


def address(name: str) -> str:
    """A Solana address (an Ed25519 public key, base58) named ``name``."""
    key = Identity(hashlib.sha256(b"addr" + name.encode()).digest())
    addr = base58.b58encode(key.public_key).decode()
    _KEYS[addr] = key
    return addr


def key_of(addr: str) -> Identity:
    """The private key of an address made by :func:`address`."""
    return _KEYS[addr]


def tx(name: str) -> str:
    return base58.b58encode(hashlib.sha512(b"tx" + name.encode()).digest()).decode()


def job_id(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def line(peer: Identity, outcome: str = "paid", amount: int = 1_000_000, txname: str = "t") -> ReceiptLine:
    paid = outcome == "paid"
    return ReceiptLine(peer_id=peer.peer_id, outcome=outcome, amount=amount if paid else 0,
                       address=address(peer.peer_id) if paid else "", payments=((tx(txname), amount),) if paid else (),
                       proof_hash=hashlib.sha256(peer.peer_id.encode()).digest())


def receipt(job: str, lines: list[ReceiptLine], *, submitter: Identity = SUBMITTER, at: int = T0,
            payer: str | None = None, cosigned: bool = True) -> Receipt:
    """A receipt, co-signed by its payer's key unless ``cosigned`` is false
    (a forger that does not hold the payer's key)."""
    r = Receipt(job_id=job_id(job), cert_hash=hashlib.sha256(b"cert" + job.encode()).digest(),
                submitter=submitter.peer_id, payer=payer or address("payer:" + submitter.peer_id),
                currency="SOL", settled_at_ms=at, lines=tuple(sorted(lines, key=lambda ln: ln.peer_id)))
    return cosign(r, key_of(r.payer).sign) if cosigned else r


def recosign(r: Receipt) -> Receipt:
    """``r`` co-signed again by its payer (after a test changed it)."""
    return cosign(r, key_of(r.payer).sign)


def member_receipt(job: str, member: Identity, verdict: str = "on_time", *, submitter: Identity = SUBMITTER,
                   owed: int = 1_000_000, at: int = T0) -> MemberReceipt:
    received = 0 if verdict == "unpaid" else owed
    return MemberReceipt(job_id=job_id(job), cert_hash=hashlib.sha256(b"cert" + job.encode()).digest(),
                         member=member.peer_id, submitter=submitter.peer_id, owed=owed, received=received,
                         tx_signature=tx(job) if received else "", verdict=verdict, reported_at_ms=at)
