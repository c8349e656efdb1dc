"""States of cluster formation and their allowed transitions, as data.

Two state machines per job: a worker's (:class:`WorkerState`, one per job a
node has seen, held by :class:`~p2pgpu.core.FormationNode`) and the
submitter's (:class:`SubmitterState`, held by :class:`~p2pgpu.core.Submitter`).
Every change of state goes through :func:`advance`, which refuses a move the
table does not list, so the table below *is* the protocol's state diagram
(``docs/formation.md`` prints it with :func:`table_markdown`).  Holding a lease
is not a state: a FOLLOWING, LEADING or CERTIFIED node may hold one (the
capacity ledger says so), which keeps this table small.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

from ._errors import LocalProtocolError


class WorkerState(Enum):
    """A node's view of one job."""

    #: Manifest verified; not volunteering (no match, or no free capacity yet).
    SEEN = "seen"
    #: Offer published; collecting other volunteers' offers for the offer window.
    OFFERED = "offered"
    #: Waiting for the current view's leader (may hold a lease as a proposed member).
    FOLLOWING = "following"
    #: Leading the current view: proposing a membership and collecting accepts.
    LEADING = "leading"
    #: Leader holding a complete certificate, sent to the submitter; awaiting confirmation.
    CERTIFIED = "certified"
    #: A member of the confirmed cluster: the job runs here.
    RUNNING = "running"
    #: Nothing more to do here (another cluster confirmed, cancelled, finished, expired).
    CLOSED = "closed"


class SubmitterState(Enum):
    """The submitter's view of a job it published."""

    #: Manifest published; waiting for a certificate.
    PUBLISHED = "published"
    #: Exactly one certificate confirmed; its members run the job.
    CONFIRMED = "confirmed"
    #: No certificate in time; the job was withdrawn (a CANCEL was published).
    FAILED = "failed"
    #: Cancelled by the submitter.
    CANCELLED = "cancelled"


WORKER_TRANSITIONS: dict[WorkerState, tuple[WorkerState, ...]] = {
    WorkerState.SEEN: (WorkerState.OFFERED, WorkerState.CLOSED),
    WorkerState.OFFERED: (WorkerState.FOLLOWING, WorkerState.LEADING, WorkerState.RUNNING, WorkerState.CLOSED),
    WorkerState.FOLLOWING: (WorkerState.LEADING, WorkerState.RUNNING, WorkerState.CLOSED),
    WorkerState.LEADING: (WorkerState.FOLLOWING, WorkerState.CERTIFIED, WorkerState.RUNNING, WorkerState.CLOSED),
    WorkerState.CERTIFIED: (WorkerState.FOLLOWING, WorkerState.LEADING, WorkerState.RUNNING, WorkerState.CLOSED),
    WorkerState.RUNNING: (WorkerState.CLOSED,),
    WorkerState.CLOSED: (),
}

SUBMITTER_TRANSITIONS: dict[SubmitterState, tuple[SubmitterState, ...]] = {
    SubmitterState.PUBLISHED: (SubmitterState.CONFIRMED, SubmitterState.FAILED, SubmitterState.CANCELLED),
    SubmitterState.CONFIRMED: (SubmitterState.CANCELLED,),
    SubmitterState.FAILED: (),
    SubmitterState.CANCELLED: (),
}

#: Why a worker moves, per transition: the text of the docs' state table.
WORKER_EVENTS: dict[tuple[WorkerState, WorkerState], str] = {
    (WorkerState.SEEN, WorkerState.OFFERED): "the job matches and GPUs are free (on arrival, or when they "
                                             "free up later): publish an offer",
    (WorkerState.SEEN, WorkerState.CLOSED): "manifest expired, job confirmed elsewhere or cancelled",
    (WorkerState.OFFERED, WorkerState.FOLLOWING): "offer window over and another volunteer ranks first; "
                                                  "or a proposal arrived",
    (WorkerState.OFFERED, WorkerState.LEADING): "offer window over and this node ranks first",
    (WorkerState.OFFERED, WorkerState.RUNNING): "a confirmation names this node",
    (WorkerState.OFFERED, WorkerState.CLOSED): "confirmed elsewhere, cancelled or expired",
    (WorkerState.FOLLOWING, WorkerState.LEADING): "leader silent past leader_timeout_ms: next view, this node leads",
    (WorkerState.FOLLOWING, WorkerState.RUNNING): "a confirmation names this node (it holds the lease)",
    (WorkerState.FOLLOWING, WorkerState.CLOSED): "confirmed elsewhere, cancelled, expired or formation gave up",
    (WorkerState.LEADING, WorkerState.FOLLOWING): "a preferred proposal (higher view or better-ranked leader), "
                                                  "or rounds_max used up",
    (WorkerState.LEADING, WorkerState.CERTIFIED): "every proposed member accepted",
    (WorkerState.LEADING, WorkerState.RUNNING): "a confirmation names this node",
    (WorkerState.LEADING, WorkerState.CLOSED): "confirmed elsewhere, cancelled or expired",
    (WorkerState.CERTIFIED, WorkerState.FOLLOWING): "no confirmation before the leases ran out (next view), "
                                                    "or a preferred proposal",
    (WorkerState.CERTIFIED, WorkerState.LEADING): "no confirmation before the leases ran out; next view is ours",
    (WorkerState.CERTIFIED, WorkerState.RUNNING): "the submitter confirmed; this leader is a member",
    (WorkerState.CERTIFIED, WorkerState.CLOSED): "the submitter confirmed (this leader is not a member), "
                                                 "cancelled or expired",
    (WorkerState.RUNNING, WorkerState.CLOSED): "finished, cancelled, or past duration_s_max",
}

SUBMITTER_EVENTS: dict[tuple[SubmitterState, SubmitterState], str] = {
    (SubmitterState.PUBLISHED, SubmitterState.CONFIRMED): "first valid certificate with enough lease left",
    (SubmitterState.PUBLISHED, SubmitterState.FAILED): "no certificate within formation_timeout_ms "
                                                       "(or before the manifest expired)",
    (SubmitterState.PUBLISHED, SubmitterState.CANCELLED): "job cancel",
    (SubmitterState.CONFIRMED, SubmitterState.CANCELLED): "job cancel",
}

S = TypeVar("S", WorkerState, SubmitterState)


def advance(table: dict[S, tuple[S, ...]], old: S, new: S) -> S:
    """``new`` if the table allows ``old -> new`` (staying put is always
    allowed), else ``LocalProtocolError``: a core bug, never a peer's fault."""
    if new is not old and new not in table[old]:
        raise LocalProtocolError(f"formation: no transition {old.name} -> {new.name}")
    return new


def table_markdown(table: dict[S, tuple[S, ...]], events: dict[tuple[S, S], str]) -> str:
    """The transition table as a Markdown table, for the docs."""
    rows = ["| from | to | when |", "|---|---|---|"]
    for old, news in table.items():
        for new in news:
            rows.append(f"| {old.name} | {new.name} | {events.get((old, new), '')} |")
    return "\n".join(rows)
