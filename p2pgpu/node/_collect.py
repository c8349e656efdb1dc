"""The submitter's settlement, stored: what the settlement core says to keep, kept.

Every rule about collecting a job's proofs, co-signatures, outputs and logs,
acknowledging them, settling and what is owed lives in the settlement core
(``core/_settlement.py``, driven through the core host).  This module only
persists what its actions ask, each in the transaction the action stands
for (``docs/state.md``, "Results across restarts"):

- ``CollectionOpened``: the collection (certificate, members, payout
  addresses, deadline), before any CONFIRM leaves;
- ``ItemTaken``: a member's signed proof, co-signature or outputs list,
  before the acknowledgement that follows it goes out;
- ``LogsTaken``: a log batch, as received (``job logs`` answers after a
  restart), and its lines for ``job logs`` now;
- ``Settled``: every line's verdict, what it owes, the job's record and the
  collection's "settled" flag, in ONE transaction, then the payer is woken;
- ``LateLine``: a proof that came after settlement but in time, and what it owes;
- ``InstallmentsOwed``: intervals owed by pay as you go (``core/_installments.py``),
  each with its payout row under its (job, member, interval) key, in one
  transaction, before the claim's acknowledgement goes out; a claim is an
  ``ItemTaken`` of kind ``claim`` (replayed after a restart);
- ``LookupCollection``: a member's resend for a job no longer open in memory
  is answered from the store.

After a restart :meth:`Collector.reopen` hands every unsettled collection
back to the core (``Settlement.restore``) with its items in the order they
came.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from p2pgpu.core import Kind, PeerMisbehaved, encode
from p2pgpu.core._actions import (
    Action,
    CollectionOpened,
    InstallmentsOwed,
    ItemTaken,
    LateLine,
    LogsTaken,
    LookupCollection,
    MemberLine,
    Settled,
)
from p2pgpu.core._codec import decode
from p2pgpu.core._formation_messages import Certificate
from p2pgpu.core._settlement import DEFAULT_SETTLEMENT, ProofAck, ack_wire, item_hash, settle_key

from ._kept_logs import KeptLogs

if TYPE_CHECKING:
    from p2pgpu.core._settlement import Collection

    from ._jobs import JobsService

__all__ = ["Collector", "ProofAck", "ack_wire", "item_hash", "reopen_grace_ms", "settle_key"]

log = logging.getLogger("p2pgpu.collect")

#: After a restart, how long an unsettled collection waits at least for the
#: members' resends (the settlement core's setting, named here for the docs).
reopen_grace_ms = DEFAULT_SETTLEMENT.reopen_grace_ms
#: Jobs whose collected log lines stay in memory for ``job logs``, and the
#: bytes of those lines in all (older ones are read back from the store).
log_jobs_kept_max = 64
log_bytes_kept_max = 32 << 20


class Collector:
    """Persistence of the submitter's settlement (see the module doc)."""

    def __init__(self, jobs: JobsService) -> None:
        self.jobs = jobs
        #: job -> its collected log lines (the most recent jobs only).
        self.logs = KeptLogs(jobs_max=log_jobs_kept_max, bytes_max=log_bytes_kept_max)

    @property
    def collections(self) -> dict[str, Collection]:
        """The collections the settlement core holds now (open, or settled and
        waiting for late proofs until their deadline)."""
        return self.jobs.host.settlement.collections

    @property
    def _db(self) -> Any:
        return self.jobs.db

    # -- the actions ------------------------------------------------------------------

    def opened(self, a: CollectionOpened) -> None:
        if self._db is None:
            return
        from p2pgpu.store import save_collection

        save_collection(self._db, job_id=a.job_id, certificate=encode(a.certificate.to_obj()),
                        members=list(a.certificate.members), payout_addresses=a.payout_addresses,
                        confirmed_at_ms=a.confirmed_at_ms, deadline_ms=a.deadline_ms)

    def item(self, a: ItemTaken) -> None:
        if self._db is None:
            return
        from p2pgpu.store import add_collection_item

        add_collection_item(self._db, job_id=a.job_id, item_hash=a.item_hash, kind=a.kind, sender=a.sender,
                            wire=a.wire, now_ms=a.received_ms)

    def logs_taken(self, a: LogsTaken, *, store: bool = True) -> None:
        self.logs.add(a.job_id, [{"t_ms": t, "stream": stream, "line": text, "member": a.member,
                                  "member_index": a.member_index} for t, stream, text in a.lines])
        if store and a.wire and self._db is not None:
            from p2pgpu.store import add_log_batch

            add_log_batch(self._db, job_id=a.job_id, member=a.member, seq=a.seq, lines=len(a.lines), wire=a.wire,
                          now_ms=self.jobs.node.now_ms())

    def lookup(self, a: LookupCollection) -> list[Action]:
        """Answer a resend for a job not open in memory from the store."""
        members, stored = None, False
        if self._db is not None:
            from p2pgpu.store import collection_row, has_collection_item

            row = collection_row(self._db, a.job_id)
            if row is not None:
                members = list(row["members"])
                stored = has_collection_item(self._db, a.job_id, a.item_hash)
        return self.jobs.host.on_stored(a.job_id, a.sender, a.item_hash, members=members, stored=stored,
                                        now_ms=self.jobs.node.now_ms())

    def settled(self, a: Settled) -> None:
        """The verdicts, what they owe, the job's outcome and the collection's
        "settled" flag: all or nothing."""
        jobs = self.jobs
        rec = jobs.record(a.job_id)
        if rec is not None:
            # A cancelled job stays "cancelled" when its members' proofs settle it (it
            # was "failed" when they came after the cancellation: a flaky SDK example).
            rec.state = "succeeded" if a.succeeded else "cancelled" if a.cancelled else "failed"
            rec.reason = a.reason
            rec.ended_at_ms = a.settled_at_ms
            rec.extra["proofs"] = [ln.to_json() for ln in a.lines]
            rec.extra["member_outputs"] = {p: list(o) for p, o in a.outputs.items()}
        if self._db is not None:
            from p2pgpu.store import mark_collection_settled, transaction

            with transaction(self._db):
                mark_collection_settled(self._db, a.job_id, now_ms=a.settled_at_ms)
                jobs.persist(a.job_id)
                for line in a.lines:
                    self._record_line(a.job_id, a.currency, line, a.settled_at_ms)
        jobs.node.payouts_due()

    def late_line(self, a: LateLine) -> None:
        """A proof owed after the job settled (it came late, but in time)."""
        rec = self.jobs.record(a.job_id)
        if rec is not None:
            rows = [r for r in rec.extra.get("proofs", []) if r.get("worker") != a.line.peer_id]
            rec.extra["proofs"] = [*rows, a.line.to_json()]
        now = self.jobs.node.now_ms()
        if self._db is not None:
            from p2pgpu.store import transaction

            with transaction(self._db):
                self.jobs.persist(a.job_id)
                self._record_line(a.job_id, a.currency, a.line, now)
        self.jobs.node.payouts_due()

    def installments_owed(self, a: InstallmentsOwed) -> None:
        """Intervals owed as the job goes: recorded once each (a replay is a no-op), then paid."""
        if self._db is None:
            return
        from p2pgpu.store import record_installment, transaction

        now = self.jobs.node.now_ms()
        with transaction(self._db):
            for r in a.rows:
                record_installment(self._db, key=r.key, job_id=a.job_id, peer_id=r.peer_id, interval=r.interval,
                                   amount=r.amount, currency=a.currency, payout_address=r.payout_address,
                                   now_ms=now)
        self.jobs.counts["installments_owed"] += len(a.rows)
        self.jobs.node.payouts_due()

    def _record_line(self, job_id: str, currency: str, line: MemberLine, now_ms: int) -> None:
        """Inside the caller's transaction: one line's verdict and what it owes."""
        if not line.proof_hash:
            return
        from p2pgpu.store import record_owed, record_proof

        record_proof(self._db, proof_hash=line.proof_hash, job_id=job_id, peer_id=line.peer_id, wire=line.proof_wire,
                     cosigns=list(line.cosigns), status=line.status, reason=line.reason, amount=line.amount,
                     currency=currency, gpu_ms=line.gpu_ms, now_ms=now_ms)
        if line.payable:
            record_owed(self._db, line.proof_hash, line.peer_id, line.payout_address, line.amount, currency, job_id,
                        created_ms=now_ms)

    # -- after a restart ------------------------------------------------------------------

    def reopen(self, now_ms: int) -> int:
        """Rebuild every unsettled collection from the store (the settlement
        core replays its items and sets its deadline).  Returns how many."""
        if self._db is None:
            return 0
        from p2pgpu.store import log_batches, open_collections

        jobs = self.jobs
        reopened = 0
        for row in open_collections(self._db):
            rec = jobs.record(row["job_id"])
            if rec is None or row["job_id"] in self.collections:
                continue
            try:
                cert = Certificate.from_obj(decode(row["certificate"], size_max=Kind.CERTIFICATE.bytes_max))
            except PeerMisbehaved as exc:
                log.warning("stored certificate of %s does not verify: %s", row["job_id"][:12], exc)
                continue
            items = [(i["kind"], i["sender"], i["wire"], i.get("received_ms", now_ms)) for i in row["items"]]
            jobs.apply(jobs.host.settlement_restore(rec.manifest, cert, confirmed_at_ms=row["confirmed_at_ms"],
                                                    deadline_ms=row["deadline_ms"],
                                                    payout_addresses=dict(row["payout_addresses"]), items=items,
                                                    now_ms=now_ms))
            for taken in jobs.host.settlement.restore_logs(row["job_id"], log_batches(self._db, row["job_id"])):
                if isinstance(taken, LogsTaken):
                    self.logs_taken(taken, store=False)
            if rec.state == "interrupted":
                rec.state, rec.reason = "confirmed", ""
            jobs.counts["collections_reopened"] += 1
            reopened += 1
        return reopened

    def logs_of(self, job_id: str) -> list[dict[str, Any]] | None:
        """A job's collected logs: in memory, else rebuilt from the stored batches."""
        lines = self.logs.get(job_id)
        if lines is not None:
            return list(lines)
        return self.stored_logs(job_id)

    def stored_logs(self, job_id: str) -> list[dict[str, Any]] | None:
        """The logs of a job collected here (``None`` if none are stored),
        rebuilt from the stored signed batches by the settlement core's rules."""
        if self._db is None:
            return None
        from p2pgpu.core._settlement import Settlement
        from p2pgpu.store import collection_row, log_batches

        row = collection_row(self._db, job_id)
        rec = self.jobs.record(job_id)
        if row is None or rec is None:
            return None
        try:
            cert = Certificate.from_obj(decode(row["certificate"], size_max=Kind.CERTIFICATE.bytes_max))
        except PeerMisbehaved:
            return None
        reader = Settlement(self.jobs.node.identity)
        reader.restore(rec.manifest, cert, confirmed_at_ms=row["confirmed_at_ms"], deadline_ms=row["deadline_ms"],
                       payout_addresses={}, items=[], now_ms=0)
        out: list[dict[str, Any]] = []
        for taken in reader.restore_logs(job_id, log_batches(self._db, job_id)):
            if isinstance(taken, LogsTaken):
                out += [{"t_ms": t, "stream": s, "line": text, "member": taken.member,
                         "member_index": taken.member_index} for t, s, text in taken.lines]
        return out
