"""Blob transfer between real node processes on loopback, next to raw TCP, and
an OCI image's cold and warm start.

    python3 benchmarks/transfer.py [--mib 256] [--no-image] [--no-upstream] [--paced-mb-s 10] [--dir DIR] [--json]

Prints, in one run on this machine:
- ``raw_tcp_mb_s``: one TCP connection on 127.0.0.1 between two processes
  (sendfile on one side, recv_into on the other): the ceiling;
- ``raw_tcp_to_disk_mb_s``: the same, the receiver writing what it gets to a
  file beside the node homes and fsyncing it: the ceiling of a fetch, which
  writes every chunk to the store (``--dir /dev/shm`` takes the disk out);
- ``p2p_1_provider_mb_s``: a blob from one node process to another, its
  chunks over the bulk side channel (a ticket over ``/p2pgpu/blobs/1.0.0``,
  then AES-GCM frames over plain TCP; every chunk hashed and written to the
  store, the whole SHA-256 checked at the end);
- ``p2p_2_providers_mb_s``: the same blob from two providers at once;
- ``p2p_1_provider_libp2p_mb_s``: one provider with the side channel off
  (``bulk_enabled = false``): the chunks over the libp2p stream (Noise, Yamux);
- ``*_cpu_mb_s``: the same transfer's bytes divided by the CPU seconds of its
  busiest process (fetcher or a provider, all threads): the rate with a core
  per process, whatever else the machine runs (a shared machine makes the
  wall-clock figures swing 2-3x between runs; this one moves far less);
- ``p2p_paced_*``: one and two providers whose upload is capped
  (``blobs_serve_bytes_per_s_max``, ``--paced-mb-s``): where the providers'
  uplinks are the limit, two providers give about twice one's rate;
- ``*_libp2p_*_upstream``: the side channel off and ``P2PGPU_LIBP2P_PATCHES=0``
  (py-libp2p as released: no Yamux/Noise speed-ups), in the same run;
- ``image_cold_s`` / ``image_warm_s``: an ``oci`` job from submit to success,
  first with the image pulled from a local docker-registry and unpacked, then
  from the node's cache (needs docker-registry, skopeo and busybox).
The goal (issue 15) is at least 200 MB/s from one provider, more from two.
Figures depend on the machine and its load: rerun before comparing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "content"))

from p2pgpu.localnet import LocalNet

MIX = [("NVIDIA L4", 23034, "8.9", 1)]


def make_blob(path: Path, size: int) -> str:
    h = hashlib.sha256()
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(size >> 20):
            piece = i.to_bytes(8, "big") + block[8:]
            f.write(piece)
            h.update(piece)
    return h.hexdigest()


_SENDER = """
import os, socket, sys
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
with open(sys.argv[1], "rb") as f:
    size = os.fstat(f.fileno()).st_size
    off = 0
    while off < size:
        off += os.sendfile(c.fileno(), f.fileno(), off, size - off)
c.close()
"""


def raw_tcp(path: Path, to: Path | None = None) -> float:
    proc = subprocess.Popen([sys.executable, "-c", _SENDER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        got = 0
        t0 = time.perf_counter()
        out = os.open(to, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) if to is not None else -1
        with socket.create_connection(("127.0.0.1", port)) as c:
            while n := c.recv_into(view):
                if out >= 0:
                    os.write(out, view[:n])
                got += n
        if out >= 0:
            os.fsync(out)
            os.close(out)
            os.unlink(to)
        dt = time.perf_counter() - t0
    finally:
        proc.wait(timeout=30)
    return got / dt / 1e6


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def p2p(tmp: Path, blob: Path, sha: str, size: int, providers: int, *, upstream: bool = False,
        pace: int = 0, bulk: bool = True) -> tuple[float, float]:
    """(MB/s on the wall clock, MB per CPU second of the busiest process);
    ``pace``: each provider's upload limit in bytes/s (0: none); ``bulk``:
    the side channel on (else every node has ``bulk_enabled = false``)."""
    env = {"P2PGPU_LIBP2P_PATCHES": "0"} if upstream else {}
    conf = {i: (f"blobs_serve_bytes_per_s_max = {pace}\n" if pace and i < providers else "")
            + ("" if bulk else "bulk_enabled = false\n") for i in range(providers + 1)}
    name = f"net{providers}{'u' if upstream else ''}{'p' if pace else ''}{'' if bulk else 'l'}"
    with LocalNet(tmp / name, providers + 1, gpu_mix=MIX, env=env, node_config=conf) as net:
        tree = ""
        for i in range(providers):
            tree = net.nodes[i].call("blobs.add", {"path": str(blob)}, timeout_s=300)["tree"]
        fetcher = net.nodes[providers]
        c0 = [cpu_s(n.proc.pid) for n in net.nodes]
        t0 = time.perf_counter()
        got = fetcher.call("blobs.fetch", {"sha256": sha, "size_bytes": size, "tree": tree,
                                           "sources": [n.peer_id for n in net.nodes[:providers]]}, timeout_s=600)
        dt = time.perf_counter() - t0
        busiest = max(cpu_s(n.proc.pid) - c for n, c in zip(net.nodes, c0))
        assert sum(got["chunks_from"].values()) == size >> 20, got
        assert sum(got["bulk_chunks_from"].values()) == (size >> 20 if bulk else 0), got
        return size / dt / 1e6, size / busiest / 1e6


def image_times(tmp: Path) -> dict[str, float]:
    from oci_helpers import busybox_layer, have_tools, push_image, registry

    if have_tools() is not None:
        return {}
    with registry(tmp) as reg:
        img = push_image(reg, "bench/busybox", tmp, [busybox_layer()])
        with LocalNet(tmp / "netimg", 1, gpu_mix=MIX, config_extra=f'oci_insecure_registries = ["{reg}"]') as net:
            manifest = {"requirements": {"nodes": 1}, "runtime": {"kind": "oci", "image": img.ref,
                        "command": ["cat", "/etc/os-release"], "duration_s_max": 60},
                        "payment": {"price_per_gpu_hour_max": 36000000}}
            out = {}
            for label in ("image_cold_s", "image_warm_s"):
                t0 = time.perf_counter()
                job = net.nodes[0].call("job.submit", {"manifest": manifest})["job_id"]
                def done(j: str = job) -> dict | None:
                    d = net.nodes[0].call("job.status", {"job_id": j})
                    return d if d["state"] in ("succeeded", "failed") else None

                st = net.wait_until(done, timeout_s=120, interval_s=0.05)
                assert st["state"] == "succeeded", st
                out[label] = round(time.perf_counter() - t0, 3)
            return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="blob size in MiB")
    ap.add_argument("--no-image", action="store_true", help="skip the OCI image start times")
    ap.add_argument("--no-upstream", action="store_true",
                    help="skip the run with P2PGPU_LIBP2P_PATCHES=0 (py-libp2p as released)")
    ap.add_argument("--paced-mb-s", type=float, default=10.0,
                    help="also fetch from 1 and 2 providers each capped at this upload rate (0: skip)")
    ap.add_argument("--dir", help="where the blob and the node homes live (default: the system's temporary "
                                   "directory; /dev/shm leaves the disk out of the figures)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    size = args.mib << 20
    with tempfile.TemporaryDirectory(prefix="p2pgpu-bench-transfer-", dir=args.dir) as t:
        tmp = Path(t)
        blob = tmp / "blob.bin"
        sha = make_blob(blob, size)
        res: dict[str, float | str] = {"blob_mib": args.mib, "dir": args.dir or tempfile.gettempdir(),
                                   "load_1min": round(os.getloadavg()[0], 1)}
        res["raw_tcp_mb_s"] = round(raw_tcp(blob), 1)
        res["raw_tcp_to_disk_mb_s"] = round(raw_tcp(blob, tmp / "received.bin"), 1)
        for n, label, bulk in ((1, "p2p_1_provider", True), (2, "p2p_2_providers", True),
                               (1, "p2p_1_provider_libp2p", False)):
            wall, per_cpu = p2p(tmp, blob, sha, size, n, bulk=bulk)
            res[f"{label}_mb_s"] = round(wall, 1)
            res[f"{label}_cpu_mb_s"] = round(per_cpu, 1)
        if not args.no_upstream:
            # py-libp2p as released, side channel off: what the patches give.
            for n, label in ((1, "p2p_1_provider_libp2p"), (2, "p2p_2_providers_libp2p")):
                wall, per_cpu = p2p(tmp, blob, sha, size, n, upstream=True, bulk=False)
                res[f"{label}_mb_s_upstream"] = round(wall, 1)
                res[f"{label}_cpu_mb_s_upstream"] = round(per_cpu, 1)
        if args.paced_mb_s:
            # Providers whose upload is the limit (an operator's cap, a home
            # uplink): two of them should give about twice one's rate.
            for n, label in ((1, "p2p_paced_1_provider"), (2, "p2p_paced_2_providers")):
                wall, _ = p2p(tmp, blob, sha, size, n, pace=int(args.paced_mb_s * 1e6))
                res[f"{label}_mb_s"] = round(wall, 1)
        if not args.no_image:
            res.update(image_times(tmp))
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:<24} {v}")


if __name__ == "__main__":
    main()
