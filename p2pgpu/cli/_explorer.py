"""``p2pgpu explorer``: serve the web explorer over the local daemon's view of the network.

The explorer is its own process: it talks to the daemon of ``--home`` through
the SDK (``p2pgpu/explorer``), serves the page, the JSON API and
``/metrics`` until SIGINT/SIGTERM, and stops cleanly.  It listens on
127.0.0.1 unless ``--host`` or ``--bind`` says otherwise.  ``--public`` is
the mode safe to expose: only public fields, rate limits per client, no
``/metrics``, no request that makes it call the daemon (docs/explorer.md).
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
    p.add_argument("--bind", metavar="ADDR",
                   help="HOST:PORT (or [IPv6]:PORT, or HOST) to listen on; overrides --host and --port")
    p.add_argument("--public", action="store_true",
                   help="safe to expose: only what signed adverts, proofs and ledger transactions make public, "
                        "rate limits per client, no /metrics, nothing that needs the control token")
    p.add_argument("--poll-interval", type=float, default=1.0, metavar="SECONDS",
                   help="how often to ask the daemon (default 1)")
    p.set_defaults(func=wrap_home_errors(cmd_explorer))


def cmd_explorer(args: argparse.Namespace) -> int:
    import trio

    from p2pgpu.explorer import serve_explorer

    host, port = parse_bind(args.bind, args.port) if args.bind else (args.host, args.port)
    if not 0 <= port <= 65535:
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
            url = await nursery.start(partial(serve_explorer, home, host=host, port=port,
                                              poll_interval_s=args.poll_interval, public=args.public))
            print(f"explorer ready {url}", flush=True)
            print(f"p2pgpu: network view {url.rstrip('/')}/#network" + (" (public mode)" if args.public else ""),
                  file=sys.stderr, flush=True)
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
        raise CliError(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}") from None
    return 0


def parse_bind(text: str, default_port: int) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPv6]:PORT`` or ``HOST`` (then ``default_port``)."""
    t = text.strip()
    if t.startswith("["):
        host, sep, rest = t[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise CliError(f"--bind {text!r}: write an IPv6 address as [ADDR]:PORT")
        port_text = rest[1:]
    elif t.count(":") == 1:
        host, port_text = t.split(":")
    elif ":" in t:
        raise CliError(f"--bind {text!r}: write an IPv6 address as [ADDR]:PORT")
    else:
        host, port_text = t, ""
    if not host:
        raise CliError(f"--bind {text!r}: name the address, e.g. 0.0.0.0:8080")
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise CliError(f"--bind {text!r}: the port must be a number") from None
    return host, port
