"""Operator commands: ``init``, ``node run``, ``status``, ``peers``, ``gpus``, ``market``."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from typing import Any

from p2pgpu.home import Home, HomeError, load_networks
from p2pgpu.logs import LOG_FORMATS, LogSetupError, announce, setup_logging

from ._common import CliError, add_home, add_json, emit, home_of, table, wrap_home_errors
from ._sdk import client_of, wrap_sdk_errors
from ._service import register_service


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("init", help="create a node home: identity key, config.toml",
                       description="Create the node home (identity key with mode 0600, config.toml, control "
                                   "token) and print the peer id. Refuses to overwrite an existing identity.")
    add_home(p)
    p.add_argument("--network", default="local", help="network name from bootstrap_peers.toml (default: local)")
    p.add_argument("--payout-address", default="", metavar="PUBKEY",
                   help="Solana address that receives this node's payouts")
    add_json(p)
    p.set_defaults(func=wrap_home_errors(cmd_init))

    node = sub.add_parser("node", help="run the node daemon").add_subparsers(dest="node_command", metavar="SUBCOMMAND")
    node.required = True
    p = node.add_parser("run", help="run the daemon in the foreground until SIGINT/SIGTERM",
                        description="Run the node daemon in the foreground: join the network, advertise this "
                                    "machine's GPUs, keep the market, serve the local control API. Stops cleanly "
                                    "on SIGINT or SIGTERM. SIGHUP reloads config.toml: price_per_gpu_hour, region, "
                                    "payout_address, advert_ttl_s and allow_job_network apply at once (the advert "
                                    "is re-signed); other changes wait for a restart; a config that does not load "
                                    "is refused and the running one kept (docs/operating.md).")
    add_home(p)
    p.add_argument("--listen", action="append", metavar="MULTIADDR",
                   help="listen address (repeatable; default from config.toml; /ip4/127.0.0.1/tcp/0 picks a port)")
    p.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR",
                   help="a peer to join through, ending in /p2p/PEER_ID (repeatable; adds to the network's list)")
    p.add_argument("--announce", action="append", default=[], metavar="MULTIADDR",
                   help="an address the world reaches this node at, such as a port forwarded on your router: "
                        "/ip4/203.0.113.7/tcp/4001 (repeatable; advertised as is; adds to config.toml's "
                        "announce). Listen on all interfaces with --listen /ip4/0.0.0.0/tcp/4001 "
                        "--listen /ip6/::/tcp/4001")
    p.add_argument("--gpus-from", metavar="FILE",
                   help="read the GPU inventory from a JSON file instead of NVML (test networks only; "
                        "the adverts are marked simulated)")
    p.add_argument("--control-port", type=int, metavar="N", help="control API port on 127.0.0.1 (0: any free)")
    p.add_argument("--bulk-port", type=int, metavar="N",
                   help="TCP port of the bulk side channel that serves blob chunks to peers faster than libp2p, "
                        "on the host of the first --listen address (0: any free; -1: off, blobs go over libp2p "
                        "only; default from config.toml's bulk_port and bulk_enabled; docs/content.md)")
    p.add_argument("--advert-ttl", type=int, metavar="SECONDS", help="advert lifetime (default from config.toml)")
    p.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default) or ERROR")
    p.add_argument("--log-format", choices=LOG_FORMATS,
                   help="text: lines on stderr; json: one JSON object per line on stdout, for journald and log "
                        "shippers (default: text when stderr is a terminal, else json)")
    p.set_defaults(func=wrap_home_errors(cmd_node_run))
    register_service(node)

    p = sub.add_parser("status", help="status of the running daemon",
                       description="Status of the daemon running for this home: peer id, addresses, peers, "
                                   "adverts known, jobs by state, uptime. Exits 1 when no daemon runs.")
    add_home(p)
    add_json(p)
    p.set_defaults(func=wrap_sdk_errors(cmd_status))

    p = sub.add_parser("peers", help="connected peers", description=(
        "Peers the daemon is connected to, each with its reputation computed from the receipts this node holds "
        "(worker score = verified lamports earned - 4 x lamports of refused work, decayed with a 30-day half-life; "
        "--json shows the evidence behind it: docs/reputation.md)."))
    add_home(p)
    add_json(p)
    p.set_defaults(func=wrap_sdk_errors(cmd_peers))

    p = sub.add_parser("gpus", help="this machine's GPU inventory",
                       description="This machine's GPU inventory as the advert would carry it, or why there "
                                   "is none. `--json` output can be saved and replayed with --gpus-from.")
    p.add_argument("--gpus-from", metavar="FILE", help="show this inventory file instead of asking NVML")
    add_json(p)
    p.set_defaults(func=cmd_gpus)

    p = sub.add_parser("market", help="GPU supply this node knows of",
                       description="GPU supply the running daemon knows of: one row per advertising peer.")
    add_home(p)
    p.add_argument("--model", metavar="TEXT", help="only GPUs whose model contains TEXT (case-insensitive)")
    p.add_argument("--min-vram-gb", type=float, default=0, metavar="N", help="only GPUs with at least N GiB")
    add_json(p)
    p.set_defaults(func=wrap_sdk_errors(cmd_market))


def cmd_init(args: argparse.Namespace) -> int:
    home = home_of(args)
    identity = home.init(network=args.network, payout_address=args.payout_address)
    emit(args, {"peer_id": identity.peer_id, "home": str(home.path), "network": args.network},
         lambda d: d["peer_id"])
    return 0


def load_inventory(gpus_from: str | None) -> Any:
    from p2pgpu.gpu import InventoryError, detect, from_file  # noqa: PLC0415

    if gpus_from:
        try:
            return from_file(gpus_from)
        except InventoryError as exc:
            raise CliError(f"--gpus-from: {exc}") from None
    return detect()


def cmd_gpus(args: argparse.Namespace) -> int:
    inv = load_inventory(args.gpus_from)

    def human(d: dict[str, Any]) -> str:
        if not d["gpus"]:
            return d["reason"] or "no GPUs"
        rows = [[str(i), g["model"], str(g["memory_mb"]), g["compute_capability"], g["driver_version"],
                 g["cuda_version"]] for i, g in enumerate(d["gpus"])]
        out = table(rows, ["#", "MODEL", "MEMORY_MB", "CC", "DRIVER", "CUDA"])
        return out + ("\n(simulated inventory from a file)" if d["simulated"] else "")

    emit(args, inv.to_json(), human)
    return 0


def cmd_node_run(args: argparse.Namespace) -> int:
    import trio  # noqa: PLC0415 - heavy imports only for the daemon

    from p2pgpu.node import Node, NodeOptions  # noqa: PLC0415
    from p2pgpu.node._patches import tune_malloc  # noqa: PLC0415

    tune_malloc()  # large transfer buffers reused, not mapped and unmapped per frame (_patches.py, B4)

    try:
        log_format = setup_logging(args.log_level, args.log_format)
    except LogSetupError as exc:
        raise CliError(str(exc)) from None
    log = logging.getLogger("p2pgpu.node")
    home = home_of(args)
    identity = home.identity()
    config = home.config()
    nets = load_networks()
    if config.network not in nets:
        raise CliError(f"config.toml names unknown network {config.network!r}; known: {', '.join(sorted(nets))}")
    network = nets[config.network]
    inventory = load_inventory(args.gpus_from)
    if inventory.simulated and not network.allow_simulated:
        raise CliError(f"network {network.name!r} refuses simulated GPUs: drop --gpus-from or use --network local")
    if home.control_path.exists():
        from p2pgpu.node import DaemonUnavailable, call  # noqa: PLC0415

        try:
            doc = json.loads(home.control_path.read_text())
            call(int(doc["port"]), home.token(), "status", timeout_s=2.0)
        except (DaemonUnavailable, ValueError, KeyError, OSError):
            home.control_path.unlink(missing_ok=True)  # left by a daemon that died
        else:
            raise CliError(f"a daemon already runs for {home.path} (pid {doc.get('pid')}); stop it first")
    options = NodeOptions(
        listen=args.listen or config.listen,
        bootstrap=args.bootstrap,
        control_port=config.control_port if args.control_port is None else args.control_port,
        advert_ttl_s=args.advert_ttl or config.advert_ttl_s,
        announce=args.announce,
        bulk_port=args.bulk_port,
    )
    if args.bulk_port is not None and not -1 <= args.bulk_port <= 65535:
        raise CliError("--bulk-port must be a TCP port (0: any free port; -1: turn the side channel off)")
    node = Node(identity=identity, config=config, network=network, inventory=inventory, options=options, home=home)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
                await nursery.start(node.run)
                ready = {"peer_id": identity.peer_id, "addrs": node.stack.addrs() if node.stack else [],
                         "control_port": node.control_port}
                if log_format == "json":  # the ready line is a log record too, with the same three keys
                    announce(log, "node ready", **ready)
                else:
                    print(json.dumps(ready), flush=True)
                nursery.start_soon(_stop_when_node_ends, node, nursery)
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        node.reload_config(home.config, advert_ttl_fixed=args.advert_ttl is not None)
                        continue
                    name = signal.Signals(signum).name
                    if log_format == "json":
                        announce(log, f"{name}: shutting down")
                    else:
                        print(f"p2pgpu: {name}: shutting down", file=sys.stderr, flush=True)
                    nursery.cancel_scope.cancel()
                    break

    trio.run(main)
    return 0


async def _stop_when_node_ends(node: Any, nursery: Any) -> None:
    # `shutdown` over the control API stops the node; then end the process too.
    import trio  # noqa: PLC0415

    while node._cancel is None or not node._cancel.cancel_called:
        await trio.sleep(0.2)
    await trio.sleep(0.1)
    nursery.cancel_scope.cancel()


def daemon_call(home: Home, method: str, params: dict[str, Any] | None = None, *, timeout_s: float = 30.0) -> Any:
    """Call the daemon of ``home`` through the SDK, turning every failure into a clear CliError."""
    from p2pgpu.sdk import Client, P2pgpuError  # noqa: PLC0415

    try:
        return Client(home, timeout_s=timeout_s).call(method, params)
    except P2pgpuError as exc:
        raise CliError(str(exc)) from None


def cmd_status(args: argparse.Namespace) -> int:
    doc = client_of(args).status()

    def human(d: dict[str, Any]) -> str:
        lines = [f"peer id      {d['peer_id']}", f"network      {d['network']}",
                 f"peers        {d['peers']}", f"adverts      {d['adverts_known']}",
                 f"gpus         {d['gpus']} ({d['gpus_free']} free)", f"uptime       {d['uptime_s']:.0f} s"]
        lines += [f"address      {a}" for a in d["addrs"]]
        reach = d.get("reachability")
        if reach:
            lines.append(f"reachability {reach['reachability']}: {reach['why']}")
            lines += [f"advertised   {a}" for a in reach["advertised_addrs"]]
            conns = reach["connections"]
            lines.append(f"connections  {conns['direct']} direct, {conns['relayed']} relayed")
        if d["jobs"]:
            lines.append("jobs         " + ", ".join(f"{k}: {v}" for k, v in sorted(d["jobs"].items())))
        if d["rejections"]:
            lines.append("rejected     " + ", ".join(f"{k}: {v}" for k, v in d["rejections"].items()))
        return "\n".join(lines)

    emit(args, doc, human)
    return 0


def cmd_peers(args: argparse.Namespace) -> int:
    rows = client_of(args).peers()
    emit(args, rows, lambda rs: table(
        [[r["peer_id"], "-" if r["latency_ms"] is None else f"{r['latency_ms']:.1f}",
          ",".join(r.get("connections") or []) or "-",
          str((r.get("reputation") or {}).get("worker", "-")), str((r.get("reputation") or {}).get("jobs_paid", "-")),
          (r["addrs"] or ["-"])[0]]
         for r in rs], ["PEER_ID", "LATENCY_MS", "VIA", "WORKER_SCORE", "JOBS_PAID", "ADDR"]) or "no peers connected")
    return 0


def cmd_market(args: argparse.Namespace) -> int:
    if args.min_vram_gb < 0:
        raise CliError("--min-vram-gb must not be negative")
    rows = client_of(args).market(model=args.model, min_vram_gb=args.min_vram_gb)

    def human(rs: list[dict[str, Any]]) -> str:
        out = []
        for r in rs:
            gpus = ", ".join(f"{g['count']}x {g['model']} {round(g['memory_mb'] / 1024)} GiB" for g in r["gpus"])
            expires = time.strftime("%H:%M:%S", time.localtime(r["expires_at"] / 1000))
            out.append([r["peer_id"], gpus, f"{r['gpus_free']}", f"{r['price']} {r['currency']}", r["region"], expires])
        return table(out, ["PEER_ID", "GPUS", "FREE", "PRICE/GPU-H", "REGION", "EXPIRES"]) or "no GPU supply known yet"

    emit(args, rows, human)
    return 0


__all__ = ["register", "daemon_call", "HomeError"]
