"""Pay as you go in the simulator: installments paid with a notice, and workers' exposure measured.

The hosts run ``core/_installments.py`` as the node does (claims, the
submitter's checks, the member's stop when unpaid).  This module is only the
driver's part: an ``InstallmentsOwed`` joins the submitter's modelled outbox
(paid at its next payer tick, like any owed row, unless the submitter is a
``never_pay`` adversary), and once paid the member gets the submitter's
signed ``paid`` notice over the modelled network.  When a member stops a job
because an installment is overdue, what it served unpaid (its time since it
started minus the intervals it was paid) is its **exposure**; the
``unpaid-exposure`` invariant holds it to the documented bound, one interval
plus the claim delay plus the grace (docs/payouts.md), and the run's metrics
report it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from p2pgpu.core._actions import InstallmentsOwed
from p2pgpu.core._payout import Owed as PayoutOwed

if TYPE_CHECKING:
    from ._jobs import JobFlow


class Payg:
    """The simulator's side of pay as you go (see the module doc)."""

    def __init__(self, flow: JobFlow) -> None:
        self.flow = flow
        #: owed id -> (job id, member's peer id, key): the notice to send once it is paid.
        self.notices: dict[int, tuple[str, str, bytes]] = {}
        self.installments_owed = 0
        self.installments_paid = 0
        #: (job, member) -> ms it served unpaid when it stopped for want of payment.
        self.exposure_ms: dict[tuple[int, int], int] = {}

    def owed(self, submitter: int, a: InstallmentsOwed) -> None:
        """The submitter's core owes these intervals: into its outbox (a
        ``never_pay`` submitter records them and never pays)."""
        flow, w = self.flow, self.flow.world
        jid = flow._jid(a.job_id)
        sub = w.nodes[submitter]
        for r in a.rows:
            member = w.by_peer[r.peer_id]
            self.installments_owed += 1
            w.checker.on_installment_owed(jid, member, r.amount)
            if sub.adversary is not None and sub.adversary.never_pays:
                continue
            owed_id = flow._next_owed
            flow._next_owed += 1
            flow.owed_meta[owed_id] = (jid, member)
            flow.owed.setdefault(submitter, []).append(PayoutOwed(
                owed_id=owed_id, proof_hash=r.key, payout_address=w.nodes[member].payout_address,
                amount=r.amount, currency="SOL"))
            self.notices[owed_id] = (a.job_id, r.peer_id, r.key)

    def paid(self, submitter: int, owed_id: int) -> bool:
        """A row was paid: if it is an installment, the member hears so (True)."""
        notice = self.notices.pop(owed_id, None)
        if notice is None:
            return False
        job_id, peer_id, key = notice
        w = self.flow.world
        ident = w.nodes[submitter].identity
        assert ident is not None
        self.installments_paid += 1
        # The host sends the notice, and again until the member acknowledges it
        # (core/_notices.py); its own job's notice it handles itself.
        host = self.flow.host(submitter)
        self.flow.carry(submitter, host.notify_paid(job_id, peer_id, key, f"sim-{owed_id}",
                                                    w.node_now_ms(submitter)))
        return True

    def stopped(self, node: int, job_id: str) -> None:
        """A member stops a job whose installment is overdue: its exposure, checked against the bound."""
        flow, w = self.flow, self.flow.world
        run = flow.runs.get((node, job_id))
        h = flow.hosts[node]
        mr = h.members.get(job_id) if h is not None else None
        if run is None or mr is None or mr.pay is None:
            return
        pay = mr.pay
        served = w.node_now_ms(node) - run.started_node_ms
        exposure = served - len(pay.paid) * pay.interval_ms
        jid = flow._jid(job_id)
        self.exposure_ms[(jid, node)] = exposure
        w.checker.on_unpaid_stop(jid, node, exposure, self.bound_ms(pay.interval_ms))

    def bound_ms(self, interval_ms: int) -> int:
        """One interval, the claim delay and the scenario's grace (docs/payouts.md)."""
        return interval_ms + self.flow.hconfig.installments.claim_delay_ms + self.flow.cfg.payment_grace_s * 1000

    def stats(self) -> dict[str, Any]:
        if not self.flow.cfg.interval_s:
            return {}
        exp = sorted(self.exposure_ms.values())
        return {
            "installments_owed": self.installments_owed,
            "installments_paid": self.installments_paid,
            "unpaid_stops": len(exp),
            "unpaid_exposure_ms_max": exp[-1] if exp else None,
            "unpaid_exposure_ms_p50": exp[len(exp) // 2] if exp else None,
            "unpaid_exposure_bound_ms": self.bound_ms(self.flow.cfg.interval_s * 1000),
        }
