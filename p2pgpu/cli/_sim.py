"""``p2pgpu sim ...``: run a network simulation, or sweep it over many seeds.

``sim run`` prints the seed first (so any run can be replayed, even one that
crashes), progress on stderr, and a summary whose last line is the
``trace_hash``; ``--json`` prints one JSON document instead, ``seed`` its
first key and ``trace_hash`` its last.  A run that breaks an invariant exits
with status 3 and prints the command that replays it.  ``sim sweep`` runs
many seeds in local processes (or on a Ray cluster with ``--ray``) and
reports means with 95 % confidence intervals.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from typing import Any

from ._common import CliError, add_json, read_path

EXIT_VIOLATION = 3


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("sim", help="simulate the network (see docs/simulation.md)",
                       description="Deterministic network simulations running the real protocol cores.")
    ss = p.add_subparsers(dest="sim_command", metavar="SIM_COMMAND")
    ss.required = True

    r = ss.add_parser("run", help="run one scenario with one seed",
                      description="Run SCENARIO once; prints the seed first and the trace_hash last.")
    r.add_argument("scenario", metavar="SCENARIO.toml")
    r.add_argument("--seed", type=int, help="seed (default: a random one, printed first)")
    r.add_argument("--out", metavar="DIR", help="write metrics (JSON, CSV) and plots (PNG) here")
    r.add_argument("--no-plots", action="store_true", help="with --out: skip the PNG plots")
    r.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a scenario key, e.g. --set run.nodes=500 (TOML value syntax)")
    r.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_json(r)
    r.set_defaults(func=cmd_run)

    w = ss.add_parser("sweep", help="run one scenario over many seeds, report confidence intervals",
                      description="Run SCENARIO for seeds FIRST..FIRST+SEEDS-1 and summarise across seeds.")
    w.add_argument("scenario", metavar="SCENARIO.toml")
    w.add_argument("--seeds", type=int, default=20, help="how many seeds (default 20)")
    w.add_argument("--first-seed", type=int, default=1, help="first seed (default 1)")
    w.add_argument("--workers", type=int, help="local processes (default: one per CPU)")
    w.add_argument("--ray", metavar="ADDRESS", help="run on this Ray cluster instead (e.g. ray://head:10001)")
    w.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a scenario key for every seed")
    add_json(w)
    w.set_defaults(func=cmd_sweep)


def _overrides(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, eq, text = pair.partition("=")
        if not eq or "." not in key:
            raise CliError(f"--set {pair!r}: write SECTION.KEY=VALUE, e.g. --set run.nodes=500")
        try:
            out[key] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = text  # a bare word: take it as a string
    return out


def _load(args: argparse.Namespace) -> Any:
    from p2pgpu.sim import ScenarioError, load_scenario

    read_path(args.scenario)
    try:
        return load_scenario(args.scenario, _overrides(args.set))
    except ScenarioError as exc:
        raise CliError(f"{args.scenario}: {exc}") from None


def cmd_run(args: argparse.Namespace) -> int:
    from p2pgpu.sim import run_scenario
    from p2pgpu.sim._sweep import replay_command

    scenario = _load(args)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    if not 0 <= seed < 2**63:
        raise CliError("--seed must be between 0 and 2**63-1")
    if args.json:
        print(f"seed: {seed}", file=sys.stderr, flush=True)
    else:
        print(f"seed: {seed}", flush=True)

    def progress(line: str) -> None:
        print(f"[sim] {line}", file=sys.stderr, flush=True)

    result = run_scenario(scenario, seed, out_dir=args.out, plots=not args.no_plots,
                          progress=None if args.quiet else progress)
    s = dict(result.summary)
    if result.files:
        th = s.pop("trace_hash")
        s["files"] = [os.path.join(args.out, f) for f in result.files]
        s["trace_hash"] = th
    if args.json:
        json.dump(s, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for k, v in s.items():
            if k == "seed":
                continue
            print(f"{k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    if result.violations:
        v = result.violations[0]
        print(f"p2pgpu: invariant {v['invariant']} broken at t={v['t_ms']} ms: {v['detail']}\n"
              f"replay with: {replay_command(args.scenario, seed)}", file=sys.stderr)
        return EXIT_VIOLATION
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from p2pgpu.sim import ScenarioError, sweep
    from p2pgpu.sim._sweep import RayMissing

    _load(args)  # refuse a bad file before starting any process
    if not 1 <= args.seeds <= 1_000_000:
        raise CliError("--seeds must be between 1 and 1000000")

    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 20) == 0:
            print(f"[sweep] {done}/{total} seeds", file=sys.stderr, flush=True)

    try:
        result = sweep(args.scenario, args.seeds, first_seed=args.first_seed, workers=args.workers,
                       ray_address=args.ray, overrides=_overrides(args.set), progress=progress)
    except RayMissing as exc:
        raise CliError(str(exc)) from None
    except ScenarioError as exc:
        raise CliError(f"{args.scenario}: {exc}") from None
    doc = result.to_doc()
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(f"scenario: {doc['scenario']}")
        print(f"seeds: {doc['seeds']}")
        for k, m in doc["metrics"].items():
            print(f"{k}: {m['mean']:.6g} +- {m['ci95']:.3g} (95% CI, n={m['n']})")
        print(f"failures: {len(doc['failures'])}")
        for f in doc["failures"]:
            print(f"  seed {f['seed']}: {f['violation']['invariant']}: {f['violation']['detail']}")
            print(f"    replay: {f['replay']}")
    if doc["failures"]:
        print(f"p2pgpu: {len(doc['failures'])} seed(s) broke an invariant; first replay: "
              f"{doc['failures'][0]['replay']}", file=sys.stderr)
        return EXIT_VIOLATION
    return 0
