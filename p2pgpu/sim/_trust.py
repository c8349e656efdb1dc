"""Hardware challenges in the simulator: submitters challenge GPU claims, liars lose work.

The twin of ``p2pgpu/node/_challenge.py`` (issue #16).  Every submitter keeps
a :class:`~p2pgpu.core._challenge.ClaimBook` (the core's: verdicts, what to
challenge next, the view matching sees) and, every
``jobs.challenge_every_s``, challenges the claims its book says are due
among the live adverts (``ClaimBook.due``, a few a tick, as the node's
automatic challenger does).  Each challenge is real: signed by the
challenger with ``make_challenge`` (size and deadline from the model's
published throughput), answered and signed by the prover, and judged by the
core's ``judge`` with the elapsed time the simulator models: the round trip
between the two nodes plus the prover's compute at the throughput of the
device it **really** has (an honest node: the model it advertises; a
``gpu_liar``: its ``real_model``).  A node that is down gives no answer.
The outcome goes into the submitter's book after that elapsed time, and the
book's ``view`` is applied to the adverts the job's candidates are matched
from (``JobFlow.candidates``), as the node's advert book applies it, and
handed to the submitter's host (``Host(claims=)``): as on the node, the
formation cores propose and confirm no member whose claim it refused
(``core/_formation_rules.claim_fault``).

What the run reports (``stats``): challenges issued, passed and failed,
honest claims refused (should be none), and for the liars: jobs they were
confirmed in before and after the job's submitter refused their claim, and
how long after the start each liar was first refused.  The test-only
mutation ``challenge_blind`` records every outcome as passed (a challenger
that does not look), so that a test shows liars go undetected then;
``claims_ignored`` hands the hosts no verdicts (formation as before #16.1),
so that a test shows refused liars still win jobs then.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from p2pgpu.core import Advert
from p2pgpu.core._challenge import (
    ClaimBook,
    Outcome,
    Verdict,
    answer,
    commitment_of,
    host_ms_for,
    judge,
    make_challenge,
    model_key,
    model_spec,
)
from p2pgpu.core._formation_rules import ClaimView

if TYPE_CHECKING:
    from ._jobs import JobFlow

#: Claims one submitter challenges per tick at most (the node: one every 5 s).
challenges_per_tick_max = 4


class Challenges:
    """Submitters' hardware challenges (see the module doc)."""

    def __init__(self, flow: JobFlow) -> None:
        self.flow = flow
        w = flow.world
        self.every_us = int(flow.cfg.challenge_every_s * 1_000_000)
        self.enabled = self.every_us > 0 and flow.enabled
        #: Sim adverts are flagged simulated; here they stand for real claims (a
        #: strict network), so nothing is exempt.
        self.books: dict[int, ClaimBook] = {s: ClaimBook(allow_simulated=False) for s in flow.submitters}
        self.rng = w.engine.stream("challenges")
        self.issued = 0
        #: (submitter, peer id, model) of the exchanges under way.
        self.pending: dict[tuple[int, str, str], bool] = {}
        self.outcomes: dict[str, int] = {}
        self.honest_refused = 0
        #: liar node -> engine ms of its first refusal by any submitter.
        self.first_refused_ms: dict[int, int] = {}
        self.liar_jobs_before = 0
        self.liar_jobs_after = 0

    def start(self) -> None:
        if not self.enabled:
            return
        for i, s in enumerate(self.flow.submitters):
            # staggered so the submitters do not all challenge at the same instant
            self.flow.world.engine.at(3_000_000 + i * 100_000, self._tick, s)

    # -- challenging ----------------------------------------------------------------------------
    def _live(self) -> list[Advert]:
        w = self.flow.world
        now_ms = w.network_now_ms()
        return [sn.advert for sn in w.nodes if sn.advert is not None and sn.advert.expires_at_ms > now_ms]

    def _tick(self, submitter: int) -> None:
        w = self.flow.world
        if w.engine.now_us >= w.quiet_us:
            return
        book = self.books[submitter]
        me = w.nodes[submitter].identity
        if me is not None and w.net.up[submitter]:
            now = w.node_now_ms(submitter)
            for peer_id, model in book.due(self._live(), now, me=me.peer_id, limit=challenges_per_tick_max):
                if (submitter, peer_id, model) not in self.pending:  # one exchange at a time per claim
                    self._challenge(submitter, peer_id, model, now)
        w.engine.after(self.every_us, self._tick, submitter)

    def _challenge(self, submitter: int, peer_id: str, model: str, now_ms: int) -> None:
        w = self.flow.world
        prover = w.by_peer.get(peer_id)
        ident = w.nodes[submitter].identity
        spec = model_spec(model)
        if prover is None or ident is None or spec is None:
            return
        sc = make_challenge(ident, prover=peer_id, model=model, rng=self.rng, now_ms=now_ms)
        self.issued += 1
        n = sc.challenge.n
        psn = w.nodes[prover]
        adv = psn.adversary
        real_model = adv.real_gpu_model(psn.gpus[0].model) if adv is not None else psn.gpus[0].model
        real = model_spec(model_key(real_model) or "cpu") or spec
        compute_ms = -(-2 * n**3 // (real.gflops * 1_000_000)) + host_ms_for(n) // 2
        if not w.net.up[prover] or psn.identity is None:
            outcome = Outcome.NO_ANSWER
            elapsed_ms = sc.challenge.deadline_ms
        else:
            elapsed_ms = w.net.rtt_us(submitter, prover) // 1000 + compute_ms
            sa = answer(psn.identity, sc, "ok", commitment_of(sc.digest, b""))
            # Every prover computes the product honestly on the device it has: a
            # liar is caught by the clock (one that answered a guess in time
            # would fail Freivalds: WRONG, as tests/core covers).
            outcome = judge(sc, sa, elapsed_ms=elapsed_ms, product_ok=True)
        if w.mutation == "challenge_blind":
            outcome = Outcome.PASSED  # test-only breakage: a challenger that does not look
        # The challenger stops waiting at the deadline: a late answer is judged then.
        wait_ms = min(elapsed_ms, sc.challenge.deadline_ms + 1)
        self.pending[(submitter, peer_id, model)] = True
        w.engine.after(max(1, wait_ms) * 1000, self._record, (submitter, peer_id, model, outcome))

    def _record(self, arg: tuple[int, str, str, Outcome]) -> None:
        submitter, peer_id, model, outcome = arg
        self.pending.pop((submitter, peer_id, model), None)
        w = self.flow.world
        verdict = self.books[submitter].record(peer_id, model, outcome, w.node_now_ms(submitter))
        self.outcomes[outcome.value] = self.outcomes.get(outcome.value, 0) + 1
        w.engine.trace("challenge", submitter, peer_id, model, outcome.value)
        node = w.by_peer[peer_id]
        adv = w.nodes[node].adversary
        if verdict is Verdict.REFUSED:
            if adv is None or not adv.lies_about_gpu:
                self.honest_refused += 1
            elif node not in self.first_refused_ms:
                self.first_refused_ms[node] = w.engine.now_us // 1000

    # -- what matching sees, and what liars won ------------------------------------------------------
    def claims_of(self, node: int) -> ClaimView | None:
        """The verdicts ``node``'s formation cores use (``Host(claims=)``):
        its book's ``view`` if it challenges (a submitter), else none."""
        book = self.books.get(node) if self.enabled else None
        if book is None or self.flow.world.mutation == "claims_ignored":
            return None  # test-only breakage: formation as before #16.1, blind to the verdicts
        return book.view

    def view(self, submitter: int | None, adverts: list[Advert]) -> list[Advert]:
        """The adverts as the job's submitter's book lets matching see them."""
        book = self.books.get(submitter) if submitter is not None and self.enabled else None
        if book is None:
            return adverts
        now = self.flow.world.node_now_ms(submitter)  # type: ignore[arg-type]
        return [book.view(a, now) for a in adverts]

    def refused(self, submitter: int, node: int) -> bool:
        """Whether ``submitter``'s book refuses a claim of ``node``'s advert now."""
        w = self.flow.world
        book = self.books.get(submitter)
        adv = w.nodes[node].advert
        if book is None or adv is None:
            return False
        now = w.node_now_ms(submitter)
        return any(book.verdict(adv.peer_id, m, now) is Verdict.REFUSED for m in book.claims(adv))

    def on_confirmed(self, submitter: int, members: list[int]) -> None:
        if not self.enabled:
            return
        w = self.flow.world
        for m in members:
            adv = w.nodes[m].adversary
            if adv is not None and adv.lies_about_gpu:
                if self.refused(submitter, m):
                    self.liar_jobs_after += 1
                else:
                    self.liar_jobs_before += 1

    def stats(self) -> dict[str, Any]:
        if not self.enabled:
            return {}
        liars = [i for a in self.flow.world.adversaries if a.lies_about_gpu for i in a.nodes]
        firsts = sorted(self.first_refused_ms.values())
        return {
            "challenges_issued": self.issued,
            "challenge_outcomes": dict(sorted(self.outcomes.items())),
            "honest_claims_refused": self.honest_refused,
            "gpu_liars": len(liars),
            "gpu_liars_refused": len(firsts),
            "gpu_liar_first_refusal_s_max": round(firsts[-1] / 1000, 1) if firsts else None,
            "gpu_liar_first_refusal_s_p50": round(firsts[len(firsts) // 2] / 1000, 1) if firsts else None,
            "gpu_liar_jobs_before_refusal": self.liar_jobs_before,
            "gpu_liar_jobs_after_refusal": self.liar_jobs_after,
        }
