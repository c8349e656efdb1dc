"""The explorer's web app (Starlette) and its server (Hypercorn's trio worker).

Routes, all read-only except the check (which only reads, but may take a
ledger round trip):

* ``/``: the page (``static/index.html`` + ``app.js`` + ``style.css``, no
  build step, nothing fetched from elsewhere); ``/#network`` is the network view;
* ``/api/summary``, ``/api/supply``, ``/api/nodes``, ``/api/clusters``,
  ``/api/jobs``, ``/api/proofs``, ``/api/payouts``, ``/api/network``: the
  collector's latest views (``_views.py``, ``_network.py``), each with
  ``version`` and ``as_of_ms``;
* ``/api/all``: every panel at once (what the page polls when it cannot
  stream);
* ``/api/stream``: Server-Sent Events, one ``views`` event with every panel
  each time the views change (and a comment line every ``keepalive_s``);
* ``/plots/<name>.svg``: the network's plots over time (``_plots.py``);
* ``/api/check/<proof_hash>``: the proof check (``_check.py``);
* ``/metrics``: Prometheus text format (``_metrics.py``), not in the public mode;
* ``/healthz``: 200 while the daemon answers, 503 otherwise.

With ``public=True`` (``p2pgpu explorer --public``) every document goes
through ``_public.public_views`` (only what signed data already makes
public), each client address is rate limited, and no request makes the
explorer call the daemon (``_public.py``).  Security headers go on every
response in both modes.

:func:`serve_explorer` runs the collector and Hypercorn in one nursery, so
cancelling it stops both; ``task_status`` reports the URL once listening.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from p2pgpu.home import Home

from ._check import CheckInputError, ProofChecker
from ._collect import Collector
from ._metrics import CONTENT_TYPE, registry_for, render
from ._network import PLOTS, plot_svg
from ._public import SECURITY_HEADERS, RateLimiter, public_views
from ._source import DaemonSource
from ._views import PANELS

STATIC = Path(__file__).parent / "static"
keepalive_s = 15.0
#: Concurrent proof checks (each may open the ledger): the rest wait.
checks_concurrent_max = 4
#: Concurrent event streams: each holds a connection open.
streams_max = 256


def _json(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(doc, status_code=status, headers={"Cache-Control": "no-store", **(headers or {})})


class _Guard:
    """ASGI middleware: security headers on every response; in the public mode,
    a rate limit per client address (429 with ``Retry-After``)."""

    def __init__(self, app: Any, limiter: RateLimiter | None) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.limiter is not None and not self.limiter.allow(_client(scope), trio.current_time()):
            response = _json({"error": "too many requests; slow down"}, 429, {"Retry-After": "1"})
            await self._with_headers(response, scope, receive, send)
            return
        await self._with_headers(self.app, scope, receive, send)

    async def _with_headers(self, app: Any, scope: Any, receive: Any, send: Any) -> None:
        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *_HEADERS]}
            await send(message)

        await app(scope, receive, send_with_headers)


_HEADERS = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]


def _client(scope: Any) -> str:
    peer = scope.get("client")
    return str(peer[0]) if peer else "?"


def build_app(collector: Collector, checker: ProofChecker, *, public: bool = False,
              limiter: RateLimiter | None = None) -> Any:
    """The ASGI app; with ``public``, only public fields, rate limits, no ``/metrics``."""
    if public and limiter is None:
        limiter = RateLimiter()
    registry = registry_for(collector)
    check_limiter = trio.CapacityLimiter(checks_concurrent_max)
    open_streams = [0]  # a plain count: a stream may be finalized in another task than it started in
    plots: dict[tuple[str, int], str] = {}

    def views() -> dict[str, Any]:
        return public_views(collector.views) if public else collector.views

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    def panel(name: str) -> Any:
        async def handler(request: Request) -> Response:
            v = views()
            return _json({"version": v["version"], "as_of_ms": v["as_of_ms"], **v[name]})

        return handler

    async def summary(request: Request) -> Response:
        return _json(views()["summary"])

    async def everything(request: Request) -> Response:
        return _json(views())

    async def stream(request: Request) -> Response:
        client = _client(request.scope)
        if open_streams[0] >= streams_max or (limiter is not None and not limiter.may_open_stream(client)):
            return _json({"error": "too many open streams; poll /api/all instead"}, 503)

        async def events() -> AsyncIterator[str]:
            open_streams[0] += 1
            if limiter is not None:
                limiter.open_stream(client)
            try:
                version = -1
                while True:
                    if collector.version != version:
                        version = collector.version
                        yield f"event: views\ndata: {json.dumps(views(), separators=(',', ':'))}\n\n"
                    with trio.move_on_after(keepalive_s):
                        await collector.wait_changed(version)
                        continue
                    yield ": keepalive\n\n"
            finally:
                open_streams[0] -= 1
                if limiter is not None:
                    limiter.close_stream(client)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def plot(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in PLOTS:
            return _json({"error": f"no plot {name!r}; plots: {', '.join(PLOTS)}"}, 404)
        v = collector.views
        key = (name, collector.version)
        svg = plots.get(key)
        if svg is None:  # drawn once per version of the views, whoever asks
            net = views()["network"]
            svg = plot_svg(name, net, collector.series, now_ms=v["as_of_ms"])
            if len(plots) >= 4 * len(PLOTS):
                plots.clear()
            plots[key] = svg
        return Response(svg, media_type="image/svg+xml", headers={"Cache-Control": "no-store"})

    async def check(request: Request) -> Response:
        async with check_limiter:
            try:
                doc = await checker.check(request.path_params["proof_hash"], collector.views)
            except CheckInputError as exc:
                return _json({"error": str(exc)}, 400)
        return _json(doc)

    async def metrics(request: Request) -> Response:
        return Response(render(registry), media_type=CONTENT_TYPE)

    async def healthz(request: Request) -> Response:
        up = collector.views["daemon_up"]
        return _json({"daemon_up": up, **({} if public else {"errors": collector.views["errors"]})},
                     200 if up else 503)

    routes = [
        Route("/", index),
        Route("/api/summary", summary),
        Route("/api/all", everything),
        Route("/api/stream", stream),
        Route("/api/network", panel("network")),
        Route("/plots/{name}.svg", plot),
        Route("/api/check/{proof_hash}", check, methods=["GET", "POST"]),
        *([] if public else [Route("/metrics", metrics)]),
        Route("/healthz", healthz),
        *[Route(f"/api/{name}", panel(name)) for name in PANELS],
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]
    return _Guard(Starlette(routes=routes), limiter)


async def serve_explorer(home: Home, *, host: str = "127.0.0.1", port: int = 8080, poll_interval_s: float = 1.0,
                         public: bool = False,
                         task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the explorer of ``home``'s daemon until cancelled; report the URL when listening."""
    source = DaemonSource(home)
    collector = Collector(source, poll_interval_s=poll_interval_s)
    app = build_app(collector, ProofChecker(source, home, use_daemon=not public), public=public)
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = "-"
    config.loglevel = "WARNING"
    config.graceful_timeout = 1.0
    async with trio.open_nursery() as nursery:
        await nursery.start(collector.run)
        binds = await nursery.start(serve, app, config)
        task_status.started(binds[0] if binds else f"http://{host}:{port}")
