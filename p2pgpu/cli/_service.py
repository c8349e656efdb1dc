"""``p2pgpu node install-service``: run the node under systemd (see p2pgpu/service.py).

``--print`` shows the unit and changes nothing; ``--dry-run`` also lists what
installing would do on this machine.  Installing (as root) creates the
dedicated user, the node home (``init``) if it has no identity, gives the
home to that user, and writes the unit; it never starts anything, and prints
the ``systemctl`` line that does.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from p2pgpu.home import Home, HomeError

from ._common import CliError, add_json, emit


def register_service(node: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = node.add_parser(
        "install-service", help="run the node as a systemd service (writes the unit)",
        description="Write a systemd unit that runs `p2pgpu node run` as a dedicated user, restarted on failure, "
                    "its jobs stopped with it (KillMode=control-group), logs as JSON lines in the journal, "
                    "`systemctl reload` reloading config.toml, and the hardening options bubblewrap tolerates. "
                    "As root it also creates the user and the node home. It starts nothing: it prints the "
                    "systemctl line that does. --print shows the unit only.")
    p.add_argument("--name", default="p2pgpu", help="unit name, without .service (default p2pgpu)")
    p.add_argument("--user", default="p2pgpu", help="the dedicated system user the node runs as (default p2pgpu)")
    p.add_argument("--home", default="/var/lib/p2pgpu", metavar="DIR",
                   help="the node home the service uses (default /var/lib/p2pgpu; made with init if new)")
    p.add_argument("--unit-dir", default="/etc/systemd/system", metavar="DIR",
                   help="where the unit goes (default /etc/systemd/system)")
    p.add_argument("--network", default="local", help="network of a new home (init --network; default local)")
    p.add_argument("--payout-address", default="", metavar="PUBKEY", help="payout address of a new home")
    p.add_argument("--print", dest="print_unit", action="store_true", help="print the unit and change nothing")
    p.add_argument("--dry-run", action="store_true", help="say what installing would do, and change nothing")
    p.add_argument("--force", action="store_true", help="replace an existing unit of that name that differs")
    add_json(p)
    p.set_defaults(func=cmd_install_service)


def exec_argv() -> tuple[str, ...]:
    """How the service starts this very installation of p2pgpu."""
    script = shutil.which("p2pgpu", path=str(Path(sys.executable).parent))
    if script:
        return (str(Path(script).absolute()),)
    return (str(Path(sys.executable).absolute()), "-m", "p2pgpu.cli")


def installation_paths() -> tuple[str, ...]:
    """Where this installation really lives: the service user must reach them."""
    import p2pgpu

    paths = [os.path.realpath(sys.executable), os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix),
             os.path.realpath(Path(p2pgpu.__file__).parent)]
    return tuple(dict.fromkeys(paths))


def _machine(spec: Any, unit_dir: Path) -> Any:
    from p2pgpu.service import Machine, unreachable_parts

    try:
        pw = pwd.getpwnam(spec.user)
        uid, gids = pw.pw_uid, [pw.pw_gid] + [g.gr_gid for g in grp.getgrall() if spec.user in g.gr_mem]
    except KeyError:
        pw, uid, gids = None, 65534, [65534]  # a new system user: judge as a stranger would be
    owner = None
    if spec.home.exists():
        try:
            owner = pwd.getpwuid(spec.home.stat().st_uid).pw_name
        except KeyError:
            owner = str(spec.home.stat().st_uid)
    unit_path = unit_dir / spec.unit_name
    return Machine(is_root=os.geteuid() == 0, user_exists=pw is not None,
                   home_has_identity=Home(spec.home).exists(), home_owner=owner,
                   unit_existing=unit_path.read_text() if unit_path.exists() else None,
                   exec_unreachable=tuple(dict.fromkeys(
                       part for path in (spec.exec_argv[0], *spec.reads)
                       for part in unreachable_parts(Path(path), uid, gids))))


def cmd_install_service(args: argparse.Namespace) -> int:
    from p2pgpu.service import (
        Operations,
        ServiceError,
        ServiceSpec,
        chown_tree,
        install,
        plan_install,
        unit_text,
        write_unit_file,
    )

    try:
        spec = ServiceSpec(name=args.name, user=args.user, home=Path(args.home), exec_argv=exec_argv(),
                           reads=installation_paths(), nvidia_modprobe=shutil.which("nvidia-modprobe") or "")
    except ServiceError as exc:
        raise CliError(str(exc)) from None
    if args.print_unit:
        text = unit_text(spec)
        emit(args, {"unit": text, "unit_name": spec.unit_name}, lambda d: d["unit"].rstrip("\n"))
        return 0
    unit_dir = Path(args.unit_dir)
    try:
        plan = plan_install(spec, unit_dir, _machine(spec, unit_dir), force=args.force)
    except ServiceError as exc:
        raise CliError(str(exc)) from None
    doc: dict[str, Any] = {"unit_path": str(plan.unit_path), "unit": plan.unit, "user": spec.user,
                           "home": str(spec.home), "dry_run": args.dry_run, "actions": plan.actions(),
                           "done": [], "next": list(plan.next_steps)}
    if not args.dry_run:
        def run(argv: list[str]) -> None:
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise CliError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.returncode}")

        def init_home(path: Path) -> None:
            try:
                Home(path).init(network=args.network, payout_address=args.payout_address)
            except HomeError as exc:
                raise CliError(str(exc)) from None

        doc["done"] = install(spec, plan, Operations(run=run, init_home=init_home, chown_tree=chown_tree,
                                                     write_file=write_unit_file))

    def human(d: dict[str, Any]) -> str:
        if d["dry_run"]:
            lines = ["would: " + a for a in d["actions"]] + ["", d["unit"].rstrip("\n")]
        else:
            lines = [f"done: {a}" for a in d["done"]] or ["nothing to do: already installed"]
        return "\n".join(lines + ["", "next:"] + [f"  {s}" for s in d["next"]])

    emit(args, doc, human)
    return 0
