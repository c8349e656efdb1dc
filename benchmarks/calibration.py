"""Calibration: real node processes against the simulator, same network.

Issue 6 asks that the simulator's GossipSub and link models be compared with
the real node "on loopback, same topology and injected latency".  This script
does both halves and prints them side by side (docs/calibration.md):

Real: N ``p2pgpu node run`` processes on 127.0.0.1 (``p2pgpu.localnet``, the
realistic GPU mix), every one with ``link_delay_ms`` / ``link_jitter_pct`` in
its config.toml (``p2pgpu/node/_linkdelay.py``: each byte a node receives is
handed to Noise and Yamux that much later, order kept; the local network
only).  The processes are this script in ``--node-proc`` mode: the real CLI
and daemon, plus two control methods for the measurement (``calib.republish``
makes the node sign and publish a fresh advert now, one turn of its advert
loop, without a DHT put; ``calib.accepted`` returns the wall-clock time at
which its GossipSub validator accepted each advert).  After the network has
formed (every node knows every advert) and settled (the nodes' CPU has
dropped after start-up), the benchmark reads the topology (each node's peers
and ping RTT) and the nodes' idle CPU, then
1. advert propagation: ``--adverts`` fresh adverts, one at a time from
   different nodes, 2 s apart; latency = acceptance at each other node minus
   the advert's ``issued_at`` (one machine, one clock);
2. formation latency: ``--jobs`` jobs (1- and 2-node, ``true``), one at a
   time from different nodes, submit to confirmed certificate as the
   submitting daemon stamps it (``benchmarks/formation.py``'s code).

Simulated: the same N nodes in ``p2pgpu.sim`` with the *measured* topology
(the real peer lists, injected as the simulated connections), uniform links
of ``link_ms`` +- ``jitter_pct``, GossipSub with the node's parameters
(D 6, 4..12, 1 s heartbeat, no flood publishing: py-libp2p 0.8.1 publishes
to its mesh only), the same advert origins and the same job sizes from the
same submitters, the node's FormationConfig (``NODE_FORMATION``: offer
window 200 ms, leader timeout 1.5 s, member timeout 600 ms, everything on the
shared jobs topic as the node does), ``--seeds`` seeds.  Model settings: the pure network model;
plus CPU per delivered message (``processing_ms`` on ``shared_cores`` of this
machine); fit 1, an extra per-hop latency (``link_ms`` + x) that matches the
real median; fit 2, a per-copy send time (the uplink serialisation: the k-th
peer gets its copy k times later) and a per-hop latency that match the real
median and spread; and, for formation, the simulator's default per-job
topics.

    python3 benchmarks/calibration.py [--nodes 20] [--link-ms 25] [--jitter-pct 10]
                                      [--adverts 10] [--jobs 8] [--seeds 10] [--json]
    python3 benchmarks/calibration.py --link-ms 0      # plain loopback
    python3 benchmarks/calibration.py --nodes 50      # once, for the record
    python3 benchmarks/calibration.py --sim-only FILE # re-run the simulated half on a saved real run

The simulator half uses ``p2pgpu.sim``'s World directly (as
``benchmarks/simulator.py --calibrate`` does): the scenario format has no
way yet to give an explicit topology, publish at set times, submit set jobs,
or put formation on the shared jobs topic.  About 2.5 minutes for 20 nodes
(half of it the fits), 10 for 50.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

SETTLE_S = 6.0  # after every node knows every advert: meshes, DHT bootstrap
ADVERT_GAP_S = 2.0
QUIET_CORES_PER_NODE = 0.03  # node CPU taken as settled (start-up work done): 3 % of a core per node
QUIET_WAIT_S = 90.0  # the node republishes at most once a second
#: The simulator's advert size (its adverts carry no addresses): the per-copy
#: send time ``send_ms`` is turned into an uplink rate for this size.
SIM_ADVERT_BYTES = 657
LOOPBACK_MS = 0.05  # plain loopback's one-way delay, for --link-ms 0
CPU_MS_PER_MESSAGE = 0.4
#: The node's FormationConfig (p2pgpu/node/_jobs.py, JobsService): keep in step.
NODE_FORMATION = {"offer_window_ms": 200, "leader_timeout_ms": 1500, "member_timeout_ms": 600,
                  "late_volunteer_ms": 600}  # docs/performance.md (p): patched node, relays and duplicates included


# ------------------------------------------------------------------ the node process


def node_proc(argv: list[str]) -> int:
    """``p2pgpu node run`` with two measurement methods on its control API."""
    from libp2p.peer.id import ID

    from p2pgpu.cli import main as cli_main
    from p2pgpu.node import _daemon

    accepted: dict[str, float] = {}
    validate = _daemon.Node._validate_advert
    handlers = _daemon.Node.control_handlers

    def timed_validate(self: Any, forwarder: Any, msg: Any) -> bool:
        ok = validate(self, forwarder, msg)
        if ok and self.stack is not None and msg.from_id != self.stack.host.get_id().to_bytes():
            pid = ID(msg.from_id).to_base58()
            sa = self.book.adverts.get(pid)
            if sa is not None:
                accepted.setdefault(f"{pid}/{sa.advert.seq}", time.time_ns() / 1e6)
        return ok

    def calib_handlers(self: Any) -> dict[str, Any]:
        h = handlers(self)

        async def republish(params: dict[str, Any]) -> dict[str, Any]:
            # What one turn of the node's advert loop does (Node._advert_loop),
            # now: the loop itself republishes only when capacity changed.
            called_ms = time.time_ns() / 1e6
            sa = self._make_advert()
            self._own = sa
            self.jobs.on_advert(sa)
            self.book.add_own(sa)
            await self.stack.pubsub.publish(_daemon.ADVERTS_TOPIC, sa.wire)
            self.counts["adverts_published"] += 1
            adv = sa.advert
            return {"peer_id": adv.peer_id, "seq": adv.seq, "issued_at_ms": adv.issued_at_ms,
                    "called_ms": round(called_ms, 1), "bytes": len(sa.wire)}

        async def accepted_at(params: dict[str, Any]) -> dict[str, float]:
            return dict(accepted)

        async def mesh(params: dict[str, Any]) -> dict[str, list[str]]:
            gs = self.stack.gossipsub
            return {t: sorted(p.to_base58() for p in peers) for t, peers in gs.mesh.items()}

        h["calib.republish"] = republish
        h["calib.mesh"] = mesh
        h["calib.accepted"] = accepted_at
        return h

    _daemon.Node._validate_advert = timed_validate  # type: ignore[method-assign]
    _daemon.Node.control_handlers = calib_handlers  # type: ignore[method-assign]
    return cli_main(argv)


# ------------------------------------------------------------------ the real network


def make_net(root: Path, n: int, link_ms: float, jitter_pct: float) -> Any:
    from p2pgpu import children, localnet

    extra = f"link_delay_ms = {link_ms}\nlink_jitter_pct = {jitter_pct}\n" if link_ms > 0 else ""

    class CalibNet(localnet.LocalNet):
        """LocalNet whose processes are this script's ``--node-proc``."""

        def start_node(self, i: int, *, bootstrap: list[str], wait: bool = True) -> localnet.NodeProc:
            home = self.home(i)
            if not home.exists():
                home.init(network="local")
                if self.config_extra.strip():
                    localnet._override_config(home.config_path, self.config_extra)
            inv = self.root / f"gpus{i}.json"
            inv.write_text(json.dumps(localnet.inventory_doc(*self.gpu_mix[i % len(self.gpu_mix)])))
            home.control_path.unlink(missing_ok=True)
            args = [sys.executable, os.path.abspath(__file__), "--node-proc", "node", "run", "--home", str(home.path),
                    "--listen", "/ip4/127.0.0.1/tcp/0", "--gpus-from", str(inv), "--advert-ttl", str(self.advert_ttl_s)]
            for b in bootstrap[:1]:
                args += ["--bootstrap", b]
            log_path = self.root / f"node{i}.log"
            with open(log_path, "ab") as log:
                proc = children.spawn(args, stdout=log, stderr=subprocess.STDOUT,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"})
            node = localnet.NodeProc(index=i, home=home, proc=proc, log_path=log_path)
            if wait:
                self.wait_ready(node)
            return node

    return CalibNet(root, n, start_timeout_s=240, config_extra=extra)


def git_commit() -> str:
    """The commit the node processes were started from (other work lands while this runs)."""
    try:
        return subprocess.run(["git", "log", "-1", "--format=%h"], capture_output=True, text=True, check=False,
                              cwd=os.path.dirname(HERE)).stdout.strip()
    except OSError:
        return ""


def measure_real(args: argparse.Namespace) -> dict[str, Any]:
    from formation import cpu_s, run_job, start_parallel

    root = Path(tempfile.mkdtemp(prefix="p2pgpu-calibration-"))
    net = make_net(root, args.nodes, args.link_ms, args.jitter_pct)
    doc: dict[str, Any] = {"load_avg_before": [round(x, 2) for x in os.getloadavg()],
                           "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": git_commit()}
    try:
        t0 = time.monotonic()
        start_parallel(net)
        net.wait_until(lambda: all(n.call("status")["adverts_known"] == args.nodes for n in net.nodes),
                       timeout_s=300, interval_s=1.0, what="every node to know every advert")
        time.sleep(SETTLE_S)
        doc["network_start_s"] = round(time.monotonic() - t0, 1)
        # Start-up work (DHT puts and provides, market syncs) must be over before
        # anything is timed: wait until the nodes together use little CPU.
        quiet_until = time.monotonic() + QUIET_WAIT_S
        while True:
            c0, q0 = sum(cpu_s(n) for n in net.nodes), time.monotonic()
            time.sleep(3.0)
            cores = (sum(cpu_s(n) for n in net.nodes) - c0) / (time.monotonic() - q0)
            if cores <= QUIET_CORES_PER_NODE * len(net.nodes) or time.monotonic() > quiet_until:
                break
        doc["quiet_after_s"] = round(time.monotonic() - t0, 1)
        index = {n.peer_id: n.index for n in net.nodes}
        edges: dict[tuple[int, int], float | None] = {}
        for n in net.nodes:
            for row in n.call("peers"):
                j = index.get(row["peer_id"])
                if j is not None:
                    key = (min(n.index, j), max(n.index, j))
                    rtt = row.get("latency_ms")
                    if edges.get(key) is None:
                        edges[key] = rtt
        doc["edges"] = sorted([a, b] for a, b in edges)
        doc["ping_rtt_ms"] = sorted(r for r in edges.values() if r is not None)
        # The nodes' own CPU with nothing measured running (heartbeats, pings, DHT
        # upkeep), then during the advert runs: what the event loops had to share.
        cpu0, w0 = sum(cpu_s(n) for n in net.nodes), time.monotonic()
        time.sleep(5.0)
        cpu1, w1 = sum(cpu_s(n) for n in net.nodes), time.monotonic()
        doc["node_cpu_idle_cores"] = round((cpu1 - cpu0) / (w1 - w0), 2)
        # 1. adverts
        published = []
        for r in range(args.adverts):
            origin = (r * 7) % args.nodes
            pub = net.nodes[origin].call("calib.republish")
            published.append({"origin": origin, **pub})
            time.sleep(ADVERT_GAP_S)
        time.sleep(1.0)
        cpu2, w2 = sum(cpu_s(n) for n in net.nodes), time.monotonic()
        doc["node_cpu_adverts_cores"] = round((cpu2 - cpu1) / (w2 - w1), 2)
        accepted = [n.call("calib.accepted", timeout_s=30) for n in net.nodes]
        runs = []
        for p in published:
            akey = f"{p['peer_id']}/{p['seq']}"
            lat = [acc[akey] - p["issued_at_ms"] for i, acc in enumerate(accepted) if i != p["origin"] and akey in acc]
            runs.append({"origin": p["origin"], "reached": len(lat), "latencies_ms": sorted(round(x, 2) for x in lat)})
        doc["advert_runs"] = runs
        # 2. formation, one job at a time
        rows: list[dict[str, Any]] = []
        lock = threading.Lock()
        load_jobs = os.getloadavg()
        cpu3, w3 = sum(cpu_s(n) for n in net.nodes), time.monotonic()
        for k in range(args.jobs):
            run_job(net, k, rows, lock)
        doc["node_cpu_jobs_cores"] = round((sum(cpu_s(n) for n in net.nodes) - cpu3) / (time.monotonic() - w3), 2)
        rows.sort(key=lambda r: r["k"])
        doc["jobs"] = [{"k": r["k"], "nodes": r["nodes"], "submitter": r["submitter"], "state": r.get("state"),
                        "formation_ms": r.get("formation_ms"), "views_seen": r.get("views_seen")} for r in rows]
        doc["load_avg_jobs"] = [round(x, 2) for x in load_jobs]
        doc["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        net.stop()
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    return doc


# ------------------------------------------------------------------ the simulated network


def simulate(real: dict[str, Any], args: argparse.Namespace, *, extra_ms: float, proc_ms: float, cores: int,
             seed: int, shared_topic: bool = True, jitter_pct: float | None = None,
             with_jobs: bool = True, send_ms: float = 0.0) -> dict[str, Any]:
    """One simulated run of the real run's topology, adverts and jobs."""
    from p2pgpu.sim import scenario_from_obj
    from p2pgpu.sim._crypto import verify_cache
    from p2pgpu.sim._world import World

    n = args.nodes
    runs = real["advert_runs"]
    jobs: list[dict[str, Any]] = real["jobs"] if with_jobs else []
    t_adverts_us = 4_000_000
    t_jobs_us = t_adverts_us + int((len(runs) + 1) * ADVERT_GAP_S * 1_000_000)
    job_gap_us = 3_000_000
    duration_s = t_jobs_us / 1e6 + len(jobs) * job_gap_us / 1e6 + 5
    s = scenario_from_obj({
        "run": {"name": "calibration", "nodes": n, "duration_s": duration_s, "settle_s": 1,
                "progress_every_s": 1e6, "network_name": "local"},
        "network": {"latency": "uniform", "link_ms": max(LOOPBACK_MS, args.link_ms) + extra_ms,
                    "jitter_pct": args.jitter_pct if jitter_pct is None else jitter_pct,
                    "peers_target": 1, "peers_high": 1000, "peers_max": 1000, "discovery_s": 1e6,
                    "bandwidth_mbps": SIM_ADVERT_BYTES * 8 / (send_ms * 1000) if send_ms > 0 else 1000},
        "gossipsub": {"D": 6, "D_lo": 4, "D_hi": 12, "D_lazy": 6, "heartbeat_ms": 1000, "flood_publish": False,
                      "processing_ms": proc_ms, "shared_cores": cores},
        "kademlia": {"enabled": False},
        "adverts": {"refresh_s": 100_000, "ttl_s": 3600, "books": "all", "initial_spread_s": 1},
        "jobs": {"submitters": n, "rate_per_s": 0.0, "duration_s": 1, "nodes_choices": [1, 2],
                 "offer_window_ms": NODE_FORMATION["offer_window_ms"],
                 "leader_timeout_ms": NODE_FORMATION["leader_timeout_ms"],
                 "member_timeout_ms": NODE_FORMATION["member_timeout_ms"],
                 "lease_ms": 10_000, "formation_timeout_ms": 60_000,
                 "late_volunteer_ms": NODE_FORMATION["late_volunteer_ms"],
                 # as the node does (p2pgpu/node/_jobs.py): one shared topic, no per-job topics
                 "per_job_topics": not shared_topic},
    })
    got: dict[int, list[int]] = {}
    probes: list[tuple[int, int]] = []  # (mid, t0_us)
    submitted: list[tuple[int, Any]] = []
    with verify_cache() as cache:
        w = World(s, seed, tracing=False, verify=cache)
        orig = w.metrics.on_delivery

        def rec(node: int, msg: Any) -> None:
            got.setdefault(msg.mid, []).append(w.engine.now_us)
            orig(node, msg)

        w.metrics.on_delivery = rec  # type: ignore[method-assign]

        def wire(_: Any) -> None:  # the real topology replaces the join-time links
            for a in range(n):
                for b in list(w.net.peers[a]):
                    w.net.disconnect(a, b)
            for a, b in real["edges"]:
                w.net.connect(a, b)

        def publish(origin: int) -> None:
            msg = w.publish_advert(origin)
            probes.append((msg.mid, w.engine.now_us))

        def submit(arg: tuple[int, int]) -> None:
            node, size = arg
            w.jobs.cfg = dataclasses.replace(w.jobs.cfg, nodes_choices=[size])
            job = w.jobs.submit(node)
            submitted.append((size, job))

        w.engine.at(1_050_000, wire, None)
        for r, run in enumerate(runs):
            w.engine.at(t_adverts_us + int(r * ADVERT_GAP_S * 1_000_000), publish, run["origin"])
        for k, job in enumerate(jobs):
            w.engine.at(t_jobs_us + k * job_gap_us, submit, (job["submitter"], job["nodes"]))
        w.run()
    adverts = []
    for mid, t0 in probes:
        lat = sorted((t - t0) / 1000 for t in got.get(mid, []))
        adverts.append({"reached": len(lat), "latencies_ms": lat, "bytes": w.gossip.msgs[mid].nbytes
                        if mid in w.gossip.msgs else None})
    formed = []
    for size, job in submitted:
        t = getattr(job, "t_confirm_us", None) if job is not None else None
        if t:
            formed.append({"nodes": size, "formation_ms": (t - job.t_submit_us) / 1000})
    return {"advert_runs": adverts, "jobs": formed, "jobs_submitted": len(submitted)}


# ------------------------------------------------------------------ figures


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(-(-q * len(s) // 100)) - 1))]


def advert_figures(runs: list[dict[str, Any]], others: int) -> dict[str, Any]:
    full = [r for r in runs if r["latencies_ms"]]
    pooled = [x for r in full for x in r["latencies_ms"]]
    if not pooled:
        return {}
    return {
        "runs": len(runs), "reached_all": sum(1 for r in runs if r["reached"] >= others),
        "median_of_medians": round(statistics.median(statistics.median(r["latencies_ms"]) for r in full), 1),
        "median_of_maxes": round(statistics.median(max(r["latencies_ms"]) for r in full), 1),
        "max": round(max(pooled), 1),
        "p50": round(percentile(pooled, 50), 1), "p90": round(percentile(pooled, 90), 1),
        "p99": round(percentile(pooled, 99), 1),
    }


def job_figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, sel in (("all", rows), ("1-node", [r for r in rows if r["nodes"] == 1]),
                       ("2-node", [r for r in rows if r["nodes"] == 2])):
        xs = [float(r["formation_ms"]) for r in sel if r.get("formation_ms") is not None]
        if xs:
            out[label] = {"n": len(xs), "p50": round(percentile(xs, 50), 1), "p90": round(percentile(xs, 90), 1),
                          "p99": round(percentile(xs, 99), 1), "max": round(max(xs), 1)}
    return out


def sim_setting(real: dict[str, Any], args: argparse.Namespace, **kw: Any) -> dict[str, Any]:
    """``args.seeds`` simulated runs of one model setting, pooled."""
    runs: list[dict[str, Any]] = []
    jobs: list[dict[str, Any]] = []
    for seed in range(1, args.seeds + 1):
        r = simulate(real, args, seed=seed, **kw)
        runs += r["advert_runs"]
        jobs += r["jobs"]
    return {"adverts": advert_figures(runs, args.nodes - 1), "formation": job_figures(jobs), "formed": len(jobs),
            "submitted": args.seeds * len(real["jobs"])}


def _bisect(f: Any, target: float, lo: float, hi: float, steps: int = 8) -> float:
    """x in [lo, hi] where the increasing f(x) crosses target."""
    if f(lo) >= target:
        return lo
    if f(hi) <= target:
        return hi
    for _ in range(steps):
        mid = (lo + hi) / 2
        if f(mid) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def fit_extra(real: dict[str, Any], args: argparse.Namespace, real_adv: dict[str, Any]) -> float:
    """Fit 1: the extra per-hop latency (added to ``link_ms``, with the
    measured CPU per message) whose simulated median propagation matches the
    real one."""
    fit_args = argparse.Namespace(**{**vars(args), "seeds": max(3, args.seeds // 2)})
    return round(_bisect(lambda x: float(sim_setting(real, fit_args, extra_ms=x, proc_ms=CPU_MS_PER_MESSAGE,
                                                     cores=args.cores, with_jobs=False)["adverts"]["median_of_medians"]),
                         real_adv["median_of_medians"], 0.0, 300.0), 1)


def fit(real: dict[str, Any], args: argparse.Namespace, real_adv: dict[str, Any]) -> tuple[float, float, float]:
    """Fit 2: the time a node spends sending one copy of a message to one
    peer (``send_ms``; the model's uplink serialisation, so the k-th mesh peer
    gets its copy k * send_ms after the first) and an extra per-hop latency.
    For each send time on a grid the extra latency is bisected to match the
    real median; of those pairs, the one whose spread (median of the runs'
    maxima minus median of their medians) is closest to the real spread wins.
    Returns (extra_ms, send_ms, spread error in ms), with half the seeds."""
    fit_args = argparse.Namespace(**{**vars(args), "seeds": max(3, args.seeds // 2)})

    def adv(extra: float, send: float) -> dict[str, Any]:
        figures: dict[str, Any] = sim_setting(real, fit_args, extra_ms=extra, proc_ms=CPU_MS_PER_MESSAGE,
                                              cores=args.cores, with_jobs=False, send_ms=send)["adverts"]
        return figures

    def spread(a: dict[str, Any]) -> float:
        return float(a["median_of_maxes"] - a["median_of_medians"])

    target = real_adv["median_of_medians"]
    best: tuple[float, float, float] | None = None
    for send in (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0):
        if adv(0.0, send)["median_of_medians"] > target * 1.05:
            break  # the send time alone already makes propagation slower than real
        extra = _bisect(lambda x, send=send: adv(x, send)["median_of_medians"], target, 0.0, 300.0)
        err = spread(adv(extra, send)) - spread(real_adv)
        if best is None or abs(err) < abs(best[2]):
            best = (round(extra, 1), send, round(err, 1))
    return best if best is not None else (0.0, 0.0, 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--link-ms", type=float, default=25.0, help="injected one-way delay (0: plain loopback)")
    ap.add_argument("--jitter-pct", type=float, default=10.0)
    ap.add_argument("--adverts", type=int, default=10, help="fresh adverts measured, one at a time")
    ap.add_argument("--jobs", type=int, default=8, help="jobs measured, one at a time (1- and 2-node)")
    ap.add_argument("--seeds", type=int, default=10, help="simulator seeds per model setting")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2, help="shared cores in the CPU model")
    ap.add_argument("--no-fit", action="store_true", help="skip fitting the extra per-hop latency")
    ap.add_argument("--sim-only", metavar="FILE", help="a --json output: simulate its real run again")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the real network's directory (logs)")
    if len(sys.argv) > 1 and sys.argv[1] == "--node-proc":
        sys.exit(node_proc(sys.argv[2:]))
    args = ap.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if args.sim_only:
        saved = json.loads(Path(args.sim_only).read_text())
        real = saved["real"]
        for key in ("nodes", "link_ms", "jitter_pct"):
            setattr(args, key, saved["setting"][key])
    else:
        real = measure_real(args)
    settings = [("network model only", {"extra_ms": 0.0, "proc_ms": 0.0, "cores": 0}),
                (f"+ CPU {CPU_MS_PER_MESSAGE} ms/message on {args.cores} shared cores",
                 {"extra_ms": 0.0, "proc_ms": CPU_MS_PER_MESSAGE, "cores": args.cores})]
    real_adv = advert_figures(real["advert_runs"], args.nodes - 1)
    fitted = None
    if not args.no_fit and real_adv:
        extra1 = fit_extra(real, args, real_adv)
        extra, send, spread_err = fit(real, args, real_adv)
        fitted = {"extra_ms": extra1, "link_ms": round(max(LOOPBACK_MS, args.link_ms) + extra1, 2),
                  "two": {"extra_ms": extra, "send_ms": send, "spread_error_ms": spread_err,
                          "bandwidth_mbps": round(SIM_ADVERT_BYTES * 8 / (send * 1000), 2) if send > 0 else None,
                          "link_ms": round(max(LOOPBACK_MS, args.link_ms) + extra, 2)}}
        settings.append((f"fit 1: + CPU, +{extra1} ms per hop",
                         {"extra_ms": extra1, "proc_ms": CPU_MS_PER_MESSAGE, "cores": args.cores}))
        settings.append((f"fit 2: + CPU, {send} ms/copy sent, +{extra} ms/hop",
                         {"extra_ms": extra, "proc_ms": CPU_MS_PER_MESSAGE, "cores": args.cores, "send_ms": send}))
    sims = [(label, sim_setting(real, args, **kw)) for label, kw in settings]
    per_job = sim_setting(real, args, extra_ms=0.0, proc_ms=CPU_MS_PER_MESSAGE, cores=args.cores, shared_topic=False)
    degrees = [0] * args.nodes
    for a, b in real["edges"]:
        degrees[a] += 1
        degrees[b] += 1
    doc = {
        "started": real.get("started", started), "commit": real.get("commit", ""),
        "setting": {"nodes": args.nodes, "link_ms": args.link_ms, "jitter_pct": args.jitter_pct,
                    "adverts": args.adverts, "jobs": args.jobs, "seeds": args.seeds, "cores": args.cores},
        "topology": {"edges": len(real["edges"]), "degree_mean": round(statistics.fmean(degrees), 1),
                     "degree_min": min(degrees), "degree_max": max(degrees),
                     "ping_rtt_ms_p50": round(statistics.median(real["ping_rtt_ms"]), 1) if real["ping_rtt_ms"] else None},
        "real_figures": {"adverts": real_adv, "formation": job_figures([j for j in real["jobs"]
                                                                         if j.get("state") in ("confirmed", "running", "succeeded")]),
                         "jobs_failed": sum(1 for j in real["jobs"] if j.get("state") not in ("confirmed", "running", "succeeded"))},
        "simulated": {label: fig for label, fig in sims},
        "simulated_per_job_topics": per_job,
        "fitted": fitted,
        "node_cpu_cores": {k: real.get(f"node_cpu_{k}_cores") for k in ("idle", "adverts", "jobs")},
        "real": real,
    }
    if args.json:
        print(json.dumps(doc, indent=1))
        return
    print_doc(doc)


def print_doc(doc: dict[str, Any]) -> None:
    st, tp = doc["setting"], doc["topology"]
    print(f"calibration {doc['started']} at {doc['commit']}: {st['nodes']} node processes on 127.0.0.1, "
          f"links {st['link_ms']} ms +-{st['jitter_pct']} %, {st['seeds']} seeds per simulated setting")
    print(f"  commit measured: {doc['commit']}; `uptime` load average before / during jobs / after: "
          f"{doc['real'].get('load_avg_before')} / {doc['real'].get('load_avg_jobs')} / {doc['real'].get('load_avg_after')}")
    print(f"  topology: {tp['edges']} links, degree mean {tp['degree_mean']} ({tp['degree_min']}..{tp['degree_max']}), "
          f"real ping RTT p50 {tp['ping_rtt_ms_p50']} ms")
    print("  advert propagation, publish -> accepted at each other node (ms):")
    print(f"    {'':<48} {'runs':>5} {'all':>4} {'med':>7} {'max':>7} {'p50':>7} {'p90':>7} {'p99':>7}")

    def adv_row(label: str, a: dict[str, Any]) -> None:
        if a:
            print(f"    {label:<48} {a['runs']:>5} {a['reached_all']:>4} {a['median_of_medians']:>7} "
                  f"{a['median_of_maxes']:>7} {a['p50']:>7} {a['p90']:>7} {a['p99']:>7}")

    adv_row("real", doc["real_figures"]["adverts"])
    for label, fig in doc["simulated"].items():
        adv_row("sim: " + label, fig["adverts"])
    print("  formation latency, submit -> confirmed certificate (ms), p50 / p90 / max:")

    def job_row(label: str, f: dict[str, Any], extra: str = "") -> None:
        parts = []
        for size in ("1-node", "2-node", "all"):
            s = f.get(size)
            parts.append(f"{size} {s['p50']:.0f} / {s['p90']:.0f} / {s['max']:.0f} (n={s['n']})" if s else f"{size} -")
        print(f"    {label:<48} " + "   ".join(parts) + extra)

    job_row("real", doc["real_figures"]["formation"], f"   failed {doc['real_figures']['jobs_failed']}")
    for label, fig in doc["simulated"].items():
        job_row("sim: " + label, fig["formation"], f"   formed {fig['formed']}/{fig['submitted']}")
    pj = doc["simulated_per_job_topics"]
    job_row("sim: + CPU, per-job topics (the simulator's default)", pj["formation"],
            f"   formed {pj['formed']}/{pj['submitted']}")
    f = doc["fitted"]
    if f is not None:
        print(f"  fit 1 (the median): network.link_ms = {f['link_ms']:g} ({f['extra_ms']} ms extra per hop) with "
              f"gossipsub.processing_ms = {CPU_MS_PER_MESSAGE}, shared_cores = {st['cores']}")
        t = f["two"]
        print(f"  fit 2 (median and spread): {t['send_ms']} ms per copy sent (network.bandwidth_mbps = "
              f"{t['bandwidth_mbps']} for the simulator's {SIM_ADVERT_BYTES}-byte adverts) and network.link_ms = "
              f"{t['link_ms']:g} ({t['extra_ms']} ms extra per hop); spread off by {t['spread_error_ms']} ms")
    c = doc["node_cpu_cores"]
    print(f"  the node processes' CPU, in cores: idle {c['idle']}, during the advert runs {c['adverts']}, "
          f"during the jobs {c['jobs']} (of {os.cpu_count()})")


if __name__ == "__main__":
    main()
