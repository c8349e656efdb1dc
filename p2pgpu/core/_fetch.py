"""The download scheduler: which chunk of a blob to ask of which provider.

One :class:`FetchPlan` per blob being fetched.  The driver (``node/_blobs.py``)
runs a few workers per provider; each asks :meth:`FetchPlan.take` for the next
run of chunks for its provider, fetches it, and reports every chunk with
:meth:`chunk_ok` / :meth:`chunk_bad`, or the whole run with :meth:`run_failed`
(a timeout, a broken stream).  The plan decides everything: a provider that
sent one chunk that does not match its hash is dropped at once (its run goes
back to the pool, to be fetched elsewhere); one that fails
``failures_max`` times is dropped; a provider that has only part of the blob
(a member still fetching it) is asked only for what it announced; the fetch
fails, with the reason, when chunks are missing and no provider is left.

Resuming is starting a plan with the chunks already verified on disk
(``have``).  Pure: no I/O, no clock; the order of providers is the order they
were added.  Runs are handed out in index order from ``start`` (wrapping
around): the driver derives ``start`` from its own peer id, so members that
fetch one blob at once begin in different places and can serve each other
what the other lacks (as BitTorrent's random first pieces do).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

#: Chunks per request (contiguous): large enough to keep a stream busy.
run_chunks_default = 8
#: Failures (timeouts, broken streams) before a provider is dropped.
failures_max_default = 3
providers_max_default = 16


class Drop(Enum):
    """Why a provider was dropped from a fetch."""

    BAD_CHUNK = "sent a chunk that does not match its hash"
    FAILURES = "failed too often (timeouts or broken streams)"
    BAD_TREE = "its leaf list does not match the blob"
    GONE = "has no part of the blob"


@dataclass(slots=True)
class _Provider:
    peer: str
    #: Chunks it announced it has; None: all of them.
    has: frozenset[int] | None
    inflight: int = 0
    failures: int = 0
    chunks_ok: int = 0
    dropped: Drop | None = None


@dataclass(slots=True)
class FetchPlan:
    """The state of one blob's download (see the module doc)."""

    chunks: int
    have: set[int] = field(default_factory=set)
    run_chunks: int = run_chunks_default
    failures_max: int = failures_max_default
    providers_max: int = providers_max_default
    start: int = 0
    _providers: dict[str, _Provider] = field(default_factory=dict)
    _inflight: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.chunks < 0 or self.run_chunks < 1 or any(not 0 <= i < self.chunks for i in self.have):
            raise ValueError("chunks >= 0, run_chunks >= 1, have within range")
        self.start = self.start % self.chunks if self.chunks else 0

    # ------------------------------------------------------------ providers

    def add_provider(self, peer: str, has: frozenset[int] | None = None) -> bool:
        """Add (or refresh what it has) a provider; False if dropped before or over the limit."""
        p = self._providers.get(peer)
        if p is not None:
            if p.dropped is not None:
                return False
            p.has = has
            return True
        if len(self.live_providers()) >= self.providers_max:
            return False
        self._providers[peer] = _Provider(peer=peer, has=has)
        return True

    def drop(self, peer: str, why: Drop) -> None:
        p = self._providers.get(peer)
        if p is None or p.dropped is not None:
            return
        p.dropped = why
        for i in [i for i, who in self._inflight.items() if who == peer]:
            del self._inflight[i]
        p.inflight = 0

    def live_providers(self) -> list[str]:
        return [p.peer for p in self._providers.values() if p.dropped is None]

    def dropped(self) -> dict[str, Drop]:
        return {p.peer: p.dropped for p in self._providers.values() if p.dropped is not None}

    def chunks_from(self) -> dict[str, int]:
        """Verified chunks per provider (who served what)."""
        return {p.peer: p.chunks_ok for p in self._providers.values() if p.chunks_ok}

    # --------------------------------------------------------------- chunks

    @property
    def done(self) -> bool:
        return len(self.have) == self.chunks

    def missing(self) -> int:
        return self.chunks - len(self.have)

    def take(self, peer: str) -> list[int]:
        """The next run of chunks for ``peer`` (contiguous, lowest first, that
        it has and nobody else is fetching), marked in flight; [] if none now."""
        p = self._providers.get(peer)
        if p is None or p.dropped is not None:
            return []
        run: list[int] = []
        for k in range(self.chunks):
            i = (self.start + k) % self.chunks
            free = i not in self.have and i not in self._inflight and (p.has is None or i in p.has)
            if free and (not run or i == run[-1] + 1):  # a run never wraps: it stays contiguous
                run.append(i)
                if len(run) >= self.run_chunks:
                    break
            elif run:
                break
        for i in run:
            self._inflight[i] = peer
        p.inflight += len(run)
        return run

    def chunk_ok(self, peer: str, index: int) -> None:
        """``index`` arrived from ``peer`` and matched its hash (and is on disk)."""
        if self._inflight.get(index) == peer:
            del self._inflight[index]
            self._providers[peer].inflight -= 1
        if index not in self.have:
            self.have.add(index)
            p = self._providers.get(peer)
            if p is not None:
                p.chunks_ok += 1
                p.failures = 0

    def chunk_bad(self, peer: str, index: int) -> Drop:
        """``index`` from ``peer`` did not match its hash: the peer is dropped
        at once and everything it had in flight goes back to the pool."""
        self.drop(peer, Drop.BAD_CHUNK)
        return Drop.BAD_CHUNK

    def run_failed(self, peer: str, run: list[int]) -> Drop | None:
        """A run (or its unfinished rest) failed without a wrong byte: back to
        the pool; the provider is dropped after ``failures_max`` failures."""
        p = self._providers.get(peer)
        for i in run:
            if self._inflight.get(i) == peer:
                del self._inflight[i]
                if p is not None:
                    p.inflight -= 1
        if p is None or p.dropped is not None:
            return None
        p.failures += 1
        if p.failures >= self.failures_max:
            self.drop(peer, Drop.FAILURES)
            return Drop.FAILURES
        return None

    def release(self, peer: str, run: list[int]) -> None:
        """Give back chunks taken but not fetched (a worker stopping), without blame."""
        p = self._providers.get(peer)
        for i in run:
            if self._inflight.get(i) == peer:
                del self._inflight[i]
                if p is not None:
                    p.inflight -= 1

    def stuck(self) -> bool:
        """Chunks are missing and no live provider has any of them (nor has
        them in flight): the fetch cannot finish with these providers."""
        if self.done or self._inflight:
            return False
        for p in self._providers.values():
            if p.dropped is None and (p.has is None or any(i not in self.have for i in p.has)):
                return False
        return True

    def failure_reason(self) -> str:
        drops = self.dropped()
        parts = [f"{peer[:12]} {why.value}" for peer, why in drops.items()]
        live = self.live_providers()
        return (f"{self.missing()} of {self.chunks} chunks missing; "
                + (f"providers dropped: {'; '.join(parts)}; " if parts else "")
                + (f"{len(live)} providers left without them" if live else "no provider left"))



#: A member's fetch of an input by hash that none of its sources served (none
#: answered, or none holds it yet) is tried again after each of these pauses
#: before the job fails (#13): its sources are the submitter and the other
#: members, and a submitter that restarts (its pins survive, for this) is
#: unreachable for seconds; another member may not hold it yet.  31 s in all.
sources_retry_ms = (1_000, 2_000, 4_000, 8_000, 16_000)


#: States in which a job this node submitted needs nothing more from it.
ENDED_STATES = ("succeeded", "failed", "cancelled")
#: After a job's deadline (manifest expiry plus its longest run), how long its
#: submitter still keeps serving its inputs (formation and start-up slack).
input_pin_grace_ms = 10 * 60 * 1000


def submitted_inputs_done(state: str | None, *, deadline_ms: int, now_ms: int) -> bool:
    """May the submitter release the pins of a job's local inputs?  Yes once
    the job ended (``ENDED_STATES``); otherwise (forming, running,
    ``interrupted`` by a restart of ours while its members may still be
    fetching, or no record at all: a crash before the job was first saved)
    only once no member can still run it: ``deadline_ms`` (its manifest's
    expiry plus its longest run) plus :data:`input_pin_grace_ms`."""
    if state in ENDED_STATES:
        return True
    return now_ms > deadline_ms + input_pin_grace_ms
