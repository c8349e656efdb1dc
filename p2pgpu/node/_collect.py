"""The submitter's side of execution: logs, outputs, proofs, verdicts, payouts.

For each confirmed job a :class:`Collection` gathers what the members send:
log batches, their output lists, their signed proofs and the co-signatures
other members made of them.  It settles the job when every member's proof
and the co-signatures of every other finished member are in, or at a
deadline (the duration limit plus a grace period after confirmation, so a
member that died does not hold the job up).  Settling verifies each proof
(``verify_proof``), applies the replica quorum and computes what is owed
(``owed``), then writes each proof's verdict and what it owes in ONE SQLite
transaction (``record_proof`` + ``record_owed``): a crash can lose neither
half alone, and a proof is never owed twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from p2pgpu.core import PeerMisbehaved, Reason
from p2pgpu.core._formation_messages import Certificate
from p2pgpu.core._manifest import SignedManifest
from p2pgpu.core._proof import ProofRejected, ProofTerms, SignedProof, decode_cosign, decode_proof, owed, verify_proof

if TYPE_CHECKING:
    from ._jobs import JobsService

log = logging.getLogger("p2pgpu.collect")

logs_kept_max = 50_000
settle_grace_ms = 30_000
cosign_wait_ms = 8_000


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
    def __init__(self, jobs: "JobsService") -> None:
        self.jobs = jobs
        self.collections: dict[str, Collection] = {}

    def open(self, sm: SignedManifest, cert: Certificate, now_ms: int) -> None:
        if sm.job_id in self.collections:
            return
        c = Collection(sm=sm, cert=cert, confirmed_at_ms=now_ms)
        self.collections[sm.job_id] = c
        deadline = now_ms + sm.manifest.duration_s_max * 1000 + settle_grace_ms
        self.jobs.timers.set(f"x/{sm.job_id}/settle", deadline)

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

    def on_result(self, body: dict[str, Any], signer: str) -> None:
        job_id = body.get("job_id")
        if not isinstance(job_id, str) or body.get("peer_id") != signer:
            raise PeerMisbehaved(Reason.BAD_SCHEMA, "result without job_id, or not signed by its peer")
        c = self._collection(job_id, signer)
        kind = body.get("type")
        if kind == "log":
            seq = body.get("seq")
            lines = body.get("lines")
            if type(seq) is not int or not isinstance(lines, list) or seq <= c.log_seqs.get(signer, 0):
                return  # an old or repeated batch
            c.log_seqs[signer] = seq
            member_index = list(c.cert.members).index(signer)
            for item in lines[:1000]:
                if len(c.logs) >= logs_kept_max:
                    break
                if isinstance(item, list) and len(item) == 3 and isinstance(item[2], str):
                    c.logs.append({"t_ms": item[0], "stream": str(item[1]), "line": item[2],
                                   "member": signer, "member_index": member_index})
        elif kind == "outputs":
            outs = body.get("outputs")
            if isinstance(outs, list):
                c.outputs[signer] = [o for o in outs[:1000] if isinstance(o, dict)]

    def on_proof(self, data: bytes) -> None:
        sp = decode_proof(data)
        c = self._collection(sp.proof.job_id, sp.proof.peer_id)
        if not c.settled and sp.proof.peer_id not in c.proofs:
            c.proofs[sp.proof.peer_id] = sp
            self._maybe_settle(c)

    def on_cosign(self, data: bytes) -> None:
        sc = decode_cosign(data)
        c = self._collection(sc.cosign.job_id, sc.cosign.observer)
        key = (sc.cosign.observer, sc.cosign.subject)
        if not c.settled and key not in c.cosigns:
            c.cosigns[key] = data
            self._maybe_settle(c)

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
            try:
                verified.append(verify_proof(sp, cert=c.cert, terms=terms, cosigns=all_cosigns))
            except ProofRejected as exc:
                verdicts[peer] = ("rejected", f"{exc.fault.name.lower()}: {exc.detail}")
        prices = {a.peer_id: a.price_per_gpu_hour for a in c.cert.accepts}
        rows = owed(verified, terms=terms, prices=prices)
        self.jobs.store_settlement(c, rows, verdicts)

