"""The job's state the submitter's node writes when the settlement core
settles it (node/_collect.py ``Collector.settled``): succeeded, failed, or —
when the submitter had cancelled it — cancelled.  Members' proofs that came
after a cancellation used to turn a cancelled job "failed" (seen in the full
run: the SDK's cancel example printed "ended failed: cancelled by the
submitter")."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from p2pgpu.core._actions import Settled
from p2pgpu.node._collect import Collector


@pytest.mark.parametrize(("succeeded", "cancelled", "state"),
                         [(True, False, "succeeded"), (False, False, "failed"), (False, True, "cancelled")])
def test_the_settled_state_says_cancelled_for_a_cancelled_job(succeeded: bool, cancelled: bool, state: str) -> None:
    rec = SimpleNamespace(state="running", reason="", ended_at_ms=None, extra={})
    due: list[str] = []
    jobs = SimpleNamespace(record=lambda job_id: rec, db=None,
                           node=SimpleNamespace(payouts_due=lambda: due.append("due")))
    collector = Collector(jobs)  # type: ignore[arg-type]
    collector.settled(Settled(job_id="j" * 64, succeeded=succeeded, reason="" if succeeded else "why",
                              currency="SOL", settled_at_ms=5, lines=(), outputs={}, cancelled=cancelled))
    assert rec.state == state and rec.ended_at_ms == 5 and due == ["due"]
