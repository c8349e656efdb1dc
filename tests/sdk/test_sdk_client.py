"""The synchronous SDK against real node daemons (issue 17: "the SDK drives
real daemons: submit, wait with progress, logs, results, cancel").

Each test submits through :class:`p2pgpu.Client` on node 0 of a LocalNet of
two ``p2pgpu node run`` processes, and checks what it gets back against what
the daemons themselves report.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from sdk_jobs import exits, sleeper, ticking, writes_file

import p2pgpu
from p2pgpu import Client, JobFailed, Progress
from p2pgpu.localnet import LocalNet

pytestmark = pytest.mark.processes
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "jobs"


def client(net: LocalNet, i: int = 0) -> Client:
    return Client(net.nodes[i].home.path)


def test_submit_a_path_wait_with_progress_and_read_logs(net: LocalNet) -> None:
    c = client(net)
    job = c.submit(EXAMPLES / "hello.toml")
    assert len(job.id) == 64 and job.name == "hello"
    seen: list[Progress] = []
    st = job.wait(progress=seen.append, timeout_s=120)
    assert st.succeeded and st.state == "succeeded" and st.reason == ""
    assert len(st.members) == 1 and st.certificate_hash
    # Progress was reported each time the line changed, ending in the final state.
    assert seen and seen[-1].state == "succeeded" and seen[-1].status.state == "succeeded"
    assert len({p.line for p in seen}) == len(seen), "progress repeats a line"
    assert any("cluster of 1" in p.line for p in seen)
    # The daemon agrees.
    assert net.nodes[0].call("job.status", {"job_id": job.id})["state"] == "succeeded"
    lines = [ln.line for ln in job.logs()]
    assert lines == ["hello from p2pgpu", "this file came inline with the manifest"]
    assert {ln.member for ln in job.logs()} == set(st.members)


def test_results_are_fetched_and_match_their_hashes(net: LocalNet, tmp_path: Path) -> None:
    c = client(net)
    job = c.submit(writes_file())
    st = job.wait(timeout_s=120)
    files = job.results(tmp_path / "out")
    assert len(files) == 1
    f = files[0]
    assert f.path == "out.txt" and f.member == st.members[0]
    data = f.saved_as.read_bytes()
    assert data == b"result of the job\n"
    assert hashlib.sha256(data).hexdigest() == f.sha256 and f.size_bytes == len(data)
    assert f.saved_as.is_relative_to((tmp_path / "out").resolve())
    # stdout and stderr lines keep their stream.
    by_stream = {ln.stream: ln.line for ln in job.logs()}
    assert by_stream == {"stdout": "first", "stderr": "second"}


def test_logs_follow_yields_lines_while_the_job_runs(net: LocalNet) -> None:
    c = client(net)
    job = c.submit(ticking(ticks=6, every_s=0.5))
    arrivals: list[tuple[float, str]] = []
    for ln in job.logs(follow=True, poll_interval_s=0.1):
        arrivals.append((time.monotonic(), ln.line))
    assert [a[1] for a in arrivals] == [f"tick {i}" for i in range(1, 7)]
    # The follower returned because the job ended, not because the lines stopped.
    assert job.status().done
    # Lines came as they were written (spread over the run), not in one batch at the end.
    assert arrivals[-1][0] - arrivals[0][0] >= 1.0


def test_cancel_stops_the_job_and_wait_says_cancelled(net: LocalNet) -> None:
    c = client(net)
    job = c.submit(sleeper(sleep_s=30))
    deadline = time.monotonic() + 60
    while job.status().state not in ("confirmed", "running") and time.monotonic() < deadline:
        time.sleep(0.2)
    started = time.monotonic()
    st = job.cancel()
    assert st.job_id == job.id
    with pytest.raises(JobFailed) as info:
        job.wait(timeout_s=60)
    assert time.monotonic() - started < 20, "the command alone would run 30 s"
    exc = info.value
    assert exc.state == "cancelled" and exc.job_id == job.id
    assert exc.reason and "cancel" in exc.reason.lower(), exc.reason
    assert exc.status.state == "cancelled"
    assert "cancelled" in str(exc) and exc.reason in str(exc)


def test_a_failed_job_says_why(net: LocalNet) -> None:
    c = client(net)
    job = c.submit(exits(3))
    with pytest.raises(JobFailed) as info:
        job.wait(timeout_s=120)
    exc = info.value
    assert exc.state == "failed"
    assert "exited with code 3" in exc.reason, exc.reason
    # check=False returns the status instead, with the same reason.
    st = job.wait(timeout_s=5, check=False)
    assert st.state == "failed" and st.reason == exc.reason
    assert st.to_json()["reason"] == exc.reason


def test_formation_failure_names_the_requirement(net: LocalNet) -> None:
    c = client(net)
    manifest = writes_file("nobody") | {"expires_in_s": 3}
    manifest["requirements"] = {"nodes": 1, "gpus_per_node": 1, "models": ["NVIDIA B200"]}
    job = c.submit(manifest)
    with pytest.raises(JobFailed) as info:
        job.wait(timeout_s=60)
    reason = info.value.reason
    assert "no cluster formed" in reason, reason
    assert "GPU model" in reason and "0 pass" in reason, reason


def test_market_filters_by_requirements(net: LocalNet) -> None:
    c = client(net)
    everyone = {r["peer_id"] for r in c.market()}
    assert everyone == {n.peer_id for n in net.nodes}
    # Adverts carry free GPUs: a node whose previous test's job is still
    # being released advertises 0 free until its next advert, so wait for it.
    deadline = time.monotonic() + 30
    while {r["peer_id"] for r in c.market({"models": ["L4"], "gpus_per_node": 1})} != everyone:
        assert time.monotonic() < deadline, c.market()
        time.sleep(0.5)
    assert c.market({"gpus_per_node": 2}) == []  # every node has one GPU
    assert c.market({"vram_gb_min": 80}) == []
    assert c.market({"price_per_gpu_hour_max": 0}) == []  # every advert asks a price
    assert c.market(model="H100") == []


def test_status_peers_jobs_payouts_earnings_and_wallet(net: LocalNet) -> None:
    c = client(net)
    job = c.submit(EXAMPLES / "hello.toml")
    job.wait(timeout_s=120)
    st = c.status()
    assert st["peer_id"] == net.nodes[0].peer_id and st["adverts_known"] == 2
    assert {p["peer_id"] for p in c.peers()} == {net.nodes[1].peer_id}
    assert job.id in {j.job_id for j in c.jobs()}
    assert any(j.job_id == job.id and j.raw["roles"][0] == "submitter" for j in c.jobs())
    assert any(p["job_id"] == job.id for p in c.payouts())  # owed (the embedded ledger may not pay a stranger)
    worker = next(n for n in net.nodes if n.peer_id in job.status().members)
    assert any(e["job_id"] == job.id for e in Client(worker.home.path).earnings())
    w = c.wallet()
    assert w["address"] and w["ledger"] == "embedded" and isinstance(w["balance"], int)
    # network.jobs: every job node 1 has seen, with the cluster where it saw the confirmation.
    seen = {r["job_id"]: r for r in Client(net.nodes[1].home.path).network_jobs()}
    assert seen[job.id]["submitter"] == net.nodes[0].peer_id and seen[job.id]["members"]


def test_top_level_exports_are_the_sdk() -> None:
    assert p2pgpu.Client is p2pgpu.sdk.Client
    assert issubclass(p2pgpu.BadManifest, p2pgpu.RequestRefused)
    assert issubclass(p2pgpu.Timeout, TimeoutError) and issubclass(p2pgpu.Timeout, p2pgpu.P2pgpuError)
