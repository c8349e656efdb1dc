"""Time from a confirmed cluster to its Ray job running, and from cancel to nothing left.

Simulated members on this machine (each with its own ports and temp dir)
start at the same instant, as they do when the submitter's confirmation of the
certificate reaches them.  For 2 and 3 members it prints, in seconds from that
instant: every member's Ray node up, all nodes seen alive by the head, the
entrypoint (the Ray driver) started, and the driver connected to the cluster
(its first line, printed right after ``ray.init()``); then the time from a
cancel sent to every member until every member's Ray is gone.

``--two-phase``: the head picks its GCS port and the others learn it only
once the head is up (as when the port is not fixed in advance), instead of
all members starting at once on a rendezvous port fixed beforehand.

    python3 benchmarks/ray_startup.py [--members 2 3] [--repeat 1] [--two-phase]

Ray's start is mostly Python start-up and process spawning, so the figures
scale with the machine's free CPU: the load average is printed alongside.
"""

from __future__ import annotations

import argparse
import os
import random
import sys

import trio

from p2pgpu.runtime._ray import RayMember, RayMemberSpec, ray_unavailable
from p2pgpu.runtime._ray_procs import pick_ports

ENTRY = r"""
import os, time, ray
ray.init()
print("running", len([n for n in ray.nodes() if n["Alive"]]), flush=True)
time.sleep(600)
"""


async def one(n: int, two_phase: bool) -> dict[str, float]:
    port = 0 if two_phase else pick_ports(1, rng=random.Random())[0]
    peers = tuple(f"peer{i}" for i in range(n))
    marks: dict[str, float] = {}
    t0 = trio.current_time()
    running = trio.Event()
    members: list[RayMember] = []

    def mark(name: str) -> None:
        marks.setdefault(name, trio.current_time() - t0)

    def on_event(rank: int):  # type: ignore[no-untyped-def]
        def f(name: str, info: object) -> None:
            if name == "ray_started":
                mark(f"node_up_{rank}")
                if two_phase and rank == 0:
                    for m in members[1:]:
                        assert members[0].address is not None
                        m.set_rendezvous(members[0].address.gcs_port)
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
        spec = RayMemberSpec(job_id=job_id, members=peers, rank=r, command=(sys.executable, "-c", ENTRY),
                             rendezvous_host="127.0.0.1", rendezvous_port=port, host="127.0.0.1", num_cpus=1,
                             memory_bytes_max=1 << 30, time_limit_ms=600_000)
        members.append(RayMember(spec, on_line=on_line if r == 0 else None, on_event=on_event(r)))
    left: list[int] = []

    async def run(m: RayMember) -> None:
        res = await m.run()
        left.extend(res.processes_left)
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
    marks["all_nodes_up"] = max(v for k, v in marks.items() if k.startswith("node_up_"))
    if left:
        print(f"  processes left after teardown: {left}")
    return marks


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--members", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--two-phase", action="store_true")
    args = ap.parse_args()
    if ray_unavailable():
        sys.exit(ray_unavailable())
    cols = ["all_nodes_up", "nodes_ready", "entrypoint_started", "driver_connected", "cancel_to_all_gone"]
    print(f"cpus={os.cpu_count()} load average before={os.getloadavg()[0]:.1f} "
          f"mode={'two-phase' if args.two_phase else 'fixed rendezvous port'}")
    print(f"{'members':>7} " + " ".join(f"{c:>18}" for c in cols) + "   (seconds from start)")
    for n in args.members:
        for _ in range(args.repeat):
            marks = await one(n, args.two_phase)
            print(f"{n:>7} " + " ".join(f"{marks.get(c, float('nan')):>18.1f}" for c in cols), flush=True)
    print(f"load average after={os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    trio.run(main)
