"""Advert benchmarks: verify rate, network-wide latency, GossipSub ingest.

Prints three figures (issue 2's goals in brackets):

(a) signed adverts verified per second in one process with
    ``p2pgpu.core.verify_advert`` (>= 15,000/s);
(b) the time for an advert to reach every node of a local network of N
    processes on 127.0.0.1 (< 1 s for N = 20);
(c) adverts per second one node process ingests through GossipSub, and the
    CPU each costs (>= 1,000/s).

(b) and (c) run twice, with py-libp2p as released and with
``p2pgpu.node._patches`` applied, so the gain is visible; (a) does not touch
libp2p.  CPU figures come from ``getrusage`` in the measured process, so they
hold on a shared 2-core machine where wall-clock rates are noisy; the wall
rate is printed alongside.  The peers are ``benchmarks/_gossip_peer.py``
processes, built as the node builds its host (Noise, Yamux, meshsub v1.1 and
v1.0, 1 s heartbeat, one connection per peer).

    python3 benchmarks/adverts.py [--quick] [--nodes N] [--only a,b,c,p] [--real-nodes] [--json]

``--real-nodes`` runs (b) on real ``p2pgpu node run`` processes (through
``p2pgpu.localnet``, watching their control API) instead of benchmark peers;
the node applies the patches itself, and ``P2PGPU_LIBP2P_PATCHES=0`` gives
the upstream run.

``--only p`` adds (p): CPU per delivered message with 5 hosts in one process,
for upstream, all patches, and all patches but one (each configuration in a
fresh process, the least of three runs), which is how each patch's gain in
``docs/performance.md`` was measured.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import random
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import _gossip_peer as gp

from p2pgpu import children

# --- (a) ---------------------------------------------------------------------------


def bench_verify(count: int) -> dict[str, Any]:
    from p2pgpu.core import verify_advert

    wires = gp.make_adverts(1, count, 0, int(time.time() * 1000))
    now_ms = int(time.time() * 1000)
    verify_advert(wires[0], now_ms=now_ms)  # warm caches (key objects) once
    t0 = time.process_time()
    for w in wires:
        verify_advert(w, now_ms=now_ms)
    cpu = time.process_time() - t0
    return {"adverts": count, "cpu_s": cpu, "per_s": count / cpu, "advert_bytes": len(wires[0])}


# --- peer processes ------------------------------------------------------------------


class Peers:
    """A set of ``_gossip_peer.py`` processes and their JSON-line reports."""

    def __init__(self, n: int, *, patched: bool, report_each: bool, first_index: int = 0,
                 no_validate_from: int | None = None) -> None:
        self.events: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue()
        self.procs: list[subprocess.Popen[str]] = []
        self.addrs: list[str] = []
        cmd = [sys.executable, os.path.join(HERE, "_gossip_peer.py")]
        if not patched:
            cmd.append("--no-patches")
        if report_each:
            cmd.append("--report-each")
        for i in range(n):
            extra = ["--no-validate"] if no_validate_from is not None and i >= no_validate_from else []
            p = children.spawn(cmd + extra + ["--seed-index", str(first_index + i)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
            self.procs.append(p)
            threading.Thread(target=self._pump, args=(i, p), daemon=True).start()
        ready = self.wait_all("ready", range(n), timeout_s=60 + 3 * n)
        self.addrs = [ready[i]["addr"] for i in range(n)]

    def _pump(self, i: int, p: subprocess.Popen[str]) -> None:
        assert p.stdout is not None
        for line in p.stdout:
            self.events.put((i, json.loads(line)))

    def send(self, i: int, cmd: dict[str, Any]) -> None:
        stdin = self.procs[i].stdin
        assert stdin is not None
        stdin.write(json.dumps(cmd) + "\n")
        stdin.flush()

    def wait_all(self, ev: str, who: Any, timeout_s: float,
                 keep: dict[str, dict[int, float]] | None = None) -> dict[int, dict[str, Any]]:
        """Wait for event ``ev`` from each peer in ``who``; "recv" reports seen
        meanwhile are filed into ``keep`` (tag -> peer -> time)."""
        want = set(who)
        got: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        while want - set(got):
            try:
                i, obj = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no {ev!r} from peers {sorted(want - set(got))}") from None
            if obj["ev"] == ev and i in want:
                got[i] = obj
            elif obj["ev"] == "recv" and keep is not None:
                keep.setdefault(obj["tag"], {}).setdefault(i, obj["t"])
        return got

    def wait_any(self, timeout_s: float, keep: dict[str, dict[int, float]]) -> None:
        """File the "recv" reports that arrive within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                i, obj = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return
            if obj["ev"] == "recv":
                keep.setdefault(obj["tag"], {}).setdefault(i, obj["t"])

    def close(self) -> None:
        for i, p in enumerate(self.procs):
            if p.poll() is None:
                try:
                    self.send(i, {"cmd": "quit"})
                except (BrokenPipeError, OSError):
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def connect_graph(peers: Peers, n: int, degree: int, rng: random.Random) -> None:
    """A ring plus random chords: connected, about ``degree`` links a node."""
    links: dict[int, set[int]] = {i: set() for i in range(n)}
    for i in range(n):
        links[i].add((i + 1) % n)
    for i in range(n):
        while len(links[i]) < max(1, degree // 2) and n > 3:
            j = rng.randrange(n)
            if j != i and i not in links[j]:
                links[i].add(j)
    for i in range(n):
        targets = sorted(links[i] - {i})
        peers.send(i, {"cmd": "connect", "addrs": [peers.addrs[j] for j in targets]})
    peers.wait_all("connected", range(n), timeout_s=30 + n)


def wait_mesh(peers: Peers, n: int, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        for i in range(n):
            peers.send(i, {"cmd": "peers"})
        got = peers.wait_all("peers", range(n), timeout_s=10)
        mesh = [got[i]["mesh"] for i in range(n)]
        if min(mesh) >= 1 and min(got[i]["topic_peers"] for i in range(n)) >= 1 or time.monotonic() > deadline:
            return mesh
        time.sleep(0.5)


# --- (b) ---------------------------------------------------------------------------------


def bench_propagation(n: int, adverts: int, *, patched: bool, seed: int = 7) -> dict[str, Any]:
    rng = random.Random(seed)
    peers = Peers(n, patched=patched, report_each=True)
    try:
        connect_graph(peers, n, degree=6, rng=rng)
        time.sleep(2.5)  # two heartbeats: meshes form
        mesh = wait_mesh(peers, n, timeout_s=10)
        wires = gp.make_adverts(900, adverts, 0, int(time.time() * 1000))
        latencies = []
        reached = []
        recv: dict[str, dict[int, float]] = {}
        for wire in wires:
            src = rng.randrange(n)
            tag = hashlib.sha256(wire).hexdigest()[:16]
            peers.send(src, {"cmd": "publish", "data": wire.hex()})
            t_pub = peers.wait_all("published", [src], timeout_s=10, keep=recv)[src]["t"]
            deadline = time.monotonic() + 10
            while len({i for i in recv.get(tag, {}) if i != src}) < n - 1 and time.monotonic() < deadline:
                peers.wait_any(0.2, keep=recv)
            seen = {i: t for i, t in recv.get(tag, {}).items() if i != src}
            reached.append(len(seen))
            if len(seen) == n - 1:
                latencies.append(max(seen.values()) - t_pub)
            time.sleep(0.2)
        return {
            "nodes": n, "adverts": adverts, "reached_all": sum(r == n - 1 for r in reached),
            "reached": reached,
            "latency_s_median": statistics.median(latencies) if latencies else None,
            "latency_s_max": max(latencies) if latencies else None, "mesh_min": min(mesh),
        }
    finally:
        peers.close()


def bench_propagation_nodes(n: int, duration_s: float, *, patched: bool, ttl_s: int = 20) -> dict[str, Any]:
    """(b) on real ``p2pgpu node run`` processes (``p2pgpu.localnet``).  Each
    node republishes its advert every ``ttl_s / 2`` seconds; every node's
    ``market`` is polled over the control API, and an advert's latency is the
    time from its issue until the last other node lists it.  The figure is
    high by up to one polling sweep (printed), the cost of watching from
    outside.  Each refresh also makes the node store its advert in the DHT, so
    a much shorter lifetime would measure DHT load rather than gossip."""
    import tempfile
    from pathlib import Path

    from p2pgpu.localnet import LocalNet
    from p2pgpu.node import ControlError, DaemonUnavailable

    env = {} if patched else {"P2PGPU_LIBP2P_PATCHES": "0"}
    with tempfile.TemporaryDirectory(prefix="p2pgpu-bench-") as root, \
            LocalNet(Path(root), n, advert_ttl_s=ttl_s, env=env, start_timeout_s=120) as net:
        unreachable: dict[int, str] = {}

        def market(node: Any) -> list[dict[str, Any]] | None:
            if node.index in unreachable:
                return None
            try:
                return list(node.call("market", timeout_s=10))
            except (DaemonUnavailable, ControlError) as exc:
                unreachable[node.index] = f"{exc} (exit status {node.proc.poll()}; log: {node.log_tail(3)!r})"
                return None

        def converged() -> bool:
            sizes = [market(node) for node in net.nodes]
            return all(rows is None or len(rows) >= n - len(unreachable) for rows in sizes)

        net.wait_until(converged, timeout_s=60 + 6 * n, interval_s=1.0, what=f"every node lists all {n} adverts")
        first_seen: dict[tuple[str, int], dict[int, float]] = {}
        start = time.time()
        sweeps = 0
        while time.time() - start < duration_s:
            for node in net.nodes:
                rows = market(node)
                if rows is None:
                    continue
                now = time.time()
                for row in rows:
                    if row["peer_id"] != node.peer_id:
                        first_seen.setdefault((row["peer_id"], row["expires_at"]), {}).setdefault(node.index, now)
            sweeps += 1
        sweep_s = (time.time() - start) / max(sweeps, 1)
    latencies = []
    for (_pid, expires_at), seen in first_seen.items():
        issued_s = (expires_at - ttl_s * 1000) / 1000
        if issued_s > start and len(seen) >= n - 1 - len(unreachable):
            latencies.append(max(seen.values()) - issued_s)
    latencies.sort()
    return {
        "nodes": n, "adverts": len(latencies), "sweep_s": sweep_s, "unreachable": unreachable,
        "latency_s_median": statistics.median(latencies) if latencies else None,
        "latency_s_p90": latencies[int(0.9 * (len(latencies) - 1))] if latencies else None,
        "latency_s_max": latencies[-1] if latencies else None,
    }


# --- (c) ---------------------------------------------------------------------------------


def bench_ingest(adverts: int, publishers: int, *, patched: bool) -> dict[str, Any]:
    """One sink (index 0, full advert validator) and ``publishers`` processes
    that each publish their share of pre-signed adverts as fast as the sink
    takes them.  The sink's CPU is read before and after, in the sink."""
    peers = Peers(1 + publishers, patched=patched, report_each=False, first_index=50, no_validate_from=1)
    try:
        peers.send(0, {"cmd": "connect", "addrs": peers.addrs[1:]})
        peers.wait_all("connected", [0], timeout_s=30)
        time.sleep(2.5)
        wait_mesh(peers, 1 + publishers, timeout_s=10)
        peers.send(0, {"cmd": "stats"})
        before = peers.wait_all("stats", [0], timeout_s=10)[0]
        share = adverts // publishers
        for k in range(publishers):
            peers.send(1 + k, {"cmd": "publish_many", "count": share, "first": k * share})
        peers.wait_all("published_many", range(1, 1 + publishers), timeout_s=600)
        # Let the sink finish what is in flight, then read its counters.
        last = -1
        after = before
        for _ in range(100):
            peers.send(0, {"cmd": "stats"})
            after = peers.wait_all("stats", [0], timeout_s=10)[0]
            if after["valid"] == last or after["valid"] - before["valid"] >= share * publishers:
                break
            last = after["valid"]
            time.sleep(0.3)
        valid = after["valid"] - before["valid"]
        cpu = after["cpu_s"] - before["cpu_s"]
        wall = after["last_valid_t"] - after["first_valid_t"]
        return {
            "published": share * publishers, "ingested": valid, "invalid": after["invalid"] - before["invalid"],
            "delivered": after["delivered"] - before["delivered"], "sink_cpu_s": cpu,
            "cpu_ms_per_advert": 1000 * cpu / max(valid, 1), "per_cpu_s": valid / cpu if cpu else None,
            "wall_s": wall, "wall_per_s": valid / wall if wall else None,
        }
    finally:
        peers.close()


# --- per-patch gains (in one process) ------------------------------------------------


async def _inproc_run(nodes: int, messages: int, patches: list[str] | None) -> dict[str, Any]:
    """``nodes`` hosts in this process, fully connected; the first publishes
    ``messages`` adverts; every other host validates them.  CPU per delivery
    (relays and duplicates included)."""
    from contextlib import AsyncExitStack

    import trio

    if patches is not None:
        from p2pgpu.node import _patches

        _patches.apply(only=patches)
    async with AsyncExitStack() as stack:
        net = [await stack.enter_async_context(gp.open_gossip_node(gp.seed_for(100 + i))) for i in range(nodes)]
        sinks, subs = [], []
        for _host, ps, _gs in net:
            sink = gp.AdvertSink()
            ps.set_topic_validator(gp.TOPIC, sink.validator, is_async_validator=False)
            sinks.append(sink)
            subs.append(await ps.subscribe(gp.TOPIC))
        for i in range(nodes):
            for j in range(i + 1, nodes):
                await gp.connect(net[i][0], str(net[j][0].get_addrs()[0]))
        for i in range(1, nodes):
            await net[0][1].wait_for_mesh(net[i][0].get_id(), gp.TOPIC, timeout=10)
        wires = gp.make_adverts(7, messages, 0, int(time.time() * 1000))
        want = messages * (nodes - 1)
        async with trio.open_nursery() as nursery:
            for sink, sub in zip(sinks, subs):
                async def eat(sink: gp.AdvertSink = sink, sub: Any = sub) -> None:
                    while True:
                        await sub.get()
                        sink.delivered += 1
                nursery.start_soon(eat)
            ps0 = net[0][1]
            c0 = time.process_time()
            for i, wire in enumerate(wires):
                await ps0.publish(gp.TOPIC, wire)
                if i % 16 == 15:
                    await gp.wait_drained(ps0)
            with trio.move_on_after(60):
                while sum(s.valid for s in sinks[1:]) < want:
                    await trio.sleep(0.005)
            cpu = time.process_time() - c0
            got = sum(s.valid for s in sinks[1:])
            result = {"patches": patches, "deliveries": got, "expected": want, "cpu_s": cpu,
                      "cpu_ms_per_delivery": 1000 * cpu / max(got, 1)}
            # Printed before teardown: upstream's reader can crash its host on the
            # way down ("Nursery is closed to new arrivals", a task spawned per
            # message), which is not what is measured here.
            print(json.dumps(result), flush=True)
            nursery.cancel_scope.cancel()
    return result


def bench_patch_gains(messages: int, repeat: int) -> list[dict[str, Any]]:
    """Each configuration in a fresh process, ``repeat`` times, keeping the
    least CPU (other processes on a shared machine only ever add to it):
    upstream, all patches, and all patches but one (what losing that patch
    would cost)."""
    from p2pgpu.node import _patches

    names = list(_patches.PATCHES)
    configs: list[tuple[str, list[str] | None]] = [("upstream", None), ("all patches", names)]
    configs += [(f"all but {n}", [m for m in names if m != n]) for n in names]
    rows = []
    for label, patches in configs:
        arg = "none" if patches is None else ",".join(patches)
        runs = []
        for _attempt in range(repeat + 1):
            res = subprocess.run([sys.executable, __file__, "--inproc", arg, "--messages", str(messages)],
                                 capture_output=True, text=True, timeout=300, check=False)
            runs += [json.loads(ln) for ln in res.stdout.splitlines() if ln.startswith("{")]
            if len(runs) >= repeat:
                break
        if not runs:
            print(f"(p) {label}: run failed: {res.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        row = min(runs, key=lambda r: r["cpu_ms_per_delivery"])
        row["label"] = label
        row["runs_ms"] = [round(r["cpu_ms_per_delivery"], 3) for r in runs]
        rows.append(row)
        print(f"(p) {label:32s} {row['cpu_ms_per_delivery']:.3f} ms CPU per delivery "
              f"({row['deliveries']}/{row['expected']} delivered; runs {row['runs_ms']})", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description="p2pgpu advert benchmarks (see module docstring)")
    ap.add_argument("--nodes", type=int, default=20, help="processes in the propagation network (b)")
    ap.add_argument("--quick", action="store_true", help="short run")
    ap.add_argument("--only", default="a,b,c", help="which figures: a,b,c, and p (each patch's gain)")
    ap.add_argument("--json", action="store_true", help="print one JSON object at the end")
    ap.add_argument("--real-nodes", action="store_true",
                    help="(b) on real `p2pgpu node run` processes instead of benchmark peers")
    ap.add_argument("--inproc", help=argparse.SUPPRESS)  # internal: one in-process run
    ap.add_argument("--messages", type=int, default=300, help="adverts per in-process run (p)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per configuration (p); the least CPU is kept")
    args = ap.parse_args()
    if args.inproc is not None:
        import logging

        import trio

        logging.getLogger("libp2p").setLevel(logging.CRITICAL)
        patches = None if args.inproc == "none" else [p for p in args.inproc.split(",") if p]
        trio.run(_inproc_run, 5, args.messages, patches)  # prints its result line
        return
    parts = set(args.only.split(","))
    out: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    if "a" in parts:
        a = bench_verify(2000 if args.quick else 20000)
        out["a"] = a
        print(f"(a) verify_advert: {a['per_s']:,.0f} adverts/s in one process "
              f"({a['advert_bytes']} B each; goal >= 15,000/s)", flush=True)
    if "b" in parts:
        out["b"] = {}
        for patched in (False, True):
            tag = "patched " if patched else "upstream"
            if args.real_nodes:
                b = bench_propagation_nodes(args.nodes, 25 if args.quick else 60, patched=patched)
                desc = f"{b['adverts']} advert refreshes of real nodes, polled every {1000 * b['sweep_s']:.0f} ms"
                if b["unreachable"]:
                    desc += f"; {len(b['unreachable'])} nodes stopped answering: {b['unreachable']}"
            else:
                b = bench_propagation(args.nodes, 3 if args.quick else 10, patched=patched)
                desc = f"{b['reached_all']}/{b['adverts']} reached all"
            out["b"]["patched" if patched else "upstream"] = b
            lat = "n/a" if b["latency_s_median"] is None else \
                f"median {1000 * b['latency_s_median']:.0f} ms, max {1000 * b['latency_s_max']:.0f} ms"
            print(f"(b) {tag}: advert to all {b['nodes']} nodes: {lat} ({desc}; goal < 1 s)", flush=True)
    if "c" in parts:
        out["c"] = {}
        for patched in (False, True):
            count = (600 if args.quick else 3000) if patched else (300 if args.quick else 1000)
            c = bench_ingest(count, 2, patched=patched)
            out["c"]["patched" if patched else "upstream"] = c
            print(f"(c) {'patched ' if patched else 'upstream'}: {c['ingested']}/{c['published']} adverts ingested, "
                  f"{c['cpu_ms_per_advert']:.2f} ms CPU each = {c['per_cpu_s']:,.0f}/s per CPU-second "
                  f"(wall {c['wall_per_s']:,.0f}/s on this shared machine; goal >= 1,000/s)", flush=True)
    if "p" in parts:
        out["p"] = bench_patch_gains(150 if args.quick else args.messages, 1 if args.quick else args.repeat)
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
