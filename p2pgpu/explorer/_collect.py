"""The collector: polls the daemon and keeps the latest views for every client.

One task asks the daemon for everything every ``poll_interval_s`` and builds
the views (``_views.py``) once; every HTTP request, Server-Sent-Events stream
and ``/metrics`` scrape reads that one snapshot.  So a hundred open pages cost
the daemon what one does, and every panel of one page shows the same moment.

A method the daemon does not offer (``MethodMissing``) leaves its panel
empty with ``available: false``; it is asked again at each poll, so methods a
newer daemon adds appear without restarting the explorer.  A daemon that is
down makes ``daemon_up`` false and the page says so; the collector keeps
trying.  Per-job details (``job.status``) are fetched for at most
``job_details_max`` jobs per poll, newest first.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import trio

from ._network import network_view
from ._series import NetworkSeries
from ._source import DaemonSource, MethodMissing, SourceError
from ._views import Raw, _int, _seen_ms, build_views, clean_raw, rows_of

log = logging.getLogger("p2pgpu.explorer")

#: The daemon methods a poll asks, and the field of :class:`Raw` each fills.
POLLED: list[tuple[str, str]] = [
    ("status", "status"),
    ("peers", "peers"),
    ("market", "market"),
    ("proofs", "proofs"),
    ("payouts", "payouts"),
    ("earnings", "earnings"),
    ("network.jobs", "network_jobs"),
    ("job.list", "jobs"),  # last: whether to ask job.status per job depends on the methods above
]
job_details_max = 20
#: Parameters of the polled methods: the newest 500 jobs seen each poll (each is counted once, when first seen).
POLL_PARAMS: dict[str, dict[str, Any]] = {"network.jobs": {"limit": 500}}


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class Collector:
    def __init__(self, source: DaemonSource, *, poll_interval_s: float = 1.0,
                 now_ms: Callable[[], int] = wall_ms) -> None:
        self.source = source
        self.poll_interval_s = poll_interval_s
        self.now_ms = now_ms
        self.version = 0
        self.raw = Raw()
        #: The bounded history of the network (GPUs online, jobs and clusters per hour).
        self.series = NetworkSeries()
        self.views: dict[str, Any] = build_views(self.raw, now_ms=now_ms(), version=0)
        self.views["network"] = network_view(self.series, self.views, None, now_ms=self.views["as_of_ms"],
                                             public=False)
        #: Explorer-side counters for ``/metrics``: polls, and failed calls by method.
        self.polls = 0
        self.call_errors: Counter[str] = Counter()
        self.latency_s: dict[str, float] = {}
        self._changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.poll()
        task_status.started()
        while True:
            await trio.sleep(self.poll_interval_s)
            await self.poll()

    async def poll(self) -> None:
        raw = Raw()
        for method, attr in POLLED:
            value = await self._ask(method, raw, POLL_PARAMS.get(method))
            if attr == "status":
                raw.status = value if isinstance(value, dict) else None
            else:
                setattr(raw, attr, rows_of(value))
        if raw.jobs:
            raw.jobs = await self._job_details(raw.jobs, raw)
        self.raw = clean_raw(raw)  # /metrics and the proof check read it: known keys have their types
        self.polls += 1
        now = self.now_ms()
        views = build_views(raw, now_ms=now, version=self.version + 1)
        if self.raw.status is not None:  # a daemon that is down says nothing about the network
            self.series.observe(now, views["supply"], self._network_rows())
        views["network"] = network_view(self.series, views, self.raw.earnings, now_ms=now, public=False)
        if _content(views) != _content(self.views):
            self.version += 1
            self.views = views
            self._changed.set()
            self._changed = trio.Event()
        else:
            # Same content: keep the version (clients need no update), refresh the time.
            self.views["as_of_ms"] = views["as_of_ms"]
            self.views["summary"]["as_of_ms"] = views["as_of_ms"]

    def _network_rows(self) -> list[dict[str, Any]]:
        """Jobs seen on the network; from this node's own job list while the daemon lacks ``network.jobs``."""
        if self.raw.network_jobs is not None:
            return self.raw.network_jobs
        out = []
        for j in self.raw.jobs or []:
            c = j.get("cluster")
            cluster: dict[str, Any] = c if isinstance(c, dict) else {}
            out.append({"job_id": j.get("job_id"), "seen_at_ms": _seen_ms(j), "members": cluster.get("members"),
                        "certificate_hash": cluster.get("certificate_hash")})
        return out

    async def _ask(self, method: str, raw: Raw, params: dict[str, Any] | None = None) -> Any:
        try:
            value = await self.source.call(method, params)
        except MethodMissing:
            if method not in raw.missing:
                raw.missing.append(method)
            return None
        except SourceError as exc:
            self.call_errors[method] += 1
            raw.errors[method] = str(exc)
            return None
        if method in self.source.last_latency_s:
            self.latency_s[method] = self.source.last_latency_s[method]
        return value

    async def _job_details(self, rows: list[dict[str, Any]], raw: Raw) -> list[dict[str, Any]]:
        """Fill in each job's cluster and timings from ``job.status`` where the list lacks them,
        and its proofs and payouts while the daemon has no ``proofs``/``payouts`` methods.
        At most ``job_details_max`` calls per poll, newest jobs first."""
        wanted = ["cluster"] + [k for k in ("proofs", "payouts") if k in raw.missing]
        out = list(rows)
        newest_first = sorted(range(len(rows)), key=lambda i: -_int(_seen_ms(rows[i])))
        asked = 0
        for i in newest_first:
            row = rows[i]
            job_id = row.get("job_id")
            if asked >= job_details_max or "job.status" in raw.missing:
                break
            if isinstance(job_id, str) and any(k not in row for k in wanted):
                asked += 1
                detail = await self._ask("job.status", raw, {"job_id": job_id})
                if isinstance(detail, dict):
                    out[i] = {**row, **detail}
        return out

    async def wait_changed(self, version: int) -> None:
        """Return once the views' version differs from ``version``."""
        while self.version == version:
            await self._changed.wait()


def _content(views: dict[str, Any]) -> dict[str, Any]:
    """The views without the fields that change at every poll."""
    out = {k: v for k, v in views.items() if k not in ("version", "as_of_ms", "summary")}
    summary = {k: v for k, v in views["summary"].items() if k not in ("version", "as_of_ms", "uptime_s")}
    out["summary"] = summary
    return out
