"""``p2pgpu explorer``: serve the web explorer over the local daemon's view of the network.

The explorer is its own process: it talks to the daemon of ``--home`` through
the control API (``p2pgpu/explorer``), serves the page, the JSON API and
``/metrics`` until SIGINT/SIGTERM, and stops cleanly.  It listens on
127.0.0.1 unless ``--host`` says otherwise (the API is read-only, but say so
deliberately before exposing it).
"""

from __future__ import annotations

import argparse
import signal
import sys
from functools import partial

from ._common import CliError, add_home, home_of, wrap_home_errors


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "explorer", help="the web explorer over the local daemon's view of the network",
        description="Serve the explorer of the daemon running for this home: a live web page (GPU supply, "
                    "nodes, clusters, jobs, proofs, payouts, with a check button per proof), a JSON API under "
                    "/api/ and Prometheus metrics at /metrics. Runs until SIGINT/SIGTERM.")
    add_home(p)
    p.add_argument("--port", type=int, default=8080, metavar="N", help="HTTP port (default 8080; 0: any free)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--poll-interval", type=float, default=1.0, metavar="SECONDS",
                   help="how often to ask the daemon (default 1)")
    p.set_defaults(func=wrap_home_errors(cmd_explorer))


def cmd_explorer(args: argparse.Namespace) -> int:
    import trio

    from p2pgpu.explorer import serve_explorer

    if not 0 <= args.port <= 65535:
        raise CliError("--port must be between 0 and 65535")
    if not 0.1 <= args.poll_interval <= 3600:
        raise CliError("--poll-interval must be between 0.1 and 3600 seconds")
    home = home_of(args)
    if not home.exists():
        raise CliError(f"no node home at {home.path}: run `p2pgpu init --home {home.path}` first")

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                    async for _ in sigs:
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(stop_on_signal)
            url = await nursery.start(partial(serve_explorer, home, host=args.host, port=args.port,
                                              poll_interval_s=args.poll_interval))
            print(f"explorer ready {url}", flush=True)
            if not home.control_path.exists():
                print(f"p2pgpu: note: no daemon runs for {home.path} yet; the page will say so until one does",
                      file=sys.stderr, flush=True)

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        bind_errors, rest = group.split(OSError)
        if bind_errors is None or rest is not None:
            raise
        exc = bind_errors.exceptions[0]
        while isinstance(exc, BaseExceptionGroup):
            exc = exc.exceptions[0]
        raise CliError(f"cannot listen on {args.host}:{args.port}: {getattr(exc, 'strerror', None) or exc}") from None
    return 0
