"""Payment notices: the submitter's "paid" sent until the member acknowledges it, and the member's check of it.

A member paid as it goes (``core/_installments.py``) stops working when an
interval's payment is overdue beyond its grace, and learns of a payment from
the submitter's signed notice (``Kind.RESULT``, ``type = "paid"``: job,
proof hash or installment key, transaction signature).  Two things went
wrong with a notice sent once and believed (#16.3):

- **A lost notice** made an honest member stop after the grace although it
  was paid.  :class:`PaidNotices` (the submitter's side) keeps each notice
  until the member acknowledges it (``type = "paid_ack"``, signed by that
  member) and resends it with a doubling pause (``resend_ms_min`` to
  ``resend_ms_max``), at most ``attempts_max`` times, at most
  ``pending_max`` notices at once (beyond that a notice is sent once, and
  counted).
- **A forged notice** (a submitter that says it paid and did not, cites a
  transaction that paid someone else, or less, or cites one transaction for
  two intervals) kept the member working for nothing.  When the member's
  driver can reach a ledger, the host asks it to look the transaction up
  (``CheckPayment``) before the interval counts as paid, and
  :func:`payment_fault` decides from what the ledger showed: the
  transaction landed, was paid by the manifest's payer, and moved to the
  member's own payout address (the one in its accept) at least the
  interval's amount beyond what earlier intervals already took from that
  transaction.  A refused notice is not acknowledged (an honest submitter's
  notice of a transaction the ledger did not show yet is resent and checked
  again).  With no ledger to ask, the notice is believed, as before.

Pure: bytes, ids and ``now_ms`` in, actions out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._actions import Action, CancelTimer, Emit, Send, SetTimer, TimerKey, TimerOwner
from ._envelope import Kind, seal
from ._identity import Identity
from ._reputation import VerifiedPayment


@dataclass(frozen=True, kw_only=True, slots=True)
class NoticeConfig:
    """How the submitter resends a payment notice until it is acknowledged."""

    resend_ms_min: int = 2_000
    resend_ms_max: int = 30_000
    #: Sends of one notice at most (the first included): 2+4+8+16+30+30+30 s
    #: of resends cover a member's default grace (30 s) several times over.
    attempts_max: int = 8
    #: Notices waiting for an acknowledgement at once.
    pending_max: int = 4_096


DEFAULT_NOTICES = NoticeConfig()


def notice_timer(job_id: str) -> TimerKey:
    return TimerKey(TimerOwner.NOTICE, job_id, "resend")


def paid_wire(identity: Identity, *, job_id: str, proof_hash: bytes, tx_signature: str,
              inclusion_proof: str | None = None) -> bytes:
    """The submitter's signed payment notice."""
    body: dict[str, Any] = {"type": "paid", "job_id": job_id, "proof_hash": proof_hash,
                            "tx_signature": tx_signature}
    if inclusion_proof:
        body["inclusion_proof"] = inclusion_proof
    return seal(identity, Kind.RESULT, body).to_bytes()


def paid_ack_wire(identity: Identity, *, job_id: str, proof_hash: bytes) -> bytes:
    """The member's signed acknowledgement of a payment notice."""
    return seal(identity, Kind.RESULT, {"type": "paid_ack", "job_id": job_id, "proof_hash": proof_hash}).to_bytes()


@dataclass(slots=True)
class _Pending:
    worker: str
    wire: bytes
    attempts: int = 0
    next_ms: int = 0


@dataclass
class PaidNotices:
    """The submitter's payment notices waiting for their members' acknowledgements."""

    config: NoticeConfig = DEFAULT_NOTICES
    #: job id -> proof hash -> the notice.
    by_job: dict[str, dict[bytes, _Pending]] = field(default_factory=dict)
    count: int = 0

    def __len__(self) -> int:
        return self.count

    def send(self, job_id: str, worker: str, proof_hash: bytes, wire: bytes, now_ms: int) -> list[Action]:
        """Send a notice now, and again until ``worker`` acknowledges it."""
        mine = self.by_job.get(job_id, {})
        if proof_hash in mine:
            return []  # already on its way (a second notice of the same payment)
        if self.count >= self.config.pending_max:
            return [Emit("notices:not_tracked"), Send(worker, wire)]
        p = _Pending(worker=worker, wire=wire)
        self.by_job.setdefault(job_id, {})[proof_hash] = p
        self.count += 1
        return self._send(p, now_ms) + self._schedule(job_id)

    def on_ack(self, job_id: str, proof_hash: bytes, signer: str) -> list[Action]:
        """A member acknowledged a notice (only the member it was sent to can)."""
        mine = self.by_job.get(job_id, {})
        p = mine.get(proof_hash)
        if p is None or p.worker != signer:
            return [Emit("notices:ack_unknown")]
        self._drop(job_id, proof_hash)
        return [Emit("notices:acked"), *self._schedule(job_id)]

    def on_timer(self, key: TimerKey, now_ms: int) -> list[Action]:
        out: list[Action] = []
        for h, p in list(self.by_job.get(key.job_id, {}).items()):
            if p.next_ms > now_ms:
                continue
            if p.attempts >= self.config.attempts_max:
                self._drop(key.job_id, h)
                out.append(Emit("notices:given_up"))
            else:
                out += [Emit("notices:resent"), *self._send(p, now_ms)]
        return out + self._schedule(key.job_id)

    def _send(self, p: _Pending, now_ms: int) -> list[Action]:
        p.attempts += 1
        pause = min(self.config.resend_ms_max, self.config.resend_ms_min << min(p.attempts - 1, 16))
        p.next_ms = now_ms + pause
        return [Send(p.worker, p.wire)]

    def _drop(self, job_id: str, proof_hash: bytes) -> None:
        mine = self.by_job.get(job_id, {})
        if mine.pop(proof_hash, None) is not None:
            self.count -= 1
        if not mine:
            self.by_job.pop(job_id, None)

    def _schedule(self, job_id: str) -> list[Action]:
        mine = self.by_job.get(job_id)
        if not mine:
            return [CancelTimer(notice_timer(job_id))]
        return [SetTimer(notice_timer(job_id), min(p.next_ms for p in mine.values()))]


def payment_fault(payment: VerifiedPayment | None, *, payer: str, address: str, amount: int,
                  credited: int = 0) -> str | None:
    """Why the ledger does not show the payment a notice claims (``None``: it
    does).  ``payment``: the cited transaction as the ledger showed it (``None``:
    not found, or it failed); ``credited``: what earlier intervals already took
    from the same transaction to ``address``."""
    if payment is None:
        return "the ledger shows no such transaction (or it failed)"
    if payer and payment.payer != payer:
        return f"the transaction was paid by {payment.payer[:12]}, not the job's payer"
    moved = payment.transfers.get(address, 0)
    if moved - credited < amount:
        return (f"the transaction moved {moved} to our address, {credited} of it already counted: "
                f"less than the {amount} owed")
    return None
