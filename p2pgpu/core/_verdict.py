"""One mapping from a rejection reason to a gossip verdict.

A GossipSub validator has three answers (libp2p's ``ValidationResult``):
**accept** (keep and forward), **ignore** (drop quietly: not forwarded, and
nobody is blamed) and **reject** (drop, and lower the score of the peer that
forwarded it).  Rejecting costs an honest forwarder score, so a message is
rejected only for a fault that every honest node on the same network would
have seen in the bytes alone: bad encoding, a bad signature, a broken schema
rule, a forgery, the wrong network.  What depends on the receiver's own clock,
state or limits (a replay, an expiry, a full table, an unknown job, a newer
protocol version) is ignored: the forwarder checked it against its own clock
and state and was right to pass it on.

Both drivers use :func:`verdict_for`: the node's GossipSub validators
(adverts and jobs topics, ``p2pgpu/node``) and the simulator's gossip model
(``p2pgpu/sim/_gossip.py``), so the simulator penalises exactly what the node
does.  :class:`GossipVerdict` is a plain ``Enum``: its members never compare equal to
a :class:`~p2pgpu.core.Reason` (the simulator once had ``ACCEPT == 1 ==
Reason.OVERSIZED``, and oversized adverts passed).
"""

from __future__ import annotations

from enum import Enum

from ._errors import Reason


class GossipVerdict(Enum):
    """What a gossip validator answers for one message."""

    ACCEPT = "accept"
    IGNORE = "ignore"
    REJECT = "reject"


#: Every reason's verdict, with why.  ``tests/core/test_verdict.py`` checks
#: that each ``Reason`` is listed, so a new reason cannot slip through.
VERDICTS: dict[Reason, GossipVerdict] = {
    # The bytes themselves are bad: the forwarder should have dropped them.
    Reason.OVERSIZED: GossipVerdict.REJECT,
    Reason.MALFORMED: GossipVerdict.REJECT,
    Reason.BAD_SCHEMA: GossipVerdict.REJECT,
    Reason.NON_CANONICAL: GossipVerdict.REJECT,
    Reason.BAD_SIGNATURE: GossipVerdict.REJECT,
    Reason.WRONG_KIND: GossipVerdict.REJECT,
    Reason.SIGNER_MISMATCH: GossipVerdict.REJECT,
    Reason.BAD_PROOF: GossipVerdict.REJECT,
    Reason.BAD_CONTENT: GossipVerdict.REJECT,  # bytes that do not hash to their name: only their sender made them
    # Rules of the network every node on it shares (bootstrap_peers.toml).
    Reason.WRONG_NETWORK: GossipVerdict.REJECT,
    Reason.SIMULATED_FORBIDDEN: GossipVerdict.REJECT,
    # A newer node may forward a version we do not speak yet (upgrades roll).
    Reason.UNSUPPORTED_VERSION: GossipVerdict.IGNORE,
    # Our clock, not the bytes: a message can expire in flight, and clocks
    # differ by up to the allowed skew.
    Reason.EXPIRED: GossipVerdict.IGNORE,
    Reason.NOT_YET_VALID: GossipVerdict.IGNORE,
    # Our state, not the bytes: the forwarder may not have seen the earlier
    # copy, does not share our limits, and may know jobs we do not.
    Reason.REPLAYED: GossipVerdict.IGNORE,
    Reason.LIMIT_EXCEEDED: GossipVerdict.IGNORE,
    Reason.UNKNOWN_JOB: GossipVerdict.IGNORE,
    Reason.NOT_A_MEMBER: GossipVerdict.IGNORE,
    Reason.CONFLICT: GossipVerdict.IGNORE,
}


def verdict_for(reason: Reason) -> GossipVerdict:
    """The gossip verdict for a message refused with ``reason``.  A reason
    missing from :data:`VERDICTS` (a test forbids it) is ignored, never held
    against the forwarder."""
    return VERDICTS.get(reason, GossipVerdict.IGNORE)
