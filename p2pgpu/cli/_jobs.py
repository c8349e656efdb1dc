"""Submitter commands: ``job submit|status|list|cancel|logs|results``, written on the SDK.

Each command is one or two calls of :class:`p2pgpu.Client` / :class:`p2pgpu.Job`
(``p2pgpu/sdk``): the same flags and ``--json`` keys as before (docs/cli.md),
and a job that did not succeed always shows its reason (the SDK builds one
from the proofs and the formation figures where the daemon recorded none).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ._common import CliError, add_home, add_json, emit, read_path, table
from ._sdk import client_of, wrap_sdk_errors

#: Lines of a failed job's stderr shown under its status.
stderr_tail_lines = 5


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    job = sub.add_parser("job", help="submit and follow jobs").add_subparsers(dest="job_command", metavar="SUBCOMMAND")
    job.required = True
    p = job.add_parser("submit", help="sign and publish a job manifest through the local daemon",
                       description="Sign MANIFEST.toml with this node's identity and publish it; prints the job "
                                   "id. --dry-run publishes nothing and explains how many known peers match each "
                                   "requirement. --wait follows the job to its end, with progress on stderr.")
    p.add_argument("manifest", metavar="MANIFEST.toml")
    add_home(p)
    p.add_argument("--wait", action="store_true", help="follow the job until it ends")
    p.add_argument("--dry-run", action="store_true", help="publish nothing; explain the matching")
    p.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS", help="--wait gives up after this")
    p.add_argument("--input", action="append", default=[], metavar="NAME=PATH",
                   help="a local file as input NAME (in $P2PGPU_IN): hashed here, copied into this node's content "
                        "store and served to the job's members, who check every chunk; repeat for more files")
    add_json(p)
    p.set_defaults(func=wrap_sdk_errors(cmd_submit))

    p = job.add_parser("status", help="a job's state, cluster, timings, proofs and payouts")
    p.add_argument("job_id", metavar="JOB_ID")
    add_home(p)
    add_json(p)
    p.set_defaults(func=wrap_sdk_errors(cmd_status))

    p = job.add_parser("list", help="jobs this node submitted or worked on")
    add_home(p)
    add_json(p)
    p.set_defaults(func=wrap_sdk_errors(cmd_list))

    p = job.add_parser("cancel", help="cancel a job this node submitted (stops every member)")
    p.add_argument("job_id", metavar="JOB_ID")
    add_home(p)
    add_json(p)
    p.set_defaults(func=wrap_sdk_errors(cmd_cancel))

    p = job.add_parser("logs", help="a job's output lines")
    p.add_argument("job_id", metavar="JOB_ID")
    add_home(p)
    p.add_argument("--follow", action="store_true", help="keep printing new lines until the job ends")
    add_json(p)
    p.set_defaults(func=wrap_sdk_errors(cmd_logs))
    register_results(job)


def cmd_submit(args: argparse.Namespace) -> int:
    from p2pgpu.sdk import Timeout

    path = read_path(args.manifest)
    client = client_of(args)
    if args.dry_run:
        res = client.dry_run(path)

        def human(d: dict[str, Any]) -> str:
            lines = [f"known peers: {d['known_peers']}"]
            lines += [f"  {s['what']:<40} {s['peers_passing']:>5} peers pass" for s in d["requirements"]]
            verdict = "enough" if d["enough"] else "NOT enough"
            lines.append(f"matching peers: {len(d['matching_peers'])} ({verdict} for {d['members_needed']} members)")
            return "\n".join(lines)

        emit(args, res, human)
        return 0 if res["enough"] else 3
    inputs = {}
    for item in args.input:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            raise CliError(f"--input {item!r}: give NAME=PATH, e.g. --input data.bin=./data.bin")
        inputs[name] = file
    job = client.submit(path, inputs=inputs, progress=_input_progress())
    if not args.wait:
        emit(args, job.submitted, lambda d: d["job_id"])
        return 0
    print(job.id, file=sys.stderr if args.json else sys.stdout, flush=True)

    def progress(p: Any) -> None:
        print(f"[job {job.id[:12]}] {p.line}", file=sys.stderr, flush=True)

    try:
        st = job.wait(timeout_s=args.timeout, progress=progress, check=False)
    except Timeout as exc:
        raise CliError(str(exc)) from None
    emit(args, st.to_json(), lambda d: human_status(d, _stderr_tail(job, st)))
    return 0 if st.succeeded else 1


def _input_progress() -> Any:
    """Hashing progress of local inputs on stderr: a line at most every 10%."""
    shown: dict[str, int] = {}

    def progress(name: str, done: int, total: int) -> None:
        step = 100 if total == 0 else done * 10 // total * 10
        if shown.get(name, -1) < step:
            shown[name] = step
            print(f"[input {name}] hashing {done >> 20}/{total >> 20} MiB ({step}%)", file=sys.stderr, flush=True)

    return progress


def _stderr_tail(job: Any, st: Any) -> list[str]:
    """The last stderr lines of a job that did not succeed (what its command said before it ended)."""
    from p2pgpu.sdk import P2pgpuError

    if st.succeeded or not st.done:
        return []
    try:
        lines = [ln for ln in job.logs() if ln.stream == "stderr"]
    except P2pgpuError:
        return []  # the reason stands on its own; the logs are a bonus
    return [(f"[{ln.member[:8]}] " if ln.member else "") + ln.line for ln in lines[-stderr_tail_lines:]]


def human_status(d: dict[str, Any], stderr_tail: list[str] | None = None) -> str:
    lines = [f"job       {d['job_id']}", f"name      {d['name']}", f"state     {d['state']}",
             f"roles     {', '.join(d['roles']) or '-'}"]
    if d["reason"]:
        lines.append(f"reason    {d['reason']}")
    c = d["cluster"]
    if c["members"]:
        lines.append(f"cluster   {len(c['members'])} members, certificate {c['certificate_hash']}")
        lines += [f"  member  {m}" for m in c["members"]]
    t = d["timings"]
    if t.get("formation_ms") is not None:
        lines.append(f"formed in {t['formation_ms']} ms")
    for key in ("proofs", "payouts"):
        if d.get(key):
            lines.append(f"{key:<9} {len(d[key])}")
    if stderr_tail:
        lines.append("stderr    (last lines)")
        lines += [f"  {ln}" for ln in stderr_tail]
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    job = client_of(args).job(args.job_id)
    st = job.status()
    emit(args, st.to_json(), lambda d: human_status(d, _stderr_tail(job, st)))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    rows = [j.to_json() for j in client_of(args).jobs()]
    emit(args, rows, lambda rs: table([[r["job_id"][:16], r["name"], r["state"], ",".join(r["roles"]),
                                        str(len(r["cluster"]["members"]))] for r in rs],
                                      ["JOB_ID", "NAME", "STATE", "ROLES", "MEMBERS"]) or "no jobs")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    emit(args, client_of(args).job(args.job_id).cancel().to_json(), human_status)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    job = client_of(args).job(args.job_id)
    if args.json and not args.follow:
        emit(args, [ln.to_json() for ln in job.logs()], lambda _: "")
        return 0
    for ln in job.logs(follow=args.follow):
        if args.json:  # --follow --json: one JSON object per line
            print(json.dumps(ln.to_json(), sort_keys=True), flush=True)
            continue
        stream = sys.stderr if ln.stream == "stderr" else sys.stdout
        prefix = f"[{ln.member[:8]}] " if ln.member else ""
        print(prefix + ln.line, file=stream, flush=True)
    return 0


def register_results(job: Any) -> None:
    p = job.add_parser("results", help="fetch a finished job's output files, checked against their hashes",
                       description="Fetch every member's output files into DIR/member-<index>/, each checked "
                                   "against the sha256 its member's proof committed to.")
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("--out", required=True, metavar="DIR", help="where to put the files")
    add_home(p)
    add_json(p)
    p.set_defaults(func=wrap_sdk_errors(cmd_results))


def cmd_results(args: argparse.Namespace) -> int:
    from pathlib import Path

    out = Path(args.out).expanduser().resolve()
    files = client_of(args).job(args.job_id).results(out)
    doc = {"job_id": args.job_id, "out": str(out), "files": [f.to_json() for f in files]}
    emit(args, doc, lambda d: "\n".join(f"{f['saved_as']}  ({f['size_bytes']} bytes)" for f in d["files"])
         or "the job produced no output files")
    return 0
