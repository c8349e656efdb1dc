"""p2pgpu: an open, peer-to-peer GPU compute network.

Layers (see docs/architecture.md): ``core`` (pure protocol logic), ``node``
(the trio + libp2p driver), ``gpu`` (NVML inventory), ``runtime`` (sandbox,
Ray), ``store`` (SQLite), ``solana`` (payouts), ``sim`` (the simulator driver),
``explorer``, ``cli``, and ``sdk``, whose public names are exported here:
``from p2pgpu import Client`` (docs/sdk.md).  They are loaded on first use,
so ``import p2pgpu`` (and ``p2pgpu --help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: The SDK's public names, re-exported (lazily) at the top of the package.
_SDK_NAMES = (
    "AsyncClient", "AsyncJob", "BadManifest", "Client", "DaemonNotRunning", "FINAL_STATES", "Job", "JobFailed",
    "JobStatus", "LedgerUnreachable", "LogLine", "MethodUnavailable", "P2pgpuError", "Progress", "RequestRefused",
    "ResultFile", "ResultsMismatch", "Timeout", "UnknownJob",
)

__all__ = [
    "FINAL_STATES", "AsyncClient", "AsyncJob", "BadManifest", "Client", "DaemonNotRunning", "Job", "JobFailed",
    "JobStatus", "LedgerUnreachable", "LogLine", "MethodUnavailable", "P2pgpuError", "Progress", "RequestRefused",
    "ResultFile", "ResultsMismatch", "Timeout", "UnknownJob", "__version__",
]

if TYPE_CHECKING:
    from p2pgpu.sdk import (
        FINAL_STATES,
        AsyncClient,
        AsyncJob,
        BadManifest,
        Client,
        DaemonNotRunning,
        Job,
        JobFailed,
        JobStatus,
        LedgerUnreachable,
        LogLine,
        MethodUnavailable,
        P2pgpuError,
        Progress,
        RequestRefused,
        ResultFile,
        ResultsMismatch,
        Timeout,
        UnknownJob,
    )


def __getattr__(name: str) -> Any:
    if name in _SDK_NAMES:
        value = getattr(importlib.import_module("p2pgpu.sdk"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'p2pgpu' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SDK_NAMES))
