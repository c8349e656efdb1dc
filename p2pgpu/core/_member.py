"""A member's side of a running job: its proof, its co-signatures, and getting them to the submitter.

When a member's part of a job ends, :func:`member_proof` turns what the
driver measured (start, end, exit status, output digest, the checkpoint
chain, its GPUs) into the signed work proof, with the rules every driver
must apply alike: the claim ends where the other members could still vouch
for it (``Membership.vouched_until_ms``, never before the last checkpoint),
the GPU time is the GPUs times that span capped by the duration limit, a
stopped job's end reason is the cause the host stopped it for, and what the
member expects to earn is that time at its agreed price.

:class:`Deliveries` is the member's outbox to submitters: every signed message
that counts for settlement (outputs list, proof, co-signatures) is handed to
it with ``HandOver`` (the driver stores it, in one transaction with what
goes with it, before anything is sent), sent, and resent 1, 2, 4, 8 and then
every 15 s until the submitter acknowledges it with a signed ``proof_ack``
(``core._settlement.ProofAck``) or an hour has passed.  An ack only counts
from the submitter the message went to.

:func:`interrupted_proof` and :func:`interrupted_cosigns` are what a member
signs after its node died mid-job, from the progress it had stored: the time
served up to its last checkpoint, and what it had seen of the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._actions import Action, CancelTimer, DeliveryDone, Emit, HandOver, Send, SetTimer, TimerKey, TimerOwner
from ._envelope import Kind, seal
from ._errors import LocalProtocolError, PeerMisbehaved, Reason
from ._identity import Identity
from ._proof import (
    END_REASONS,
    Checkpoint,
    Cosign,
    Proof,
    SignedCosign,
    SignedProof,
    chain_heads,
    sign_cosign,
    sign_proof,
)
from ._settlement import ProofAck, item_hash

#: The exit status an interrupted or stopped member reports (killed, as by SIGKILL).
killed_exit_code = 137
#: Result lines named in one outputs list at most.
outputs_listed_max = 200


@dataclass(frozen=True, kw_only=True, slots=True)
class MemberConfig:
    """How members watch each other and hand their work to the submitter.
    Both drivers use these (``tests/sim/test_defaults.py`` keeps the
    simulator's equal to the node's)."""

    heartbeat_interval_ms: int = 500
    member_timeout_ms: int = 3_000
    start_grace_ms: int = 2_000
    #: After our part ends, how long we keep watching members that still run
    #: (our co-signatures vouch for their time), at most.
    watch_after_end_ms_max: int = 120_000
    resend_interval_ms_min: int = 1_000
    resend_interval_ms_max: int = 15_000
    resend_ttl_ms: int = 3_600_000
    #: Messages waiting for an acknowledgement at once.
    pending_max: int = 10_000


DEFAULT_MEMBER = MemberConfig()


# -- the proof ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class PartEnded:
    """What the driver measured of this member's part of a job."""

    started_at_ms: int
    ended_at_ms: int
    exit_code: int
    #: The runtime's end reason (``exited``, ``time_limit``, ...); ignored when
    #: ``stopped`` (the cause the job was stopped for is used).
    end_reason: str
    #: The runtime was stopped by a ``StopJob`` (the job did not end by itself).
    stopped: bool = False
    output_digest: bytes = b""
    gpus: tuple[str, ...] = ()
    checkpoints: tuple[Checkpoint, ...] = ()
    #: The member's output files, as listed to the submitter.
    outputs: tuple[dict[str, Any], ...] = ()


def member_proof(identity: Identity, *, job_id: str, cert_hash: bytes, part: PartEnded, duration_ms_max: int,
                 stop_cause: str = "", vouched_until_ms: int | None = None) -> SignedProof:
    """The signed proof of one member's part (see the module doc for the rules)."""
    cps = part.checkpoints
    started = part.started_at_ms
    ended = max(part.ended_at_ms, started)
    if vouched_until_ms is not None:
        # Cut off from every other member: nobody vouches for time after the last contact.
        ended = max(started, min(ended, vouched_until_ms))
    if cps:
        ended = max(ended, cps[-1].t_ms)
    if part.stopped:
        end_reason, exit_code = stop_cause or "cancelled", killed_exit_code
    else:
        end_reason, exit_code = part.end_reason, min(255, max(0, part.exit_code))
    if end_reason not in END_REASONS:
        end_reason = "sandbox_error"
    gpus = part.gpus or ("simulated",)
    heads = chain_heads(job_id, cert_hash, identity.peer_id, cps)
    return sign_proof(identity, Proof(
        job_id=job_id, cert_hash=cert_hash, peer_id=identity.peer_id, gpus=gpus, started_at_ms=started,
        ended_at_ms=ended, gpu_ms=len(gpus) * min(ended - started, duration_ms_max), exit_code=exit_code,
        end_reason=end_reason, output_digest=part.output_digest, checkpoints=cps, chain_head=heads[-1]))


def outputs_wire(identity: Identity, job_id: str, proof: SignedProof, outputs: Sequence[dict[str, Any]]) -> bytes:
    """The member's outputs list to the submitter (``Kind.RESULT``, ``type = "outputs"``)."""
    p = proof.proof
    return seal(identity, Kind.RESULT, {
        "type": "outputs", "job_id": job_id, "peer_id": identity.peer_id,
        "outputs": list(outputs[:outputs_listed_max]), "exit_code": p.exit_code,
        "end_reason": p.end_reason}).to_bytes()


def expected_earning(proof: SignedProof, price_per_gpu_hour: int) -> int:
    return proof.proof.gpu_ms * max(0, price_per_gpu_hour) // 3_600_000


def interrupted_proof(identity: Identity, run: dict[str, Any], *, duration_ms_max: int | None = None) -> SignedProof:
    """The proof a member signs after dying mid-job: from its start to its
    last stored checkpoint (no further: nobody saw a later head), end reason
    ``interrupted``, no output.  Its co-signers heard its heartbeats at least
    until that checkpoint, so it stays within what they observed."""
    cps = tuple(Checkpoint(t_ms=t, info=i) for t, i in run["checkpoints"])
    started = run["started_at_ms"]
    ended = max(started, cps[-1].t_ms if cps else started)
    served = ended - started if duration_ms_max is None else min(ended - started, duration_ms_max)
    heads = chain_heads(run["job_id"], run["cert_hash"], identity.peer_id, cps)
    return sign_proof(identity, Proof(
        job_id=run["job_id"], cert_hash=run["cert_hash"], peer_id=identity.peer_id, gpus=tuple(run["gpus"]),
        started_at_ms=started, ended_at_ms=ended, gpu_ms=len(run["gpus"]) * served,
        exit_code=killed_exit_code, end_reason="interrupted", output_digest=b"", checkpoints=cps,
        chain_head=heads[-1]))


def interrupted_cosigns(identity: Identity, run: dict[str, Any]) -> list[SignedCosign]:
    """Co-signatures of what a member had seen of the others when it last
    stored its progress (in member order)."""
    out = []
    for peer in run["members"]:
        seen = run["observed"].get(peer)
        if peer == identity.peer_id or seen is None:
            continue
        first, last, count, head = seen
        out.append(sign_cosign(identity, Cosign(
            job_id=run["job_id"], cert_hash=run["cert_hash"], subject=peer, observer=identity.peer_id,
            first_seen_ms=first, last_seen_ms=last, heartbeats=count, last_chain_head=bytes.fromhex(head))))
    return out


# -- the outbox to submitters ----------------------------------------------------------


@dataclass
class Delivery:
    """One signed message to a submitter, resent until acknowledged."""

    item_hash: bytes
    job_id: str
    dest: str
    kind: str
    wire: bytes
    created_ms: int
    attempts: int = 0
    next_ms: int = 0


def resend_key(job_id: str) -> TimerKey:
    return TimerKey(TimerOwner.DELIVERY, job_id, "resend")


class Deliveries:
    """The member's messages to submitters that wait for an acknowledgement."""

    def __init__(self, config: MemberConfig = DEFAULT_MEMBER) -> None:
        self.config = config
        self.by_job: dict[str, dict[bytes, Delivery]] = {}
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def pending(self, job_id: str) -> list[Delivery]:
        return list(self.by_job.get(job_id, {}).values())

    def hand_over(self, job_id: str, dest: str, items: list[tuple[str, bytes]], now_ms: int, *,
                  earning: tuple[bytes, int, str] | None = None, proof_signed: bool = False,
                  cosigned: bool = False, observed: dict[str, list[Any]] | None = None,
                  send_now: bool = True) -> list[Action]:
        """``HandOver`` (store these, and what goes with them, in one
        transaction), then send each now (``send_now``) and resend until
        acknowledged."""
        actions: list[Action] = [HandOver(job_id=job_id, dest=dest, items=tuple(items), earning=earning,
                                          proof_signed=proof_signed, cosigned=cosigned, observed=observed)]
        for kind, wire in items:
            d = Delivery(item_hash=item_hash(wire), job_id=job_id, dest=dest, kind=kind, wire=wire,
                         created_ms=now_ms, next_ms=now_ms)
            actions += self._track(d, now_ms, send_now)
        return actions + self._schedule(job_id)

    def restore(self, deliveries: list[Delivery], now_ms: int) -> list[Action]:
        """After a restart: the deliveries stored and not yet acknowledged go
        out again when the timers run."""
        jobs: dict[str, None] = {}
        actions: list[Action] = []
        for d in deliveries:
            d.next_ms = now_ms
            actions += self._track(d, now_ms, send_now=False)
            jobs[d.job_id] = None
        for job_id in sorted(jobs):
            actions += self._schedule(job_id)
        return actions

    def _track(self, d: Delivery, now_ms: int, send_now: bool) -> list[Action]:
        mine = self.by_job.get(d.job_id, {})
        if d.item_hash in mine or self.count >= self.config.pending_max:
            return [Emit("exec:deliveries_not_tracked"), *([Send(d.dest, d.wire)] if send_now else [])]
        self.by_job.setdefault(d.job_id, {})[d.item_hash] = d
        self.count += 1
        return self._send(d, now_ms) if send_now else []

    def _send(self, d: Delivery, now_ms: int) -> list[Action]:
        d.attempts += 1
        cfg = self.config
        d.next_ms = now_ms + min(cfg.resend_interval_ms_max, cfg.resend_interval_ms_min << min(d.attempts - 1, 16))
        return [*([Emit("exec:resent")] if d.attempts > 1 else []), Send(d.dest, d.wire)]

    def _schedule(self, job_id: str) -> list[Action]:
        mine = self.by_job.get(job_id)
        if not mine:
            return [CancelTimer(resend_key(job_id))]
        return [SetTimer(resend_key(job_id), min(d.next_ms for d in mine.values()))]

    def _done(self, d: Delivery, status: str) -> list[Action]:
        mine = self.by_job.get(d.job_id, {})
        if mine.pop(d.item_hash, None) is not None:
            self.count -= 1
        if not mine:
            self.by_job.pop(d.job_id, None)
        return [Emit(f"exec:delivery_{status}"), DeliveryDone(d.job_id, d.item_hash, status)]

    def on_timer(self, key: TimerKey, now_ms: int) -> list[Action]:
        if key.owner is not TimerOwner.DELIVERY:
            raise LocalProtocolError(f"not a delivery timer: {key}")
        actions: list[Action] = []
        for d in [d for d in self.pending(key.job_id) if d.next_ms <= now_ms]:
            if now_ms - d.created_ms > self.config.resend_ttl_ms:
                actions += [Emit("exec:delivery_given_up")] + self._done(d, "expired")
            else:
                actions += self._send(d, now_ms)
        return actions + self._schedule(key.job_id)

    def on_ack(self, body: dict[str, Any], signer: str) -> list[Action]:
        """The submitter acknowledged messages we sent it.  Only the peer a
        message went to may acknowledge it (``PeerMisbehaved`` otherwise)."""
        ack = ProofAck.from_body(body, signer)
        mine = self.by_job.get(ack.job_id, {})
        actions: list[Action] = []
        for h in ack.items:
            d = mine.get(h)
            if d is None:
                continue
            if d.dest != signer:
                raise PeerMisbehaved(Reason.NOT_A_MEMBER, "proof_ack from someone who did not submit that job")
            actions += self._done(d, ack.status)
        if not actions:
            return [Emit("exec:ack_nothing_pending")]  # a repeated ack: our resend crossed it
        return actions + self._schedule(ack.job_id)
