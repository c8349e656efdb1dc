"""A stop that reaches a member's runner races its command's end (#13.4).

``Runner.run`` decided "stopped" from ``scope.cancelled_caught``, which says
where the cancellation happened to land, not whether the stop reached the
command: a stop arriving just after the command ended on its own, while the
sandbox drained its pipes and sealed its outputs, cancelled that cleanup,
and a job whose command had exited 0 was reported ``cancelled`` with exit
137 and no outputs; the same stop a moment later (in the shielded disk
removal) left the true outcome.  Now the outcome is decided by whether the
stop came before the command ended: after it, the stop has nothing to stop
and the command's own outcome (exit status, outputs) stands.

A real sandbox (bubblewrap) and a real ``JobsService`` + ``Runner``; the
stop is delivered from the sandbox's own ``on_ended`` callback, i.e. at the
first moment the command is known to have ended.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from random import Random
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from p2pgpu.core import Identity
from p2pgpu.core._actions import StartJob, StopJob
from p2pgpu.core._formation_messages import Accept, Certificate, Proposal
from p2pgpu.core._manifest import Manifest, sign_manifest
from p2pgpu.core._member import PartEnded
from p2pgpu.node import _runner
from p2pgpu.node._jobs import JobsService
from p2pgpu.node._runner import Runner
from p2pgpu.runtime import SandboxPolicy, check_sandbox

pytestmark = pytest.mark.skipif(check_sandbox() is not None, reason=f"no sandbox here: {check_sandbox()}")

T0 = 1_800_000_000_000
PAYER = "11111111111111111111111111111111"
S, A = (Identity.from_rng(Random(i)) for i in (11, 12))


def start_of(command: tuple[str, ...]) -> StartJob:
    m = Manifest(name="stop-race", submitter=S.peer_id, created_at_ms=T0, expires_at_ms=T0 + 600_000,
                 nonce=b"r" * 16, nodes=1, gpus_per_node=1, command=command, duration_s_max=60,
                 price_per_gpu_hour_max=3_600_000, payer=PAYER)
    sm = sign_manifest(S, m)
    prop = Proposal.sign(A, job_id=sm.job_id, view=0, round=0, members=(A.peer_id,), gpus_per_member=1)
    accept = Accept.sign(A, proposal=prop, lease_until_ms=T0 + 60_000, price_per_gpu_hour=3_600_000,
                         payout_address="")
    return StartJob(job_id=sm.job_id, manifest=sm, certificate=Certificate(proposal=prop, accepts=(accept,)),
                    member_index=0, confirm=b"")


def member(tmp_path: Path) -> tuple[JobsService, Runner, list[PartEnded]]:
    node = SimpleNamespace(identity=A, counts=Counter(), now_ms=lambda: T0 + int(trio.current_time() * 1000),
                           payout_address="me", book=SimpleNamespace(adverts={}), payouts_due=lambda: None,
                           inventory=SimpleNamespace(gpus=[SimpleNamespace(uuid_hash="", gpu_class="g")],
                                                     simulated=True), blobs=None)
    jobs = JobsService(node, rng=Random(0))  # type: ignore[arg-type]
    jobs._send_out = lambda peer_id, data: None  # type: ignore[method-assign]
    runner = Runner(jobs, root=tmp_path / "jobs", policy=SandboxPolicy())
    parts: list[PartEnded] = []
    ended = jobs.host.member_ended

    def capture(job_id: str, part: PartEnded, now_ms: int, **kw: Any) -> Any:
        parts.append(part)
        return ended(job_id, part, now_ms, **kw)

    jobs.host.member_ended = capture  # type: ignore[method-assign]
    return jobs, runner, parts


def run(tmp_path: Path, command: tuple[str, ...], *, stop_when_ended: bool, stop_after_s: float | None = None,
        monkeypatch: pytest.MonkeyPatch) -> tuple[PartEnded, Any]:
    jobs, runner, parts = member(tmp_path)
    start = start_of(command)
    rec = jobs._record(start.manifest, T0, ours=True)
    rec.roles.append("member")
    stop = StopJob(job_id=start.job_id, reason="cancelled by the submitter", cause="cancelled")
    real = _runner.run_job

    async def run_job(*args: Any, on_ended: Any = None, **kw: Any) -> Any:
        def ended(t: int) -> None:
            on_ended(t)
            if stop_when_ended:
                runner.stop(stop)  # the stop arrives as the command is known to have ended
        return await real(*args, on_ended=ended, **kw)

    monkeypatch.setattr(_runner, "run_job", run_job)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner.run, start)
            if stop_after_s is not None:
                await trio.sleep(stop_after_s)
                runner.stop(stop)

    trio.run(main)
    (part,) = parts
    return part, rec


def test_a_stop_after_the_command_ended_leaves_its_outcome_and_outputs(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    part, rec = run(tmp_path, ("sh", "-c", "echo done > out.txt"), stop_when_ended=True, monkeypatch=monkeypatch)
    assert (part.stopped, part.end_reason, part.exit_code) == (False, "exited", 0), part
    assert [o["path"] for o in part.outputs] == ["out.txt"]
    assert rec.extra["member_state"] == "succeeded"


def test_a_stop_while_the_command_runs_stops_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    part, rec = run(tmp_path, ("sleep", "30"), stop_when_ended=False, stop_after_s=2.0, monkeypatch=monkeypatch)
    assert (part.stopped, part.end_reason, part.exit_code) == (True, "cancelled", 137), part
    assert part.ended_at_ms - part.started_at_ms < 20_000
    assert rec.extra["member_state"] == "failed"
