"""Simulator speed: events per second, simulated vs wall time, peak memory.

    python3 benchmarks/simulator.py            # engine alone + 1,000 and 10,000 nodes
    python3 benchmarks/simulator.py --full     # ... and 100,000 nodes (about 30 s, 650 MB)
    python3 benchmarks/simulator.py --sizes 1000 --sim-s 30
    python3 benchmarks/simulator.py --calibrate  # the loopback calibration of docs/calibration.md

Two figures:

1. **Engine alone**: timers that reschedule themselves with random delays
   (the heap, the seeded tie-break and the callback, nothing else), with
   1,000 and 100,000 events pending.
2. **Whole world** (the real advert/manifest/matching/payout cores, GossipSub
   and Kademlia models, links with jitter, regions): each size runs in its own
   process so its peak RSS is its own.  The workload is fixed per node where
   it can be (1 s heartbeats, peers, Kademlia lookups) and fixed network-wide
   for adverts (``--adverts-per-s``, default 2: with a 600 s refresh that is a
   1,200-node network; every advert reaches every node, so a per-node refresh
   rate would make the work grow as N^2 and say nothing about the engine).
   Jobs arrive at 0.2/s from 5 submitters.  Note what the protocol itself
   needs: an advert lives at most 1 h (``ttl_ms_max``), so N nodes publish at
   least N/3600 adverts/s (28/s at 100,000 nodes, each reaching every node
   about D = 8 times): the printed ``min_rate`` column.

Each line prints nodes, simulated seconds, wall seconds, the ratio
(simulated/wall: above 1 is faster than real time), the same ratio per
CPU-second (``x_cpu``, setup included: what a whole core gives; on the shared
machine the wall figure depends on what else runs), events, events/s and
peak RSS in MB, then the load average when the size started.  Goals (issue
6, on the 2-core machine): engine >= 1M events/s; with cores >= 100k
events/s; 1k nodes >= 10x real time, 10k >= 1x, 100k >= 0.1x within 16 GB.

``--exact`` schedules every gossip copy as an event (``GossipSub.exact``,
the reference the shortcuts are tested against: same trace, more events),
to show what the shortcuts save.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time

DEFAULT_SIM_S = {1_000: 60.0, 10_000: 20.0, 100_000: 5.0}


def engine_alone(pending: int, events: int) -> float:
    from p2pgpu.sim import Engine

    eng = Engine(1, tracing=False)
    rng = random.Random(1)
    delays = [rng.randrange(1, 50_000) for _ in range(4096)]
    count = [0]

    def tick(i: int) -> None:
        count[0] += 1
        eng.after(delays[(i + count[0]) & 4095], tick, i)

    for i in range(pending):
        eng.at(rng.randrange(50_000), tick, i)
    t0 = time.perf_counter()
    while count[0] < events:
        eng.run_until(eng.now_us + 100_000)
    return count[0] / (time.perf_counter() - t0)


def world_once(nodes: int, sim_s: float, adverts_per_s: float, exact: bool = False) -> dict[str, object]:
    from p2pgpu.sim import run_scenario, scenario_from_obj
    from p2pgpu.sim._gossip import GossipSub

    GossipSub.exact = exact

    scenario = scenario_from_obj({
        "run": {"name": f"bench-{nodes}", "nodes": nodes, "duration_s": sim_s, "settle_s": min(2.0, sim_s / 4),
                "progress_every_s": 1e6},
        "network": {"latency": "regions"},
        "kademlia": {"lookups_per_s": 1.0},
        "adverts": {"refresh_s": max(1.0, nodes / adverts_per_s), "ttl_s": min(3600.0, max(2.0, 2 * nodes / adverts_per_s)),
                    "observers": 10, "initial_spread_s": 0.0},
        "jobs": {"submitters": 5, "rate_per_s": 0.2, "duration_s": min(10.0, sim_s / 4)},
    })
    t0 = time.perf_counter()
    c0 = time.process_time()
    r = run_scenario(scenario, 1, plots=False)
    total = time.perf_counter() - t0
    cpu = time.process_time() - c0
    s = r.summary
    return {
        "nodes": nodes, "sim_s": s["sim_s"], "run_wall_s": s["wall_s"], "setup_wall_s": round(total - s["wall_s"], 2),
        "x_real_time": s["speed_x_real_time"], "events": s["events"], "events_per_s": s["events_per_s"],
        # on a shared machine wall time says little: events per CPU-second is the figure to trust
        "cpu_s": round(cpu, 1), "events_per_cpu_s": int(s["events"] / max(cpu, 1e-9)),
        "x_cpu": round(s["sim_s"] / max(cpu, 1e-9), 2),  # setup included
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "advert_p50_ms": s["advert_propagation_ms_p50"], "advert_p99_ms": s["advert_propagation_ms_p99"],
        "delivery_ratio": s["advert_delivery_ratio"], "violations": s["invariant_violations"],
    }


def calibration_probe(proc_ms: float, cores: int, link_ms: float, seed: int) -> tuple[int, float, float]:
    """The loopback setting of docs/performance.md (b), simulated: 20 nodes of
    ~6 links, 1 s heartbeats; after 3 s node 0 publishes a fresh advert; the
    latency to each other node's acceptance (median, max) in ms."""
    import statistics

    from p2pgpu.sim import scenario_from_obj
    from p2pgpu.sim._crypto import verify_cache
    from p2pgpu.sim._world import World

    s = scenario_from_obj({
        "run": {"nodes": 20, "duration_s": 8, "settle_s": 1},
        "network": {"latency": "uniform", "link_ms": link_ms, "jitter_pct": 20, "peers_target": 3,
                    "peers_high": 8, "bandwidth_mbps": 1000},
        "gossipsub": {"D": 6, "D_lo": 4, "D_hi": 12, "processing_ms": proc_ms, "shared_cores": cores},
        "kademlia": {"enabled": False},
        "adverts": {"refresh_s": 1000, "ttl_s": 3600, "books": "all"},
    })
    with verify_cache() as cache:
        w = World(s, seed, verify=cache)
        got: dict[object, list[int]] = {}
        orig = w.metrics.on_delivery

        def rec(node: int, msg: object) -> None:
            got.setdefault(msg.mid, []).append(w.engine.now_us)  # type: ignore[attr-defined]
            orig(node, msg)  # type: ignore[arg-type]

        w.metrics.on_delivery = rec  # type: ignore[method-assign]
        w.engine.at(3_000_000, lambda _: got.setdefault("probe", [w.publish_advert(0).mid]))
        w.end_us = 5_000_000
        w.run()
    lat = [(t - 3_000_000) / 1000 for t in got[got["probe"][0]]]
    return len(lat), statistics.median(lat), max(lat)


def calibrate() -> None:
    import statistics

    rows = [("no CPU cost, 0.05 ms links", 0.0, 0, 0.05),
            ("upstream: 3.05 ms/msg, 2 shared cores, 0.05 ms links", 3.05, 2, 0.05),
            ("upstream: 3.05 ms/msg, 1 core, 15 ms per hop", 3.05, 1, 15.0),
            ("patched: 0.39 ms/msg, 2 shared cores, 0.05 ms links", 0.39, 2, 0.05),
            ("patched: 0.39 ms/msg, 1 core, 15 ms per hop", 0.39, 1, 15.0)]
    print("simulated loopback, 20 nodes, median over 30 seeds of (median, max) latency to all 19 others")
    for label, proc, cores, link in rows:
        rs = [calibration_probe(proc, cores, link, seed) for seed in range(1, 31)]
        print(f"  {label:<55} median {statistics.median(r[1] for r in rs):6.1f} ms   "
              f"max {statistics.median(r[2] for r in rs):6.1f} ms   reached {min(r[0] for r in rs)}/19", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="include 100,000 nodes (about 30 s, 650 MB)")
    ap.add_argument("--sizes", type=int, nargs="*", help="node counts to run (overrides --full)")
    ap.add_argument("--sim-s", type=float, help="simulated seconds for every size")
    ap.add_argument("--adverts-per-s", type=float, default=2.0, help="network-wide advert rate (default 2)")
    ap.add_argument("--no-engine", action="store_true", help="skip the engine-alone figure")
    ap.add_argument("--calibrate", action="store_true", help="only the loopback calibration (docs/calibration.md)")
    ap.add_argument("--exact", action="store_true", help="schedule every gossip copy (no shortcuts; same trace)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.calibrate:
        calibrate()
        return
    if args.one:
        sim_s = args.sim_s or DEFAULT_SIM_S.get(args.one, 10.0)
        print(json.dumps(world_once(args.one, sim_s, args.adverts_per_s, args.exact)))
        return
    if not args.no_engine:
        for pending in (1_000, 100_000):
            rate = engine_alone(pending, 1_000_000)
            print(f"engine alone: {pending:>7} pending  {rate / 1e6:.2f}M events/s  (load {os.getloadavg()[0]:.1f})",
                  flush=True)
    sizes = args.sizes or ([1_000, 10_000, 100_000] if args.full else [1_000, 10_000])
    print(f"{'nodes':>7} {'sim_s':>6} {'wall_s':>7} {'x_real':>7} {'x_cpu':>6} {'events':>10} {'events/s':>9} "
          f"{'rss_MB':>7} {'p50_ms':>7} {'p99_ms':>7} {'ratio':>6} {'min_rate':>8}", flush=True)
    for n in sizes:
        load = os.getloadavg()[0]
        cmd = [sys.executable, __file__, "--one", str(n), "--adverts-per-s", str(args.adverts_per_s)]
        if args.sim_s:
            cmd += ["--sim-s", str(args.sim_s)]
        if args.exact:
            cmd += ["--exact"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        d = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{d['nodes']:>7} {d['sim_s']:>6} {d['run_wall_s']:>7} {d['x_real_time']:>7} {d['x_cpu']:>6} "
              f"{d['events']:>10} {d['events_per_s']:>9} {d['peak_rss_mb']:>7} {d['advert_p50_ms']!s:>7} "
              f"{d['advert_p99_ms']!s:>7} {d['delivery_ratio']!s:>6} {n / 3600:>8.2f}  (setup {d['setup_wall_s']} s, "
              f"cpu {d['cpu_s']} s = {d['events_per_cpu_s']} events per CPU-s, violations {d['violations']}, "
              f"load {load:.1f})", flush=True)


if __name__ == "__main__":
    main()
