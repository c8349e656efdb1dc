"""``p2pgpu devnet up``: a whole local network on this machine, in one command.

It starts a local Solana ledger, N node daemons with simulated GPUs of a
realistic mix (each with its own home and port, bootstrapping from the
first), an explorer, and submits K sample jobs (single-node, two-node and
replicated) from a funded submitter; it follows formation, execution, proofs
and payouts, and checks the payouts against the ledger's balances.  With
``--once`` it stops every process and exits 0 when every job is paid, else 1
with the reason; without it, it keeps the network up until Ctrl-C, SIGTERM or
SIGHUP, which all stop it the same way.  Every process it starts dies with it
even when it is killed outright (``p2pgpu.children``).
Everything runs on 127.0.0.1 and works offline (see p2pgpu/devnet.py).
"""

from __future__ import annotations

import argparse
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
                    "(non-zero with the reason otherwise); without it, keep running until Ctrl-C or SIGTERM. "
                    "Every process it starts stops with it, even if it is killed outright.")
    p.add_argument("--nodes", type=int, default=4, metavar="N", help="number of node daemons (default 4)")
    p.add_argument("--jobs", type=int, default=3, metavar="K",
                   help="sample jobs to submit: single-node, two-node and replicated in turn (default 3)")
    p.add_argument("--once", action="store_true", help="exit when the run reached its goal")
    p.add_argument("--dir", metavar="DIR", help="where the node homes and logs go (default: a temporary folder)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                   help="give up after this long (default 300)")
    p.add_argument("--no-explorer", action="store_true", help="do not start the web explorer")
    add_json(p)
    p.set_defaults(func=cmd_devnet_up)


def _progress(msg: str) -> None:
    print(f"[devnet] {msg}", file=sys.stderr, flush=True)


def cmd_devnet_up(args: argparse.Namespace) -> int:
    from p2pgpu.children import sigterm_as_interrupt

    with sigterm_as_interrupt():  # systemd, docker and `timeout` stop us the way Ctrl-C does
        return _devnet_up(args)


def _devnet_up(args: argparse.Namespace) -> int:
    from p2pgpu.devnet import Devnet, DevnetError, summarize  # noqa: PLC0415
    from p2pgpu.doctor import devnet_prerequisites
    from p2pgpu.localnet import LocalNetError  # noqa: PLC0415

    if not 1 <= args.nodes <= 64:
        raise CliError("--nodes must be between 1 and 64")
    if not 0 <= args.jobs <= 1000:
        raise CliError("--jobs must be between 0 and 1000")
    missing = devnet_prerequisites()
    if missing:
        # Before anything starts: no folder, no ledger, no node (jobs could not run anyway).
        first = missing[0]
        summary_early: dict[str, Any] = {
            "ok": False, "nodes": args.nodes, "dir": None, "wall_s": 0.0,
            "error": f"missing prerequisite: {first.summary}. To fix: {first.fix} (nothing was started)",
            "prerequisites": [c.to_json() for c in missing]}
        emit(args, summary_early, _human)
        return 1
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="p2pgpu-devnet-"))
    started = time.monotonic()
    summary: dict[str, Any] = {"nodes": args.nodes, "dir": str(root), "ok": False}

    def left() -> float:
        return max(5.0, float(args.timeout) - (time.monotonic() - started))

    _progress(f"starting a devnet of {args.nodes} nodes in {root}")
    dev = Devnet(root, nodes=args.nodes, explorer=not args.no_explorer, progress=_progress)
    try:
        dev.start()
        adverts_s = dev.wait_adverts(left())
        _progress(f"all {args.nodes} nodes see each other's GPUs after {adverts_s:.3f} s")
        docs = dev.run_jobs(args.jobs, left()) if args.jobs else []
        summary.update(summarize(dev, docs, adverts_s))
        failed = [j for j in summary["jobs"] if j["state"] != "succeeded"]
        if failed:
            summary["error"] = f"{len(failed)} job(s) failed: " + "; ".join(
                f"{j['job_id'][:12]} ({j['name']}): {j.get('reason') or j['state']}" for j in failed)
        elif not summary["ledger_matches_payouts"]:
            summary["error"] = f"ledger balances differ from the payouts: {summary['ledger_mismatch']}"
        else:
            summary["ok"] = True
        if summary["ok"] and not args.once:
            _progress(f"network is up; explorer at {dev.explorer_url or '(off)'}; press Ctrl-C (or send SIGTERM) "
                      "to stop")
            for n in dev.net.nodes if dev.net else []:
                _progress(f"  p2pgpu status --home {n.home.path}")
            while dev.net and all(n.proc.poll() is None for n in dev.net.nodes):
                time.sleep(1)
            summary["ok"] = False
            summary["error"] = "a node process exited; see its log in " + str(root)
    except (LocalNetError, DevnetError) as exc:
        summary["error"] = str(exc)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP (children.Stopped)
        _progress(f"stopping ({exc or 'interrupted'})")
    finally:
        dev.stop()
        summary["wall_s"] = round(time.monotonic() - started, 3)
        if args.once and summary["ok"] and not args.dir:
            shutil.rmtree(root, ignore_errors=True)

    emit(args, summary, _human)
    return 0 if summary["ok"] else 1


def _human(d: dict[str, Any]) -> str:
    if not d.get("ok"):
        lines = [f"devnet FAILED: {d.get('error', 'unknown')}"]
        for j in d.get("jobs", []):
            if j["state"] != "succeeded":
                lines.append(f"  job {j['job_id'][:12]} {j['name']:<11} {j['state']}: {j.get('reason') or '?'}")
        if d.get("dir"):
            lines.append(f"logs: {d['dir']}")
        if d.get("prerequisites"):
            lines.append("`p2pgpu doctor` checks everything a node needs")
        return "\n".join(lines)
    lines = [f"devnet: {d['nodes']} nodes, adverts converged in {d['adverts_converged_s']} s",
             f"ledger: {d['ledger']}" + (f"   explorer: {d['explorer']}" if d.get("explorer") else "")]
    if d.get("network_view"):
        lines.append(f"network view: {d['network_view']} (while the devnet runs)")
    for j in d.get("jobs", []):
        lines.append(f"  job {j['job_id'][:12]} {j['name']:<11} {j['state']:<10} cluster of {j['members']}"
                     f" formed in {j['formation_ms']} ms, {j['proofs_verified']} proofs verified,"
                     f" {len(j['payouts'])} payouts")
        for p in j["payouts"]:
            lines.append(f"      paid {p['amount']:>10} lamports to {p['worker'][:16]}  tx {p['tx_signature']}")
    if d.get("jobs"):
        lines.append(f"clusters formed: {d['clusters_formed']}, proofs verified: {d['proofs_verified']}, "
                     f"payouts confirmed: {d['payouts_confirmed']}, ledger balances match: "
                     f"{'yes' if d['ledger_matches_payouts'] else 'NO'}")
    lines.append(f"wall time: {d['wall_s']} s")
    return "\n".join(lines)
