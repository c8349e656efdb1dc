"""Execution and work proofs through real node processes (issue 4).

- a 2-node job whose command writes a file and prints lines: the submitter
  gets both members' logs and files, byte-identical, and two valid proofs;
- a 3-replica job where one member lies about its output: the quorum's
  digest wins and nothing is owed to the odd one out;
- a member killed mid-job is detected within the heartbeat timeout, the job
  follows its policy, and the proofs cover exactly the time served;
- the store survives ``kill -9``: after a restart nothing recorded is lost
  or duplicated.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from e2e_jobs import sleep_job

from p2pgpu.localnet import LocalNet

pytestmark = pytest.mark.processes
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "jobs"
ONE_GPU = [("NVIDIA L4", 23034, "8.9", 1)]


def submit(net: LocalNet, manifest: Path | str, *, node: int = 0) -> str:
    text = manifest.read_text() if isinstance(manifest, Path) else manifest
    return net.nodes[node].call("job.submit", {"manifest": text})["job_id"]


def wait_state(net: LocalNet, job_id: str, states: tuple[str, ...], *, node: int = 0, timeout_s: float = 90) -> dict:
    return net.wait_until(
        lambda: (lambda d: d if d["state"] in states else None)(net.nodes[node].call("job.status", {"job_id": job_id})),
        timeout_s=timeout_s, what=f"job {job_id[:12]} to reach {states}")


def test_two_node_job_returns_logs_files_and_two_valid_proofs(tmp_path: Path) -> None:
    with LocalNet(tmp_path, 3, gpu_mix=ONE_GPU) as net:
        job = submit(net, EXAMPLES / "pair.toml")
        doc = wait_state(net, job, ("succeeded", "failed"))
        assert doc["state"] == "succeeded", doc
        members = doc["cluster"]["members"]
        assert len(members) == 2 and len(set(members)) == 2
        proofs = doc["proofs"]
        assert sorted(p["worker"] for p in proofs) == sorted(members)
        assert all(p["status"] == "owed" and p["amount"] > 0 and p["exit_code"] == 0 for p in proofs), proofs
        logs = net.nodes[0].call("job.logs", {"job_id": job})
        for rank in (0, 1):
            assert any(ln["line"] == f"rank {rank} of 2" for ln in logs), logs
        assert {ln["member"] for ln in logs} == set(members)
        out = tmp_path / "out"
        res = subprocess.run([sys.executable, "-m", "p2pgpu.cli", "job", "results", job, "--out", str(out),
                              "--home", str(net.nodes[0].home.path), "--json"],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        files = json.loads(res.stdout)["files"]
        assert len(files) == 2
        by_peer = {n.peer_id: n for n in net.nodes}
        for f in files:
            got = Path(f["saved_as"]).read_bytes()
            member_copy = (by_peer[f["member"]].home.path / "jobs" / job / "work" / f["path"]).read_bytes()
            assert got == member_copy  # byte-identical to what the member wrote
            assert hashlib.sha256(got).hexdigest() == f["sha256"]
            rank = members.index(f["member"])
            assert got.decode().startswith(f"rank {rank} of 2: ")
        # Each member's own record shows the cluster too.
        for peer in members:
            st = by_peer[peer].call("job.status", {"job_id": job})
            assert st["cluster"]["members"] == members
            assert st["cluster"]["certificate_hash"] == doc["cluster"]["certificate_hash"]


def test_replicated_job_quorum_pays_nobody_outside_it(tmp_path: Path) -> None:
    # Node 3 lies about its output; the manifest asks for 3 replicas, quorum 2.
    liar = 3
    manifest = (EXAMPLES / "replicated.toml").read_text()
    with LocalNet(tmp_path, 4, gpu_mix=ONE_GPU, node_config={liar: 'adversary = "tamper_output"'}) as net:
        # Submit from a node that cannot be chosen if the cluster fills with the
        # others first; whoever is chosen, the liar must not be paid.
        for attempt in range(4):
            job = submit(net, manifest)
            doc = wait_state(net, job, ("succeeded", "failed"), timeout_s=120)
            if net.nodes[liar].peer_id in doc["cluster"]["members"]:
                break
        else:
            pytest.fail("the lying node was never chosen in 4 replicated jobs")
        proofs = {p["worker"]: p for p in doc["proofs"]}
        assert len(proofs) == 3
        liar_proof = proofs[net.nodes[liar].peer_id]
        assert liar_proof["status"] == "outside_quorum" and liar_proof["amount"] == 0, liar_proof
        honest = [p for w, p in proofs.items() if w != net.nodes[liar].peer_id]
        assert all(p["status"] == "owed" and p["amount"] > 0 for p in honest), honest
        assert len({p["output_digest"] for p in honest}) == 1
        assert liar_proof["output_digest"] != honest[0]["output_digest"]
        assert doc["state"] == "succeeded"
        owed_to = {p["worker"] for p in doc["payouts"]}
        assert net.nodes[liar].peer_id not in owed_to


LONG_JOB = sleep_job("long", nodes=3, sleep_s=20)


def test_member_killed_mid_job_is_detected_and_proofs_cover_time_served(tmp_path: Path) -> None:
    with LocalNet(tmp_path, 4, gpu_mix=ONE_GPU) as net:
        job = submit(net, LONG_JOB)
        doc = wait_state(net, job, ("running", "confirmed"), timeout_s=60)
        members = doc["cluster"]["members"]
        victim = next(n for n in net.nodes if n.peer_id in members and n.index != 0)
        net.wait_until(lambda: victim.call("job.status", {"job_id": job})["state"] == "running", timeout_s=30,
                       what="the victim to run")
        time.sleep(1.5)
        killed_at_ms = time.time_ns() // 1_000_000
        net.terminate(victim.index, sig=signal.SIGKILL)
        doc = wait_state(net, job, ("succeeded", "failed"), timeout_s=90)
        assert doc["state"] == "failed"
        proofs = {p["worker"]: p for p in doc["proofs"]}
        assert proofs[victim.peer_id]["status"] == "missing"
        survivors = [m for m in members if m != victim.peer_id]
        by_peer = {n.peer_id: n for n in net.nodes}
        for peer in survivors:
            st = by_peer[peer].call("job.status", {"job_id": job})
            ended, started = st["member_ended_at_ms"], st["member_started_at_ms"]
            # Stopped by the "fail" policy within the heartbeat timeout (3 s) plus
            # scheduling slack, long before the command's own 20 s.
            assert ended - killed_at_ms < 8_000, (ended - killed_at_ms)
            p = proofs[peer]
            assert p["status"] == "owed", p
            served = ended - started
            assert abs(p["gpu_ms"] - served) <= 1_000, (p["gpu_ms"], served)
            assert p["gpu_ms"] < 15_000


def test_store_survives_kill_9_without_loss_or_duplicates(tmp_path: Path) -> None:
    with LocalNet(tmp_path, 3, gpu_mix=ONE_GPU) as net:
        job = submit(net, EXAMPLES / "pair.toml")
        before = wait_state(net, job, ("succeeded", "failed"))
        members = before["cluster"]["members"]
        # kill -9 the submitter and a member, then restart both.
        member = next(n for n in net.nodes if n.peer_id in members and n.index != 0)
        for node in (net.nodes[0], member):
            net.terminate(node.index, sig=signal.SIGKILL)
        for node in (0, member.index):
            net.restart(node)
        after = net.nodes[0].call("job.status", {"job_id": job})
        assert after["state"] == before["state"]
        assert after["cluster"] == before["cluster"]
        assert sorted(p["proof_hash"] for p in after["proofs"]) == sorted(p["proof_hash"] for p in before["proofs"])
        assert len({p["proof_hash"] for p in after["payouts"]}) == len(after["payouts"])
        mine = net.nodes[member.index].call("job.status", {"job_id": job})
        assert mine["member_state"] == "succeeded" and mine["proof_hash"]
        # A second job still runs after the restarts.
        job2 = submit(net, EXAMPLES / "hello.toml")
        assert wait_state(net, job2, ("succeeded", "failed"))["state"] == "succeeded"


def test_cancel_stops_every_member(tmp_path: Path) -> None:
    with LocalNet(tmp_path, 3, gpu_mix=ONE_GPU) as net:
        job = submit(net, sleep_job("long", nodes=2, sleep_s=20, on_member_loss="continue"))
        doc = wait_state(net, job, ("confirmed", "running"), timeout_s=60)
        members = [n for n in net.nodes if n.peer_id in doc["cluster"]["members"]]
        for m in members:
            net.wait_until(lambda m=m: m.call("job.status", {"job_id": job}).get("member_state") == "running",
                           timeout_s=30, what="members to run")
        cancelled_at_ms = time.time_ns() // 1_000_000
        res = subprocess.run([sys.executable, "-m", "p2pgpu.cli", "job", "cancel", job, "--home",
                              str(net.nodes[0].home.path), "--json"], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        for m in members:
            st = net.wait_until(lambda m=m: (lambda d: d if d.get("member_state") not in (None, "running") else None)(
                m.call("job.status", {"job_id": job})), timeout_s=30, what="members to stop")
            assert st["member_ended_at_ms"] - cancelled_at_ms < 10_000  # the command alone would run 20 s
        # A finished job cannot be "cancelled" after the fact.
        net.nodes[0].call("job.cancel", {"job_id": job})
        final = wait_state(net, job, ("cancelled", "failed", "succeeded"))
        assert final["state"] in ("cancelled", "failed")
