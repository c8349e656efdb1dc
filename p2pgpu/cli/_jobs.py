"""Submitter commands: ``job submit|status|list|cancel|logs|results``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ._common import CliError, add_home, add_json, emit, home_of, read_path, table, wrap_home_errors
from ._operator import daemon_call

FINAL_STATES = ("succeeded", "failed", "cancelled", "interrupted")


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
    add_json(p)
    p.set_defaults(func=wrap_home_errors(cmd_submit))

    p = job.add_parser("status", help="a job's state, cluster, timings, proofs and payouts")
    p.add_argument("job_id", metavar="JOB_ID")
    add_home(p)
    add_json(p)
    p.set_defaults(func=wrap_home_errors(cmd_status))

    p = job.add_parser("list", help="jobs this node submitted or worked on")
    add_home(p)
    add_json(p)
    p.set_defaults(func=wrap_home_errors(cmd_list))

    p = job.add_parser("cancel", help="cancel a job this node submitted (stops every member)")
    p.add_argument("job_id", metavar="JOB_ID")
    add_home(p)
    add_json(p)
    p.set_defaults(func=wrap_home_errors(cmd_cancel))

    p = job.add_parser("logs", help="a job's output lines")
    p.add_argument("job_id", metavar="JOB_ID")
    add_home(p)
    p.add_argument("--follow", action="store_true", help="keep printing new lines until the job ends")
    add_json(p)
    p.set_defaults(func=wrap_home_errors(cmd_logs))
    register_results(job)


def cmd_submit(args: argparse.Namespace) -> int:
    path = read_path(args.manifest)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"{args.manifest}: cannot read it ({exc})") from None
    home = home_of(args)
    res = daemon_call(home, "job.submit", {"manifest": text, "dry_run": args.dry_run})
    if args.dry_run:
        def human(d: dict[str, Any]) -> str:
            lines = [f"known peers: {d['known_peers']}"]
            lines += [f"  {s['what']:<40} {s['peers_passing']:>5} peers pass" for s in d["requirements"]]
            verdict = "enough" if d["enough"] else "NOT enough"
            lines.append(f"matching peers: {len(d['matching_peers'])} ({verdict} for {d['members_needed']} members)")
            return "\n".join(lines)

        emit(args, res, human)
        return 0 if res["enough"] else 3
    if not args.wait:
        emit(args, res, lambda d: d["job_id"])
        return 0
    print(res["job_id"], file=sys.stderr if args.json else sys.stdout, flush=True)
    doc = wait_for_job(home, res["job_id"], args.timeout)
    emit(args, doc, human_status)
    return 0 if doc["state"] == "succeeded" else 1


def wait_for_job(home: Any, job_id: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        doc = daemon_call(home, "job.status", {"job_id": job_id})
        f = doc.get("formation", {})
        line = f"{doc['state']}: offers {f.get('offers', 0)}, accepts {f.get('accepts', 0)}" \
            f"/{f.get('members_needed', '?')}, views {f.get('views_seen', 0)}"
        if doc["cluster"]["members"]:
            line = f"{doc['state']}: cluster of {len(doc['cluster']['members'])} " \
                   f"(certificate {doc['cluster']['certificate_hash'][:16]})"
        if line != last:
            print(f"[job {job_id[:12]}] {line}", file=sys.stderr, flush=True)
            last = line
        if doc["state"] in FINAL_STATES or doc.get("all_members_done"):
            return doc
        if time.monotonic() > deadline:
            raise CliError(f"job {job_id[:12]} still {doc['state']} after {timeout_s:.0f} s; "
                           f"follow it with `p2pgpu job status {job_id}`")
        time.sleep(0.2)


def human_status(d: dict[str, Any]) -> str:
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
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    emit(args, daemon_call(home_of(args), "job.status", {"job_id": args.job_id}), human_status)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    rows = daemon_call(home_of(args), "job.list")
    emit(args, rows, lambda rs: table([[r["job_id"][:16], r["name"], r["state"], ",".join(r["roles"]),
                                        str(len(r["cluster"]["members"]))] for r in rs],
                                      ["JOB_ID", "NAME", "STATE", "ROLES", "MEMBERS"]) or "no jobs")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    emit(args, daemon_call(home_of(args), "job.cancel", {"job_id": args.job_id}), human_status)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    home = home_of(args)
    seen = 0
    while True:
        lines = daemon_call(home, "job.logs", {"job_id": args.job_id})
        new = lines[seen:]
        seen = len(lines)
        if args.json and not args.follow:
            emit(args, lines, lambda _: "")
            return 0
        for ln in new:
            if args.json:  # --follow --json: one JSON object per line
                print(json.dumps(ln, sort_keys=True), flush=True)
                continue
            stream = sys.stderr if ln["stream"] == "stderr" else sys.stdout
            prefix = f"[{ln['member'][:8]}] " if ln.get("member") else ""
            print(prefix + ln["line"], file=stream, flush=True)
        if not args.follow:
            return 0
        doc = daemon_call(home, "job.status", {"job_id": args.job_id})
        if doc["state"] in FINAL_STATES:
            return 0
        time.sleep(0.3)


def register_results(job: Any) -> None:
    p = job.add_parser("results", help="fetch a finished job's output files, checked against their hashes",
                       description="Fetch every member's output files into DIR/member-<index>/, each checked "
                                   "against the sha256 its member's proof committed to.")
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("--out", required=True, metavar="DIR", help="where to put the files")
    add_home(p)
    add_json(p)
    p.set_defaults(func=wrap_home_errors(cmd_results))


def cmd_results(args: argparse.Namespace) -> int:
    from pathlib import Path  # noqa: PLC0415

    out = Path(args.out).expanduser().resolve()
    res = daemon_call(home_of(args), "job.results", {"job_id": args.job_id, "out": str(out)}, timeout_s=3600)
    emit(args, res, lambda d: "\n".join(f"{f['saved_as']}  ({f['size_bytes']} bytes)" for f in d["files"])
         or "the job produced no output files")
    return 0
