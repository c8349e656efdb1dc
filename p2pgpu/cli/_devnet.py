"""``p2pgpu devnet up``: a whole local network on this machine, in one command.

It starts N node daemons with simulated GPUs of a realistic mix (each with
its own home and port, bootstrapping from the first), waits until every node
sees every other node's GPUs, and reports what happened.  With ``--once`` it
stops every process and exits 0 when the network reached its goal, else 1
with the reason; without it, it keeps the network up until Ctrl-C.
Everything runs on 127.0.0.1 and works offline.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ._common import CliError, add_json, emit


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    devnet = sub.add_parser("devnet", help="a whole local network on this machine").add_subparsers(
        dest="devnet_command", metavar="SUBCOMMAND")
    devnet.required = True
    p = devnet.add_parser(
        "up", help="start a local network of node daemons with simulated GPUs",
        description="Start N node daemons with simulated GPUs on 127.0.0.1, wait until every node lists every "
                    "other node's GPUs, and print a summary. With --once, stop everything and exit 0 when done "
                    "(non-zero with the reason otherwise); without it, keep running until Ctrl-C.")
    p.add_argument("--nodes", type=int, default=4, metavar="N", help="number of node daemons (default 4)")
    p.add_argument("--jobs", type=int, default=0, metavar="K", help="sample jobs to submit (default 0)")
    p.add_argument("--once", action="store_true", help="exit when the run reached its goal")
    p.add_argument("--dir", metavar="DIR", help="where the node homes and logs go (default: a temporary folder)")
    p.add_argument("--timeout", type=float, default=180.0, metavar="SECONDS",
                   help="give up after this long (default 180)")
    add_json(p)
    p.set_defaults(func=cmd_devnet_up)


def _progress(msg: str) -> None:
    print(f"[devnet] {msg}", file=sys.stderr, flush=True)


def cmd_devnet_up(args: argparse.Namespace) -> int:
    from p2pgpu.localnet import LocalNet, LocalNetError  # noqa: PLC0415

    if not 1 <= args.nodes <= 64:
        raise CliError("--nodes must be between 1 and 64")
    if args.jobs < 0:
        raise CliError("--jobs must not be negative")
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="p2pgpu-devnet-"))
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    summary: dict[str, Any] = {"nodes": args.nodes, "dir": str(root), "ok": False}
    _progress(f"starting {args.nodes} nodes in {root}")
    net = LocalNet(root, 0)
    try:
        for i in range(args.nodes):
            node = net.start_node(i, bootstrap=net.nodes[0].addrs if net.nodes else [])
            net.nodes.append(node)
            _progress(f"node {i} up: {node.peer_id} (control port {node.control_port})")
        ids = {n.peer_id for n in net.nodes}

        def markets_complete() -> bool:
            return all({r["peer_id"] for r in n.call("market")} >= ids for n in net.nodes)

        t0 = time.monotonic()
        net.wait_until(markets_complete, timeout_s=max(5.0, args.timeout - (time.monotonic() - started)),
                       what="every node to see every other node's GPUs")
        summary["adverts_converged_s"] = round(time.monotonic() - t0, 3)
        market = net.nodes[0].call("market")
        supply: dict[str, int] = {}
        for row in market:
            for g in row["gpus"]:
                supply[g["model"]] = supply.get(g["model"], 0) + g["count"]
        summary["gpu_supply"] = dict(sorted(supply.items()))
        summary["adverts_seen"] = {n.peer_id: n.call("status")["adverts_known"] for n in net.nodes}
        _progress(f"all {args.nodes} nodes see each other's GPUs after {summary['adverts_converged_s']} s")
        if args.jobs:
            raise CliError("--jobs needs job submission, which this build of p2pgpu does not have yet")
        summary["ok"] = True
        if not args.once:
            _progress("network is up; press Ctrl-C to stop")
            for n in net.nodes:
                _progress(f"  p2pgpu status --home {n.home.path}")
            while all(n.proc.poll() is None for n in net.nodes):
                time.sleep(1)
            raise CliError("a node process exited; see its log in " + str(root))
    except LocalNetError as exc:
        summary["error"] = str(exc)
    except KeyboardInterrupt:
        _progress("stopping")
    finally:
        net.stop()
        summary["wall_s"] = round(time.monotonic() - started, 3)
        if args.once and summary["ok"] and not args.dir:
            shutil.rmtree(root, ignore_errors=True)

    def human(d: dict[str, Any]) -> str:
        if not d["ok"]:
            return f"devnet failed: {d.get('error', 'unknown')}\nlogs: {d['dir']}"
        gpus = ", ".join(f"{c}x {m}" for m, c in d["gpu_supply"].items())
        return (f"devnet: {d['nodes']} nodes, adverts converged in {d['adverts_converged_s']} s\n"
                f"GPU supply: {gpus}\nwall time: {d['wall_s']} s")

    emit(args, summary, human)
    if not summary["ok"]:
        if not args.json:
            print(json.dumps({"error": summary.get("error")}), file=sys.stderr)
        return 1
    return 0
