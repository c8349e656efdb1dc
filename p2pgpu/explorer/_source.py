"""The explorer's one data source: the local node daemon, through the Python SDK.

:class:`DaemonSource` is a thin adapter over :class:`p2pgpu.sdk.AsyncClient`
(the same client the CLI and scripts use; it imports no libp2p, so the
explorer starts fast).  It finds the daemon through the home at every call,
so a daemon that restarts on another port is found again without
restarting the explorer.  Three outcomes, each its own type, because the
explorer treats them differently:

* the result;
* :class:`MethodMissing`: this daemon does not offer the method (yet); the
  panel says "no data yet" and the explorer keeps asking, so methods that a
  newer daemon adds show up by themselves;
* :class:`SourceError`: no daemon answers, or it refused the request (the
  message says which).

Every read is bounded in size and time by the SDK (16 MiB, ``timeout_s``).
"""

from __future__ import annotations

from typing import Any

from p2pgpu.home import Home
from p2pgpu.sdk import AsyncClient, MethodUnavailable, P2pgpuError


class MethodMissing(Exception):
    """The daemon answered "unknown method": it does not offer this one."""


class SourceError(Exception):
    """No daemon answers, or it refused the request."""


class DaemonSource:
    """``await DaemonSource(home).call("status")``."""

    def __init__(self, home: Home, *, timeout_s: float = 10.0) -> None:
        self.home = home
        self.client = AsyncClient(home, timeout_s=timeout_s)

    @property
    def last_latency_s(self) -> dict[str, float]:
        """Seconds the last call of each method took (for ``/metrics``)."""
        return self.client.last_latency_s

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        try:
            return await self.client.call(method, params)
        except MethodUnavailable:
            raise MethodMissing(method) from None
        except P2pgpuError as exc:
            raise SourceError(str(exc)) from None
