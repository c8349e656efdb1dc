"""The submitter's side of execution: logs, outputs, proofs, verdicts, payouts.

For each confirmed job a :class:`Collection` gathers what the members send:
log batches, their output lists, their signed proofs and the co-signatures
other members made of them.  It settles the job when every member's proof
and the co-signatures of every other finished member are in, or at a
deadline (the duration limit plus a grace period after confirmation, so a
member that died does not hold the job up).  Settling verifies each proof
(``verify_proof``, with the submitter's own window of each member: from
its confirmation to the arrival of that member's results, which bounds
every claim whatever the cluster size), applies the replica quorum and
computes what is owed
(``owed``), then writes each proof's verdict and what it owes in ONE SQLite
transaction (``record_proof`` + ``record_owed``): a crash can lose neither
half alone, and a proof is never owed twice.

The collection survives ``kill -9`` of the submitter (docs/state.md, "Results
across restarts"): the certificate is stored when the job is confirmed, and
every proof, co-signature and outputs list is stored (its signed bytes) before
the submitter answers it with a signed ``proof_ack`` (a ``Kind.RESULT`` body).
Members resend what was not acknowledged (``_runner.py``), so what they sent
while the submitter was down arrives after its restart, when :meth:`reopen`
has rebuilt every unsettled collection with its settle deadline.  The
``settled`` flag is written in the settlement's own transaction.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from p2pgpu.core import (
    Identity,
    Kind,
    LocalProtocolError,
    PeerMisbehaved,
    Reason,
    body_of,
    decode,
    encode,
    envelope_from_obj,
    seal,
)
from p2pgpu.core._formation_messages import Certificate
from p2pgpu.core._manifest import SignedManifest
from p2pgpu.core._proof import (
    ProofRejected,
    ProofTerms,
    SignedProof,
    Window,
    decode_cosign,
    decode_proof,
    owed,
    verify_proof,
)

if TYPE_CHECKING:
    from ._jobs import JobsService

log = logging.getLogger("p2pgpu.collect")

logs_kept_max = 50_000
settle_grace_ms = 30_000
cosign_wait_ms = 8_000
#: After a restart, how long an unsettled collection waits at least for the
#: members' resends (their backoff is at most ``resend_interval_ms_max``).
reopen_grace_ms = 25_000
ack_items_max = 64
ACK_STATUSES = ("recorded", "late", "ignored")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def item_hash(wire: bytes) -> bytes:
    """What an acknowledgement names: sha256 of the signed message's bytes
    (canonical, and Ed25519 signatures are deterministic, so a resent
    message has the same hash)."""
    return hashlib.sha256(wire).digest()


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


@dataclass
class Collection:
    sm: SignedManifest
    cert: Certificate
    confirmed_at_ms: int
    proofs: dict[str, SignedProof] = field(default_factory=dict)
    cosigns: dict[tuple[str, str], bytes] = field(default_factory=dict)  # (observer, subject) -> wire
    outputs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    logs: list[dict[str, Any]] = field(default_factory=list)
    log_seqs: dict[str, int] = field(default_factory=dict)
    settled: bool = False
    #: item hash -> kind of every proof, co-signature and outputs list taken.
    items: dict[bytes, str] = field(default_factory=dict)
    #: Each member's payout address from its advert at confirmation.
    payout_addresses: dict[str, str] = field(default_factory=dict)
    #: When each member's results (its proof or outputs list, whichever came
    #: first) reached us, on our clock: the end of the window its claim must
    #: fit in (``core.Window``).
    results_at_ms: dict[str, int] = field(default_factory=dict)

    @property
    def job_id(self) -> str:
        return self.sm.job_id

    def complete(self) -> bool:
        members = list(self.cert.members)
        if any(m not in self.proofs for m in members):
            return False
        for subject in members:
            for observer in members:
                if observer != subject and (observer, subject) not in self.cosigns:
                    return False
        return True


class Collector:
    def __init__(self, jobs: JobsService) -> None:
        self.jobs = jobs
        self.collections: dict[str, Collection] = {}

    def open(self, sm: SignedManifest, cert: Certificate, now_ms: int) -> None:
        if sm.job_id in self.collections:
            return
        c = Collection(sm=sm, cert=cert, confirmed_at_ms=now_ms,
                       payout_addresses={m: self.jobs._payout_address_of(m) for m in cert.members})
        self.collections[sm.job_id] = c
        deadline = now_ms + sm.manifest.duration_s_max * 1000 + settle_grace_ms
        if self.jobs.db is not None:
            from p2pgpu.store import save_collection  # noqa: PLC0415

            save_collection(self.jobs.db, job_id=sm.job_id, certificate=encode(cert.to_obj()),
                            members=list(cert.members), payout_addresses=c.payout_addresses,
                            confirmed_at_ms=now_ms, deadline_ms=deadline)
        self.jobs.timers.set(f"x/{sm.job_id}/settle", deadline)

    def reopen(self, now_ms: int) -> int:
        """After a restart: rebuild every unsettled collection from the store,
        with its settle deadline (at least ``reopen_grace_ms`` away, so the
        members' resends have time to arrive).  Returns how many reopened."""
        if self.jobs.db is None:
            return 0
        from p2pgpu.store import open_collections  # noqa: PLC0415

        reopened = 0
        for row in open_collections(self.jobs.db):
            rec = self.jobs.records.get(row["job_id"])
            if rec is None or row["job_id"] in self.collections:
                continue
            try:
                cert = Certificate.from_obj(decode(row["certificate"], size_max=Kind.CERTIFICATE.bytes_max))
            except PeerMisbehaved as exc:
                log.warning("stored certificate of %s does not verify: %s", row["job_id"][:12], exc)
                continue
            c = Collection(sm=rec.manifest, cert=cert, confirmed_at_ms=row["confirmed_at_ms"],
                           payout_addresses=dict(row["payout_addresses"]))
            for item in row["items"]:
                try:
                    self._replay(c, item["kind"], item["sender"], item["wire"], item.get("received_ms", now_ms))
                except PeerMisbehaved as exc:  # stored by us, so only a bug gets here
                    log.warning("stored %s of %s refused: %s", item["kind"], row["job_id"][:12], exc)
            try:
                self._replay_logs(c)
            except PeerMisbehaved as exc:
                log.warning("stored logs of %s refused: %s", row["job_id"][:12], exc)
            self.collections[c.job_id] = c
            if rec.state == "interrupted":
                rec.state, rec.reason = "confirmed", ""
            self.jobs.counts["collections_reopened"] += 1
            reopened += 1
            at = now_ms if c.complete() else max(row["deadline_ms"], now_ms + reopen_grace_ms)
            self.jobs.timers.set(f"x/{c.job_id}/settle", at)
        return reopened

    def _replay(self, c: Collection, kind: str, sender: str, wire: bytes, received_ms: int) -> None:
        if kind in ("proof", "outputs"):
            c.results_at_ms.setdefault(sender, received_ms)
        if kind == "proof":
            sp = decode_proof(wire)
            self._add_proof(c, sp)
        elif kind == "cosign":
            self._add_cosign(c, wire)
        elif kind == "outputs":
            body = body_of(envelope_from_obj(decode(wire, size_max=Kind.RESULT.bytes_max + 1024, canonical=True),
                                             expected=Kind.RESULT))
            self._add_outputs(c, sender, body)
        c.items[item_hash(wire)] = kind

    def on_timer(self, key: str, now_ms: int) -> None:
        parts = key.split("/")
        c = self.collections.get(parts[1]) if len(parts) == 3 else None
        if c is not None and not c.settled:
            self.settle(c, now_ms)

    # ------------------------------------------------------------ inbound

    def _collection(self, job_id: str, sender: str) -> Collection:
        c = self.collections.get(job_id)
        if c is None:
            raise PeerMisbehaved(Reason.UNKNOWN_JOB, f"no confirmed job {job_id[:12]} here")
        if sender not in c.cert.members:
            raise PeerMisbehaved(Reason.NOT_A_MEMBER, f"{sender[:16]} is not a member of {job_id[:12]}")
        return c

    def on_result(self, body: dict[str, Any], signer: str, data: bytes = b"") -> None:
        job_id = body.get("job_id")
        if not isinstance(job_id, str) or body.get("peer_id") != signer:
            raise PeerMisbehaved(Reason.BAD_SCHEMA, "result without job_id, or not signed by its peer")
        kind = body.get("type")
        if kind == "outputs":
            self._take(job_id, signer, "outputs", data, lambda c: self._add_outputs(c, signer, body))
            return
        c = self._collection(job_id, signer)
        if kind == "log":
            kept = len(c.logs)
            if self._add_logs(c, signer, body) and data and self.jobs.db is not None and kept < logs_kept_max:
                # Stored as received (signed), so `job logs` answers after a restart too.
                from p2pgpu.store import add_log_batch  # noqa: PLC0415

                add_log_batch(self.jobs.db, job_id=job_id, member=signer, seq=body["seq"],
                              lines=len(c.logs) - kept, wire=data, now_ms=self.jobs.node.now_ms())

    @staticmethod
    def _add_logs(c: Collection, signer: str, body: dict[str, Any]) -> bool:
        seq = body.get("seq")
        lines = body.get("lines")
        if type(seq) is not int or not isinstance(lines, list) or seq <= c.log_seqs.get(signer, 0):
            return False  # an old or repeated batch
        c.log_seqs[signer] = seq
        member_index = list(c.cert.members).index(signer)
        for item in lines[:1000]:
            if len(c.logs) >= logs_kept_max:
                break
            if isinstance(item, list) and len(item) == 3 and isinstance(item[2], str):
                c.logs.append({"t_ms": item[0], "stream": str(item[1]), "line": item[2],
                               "member": signer, "member_index": member_index})
        return True

    def stored_logs(self, job_id: str) -> list[dict[str, Any]] | None:
        """The logs of a job collected here before a restart (``None`` if none
        are stored): rebuilt from the stored signed batches."""
        if self.jobs.db is None:
            return None
        from p2pgpu.store import collection_row  # noqa: PLC0415

        row = collection_row(self.jobs.db, job_id)
        rec = self.jobs.records.get(job_id)
        if row is None or rec is None:
            return None
        try:
            cert = Certificate.from_obj(decode(row["certificate"], size_max=Kind.CERTIFICATE.bytes_max))
        except PeerMisbehaved:
            return None
        c = Collection(sm=rec.manifest, cert=cert, confirmed_at_ms=row["confirmed_at_ms"])
        self._replay_logs(c)
        return c.logs

    def _replay_logs(self, c: Collection) -> None:
        from p2pgpu.store import log_batches  # noqa: PLC0415

        for wire in log_batches(self.jobs.db, c.job_id):
            env = envelope_from_obj(decode(wire, size_max=Kind.RESULT.bytes_max + 1024, canonical=True),
                                    expected=Kind.RESULT)
            if env.signer_peer_id in c.cert.members:
                self._add_logs(c, env.signer_peer_id, body_of(env))

    def on_proof(self, data: bytes) -> None:
        sp = decode_proof(data)
        self._take(sp.proof.job_id, sp.proof.peer_id, "proof", data, lambda c: self._add_proof(c, sp))

    def on_cosign(self, data: bytes) -> None:
        sc = decode_cosign(data)
        self._take(sc.cosign.job_id, sc.cosign.observer, "cosign", data, lambda c: self._add_cosign(c, data))

    @staticmethod
    def _add_proof(c: Collection, sp: SignedProof) -> bool:
        if sp.proof.peer_id in c.proofs:
            return False  # one proof per member counts: the first
        c.proofs[sp.proof.peer_id] = sp
        return True

    @staticmethod
    def _add_cosign(c: Collection, data: bytes) -> bool:
        sc = decode_cosign(data)
        key = (sc.cosign.observer, sc.cosign.subject)
        if key in c.cosigns:
            return False
        c.cosigns[key] = data
        return True

    @staticmethod
    def _add_outputs(c: Collection, sender: str, body: dict[str, Any]) -> bool:
        outs = body.get("outputs")
        if not isinstance(outs, list) or sender in c.outputs:
            return False
        c.outputs[sender] = [o for o in outs[:1000] if isinstance(o, dict)]
        return True

    def _take(self, job_id: str, sender: str, kind: str, data: bytes, add: Callable[[Collection], bool]) -> None:
        """Take one signed message from a member: store it, then acknowledge
        it (an ack means "stored"), then see whether the job can settle."""
        if not data:
            raise LocalProtocolError("a member's message is taken with its signed bytes")
        h = item_hash(data)
        c = self.collections.get(job_id)
        if c is None:
            self._ack_stored(job_id, sender, h)
            return
        if sender not in c.cert.members:
            raise PeerMisbehaved(Reason.NOT_A_MEMBER, f"{sender[:16]} is not a member of {job_id[:12]}")
        taken = False
        if h in c.items:
            status = "recorded"
        elif c.settled:
            status = "late"
        elif add(c):
            c.items[h] = kind
            if kind in ("proof", "outputs"):
                c.results_at_ms.setdefault(sender, self.jobs.node.now_ms())
            if self.jobs.db is not None:
                from p2pgpu.store import add_collection_item  # noqa: PLC0415

                add_collection_item(self.jobs.db, job_id=job_id, item_hash=h, kind=kind, sender=sender, wire=data,
                                    now_ms=self.jobs.node.now_ms())
            status, taken = "recorded", True
        else:
            status = "ignored"
        self._ack(sender, job_id, h, status)
        if taken:
            self._maybe_settle(c)

    def _ack_stored(self, job_id: str, sender: str, h: bytes) -> None:
        """A message for a job not open here: acknowledge it if the job was
        ours and is settled (its member resends until told), else refuse it."""
        from p2pgpu.store import collection_row, has_collection_item  # noqa: PLC0415

        row = collection_row(self.jobs.db, job_id) if self.jobs.db is not None else None
        if row is None:
            raise PeerMisbehaved(Reason.UNKNOWN_JOB, f"no confirmed job {job_id[:12]} here")
        if sender not in row["members"]:
            raise PeerMisbehaved(Reason.NOT_A_MEMBER, f"{sender[:16]} is not a member of {job_id[:12]}")
        stored = has_collection_item(self.jobs.db, job_id, h)
        self._ack(sender, job_id, h, "recorded" if stored else "late")

    def _ack(self, member: str, job_id: str, h: bytes, status: str) -> None:
        self.jobs.counts[f"collect:ack_{status}"] += 1
        self.jobs.send(member, ack_wire(self.jobs.node.identity, job_id, [h], status))

    def _maybe_settle(self, c: Collection) -> None:
        now = self.jobs.node.now_ms()
        if c.complete():
            self.settle(c, now)
        elif len(c.proofs) == len(c.cert.members) or any(
                sp.proof.end_reason in ("job_failed", "member_lost", "cancelled") for sp in c.proofs.values()):
            # Every proof is in, or the job was stopped (a member lost or the
            # job cancelled): give the co-signatures a little longer, then
            # settle without waiting for proofs that will never come.
            self.jobs.timers.set(f"x/{c.job_id}/settle", now + cosign_wait_ms)

    # ------------------------------------------------------------- settle

    def settle(self, c: Collection, now_ms: int) -> None:
        c.settled = True
        self.jobs.timers.cancel(f"x/{c.job_id}/settle")
        terms = ProofTerms.from_manifest(c.sm)
        all_cosigns = list(c.cosigns.values())
        verified, verdicts = [], {}
        for peer in c.cert.members:
            sp = c.proofs.get(peer)
            if sp is None:
                continue
            window = Window(confirmed_at_ms=c.confirmed_at_ms, results_at_ms=c.results_at_ms.get(peer, now_ms))
            try:
                verified.append(verify_proof(sp, cert=c.cert, terms=terms, cosigns=all_cosigns, window=window))
            except ProofRejected as exc:
                verdicts[peer] = ("rejected", f"{exc.fault.name.lower()}: {exc.detail}")
        prices = {a.peer_id: a.price_per_gpu_hour for a in c.cert.accepts}
        rows = owed(verified, terms=terms, prices=prices)
        self.jobs.store_settlement(c, rows, verdicts)

    def store_settled(self, c: Collection, now_ms: int) -> None:
        """Inside the settlement's transaction: this collection never reopens."""
        if self.jobs.db is not None:
            from p2pgpu.store import mark_collection_settled  # noqa: PLC0415

            mark_collection_settled(self.jobs.db, c.job_id, now_ms=now_ms)
