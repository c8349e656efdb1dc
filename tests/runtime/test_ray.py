"""The ray runtime: real Ray clusters, every process of them in bubblewrap, on this machine.

Each member runs in its own sandbox on its own network namespace, as two
members on one machine would.  The cluster tests start real Ray (seconds per
node) and are skipped when Ray is not installed or jobs' networks cannot be
made here (not root, no nftables); the unit tests run everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio

from p2pgpu.runtime import JobRejected
from p2pgpu.runtime._ray import (
    TRANSITIONS,
    RayMember,
    RayMemberSpec,
    RayResult,
    State,
    ray_python,
    ray_unavailable,
)
from p2pgpu.runtime._ray_inside import node_ranks

# Job networks and Ray on this machine: these tests assert that none is left (system-wide), so they
# take turns with every other test that makes them (tests/conftest.py, docs/testing.md).
pytestmark = pytest.mark.exclusive("job-networks")


def job_namespaces() -> list[Path]:
    """Job members' network namespaces on this machine (not the NAT lab's, ``p2pgpu-lab-*``)."""
    return [n for n in Path("/run/netns").glob("p2pgpu-*") if not n.name.startswith("p2pgpu-lab-")]

WHY_NOT = ray_unavailable(enabled=True)
needs_ray = pytest.mark.skipif(WHY_NOT is not None, reason=f"{WHY_NOT}")

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
open("result.txt", "w").write(f"{world} nodes\n")
print(f"saw {len(alive)} nodes, tasks ran on {len(nodes)} nodes", flush=True)
"""

HOLD = r"""
import os, time, ray
ray.init()

@ray.remote(num_cpus=0)
class Holder:
    def hold(self):
        time.sleep(600)

world = int(os.environ["P2PGPU_WORLD_SIZE"])
actors = [Holder.options(resources={f"p2pgpu_member_{r}": 0.01}).remote() for r in range(world)]
print("holding", flush=True)
ray.get([a.hold.remote() for a in actors])
"""


def specs(tmp_path: Path, n: int, command: str, **kw: object) -> list[RayMemberSpec]:
    job = os.urandom(32).hex()
    members = tuple(f"peer{i}" for i in range(n))
    out = []
    for r in range(n):
        work = tmp_path / f"work{r}"
        work.mkdir()
        fields: dict[str, object] = {
            "job_id": job, "members": members, "command": ("python", "-c", command), "work_dir": work,
            "num_cpus": 1, "memory_bytes_max": 2 << 30, "time_limit_ms": 300_000} | kw
        out.append(RayMemberSpec(rank=r, **fields))  # type: ignore[arg-type]
    return out


async def run_cluster(members: list[RayMember]) -> dict[int, RayResult]:
    """Run every member, passing the head's subnet on as the node does."""
    results: dict[int, RayResult] = {}

    async def run(m: RayMember) -> None:
        results[m.spec.rank] = await m.run()
        if m.spec.rank == 0:  # what the node does when the head's job ends
            for other in members[1:]:
                other.stop("finished")

    async with trio.open_nursery() as nursery:
        for m in members:
            nursery.start_soon(run, m)
    return results


def passing_subnet(members: list[RayMember]) -> object:
    def on_event(name: str, info: object) -> None:
        if name == "net_ready":
            for other in members[1:]:
                other.set_rendezvous(info["subnet"])  # type: ignore[index]
    return on_event


# --- real clusters ---------------------------------------------------------------------------


@needs_ray
@pytest.mark.slow  # the same path runs by default through real nodes: tests/e2e/test_ray_cluster.py
async def test_two_members_form_a_cluster_in_their_sandboxes(tmp_path: Path) -> None:
    lines: list[tuple[str, bytes]] = []

    async def on_line(stream: str, line: bytes) -> None:
        lines.append((stream, line))

    members: list[RayMember] = []
    s = specs(tmp_path, 2, TWO_NODES, auth_token=os.urandom(16).hex())
    members += [RayMember(s[0], on_line=on_line, on_event=passing_subnet(members)),  # type: ignore[arg-type]
                RayMember(s[1])]
    results = await run_cluster(members)
    head, other = results[0], results[1]
    assert head.reason == "exited" and head.exit_code == 0, (head.detail, head.stderr_tail[-800:])
    assert ("stdout", b"saw 2 nodes, tasks ran on 2 nodes") in lines
    assert other.reason == "finished" and other.ok
    assert head.startup_ms > 0 and other.startup_ms > 0
    # The driver's output is sealed like a process job's.
    assert [o.path for o in head.outputs] == ["result.txt"]
    assert (tmp_path / "work0" / "result.txt").read_text() == "2 nodes\n"
    assert all(m.state is State.DONE for m in members)
    assert not job_namespaces(), "a member's network namespace was left"


@needs_ray
async def test_cancelled_job_stops_on_every_member(tmp_path: Path) -> None:
    members: list[RayMember] = []

    async def on_line(stream: str, line: bytes) -> None:
        if line == b"holding":
            for m in members:
                m.stop("cancelled")  # the submitter's cancel reaches every member

    s = specs(tmp_path, 2, HOLD)
    members += [RayMember(s[0], on_line=on_line, on_event=passing_subnet(members)),  # type: ignore[arg-type]
                RayMember(s[1])]
    with trio.fail_after(240):
        results = await run_cluster(members)
    assert results[0].reason == results[1].reason == "cancelled"


@needs_ray
async def test_cancelling_the_callers_scope_tears_down(tmp_path: Path) -> None:
    """Cancellation from trio (the node shutting down) also leaves nothing."""
    (spec,) = specs(tmp_path, 1, HOLD)

    async def on_line(stream: str, line: bytes) -> None:
        if line == b"holding":
            scope.cancel()

    member = RayMember(spec, on_line=on_line)
    with trio.CancelScope() as scope:
        await member.run()
    assert scope.cancelled_caught and member.state is State.DONE
    assert not job_namespaces()


@needs_ray
async def test_a_member_whose_head_never_comes_gives_up(tmp_path: Path) -> None:
    spec = specs(tmp_path, 2, "pass", start_timeout_ms=2_000)[1]
    result = await RayMember(spec).run()
    assert result.reason == "ray_error" and "no rendezvous" in result.detail and result.startup_ms == -1


@needs_ray
async def test_a_loss_reported_by_the_heartbeats_stops_the_head(tmp_path: Path) -> None:
    """Rank 1 never joins; the heartbeat layer declares it lost (``fail``)."""
    head = specs(tmp_path, 2, "pass")[0]
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
    assert lost == [(1, "peer1", "caller")]


# --- without Ray -----------------------------------------------------------------------------


def test_spec_checks_its_fields(tmp_path: Path) -> None:
    (good,) = specs(tmp_path, 1, "pass")
    base = {f: getattr(good, f) for f in good.__dataclass_fields__}
    for bad in ({"rank": 1}, {"members": ()}, {"command": ()}, {"on_member_loss": "replace"},
                {"num_cpus": 0}, {"memory_bytes_max": 1 << 20}, {"time_limit_ms": 0}, {"gpus": (1, 1)},
                {"gcs_port": 70000}, {"master_port": 6379}, {"start_timeout_ms": 0}):
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


@pytest.mark.parametrize("subnet", ["192.168.1.0/24", "10.64.1.0/23", "10.64.1.7/24", "10.0.0.0/24", "", 5, None,
                                    "10.64.1.0/24; rm -rf /"])
def test_a_rendezvous_outside_the_job_pool_is_refused(tmp_path: Path, subnet: object) -> None:
    member = RayMember(specs(tmp_path, 2, "pass")[1])
    with pytest.raises(ValueError):
        member.set_rendezvous(subnet)  # type: ignore[arg-type]
    member.set_rendezvous("10.64.1.0/24")
    assert member.subnet == "10.64.1.0/24"


def test_ray_is_off_unless_the_operator_turns_it_on() -> None:
    why = ray_unavailable()
    assert why is not None and "allow_ray_jobs = true" in why


def test_the_python_environment_is_bound_read_only_never_the_home(tmp_path: Path) -> None:
    python, binds = ray_python()
    assert python.startswith(("/opt/p2pgpu/env/", "/usr/")) or any(python.startswith(d) for _, d in binds)
    assert all(os.path.isabs(s) and os.path.isabs(d) for s, d in binds)
    if binds:
        src = binds[0][0]
        why = ray_unavailable(enabled=True, home=Path(src) / "node-home")
        assert why is not None and "overlaps the node's home" in why


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
    assert all(State.STOPPING in TRANSITIONS[s] for s in State if s not in (State.STOPPING, State.DONE))


def test_spec_from_a_ray_manifest(tmp_path: Path) -> None:
    from p2pgpu.core._identity import Identity
    from p2pgpu.core._manifest import Manifest

    submitter = Identity(bytes(32)).peer_id
    payer = "11111111111111111111111111111111"
    manifest = Manifest(name="train", submitter=submitter, created_at_ms=0, expires_at_ms=60_000,
                        nonce=bytes(16), payer=payer, nodes=2, runtime="ray", command=("python", "train.py"),
                        env=(("EPOCHS", "3"),), duration_s_max=90, on_member_loss="continue")
    spec = RayMemberSpec.for_manifest(manifest, job_id="ab" * 32, members=("a", "b"), rank=1, work_dir=tmp_path,
                                      num_cpus=8, gpus=(0, 1), memory_bytes_max=8 << 30)
    assert spec.command == ("python", "train.py") and dict(spec.env) == {"EPOCHS": "3"}
    assert spec.time_limit_ms == 90_000 and spec.on_member_loss == "continue"
    assert not spec.head and spec.world_size == 2
    with pytest.raises(ValueError):
        RayMemberSpec.for_manifest(Manifest(name="p", submitter=submitter, created_at_ms=0, expires_at_ms=1,
                                            nonce=bytes(16), payer=payer, command=("true",)),
                                   job_id="ab" * 32, members=("a",), rank=0, work_dir=tmp_path, num_cpus=1,
                                   memory_bytes_max=1 << 30)
