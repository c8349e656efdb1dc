"""Settlement, the submitter's side of a running job: collect, verify, decide what is owed.

For each confirmed job the submitter opens a :class:`Collection`: the
members' signed proofs, the co-signatures other members made of them, their
output lists and log batches.  :class:`Settlement` takes each of these from
its member (a stranger's, or one for another job, is refused), says what the
driver must store before it acknowledges it (``ItemTaken``, then a signed
``proof_ack``), and settles the job when it can:

- when every member's proof and every co-signature between members are in;
- ``cosign_wait_ms`` after every proof is in, or after a proof says the job
  was stopped (``job_failed``, ``member_lost``, ``cancelled``): the
  co-signatures that follow get a moment, proofs that will never come do not
  hold the job up;
- at the deadline (``duration_s_max`` plus ``settle_grace_ms`` after the
  confirmation) whatever is missing.

Settling verifies each proof (:func:`~p2pgpu.core.verify_proof`) against the
certificate, the job's terms, its co-signatures and the submitter's own
window of that member (confirmation to the arrival of its results, which
bounds every claim whatever the cluster size), applies the replica quorum,
computes what is owed (:func:`~p2pgpu.core.owed`, at each member's agreed
price) and the job's outcome with a reason a person can read ("member 1
(12D3KooW...): the command exited with code 3").  It returns one
``Settled`` action that carries all of it: the driver writes it in one
transaction (verdicts, owed rows, the job's record, the collection's
"settled" flag) and pays.

Every member is owed its time served in every outcome (a failed, cancelled
or stopped job included): ``owed`` pays verified proofs for their time,
whatever their exit status.  A member whose every peer went silent (they
crashed, or a partition cut it off from them all) has nobody left to co-sign
its proof; then the submitter's window alone bounds it, as it bounds a lone
member (the co-signature is asked for only of a member that was there to
give one, it co-signed someone, and that this member heard: its own
co-signature of it is in).

After a restart the driver hands back what it stored (:meth:`Settlement.restore`):
the collection is rebuilt from the stored items in the order they came, and
its deadline is at least ``reopen_grace_ms`` away so the members' resends
arrive.  A message for a job with no open collection here asks the driver
to look in its store (``LookupCollection``): a member resends until it is
acknowledged, also after the job settled and was forgotten here.

Like every core: no I/O, no clock; events and ``now_ms`` in, actions out.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._actions import (
    Action,
    CancelTimer,
    CollectionOpened,
    Emit,
    ItemTaken,
    LateLine,
    LogsTaken,
    LookupCollection,
    MemberLine,
    Send,
    SetTimer,
    Settled,
    TimerKey,
    TimerOwner,
)
from ._codec import decode
from ._envelope import Kind, body_of, envelope_from_obj, seal
from ._errors import LocalProtocolError, PeerMisbehaved, Reason
from ._formation_messages import Certificate
from ._identity import Identity, Verifier
from ._manifest import SignedManifest
from ._proof import (
    ProofRejected,
    ProofTerms,
    SignedProof,
    Window,
    decode_cosign,
    decode_proof,
    owed,
    verify_proof,
)

ack_items_max = 64
ACK_STATUSES = ("recorded", "late", "ignored")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
#: Line statuses whose amount is owed (a tie of replicas pays each its time).
PAYABLE = ("owed", "no_quorum")
#: End reasons of a proof that say the job was stopped (no further proofs may come).
STOPPED_REASONS = ("job_failed", "member_lost", "cancelled", "unpaid")

#: What a member's part came to, in words, by its proof's end reason.
END_WORDS = {
    "time_limit": "time limit reached",
    "memory_limit": "memory limit reached",
    "output_limit": "output size limit reached",
    "sandbox_error": "the sandbox failed to run the command",
    "cancelled": "cancelled by the submitter",
    "member_lost": "stopped: another member was lost",
    "job_failed": "stopped: the job failed on another member",
    "interrupted": "the worker restarted in the middle of the job",
    "unpaid": "stopped: the submitter did not pay an interval in time",
}
#: Why a member's proof earned nothing, by its line's status.
STATUS_WORDS = {
    "missing": "sent no proof of its work",
    "rejected": "its proof was refused",
    "outside_quorum": "its output differs from the one the other replicas agreed on",
    "no_quorum": "the replicas did not agree on an output",
    "no_payout_address": "it advertises no payout address",
}


def item_hash(wire: bytes) -> bytes:
    """What an acknowledgement names: sha256 of the signed message's bytes
    (canonical, and Ed25519 signatures are deterministic, so a resent
    message has the same hash)."""
    return hashlib.sha256(wire).digest()


def settle_key(job_id: str) -> TimerKey:
    return TimerKey(TimerOwner.SETTLEMENT, job_id, "settle")


@dataclass(frozen=True, kw_only=True, slots=True)
class ProofAck:
    """The submitter's signed receipt of a member's messages (``Kind.RESULT``,
    ``type = "proof_ack"``): ``recorded`` (stored, it counts), ``late`` (the
    job was settled without it) or ``ignored`` (a second, different message
    where one counts).  Any of them stops the member's resends."""

    job_id: str
    submitter: str
    items: tuple[bytes, ...]
    status: str

    def __post_init__(self) -> None:
        if not _HEX64.match(self.job_id) or not 0 < len(self.submitter) <= 64:
            raise ValueError("job_id must be 64 hex characters, submitter a peer id")
        if not 0 < len(self.items) <= ack_items_max or any(len(h) != 32 for h in self.items):
            raise ValueError(f"1..{ack_items_max} items of 32 bytes")
        if self.status not in ACK_STATUSES:
            raise ValueError(f"status must be one of {', '.join(ACK_STATUSES)}")

    def to_body(self) -> dict[str, Any]:
        return {"type": "proof_ack", "job_id": self.job_id, "peer_id": self.submitter, "items": list(self.items),
                "status": self.status}

    @classmethod
    def from_body(cls, body: Any, signer: str) -> ProofAck:
        """A received ack body, or ``PeerMisbehaved`` (never another exception)."""
        if not isinstance(body, dict) or sorted(body) != ["items", "job_id", "peer_id", "status", "type"]:
            raise PeerMisbehaved(Reason.BAD_SCHEMA, "proof_ack needs exactly type, job_id, peer_id, items, status")
        if body["type"] != "proof_ack" or body["peer_id"] != signer:
            raise PeerMisbehaved(Reason.SIGNER_MISMATCH, "proof_ack not signed by the peer it names")
        items = body["items"]
        if not isinstance(items, list) or not all(isinstance(h, bytes) for h in items):
            raise PeerMisbehaved(Reason.BAD_SCHEMA, "proof_ack items must be a list of hashes")
        try:
            return cls(job_id=body["job_id"] if isinstance(body["job_id"], str) else "", submitter=signer,
                       items=tuple(items), status=body["status"] if isinstance(body["status"], str) else "")
        except ValueError as exc:
            raise PeerMisbehaved(Reason.BAD_SCHEMA, f"proof_ack: {exc}") from None


def ack_wire(identity: Identity, job_id: str, items: list[bytes], status: str) -> bytes:
    return seal(identity, Kind.RESULT, ProofAck(job_id=job_id, submitter=identity.peer_id, items=tuple(items),
                                                status=status).to_body()).to_bytes()


# -- the collection ----------------------------------------------------------------------


@dataclass
class Collection:
    sm: SignedManifest
    cert: Certificate
    confirmed_at_ms: int
    deadline_ms: int
    payout_addresses: dict[str, str] = field(default_factory=dict)
    proofs: dict[str, SignedProof] = field(default_factory=dict)
    cosigns: dict[tuple[str, str], bytes] = field(default_factory=dict)  # (observer, subject) -> wire
    outputs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    log_seqs: dict[str, int] = field(default_factory=dict)
    log_lines: int = 0
    settled: bool = False
    #: item hash -> kind of every proof, co-signature and outputs list taken.
    items: dict[bytes, str] = field(default_factory=dict)
    #: When each member's results (its proof or outputs list, whichever came
    #: first) reached us, on our clock: the end of the window its claim must
    #: fit in (``core.Window``).
    results_at_ms: dict[str, int] = field(default_factory=dict)
    #: Set when the submitter cancelled the job: the outcome says so.
    cancel_reason: str = ""
    #: After settling: the members whose proofs had not come (a late one is
    #: still owed, until the deadline).
    pending_late: dict[str, None] = field(default_factory=dict)

    @property
    def job_id(self) -> str:
        return self.sm.job_id

    def complete(self) -> bool:
        members = self.cert.members
        if any(m not in self.proofs for m in members):
            return False
        return all(observer == subject or (observer, subject) in self.cosigns
                   for subject in members for observer in members)

    def stopped(self) -> bool:
        return len(self.proofs) == len(self.cert.members) or any(
            sp.proof.end_reason in STOPPED_REASONS for sp in self.proofs.values())


@dataclass(frozen=True, kw_only=True, slots=True)
class SettlementConfig:
    """Settle timing and the limits of one collection."""

    #: After ``duration_s_max``, how long the submitter waits for what is missing.
    settle_grace_ms: int = 30_000
    #: After all proofs (or a stopped one), how long it waits for co-signatures.
    cosign_wait_ms: int = 8_000
    #: After a restart, how long an unsettled collection waits at least for the
    #: members' resends (their backoff is at most 15 s).
    reopen_grace_ms: int = 25_000
    #: Log lines kept per job, and per batch.
    log_lines_max: int = 50_000
    log_batch_lines_max: int = 1_000
    log_line_chars_max: int = 4_096
    #: Files named per member's outputs list.
    outputs_max: int = 1_000
    #: Collections open at once (confirmed jobs not yet settled).
    collections_max: int = 4_096
    #: How much a claim may exceed an observation: ``max(tolerance_ms,
    #: observation * tolerance_ppm / 10^6)`` (``ProofTerms``; docs/proofs.md).
    tolerance_ms: int = 1_000
    tolerance_ppm: int = 50_000


DEFAULT_SETTLEMENT = SettlementConfig()


class Settlement:
    """The submitter's collections of the jobs it confirmed (see the module doc)."""

    def __init__(self, identity: Identity, config: SettlementConfig = DEFAULT_SETTLEMENT, *,
                 verify: Verifier | None = None,
                 payout_address_of: Callable[[str], str] | None = None,
                 prepaid: Callable[[str, str], int] | None = None) -> None:
        """``payout_address_of`` finds a member's payout address in the
        driver's advert book (asked at confirmation, and again at settlement
        for a member that had none); ``prepaid(job, member)`` is what was
        already owed to it in installments (pay as you go,
        ``core/_installments.py``): its line pays only the rest."""
        self.identity = identity
        self.config = config
        self.verify = verify
        self.payout_address_of = payout_address_of or (lambda _peer: "")
        self.prepaid = prepaid or (lambda _job, _peer: 0)
        self.collections: dict[str, Collection] = {}
        self._tolerance = {"tolerance_ms": config.tolerance_ms, "tolerance_ppm": config.tolerance_ppm}

    # -- opening and restoring ----------------------------------------------------------

    def open(self, sm: SignedManifest, cert: Certificate, now_ms: int) -> list[Action]:
        """The submitter confirmed ``cert`` for ``sm``: collect what its members send."""
        if sm.job_id in self.collections:
            return []
        self._room()
        addresses = {a.peer_id: self.payout_address_of(a.peer_id) or a.payout_address for a in cert.accepts}
        deadline = now_ms + sm.manifest.duration_s_max * 1000 + self.config.settle_grace_ms
        c = Collection(sm=sm, cert=cert, confirmed_at_ms=now_ms, deadline_ms=deadline, payout_addresses=addresses)
        self.collections[sm.job_id] = c
        return [CollectionOpened(sm.job_id, cert, dict(addresses), now_ms, deadline),
                SetTimer(settle_key(sm.job_id), deadline)]

    def restore(self, sm: SignedManifest, cert: Certificate, *, confirmed_at_ms: int, deadline_ms: int,
                payout_addresses: dict[str, str], items: list[tuple[str, str, bytes, int]],
                now_ms: int) -> list[Action]:
        """After a restart: the collection the driver stored, with its items
        ``(kind, sender, wire, received_ms)`` in the order they came.  Items
        that no longer verify are counted and skipped (we stored them, so only
        a bug gets there)."""
        if sm.job_id in self.collections:
            return []
        self._room()
        c = Collection(sm=sm, cert=cert, confirmed_at_ms=confirmed_at_ms, deadline_ms=deadline_ms,
                       payout_addresses=dict(payout_addresses))
        actions: list[Action] = []
        for kind, sender, wire, received_ms in items:
            try:
                self._replay(c, kind, sender, wire, received_ms)
            except PeerMisbehaved:
                actions.append(Emit("settlement.stored_item_refused"))
        self.collections[sm.job_id] = c
        at = now_ms if c.complete() else max(deadline_ms, now_ms + self.config.reopen_grace_ms)
        return [*actions, Emit("settlement.reopened"), SetTimer(settle_key(sm.job_id), at)]

    def restore_logs(self, job_id: str, wires: list[bytes]) -> list[Action]:
        """After a restart: the log batches stored for an open collection, so
        their sequence numbers are known again (``LogsTaken`` for each, to keep)."""
        c = self.collections.get(job_id)
        if c is None:
            return []
        out: list[Action] = []
        for wire in wires:
            try:
                env = envelope_from_obj(decode(wire, size_max=Kind.RESULT.bytes_max + 1024, canonical=True),
                                        expected=Kind.RESULT, verify=self.verify)
            except PeerMisbehaved:
                continue
            if env.signer_peer_id in c.cert.members:
                taken = self._add_logs(c, env.signer_peer_id, body_of(env), b"")
                if taken is not None:
                    out.append(taken)
        return out

    def _room(self) -> None:
        if len(self.collections) >= self.config.collections_max:
            raise LocalProtocolError(f"more than {self.config.collections_max} collections open")

    def _replay(self, c: Collection, kind: str, sender: str, wire: bytes, received_ms: int) -> None:
        if sender not in c.cert.members:
            raise PeerMisbehaved(Reason.NOT_A_MEMBER, "stored item from a non-member")
        if kind == "proof":
            self._add_proof(c, decode_proof(wire, verify=self.verify))
        elif kind == "cosign":
            self._add_cosign(c, wire)
        elif kind == "outputs":
            env = envelope_from_obj(decode(wire, size_max=Kind.RESULT.bytes_max + 1024, canonical=True),
                                    expected=Kind.RESULT, verify=self.verify)
            self._add_outputs(c, sender, body_of(env))
        if kind in ("proof", "outputs"):
            c.results_at_ms.setdefault(sender, received_ms)
        c.items[item_hash(wire)] = kind

    def note_cancel(self, job_id: str, reason: str) -> None:
        c = self.collections.get(job_id)
        if c is not None and not c.cancel_reason:
            c.cancel_reason = reason

    # -- messages from members ----------------------------------------------------------

    def on_proof(self, data: bytes, now_ms: int) -> list[Action]:
        sp = decode_proof(data, verify=self.verify)
        return self._take(sp.proof.job_id, sp.proof.peer_id, "proof", data, now_ms,
                          lambda c: self._add_proof(c, sp))

    def on_cosign(self, data: bytes, now_ms: int) -> list[Action]:
        sc = decode_cosign(data, verify=self.verify)
        return self._take(sc.cosign.job_id, sc.cosign.observer, "cosign", data, now_ms,
                          lambda c: self._add_cosign(c, data))

    def on_result(self, body: dict[str, Any], signer: str, data: bytes, now_ms: int) -> list[Action]:
        """A member's ``outputs`` list or ``log`` batch (a ``Kind.RESULT`` body)."""
        job_id = body.get("job_id")
        if not isinstance(job_id, str) or body.get("peer_id") != signer:
            raise PeerMisbehaved(Reason.BAD_SCHEMA, "result without job_id, or not signed by its peer")
        kind = body.get("type")
        if kind == "outputs":
            return self._take(job_id, signer, "outputs", data, now_ms, lambda c: self._add_outputs(c, signer, body))
        if kind != "log":
            raise PeerMisbehaved(Reason.BAD_SCHEMA, f"unknown result type {kind!r}")
        c = self._member_of(job_id, signer)
        taken = self._add_logs(c, signer, body, data)
        return [taken] if taken is not None else [Emit("settlement.logs_repeated")]

    def _member_of(self, job_id: str, sender: str) -> Collection:
        c = self.collections.get(job_id)
        if c is None:
            raise PeerMisbehaved(Reason.UNKNOWN_JOB, f"no confirmed job {job_id[:12]} here")
        if sender not in c.cert.members:
            raise PeerMisbehaved(Reason.NOT_A_MEMBER, f"{sender[:16]} is not a member of {job_id[:12]}")
        return c

    def _add_logs(self, c: Collection, signer: str, body: dict[str, Any], wire: bytes) -> LogsTaken | None:
        seq, lines = body.get("seq"), body.get("lines")
        if type(seq) is not int or not isinstance(lines, list) or seq <= c.log_seqs.get(signer, 0):
            return None  # an old or repeated batch
        c.log_seqs[signer] = seq
        cfg = self.config
        kept: list[tuple[int, str, str]] = []
        for item in lines[: cfg.log_batch_lines_max]:
            if c.log_lines + len(kept) >= cfg.log_lines_max:
                break
            if isinstance(item, list) and len(item) == 3 and type(item[0]) is int and isinstance(item[2], str):
                kept.append((item[0], str(item[1])[:16], item[2][: cfg.log_line_chars_max]))
        c.log_lines += len(kept)
        return LogsTaken(c.job_id, signer, c.cert.members.index(signer), seq, tuple(kept), wire)

    @staticmethod
    def _add_proof(c: Collection, sp: SignedProof) -> bool:
        if sp.proof.peer_id in c.proofs:
            return False  # one proof per member counts: the first
        c.proofs[sp.proof.peer_id] = sp
        return True

    def _add_cosign(self, c: Collection, data: bytes) -> bool:
        sc = decode_cosign(data, verify=self.verify)
        key = (sc.cosign.observer, sc.cosign.subject)
        if key in c.cosigns:
            return False
        c.cosigns[key] = data
        return True

    def _add_outputs(self, c: Collection, sender: str, body: dict[str, Any]) -> bool:
        outs = body.get("outputs")
        if not isinstance(outs, list) or sender in c.outputs:
            return False
        c.outputs[sender] = [o for o in outs[: self.config.outputs_max] if isinstance(o, dict)]
        return True

    def _take(self, job_id: str, sender: str, kind: str, data: bytes, now_ms: int,
              add: Callable[[Collection], bool]) -> list[Action]:
        """Take one signed message from a member: store it, then acknowledge
        it (an ack means "stored"), then see whether the job can settle."""
        if not data:
            raise LocalProtocolError("a member's message is taken with its signed bytes")
        h = item_hash(data)
        c = self.collections.get(job_id)
        if c is None:
            return [LookupCollection(job_id, sender, h)]
        if sender not in c.cert.members:
            raise PeerMisbehaved(Reason.NOT_A_MEMBER, f"{sender[:16]} is not a member of {job_id[:12]}")
        actions: list[Action] = []
        late_line = c.settled and sender in c.pending_late and kind == "proof"
        if h in c.items:
            status = "recorded"
        elif c.settled and not (sender in c.pending_late or kind == "cosign" and self._about_pending(c, data)):
            status = "late"
        elif add(c):
            c.items[h] = kind
            if kind in ("proof", "outputs"):
                c.results_at_ms.setdefault(sender, now_ms)
            actions.append(ItemTaken(job_id, h, kind, sender, data, now_ms))
            status = "recorded"
        else:
            status = "ignored"
        actions += self._ack(sender, job_id, h, status)
        if actions and isinstance(actions[0], ItemTaken):
            actions += self._late(c, sender, now_ms) if late_line else self._maybe_settle(c, now_ms)
        return actions

    def _about_pending(self, c: Collection, data: bytes) -> bool:
        """A co-signature of a member whose proof has not come yet (it may still, late)."""
        return decode_cosign(data, verify=self.verify).cosign.subject in c.pending_late

    def stored_ack(self, job_id: str, sender: str, h: bytes, *, members: list[str] | None,
                   stored: bool) -> list[Action]:
        """Answer a ``LookupCollection``: ``members`` of the stored collection
        (``None``: no such job was ever confirmed here) and whether this item
        is among its stored ones.  A member's resend of a settled job is
        acknowledged, so it stops; anyone else's message is refused."""
        if members is None:
            raise PeerMisbehaved(Reason.UNKNOWN_JOB, f"no confirmed job {job_id[:12]} here")
        if sender not in members:
            raise PeerMisbehaved(Reason.NOT_A_MEMBER, f"{sender[:16]} is not a member of {job_id[:12]}")
        return self._ack(sender, job_id, h, "recorded" if stored else "late")

    def _ack(self, member: str, job_id: str, h: bytes, status: str) -> list[Action]:
        return [Emit(f"collect:ack_{status}"), Send(member, ack_wire(self.identity, job_id, [h], status))]

    def _maybe_settle(self, c: Collection, now_ms: int) -> list[Action]:
        if c.settled:
            return []
        if c.complete():
            return self.settle(c.job_id, now_ms)
        if c.stopped():
            # Every proof is in, or the job was stopped (a member lost or the
            # job cancelled): give the co-signatures a little longer, then
            # settle without waiting for proofs that will never come.
            return [SetTimer(settle_key(c.job_id), min(c.deadline_ms, now_ms + self.config.cosign_wait_ms))]
        return []

    def on_timer(self, key: TimerKey, now_ms: int) -> list[Action]:
        if key.owner is not TimerOwner.SETTLEMENT or key.name != "settle":
            raise LocalProtocolError(f"not a settlement timer: {key}")
        c = self.collections.get(key.job_id)
        if c is None:
            return []
        if c.settled:  # the deadline of a job settled early: late proofs are late now
            del self.collections[key.job_id]
            return []
        return self.settle(key.job_id, now_ms)

    # -- settling ------------------------------------------------------------------------

    def settle(self, job_id: str, now_ms: int) -> list[Action]:
        """Verify, decide what is owed and the outcome: one ``Settled``.  Until
        the deadline the collection stays, so a member whose proof was held up
        (a partition between it and us) is still owed its time: ``LateLine``."""
        c = self.collections.get(job_id)
        if c is None or c.settled:
            return []
        c.settled = True
        lines = self._lines(c, now_ms)
        succeeded, reason = outcome(lines, c.sm.manifest.nodes, c.sm.manifest.quorum)
        if c.cancel_reason:
            succeeded, reason = False, c.cancel_reason
        c.pending_late = {ln.peer_id: None for ln in lines if ln.status == "missing"}
        settled = Settled(job_id=job_id, succeeded=succeeded, reason=reason, currency=c.sm.manifest.currency,
                          settled_at_ms=now_ms, lines=tuple(lines),
                          outputs={p: list(o) for p, o in sorted(c.outputs.items())},
                          cancelled=bool(c.cancel_reason))
        refused = sum(1 for ln in lines if ln.status == "rejected")
        verdicts = [Emit("settlement.proofs_refused", refused)] if refused else []
        # Kept until the deadline (late proofs are still owed, late resends
        # acknowledged), then forgotten (on_timer).
        keep = [SetTimer(settle_key(job_id), c.deadline_ms)] if now_ms < c.deadline_ms else []
        if not keep:
            del self.collections[job_id]
        return [CancelTimer(settle_key(job_id)), *keep, *verdicts, Emit("jobs_settled"), settled]

    def _late(self, c: Collection, peer: str, now_ms: int) -> list[Action]:
        """A proof that came after the job settled, but before its deadline: its line."""
        c.pending_late.pop(peer, None)
        line = next(ln for ln in self._lines(c, now_ms) if ln.peer_id == peer)
        return [Emit("settlement.late_lines"), LateLine(c.job_id, c.sm.manifest.currency, line)]

    def _lines(self, c: Collection, now_ms: int) -> list[MemberLine]:
        sm, cert = c.sm, c.cert
        members = list(cert.members)
        # A co-signature is asked for only from members that were there to give
        # one (they co-signed someone) and that this member heard itself (its
        # own co-signature of them): a member whose every peer went silent, or
        # that a partition kept from every member still watching, has nobody
        # left to vouch for it, and the window bounds it alone.  (A watcher it
        # never heard saw nothing of it either: its silence says nothing.)
        watchers = {obs for obs, _subject in c.cosigns}
        verified: dict[str, Any] = {}
        refused: dict[str, tuple[str, str]] = {}
        for peer in members:
            sp = c.proofs.get(peer)
            if sp is None:
                continue
            others = [m for m in members if m != peer and m in watchers and (peer, m) in c.cosigns]
            terms = ProofTerms.from_manifest(sm, cosigns_min=1 if others else 0, **self._tolerance)
            window = Window(confirmed_at_ms=c.confirmed_at_ms, results_at_ms=c.results_at_ms.get(peer, now_ms))
            cosigns = [w for (obs, subj), w in sorted(c.cosigns.items()) if subj == peer]
            try:
                verified[peer] = verify_proof(sp, cert=cert, terms=terms, cosigns=cosigns, window=window,
                                              verify=self.verify)
            except ProofRejected as exc:
                refused[peer] = (exc.fault.name, exc.detail)  # detail: "<fault>: <what>"
        terms = ProofTerms.from_manifest(sm, **self._tolerance)
        prices = {a.peer_id: a.price_per_gpu_hour for a in cert.accepts}
        rows = {r.peer_id: r for r in owed(list(verified.values()), terms=terms, prices=prices)}
        return [self._line(c, i, peer, rows.get(peer), refused.get(peer, ("", "")), verified.get(peer))
                for i, peer in enumerate(members)]

    def _line(self, c: Collection, index: int, peer: str, row: Any, refusal: tuple[str, str],
              vp: Any) -> MemberLine:
        sp = c.proofs.get(peer)
        address = c.payout_addresses.get(peer) or self.payout_address_of(peer)
        prepaid = self.prepaid(c.job_id, peer)
        if sp is None:
            return MemberLine(peer_id=peer, member_index=index, status="missing", amount=0,
                              reason=STATUS_WORDS["missing"], payout_address=address, prepaid=prepaid,
                              cosigns=tuple(w for (_obs, subj), w in sorted(c.cosigns.items()) if subj == peer))
        p = sp.proof
        if row is None:
            status, amount, reason = "rejected", 0, f"{STATUS_WORDS['rejected']} ({refusal[1]})"
        else:
            status, amount = ("owed" if row.status == "paid" else row.status), row.amount
            if status in PAYABLE and amount > 0 and not address:
                status = "no_payout_address"
            reason = part_words(p.end_reason, p.exit_code) if status == "owed" else STATUS_WORDS[status]
            if vp is not None and vp.capped:
                cap = (f"paid for {vp.paid_gpu_ms} of the {p.gpu_ms} GPU-ms it claimed: nobody saw more "
                       "of its work")
                reason = f"{reason}; {cap}" if reason else cap
            if prepaid and status in PAYABLE:
                # Paid as it went: the line owes only what the installments did not cover.
                amount = max(0, amount - prepaid)
        return MemberLine(peer_id=peer, member_index=index, status=status, amount=amount, reason=reason,
                          payout_address=address, proof_hash=sp.proof_hash, proof_wire=sp.wire,
                          cosigns=tuple(w for (_obs, subj), w in sorted(c.cosigns.items()) if subj == peer),
                          gpu_ms=p.gpu_ms, served_ms=p.duration_ms, exit_code=p.exit_code,
                          end_reason=p.end_reason, output_digest=p.output_digest,
                          fault=refusal[0] if row is None else "", prepaid=prepaid)


def part_words(end_reason: str, exit_code: int | None) -> str:
    """How a member's part ended, in words ("" for a clean exit 0)."""
    if end_reason == "exited":
        return "" if exit_code == 0 else f"the command exited with code {exit_code}"
    return END_WORDS.get(end_reason, end_reason or "it ended for no reason it gave")


def outcome(lines: list[MemberLine], nodes: int, quorum: int) -> tuple[bool, str]:
    """Whether the job succeeded, and why not: every rank (``index % nodes``)
    needs ``quorum`` members whose proofs are owed for a clean exit (with one
    replica: every member).  The reason names each member that fell short."""
    good = [0] * nodes
    for line in lines:
        if line.succeeded:
            good[line.member_index % nodes] += 1
    if all(g >= quorum for g in good):
        return True, ""
    bad = [ln for ln in lines if not ln.succeeded]
    return False, "; ".join(f"member {ln.member_index} ({ln.peer_id[:12]}): {ln.reason or ln.status}"
                            for ln in bad)

