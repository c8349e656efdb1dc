"""Reputation that anyone can recompute from the receipts it holds.

:func:`compute_reputation` takes receipts (bytes or decoded), the payments a
driver found on the ledger (:class:`VerifiedPayment`, looked up by transaction
signature), the payer each job's signed manifest names when known, and
``now_ms``; it returns a :class:`Score` per peer.  It is a pure function of
its inputs, with integer arithmetic only and receipts taken in a canonical
order, so two nodes holding the same receipts and ledger facts get the same
numbers, byte for byte.  The formula is ``docs/reputation.md``'s:

- evidence counts only with money behind it: a receipt line adds to a
  worker's ``good`` only what the ledger shows its payer transferred to the
  line's address in the transactions it cites (every payment of the job:
  pay-as-you-go installments and the final remainder), and each
  ``(transaction, address)`` pair counts once, whoever cites it;  a receipt whose lines pay
  nothing verified carries no weight at all, good or bad, so forging
  evidence costs real transfers and their fees;
- and only in a receipt the payer co-signed (``Receipt.payer_signature``,
  checked against the payer's key when it was decoded: #16.2): the key that
  signed the transactions says which job and member they paid, so nobody
  else can cite them in a receipt of their own, backdated or not;
- a refused proof (``proof_refused``) or a wrong output (``outside_quorum``)
  adds to the worker's ``bad`` the job's verified value per member;
- a member's report that the submitter paid late or not at all adds to the
  submitter's ``late``, weighted by what was owed, capped by the reporter's
  own verified ``good`` (a stranger without a record cannot defame);
- every contribution decays: it halves every ``half_life_ms``, linearly in
  between (exact in integers);
- ``worker = good - penalty * bad``, ``submitter = paid - penalty * late``.

:func:`job_value_max` is the largest job (in lamports) to offer a peer: a new
identity gets small jobs first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ._errors import PeerMisbehaved
from ._receipt import SignedMemberReceipt, SignedReceipt, decode_member_receipt, decode_receipt

#: Contributions halve every 30 days.
half_life_ms = 30 * 24 * 3600 * 1000
#: One unit of bad evidence cancels this many units of good.
penalty = 4
#: A new identity may be offered jobs up to this value (0.01 SOL) ...
job_value_base = 10_000_000
#: ... plus this many times its worker score.
job_value_growth = 2
#: Receipts considered per computation (the caller keeps the newest).
receipts_max = 100_000


@dataclass(frozen=True, kw_only=True, slots=True)
class VerifiedPayment:
    """A transaction as the ledger shows it: who paid, and how much to each address."""

    tx_signature: str
    payer: str
    transfers: Mapping[str, int]


@dataclass(kw_only=True)
class Score:
    """One peer's evidence and scores (lamports, decayed to ``now``)."""

    peer_id: str
    good: int = 0
    bad: int = 0
    paid: int = 0
    late: int = 0
    jobs_paid: int = 0
    proofs_refused: int = 0
    reports_late: int = 0
    receipts: list[str] = field(default_factory=list)

    @property
    def worker(self) -> int:
        return self.good - penalty * self.bad

    @property
    def submitter(self) -> int:
        return self.paid - penalty * self.late

    def to_json(self) -> dict[str, object]:
        return {"peer_id": self.peer_id, "worker": self.worker, "submitter": self.submitter, "good": self.good,
                "bad": self.bad, "paid": self.paid, "late": self.late, "jobs_paid": self.jobs_paid,
                "proofs_refused": self.proofs_refused, "reports_late": self.reports_late,
                "evidence": sorted(self.receipts)[:32]}


def decayed(amount: int, age_ms: int, half_life: int = half_life_ms) -> int:
    """``amount`` after ``age_ms``: halved per whole half-life, linear in
    between (``amount * (2H - r) / 2H`` for the remainder ``r``), floored.
    Evidence from the future (a skewed clock) counts as new, never more."""
    if age_ms <= 0:
        return amount
    k, r = divmod(age_ms, half_life)
    if k >= 63:
        return 0
    return (amount * (2 * half_life - r) // (2 * half_life)) >> k


@dataclass(frozen=True, kw_only=True, slots=True)
class Refused:
    """A receipt that was not used, and why."""

    digest: str
    why: str


def _decode_all(receipts: Iterable[SignedReceipt | bytes], member_receipts: Iterable[SignedMemberReceipt | bytes],
                refused: list[Refused]) -> tuple[list[SignedReceipt], list[SignedMemberReceipt]]:
    rs: dict[bytes, SignedReceipt] = {}
    ms: dict[bytes, SignedMemberReceipt] = {}
    for i, item in enumerate(receipts):
        if i >= receipts_max:
            break
        try:
            sr = item if isinstance(item, SignedReceipt) else decode_receipt(item)
        except PeerMisbehaved as exc:
            refused.append(Refused(digest="?", why=str(exc)))
            continue
        rs[sr.digest] = sr
    for i, mitem in enumerate(member_receipts):
        if i >= receipts_max:
            break
        try:
            sm = mitem if isinstance(mitem, SignedMemberReceipt) else decode_member_receipt(mitem)
        except PeerMisbehaved as exc:
            refused.append(Refused(digest="?", why=str(exc)))
            continue
        ms[sm.digest] = sm
    # Canonical order: settlement time, then digest.  Which receipt claims a
    # shared payment first is then the same for everyone.
    return (sorted(rs.values(), key=lambda r: (r.receipt.settled_at_ms, r.digest)),
            sorted(ms.values(), key=lambda m: (m.receipt.reported_at_ms, m.digest)))


@dataclass(kw_only=True)
class Reputation:
    scores: dict[str, Score]
    refused: list[Refused]

    def score(self, peer_id: str) -> Score:
        return self.scores.get(peer_id) or Score(peer_id=peer_id)

    def with_record(self, limit: int) -> list[str]:
        """Peers with a positive record (as a worker or as a submitter), best
        first, at most ``limit``: the ones a node keeps in its advert book
        when strangers crowd it (``AdvertBook.protect``)."""
        good = [s for s in self.scores.values() if s.worker > 0 or s.submitter > 0]
        good.sort(key=lambda s: (-max(s.worker, s.submitter), s.peer_id))
        return [s.peer_id for s in good[:max(0, limit)]]

    def ranked_workers(self, peer_ids: Iterable[str]) -> list[str]:
        """Best worker first; ties by peer id (deterministic)."""
        return sorted(peer_ids, key=lambda p: (-self.score(p).worker, -self.score(p).good, p))


def compute_reputation(receipts: Iterable[SignedReceipt | bytes], *, payments: Mapping[str, VerifiedPayment],
                       now_ms: int, member_receipts: Iterable[SignedMemberReceipt | bytes] = (),
                       job_payers: Mapping[str, str] | None = None,
                       cert_addresses: Mapping[bytes, Mapping[str, str]] | None = None) -> Reputation:
    """Scores from receipts.  ``payments``: what the ledger showed for each
    transaction signature the driver could look up (a missing one verifies
    nothing).  ``job_payers``: the payer named by each job's signed manifest,
    where known; a receipt naming another payer is refused.
    ``cert_addresses``: per certificate hash, each member's payout address as
    it signed it in its accept.  Given, it binds credit to identities: a
    receipt whose certificate is not in it is refused, and a paid line whose
    address is not the member's own credits nobody (else a forger could cite
    someone else's payment under its own peer id).  None: no such check
    (docs/reputation.md says what that leaves open)."""
    refused: list[Refused] = []
    rs, ms = _decode_all(receipts, member_receipts, refused)
    scores: dict[str, Score] = {}
    used: set[tuple[str, str]] = set()
    seen_jobs: set[tuple[str, str]] = set()

    def sc(pid: str) -> Score:
        if pid not in scores:
            scores[pid] = Score(peer_id=pid)
        return scores[pid]

    for sr in rs:
        r = sr.receipt
        tag = sr.digest.hex()[:16]
        if job_payers is not None and r.job_id in job_payers and job_payers[r.job_id] != r.payer:
            refused.append(Refused(digest=tag, why="payer differs from the job's manifest"))
            continue
        if (r.submitter, r.job_id) in seen_jobs:
            refused.append(Refused(digest=tag, why="a second receipt for the same job"))
            continue
        bound = cert_addresses.get(r.cert_hash) if cert_addresses is not None else None
        if cert_addresses is not None and bound is None:
            refused.append(Refused(digest=tag, why="certificate unknown: payout addresses cannot be checked"))
            continue
        seen_jobs.add((r.submitter, r.job_id))
        if not r.cosigned and any(ln.payments for ln in r.lines):
            refused.append(Refused(digest=tag, why="its payer did not co-sign it: its payments verify nothing"))
            continue
        verified: dict[str, int] = {}
        for ln in r.lines:
            if not ln.payments or (bound is not None and bound.get(ln.peer_id) != ln.address):
                continue
            amount = 0
            for tx_sig, listed in ln.payments:
                # Every payment the line lists (pay-as-you-go installments and
                # the final remainder): each verified on its own.
                pay = payments.get(tx_sig)
                key = (tx_sig, ln.address)
                if pay is None or pay.payer != r.payer or key in used:
                    continue
                got = min(listed, pay.transfers.get(ln.address, 0))
                if got > 0:
                    used.add(key)
                    amount += got
            amount = min(amount, ln.amount)
            if amount > 0:
                verified[ln.peer_id] = amount
        value = sum(verified.values())
        if value == 0:
            refused.append(Refused(digest=tag, why="no payment in it verified on the ledger"))
            continue
        age = now_ms - r.settled_at_ms
        per_member = value // len(r.lines)
        sub = sc(r.submitter)
        sub.paid += decayed(value, age)
        sub.receipts.append(tag)
        for ln in r.lines:
            w = sc(ln.peer_id)
            w.receipts.append(tag)
            if ln.peer_id in verified:
                w.good += decayed(verified[ln.peer_id], age)
                w.jobs_paid += 1
            if ln.outcome in ("proof_refused", "outside_quorum"):
                # (installments paid before a refused final proof still count
                # as good: others co-signed those intervals)
                w.bad += decayed(per_member, age)
                w.proofs_refused += 1
    for sm in ms:
        m = sm.receipt
        if m.verdict == "on_time":
            continue
        reporter = scores.get(m.member)
        weight = min(m.owed, reporter.good if reporter is not None else 0)
        if weight <= 0:
            continue
        s = sc(m.submitter)
        s.late += decayed(weight, now_ms - m.reported_at_ms)
        s.reports_late += 1
        s.receipts.append(sm.digest.hex()[:16])
    return Reputation(scores=dict(sorted(scores.items())), refused=refused)


def job_value_max(score: Score | None) -> int:
    """The largest job value (lamports) to offer a peer with this record: a
    new or penalised identity gets ``job_value_base``; a record lets it grow
    by ``job_value_growth`` times its worker score."""
    worker = score.worker if score is not None else 0
    return job_value_base + job_value_growth * max(0, worker)
