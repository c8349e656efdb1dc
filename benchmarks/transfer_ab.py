#!/usr/bin/env python3
"""Blob transfer A/B: one provider, real node processes on loopback, variants
of the nodes' environment run interleaved (A B A B ...), so that the load of a
shared machine falls on both alike.

    python3 benchmarks/transfer_ab.py --mib 128 --rounds 3 \\
        tuned='{}' glibc='{"P2PGPU_MALLOC_TUNE": "0"}'

Prints, per run and as medians, the wall-clock rate and the bytes per CPU
second of the fetcher and of the provider (user + system, all threads:
``benchmarks/transfer.py`` says why the per-CPU figure is the steadier one).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transfer as T

from p2pgpu.localnet import LocalNet


def one(tmp: Path, blob: Path, sha: str, size: int, env: dict[str, str], name: str) -> tuple[float, float, float]:
    with LocalNet(tmp / name, 2, gpu_mix=T.MIX, env=env) as net:
        tree = net.nodes[0].call("blobs.add", {"path": str(blob)}, timeout_s=300)["tree"]
        c0 = [T.cpu_s(n.proc.pid) for n in net.nodes]
        t0 = time.perf_counter()
        net.nodes[1].call("blobs.fetch", {"sha256": sha, "size_bytes": size, "tree": tree,
                                          "sources": [net.nodes[0].peer_id]}, timeout_s=600)
        dt = time.perf_counter() - t0
        provider, fetcher = (T.cpu_s(n.proc.pid) - c for n, c in zip(net.nodes, c0, strict=True))
        return size / dt / 1e6, size / fetcher / 1e6, size / provider / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("variants", nargs="+", help="NAME=JSON environment of the nodes")
    args = ap.parse_args()
    variants = {v.split("=", 1)[0]: json.loads(v.split("=", 1)[1]) for v in args.variants}
    size = args.mib << 20
    runs: dict[str, list[tuple[float, float, float]]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory(prefix="p2pgpu-bench-ab-") as t:
        tmp = Path(t)
        blob = tmp / "blob.bin"
        sha = T.make_blob(blob, size)
        for r in range(args.rounds):
            for name, env in variants.items():
                got = one(tmp, blob, sha, size, env, f"{name}{r}")
                runs[name].append(got)
                print(f"{name:<12} round {r}: wall {got[0]:.1f} MB/s, fetcher {got[1]:.1f} MB/cpu-s, "
                      f"provider {got[2]:.1f} MB/cpu-s", flush=True)
    for name, rs in runs.items():
        med = [sorted(x[i] for x in rs)[len(rs) // 2] for i in range(3)]
        print(f"{name:<12} median: wall {med[0]:.1f} MB/s, fetcher {med[1]:.1f} MB/cpu-s, provider {med[2]:.1f} MB/cpu-s")


if __name__ == "__main__":
    main()
