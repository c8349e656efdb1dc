"""Formation latency and result transfer throughput over direct, hole-punched
and relayed connections, on real nodes in an emulated internet (#14).

    sudo python3 benchmarks/reachability.py [--mib 16] [--delay-ms 5] [--json]

The lab (``p2pgpu.natlab``, network namespaces; needs root, ip, iptables):
an internet on 198.51.100.0/24 with a bootstrap node (and the ledger), a
relay node and two more public nodes; ``home1``, ``home3`` and ``home4``,
NATs that keep one public port per inside port (hole punching can work),
and ``home2`` with ``--random-fully`` (punching fails).  Three 2-node jobs, each
writing a ``--mib`` MiB result file per member:

- ``direct``: submitter ``boot``, members ``p1``, ``p2`` (public);
- ``hole_punched``: submitter ``a1`` (behind home1), members ``c1``, ``c2``
  (behind home3 and home4): they meet through a relay and punch;
- ``relayed``: submitter ``a1``, members ``b1``, ``b2`` (behind home2): the
  results come through the relay.

For each it prints ``formation_s`` (submit until the cluster is confirmed
and running), ``results_s`` and ``results_mb_s`` (``job.results``: both
members' files fetched by the submitter), and how the submitter was
connected to the members while fetching (``via``).  Each link carries
``--delay-ms`` of one-way delay (netem) so that paths differ as on the
internet.  Figures depend on the machine and its load: rerun before
comparing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "netns"))

from natnet import NatNet, wait_until

from p2pgpu import natlab

GPUS = {"direct": ("NVIDIA H100 80GB HBM3", 81559, "9.0", 1), "hole_punched": ("NVIDIA A100-SXM4-40GB", 40960, "8.0", 1),
        "relayed": ("NVIDIA GeForce RTX 4090", 24564, "8.9", 1)}
OTHER = ("Tesla T4", 15360, "7.5", 1)
PAIRS = {"direct": ("boot", "p1", "p2"), "hole_punched": ("a1", "c1", "c2"), "relayed": ("a1", "b1", "b2")}


def manifest(kind: str, mib: int) -> str:
    model = GPUS[kind][0]
    return f"""
name = "reach-bench-{kind}"
expires_in_s = 600
[requirements]
nodes = 2
gpus_per_node = 1
models = ["{model}"]
[runtime]
kind = "process"
command = ["python3", "-c", "import os; open('result-' + os.environ['P2PGPU_RANK'] + '.bin', 'wb').write(os.urandom({mib} << 20))"]
duration_s_max = 120
network = false
[payment]
price_per_gpu_hour_max = 10000000
currency = "SOL"
[verification]
replicas = 1
on_member_loss = "fail"
"""


def build(lab: natlab.NatLab, root: Path) -> NatNet:
    for name in ("boot", "relay", "p1", "p2"):
        lab.add_public(name)
    home1, home2 = lab.add_nat("home1"), lab.add_nat("home2", random_ports=True)
    lab.add_private(home1, "a1")
    for n in ("b1", "b2"):
        lab.add_private(home2, n)
    # One node per port-keeping NAT: two behind one NAT cannot both keep port 4001.
    lab.add_private(lab.add_nat("home3"), "c1")
    lab.add_private(lab.add_nat("home4"), "c2")
    net = NatNet(lab=lab, root=root)
    net.start_ledger()
    boot = net.start_node("boot", OTHER, bootstrap=[])
    gpu_of = {"p1": "direct", "p2": "direct", "c1": "hole_punched", "c2": "hole_punched", "b1": "relayed",
              "b2": "relayed"}
    for name in ("relay", "p1", "p2", "a1", "b1", "b2", "c1", "c2"):
        gpu = GPUS[gpu_of[name]] if name in gpu_of else OTHER
        net.start_node(name, gpu, bootstrap=[boot.bootstrap_addr])
    return net


def run_one(net: NatNet, kind: str, mib: int, out: Path) -> dict[str, object]:
    sub_name, m1, m2 = PAIRS[kind]
    sub = net.nodes[sub_name]
    members = {net.nodes[m1].peer_id: m1, net.nodes[m2].peer_id: m2}
    t0 = time.monotonic()
    job = sub.call("job.submit", {"manifest": manifest(kind, mib)})["job_id"]
    wait_until(lambda: sub.call("job.status", {"job_id": job})["state"] not in ("forming", "submitted"),
               timeout_s=180, interval_s=0.1, what=f"{kind}: the cluster to form")
    formation_s = time.monotonic() - t0
    def finished() -> dict[str, object] | None:
        d = sub.call("job.status", {"job_id": job})
        return d if d["state"] in ("succeeded", "failed") else None

    doc = wait_until(finished, timeout_s=240, what=f"{kind}: the job to finish")
    if doc["state"] != "succeeded":
        raise SystemExit(f"{kind}: the job failed: {doc}")
    via = {members[r["peer_id"]]: r.get("connections", []) for r in sub.call("peers") if r["peer_id"] in members}
    t1 = time.monotonic()
    sub.call("job.results", {"job_id": job, "out": str(out / kind)}, timeout_s=600)
    results_s = time.monotonic() - t1
    got = sum(p.stat().st_size for p in (out / kind).rglob("result-*.bin"))
    return {"formation_s": round(formation_s, 2), "results_s": round(results_s, 2),
            "results_mb_s": round(got / 1e6 / results_s, 2), "results_bytes": got, "via": via}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=16, help="MiB each member writes (default 16)")
    ap.add_argument("--delay-ms", type=int, default=5, help="one-way delay per internet link (default 5)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    why = natlab.unavailable()
    if why is not None:
        print(f"reachability benchmark: cannot build the lab: {why}", file=sys.stderr)
        return 2
    figures: dict[str, object] = {"mib_per_member": args.mib, "delay_ms": args.delay_ms}
    with tempfile.TemporaryDirectory(prefix="p2pgpu-reach-bench-") as tmp, \
            natlab.NatLab(tag="bench", delay_ms=args.delay_ms) as lab:
        root = Path(tmp)
        net = build(lab, root)
        try:
            want = {n.peer_id for n in net.nodes.values()}
            for n in net.nodes.values():
                wait_until(lambda n=n: {r["peer_id"] for r in n.call("market")} >= want, timeout_s=180,
                           what=f"{n.name}'s market")
            for n in net.nodes.values():  # payout accounts exist; the submitters can pay
                net.rpc("requestAirdrop", [n.call("wallet")["payout_address"], 1_000_000_000])
            for name in ("boot", "a1"):
                net.rpc("requestAirdrop", [net.nodes[name].call("wallet")["address"], 50_000_000_000])
            for kind in ("direct", "hole_punched", "relayed"):
                figures[kind] = run_one(net, kind, args.mib, root / "out")
            figures["hole_punch"] = {n: net.nodes[n].call("status")["reachability"]["hole_punch"]
                                     for n in ("a1", "b1", "b2", "c1", "c2")}
        finally:
            net.stop()
        if lab.delay_missing:
            figures["delay_missing"] = lab.delay_missing
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        for kind in ("direct", "hole_punched", "relayed"):
            f = figures[kind]
            assert isinstance(f, dict)
            print(f"{kind:13} formation {f['formation_s']:6.2f} s   results {f['results_mb_s']:7.2f} MB/s "
                  f"({f['results_bytes']} bytes in {f['results_s']} s)   via {f['via']}")
        print(f"hole punches: {figures['hole_punch']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
