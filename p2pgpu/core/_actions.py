"""Actions: what a pure core asks its driver to do.

A core method takes an event and ``now_ms`` and returns a list of these; it
never performs them.  The node driver (``p2pgpu.node``) turns them into
GossipSub publishes, direct libp2p streams, trio timers and SQLite writes; the
simulator (``p2pgpu.sim``) and the in-memory swarm of the tests turn them into
events on a virtual network.  The generic ones (``Send``, ``Publish``,
``Subscribe``, ``Unsubscribe``, ``SetTimer``, ``CancelTimer``, ``Emit``) are
shared by every core; the rest report facts of cluster formation that the
driver records or acts on.  All are frozen dataclasses, so a test can compare
a core's output with an expected list.

Timers are named by a typed :class:`TimerKey` (which core, which job, which
timer of it), never by a string a driver would have to split:
``SetTimer(key, at_ms)`` replaces any pending timer of the same key, and when
it fires the driver hands the key back (to the core host, which routes it by
``key.owner``; a core's own ``on_timer(key, now_ms)`` in a table test).  A
timer that fires late or after it was replaced is harmless: cores check their
own deadlines.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._errors import Reason
    from ._formation_messages import Certificate
    from ._manifest import SignedManifest


@dataclass(frozen=True, slots=True)
class Send:
    """Deliver ``data`` to one peer over a direct stream."""

    peer_id: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Publish:
    """Publish ``data`` on a GossipSub topic."""

    topic: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Subscribe:
    topic: str


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    topic: str


class TimerOwner(str, Enum):
    """The core a timer belongs to (the host routes a firing by it)."""

    FORMATION = "formation"
    SUBMITTER = "submitter"
    MEMBERSHIP = "membership"
    SETTLEMENT = "settlement"
    DELIVERY = "delivery"
    #: Pay as you go (``core/_installments.py``): a member's claims and payment deadlines.
    INSTALLMENT = "installment"
    #: Payment notices resent until acknowledged (``core/_notices.py``).
    NOTICE = "notice"


@dataclass(frozen=True, slots=True, order=True)
class TimerKey:
    """A timer's name: its core, its job and which of that job's timers."""

    owner: TimerOwner
    job_id: str
    name: str

    def __str__(self) -> str:
        return f"{self.owner.value}/{self.job_id[:12]}/{self.name}"


@dataclass(frozen=True, slots=True)
class SetTimer:
    """Call ``on_timer(key, now)`` at ``at_ms``; replaces a pending timer of the same key."""

    key: TimerKey
    at_ms: int


@dataclass(frozen=True, slots=True)
class CancelTimer:
    key: TimerKey


@dataclass(frozen=True, slots=True)
class Emit:
    """Count ``value`` on a metric (a Prometheus counter in the node, a tally in the simulator)."""

    metric: str
    value: int = 1


# -- cluster formation --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reserved:
    """This node reserved ``gpus`` for ``job_id`` under a lease until ``lease_until_ms``
    (or extended the lease it held).  Its advert should now show ``gpus_free``."""

    job_id: str
    gpus: int
    lease_until_ms: int
    gpus_free: int


@dataclass(frozen=True, slots=True)
class Released:
    """This node freed the capacity it held for ``job_id`` (``reason``: lease expired,
    another cluster confirmed, cancelled, finished, time limit)."""

    job_id: str
    gpus: int
    reason: str
    gpus_free: int


@dataclass(frozen=True, slots=True)
class StartJob:
    """The submitter confirmed a certificate that names this node: run the job.
    ``member_index`` is this node's place in ``certificate.members``
    (``replica = index // nodes``, ``node = index % nodes``)."""

    job_id: str
    manifest: SignedManifest
    certificate: Certificate
    member_index: int
    confirm: bytes


@dataclass(frozen=True, slots=True)
class StopJob:
    """Stop running ``job_id``: ``reason`` in words; ``cause`` is the end
    reason the member's proof then carries (``cancelled`` by its submitter,
    ``time_limit`` past ``duration_s_max``, ``member_lost`` or ``job_failed``
    by the membership core)."""

    job_id: str
    reason: str
    cause: str = "cancelled"


@dataclass(frozen=True, slots=True)
class Confirmed:
    """Submitter side: this job's cluster is certified and confirmed (exactly once per job)."""

    job_id: str
    certificate: Certificate
    confirm: bytes


@dataclass(frozen=True, slots=True)
class Failed:
    """Submitter side: no cluster formed; ``reason`` says why in words a person can act on."""

    job_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Cancelled:
    """Submitter side: the job was cancelled (locally, or after a formation failure)."""

    job_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class MemberLost:
    """Submitter side: a confirmed member says it cannot run (its lease had expired
    and its capacity was gone); the job's ``on_member_loss`` policy applies."""

    job_id: str
    peer_id: str
    reason: str


# -- settlement (the submitter's collections, core/_settlement.py) -------------------


@dataclass(frozen=True, slots=True)
class CollectionOpened:
    """Store this job's open collection (before any CONFIRM leaves): after a
    restart it is handed back to :meth:`Settlement.restore`."""

    job_id: str
    certificate: Certificate
    payout_addresses: dict[str, str]
    confirmed_at_ms: int
    deadline_ms: int


@dataclass(frozen=True, slots=True)
class ItemTaken:
    """Store this member's signed message (a proof, co-signature or outputs
    list) now: the acknowledgement that follows says it is stored."""

    job_id: str
    item_hash: bytes
    kind: str
    sender: str
    wire: bytes
    received_ms: int


@dataclass(frozen=True, slots=True)
class LogsTaken:
    """A member's new batch of log lines (``[t_ms, stream, line]`` each, already
    cut to the limits), to keep for ``job logs`` and store as received."""

    job_id: str
    member: str
    member_index: int
    seq: int
    lines: tuple[tuple[int, str, str], ...]
    wire: bytes


@dataclass(frozen=True, slots=True)
class LookupCollection:
    """A member's message for a job with no open collection here: look in the
    store and answer with :meth:`Settlement.stored_ack`."""

    job_id: str
    sender: str
    item_hash: bytes


@dataclass(frozen=True, slots=True)
class MemberLine:
    """What settlement decided about one member of the cluster."""

    peer_id: str
    member_index: int
    #: owed, rejected, missing, outside_quorum, no_quorum, no_payout_address
    status: str
    amount: int
    #: Why this member's part failed or earned nothing, in words ("" when it
    #: succeeded); a refused proof also names its fault.
    reason: str
    payout_address: str
    proof_hash: bytes = b""
    proof_wire: bytes = b""
    #: The co-signatures of this member's proof, as received (by observer).
    cosigns: tuple[bytes, ...] = ()
    gpu_ms: int = 0
    served_ms: int = 0
    exit_code: int | None = None
    end_reason: str = ""
    output_digest: bytes = b""
    #: For a refused proof: the rule it broke (a ``ProofFault`` name).
    fault: str = ""
    #: Paid before settlement in installments (pay as you go); ``amount`` is
    #: what remains on top of them.
    prepaid: int = 0

    @property
    def succeeded(self) -> bool:
        return self.status == "owed" and self.exit_code == 0 and self.end_reason == "exited"

    @property
    def payable(self) -> bool:
        """Whether this line's amount is owed: an owed proof, or a replica
        whose rank reached no quorum (its time served)."""
        return self.amount > 0 and self.status in ("owed", "no_quorum")

    def to_json(self) -> dict[str, Any]:
        """The row ``job status`` shows under ``proofs``."""
        doc: dict[str, Any] = {"worker": self.peer_id, "status": self.status, "amount": self.amount,
                               "proof_hash": self.proof_hash.hex(), "reason": self.reason}
        if self.prepaid:
            doc["prepaid"] = self.prepaid
        if self.proof_hash:
            doc.update(gpu_ms=self.gpu_ms, payout_address=self.payout_address, exit_code=self.exit_code,
                       end_reason=self.end_reason, output_digest=self.output_digest.hex())
        return doc


@dataclass(frozen=True, slots=True)
class Settled:
    """The job is settled: write every line, what it owes and the outcome in
    one transaction, mark the collection settled, then pay."""

    job_id: str
    succeeded: bool
    #: Why the job failed ("" when it succeeded), for ``job status``.
    reason: str
    currency: str
    settled_at_ms: int
    lines: tuple[MemberLine, ...]
    #: Each member's outputs list, as its ``outputs`` message named them.
    outputs: dict[str, list[dict[str, Any]]]
    #: The submitter cancelled the job (its state is ``cancelled``, not ``failed``).
    cancelled: bool = False



@dataclass(frozen=True, slots=True)
class LateLine:
    """A member's proof came after the job settled (held up, e.g. by a
    partition between it and the submitter), before its deadline: store this
    line and what it owes as ``Settled`` would have; the job's outcome stays."""

    job_id: str
    currency: str
    line: MemberLine


# -- a member's deliveries to the submitter (core/_member.py) -------------------------


@dataclass(frozen=True, slots=True)
class HandOver:
    """Store these signed messages to ``dest`` (``(kind, wire)``: outputs,
    proof, cosign) before they are sent, in one transaction with the earning
    the proof expects (``(proof_hash, amount, currency)``) and the run's
    marks (``proof_signed``, ``cosigned``, what it observed of the others):
    they are resent until acknowledged, after a restart too."""

    job_id: str
    dest: str
    items: tuple[tuple[str, bytes], ...]
    earning: tuple[bytes, int, str] | None = None
    proof_signed: bool = False
    cosigned: bool = False
    observed: dict[str, list[Any]] | None = None


@dataclass(frozen=True, slots=True)
class DeliveryDone:
    """A delivery is over: acknowledged (``recorded``, ``late``, ``ignored``)
    or given up (``expired``).  Store it so it is not resent after a restart."""

    job_id: str
    item_hash: bytes
    status: str


# -- the core host (core/_host.py): facts for the driver's records --------------------


@dataclass(frozen=True, slots=True)
class Refused:
    """The message (or one core's part of it) was refused for ``reason``: the
    driver counts it and, for a topic message, turns it into the gossip
    verdict (``core._verdict``) that says whether the forwarder is to blame."""

    reason: Reason
    detail: str


@dataclass(frozen=True, slots=True)
class JobSeen:
    """A manifest this node had not seen passed admission: record the job."""

    manifest: SignedManifest


@dataclass(frozen=True, slots=True)
class NotVolunteering:
    """This node will not volunteer for the job, and why (a payer that cannot pay)."""

    job_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class CheckBalance:
    """Look up ``payer``'s balance in ``currency`` on the shared ledger and
    hand it to the host (``Host.on_balance``): manifests of that payer wait."""

    payer: str
    currency: str


@dataclass(frozen=True, slots=True)
class MemberDone:
    """This member's part of the job is over here: proof and co-signatures
    handed over, GPUs released.  The driver may forget the run."""

    job_id: str


@dataclass(frozen=True, slots=True)
class PaidNotice:
    """The job's submitter says it paid one of our proofs."""

    job_id: str
    proof_hash: bytes
    tx_signature: str
    inclusion_proof: str | None


@dataclass(frozen=True, slots=True)
class CheckPayment:
    """Look ``tx_signature`` up on the ledger, then hand what it showed to
    ``Host.payment_checked`` with this action (#16.3: a member checks a
    payment notice before the interval counts as paid)."""

    job_id: str
    proof_hash: bytes
    tx_signature: str
    submitter: str
    inclusion_proof: str | None


@dataclass(frozen=True, slots=True)
class MemberMessage:
    """A message between members of a job running here, for the runtime
    (a Ray rendezvous): ``signer`` is a member of its certificate."""

    job_id: str
    signer: str
    body: dict[str, Any]



@dataclass(frozen=True, slots=True)
class Installment:
    """One interval of one member's work, owed by pay as you go: ``key``
    (``core._installments.installment_key``: job, member, interval) is what
    the outbox pays it under, so it is paid at most once."""

    key: bytes
    peer_id: str
    interval: int
    amount: int
    payout_address: str


@dataclass(frozen=True, slots=True)
class InstallmentsOwed:
    """Record these installments in the outbox (one transaction) before the
    acknowledgement that follows goes out; recording one again is a no-op."""

    job_id: str
    currency: str
    rows: tuple[Installment, ...]


Action = (
    Send | Publish | Subscribe | Unsubscribe | SetTimer | CancelTimer | Emit
    | Reserved | Released | StartJob | StopJob | Confirmed | Failed | Cancelled | MemberLost
    | CollectionOpened | ItemTaken | LogsTaken | LookupCollection | Settled | LateLine | HandOver | DeliveryDone
    | Refused | JobSeen | NotVolunteering | CheckBalance | MemberDone | PaidNotice | CheckPayment | MemberMessage
    | InstallmentsOwed
)
