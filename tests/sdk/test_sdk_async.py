"""The trio flavour of the SDK (:class:`p2pgpu.AsyncClient`) against real
daemons: submit, wait with an async progress callback, follow logs as an
async iterator, fetch results, cancel, time out; and two jobs followed
concurrently in one nursery."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import trio
from sdk_jobs import exits, sleeper, ticking, writes_file

from p2pgpu import AsyncClient, JobFailed, JobStatus, Progress, Timeout
from p2pgpu.localnet import LocalNet

pytestmark = pytest.mark.processes


def aclient(net: LocalNet) -> AsyncClient:
    return AsyncClient(net.nodes[0].home.path)


async def test_submit_wait_logs_results(net: LocalNet, tmp_path: Path) -> None:
    c = aclient(net)
    job = await c.submit(writes_file("async-writer"))
    lines: list[str] = []

    async def progress(p: Progress) -> None:
        await trio.lowlevel.checkpoint()  # a coroutine callback is awaited
        lines.append(p.line)

    st = await job.wait(progress=progress, timeout_s=120)
    assert st.succeeded and lines and lines[-1].startswith("succeeded")
    got = [ln.line async for ln in job.logs()]
    assert sorted(got) == ["first", "second"]
    files = await job.results(tmp_path / "out")
    assert [f.path for f in files] == ["out.txt"]
    assert hashlib.sha256(files[0].saved_as.read_bytes()).hexdigest() == files[0].sha256
    assert c.last_latency_s["job.status"] >= 0


async def test_follow_two_jobs_at_once(net: LocalNet) -> None:
    c = aclient(net)
    a = await c.submit(ticking("tick-a", ticks=4, every_s=0.3))
    b = await c.submit(ticking("tick-b", ticks=4, every_s=0.3))
    got: dict[str, list[str]] = {}

    async def follow(job: object) -> None:
        got[job.name] = [ln.line async for ln in job.logs(follow=True, poll_interval_s=0.1)]  # type: ignore[attr-defined]

    async with trio.open_nursery() as n:
        n.start_soon(follow, a)
        n.start_soon(follow, b)
    want = [f"tick {i}" for i in range(1, 5)]
    assert got == {"tick-a": want, "tick-b": want}


async def test_failed_cancelled_and_timeout(net: LocalNet) -> None:
    c = aclient(net)
    failed = await c.submit(exits(7, "async-exits"))
    with pytest.raises(JobFailed, match="exited with code 7"):
        await failed.wait(timeout_s=120)
    slow = await c.submit(sleeper("async-sleeper", sleep_s=30))
    with pytest.raises(Timeout, match="still"):
        await slow.wait(timeout_s=1)
    st: JobStatus = await slow.cancel()
    assert st.job_id == slow.id
    final = await slow.wait(timeout_s=60, check=False)
    assert final.state == "cancelled" and final.reason


async def test_wait_is_cancellable(net: LocalNet) -> None:
    c = aclient(net)
    job = await c.submit(sleeper("async-cancel-scope", sleep_s=20))
    with trio.move_on_after(1) as scope:
        await job.wait(timeout_s=120)
    assert scope.cancelled_caught  # trio's cancellation reaches the wait (nothing runs on in the background)
    await job.cancel()
