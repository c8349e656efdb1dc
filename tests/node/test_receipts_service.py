"""The receipts service's sweeps on a real store (node/_receipts.py):

- the submitter's due receipt waits for its payouts, then is signed with
  ``unpaid`` for what never went out, kept, queued for publication and no
  longer due; one whose lines owe nothing is signed at once;
- a member reports an earning still unpaid after ``member_due_ms``, once.

The node is a stub with only the ports the service reads; the store, the
cores and the signatures are real.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import trio
from solders.keypair import Keypair

from p2pgpu.core import Identity, encode
from p2pgpu.core._formation_messages import Accept, Certificate, Proposal
from p2pgpu.node._receipts import ReceiptService, ReceiptSettings, decode_item
from p2pgpu.store import (
    add_receipt_due,
    open_db,
    receipt_rows,
    receipts_due,
    record_earning,
    record_owed,
    save_collection,
)

ME = Identity(bytes([30]) * 32)
A, B = Identity(bytes([31]) * 32), Identity(bytes([32]) * 32)
ADDRESS = "11111111111111111111111111111112"
#: The node's payer keypair: the manifests here name it, so receipts are co-signed (#16.2).
PAYER = Keypair.from_seed(bytes([33]) * 32)
T0 = 1_700_000_000_000
JOB = hashlib.sha256(b"job").hexdigest()
SETTINGS = ReceiptSettings(sign_wait_ms=60_000, member_due_ms=600_000)


class Clock:
    def __init__(self) -> None:
        self.ms = T0

    def __call__(self) -> int:
        return self.ms


def cert() -> Certificate:
    prop = Proposal.sign(A, job_id=JOB, view=0, round=0, members=(A.peer_id, B.peer_id), gpus_per_member=1)
    return Certificate(proposal=prop, accepts=tuple(
        Accept.sign(m, proposal=prop, lease_until_ms=2**40, price_per_gpu_hour=1, payout_address=ADDRESS)
        for m in (A, B)))


def service(tmp_path: Path, identity: Identity, submitter: str, proofs: list[dict[str, Any]],
            interval_s: int = 0) -> tuple[Any, Clock]:
    db = open_db(tmp_path / "state.db")
    c = cert()
    rec = SimpleNamespace(job_id=JOB, certificate=c.digest.hex(), extra={"proofs": proofs},
                          manifest=SimpleNamespace(manifest=SimpleNamespace(
                              payer=str(PAYER.pubkey()), submitter=submitter, interval_s=interval_s, duration_s_max=3600)))
    clock = Clock()
    records = {JOB: rec}
    node = SimpleNamespace(identity=identity, jobs=SimpleNamespace(db=db, records=records, record=records.get),
                           counts=Counter(), wallet=SimpleNamespace(payer=PAYER),
                           now_ms=clock, stack=None, home=None, ledger_spec="embedded")
    save_collection(db, job_id=JOB, certificate=encode(c.to_obj()), members=[A.peer_id, B.peer_id],
                    payout_addresses={}, confirmed_at_ms=T0, deadline_ms=T0)
    return ReceiptService(node, SETTINGS), clock  # type: ignore[arg-type]


def proof(peer: Identity, status: str, amount: int) -> dict[str, Any]:
    return {"worker": peer.peer_id, "status": status, "amount": amount, "payout_address": ADDRESS,
            "proof_hash": hashlib.sha256(peer.peer_id.encode()).hexdigest()}


def test_a_due_receipt_waits_for_payouts_then_says_unpaid(tmp_path: Path) -> None:
    svc, clock = service(tmp_path, ME, ME.peer_id, [proof(A, "owed", 500), proof(B, "rejected", 0)])
    add_receipt_due(svc.db, job_id=JOB, settled_at_ms=T0, currency="SOL", now_ms=T0)
    assert svc.sign_due() == 0 and receipts_due(svc.db)  # its payout has not gone out yet
    clock.ms = T0 + SETTINGS.sign_wait_ms
    assert svc.sign_due() == 1 and receipts_due(svc.db) == []
    (row,) = receipt_rows(svc.db)
    assert row["kind"] == "receipt" and row["ours"] and row["signer"] == ME.peer_id
    r = decode_item(row["wire"]).receipt  # type: ignore[union-attr]
    assert {ln.peer_id: ln.outcome for ln in r.lines} == {A.peer_id: "unpaid", B.peer_id: "proof_refused"}
    assert svc._pub_recv.receive_nowait() == (row["wire"], [A.peer_id, B.peer_id])  # queued for gossip and DHT
    assert svc.sign_due() == 0  # signed once


def test_a_receipt_that_owes_nothing_is_signed_at_once(tmp_path: Path) -> None:
    svc, _clock = service(tmp_path, ME, ME.peer_id, [proof(A, "outside_quorum", 0), proof(B, "rejected", 0)])
    add_receipt_due(svc.db, job_id=JOB, settled_at_ms=T0, currency="SOL", now_ms=T0)
    assert svc.sign_due() == 1


def test_a_member_reports_an_unpaid_earning_once(tmp_path: Path) -> None:
    svc, clock = service(tmp_path, A, ME.peer_id, [])
    record_earning(svc.db, b"e" * 32, job_id=JOB, amount=700, currency="SOL", payout_address=ADDRESS, created_ms=T0)
    clock.ms = T0 + SETTINGS.member_due_ms - 1
    assert trio.run(svc.report_due) == 0
    clock.ms = T0 + SETTINGS.member_due_ms
    assert trio.run(svc.report_due) == 1
    assert trio.run(svc.report_due) == 0
    (row,) = receipt_rows(svc.db)
    m = decode_item(row["wire"]).receipt
    assert (m.member, m.submitter, m.owed, m.received, m.verdict) == (A.peer_id, ME.peer_id, 700, 0, "unpaid")


def test_a_job_settled_just_before_a_crash_still_gets_its_receipt(tmp_path: Path) -> None:
    """The settlement's transaction committed, the note that its receipt is
    due did not (kill -9 in between): after the restart it is due again."""
    from p2pgpu.store import mark_collection_settled, transaction

    svc, clock = service(tmp_path, ME, ME.peer_id, [proof(A, "outside_quorum", 0), proof(B, "rejected", 0)])
    svc.node.jobs.records[JOB].manifest.manifest.currency = "SOL"
    with transaction(svc.db):
        mark_collection_settled(svc.db, JOB, now_ms=T0)
    clock.ms = T0 + 1000
    assert svc.recover_due() == 1
    assert svc.recover_due() == 0  # noted once
    assert svc.sign_due() == 1
    assert svc.recover_due() == 0  # signed: never again


def _pay(db: Any, rows: list[tuple[bytes, Identity, int]], sig: str, now_ms: int) -> None:
    """Owe ``rows`` (outbox key, worker, amount) and pay them in one batch ``sig``."""
    from p2pgpu.core._payout import plan_batches
    from p2pgpu.store import mark_paid, owed_rows, record_signed, transaction

    with transaction(db):
        for key, who, amount in rows:
            record_owed(db, key, who.peer_id, ADDRESS, amount, "SOL", JOB, created_ms=now_ms)
    plan = plan_batches(owed_rows(db), balances={}, rent_exempt_min_lamports=0, transfers_max=19).batches[0]
    with transaction(db):
        b = record_signed(db, plan, signature=sig, blockhash="bh", last_valid_height=150, tx=b"raw", now_ms=now_ms)
        mark_paid(db, b, slot=1, fee=5000, now_ms=now_ms)


SIG1, SIG2, SIG3 = "2" * 87, "3" * 87, "4" * 87


def test_a_member_paid_by_installments_is_paid_in_the_receipt(tmp_path: Path) -> None:
    """Pay as you go: A was paid two installments (one batch each) and no
    remainder (its final line owes 0), B two installments in one batch and a
    remainder.  The receipt's lines are ``paid`` with every payment cited and
    the totals right; it waits for installments still in the outbox."""
    from p2pgpu.core._installments import installment_key
    from p2pgpu.store import transaction

    fin_a, fin_b = proof(A, "owed", 0), proof(B, "owed", 50)
    svc, _clock = service(tmp_path, ME, ME.peer_id, [fin_a, fin_b], interval_s=60)
    _pay(svc.db, [(installment_key(JOB, A.peer_id, 1), A, 300), (installment_key(JOB, B.peer_id, 1), B, 300)],
         SIG1, T0)
    _pay(svc.db, [(installment_key(JOB, A.peer_id, 2), A, 200)], SIG2, T0)
    with transaction(svc.db):  # B's second installment: still owed
        record_owed(svc.db, installment_key(JOB, B.peer_id, 2), B.peer_id, ADDRESS, 200, "SOL", JOB, created_ms=T0)
    add_receipt_due(svc.db, job_id=JOB, settled_at_ms=T0, currency="SOL", now_ms=T0)
    assert svc.sign_due() == 0  # an installment still in the outbox, B's remainder unpaid
    from p2pgpu.core._payout import plan_batches
    from p2pgpu.store import mark_paid, owed_rows, record_signed

    with transaction(svc.db):
        record_owed(svc.db, bytes.fromhex(fin_b["proof_hash"]), B.peer_id, ADDRESS, 50, "SOL", JOB, created_ms=T0)
    plan = plan_batches(owed_rows(svc.db), balances={}, rent_exempt_min_lamports=0, transfers_max=19).batches[0]
    with transaction(svc.db):
        b = record_signed(svc.db, plan, signature=SIG3, blockhash="bh", last_valid_height=150, tx=b"raw", now_ms=T0)
        mark_paid(svc.db, b, slot=1, fee=5000, now_ms=T0)
    assert svc.sign_due() == 1
    (row,) = receipt_rows(svc.db)
    r = decode_item(row["wire"]).receipt  # type: ignore[union-attr]
    got = {ln.peer_id: (ln.outcome, ln.amount, ln.payments) for ln in r.lines}
    assert got == {A.peer_id: ("paid", 500, ((SIG1, 300), (SIG2, 200))),
                   B.peer_id: ("paid", 550, ((SIG1, 300), (SIG3, 250)))}, got
    assert r.payer == str(PAYER.pubkey())
    assert r.cosigned and svc.counts["receipts:not_cosigned"] == 0  # its payments count (#16.2)


def test_a_member_paid_by_installments_reports_on_time_with_the_total(tmp_path: Path) -> None:
    """The member's side: installments paid 500 of a part whose final proof
    expects 500; no final payment ever comes (nothing remained).  It reports
    at once ``on_time``, received 500 (not ``unpaid`` 10 minutes later)."""
    from p2pgpu.core._installments import installment_key
    from p2pgpu.store import mark_earning_paid, transaction

    svc, clock = service(tmp_path, A, ME.peer_id, [], interval_s=60)
    with transaction(svc.db):
        for k, amount, sig in ((1, 300, SIG1), (2, 200, SIG2)):
            key = installment_key(JOB, A.peer_id, k)
            record_earning(svc.db, key, job_id=JOB, amount=amount, currency="SOL", payout_address=ADDRESS,
                           created_ms=T0)
            mark_earning_paid(svc.db, key, tx_signature=sig, now_ms=T0 + 10)
    clock.ms = T0 + 1000
    assert trio.run(svc.report_due) == 0  # installments only: the part has not ended
    record_earning(svc.db, b"f" * 32, job_id=JOB, amount=500, currency="SOL", payout_address=ADDRESS,
                   created_ms=T0 + 2000)
    clock.ms = T0 + 3000
    assert trio.run(svc.report_due) == 1
    (row,) = receipt_rows(svc.db)
    m = decode_item(row["wire"]).receipt
    assert (m.owed, m.received, m.verdict, m.tx_signature) == (500, 500, "on_time", SIG1)
