"""Invariant checkers, kept apart from the code under test (as TigerBeetle's are).

The checker keeps its own ledger of what it has been told happened (holds,
releases, starts, finishes, confirmations, payments) and of the ground truth
only the simulator knows (who is honest, how long a job really ran), and it
never reads the protocol's own counters to decide.  Each report is checked
when it happens; the first violation stops the run (``SimulationStopped``)
with a message that names the invariant, the time and the actors, so that
``p2pgpu sim run SCENARIO --seed N`` replays straight to it.

Invariants (``docs/simulation.md`` lists them with what each checks):

- ``capacity``: no honest node holds (reserved or running) more GPUs than it
  has (an adversary that lies about its GPUs is outside what a protocol can
  stop; what it costs others shows in the job metrics);
- ``one-cluster``: a job is confirmed at most once, and only members of that
  confirmed cluster, each of which accepted it, ever start it;
- ``proof-before-pay``: nothing is paid for a (job, member) that did not run
  as a confirmed member, and never more than the work done was worth;
- ``paid-once``: each proof hash is paid at most once;
- ``settled``: once the network settles, every member was paid exactly what
  its settled job owed it;
- ``owed-time``: in every outcome of a job of an honest submitter (succeeded,
  failed, cancelled, a member lost), every honest member that stayed up
  through its part is owed its time served, exactly (unless a partition cut
  it off from every other member: then nobody vouches for the time after
  its last contact, and it is owed no more than it served);
- ``over-observed``: nobody is owed for more time than the tolerance above
  what was observed of it: the submitter's own window (confirmation to its
  results) and the best co-signer's observation, recomputed here from the
  settlement's own evidence with the documented tolerance (1 s or 5 %);
- ``penalised-honest``: no honest node's score is lowered for a message it
  forwarded honestly (a gossip validator rejects only for faults in the
  bytes; a replay, an expiry or a local limit is nobody's fault);
- ``book``: an advert stored in any book is newer than the one it replaced
  (the seq rule), unexpired at the node's clock, and signed by its peer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from p2pgpu.core import PeerMisbehaved, SignedAdvert, decode_cosign

from ._engine import SimulationStopped

#: The tolerance ``over-observed`` allows above an observation (the
#: documented one, docs/proofs.md; kept apart from ``ProofTerms`` on purpose).
tolerance_ms_floor = 1_000
tolerance_share_ppm = 50_000
cosigner_credit_ms = 1_000
#: A member back up this long before the deadline has time to resend its
#: stored proof (resends back off to at most 15 s, ``MemberConfig``).
resend_margin_us = 16_000_000


def tolerance(observed_ms: int) -> int:
    return max(tolerance_ms_floor, max(0, observed_ms) * tolerance_share_ppm // 1_000_000)


def _cosigns(wires: Any, verify: Any = None) -> list[Any]:
    out = []
    for wire in wires:
        try:
            out.append(decode_cosign(wire, verify=verify).cosign)
        except PeerMisbehaved:
            continue
    return out

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
        #: (job, member) whose run is going on now.
        self.running_now: dict[tuple[int, int], bool] = {}
        #: (job, member) that went down while its run was going on.
        self.went_down: dict[tuple[int, int], bool] = {}
        self.down_while_running = 0
        #: Of those, the ones another member still running could notice (the churn model's members lost).
        self.lost_expected: dict[tuple[int, int], bool] = {}
        #: (job, member) whose membership found it cut off from every other member.
        self.cut_off: dict[tuple[int, int], bool] = {}
        #: The submitter's clock at confirmation, and at each member's first results.
        self.confirmed_at_ms: dict[int, int] = {}
        self.results_at_ms: dict[tuple[int, int], int] = {}
        #: What each settled (job, member) is owed, and when the job settled (µs).
        self.owed_amounts: dict[tuple[int, int], int] = {}
        self.settled_at_us: dict[int, int] = {}
        #: Gossip rejections whose forwarder was an adversary (the rest are violations).
        self.rejected_adversaries = 0
        #: Lines paid less than their claim: beyond what was observed of them.
        self.capped = 0
        #: Honest members whose proof never came because their node went down
        #: after their part and lost its disk or came back too late.
        self.undeliverable = 0
        #: Honest (job, member) whose proof was missing at settlement -> when it is
        #: too late for it (µs): still missing then is an ``owed-time`` violation.
        self.missing_until_us: dict[tuple[int, int], int] = {}
        #: When each (job, member)'s part ended (µs), and each node's departures
        #: ``[down_us, up_us or None, lost its disk]``: a member that went down
        #: after its part, before its proof was taken, may be too late with it.
        self.ended_us: dict[tuple[int, int], int] = {}
        self.downs: dict[int, list[list[Any]]] = {}

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

    def on_down(self, node: int, *, lose_state: bool) -> None:
        self.downs.setdefault(node, []).append([self.world.engine.now_us, None, lose_state])

    def on_up(self, node: int) -> None:
        downs = self.downs.get(node)
        if downs and downs[-1][1] is None:
            downs[-1][1] = self.world.engine.now_us

    def _offline_after_part(self, key: tuple[int, int], until_us: int) -> bool:
        """The member's node went down after its part ended and either lost
        its disk (its proof with it) or was not back up ``resend_margin_us``
        before ``until_us`` (its stored proof had no time left to get there).
        An honest node in that state cannot be blamed on the protocol."""
        ended = self.ended_us.get(key)
        if ended is None:
            return False
        for down_us, up_us, lost in self.downs.get(key[1], []):
            if down_us >= ended and down_us <= until_us and (
                    lost or up_us is None or up_us > until_us - resend_margin_us):
                return True
        return False

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
        self.ended_us[(jid, node)] = self.world.engine.now_us
        self.running_now.pop((jid, node), None)

    def on_running(self, jid: int, node: int) -> None:
        self.running_now[(jid, node)] = True

    def on_member_down(self, jid: int, node: int) -> None:
        """A member went down while its run went on (a crash or a leave under churn)."""
        if self.running_now.pop((jid, node), None) is None:
            return
        self.went_down[(jid, node)] = True
        self.down_while_running += 1
        if any(j == jid and m != node for j, m in self.running_now):
            self.lost_expected[(jid, node)] = True

    def on_cut_off(self, jid: int, node: int) -> None:
        self.cut_off[(jid, node)] = True

    def on_confirmed_at(self, jid: int, submitter_ms: int) -> None:
        self.confirmed_at_ms[jid] = submitter_ms

    def on_results(self, jid: int, member: int, submitter_ms: int) -> None:
        self.results_at_ms.setdefault((jid, member), submitter_ms)

    def worth(self, jid: int, member: int) -> int:
        """What (job, member)'s real work is worth: GPU-ms at its price, capped by the ceiling."""
        ceiling = self.world.jobs.jobs[jid].manifest.price_per_gpu_hour_max
        return self.ran[(jid, member)] * min(self.world.nodes[member].price, ceiling) // 3_600_000

    # -- settlement -----------------------------------------------------------------------------
    def on_settled(self, jid: int, settled: Any) -> None:
        """``owed-time`` and ``over-observed`` on every line of one job's settlement."""
        self.settled_at_us[jid] = self.world.engine.now_us
        for line in settled.lines:
            self.on_line(jid, line, settled.lines)

    def on_line(self, jid: int, line: Any, lines: Any) -> None:
        """One member's line (at settlement, or a late one before the deadline)."""
        w = self.world
        job = w.jobs.jobs[jid]
        member = w.by_peer[line.peer_id]
        key = (jid, member)
        self.checks += 1
        # Paid as it went (installments) plus the line's remainder: what the member gets in all.
        got = (line.amount if line.payable else 0) + getattr(line, "prepaid", 0)
        self.owed_amounts[key] = got
        bound_ms = self._observed_bound_ms(jid, member, line, lines)
        if line.payable and bound_ms is not None and line.amount > 0:
            gpus = max(1, line.gpu_ms // max(1, line.served_ms)) if line.served_ms else 1
            if got > self._amount(jid, member, gpus * bound_ms):
                self.fail("over-observed", f"job {jid}: member {member} owed {got} for {line.served_ms} ms claimed, "
                          f"observed at most {bound_ms} ms with the tolerance")
        if line.payable and line.amount < line.gpu_ms * self._price(jid, member) // 3_600_000:
            self.capped += 1
        if w.nodes[job.submitter].adversary is not None or w.nodes[member].adversary is not None:
            return
        if key not in self.ran or key in self.went_down:
            return  # it never ran here, or its part ended with its node: nothing was proven
        true_gpu_ms = self.ran[key]
        gpus = job.manifest.gpus_per_node
        expected = self._amount(jid, member, true_gpu_ms if bound_ms is None else min(true_gpu_ms, gpus * bound_ms))
        if line.status == "missing":
            # Its proof may still come, late (held up by a partition), until the deadline.
            cfg = w.jobs.hconfig.settlement
            self.missing_until_us[key] = job.t_confirm_us + (job.manifest.duration_s_max * 1000
                                                             + cfg.settle_grace_ms + 1_000) * 1000
            return
        self.missing_until_us.pop(key, None)
        if key in self.cut_off:  # its own proof ends at its last contact: never more than that
            if got > expected:
                self.fail("owed-time", f"job {jid}: member {member}, cut off, owed {got} > {expected}")
            return
        if got != expected:
            self.fail("owed-time", f"job {jid}: honest member {member} is owed {got} ({line.status}: "
                      f"{line.reason}), its time served was worth {expected} (ran {true_gpu_ms} GPU-ms, "
                      f"observed {bound_ms} ms)")

    def _price(self, jid: int, member: int) -> int:
        return min(self.world.nodes[member].price, self.world.jobs.jobs[jid].manifest.price_per_gpu_hour_max)

    def _amount(self, jid: int, member: int, gpu_ms: int) -> int:
        return gpu_ms * self._price(jid, member) // 3_600_000

    def _observed_bound_ms(self, jid: int, member: int, line: Any, lines: Any) -> int | None:
        """The longest part anyone could vouch for, by the settlement's own
        evidence: the submitter's window (confirmation to the member's first
        results) and the best co-signature of it, each with the tolerance.
        ``0`` when a member it heard itself was watching (co-signed someone)
        and none saw it; ``None`` when nothing bounds it."""
        bounds = []
        confirmed, results = self.confirmed_at_ms.get(jid), self.results_at_ms.get((jid, member))
        if confirmed is not None and results is not None:
            window = max(0, results - confirmed)
            bounds.append(window + tolerance(window))
        observed = [c.last_seen_ms - c.first_seen_ms for c in _cosigns(line.cosigns, self.world.verify)
                    if c.subject == line.peer_id and c.observer != line.peer_id]
        if observed:
            credited = max(observed) + cosigner_credit_ms
            bounds.append(credited + tolerance(credited))
        else:
            every = [c for other in lines for c in _cosigns(other.cosigns, self.world.verify)]
            heard = {c.subject for c in every if c.observer == line.peer_id}
            if any(c.observer != line.peer_id and c.observer in heard for c in every):
                bounds.append(0)  # a member it heard was watching and saw nothing of it
        return min(bounds) if bounds else None

    # -- gossip ---------------------------------------------------------------------------------
    def on_rejected(self, node: int, forwarder: int, what: str) -> None:
        """``node``'s validator rejected a message ``forwarder`` sent it (its score drops)."""
        self.checks += 1
        if self.world.nodes[forwarder].adversary is not None:
            self.rejected_adversaries += 1
            return
        self.fail("penalised-honest", f"node {node} penalised honest node {forwarder} for {what}")

    # -- payments -----------------------------------------------------------------------------
    def on_owed(self, jid: int, member: int, amount: int) -> None:
        self.checks += 1
        if (jid, member) not in self.ran:
            self.fail("proof-before-pay", f"job {jid}: member {member} is owed {amount} but never ran")

    def on_installment_owed(self, jid: int, member: int, amount: int) -> None:
        """An interval owed while the job runs: only to a confirmed member that started it."""
        self.checks += 1
        if member not in self.confirmed.get(jid, []) or member not in self.started.get(jid, {}):
            self.fail("proof-before-pay", f"job {jid}: member {member} owed an installment of {amount} "
                      "without running as a member")

    def on_unpaid_stop(self, jid: int, member: int, exposure_ms: int, bound_ms: int) -> None:
        """``unpaid-exposure``: a member that stops for want of payment served
        at most one interval plus the claim delay and the grace unpaid."""
        self.checks += 1
        if exposure_ms > bound_ms:
            self.fail("unpaid-exposure", f"job {jid}: member {member} served {exposure_ms} ms unpaid before it "
                      f"stopped, over the bound of {bound_ms} ms")

    def on_paid(self, jid: int, member: int, proof_hash: bytes, amount: int, *, installment: bool = False) -> None:
        self.checks += 1
        if proof_hash in self.paid:
            self.fail("paid-once", f"proof {proof_hash.hex()[:16]} (job {jid}, member {member}) paid twice")
        self.paid[proof_hash] = amount
        if installment:  # paid while the job runs: its worth is checked at settlement (on_line, at_end)
            key = (jid, member)
            self.paid_by_member[key] = self.paid_by_member.get(key, 0) + amount
            return
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
        """Recount every node's holdings from scratch (catches a leak between
        reports); honest members whose proofs never came in time."""
        w = self.world
        for (jid, member), until in sorted(self.missing_until_us.items()):
            if w.engine.now_us > until and self._offline_after_part((jid, member), until):
                del self.missing_until_us[(jid, member)]  # its node went down with the proof undelivered
                self.undeliverable += 1
            elif w.engine.now_us > until:
                self.fail("owed-time", f"job {jid}: honest member {member} ran and stayed up, and its proof "
                          f"never reached the submitter before the deadline")
        for node, h in self.holds.items():
            self.checks += 1
            have = len(w.nodes[node].gpus)
            if w.nodes[node].adversary is None and sum(h.values()) > have:
                self.fail("capacity", f"node {node} holds {sum(h.values())} of {have} GPUs")

    def at_end(self) -> None:
        """``settled``: every member of a job settled before the end (the payer
        ticks every 2 s) of an honest submitter was paid exactly what it was owed."""
        w = self.world
        for (jid, m), owed in sorted(self.owed_amounts.items()):
            job = w.jobs.jobs[jid]
            if self.settled_at_us[jid] > w.end_us - 3_000_000 or w.nodes[job.submitter].adversary is not None:
                continue
            self.checks += 1
            got = self.paid_by_member.get((jid, m), 0)
            if got != owed:
                self.fail("settled", f"job {jid}: member {m} was paid {got}, owed {owed}")
