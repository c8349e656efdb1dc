"""Errors of the protocol cores, split by who is at fault.

A peer's bad input raises :class:`PeerMisbehaved` with a :class:`Reason`; the
driver turns the reason into a rejection, a score penalty or a disconnect, and
counts it.  Our own misuse of an API raises :class:`LocalProtocolError`.  The
split follows h11: a fuzzer of any decoder may only ever see ``PeerMisbehaved``.
"""

from __future__ import annotations

from enum import IntEnum


class Reason(IntEnum):
    """Why a message from the network was refused.  Stable numbers: they are
    exported as metric labels and documented in ``docs/protocol.md``."""

    OVERSIZED = 1
    MALFORMED = 2
    BAD_SCHEMA = 3
    NON_CANONICAL = 4
    BAD_SIGNATURE = 5
    WRONG_KIND = 6
    UNSUPPORTED_VERSION = 7
    EXPIRED = 8
    NOT_YET_VALID = 9
    REPLAYED = 10
    SIMULATED_FORBIDDEN = 11
    WRONG_NETWORK = 12
    SIGNER_MISMATCH = 13
    LIMIT_EXCEEDED = 14
    UNKNOWN_JOB = 15
    NOT_A_MEMBER = 16
    CONFLICT = 17
    BAD_PROOF = 18
    #: Bytes that do not match the hash that names them (a blob chunk, a leaf list).
    BAD_CONTENT = 19


class PeerMisbehaved(Exception):
    """Bad input from a peer (or a user file): typed, never a crash."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason.name.lower()}: {detail}" if detail else reason.name.lower())
        self.reason = reason
        self.detail = detail


class LocalProtocolError(Exception):
    """Our own code used a core wrongly (a bug, not the network's fault)."""
