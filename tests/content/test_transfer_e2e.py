"""Inputs named by hash, through real node processes on loopback (issue 15).

- a 2-node job whose input is a local file given to ``job submit --input``:
  both members fetch it (from the submitter and from each other), check every
  chunk, and the job's command checks the whole file's sha256 itself;
- a provider that corrupts every chunk it serves is dropped at its first
  chunk and the chunks are fetched from the honest provider;
- a member killed with ``kill -9`` mid-download resumes from the chunks it had
  verified on disk after its restart;
- a wrong hash ends the job with the reason on screen and nothing in the store.
The 1 GiB version of the first test is ``slow``-marked.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from p2pgpu.localnet import LocalNet

pytestmark = pytest.mark.processes
#: Node 0 submits and has no GPU (it never volunteers): the members are 1 and 2.
MIX = [("NVIDIA L4", 23034, "8.9", 0), ("NVIDIA L4", 23034, "8.9", 1), ("NVIDIA L4", 23034, "8.9", 1)]


def make_file(path: Path, size: int) -> str:
    h = hashlib.sha256()
    block = hashlib.sha256(path.name.encode()).digest() * (1 << 15)  # 1 MiB, not all one byte
    with open(path, "wb") as f:
        left, i = size, 0
        while left:
            piece = block[: min(len(block), left)]
            piece = i.to_bytes(8, "big") + piece[8:] if len(piece) >= 8 else piece
            f.write(piece)
            h.update(piece)
            left -= len(piece)
            i += 1
    return h.hexdigest()


def cli(home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p2pgpu.cli", *args, "--home", str(home)],
                          capture_output=True, text=True, timeout=timeout, check=False)


JOB = """
name = "check-input"
[requirements]
nodes = 2
gpus_per_node = 1
[runtime]
command = ["sh", "-c", "sha256sum \\"$P2PGPU_IN/data.bin\\""]
duration_s_max = 120
[payment]
price_per_gpu_hour_max = 36000000
"""


def run_two_member_job(tmp_path: Path, size: int, *, rate: int) -> None:
    data = tmp_path / "data.bin"
    sha = make_file(data, size)
    manifest = tmp_path / "job.toml"
    manifest.write_text(JOB)
    # The submitter serves slowly, so the members, starting at different
    # chunks, also fetch from each other.
    with LocalNet(tmp_path / "net", 3, gpu_mix=MIX,
                  node_config={0: f"blobs_serve_bytes_per_s_max = {rate}"}) as net:
        net.wait_until(lambda: len(net.nodes[0].call("market")) >= 2, timeout_s=30, what="market")
        home0 = net.nodes[0].home.path
        res = cli(home0, "job", "submit", str(manifest), "--input", f"data.bin={data}", "--wait", "--json",
                  "--timeout", "600", timeout=900)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "[input data.bin] hashing" in res.stderr  # progress of the upload side
        st = json.loads(res.stdout)
        assert st["state"] == "succeeded", st
        members = st["cluster"]["members"]
        assert sorted(members) == sorted([net.nodes[1].peer_id, net.nodes[2].peer_id])
        inputs = net.nodes[0].call("job.status", {"job_id": st["job_id"]})["inputs"]
        assert inputs[0]["sha256"] == sha and inputs[0]["served_bytes"] > 0
        logs = net.nodes[0].call("job.logs", {"job_id": st["job_id"]})
        sums = [ln for ln in logs if ln["stream"] == "stdout"]
        assert len(sums) == 2 and all(ln["line"].split()[0] == sha for ln in sums), logs  # the job checked it
        staged = [ln["line"] for ln in logs if ln["stream"] == "stderr" and "input data.bin" in ln["line"]]
        assert sum("ready (" in x for x in staged) == 2, staged  # download progress reached the submitter
        providers_seen = set()
        for n in net.nodes[1:]:
            src = n.call("blobs.status")["sources"][sha]
            assert not src["dropped"], src
            assert sum(src["chunks_from"].values()) == -(-size // (1 << 20))
            providers_seen |= set(src["chunks_from"])
            assert n.call("blobs.status")["blobs"][0]["sha256"] == sha
        # Two providers fed the members: the submitter and a member.
        assert net.nodes[0].peer_id in providers_seen
        assert providers_seen & {net.nodes[1].peer_id, net.nodes[2].peer_id}, providers_seen


def test_input_by_hash_reaches_both_members_from_two_providers(tmp_path: Path) -> None:
    run_two_member_job(tmp_path, 64 << 20, rate=12 << 20)


@pytest.mark.slow
def test_one_gib_input_reaches_both_members_from_two_providers(tmp_path: Path) -> None:
    run_two_member_job(tmp_path, 1 << 30, rate=60 << 20)


def test_a_provider_of_corrupt_chunks_is_dropped_and_chunks_come_from_elsewhere(tmp_path: Path) -> None:
    data = tmp_path / "data.bin"
    sha = make_file(data, 24 << 20)
    with LocalNet(tmp_path / "net", 3, gpu_mix=MIX,
                  node_config={0: f"blobs_serve_bytes_per_s_max = {8 << 20}",
                               2: 'adversary = "corrupt_chunks"'}) as net:
        added = net.nodes[0].call("blobs.add", {"path": str(data)})
        assert net.nodes[2].call("blobs.add", {"path": str(data)})["sha256"] == sha == added["sha256"]
        got = net.nodes[1].call("blobs.fetch", {"sha256": sha, "size_bytes": 24 << 20, "tree": added["tree"],
                                                "sources": [net.nodes[2].peer_id, net.nodes[0].peer_id]},
                                timeout_s=120)
        assert got["dropped"] == {net.nodes[2].peer_id: "sent a chunk that does not match its hash"}
        assert got["chunks_from"] == {net.nodes[0].peer_id: 24}
        st = net.nodes[1].call("status")["counters"]
        assert 1 <= st["blobs:bad_chunks"] <= 2  # caught at the first bad chunk of each of its streams
        fd = os.open(net.nodes[1].home.path / "blobs" / "data" / sha, os.O_RDONLY)
        try:
            assert hashlib.sha256(os.read(fd, 25 << 20)).hexdigest() == sha
        finally:
            os.close(fd)


def test_a_member_killed_mid_download_resumes_after_restart(tmp_path: Path) -> None:
    size = 48 << 20
    data = tmp_path / "data.bin"
    sha = make_file(data, size)
    with LocalNet(tmp_path / "net", 2, gpu_mix=MIX,
                  node_config={0: f"blobs_serve_bytes_per_s_max = {4 << 20}"}) as net:
        added = net.nodes[0].call("blobs.add", {"path": str(data)})
        params = {"sha256": sha, "size_bytes": size, "tree": added["tree"], "sources": [net.nodes[0].peer_id]}
        proc = subprocess.Popen([sys.executable, "-c", (
            "import sys, json; from p2pgpu.sdk import Client; "
            f"Client({str(net.nodes[1].home.path)!r}).call('blobs.fetch', json.loads(sys.argv[1]), timeout_s=300)"),
            json.dumps(params)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            def partial_chunks() -> int:
                parts = net.nodes[1].call("blobs.status")["partials"]
                return parts.get(sha, {}).get("have", 0)
            net.wait_until(lambda: partial_chunks() >= 8, timeout_s=60, what="8 chunks on disk")
            os.killpg(net.nodes[1].proc.pid, signal.SIGKILL)
            net.nodes[1].proc.wait(timeout=10)
        finally:
            proc.kill()
            proc.wait()
        net.nodes[1] = net.start_node(1, bootstrap=net.nodes[0].addrs)
        on_disk = net.nodes[1].call("blobs.status")["partials"][sha]["have"]
        assert on_disk >= 8
        got = net.nodes[1].call("blobs.fetch", params, timeout_s=120)
        assert got["resumed_chunks"] == on_disk
        assert sum(got["chunks_from"].values()) == 48 - on_disk  # only the rest crossed the network
        assert got["bulk_chunks_from"] == got["chunks_from"]  # and over the bulk side channel
        assert net.nodes[1].call("blobs.status")["partials"] == {}


BAD = """
name = "bad-input"
[requirements]
nodes = 1
[runtime]
command = ["sh", "-c", "cat \\"$P2PGPU_IN/x.bin\\""]
[inputs]
"x.bin" = {{ sha256 = "{sha}", size_bytes = {size} }}
[payment]
price_per_gpu_hour_max = 36000000
"""


def test_an_input_nobody_has_ends_the_job_with_the_reason_and_nothing_in_the_store(tmp_path: Path) -> None:
    manifest = tmp_path / "bad.toml"
    manifest.write_text(BAD.format(sha="ab" * 32, size=1000))
    with LocalNet(tmp_path / "net", 2, gpu_mix=MIX) as net:
        net.wait_until(lambda: len(net.nodes[0].call("market")) >= 1, timeout_s=30, what="market")
        res = cli(net.nodes[0].home.path, "job", "submit", str(manifest), "--wait", "--timeout", "120")
        assert res.returncode == 1, res.stdout + res.stderr
        assert "failed" in res.stdout
        assert "input x.bin" in res.stdout and "has it" in res.stdout, res.stdout  # the reason, on screen
        status = net.nodes[1].call("blobs.status")
        assert status["blobs"] == [] and status["partials"] == {}
        assert os.listdir(net.nodes[1].home.path / "blobs" / "data") == []


REPLICATED = """
name = "replicated-output"
[requirements]
nodes = 1
[runtime]
command = ["sh", "-c", "head -c 3000000 /dev/zero | tr '\\\\0' 'x' > out.bin; echo done"]
[payment]
price_per_gpu_hour_max = 36000000
[verification]
replicas = 2
quorum = 2
"""


def test_outputs_are_blobs_fetched_from_any_member_that_holds_them(tmp_path: Path) -> None:
    with LocalNet(tmp_path / "net", 3, gpu_mix=MIX) as net:
        net.wait_until(lambda: len(net.nodes[0].call("market")) >= 2, timeout_s=30, what="market")
        job = net.nodes[0].call("job.submit", {"manifest": REPLICATED})["job_id"]
        st = net.wait_until(lambda: (lambda d: d if d["state"] in ("succeeded", "failed") else None)(
            net.nodes[0].call("job.status", {"job_id": job})), timeout_s=120, what="the job to end")
        assert st["state"] == "succeeded", st
        members = st["cluster"]["members"]
        by_peer = {n.peer_id: n for n in net.nodes}
        gone = by_peer[members[0]]
        net.terminate(gone.index)  # member 0 is down: its file must come from member 1
        res = cli(net.nodes[0].home.path, "job", "results", job, "--out", str(tmp_path / "out"), "--json")
        assert res.returncode == 0, res.stderr
        files = json.loads(res.stdout)["files"]
        assert sorted(f["member_index"] for f in files) == [0, 1]
        for f in files:
            assert Path(f["saved_as"]).read_bytes() == b"x" * 3_000_000
        served = by_peer[members[1]].call("blobs.status")["served"]
        assert served.get(files[0]["sha256"], 0) >= 3_000_000  # the live member served the other's copy
