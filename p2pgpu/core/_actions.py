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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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
    """Stop running ``job_id`` (cancelled by its submitter, or past its time limit)."""

    job_id: str
    reason: str


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


Action = (
    Send | Publish | Subscribe | Unsubscribe | SetTimer | CancelTimer | Emit
    | Reserved | Released | StartJob | StopJob | Confirmed | Failed | Cancelled | MemberLost
)
