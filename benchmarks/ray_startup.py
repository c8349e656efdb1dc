"""Time from a confirmed cluster to its Ray job running, and from cancel to nothing left.

Simulated members on this machine, each in its own bubblewrap sandbox on its
own network namespace (as on a node: every Ray process in the sandbox), start
at the same instant, as they do when the submitter's confirmation of the
certificate reaches them.  For 2 and 3 members it prints, in seconds from that
instant: the job's network claimed by the head, every member's Ray node up,
all nodes seen alive by the head, the entrypoint (the Ray driver) started,
and the driver connected to the cluster (its first line, printed right after
``ray.init()``); then the time from a cancel sent to every member until every
member's sandbox is gone.

    python3 benchmarks/ray_startup.py [--members 2 3] [--repeat 1]

Needs root (namespaces, nftables) and Ray.  Ray's start is mostly Python
start-up and process spawning, so the figures scale with the machine's free
CPU: the load average is printed alongside.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import trio

from p2pgpu.runtime._ray import RayMember, RayMemberSpec, ray_unavailable

ENTRY = r"""
import os, time, ray
ray.init()
print("running", len([n for n in ray.nodes() if n["Alive"]]), flush=True)
time.sleep(600)
"""


async def one(n: int, root: Path) -> dict[str, float]:
    peers = tuple(f"peer{i}" for i in range(n))
    marks: dict[str, float] = {}
    t0 = trio.current_time()
    running = trio.Event()
    members: list[RayMember] = []

    def mark(name: str) -> None:
        marks.setdefault(name, trio.current_time() - t0)

    def on_event(rank: int):  # type: ignore[no-untyped-def]
        def f(name: str, info: dict[str, object]) -> None:
            if name == "net_ready":
                mark("net_ready")
                for m in members[1:]:
                    m.set_rendezvous(str(info["subnet"]))
            elif name == "ray_started":
                mark(f"node_up_{rank}")
            elif name == "ray_start_retry" and os.environ.get("VERBOSE"):
                print(f"  member {rank}: ray start retried: {info}", flush=True)
            elif name in ("nodes_ready", "entrypoint_started"):
                mark(name)
        return f

    async def on_line(stream: str, line: bytes) -> None:
        if line.startswith(b"running"):
            mark("driver_connected")
            running.set()

    job_id = os.urandom(32).hex()
    for r in range(n):
        work = Path(tempfile.mkdtemp(dir=root))
        spec = RayMemberSpec(job_id=job_id, members=peers, rank=r, command=("python", "-c", ENTRY), work_dir=work,
                             num_cpus=1, memory_bytes_max=1 << 30, time_limit_ms=600_000)
        members.append(RayMember(spec, on_line=on_line if r == 0 else None, on_event=on_event(r)))

    async def run(m: RayMember) -> None:
        res = await m.run()
        if not running.is_set():  # ended before the job ran: say why, stop the others
            print(f"  member {m.spec.rank} ended early: {res.reason} {res.detail[-400:]}", flush=True)
            for other in members:
                other.stop("cancelled")
            running.set()

    async with trio.open_nursery() as nursery:
        for m in members:
            nursery.start_soon(run, m)
        with trio.move_on_after(300):
            await running.wait()
        t_cancel = trio.current_time()
        for m in members:
            m.stop("cancelled")
    marks["cancel_to_all_gone"] = trio.current_time() - t_cancel
    marks["all_nodes_up"] = max((v for k, v in marks.items() if k.startswith("node_up_")), default=float("nan"))
    return marks


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--members", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    why = ray_unavailable(enabled=True)
    if why:
        sys.exit(why)
    cols = ["net_ready", "all_nodes_up", "nodes_ready", "entrypoint_started", "driver_connected",
            "cancel_to_all_gone"]
    print(f"cpus={os.cpu_count()} load average before={os.getloadavg()[0]:.1f}")
    print(f"{'members':>7} " + " ".join(f"{c:>18}" for c in cols) + "   (seconds from start)")
    with tempfile.TemporaryDirectory() as root:
        for n in args.members:
            for _ in range(args.repeat):
                marks = await one(n, Path(root))
                print(f"{n:>7} " + " ".join(f"{marks.get(c, float('nan')):>18.1f}" for c in cols), flush=True)
    print(f"load average after={os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    trio.run(main)
