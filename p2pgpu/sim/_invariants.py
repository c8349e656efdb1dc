"""Invariant checkers, kept apart from the code under test (as TigerBeetle's are).

The checker keeps its own ledger of what it has been told happened (holds,
releases, starts, finishes, confirmations, payments) and of the ground truth
only the simulator knows (who is honest, how long a job really ran), and it
never reads the protocol's own counters to decide.  Each report is checked
when it happens; the first violation stops the run (``SimulationStopped``)
with a message that names the invariant, the time and the actors, so that
``p2pgpu sim run SCENARIO --seed N`` replays straight to it.

Invariants (``shared/ARCHITECTURE.md``), as far as the cores exist:

- ``capacity``: no honest node holds (reserved or running) more GPUs than it
  has (an adversary that lies about its GPUs is outside what a protocol can
  stop; what it costs others shows in the job metrics);
- ``one-cluster``: a job is confirmed at most once, and only members of that
  confirmed cluster, each of which accepted it, ever start it;
- ``proof-before-pay``: nothing is paid for a (job, member) that did not run
  as a confirmed member, and never more than the work done was worth;
- ``paid-once``: each proof hash is paid at most once;
- ``settled``: once the network settles, every honest member of a completed
  job of an honest submitter was paid exactly what its work was worth;
- ``book``: an advert stored in any book is newer than the one it replaced
  (the seq rule), unexpired at the node's clock, and signed by its peer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from p2pgpu.core import SignedAdvert

from ._engine import SimulationStopped

if TYPE_CHECKING:
    from ._world import World


class Checker:
    def __init__(self, world: World) -> None:
        self.world = world
        self.violations: list[dict[str, Any]] = []
        self.checks = 0
        self.stop_on_violation = True
        self.holds: dict[int, dict[int, int]] = {}
        self.running: dict[int, dict[int, bool]] = {}
        self.confirmed: dict[int, list[int]] = {}
        self.started: dict[int, dict[int, bool]] = {}
        self.ran: dict[tuple[int, int], int] = {}  # (job, member) -> true GPU-milliseconds
        #: paid to adversaries beyond their work (a lie the protocol could not refute)
        self.overpaid_lamports = 0
        self.paid: dict[bytes, int] = {}
        self.paid_by_member: dict[tuple[int, int], int] = {}
        self.book_seq: dict[int, dict[str, int]] = {}
        #: StartJob with no Reserved before it (re-reserved silently after a lease lapsed)
        self.start_without_reserved = 0

    def fail(self, invariant: str, detail: str) -> None:
        v = {"invariant": invariant, "t_ms": self.world.engine.now_us // 1000, "detail": detail}
        self.violations.append(v)
        self.world.engine.trace("violation", invariant, detail)
        if self.stop_on_violation:
            raise SimulationStopped(f"{invariant} at t={v['t_ms']} ms: {detail}")

    # -- capacity -------------------------------------------------------------------------------
    def on_hold(self, node: int, jid: int, gpus: int) -> None:
        self.checks += 1
        h = self.holds.setdefault(node, {})
        h[jid] = gpus
        have = len(self.world.nodes[node].gpus)
        if self.world.nodes[node].adversary is None and sum(h.values()) > have:
            self.fail("capacity", f"node {node} holds {sum(h.values())} GPUs but has {have} (jobs {sorted(h)})")

    def on_release(self, node: int, jid: int) -> None:
        self.holds.get(node, {}).pop(jid, None)
        self.running.get(node, {}).pop(jid, None)

    def on_node_down(self, node: int) -> None:
        self.holds.pop(node, None)
        self.running.pop(node, None)

    def on_state_lost(self, node: int) -> None:
        """The node's disk is gone: its book starts empty, so old seqs may return."""
        self.book_seq.pop(node, None)

    # -- one executing cluster per job --------------------------------------------------------------
    def on_confirm(self, jid: int, members: list[int]) -> None:
        self.checks += 1
        if jid in self.confirmed:
            self.fail("one-cluster", f"job {jid} confirmed twice: {self.confirmed[jid]} and {members}")
        if len(set(members)) != len(members):
            self.fail("one-cluster", f"job {jid} confirmed with a repeated member {members}")
        self.confirmed[jid] = list(members)

    def on_start(self, node: int, jid: int, gpus: int) -> None:
        self.checks += 1
        members = self.confirmed.get(jid)
        if members is None or node not in members:
            self.fail("one-cluster", f"node {node} started job {jid}, confirmed members {members}")
        h = self.holds.setdefault(node, {})
        if jid not in h:
            # Not a capacity breach by itself (the GPUs are counted now), but the
            # driver was not told with a Reserved action: a contract gap, reported.
            self.start_without_reserved += 1
        h[jid] = gpus
        if self.world.nodes[node].adversary is None and sum(h.values()) > len(self.world.nodes[node].gpus):
            self.fail("capacity", f"node {node} runs job {jid} on top of {sorted(h)}: more GPUs than it has")
        self.running.setdefault(node, {})[jid] = True
        self.started.setdefault(jid, {})[node] = True

    def on_finish(self, node: int, jid: int, gpu_ms: int) -> None:
        self.ran[(jid, node)] = gpu_ms

    def worth(self, jid: int, member: int) -> int:
        """What (job, member)'s real work is worth: GPU-ms at its price, capped by the ceiling."""
        ceiling = self.world.jobs.jobs[jid].manifest.price_per_gpu_hour_max
        return self.ran[(jid, member)] * min(self.world.nodes[member].price, ceiling) // 3_600_000

    # -- payments -----------------------------------------------------------------------------
    def on_owed(self, jid: int, member: int, amount: int) -> None:
        self.checks += 1
        if (jid, member) not in self.ran:
            self.fail("proof-before-pay", f"job {jid}: member {member} is owed {amount} but never ran")

    def on_paid(self, jid: int, member: int, proof_hash: bytes, amount: int) -> None:
        self.checks += 1
        if proof_hash in self.paid:
            self.fail("paid-once", f"proof {proof_hash.hex()[:16]} (job {jid}, member {member}) paid twice")
        self.paid[proof_hash] = amount
        if (jid, member) not in self.ran or member not in self.confirmed.get(jid, []):
            self.fail("proof-before-pay", f"job {jid}: member {member} paid {amount} without a run as a member")
            return
        worth = self.worth(jid, member)
        if amount > worth:
            if self.world.nodes[member].adversary is None:
                self.fail("proof-before-pay", f"job {jid}: member {member} paid {amount}, its work was worth {worth}")
            self.overpaid_lamports += amount - worth
        key = (jid, member)
        self.paid_by_member[key] = self.paid_by_member.get(key, 0) + amount

    # -- adverts --------------------------------------------------------------------------------
    def on_book_store(self, node: int, sa: SignedAdvert) -> None:
        self.checks += 1
        adv = sa.advert
        seqs = self.book_seq.setdefault(node, {})
        prev = seqs.get(adv.peer_id, 0)
        if adv.seq <= prev:
            self.fail("book", f"node {node} stored seq {adv.seq} of {adv.peer_id[:12]} after seq {prev}")
        seqs[adv.peer_id] = adv.seq
        if sa.envelope.signer_peer_id != adv.peer_id:
            self.fail("book", f"node {node} stored an advert not signed by {adv.peer_id[:12]}")
        if adv.expires_at_ms <= self.world.node_now_ms(node):
            self.fail("book", f"node {node} stored an expired advert of {adv.peer_id[:12]}")

    # -- periodic and final -----------------------------------------------------------------------
    def periodic(self) -> None:
        """Recount every node's holdings from scratch (catches a leak between reports)."""
        w = self.world
        for node, h in self.holds.items():
            self.checks += 1
            have = len(w.nodes[node].gpus)
            if w.nodes[node].adversary is None and sum(h.values()) > have:
                self.fail("capacity", f"node {node} holds {sum(h.values())} of {have} GPUs")

    def at_end(self) -> None:
        """``settled``: honest members of completed jobs of honest submitters got
        exactly what their work was worth (jobs that finished before the quiet period)."""
        w = self.world
        from ._jobs import JobState
        for jid, job in sorted(w.jobs.jobs.items()):
            if job.state is not JobState.DONE or job.t_done_us > w.end_us - 3_000_000:
                continue  # paid by the next payer tick (every 2 s), after the run
            if w.nodes[job.submitter].adversary is not None:
                continue
            for m in job.members:
                if w.nodes[m].adversary is not None or (jid, m) not in self.ran:
                    continue
                self.checks += 1
                worth = self.worth(jid, m)
                got = self.paid_by_member.get((jid, m), 0)
                if got != worth:
                    self.fail("settled", f"job {jid}: honest member {m} was paid {got}, owed {worth}")
