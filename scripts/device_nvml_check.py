#!/usr/bin/env python3
"""Check p2pgpu's GPU inventory against a real NVIDIA driver, once, on a GPU machine.

The unit tests drive ``p2pgpu.gpu.detect()`` with an NVML-shaped fake; this
script runs it with the real ``pynvml`` (NVIDIA's nvidia-ml-py bindings) and
checks what it reports against NVML asked directly: the GPU count, each
GPU's memory in MiB, compute capability and name, the driver and CUDA
versions, that the UUID is hashed and never printed, and that an advert built
from the inventory signs, verifies and enters a market book of a network that
refuses simulated GPUs.

Usage (from the repository root; needs msgpack, nvidia-ml-py, pynacl, base58):

    python3 scripts/device_nvml_check.py [--out DIR]

It prints the inventory JSON (what ``p2pgpu gpus --json`` shows), one line per
check, and ``OK`` at the end; it exits 1 if a check fails and 2 if it cannot
run at all (a missing module).  With ``--out DIR`` it also writes
``DIR/inventory.json``, a real inventory usable with ``--gpus-from``.
Standalone on purpose: no pytest, nothing beyond the package's own needs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

try:
    import pynvml

    from p2pgpu.core import (
        Advert,
        AdvertBook,
        Identity,
        PeerMisbehaved,
        Reason,
        sign_advert,
        verify_advert,
    )
    from p2pgpu.core._advert import gpus_max
    from p2pgpu.gpu import detect
except ImportError as exc:  # pynacl/base58/msgpack/nvidia-ml-py missing
    print(f"cannot run: {exc} (install msgpack, nvidia-ml-py, pynacl, base58)", file=sys.stderr)
    sys.exit(2)

MIB = 1024 * 1024
NOW_MS = 1_800_000_000_000  # a fixed instant: the check needs no clock
failures: list[str] = []


def check(ok: bool, what: str) -> bool:
    print(f"{'ok  ' if ok else 'FAIL'} {what}")
    if not ok:
        failures.append(what)
    return ok


def _text(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def direct_nvml() -> dict[str, object]:
    """What NVML says when asked directly, to compare with detect()."""
    pynvml.nvmlInit()
    try:
        devices = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            devices.append({
                "name": _text(pynvml.nvmlDeviceGetName(h)),
                "memory_mb": int(pynvml.nvmlDeviceGetMemoryInfo(h).total) // MIB,
                "cc": f"{major}.{minor}",
                "uuid": _text(pynvml.nvmlDeviceGetUUID(h)),
            })
        return {
            "driver": _text(pynvml.nvmlSystemGetDriverVersion()),
            "cuda": int(pynvml.nvmlSystemGetCudaDriverVersion()),
            "devices": devices,
        }
    finally:
        pynvml.nvmlShutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="directory to write inventory.json into")
    args = parser.parse_args()

    inv = detect()
    doc = inv.to_json()
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "inventory.json").write_text(text + "\n")

    if not check(inv.source == "nvml" and len(inv.gpus) > 0, f"NVML found GPUs (source={inv.source!r}, "
                                                            f"reason={inv.reason!r})"):
        return 1
    try:
        raw = direct_nvml()
    except pynvml.NVMLError as exc:
        check(False, f"NVML asked directly: {exc}")
        return 1

    devices = raw["devices"]
    assert isinstance(devices, list)
    check(len(inv.gpus) == min(len(devices), gpus_max),
          f"{len(inv.gpus)} GPUs reported, NVML has {len(devices)}")
    check(inv.driver_version == raw["driver"] and bool(re.fullmatch(r"[0-9][0-9.]*", inv.driver_version)),
          f"driver version {inv.driver_version!r}")
    cuda = raw["cuda"]
    assert isinstance(cuda, int)
    check(inv.cuda_version == f"{cuda // 1000}.{(cuda % 1000) // 10}" and cuda >= 11000,
          f"CUDA version {inv.cuda_version!r} (NVML {cuda})")
    for i, (g, d) in enumerate(zip(inv.gpus, devices)):
        check(g.model == d["name"][:64] and len(g.model) > 0, f"gpu {i}: model {g.model!r}")
        check(g.memory_mb == d["memory_mb"] and 1024 <= g.memory_mb <= 1 << 22,
              f"gpu {i}: memory {g.memory_mb} MiB ({g.vram_gb} GB)")
        check(g.compute_capability == d["cc"] and int(g.compute_capability.split(".")[0]) >= 3,
              f"gpu {i}: compute capability {g.compute_capability}")
        if re.search(r"H100|H200|H800|GH200", g.model):
            check(g.compute_capability == "9.0" and g.memory_mb >= 60_000,
                  f"gpu {i}: a Hopper GPU has cc 9.0 and >= 60 GB")
        check(bool(re.fullmatch(r"[0-9a-f]{32}", g.uuid_hash)) and d["uuid"] not in text,
              f"gpu {i}: uuid hashed ({g.uuid_hash}) and not printed")
        check(0 <= g.utilization_pct <= 100, f"gpu {i}: utilization {g.utilization_pct}%")
        print(f"     gpu {i}: class {g.gpu_class}")

    # An advert from this inventory: signs, verifies, and a real network accepts it.
    ident = Identity(b"\x42" * 32)
    advert = Advert(
        peer_id=ident.peer_id, network="devnet", addrs=("/ip4/127.0.0.1/tcp/4001",), seq=1,
        issued_at_ms=NOW_MS, expires_at_ms=NOW_MS + 600_000, gpus=inv.gpus, gpus_free=len(inv.gpus),
        price_per_gpu_hour=1_000_000, currency="SOL", payout_address="", region="lab", runtimes=("process",),
        simulated=inv.simulated,
    )
    wire = sign_advert(ident, advert).wire
    try:
        back = verify_advert(wire, now_ms=NOW_MS + 1).advert
        check(back == advert, f"advert of {len(wire)} bytes signs and verifies")
        book = AdvertBook(network="devnet", allow_simulated=False)
        book.ingest(wire, NOW_MS + 1)
        check(len(book.market(NOW_MS + 1)) == 1, "a network that refuses simulated GPUs lists it")
    except PeerMisbehaved as exc:
        check(False, f"advert refused: {exc}")
    at = wire.find(advert.gpus[0].model.encode())  # flip one bit of the model name
    tampered = wire[:at] + bytes([wire[at] ^ 1]) + wire[at + 1 :]
    try:
        verify_advert(tampered, now_ms=NOW_MS + 1)
        check(False, "a tampered advert is refused")
    except PeerMisbehaved as exc:
        check(exc.reason is Reason.BAD_SIGNATURE, f"a tampered advert is refused ({exc.reason.name})")

    if failures:
        print(f"FAILED: {len(failures)} check(s)", file=sys.stderr)
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
