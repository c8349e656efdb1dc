"""A member whose node goes down after its part, before its proof reached the
submitter (#13, ``smoke.toml`` seed 60).

The node keeps what it hands over for a submitter in its ``deliveries``
table and resends it after a restart; the simulator's driver now does the
same (``JobFlow.outbox``), so a member back with its disk is still owed.  A
member whose disk went with it (or that came back too late to resend) lost
its signed proof: nothing can pay it, and the ``owed-time`` invariant no
longer calls that the protocol's fault (``proofs_undeliverable`` counts it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from p2pgpu.core import Send
from p2pgpu.sim import load_scenario, run_scenario, scenario_from_obj
from p2pgpu.sim._jobs import JobFlow

ROOT = Path(__file__).resolve().parents[2]
JOBS = {"run": {"nodes": 30, "duration_s": 60, "settle_s": 20}, "adverts": {"refresh_s": 60, "ttl_s": 180},
        "jobs": {"submitters": 1, "rate_per_s": 0.2, "duration_s": 7, "nodes_choices": [2]}}


def test_a_member_restarted_with_its_disk_resends_its_stored_proof(monkeypatch: Any) -> None:
    """The first honest member to finish goes down before any of its results
    leave (its sends are cut), and comes back 3 s later with its disk: its
    stored proof goes out again and it is owed its time.  Before, the
    restarted node's host began empty, the proof was never sent, and the run
    stopped on ``owed-time``."""
    chosen: dict[str, Any] = {}
    original_end, original_carry = JobFlow._end, JobFlow.carry

    def end(self: JobFlow, arg: tuple[int, str, int, bool]) -> None:
        node, job_id = arg[0], arg[1]
        job = self.jobs[self._jid(job_id)]
        if not chosen and node != job.submitter and self.world.nodes[node].adversary is None:
            chosen.update(node=node, jid=job.jid, silent=True)
            w = self.world
            w.engine.after(1_000, lambda _: w.node_down(node, crash=True, lose_state=False), None)
            w.engine.after(3_000_000, lambda _: (chosen.update(silent=False), w.node_up(node)), None)
        original_end(self, arg)

    def carry(self: JobFlow, node: int, actions: list[Any]) -> None:
        if chosen.get("silent") and node == chosen["node"]:
            actions = [a for a in actions if not isinstance(a, Send)]
        original_carry(self, node, actions)

    monkeypatch.setattr(JobFlow, "_end", end)
    monkeypatch.setattr(JobFlow, "carry", carry)
    r = run_scenario(scenario_from_obj(JOBS), 1, plots=False)
    assert chosen, "no member finished"
    assert r.ok, r.violations
    key = (chosen["jid"], chosen["node"])
    assert key in r.world.checker.results_at_ms, "its proof reached the submitter after the restart"
    line = next(ln for ln in r.world.jobs.jobs[chosen["jid"]].settled.lines
                if r.world.by_peer[ln.peer_id] == chosen["node"])
    assert line.payable and line.amount > 0, line
    assert r.summary["proofs_undeliverable"] == 0


def test_a_member_that_lost_its_disk_with_its_proof_is_not_an_owed_time_violation() -> None:
    """``smoke.toml`` seed 60: member 66 of job 16 finished while a partition
    cut it off from the submitter, went down with its disk before the heal,
    and its proof never came.  Nobody can pay a proof that no longer
    exists: the run is clean and counts it."""
    r = run_scenario(load_scenario(ROOT / "simulations" / "smoke.toml", []), 60, plots=False)
    assert r.ok, r.violations
    assert r.summary["proofs_undeliverable"] >= 1
    assert (16, 66) in r.world.checker.ended_us


LONG_PARTITION = {"run": {"nodes": 40, "duration_s": 110, "settle_s": 10}, "adverts": {"refresh_s": 30, "ttl_s": 120},
                  "jobs": {"submitters": 2, "rate_per_s": 0.5, "duration_s": 10, "nodes_choices": [1]},
                  "partition": [{"at_s": 20, "heal_s": 100, "split": "fraction:0.5"}]}


def test_a_proof_a_partition_holds_past_the_deadline_is_not_an_owed_time_violation() -> None:
    """``partition-heal.toml`` seed 2: a member finished on the far side of a
    partition from its submitter, and the partition outlasted the job's
    settlement deadline (``duration_s_max`` + 30 s): its proof could not
    arrive.  The deadline is finite by design, so the run is clean and
    counts it; a member whose proof could have arrived still must be owed."""
    r = run_scenario(scenario_from_obj(LONG_PARTITION), 1, plots=False)
    assert r.ok, r.violations
    assert r.summary["proofs_partitioned_past_deadline"] >= 1
    assert r.summary["jobs_completed"] > 10


def test_a_submitter_restarted_while_its_job_forms_takes_it_up_again(monkeypatch: Any) -> None:
    """#13.1, in the simulator as on the node: the submitter goes down (with
    its disk) the moment a volunteer holds GPUs for its first job under a
    lease, before it could confirm it, and comes back 3 s later.  The job it
    stored as forming forms again (``Host.resume_submitted``) and runs.
    Before, the restarted host knew nothing of it: the volunteers kept their
    GPUs until its deadline and the job failed."""
    from p2pgpu.core import Reserved
    from p2pgpu.sim._jobs import JobState

    chosen: dict[str, Any] = {}
    original_carry = JobFlow.carry

    def carry(self: JobFlow, node: int, actions: list[Any]) -> None:
        original_carry(self, node, actions)
        for a in actions:
            job = self.jobs.get(self._jid(a.job_id)) if isinstance(a, Reserved) else None
            if job is not None and not chosen and job.state is JobState.FORMING and node != job.submitter:
                chosen.update(jid=job.jid, submitter=job.submitter)
                w, sub = self.world, job.submitter

                def down(_: Any, w: Any = w, sub: int = sub) -> None:
                    w.node_down(sub, crash=True, lose_state=False)

                def up(_: Any, w: Any = w, sub: int = sub) -> None:
                    w.node_up(sub)

                w.engine.after(1, down, None)
                w.engine.after(3_000_000, up, None)

    monkeypatch.setattr(JobFlow, "carry", carry)
    r = run_scenario(scenario_from_obj(JOBS), 1, plots=False)
    assert chosen, "no volunteer held GPUs for a job"
    assert r.ok, r.violations
    job = r.world.jobs.jobs[chosen["jid"]]
    assert job.state is JobState.DONE, (job.state, job.reason)
    assert job.t_confirm_us - job.t_submit_us >= 3_000_000  # confirmed after the submitter came back
