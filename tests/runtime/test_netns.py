"""A cluster member's network (``_netns``): its job's other members and nothing else, with real namespaces and nftables."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import trio

from p2pgpu.runtime import JobSpec, SandboxPolicy, SandboxUnavailable, check_sandbox, run_job
from p2pgpu.runtime._netns import (
    NETNS_DIR,
    REGISTRY,
    ClusterNet,
    NetUnavailable,
    claim_subnet,
    close_member_net,
    net_unavailable,
    open_member_net,
    subnet_candidate,
)

WHY_NOT = check_sandbox() or net_unavailable()
# Job networks and Ray on this machine: these tests assert that none is left (system-wide), so they
# take turns with every other test that makes them (tests/conftest.py, docs/testing.md).
pytestmark = [pytest.mark.exclusive("job-networks"), pytest.mark.skipif(WHY_NOT is not None, reason=f"{WHY_NOT}")]
PY = "/usr/bin/python3"

SERVE = PY + """ -c '
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7000))
s.listen(4)
print("listening", flush=True)
s.settimeout(float(sys.argv[1]))
try:
    while True:
        c, a = s.accept()
        print("accepted", a[0], flush=True)
        c.close()
except OSError:
    pass
' """

CONNECT = PY + """ -c '
import socket, sys
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        print("REACHED", target, flush=True)
    except OSError as e:
        print("blocked", target, type(e).__name__, flush=True)
' """


def job(tmp_path: Path, name: str, script: str, net: ClusterNet) -> JobSpec:
    work = tmp_path / name
    work.mkdir()
    return JobSpec(argv=("/bin/sh", "-c", script), work_dir=work, time_limit_ms=60_000,
                   memory_bytes_max=256 << 20, cluster_net=net)


def host_address() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))
        return str(s.getsockname()[0])


async def test_members_reach_each_other_and_nothing_else(tmp_path: Path) -> None:
    job_a, job_b = os.urandom(32).hex(), os.urandom(32).hex()
    subnet = claim_subnet(job_a)
    head, member = ClusterNet(job_id=job_a, subnet=subnet, rank=0), ClusterNet(job_id=job_a, subnet=subnet, rank=1)
    stranger = ClusterNet(job_id=job_b, subnet=claim_subnet(job_b), rank=0)
    assert stranger.subnet != subnet
    host_listener = socket.socket()
    host_listener.bind(("0.0.0.0", 0))
    host_listener.listen(8)
    host_listener.setblocking(False)
    port = host_listener.getsockname()[1]
    listening = trio.Event()
    lines: dict[str, list[bytes]] = {"head": [], "member": [], "stranger": []}

    def collect(name: str):  # type: ignore[no-untyped-def]
        async def on_line(stream: str, line: bytes) -> None:
            lines[name].append(line)
            if line == b"listening":
                listening.set()
        return on_line

    targets = [f"{head.sandbox_ip}:7000", f"127.0.0.1:{port}", f"{member.host_ip}:{port}",
               f"{host_address()}:{port}", f"{head.host_ip}:{port}"]
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: run_job(job(tmp_path, "head", SERVE + "20", head), on_line=collect("head")))
            await listening.wait()
            await run_job(job(tmp_path, "member", CONNECT + " ".join(targets), member), on_line=collect("member"))
            await run_job(job(tmp_path, "stranger", CONNECT + f"{head.sandbox_ip}:7000", stranger),
                          on_line=collect("stranger"))
            nursery.cancel_scope.cancel()
        with pytest.raises(BlockingIOError):
            host_listener.accept()
    finally:
        host_listener.close()
    assert lines["member"][0] == f"REACHED {head.sandbox_ip}:7000".encode(), lines["member"]
    assert all(line.startswith(b"blocked") for line in lines["member"][1:]), lines["member"]
    assert lines["stranger"] == [f"blocked {head.sandbox_ip}:7000 TimeoutError".encode()], lines["stranger"]
    assert f"accepted {member.sandbox_ip}".encode() in lines["head"]
    assert not NETNS_DIR.exists() or not list(NETNS_DIR.glob("p2pgpu-*")), "a namespace was left"


def test_another_jobs_subnet_is_refused(tmp_path: Path) -> None:
    ours, theirs = os.urandom(32).hex(), os.urandom(32).hex()
    held = open_member_net(ClusterNet(job_id=theirs, subnet=claim_subnet(theirs), rank=0))
    try:
        # A hostile head names the other job's /24 in its rendezvous.
        with pytest.raises(NetUnavailable, match="held by another job"):
            open_member_net(ClusterNet(job_id=ours, subnet=held.net.subnet, rank=1))
        # The same job's next member may join it; the same rank twice may not.
        other = open_member_net(ClusterNet(job_id=theirs, subnet=held.net.subnet, rank=1))
        close_member_net(other)
        with pytest.raises(NetUnavailable, match="already has a network"):
            open_member_net(ClusterNet(job_id=theirs, subnet=held.net.subnet, rank=0))
        # A head whose first candidate is taken moves on to its next one.
        squatter = open_member_net(ClusterNet(job_id=theirs, subnet=subnet_candidate(ours, 0), rank=5))
        try:
            assert claim_subnet(ours) == subnet_candidate(ours, 1)
        finally:
            close_member_net(squatter)
        assert claim_subnet(ours) == subnet_candidate(ours, 0)
    finally:
        assert close_member_net(held) == ""
    assert not (REGISTRY / str(held.net.subnet.network_address)).exists()


async def test_a_sandbox_that_cannot_get_its_network_is_refused(tmp_path: Path) -> None:
    theirs = os.urandom(32).hex()
    held = open_member_net(ClusterNet(job_id=theirs, subnet=claim_subnet(theirs), rank=0))
    try:
        hostile = ClusterNet(job_id=os.urandom(32).hex(), subnet=held.net.subnet, rank=2)
        with pytest.raises(SandboxUnavailable, match="held by another job"):
            await run_job(job(tmp_path, "w", "true", hostile), SandboxPolicy())
    finally:
        close_member_net(held)
