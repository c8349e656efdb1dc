"""#12.1: a submitter read the worker's keys through the results protocol.

The attack as reported, with real node processes: the submitter's job keeps
swapping its output ``out`` between a regular file and a symbolic link to
the worker's ``identity.key`` (whose host path the job used to read in
``/proc/self/mountinfo``; here the test hands it over, the strongest case),
while the submitter sends hundreds of results requests for ``out``.  The
member checked the path (resolve, is_file) and then opened it following
links: the key was served in 36 of 300 requests.  Now the member serves
only what it sealed when the job ended, by the (path, sha256) it recorded,
through handles that never follow a link, hash-checked before a byte
leaves; and the job's mount table names no path of the node.
"""

from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path
from typing import Any

import multiaddr
import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.peerinfo import info_from_p2p_addr

from p2pgpu.core import PeerMisbehaved, encode
from p2pgpu.localnet import LocalNet, NodeProc
from p2pgpu.node import ControlError
from p2pgpu.node._results import RESULTS_PROTOCOL
from p2pgpu.node._stack import open_stack
from p2pgpu.node._streams import StreamGone, read_frame, write_frame
from p2pgpu.runtime import check_sandbox

pytestmark = [pytest.mark.processes,
              pytest.mark.skipif(check_sandbox() is not None, reason=f"no sandbox here: {check_sandbox()}")]

ONE_GPU = [("NVIDIA L4", 23034, "8.9", 1)]
#: The submitter (node 0) asks more than the job's ceiling: it never runs its own job.
DEAR = {0: "price_per_gpu_hour = 360000000"}
REQUESTS = 300

SWAPPER = r"""
import os, sys, time
target, home = os.environ["TARGET"], os.environ["NODE_HOME"]
mounts = open("/proc/self/mountinfo").read()
print("HOME-IN-MOUNTINFO" if home in mounts else "home-not-in-mountinfo", flush=True)
open("result.txt", "w").write("the real result\n")
print("swapping", flush=True)
end = time.time() + float(sys.argv[1])
while time.time() < end:
    with open("out.tmp", "w") as f:
        f.write("harmless")
    os.replace("out.tmp", "out")
    try:
        os.unlink("out.lnk")
    except FileNotFoundError:
        pass
    os.symlink(target, "out.lnk")
    os.replace("out.lnk", "out")
print("done", flush=True)
"""


def manifest(target: Path, home: Path, seconds: int) -> str:
    return f"""
name = "results-race"
[requirements]
nodes = 1
gpus_per_node = 1
[runtime]
command = ["python3", "-c", {json.dumps(SWAPPER)}, "{seconds}"]
duration_s_max = 120
[runtime.env]
TARGET = "{target}"
NODE_HOME = "{home}"
[payment]
price_per_gpu_hour_max = 36000000
"""


def ended(doc: dict[str, Any], key: str) -> dict[str, Any] | None:
    """``doc`` once its ``key`` (state or member_state) says the job ended."""
    return doc if doc.get(key) in ("succeeded", "failed") else None


def logs(node: NodeProc, job_id: str) -> list[dict[str, Any]]:
    """A node's log lines of a job ([] while the node does not know it yet)."""
    try:
        got = node.call("job.logs", {"job_id": job_id})
    except ControlError:
        return []
    return got if isinstance(got, list) else []


def status(node: NodeProc, job_id: str) -> dict[str, object]:
    try:
        doc = node.call("job.status", {"job_id": job_id})
    except ControlError:
        return {}
    return doc if isinstance(doc, dict) else {}


async def hammer(seed: bytes, worker_addr: str, job_id: str, requests: list[tuple[str, str]]) -> list[bytes]:
    """Send each (path, sha256) request as the submitter; what each returned."""
    got: list[bytes] = []
    async with open_stack(seed, ["/ip4/127.0.0.1/tcp/0"], dht_validators={}) as stack:
        info = info_from_p2p_addr(multiaddr.Multiaddr(worker_addr))
        await stack.host.connect(info)
        for path, sha in requests:
            data = b""
            try:
                with trio.fail_after(10):
                    stream = await stack.host.new_stream(info.peer_id, [TProtocol(RESULTS_PROTOCOL)])
                    await write_frame(stream, encode({"job_id": job_id, "path": path, "sha256": sha}))
                    while chunk := await read_frame(stream, 1 << 20):
                        data += chunk
                    data += b"<complete>"
            except (StreamGone, PeerMisbehaved, BaseLibp2pError, trio.TooSlowError) as exc:
                data += f"<refused: {type(exc).__name__}>".encode()  # a refusal is what we hope for
            got.append(data)
    return got


def test_symlink_swaps_against_hundreds_of_results_requests_never_leak_a_key(tmp_path: Path) -> None:
    with LocalNet(tmp_path, 2, gpu_mix=ONE_GPU, node_config=DEAR) as net:
        net.wait_until(lambda: net.nodes[0].call("status")["peers"] >= 1, timeout_s=30, what="a connection")
        submitter, worker = net.nodes
        key = worker.home.identity_path.read_bytes()
        token = worker.home.token().encode()
        job = submitter.call("job.submit", {"manifest": manifest(worker.home.identity_path, worker.home.path,
                                                                 40)})["job_id"]
        net.wait_until(lambda: any(ln["line"] == "swapping" for ln in logs(worker, job)),
                       timeout_s=90, what="the job to start swapping")
        # The hostile submitter takes over its own identity from a raw client.
        seed = submitter.home.identity().seed
        net.terminate(submitter.index, sig=signal.SIGTERM)
        raced = trio.run(hammer, seed, worker.addrs[0], job, [("out", "00" * 32)] * REQUESTS)
        assert len(raced) == REQUESTS
        leaked = [r for r in raced if key in r or token in r or b"harmless" in r]
        assert leaked == [], f"{len(leaked)} of {REQUESTS} requests returned bytes while the job ran"
        # When it ends: its output list is what was sealed; "out" (a link at
        # the end) is not in it, "result.txt" is, and is served whole.
        done = net.wait_until(lambda: ended(status(worker, job), "member_state"), timeout_s=120,
                              what="the job to end")
        assert done["member_state"] == "succeeded", done
        outputs = {o["path"]: o for o in done["outputs"]}
        assert "result.txt" in outputs and "out" not in outputs, outputs
        real = outputs["result.txt"]["sha256"]
        after = trio.run(hammer, seed, worker.addrs[0], job,
                         [("out", "00" * 32), ("result.txt", "00" * 32), ("../identity.key", "00" * 32),
                          ("result.txt", real)])
        assert after[-1] == b"the real result\n<complete>"
        assert hashlib.sha256(after[-1][:-len(b"<complete>")]).hexdigest() == real
        assert all(key not in r and b"<complete>" not in r for r in after[:-1]), after[:-1]
        lines = [ln["line"] for ln in logs(worker, job)]
        assert "home-not-in-mountinfo" in lines and "HOME-IN-MOUNTINFO" not in lines, lines[:5]
