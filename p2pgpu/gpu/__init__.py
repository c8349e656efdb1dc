"""This machine's GPU inventory: NVML when there is a driver, honesty when not.

``detect()`` asks NVML (through NVIDIA's ``pynvml`` bindings) for each GPU's
model, memory, compute capability, UUID (hashed before it leaves the machine)
and utilisation, plus the driver and CUDA versions.  Without a driver it
returns an empty inventory whose ``reason`` says why; it never raises for a
missing or broken NVML.  The NVML module is a parameter, so tests inject an
NVML-shaped object.  ``from_file()`` reads an inventory captured with
``p2pgpu gpus --json`` (or written by hand) for test networks; such an
inventory is marked simulated and real networks refuse its adverts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pgpu.core import GpuInfo, PeerMisbehaved
from p2pgpu.core._advert import gpus_max

inventory_file_bytes_max = 256 * 1024


class InventoryError(Exception):
    """An inventory file is unreadable or invalid; the message says where."""


@dataclass(frozen=True, kw_only=True)
class Inventory:
    gpus: tuple[GpuInfo, ...]
    source: str  # "nvml", "file" or "none"
    simulated: bool
    reason: str = ""
    driver_version: str = ""
    cuda_version: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "gpus": [g.to_obj() for g in self.gpus],
            "count": len(self.gpus),
            "source": self.source,
            "simulated": self.simulated,
            "reason": self.reason,
            "driver_version": self.driver_version,
            "cuda_version": self.cuda_version,
        }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cuda_version(raw: int) -> str:
    # NVML reports e.g. 12040 for CUDA 12.4.
    return f"{raw // 1000}.{(raw % 1000) // 10}"


def detect(nvml: Any = None) -> Inventory:
    """The real inventory.  ``nvml`` defaults to the ``pynvml`` module."""
    if nvml is None:
        try:
            import pynvml as nvml  # noqa: PLC0415 - optional at run time
        except ImportError as exc:
            return Inventory(gpus=(), source="none", simulated=False, reason=f"no GPUs: pynvml not installed ({exc})")
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return Inventory(gpus=(), source="none", simulated=False, reason=f"no GPUs: NVML unavailable ({_text(exc)})")
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        cuda = _cuda_version(int(nvml.nvmlSystemGetCudaDriverVersion()))
        gpus = []
        count = int(nvml.nvmlDeviceGetCount())
        for i in range(min(count, gpus_max)):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            major, minor = nvml.nvmlDeviceGetCudaComputeCapability(h)
            mem = nvml.nvmlDeviceGetMemoryInfo(h)
            try:
                util = int(nvml.nvmlDeviceGetUtilizationRates(h).gpu)
            except nvml.NVMLError:
                util = 0  # not supported on some devices (MIG slices)
            gpus.append(
                GpuInfo(
                    model=_text(nvml.nvmlDeviceGetName(h))[:64],
                    memory_mb=int(mem.total) // (1024 * 1024),
                    compute_capability=f"{int(major)}.{int(minor)}",
                    driver_version=driver[:32],
                    cuda_version=cuda[:16],
                    uuid_hash=hashlib.sha256(_text(nvml.nvmlDeviceGetUUID(h)).encode()).hexdigest()[:32],
                    utilization_pct=max(0, min(100, util)),
                )
            )
        reason = "" if gpus else "no GPUs: NVML found no devices"
        if count > gpus_max:
            reason = f"only the first {gpus_max} of {count} GPUs are advertised"
        return Inventory(gpus=tuple(gpus), source="nvml", simulated=False, reason=reason,
                         driver_version=driver, cuda_version=cuda)
    except nvml.NVMLError as exc:
        return Inventory(gpus=(), source="none", simulated=False, reason=f"no GPUs: NVML query failed ({_text(exc)})")
    except ValueError as exc:  # a device GpuInfo refuses (no name, 0 MiB, odd capability)
        return Inventory(gpus=(), source="none", simulated=False,
                         reason=f"no GPUs: NVML reported an invalid device ({exc})")
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass  # shutting down a half-initialised NVML: nothing left to release


def parse_inventory(doc: Any, where: str = "inventory") -> Inventory:
    """An inventory from the JSON shape of ``p2pgpu gpus --json``."""
    if not isinstance(doc, dict) or not isinstance(doc.get("gpus"), list):
        raise InventoryError(f'{where}: expected an object with a "gpus" list')
    if len(doc["gpus"]) > gpus_max:
        raise InventoryError(f"{where}: at most {gpus_max} GPUs per node")
    gpus = []
    for i, g in enumerate(doc["gpus"]):
        if not isinstance(g, dict):
            raise InventoryError(f"{where}: gpus[{i}] must be an object")
        fields = {k: g[k] for k in ("model", "memory_mb", "compute_capability", "driver_version",
                                    "cuda_version", "uuid_hash", "utilization_pct") if k in g}
        try:
            gpus.append(GpuInfo.from_obj(fields, f"gpus[{i}]"))
        except PeerMisbehaved as exc:
            raise InventoryError(f"{where}: {exc.detail}") from None
    return Inventory(gpus=tuple(gpus), source="file", simulated=True,
                     reason="" if gpus else "no GPUs in the inventory file",
                     driver_version=str(doc.get("driver_version", ""))[:32],
                     cuda_version=str(doc.get("cuda_version", ""))[:16])


def from_file(path: str | Path) -> Inventory:
    p = Path(path)
    try:
        with p.open("rb") as f:  # read at most the limit + 1, never a whole huge file
            data = f.read(inventory_file_bytes_max + 1)
    except OSError as exc:
        raise InventoryError(f"{path}: {exc.strerror}") from None
    if len(data) > inventory_file_bytes_max:
        raise InventoryError(f"{path}: larger than {inventory_file_bytes_max} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, huge ints, deep nesting
        raise InventoryError(f"{path}: not valid JSON ({exc})") from None
    return parse_inventory(doc, str(path))
