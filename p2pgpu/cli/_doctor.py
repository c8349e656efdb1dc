"""``p2pgpu doctor``: check this machine and a node home, each check with its fix (p2pgpu/doctor.py).

Exit status 0 when nothing failed (warnings and unknowns allowed), 1 when a
check failed.  ``--json`` prints :func:`p2pgpu.doctor.report`'s document.
"""

from __future__ import annotations

import argparse
from typing import Any

from ._common import add_home, add_json, emit, home_of

_MARK = {"pass": "ok  ", "warn": "WARN", "fail": "FAIL", "unknown": "??  "}


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "doctor", help="check this machine and the node home: GPUs, sandbox, cgroups, disk, clock, ports, ledger",
        description="Check every prerequisite of a working node, each with pass, warn, fail or unknown and the "
                    "fix: the NVIDIA driver and NVML, the GPUs NVML sees against /dev/nvidia*, bubblewrap and "
                    "unprivileged user namespaces, a real probe sandbox, cgroups for job memory limits, disk for "
                    "the home and the content store, the clock against the ledger's, listen ports and "
                    "reachability (from the running daemon), the ledger and the wallet. Exits 1 when a check "
                    "fails.")
    add_home(p)
    add_json(p)
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    from p2pgpu.doctor import report, run_checks

    home = home_of(args)
    doc = report(run_checks(home), home.path)

    def human(d: dict[str, Any]) -> str:
        lines = []
        for c in d["checks"]:
            lines.append(f"{_MARK[c['status']]}  {c['name']:<16} {c['summary']}")
            if c["fix"] and c["status"] != "pass":
                lines.append(f"{'':<22}fix: {c['fix']}")
        n = d["counts"]
        lines.append(f"\n{n['pass']} passed, {n['warn']} warnings, {n['fail']} failed, {n['unknown']} unknown")
        return "\n".join(lines)

    emit(args, doc, human)
    return 0 if doc["ok"] else 1
