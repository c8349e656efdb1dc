"""Receipts over the network, and the reputation this node computes from them.

The driver of ``core/_receipt.py`` and ``core/_reputation.py`` (issue #16):

- **The submitter signs.**  When the settlement core settles a job we
  submitted (``Settled``), the job is noted as due (``receipts_due``, in the
  store: a restart still signs it).  Once every payable line has its payout
  transaction in the outbox, or ``sign_wait_ms`` has passed
  (:func:`~p2pgpu.core._receipt.receipt_ready`), the receipt is built from
  the settled lines and the outbox (:func:`~p2pgpu.core._receipt.build_receipt`),
  signed, kept, published on ``/p2pgpu/receipts/1`` with the job's
  certificate, and put in the DHT under each member's key
  (:func:`~p2pgpu.core._receipt.receipts_key`).
- **Each member signs.**  When the submitter's payment notice comes
  (``PaidNotice``) the member looks the transaction up on the ledger and
  signs a member receipt: ``on_time``, or ``late`` when it came after
  ``member_due_ms`` from the end of its part or paid less than expected
  (:func:`~p2pgpu.core._receipt.member_account`, which counts every
  payment of the job, pay-as-you-go installments included); an earning
  still unpaid ``member_due_ms`` after the part ended is reported ``unpaid``
  (or ``late`` when installments paid part of it).
- **Everyone keeps and checks.**  The topic's validator (and the DHT's, for
  records under ``/p2pgpu/receipts/``) admits only what decodes: a receipt
  signed by its submitter with its certificate, canonical and within size,
  or a member receipt signed by its member; one already held is a replay
  (``REPLAYED``: nothing changes).  What is admitted is kept in the store's
  bounded ``receipts`` table.
- **Scores.**  :meth:`ReceiptService.reputation` computes every peer's score
  from the receipts held, each paid line checked against the ledger
  (``solana/_verify.py``: cached, bounded), and the certificates' payout
  addresses; the result is cached for ``compute_every_s``.  It is what
  ``peers --json`` shows, what formation ranks members by, and what the
  advert book's eviction consults (``standing``).

Decisions (what a receipt says, when it is signed, the score) are the cores';
this module moves bytes, stores, and asks the ledger.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio
from libp2p.exceptions import BaseLibp2pError
from libp2p.records.utils import InvalidRecordType
from libp2p.records.validator import Validator

from p2pgpu.core import GossipVerdict, Kind, PeerMisbehaved, Reason, verdict_for
from p2pgpu.core._actions import PaidNotice, Settled
from p2pgpu.core._codec import decode
from p2pgpu.core._formation_messages import Certificate
from p2pgpu.core._installments import installment_key
from p2pgpu.core._manifest import intervals_max
from p2pgpu.core._receipt import (
    Earning,
    MemberAccount,
    MemberReceipt,
    PublishedReceipt,
    Receipt,
    SettledLine,
    SignedMemberReceipt,
    SignedReceipt,
    build_receipt,
    cosign,
    decode_member_receipt,
    decode_published,
    member_account,
    publish_wire,
    published_bytes_max,
    receipt_ready,
    receipts_key,
    sign_member_receipt,
    sign_receipt,
)
from p2pgpu.core._reputation import Reputation, Score, compute_reputation, job_value_max

if TYPE_CHECKING:
    from ._ports import NodePorts

log = logging.getLogger("p2pgpu.receipts")

RECEIPTS_TOPIC = "/p2pgpu/receipts/1"
DHT_PREFIX = "/p2pgpu/receipts/"
#: A DHT record under ``/p2pgpu/receipts/`` is at most this long (the DHT
#: store's per-record limit; a larger published receipt travels by gossip only).
dht_record_bytes_max = Kind.ADVERT.bytes_max
#: Publishes (gossip and DHT puts) waiting at once; past it, counted and dropped
#: (the receipt is kept and found again by anyone who asks the DHT or a peer).
publish_queue_max = 256
#: Payment notices waiting for their ledger lookup at once.
member_queue_max = 1024
#: Receipts read per computation (the newest; ``core._reputation.receipts_max`` is the core's).
compute_receipts_max = 20_000


@dataclass(frozen=True, kw_only=True)
class ReceiptSettings:
    #: The submitter waits this long after settling for its payouts before it
    #: signs a receipt that says ``unpaid`` for the rest.
    sign_wait_ms: int = 120_000
    #: A member calls a payment late that comes more than this after its part ended.
    member_due_ms: int = 600_000
    #: After a restart, settled jobs this recent without a receipt get one.
    recover_window_ms: int = 24 * 3600 * 1000
    #: How often due receipts and unpaid earnings are looked at.
    sweep_s: float = 1.0
    #: Scores are recomputed at most this often (``reputation``) ...
    compute_every_s: float = 2.0
    #: ... and at least this often (formation reads the last ones).
    refresh_s: float = 15.0


class ReceiptService:
    """Signs, publishes, keeps and checks receipts; computes scores (module doc)."""

    def __init__(self, node: NodePorts, settings: ReceiptSettings = ReceiptSettings()) -> None:
        self.node = node
        self.settings = settings
        self.counts: Counter[str] = node.counts
        self._pub_send, self._pub_recv = trio.open_memory_channel[tuple[bytes, list[str]]](publish_queue_max)
        self._paid_send, self._paid_recv = trio.open_memory_channel[tuple[PaidNotice, int]](member_queue_max)
        self._due = trio.Event()
        self._lookup: Any = None
        self._ledger: Any = None
        #: The last computation (``None`` before the first) and its time.
        self.last: Reputation | None = None
        self.last_at_ms = 0
        self._last_clock = float("-inf")
        self._compute_lock = trio.Lock()
        #: Receipts held, decoded (their signatures checked once), by digest;
        #: a published one without its certificate and bytes (``Checked``).
        self._decoded: dict[bytes, Checked | SignedMemberReceipt] = {}

    @property
    def db(self) -> Any:
        return self.node.jobs.db

    # -- lifecycle ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        stack = self.node.stack
        assert stack is not None
        stack.pubsub.set_topic_verdict_validator(RECEIPTS_TOPIC, self._validate)
        sub = await stack.pubsub.subscribe(RECEIPTS_TOPIC)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._drain, sub)
                nursery.start_soon(self._publisher)
                nursery.start_soon(self._member_worker)
                nursery.start_soon(self._sweep_loop)
                task_status.started()
        finally:
            if self._ledger is not None:
                with trio.CancelScope(shield=True):
                    await self._ledger.aclose()

    async def _drain(self, sub: Any) -> None:
        while True:
            await sub.get()  # handled in the validator

    # -- what comes in -----------------------------------------------------------------

    def ingest(self, data: bytes, *, ours: bool = False) -> PublishedReceipt | SignedMemberReceipt:
        """Check and keep one published receipt or member receipt; raises
        ``PeerMisbehaved`` (``REPLAYED`` for one already held: nothing changes)."""
        item = decode_item(data)
        if self.db is None:
            return item
        from p2pgpu.store import add_receipt, has_receipt

        if has_receipt(self.db, item.digest):
            raise PeerMisbehaved(Reason.REPLAYED, "receipt already held")
        if isinstance(item, PublishedReceipt):
            r = item.receipt
            kept = add_receipt(self.db, digest=item.digest, kind="receipt", job_id=r.job_id, signer=r.submitter,
                               at_ms=r.settled_at_ms, wire=item.wire, ours=ours, now_ms=self.node.now_ms())
        else:
            m = item.receipt
            kept = add_receipt(self.db, digest=item.digest, kind="member_receipt", job_id=m.job_id,
                               signer=m.member, at_ms=m.reported_at_ms, wire=item.wire, ours=ours,
                               now_ms=self.node.now_ms())
        self.counts["receipts:kept" if kept else "receipts:not_kept_full"] += 1
        if kept and len(self._decoded) < compute_receipts_max:
            self._decoded[item.digest] = slim(item)  # checked: not decoded again to score it
        return item

    def _validate(self, forwarder: Any, msg: Any) -> GossipVerdict:
        """Kept, or refused as the reason says (``core/_verdict.py``): a
        replay is ignored (not forwarded, nobody penalised), bad bytes are
        rejected and cost the forwarder."""
        stack = self.node.stack
        if stack is not None and msg.from_id == stack.host.get_id().to_bytes():
            return GossipVerdict.ACCEPT  # our own, kept when signed
        try:
            self.ingest(bytes(msg.data))
        except PeerMisbehaved as exc:
            self.counts[f"receipts:refused_{exc.reason.name.lower()}"] += 1
            log.info("receipt from %s refused: %s", forwarder, exc)
            return verdict_for(exc.reason)
        return GossipVerdict.ACCEPT

    # -- the submitter's receipts --------------------------------------------------------

    def on_settled(self, a: Settled) -> None:
        """A job we submitted settled: its receipt is due (signed once paid)."""
        if self.db is None:
            return
        from p2pgpu.store import add_receipt_due

        add_receipt_due(self.db, job_id=a.job_id, settled_at_ms=a.settled_at_ms, currency=a.currency,
                        now_ms=self.node.now_ms())
        self._due.set()

    def wake(self) -> None:
        """The payer paid something: due receipts may be ready."""
        self._due.set()

    def recover_due(self) -> int:
        """After a restart: jobs settled in the last ``recover_window_ms`` whose
        receipt was never noted as due (a crash right after settling) are due."""
        if self.db is None:
            return 0
        from p2pgpu.store import add_receipt_due, settled_without_receipt

        found = 0
        now = self.node.now_ms()
        for job_id, settled_ms in settled_without_receipt(self.db, since_ms=now - self.settings.recover_window_ms):
            rec = self.node.jobs.record(job_id)
            if rec is None or rec.manifest.manifest.submitter != self.node.identity.peer_id:
                continue
            add_receipt_due(self.db, job_id=job_id, settled_at_ms=settled_ms,
                            currency=rec.manifest.manifest.currency, now_ms=now)
            found += 1
        return found

    async def _sweep_loop(self) -> None:
        self.recover_due()
        while True:
            with trio.move_on_after(self.settings.sweep_s):
                await self._due.wait()
            self._due = trio.Event()
            self.sign_due()
            await self.report_due()
            if trio.current_time() - self._last_clock >= self.settings.refresh_s:
                # Formation and the advert book read the last scores without
                # waiting: keep them fresh.
                await self.reputation(fresh=True)

    def sign_due(self) -> int:
        """Sign the due receipts that are ready; returns how many were signed."""
        if self.db is None:
            return 0
        from p2pgpu.store import receipts_due, remove_receipt_due

        signed = 0
        now = self.node.now_ms()
        for due in receipts_due(self.db):
            job_id = due["job_id"]
            try:
                made = self._sign_one(job_id, due["settled_at_ms"], due["currency"], now)
            except (ValueError, PeerMisbehaved) as exc:
                # A job whose stored facts cannot make a receipt (a bug of ours):
                # said once, never retried in a loop.
                self.counts["receipts:sign_failed"] += 1
                log.error("cannot sign the receipt of %s: %s", job_id[:12], exc)
                remove_receipt_due(self.db, job_id)
                continue
            if made is None:
                continue  # not ready yet
            remove_receipt_due(self.db, job_id)
            signed += made
        return signed

    def _sign_one(self, job_id: str, settled_at_ms: int, currency: str, now_ms: int) -> int | None:
        """1 signed, 0 nothing to sign (we were the only member), None not ready."""
        from p2pgpu.store import collection_row, payouts

        jobs = self.node.jobs
        rec = jobs.record(job_id)
        row = collection_row(self.db, job_id)
        if rec is None or row is None:
            raise ValueError("no record or collection of the job")
        cert = Certificate.from_obj(decode(bytes(row["certificate"]), size_max=Kind.CERTIFICATE.bytes_max))
        proofs = rec.extra.get("proofs", [])
        finals = {p.get("proof_hash") or "" for p in proofs}
        rows = payouts(self.db, job_id=job_id)
        paid = {p["proof_hash"]: p["tx_signature"] for p in rows
                if p.get("status") == "paid" and p.get("tx_signature")}
        # The job's other outbox rows are its pay-as-you-go installments
        # (keyed by core._installments.installment_key), per member.
        inst: dict[str, list[tuple[str, int]]] = {}
        pending: Counter[str] = Counter()
        inst_address: dict[str, str] = {}
        for p in rows:
            if p["proof_hash"] in finals:
                continue
            if p.get("status") == "paid" and p.get("tx_signature"):
                inst.setdefault(p["worker"], []).append((p["tx_signature"], int(p["amount"])))
                inst_address.setdefault(p["worker"], p.get("payout_address") or "")
            elif p.get("status") in ("owed", "batched"):
                pending[p["worker"]] += 1
        lines = [SettledLine(peer_id=p["worker"], status=p["status"], amount=int(p.get("amount") or 0),
                             address=p.get("payout_address") or inst_address.get(p["worker"], ""),
                             proof_hash=bytes.fromhex(p["proof_hash"]) if p.get("proof_hash") else b"",
                             tx_signature=paid.get(p.get("proof_hash") or "", ""),
                             installments=tuple(inst.get(p["worker"], ())),
                             installments_pending=pending[p["worker"]])
                 for p in proofs]
        if not receipt_ready(lines, settled_at_ms=settled_at_ms, now_ms=now_ms, wait_ms=self.settings.sign_wait_ms):
            return None
        me = self.node.identity.peer_id
        receipt = build_receipt(job_id=job_id, cert_hash=cert.digest, submitter=me,
                                payer=rec.manifest.manifest.payer, currency=currency, settled_at_ms=settled_at_ms,
                                lines=lines)
        if receipt is None:
            return 0
        receipt = self._cosigned(receipt)
        wire = publish_wire(sign_receipt(self.node.identity, receipt), cert)
        try:
            self.ingest(wire, ours=True)
        except PeerMisbehaved as exc:
            if exc.reason is not Reason.REPLAYED:
                raise
        self._publish(wire, [ln.peer_id for ln in receipt.lines])
        self.counts["receipts:signed"] += 1
        return 1

    def _cosigned(self, receipt: Receipt) -> Receipt:
        """The receipt co-signed by the payer keypair that paid it (#16.2:
        without that co-signature its payments credit nobody).  A job paid
        from a keypair this node does not hold (its manifest names another
        payer) is published without one, and counted."""
        if not receipt.payer:
            return receipt
        keypair = self.node.wallet.payer
        if keypair is None or str(keypair.pubkey()) != receipt.payer:
            self.counts["receipts:not_cosigned"] += 1
            log.warning("receipt for job %s not co-signed: its payer %s is not this node's payer keypair",
                        receipt.job_id[:16], receipt.payer)
            return receipt
        return cosign(receipt, lambda msg: bytes(keypair.sign_message(msg)))

    # -- the member's receipts -----------------------------------------------------------

    def on_paid(self, a: PaidNotice) -> None:
        """The submitter says it paid one of our proofs: checked, then reported."""
        try:
            self._paid_send.send_nowait((a, self.node.now_ms()))
        except trio.WouldBlock:
            self.counts["receipts:member_queue_full"] += 1

    async def _member_worker(self) -> None:
        async for notice, at_ms in self._paid_recv:
            await self.report_paid(notice, at_ms)

    async def report_paid(self, a: PaidNotice, at_ms: int) -> None:
        await self.report_job(a.job_id, at_ms)

    async def report_job(self, job_id: str, now_ms: int) -> int:
        """Sign our member receipt of ``job_id`` once there is something to
        say (``core._receipt.member_account``: every payment of the job,
        pay-as-you-go installments included, each looked up on the ledger);
        1 when signed."""
        rec = self.node.jobs.record(job_id)
        if rec is None or self.db is None or not rec.certificate or self._reported(job_id) \
                or rec.manifest.manifest.submitter == self.node.identity.peer_id:
            return 0
        rows = self._earning_rows(rec)
        if not rows or self._account(rec, rows, now_ms, {}) is None:
            return 0  # nothing to say yet: no ledger lookups
        sigs = sorted({r["tx_signature"] for r in rows if r["tx_signature"]})
        lookup = self._payments()
        found = await lookup.payments(sigs) if lookup is not None and sigs else {}
        acct = self._account(rec, rows, now_ms, found)
        if acct is None:
            return 0
        return self._member_receipt(rec, owed=acct.owed, received=acct.received, tx=acct.tx_signature,
                                    verdict=acct.verdict, now_ms=now_ms)

    def _earning_rows(self, rec: Any) -> list[dict[str, Any]]:
        cur = self.db.execute("SELECT proof_hash, amount, payout_address, status, tx_signature, paid_ms, created_ms"
                              " FROM earnings WHERE job_id = ? ORDER BY created_ms LIMIT ?",
                              (rec.job_id, intervals_max + 8))
        return [{"proof_hash": bytes(r[0]), "amount": int(r[1]), "address": r[2] or "",
                 "tx_signature": (r[4] or "") if r[3] == "paid" else "", "paid_ms": r[5], "created_ms": r[6] or 0}
                for r in cur.fetchall()]

    def _account(self, rec: Any, rows: list[dict[str, Any]], now_ms: int,
                 found: dict[str, Any]) -> MemberAccount | None:
        m = rec.manifest.manifest
        me = self.node.identity.peer_id
        # Intervals are claimed in order from 1: at most one key per row to try.
        n = min(intervals_max, m.duration_s_max // m.interval_s, len(rows)) if m.interval_s else 0
        keys = {installment_key(rec.job_id, me, k) for k in range(1, n + 1)} if n else set()
        earnings = []
        for r in rows:
            pay = found.get(r["tx_signature"]) if r["tx_signature"] else None
            earnings.append(Earning(amount=r["amount"], installment=r["proof_hash"] in keys,
                                    tx_signature=r["tx_signature"],
                                    on_ledger=pay.transfers.get(r["address"], 0) if pay is not None else None,
                                    paid_at_ms=(r["paid_ms"] or now_ms) if r["tx_signature"] else None,
                                    created_ms=r["created_ms"]))
        finals = [e.created_ms for e in earnings if not e.installment]
        ended = int(rec.extra.get("member_ended_at_ms") or (max(finals) if finals else 0)
                    or max(e.created_ms for e in earnings))
        return member_account(earnings, due_ms=ended + self.settings.member_due_ms, now_ms=now_ms)

    async def report_due(self) -> int:
        """Jobs we worked on with something to report: an earning still
        unpaid ``member_due_ms`` after the part ended (``unpaid`` or
        ``late``), or a recent job whose payments (installments covering
        it all) came without a final notice.  Reported once each."""
        if self.db is None:
            return 0
        now = self.node.now_ms()
        me = self.node.identity.peer_id
        # Jobs already reported drop out (not only skipped: else 256 old ones
        # would hide every newer one).
        unreported = ("NOT EXISTS (SELECT 1 FROM receipts r WHERE r.job_id = e.job_id"
                      " AND r.kind = 'member_receipt' AND r.signer = ?)")
        due = self.db.execute("SELECT DISTINCT e.job_id FROM earnings e WHERE e.status != 'paid'"
                              f" AND e.created_ms <= ? AND e.created_ms > ? AND {unreported}"
                              " ORDER BY e.created_ms LIMIT 256",
                              (now - self.settings.member_due_ms, now - self.settings.recover_window_ms,
                               me)).fetchall()
        recent = self.db.execute(f"SELECT DISTINCT e.job_id FROM earnings e WHERE e.created_ms > ? AND {unreported}"
                                 " ORDER BY e.created_ms DESC LIMIT 256",
                                 (now - self.settings.member_due_ms, me)).fetchall()
        made = 0
        for (job_id,) in dict.fromkeys([*due, *recent]):
            made += await self.report_job(job_id, now)
        return made

    def _reported(self, job_id: str) -> bool:
        from p2pgpu.store import member_reported

        return member_reported(self.db, job_id, self.node.identity.peer_id)

    def _member_receipt(self, rec: Any, *, owed: int, received: int, tx: str, verdict: str, now_ms: int) -> int:
        me = self.node.identity.peer_id
        submitter = rec.manifest.manifest.submitter
        if submitter == me or self._reported(rec.job_id):
            return 0
        mr = MemberReceipt(job_id=rec.job_id, cert_hash=bytes.fromhex(rec.certificate), member=me,
                           submitter=submitter, owed=owed, received=received, tx_signature=tx, verdict=verdict,
                           reported_at_ms=now_ms)
        wire = sign_member_receipt(self.node.identity, mr).wire
        self.ingest(wire, ours=True)
        self._publish(wire, [])
        self.counts[f"receipts:member_{verdict}"] += 1
        return 1

    # -- publishing ---------------------------------------------------------------------

    def _publish(self, wire: bytes, members: list[str]) -> None:
        try:
            self._pub_send.send_nowait((wire, members))
        except trio.WouldBlock:
            self.counts["receipts:publish_queue_full"] += 1

    async def _publisher(self) -> None:
        stack = self.node.stack
        assert stack is not None
        async for wire, members in self._pub_recv:
            try:
                await stack.pubsub.publish(RECEIPTS_TOPIC, wire)
                self.counts["receipts:published"] += 1
            except (BaseLibp2pError, ValueError) as exc:
                self.counts["receipts:publish_failed"] += 1
                log.info("publishing a receipt failed: %s", exc)
            if len(wire) > dht_record_bytes_max or not stack.host.get_connected_peers():
                continue
            for member in members:
                with trio.move_on_after(10):
                    try:
                        await stack.dht.put_value(receipts_key(member), wire)
                        self.counts["receipts:dht_put"] += 1
                    except (BaseLibp2pError, ValueError, InvalidRecordType) as exc:
                        self.counts["receipts:dht_put_failed"] += 1
                        log.info("DHT put of a receipt failed: %s", exc)

    async def fetch(self, peer_id: str) -> dict[str, Any]:
        """Ask the DHT for the newest receipt naming ``peer_id`` and keep it:
        ``found`` (a valid one came back), ``new`` (we did not hold it),
        ``job_id`` and ``digest`` of what came."""
        stack = self.node.stack
        assert stack is not None
        key = receipts_key(peer_id)
        stack.dht.value_store.remove(key.encode())  # ask the network, not a stale local copy
        value = None
        with trio.move_on_after(10):
            value = await stack.dht.get_value(key)
        if not value:
            return {"found": False, "new": False}
        try:
            item = decode_item(value)
            if not isinstance(item, PublishedReceipt) or not item.names(peer_id):
                raise PeerMisbehaved(Reason.BAD_PROOF, "not a published receipt naming that peer")
            new = True
            try:
                self.ingest(value)
            except PeerMisbehaved as exc:
                if exc.reason is not Reason.REPLAYED:
                    raise
                new = False
        except PeerMisbehaved as exc:
            log.info("receipt from the DHT not kept: %s", exc)
            self.counts[f"receipts:dht_refused_{exc.reason.name.lower()}"] += 1
            return {"found": False, "new": False}
        return {"found": True, "new": new, "job_id": item.receipt.job_id, "digest": item.digest.hex()}

    # -- scores ---------------------------------------------------------------------------

    def _payments(self) -> Any:
        """The ledger lookup (opened on first use; ``None`` when no ledger can be opened)."""
        if self._lookup is None:
            from p2pgpu.solana import open_ledger
            from p2pgpu.solana._verify import PaymentLookup

            home = self.node.home
            try:
                self._ledger = open_ledger(self.node.ledger_spec, home_path=home.path if home else None,
                                           readonly=True)
            except (ValueError, OSError) as exc:
                log.warning("receipts: no ledger to check payments on (%s): payments verify nothing", exc)
                return None
            self._lookup = PaymentLookup(self._ledger)
        return self._lookup

    async def reputation(self, *, fresh: bool = False) -> Reputation:
        """Every peer's score from the receipts held (cached ``compute_every_s``)."""
        async with self._compute_lock:
            if not fresh and self.last is not None \
                    and trio.current_time() - self._last_clock < self.settings.compute_every_s:
                return self.last
            published, members = self.held()
            sigs = [tx for p in published for ln in p.receipt.lines for tx in ln.tx_signatures]
            lookup = self._payments()
            payments = await lookup.payments(sigs) if lookup is not None else {}
            now = self.node.now_ms()
            self.last = compute_reputation([p.signed for p in published], payments=payments, now_ms=now,
                                           member_receipts=members,
                                           cert_addresses={p.receipt.cert_hash: p.addresses for p in published})
            self.last_at_ms = now
            self._last_clock = trio.current_time()
            return self.last

    def held(self) -> tuple[list[Checked], list[SignedMemberReceipt]]:
        """The receipts in the store, decoded (a row that no longer decodes is skipped)."""
        if self.db is None:
            return [], []
        from p2pgpu.store import receipt_digests, receipt_wires

        # Decoding verifies every signature of a receipt and its certificate:
        # done once per receipt, then remembered (receipts never change).
        digests = receipt_digests(self.db, limit=compute_receipts_max)
        new = [d for d in digests if d not in self._decoded]
        for d, wire in receipt_wires(self.db, new).items():
            try:
                self._decoded[d] = slim(decode_item(wire))
            except PeerMisbehaved:
                self.counts["receipts:stored_refused"] += 1
        held = set(digests)
        for d in [d for d in self._decoded if d not in held]:
            del self._decoded[d]  # evicted from the store
        published: list[Checked] = []
        members: list[SignedMemberReceipt] = []
        for d in digests:
            item = self._decoded.get(d)
            if isinstance(item, Checked):
                published.append(item)
            elif item is not None:
                members.append(item)
        return published, members

    def score(self, peer_id: str) -> Score | None:
        """The last computed score of a peer (``None``: no record)."""
        return self.last.scores.get(peer_id) if self.last is not None else None

    def standing(self, peer_id: str) -> int | None:
        """The last computed worker score (``None`` without a record): for
        formation and the advert book, which must not wait for the ledger."""
        s = self.score(peer_id)
        return s.worker if s is not None else None

    def job_value_max(self, peer_id: str) -> int:
        return job_value_max(self.score(peer_id))

    # -- control ---------------------------------------------------------------------------

    async def control_reputation(self, params: dict[str, Any]) -> dict[str, Any]:
        from ._control import ControlError

        fresh = params.get("fresh", False)
        if not isinstance(fresh, bool):
            raise ControlError("fresh must be true or false", code="bad_params")
        rep = await self.reputation(fresh=fresh)
        published, members = self.held()
        return {"computed_at_ms": self.last_at_ms, "receipts_held": len(published),
                "member_receipts_held": len(members),
                "scores": [s.to_json() | {"job_value_max": job_value_max(s)} for s in rep.scores.values()],
                "refused": [{"digest": r.digest, "why": r.why} for r in rep.refused][:256]}

    async def control_list(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        if self.db is None:
            return []
        from p2pgpu.store import receipt_rows

        return [{"kind": r["kind"], "digest": r["digest"].hex(), "job_id": r["job_id"], "signer": r["signer"],
                 "at_ms": r["at_ms"], "ours": r["ours"], "wire": r["wire"].hex()}
                for r in receipt_rows(self.db, limit=compute_receipts_max)]

    async def control_fetch(self, params: dict[str, Any]) -> dict[str, Any]:
        from ._control import ControlError

        pid = params.get("peer_id")
        if not isinstance(pid, str) or not 0 < len(pid) <= 128:
            raise ControlError("peer_id is required (a peer id, e.g. from p2pgpu peers)", code="bad_params")
        return await self.fetch(pid)

    def handlers(self) -> dict[str, Any]:
        return {"reputation": self.control_reputation, "receipts.list": self.control_list,
                "receipts.fetch": self.control_fetch}


@dataclass(frozen=True, slots=True)
class Checked:
    """A published receipt whose signatures and certificate were checked,
    kept for scoring without the certificate's signed messages and the bytes
    (the store has them): what ``compute_reputation`` reads.  Keeping the
    whole ``PublishedReceipt`` of every receipt held was ~4 KB each, the
    largest per-job growth of a long-running daemon (#13, tracemalloc over
    200 jobs of ``tests/e2e/test_soak_jobs.py``)."""

    signed: SignedReceipt
    addresses: dict[str, str]

    @property
    def receipt(self) -> Receipt:
        return self.signed.receipt

    @property
    def digest(self) -> bytes:
        return self.signed.digest


def slim(item: PublishedReceipt | SignedMemberReceipt) -> Checked | SignedMemberReceipt:
    if isinstance(item, PublishedReceipt):
        return Checked(item.signed, item.addresses)
    return item


def decode_item(data: bytes) -> PublishedReceipt | SignedMemberReceipt:
    """A published receipt or a member receipt from bytes, or ``PeerMisbehaved``."""
    obj = decode(data, size_max=published_bytes_max, canonical=True)
    if isinstance(obj, dict) and "k" in obj:
        return decode_member_receipt(bytes(data))
    return decode_published(bytes(data))


class ReceiptRecordValidator(Validator):
    """DHT records under ``/p2pgpu/receipts/<key>``: a published receipt of at
    most ``dht_record_bytes_max`` bytes that names the peer whose key it is
    stored under; ``select`` keeps the newest."""

    def __init__(self, counts: Counter[str]) -> None:
        self.counts = counts

    def _check(self, key: str, value: bytes) -> PublishedReceipt:
        try:
            if len(value) > dht_record_bytes_max:
                raise PeerMisbehaved(Reason.OVERSIZED, f"{len(value)} bytes > {dht_record_bytes_max}")
            pr = decode_published(value)
        except PeerMisbehaved as exc:
            self.counts[f"dht:receipt_{exc.reason.name.lower()}"] += 1
            raise InvalidRecordType(str(exc)) from None
        peers = [pr.receipt.submitter, *(ln.peer_id for ln in pr.receipt.lines)]
        if key not in {receipts_key(p) for p in peers}:
            self.counts["dht:receipt_wrong_key"] += 1
            raise InvalidRecordType("receipt stored under the key of a peer it does not name")
        return pr

    def validate(self, key: str, value: bytes) -> None:
        self._check(key, value)

    def select(self, key: str, values: list[bytes]) -> int:
        best, best_at = 0, (-1, b"")
        for i, v in enumerate(values):
            try:
                pr = self._check(key, v)
            except InvalidRecordType:
                continue
            at = (pr.receipt.settled_at_ms, pr.digest)
            if at > best_at:
                best, best_at = i, at
        return best


class P2pgpuRecordValidator(Validator):
    """The ``p2pgpu`` DHT namespace, by sub-namespace: ``/p2pgpu/receipts/``
    to the receipts' validator, everything else (``/p2pgpu/a/``) to the adverts'."""

    def __init__(self, adverts: Validator, receipts: Validator) -> None:
        self.adverts = adverts
        self.receipts = receipts

    def _of(self, key: str) -> Validator:
        return self.receipts if key.startswith(DHT_PREFIX) else self.adverts

    def validate(self, key: str, value: bytes) -> None:
        self._of(key).validate(key, value)

    def select(self, key: str, values: list[bytes]) -> int:
        return self._of(key).select(key, values)
