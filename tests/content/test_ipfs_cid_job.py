"""An input by IPFS CID, end to end (issue 15): a real Helia node (npm:
``@helia/unixfs`` 4 ``addBytes`` with its defaults, ``@helia/bitswap`` 2.2 on
js-libp2p 2.x) adds a multi-block file the test generated; a job names it by
``cid``, ``size_bytes`` and ``providers`` (Helia's address); the member, a
real node process, fetches every block over Bitswap, checks each against its
CID, pins the assembled file in its content store, and the job's command,
in the sandbox, reads it and prints its SHA-256.  Hostile providers and DAGs:
``tests/attacks/test_content_cid_providers.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from helia_helpers import helia_dir, helia_process

from p2pgpu.localnet import LocalNet

pytestmark = pytest.mark.processes
MIX = [("NVIDIA L4", 23034, "8.9", 0), ("NVIDIA L4", 23034, "8.9", 1)]
JOB = """
name = "cid-input"
[requirements]
nodes = 1
[runtime]
command = ["sh", "-c", "sha256sum \\"$P2PGPU_IN/data.bin\\"; wc -c < \\"$P2PGPU_IN/data.bin\\""]
[inputs]
"data.bin" = {{ cid = "{cid}", size_bytes = {size}, providers = ["{addr}"] }}
[payment]
price_per_gpu_hour_max = 36000000
"""


def test_a_job_reads_a_multi_block_file_that_helia_added(tmp_path: Path) -> None:
    js_dir = helia_dir()
    data = os.urandom(5 << 20)
    src = tmp_path / "data.bin"
    src.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()

    async def main() -> None:
        async with helia_process(js_dir, "helia_unixfs_serve.mjs", str(src)) as helia:
            assert helia["blocks"] > 2 and helia["cid"].startswith("bafy")  # dag-pb root, raw leaves
            manifest = tmp_path / "job.toml"
            manifest.write_text(JOB.format(cid=helia["cid"], size=len(data), addr=helia["addr"]))
            await trio.to_thread.run_sync(run_job, tmp_path, manifest, helia["cid"], len(data), sha)

    trio.run(main)


def run_job(tmp_path: Path, manifest: Path, cid: str, size: int, sha: str) -> None:
    with LocalNet(tmp_path / "net", 2, gpu_mix=MIX) as net:
        net.wait_until(lambda: len(net.nodes[0].call("market")) >= 1, timeout_s=30, what="market")
        res = subprocess.run([sys.executable, "-m", "p2pgpu.cli", "job", "submit", str(manifest), "--wait", "--json",
                              "--timeout", "180", "--home", str(net.nodes[0].home.path)],
                             capture_output=True, text=True, timeout=300, check=False)
        assert res.returncode == 0, res.stdout + res.stderr
        st = json.loads(res.stdout)
        assert st["state"] == "succeeded", st
        logs = net.nodes[0].call("job.logs", {"job_id": st["job_id"]})
        out = [ln["line"] for ln in logs if ln["stream"] == "stdout"]
        assert out[0].split()[0] == sha and out[1].strip() == str(size), logs  # read whole inside the sandbox
        staged = [ln["line"] for ln in logs if ln["stream"] == "stderr" and "input data.bin" in ln["line"]]
        assert any(f"(CID {cid}) over Bitswap" in x for x in staged) and any("ready (" in x for x in staged), staged
        member = net.nodes[1]
        assert [b["sha256"] for b in member.call("blobs.status")["blobs"]] == [sha]  # in the store, by SHA-256
        inputs = net.nodes[0].call("job.status", {"job_id": st["job_id"]})["inputs"]
        assert inputs == [{"name": "data.bin", "cid": cid, "size_bytes": size}]
