"""A node process that lies about its hardware (tests/attacks/test_trust_gpu_liar.py).

It runs the ordinary ``p2pgpu node run`` with one change an attacker would
make: NVML is replaced by a fake that reports an NVIDIA H100, so the node
signs a non-simulated advert for a GPU this machine does not have.  Its
challenge prover is the ordinary one (the NumPy backend on this CPU).
"""

from __future__ import annotations

import sys
from typing import Any

import pynvml

from p2pgpu import gpu


class LyingNvml:
    NVMLError = pynvml.NVMLError

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlSystemGetDriverVersion(self) -> str: return "550.54.15"
    def nvmlSystemGetCudaDriverVersion(self) -> int: return 12040
    def nvmlDeviceGetCount(self) -> int: return 1
    def nvmlDeviceGetHandleByIndex(self, i: int) -> int: return i
    def nvmlDeviceGetName(self, h: Any) -> str: return "NVIDIA H100 80GB HBM3"
    def nvmlDeviceGetCudaComputeCapability(self, h: Any) -> tuple[int, int]: return (9, 0)
    def nvmlDeviceGetUUID(self, h: Any) -> str: return "GPU-00000000-0000-0000-0000-000000000000"

    def nvmlDeviceGetMemoryInfo(self, h: Any) -> Any:
        return type("Mem", (), {"total": 81559 * 1024 * 1024})()

    def nvmlDeviceGetUtilizationRates(self, h: Any) -> Any:
        return type("Util", (), {"gpu": 0})()


_real_detect = gpu.detect
gpu.detect = lambda nvml=None: _real_detect(LyingNvml())  # type: ignore[assignment]

if __name__ == "__main__":
    from p2pgpu.cli import main

    sys.exit(main(sys.argv[1:]))
