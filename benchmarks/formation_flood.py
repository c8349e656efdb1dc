"""Formation latency during a flood of one identity's manifests (#18.3's goal).

Starts the network of ``benchmarks/formation.py`` (``p2pgpu node run``
processes on 127.0.0.1, the realistic GPU mix), measures formation latency
of honest jobs on the quiet network, then starts a hostile peer
(``_flood_peer.py``, a child process with its own identity) that publishes
``--flood`` valid manifests of 1-GPU jobs every node can serve on the jobs
topic over ``--flood-s`` seconds, connected to two nodes, and measures the
same honest jobs submitted from the moment the flood starts.  Goal: the
p50 during the flood within 2x of the quiet p50.

    python3 benchmarks/formation_flood.py [--nodes 16] [--jobs 30] [--flood 5000] [--flood-s 5.5] [--json]

Jobs are submitted one at a time from a different node each (1- and 2-node
jobs alternating, as ``formation.py`` does); every figure is the submitting
daemon's own ``timings.formation_ms``.  A shared 2-core machine makes every
figure noisy: the quiet and flooded phases run back to back on the same
network so that they share the noise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from formation import CONFIRMED, cpu_s, run_job, settle, start_parallel, summary

from p2pgpu.localnet import LocalNet


def phase(net: LocalNet, jobs: int, first_k: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    lock = threading.Lock()
    for k in range(first_k, first_k + jobs):
        t = threading.Thread(target=run_job, args=(net, k, rows, lock))
        t.start()
        t.join()
    return sorted(rows, key=lambda r: r["k"])


def latencies(rows: list[dict[str, Any]]) -> list[float]:
    return [float(r["formation_ms"]) for r in rows if r.get("state") in CONFIRMED and r.get("formation_ms") is not None]


def node_counters(net: LocalNet, prefix: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in net.nodes:
        for k, v in n.call("status")["counters"].items():
            if k.startswith(prefix):
                out[k] = out.get(k, 0) + int(v)
    return dict(sorted(out.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--jobs", type=int, default=30, help="honest jobs per phase")
    ap.add_argument("--flood", type=int, default=5000, help="manifests the hostile peer publishes")
    ap.add_argument("--flood-s", type=float, default=5.5, help="over this many seconds")
    ap.add_argument("--settle-s", type=float, default=5.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="p2pgpu-flood-bench-"))
    net = LocalNet(root, args.nodes, start_timeout_s=180)
    load_before = os.getloadavg()
    flooder: subprocess.Popen[str] | None = None
    try:
        start_parallel(net)
        net.wait_until(lambda: all(n.call("status")["adverts_known"] == args.nodes for n in net.nodes),
                       timeout_s=120, interval_s=0.5, what="every node to know every advert")
        settle(net, args.settle_s)
        quiet = phase(net, args.jobs, 0)
        flooder = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "_flood_peer.py"), "--count", str(args.flood), "--seconds",
             str(args.flood_s), net.nodes[1].addrs[0], net.nodes[2].addrs[0]],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert flooder.stdin is not None and flooder.stdout is not None
        if flooder.stdout.readline().strip() != "ready":
            raise RuntimeError("the flooding peer did not start")
        cpu0 = sum(cpu_s(n) for n in net.nodes)
        t0 = time.monotonic()
        flooder.stdin.write("go\n")
        flooder.stdin.flush()
        flooded = phase(net, args.jobs, args.jobs)
        done = flooder.stdout.readline().split()
        flood_wall_s = time.monotonic() - t0
        cpu_flood = sum(cpu_s(n) for n in net.nodes) - cpu0
        limited = node_counters(net, "jobs:limit_exceeded")
        load_after = os.getloadavg()
    finally:
        if flooder is not None:
            flooder.kill()
            flooder.wait(timeout=5)
        net.stop()
    q, f = summary(latencies(quiet)), summary(latencies(flooded))
    doc = {
        "nodes": args.nodes, "jobs_per_phase": args.jobs, "flood": args.flood, "flood_s": args.flood_s,
        "cpus": os.cpu_count(), "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in load_after],
        "quiet_ms": q, "flooded_ms": f,
        "quiet_formed": len(latencies(quiet)), "flooded_formed": len(latencies(flooded)),
        "flooded_failures": [{"k": r["k"], "state": r.get("state"), "reason": str(r.get("reason", ""))[:160]}
                             for r in flooded if r.get("state") not in CONFIRMED],
        "flood_published": int(done[1]) if len(done) >= 3 else None,
        "flood_publish_s": float(done[2]) if len(done) >= 3 else None,
        "flood_phase_s": round(flood_wall_s, 1),
        "node_cpu_s_during_flood_phase": round(cpu_flood, 1),
        "manifests_refused_by_quota": limited,
        "goal": {"p50_ratio_max": 2.0},
    }
    if q and f:
        doc["p50_ratio"] = round(f["p50"] / q["p50"], 2)
        doc["goal"]["met"] = doc["p50_ratio"] <= 2.0 and not doc["flooded_failures"]
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(doc, indent=1))
        return
    print(f"formation during a flood: {args.nodes} node processes, {args.jobs} honest jobs per phase, "
          f"{args.flood} manifests of one identity over {args.flood_s} s, {os.cpu_count()} CPUs")
    print(f"  load average before {doc['load_avg_before']}, after {doc['load_avg_after']}")
    for name, s in (("quiet", q), ("flooded", f)):
        if s:
            print(f"  {name:8s} p50 {s['p50']:.0f} ms  p90 {s['p90']:.0f} ms  p99 {s['p99']:.0f} ms  max {s['max']:.0f} ms")
    if "p50_ratio" in doc:
        print(f"  p50 during the flood / quiet: {doc['p50_ratio']}x (goal <= 2x): "
              f"{'met' if doc['goal'].get('met') else 'MISSED'}")
    print(f"  flood published {doc['flood_published']} in {doc['flood_publish_s']} s; refused by the "
          f"per-submitter quota: {sum(limited.values())}; node CPU during the flood phase {doc['node_cpu_s_during_flood_phase']} s")
    for fl in doc["flooded_failures"][:10]:
        print(f"  failed job {fl['k']}: {fl['state']}: {fl['reason']}")


if __name__ == "__main__":
    main()
