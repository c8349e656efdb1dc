"""Cluster membership while a job runs: heartbeats, loss detection, the loss policy.

Every member of a confirmed cluster runs one :class:`Membership` for the job.
It sends a signed heartbeat (``Kind.HEARTBEAT``: job, certificate, sequence
number, state, and the sender's checkpoint chain head) to every other member
each ``heartbeat_interval_ms``, and declares a member *lost* when nothing was
heard from it for longer than ``member_timeout_ms``.  The manifest's
``on_member_loss`` policy then decides: ``fail`` stops the job here and tells
the others (a heartbeat in state ``failed``, which stops them too);
``continue`` carries on with the rest.  A member that has lost every other
member stops whatever the policy (``stop_when_alone``): nobody could vouch for
its further work, so it would not be paid for it.  What each member saw of the others
(first/last heartbeat, count, last chain head) is kept for co-signing their
work proofs (:meth:`Membership.cosigns`).

Like every core it is sans-IO: events (``start``, ``on_heartbeat``,
``on_timer``, ``set_progress``, ``finish``) come in with ``now_ms`` and lists of
actions (``Send``, ``SetTimer``, ``CancelTimer``, ``Emit``, ``MemberLost``,
``StopJob`` from ``_actions``) go out.  A member's status changes only through
:data:`MEMBER_TRANSITIONS`; loss is detected with one timer set at the earliest
deadline, so a silent member is declared lost at ``last_seen + timeout + 1``
exactly, in the simulator as in the node.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from . import _limits as limits
from . import _schema as s
from ._actions import Action, CancelTimer, Emit, MemberLost, Send, SetTimer, StopJob, TimerKey, TimerOwner
from ._codec import decode
from ._envelope import Envelope, Kind, body_of, envelope_from_obj, seal
from ._errors import LocalProtocolError, PeerMisbehaved, Reason
from ._identity import Identity, Verifier
from ._proof import Cosign, SignedCosign, chain_genesis, digest_bytes, sign_cosign

POLICIES = ("fail", "continue")
HEARTBEAT_STATES = ("running", "finished", "failed")
heartbeat_interval_ms_default = 1_000
member_timeout_ms_default = 5_000
start_grace_ms_default = 2_000
clock_skew_ms_max = limits.clock_skew_ms_max
members_max = limits.members_per_cluster_max
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, kw_only=True, slots=True)
class Heartbeat:
    job_id: str
    cert_hash: bytes
    peer_id: str
    seq: int
    sent_at_ms: int
    state: str
    chain_head: bytes
    checkpoints: int

    def __post_init__(self) -> None:
        if not _HEX64.match(self.job_id) or len(self.cert_hash) != digest_bytes:
            raise ValueError("job_id must be 64 hex characters and cert_hash 32 bytes")
        if not 0 < len(self.peer_id) <= 64 or self.state not in HEARTBEAT_STATES:
            raise ValueError(f"peer_id length, or state not one of {', '.join(HEARTBEAT_STATES)}")
        if not 1 <= self.seq <= s.int_max or not 0 <= self.sent_at_ms <= s.int_max:
            raise ValueError("seq starts at 1; sent_at_ms is not negative")
        if len(self.chain_head) != digest_bytes or not 0 <= self.checkpoints <= s.int_max:
            raise ValueError("chain_head is 32 bytes")

    def to_obj(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "cert_hash": self.cert_hash, "peer_id": self.peer_id, "seq": self.seq,
                "sent_at_ms": self.sent_at_ms, "state": self.state, "chain_head": self.chain_head,
                "checkpoints": self.checkpoints}

    @classmethod
    def from_obj(cls, body: dict[str, Any]) -> Heartbeat:
        s.exact_keys(body, {"job_id", "cert_hash", "peer_id", "seq", "sent_at_ms", "state", "chain_head",
                            "checkpoints"})
        try:
            return cls(job_id=s.get_str(body, "job_id", 64, len_min=64),
                       cert_hash=s.get_bytes(body, "cert_hash", 32, len_min=32),
                       peer_id=s.get_str(body, "peer_id", 64, len_min=1), seq=s.get_int(body, "seq", 1),
                       sent_at_ms=s.get_int(body, "sent_at_ms"), state=s.get_str(body, "state", 16),
                       chain_head=s.get_bytes(body, "chain_head", 32, len_min=32),
                       checkpoints=s.get_int(body, "checkpoints"))
        except ValueError as exc:
            raise PeerMisbehaved(Reason.BAD_SCHEMA, str(exc)) from None


@dataclass(frozen=True, slots=True)
class SignedHeartbeat:
    heartbeat: Heartbeat
    envelope: Envelope


def sign_heartbeat(identity: Identity, hb: Heartbeat) -> SignedHeartbeat:
    if hb.peer_id != identity.peer_id:
        raise LocalProtocolError("a heartbeat is signed by its sender")
    return SignedHeartbeat(hb, seal(identity, Kind.HEARTBEAT, hb.to_obj()))


def decode_heartbeat(data: bytes, *, verify: Verifier | None = None) -> SignedHeartbeat:
    """Bytes to a verified heartbeat, or ``PeerMisbehaved`` (never another exception)."""
    env = envelope_from_obj(decode(data, size_max=Kind.HEARTBEAT.bytes_max, canonical=True),
                            expected=Kind.HEARTBEAT, verify=verify)
    hb = Heartbeat.from_obj(body_of(env))
    if env.signer_peer_id != hb.peer_id:
        raise PeerMisbehaved(Reason.SIGNER_MISMATCH, "heartbeat not signed by its sender")
    return SignedHeartbeat(hb, env)


class MemberStatus(str, Enum):
    ALIVE = "alive"
    FINISHED = "finished"
    FAILED = "failed"
    LOST = "lost"


#: (status, event) -> new status.  Events: "heartbeat" (state running),
#: "finished" / "failed" (a heartbeat in that state), "timeout".  A pair not in
#: the table leaves the status as it is: a lost member stays lost (its time
#: after the loss is not vouched for), a finished one stays finished.
MEMBER_TRANSITIONS: dict[tuple[MemberStatus, str], MemberStatus] = {
    (MemberStatus.ALIVE, "heartbeat"): MemberStatus.ALIVE,
    (MemberStatus.ALIVE, "finished"): MemberStatus.FINISHED,
    (MemberStatus.ALIVE, "failed"): MemberStatus.FAILED,
    (MemberStatus.ALIVE, "timeout"): MemberStatus.LOST,
}


@dataclass(slots=True)
class Observation:
    """What this member saw of another one (for co-signing its proof)."""

    status: MemberStatus = MemberStatus.ALIVE
    first_seen_ms: int | None = None
    last_seen_ms: int | None = None
    heartbeats: int = 0
    last_seq: int = 0
    chain_head: bytes = b""
    checkpoints: int = 0


class Membership:
    """One member's view of its cluster during one job (see the module doc)."""

    def __init__(self, *, identity: Identity, job_id: str, cert_hash: bytes, members: Sequence[str],
                 policy: str, heartbeat_interval_ms: int = heartbeat_interval_ms_default,
                 member_timeout_ms: int = member_timeout_ms_default,
                 start_grace_ms: int = start_grace_ms_default, stop_when_alone: bool = True,
                 verify: Verifier | None = None) -> None:
        if identity.peer_id not in members or len(set(members)) != len(members) or len(members) > members_max:
            raise LocalProtocolError("members must be distinct, at most members_max, and include us")
        if policy not in POLICIES:
            raise LocalProtocolError(f"policy must be one of {', '.join(POLICIES)}")
        if not 0 < heartbeat_interval_ms < member_timeout_ms:
            raise LocalProtocolError("need 0 < heartbeat_interval_ms < member_timeout_ms")
        self.identity = identity
        self.job_id = job_id
        self.cert_hash = cert_hash
        self.members = tuple(members)
        self.policy = policy
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.member_timeout_ms = member_timeout_ms
        self.start_grace_ms = start_grace_ms
        self.stop_when_alone = stop_when_alone
        #: Checks heartbeats' signatures (default: the real Ed25519 check).
        self.verify = verify
        self.state = "new"  # new -> running -> finished | failed
        self.started_at_ms = 0
        self.seq = 0
        self.chain_head = chain_genesis(job_id, cert_hash, identity.peer_id)
        self.checkpoints = 0
        self.stop_reason = ""
        self.seen: dict[str, Observation] = {m: Observation() for m in self.members if m != identity.peer_id}
        self._hb_key = TimerKey(TimerOwner.MEMBERSHIP, job_id, "heartbeat")
        self._check_key = TimerKey(TimerOwner.MEMBERSHIP, job_id, "check")

    # --- events -----------------------------------------------------------------

    def start(self, now_ms: int) -> list[Action]:
        """The job started here: first heartbeat now, then every interval."""
        if self.state != "new":
            raise LocalProtocolError("membership already started")
        self.state, self.started_at_ms = "running", now_ms
        failed = next((m for m, o in self.seen.items() if o.status is MemberStatus.FAILED), None)
        if failed is not None:  # it failed the job before we even started
            return self._stop(now_ms, f"member {failed[:16]} failed the job", "job_failed")
        return self._beat(now_ms) + self._schedule_check(now_ms)

    def set_progress(self, chain_head: bytes, checkpoints: int) -> None:
        """The checkpoint chain moved on; the next heartbeats carry its head."""
        if len(chain_head) != digest_bytes or checkpoints < self.checkpoints:
            raise LocalProtocolError("a chain head is 32 bytes and the chain only grows")
        self.chain_head, self.checkpoints = chain_head, checkpoints

    def on_heartbeat(self, data: bytes, now_ms: int) -> list[Action]:
        """A heartbeat arrived.  Raises ``PeerMisbehaved`` for bad input
        (the driver penalises the sender); returns the actions it causes."""
        return self.on_signed_heartbeat(decode_heartbeat(data, verify=self.verify), now_ms)

    def on_signed_heartbeat(self, shb: SignedHeartbeat, now_ms: int) -> list[Action]:
        """A heartbeat already decoded and verified (the host decodes once)."""
        hb = shb.heartbeat
        if hb.job_id != self.job_id or hb.cert_hash != self.cert_hash:
            raise PeerMisbehaved(Reason.UNKNOWN_JOB, "heartbeat for another job or cluster")
        obs = self.seen.get(hb.peer_id)
        if obs is None:
            raise PeerMisbehaved(Reason.NOT_A_MEMBER, f"{hb.peer_id[:16]} is not a member")
        if hb.seq <= obs.last_seq:
            raise PeerMisbehaved(Reason.REPLAYED, f"seq {hb.seq} <= {obs.last_seq}")
        if hb.sent_at_ms > now_ms + clock_skew_ms_max:
            raise PeerMisbehaved(Reason.NOT_YET_VALID, "heartbeat sent in the future")
        if obs.status is not MemberStatus.ALIVE:
            return [Emit("membership_heartbeats_ignored")]
        # Heard before our own part started (the member's confirmation, or its
        # runtime, came first): an observation all the same, which our
        # co-signature vouches for; loss is only judged once we run.
        obs.last_seq = hb.seq
        obs.first_seen_ms = now_ms if obs.first_seen_ms is None else obs.first_seen_ms
        obs.last_seen_ms = now_ms
        obs.heartbeats += 1
        obs.chain_head, obs.checkpoints = hb.chain_head, hb.checkpoints
        event = "heartbeat" if hb.state == "running" else hb.state
        obs.status = MEMBER_TRANSITIONS.get((obs.status, event), obs.status)
        actions: list[Action] = [Emit("membership_heartbeats")]
        if self.state == "new":
            return actions
        if obs.status is MemberStatus.FAILED and self.state == "running":
            actions += self._stop(now_ms, f"member {hb.peer_id[:16]} failed the job", "job_failed")
        return actions + self._maybe_done()

    def on_timer(self, key: TimerKey, now_ms: int) -> list[Action]:
        if key == self._hb_key and self.state == "running":
            return self._beat(now_ms)
        if key == self._check_key:
            return self._check(now_ms)
        return []

    def finish(self, now_ms: int) -> list[Action]:
        """Our part of the job ended: tell the others, stop beating, keep
        watching them (their proofs need our co-signature up to their end)."""
        if self.state != "running":
            return []
        self.state = "finished"
        return self._beat(now_ms, "finished") + [CancelTimer(self._hb_key)] + self._maybe_done()

    def stop_watching(self) -> list[Action]:
        """We are done with this job (co-signatures handed over): no more timers."""
        return [CancelTimer(self._check_key), CancelTimer(self._hb_key)]

    # --- queries -----------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """Nothing left to watch: we stopped and no other member is alive."""
        return self.state in ("finished", "failed") and all(
            o.status is not MemberStatus.ALIVE for o in self.seen.values())

    def alive(self) -> list[str]:
        return [m for m, o in self.seen.items() if o.status is MemberStatus.ALIVE]

    def vouched_until_ms(self) -> int | None:
        """Until when other members can vouch for our work: ``None`` while any
        of them still hears us, else our last contact plus one interval.  A
        member cut off from all others ends its proof's claim there (a longer
        claim would be refused as ``OVER_OBSERVED``)."""
        if not self.seen or any(o.status is not MemberStatus.LOST for o in self.seen.values()):
            return None
        last = max((o.last_seen_ms for o in self.seen.values() if o.last_seen_ms is not None),
                   default=self.started_at_ms)
        return last + self.heartbeat_interval_ms

    def cosign(self, subject: str) -> Cosign | None:
        """What we can vouch for about ``subject`` (None if we never heard it)."""
        o = self.seen.get(subject)
        if o is None or o.first_seen_ms is None or o.last_seen_ms is None:
            return None
        return Cosign(job_id=self.job_id, cert_hash=self.cert_hash, subject=subject,
                      observer=self.identity.peer_id, first_seen_ms=o.first_seen_ms, last_seen_ms=o.last_seen_ms,
                      heartbeats=o.heartbeats, last_chain_head=o.chain_head)

    def cosigns(self) -> list[SignedCosign]:
        """Signed co-signatures for every member we heard, in member order."""
        out = []
        for m in self.members:
            c = self.cosign(m) if m != self.identity.peer_id else None
            if c is not None:
                out.append(sign_cosign(self.identity, c))
        return out

    # --- internals ------------------------------------------------------------------------

    def _beat(self, now_ms: int, state: str = "running") -> list[Action]:
        self.seq += 1
        hb = Heartbeat(job_id=self.job_id, cert_hash=self.cert_hash, peer_id=self.identity.peer_id, seq=self.seq,
                       sent_at_ms=now_ms, state=state, chain_head=self.chain_head, checkpoints=self.checkpoints)
        data = sign_heartbeat(self.identity, hb).envelope.to_bytes()
        # To every member still there: running, finished or failed, they all
        # keep watching us (a co-signature vouches for our time until our end,
        # and a member we stop telling would take us for lost).  Only the lost
        # are gone.
        actions: list[Action] = [Send(peer_id=m, data=data) for m, o in self.seen.items()
                                 if o.status is not MemberStatus.LOST]
        if state == "running":
            actions.append(SetTimer(self._hb_key, now_ms + self.heartbeat_interval_ms))
        return actions

    def _deadline(self, o: Observation) -> int:
        if o.last_seen_ms is None:
            return self.started_at_ms + self.start_grace_ms + self.member_timeout_ms
        # Heard before we started: its silence counts from our start.
        return max(o.last_seen_ms, self.started_at_ms) + self.member_timeout_ms

    def _schedule_check(self, now_ms: int) -> list[Action]:
        deadlines = [self._deadline(o) for o in self.seen.values() if o.status is MemberStatus.ALIVE]
        if not deadlines:
            return [CancelTimer(self._check_key)]
        return [SetTimer(self._check_key, max(now_ms, min(deadlines)) + 1)]

    def _check(self, now_ms: int) -> list[Action]:
        if self.state == "new":
            return []
        actions: list[Action] = []
        for m, o in self.seen.items():
            if o.status is MemberStatus.ALIVE and now_ms > self._deadline(o):
                o.status = MEMBER_TRANSITIONS[(o.status, "timeout")]
                actions += [MemberLost(job_id=self.job_id, peer_id=m,
                                       reason=f"no heartbeat for more than {self.member_timeout_ms} ms"),
                            Emit("membership_members_lost")]
                if self.policy == "fail" and self.state == "running":
                    actions += self._stop(now_ms, f"member {m[:16]} lost and the policy is fail", "member_lost")
        if self.stop_when_alone and self.state == "running" and self.seen and all(
                o.status is MemberStatus.LOST for o in self.seen.values()):
            actions += self._stop(now_ms, "cut off from every other member: nobody can vouch for more work",
                                  "member_lost")
        if not self.done:
            actions += self._schedule_check(now_ms)
        return actions + self._maybe_done()

    def _stop(self, now_ms: int, reason: str, cause: str) -> list[Action]:
        """Policy ``fail`` (or a member that failed): stop here and tell the rest."""
        self.state, self.stop_reason = "failed", reason
        return [StopJob(job_id=self.job_id, reason=reason, cause=cause)] + self._beat(now_ms, "failed") + [
            CancelTimer(self._hb_key)]

    def _maybe_done(self) -> list[Action]:
        if self.done:
            return [CancelTimer(self._check_key), CancelTimer(self._hb_key)]
        return []
