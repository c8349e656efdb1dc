"""Running the node as a systemd service: the unit, and installing it.

:func:`unit_text` writes the unit from a :class:`ServiceSpec`: a dedicated
user, ``Restart=on-failure``, ``KillMode=control-group`` (the jobs' sandboxes
live in the node's cgroup, so they stop with it), ``Delegate=yes`` (the node
makes a child cgroup per job for its memory limit), JSON logs on stdout for
journald, ``ExecReload`` sending SIGHUP (``node run`` reloads its config), and
the hardening options bubblewrap tolerates.  Which options those are was
measured, not guessed: ``tests/test_service.py`` runs the node's real probe
sandbox as an unprivileged user under an emulation of each option (the mount
it makes, or the seccomp filter it installs) and shows that every option kept
lets the sandbox run and every option left out (:data:`OMITTED`) breaks it or
the GPUs.

:func:`plan_install` decides what ``p2pgpu node install-service`` must do on
this machine (pure: it is handed what exists); :func:`install` carries the
plan out through injected operations, so the decisions are testable without
root.  Every value that reaches the unit file is checked first: a name, user
or path that could inject a line or a systemd specifier is refused.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: Hardening options in the unit: each one emulated in tests/test_service.py.
HARDENING: tuple[tuple[str, str], ...] = (
    ("NoNewPrivileges", "yes"),
    ("CapabilityBoundingSet", ""),
    ("AmbientCapabilities", ""),
    ("ProtectSystem", "strict"),
    ("PrivateTmp", "yes"),
    ("ProtectProc", "invisible"),
    ("ProtectKernelModules", "yes"),
    ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6 AF_NETLINK"),
    ("RestrictSUIDSGID", "yes"),
    ("RestrictRealtime", "yes"),
    ("LockPersonality", "yes"),
    ("SystemCallArchitectures", "native"),
    ("RemoveIPC", "yes"),
)

#: Options left out on purpose, and why (written into the unit as comments).
OMITTED: tuple[tuple[str, str], ...] = (
    ("ProtectKernelTunables, ProtectKernelLogs, ProcSubset=pid",
     "bubblewrap cannot mount the sandbox's /proc under them"),
    ("ProtectHostname", "bubblewrap sets the sandbox's host name (sethostname is filtered)"),
    ("RestrictNamespaces", "bubblewrap needs user, mnt, pid, net, ipc, uts and cgroup namespaces"),
    ("RestrictAddressFamilies without AF_NETLINK", "bubblewrap sets up the sandbox's loopback over netlink"),
    ("PrivateDevices, DevicePolicy, ProtectClock", "they hide the GPUs (/dev/nvidia*) from the node and its jobs"),
    ("ProtectControlGroups", "the node writes its jobs' cgroups under its delegated cgroup"),
    ("MemoryDenyWriteExecute, SystemCallFilter", "jobs run arbitrary code (JIT compilers, CUDA)"),
    ("PrivateUsers", "not needed (the node has a user of its own); the sandbox's namespaces would nest in it, "
                     + "which was not measured"),
)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
# Characters a path may have in the unit: no whitespace, quotes, backslashes or
# '%' (a systemd specifier), nothing that could end a line.
_PATH = re.compile(r"/[A-Za-z0-9/._+@:-]{0,4094}")
_SYSTEM_DIRS = frozenset({"/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/run", "/sbin", "/sys",
                          "/tmp", "/usr", "/var", "/var/lib", "/home", "/root", "/opt", "/srv"})
_HOME_DIRS = ("/home/", "/root/", "/run/user/")


class ServiceError(Exception):
    """The service cannot be written or installed as asked; the message says what to do."""


@dataclass(frozen=True, kw_only=True)
class ServiceSpec:
    """What the unit says.  ``exec_argv`` starts ``p2pgpu`` (its absolute path,
    or the absolute path of a Python and ``-m p2pgpu.cli``)."""

    name: str = "p2pgpu"
    user: str = "p2pgpu"
    home: Path = Path("/var/lib/p2pgpu")
    exec_argv: tuple[str, ...] = ("/usr/local/bin/p2pgpu",)
    #: Where that installation really lives (links resolved): its Python, its
    #: prefix, the p2pgpu package.  Under /home or /root, ``ProtectHome`` is
    #: read-only instead of yes, or the service could not start.
    reads: tuple[str, ...] = ()
    #: Run ``nvidia-modprobe -u -c=0`` (as root) before the node starts, so that
    #: ``/dev/nvidia-uvm`` exists after a reboot (the node runs with
    #: NoNewPrivileges, so CUDA cannot make it on demand).
    nvidia_modprobe: str = ""

    def __post_init__(self) -> None:
        check_spec(self)

    @property
    def unit_name(self) -> str:
        return f"{self.name}.service"

    @property
    def state_directory(self) -> str | None:
        """``StateDirectory=`` when the home is directly under /var/lib."""
        parent, base = str(self.home.parent), self.home.name
        return base if parent == "/var/lib" else None


def check_spec(spec: ServiceSpec) -> None:
    if not _NAME.fullmatch(spec.name):
        raise ServiceError(f"service name {spec.name!r}: use letters, digits, '_', '.' and '-' (at most 64)")
    if not _USER.fullmatch(spec.user) or spec.user == "root":
        raise ServiceError(f"user {spec.user!r}: a dedicated system user, e.g. p2pgpu (never root)")
    home = str(spec.home)
    if not _PATH.fullmatch(home) or os.path.normpath(home) != home:
        raise ServiceError(f"--home {home!r}: an absolute, normalised path without spaces, quotes or '%'")
    if home in _SYSTEM_DIRS:
        raise ServiceError(f"--home {home}: a directory of its own, e.g. /var/lib/p2pgpu")
    if not spec.exec_argv:
        raise ServiceError("nothing to run")
    for arg in spec.exec_argv:
        if not (_PATH.fullmatch(arg) or re.fullmatch(r"-m|p2pgpu\.cli", arg)):
            raise ServiceError(f"{arg!r} cannot go into a unit file: install p2pgpu at a path without spaces, "
                               "quotes or '%' (e.g. python3 -m venv /opt/p2pgpu)")
    if any(not os.path.isabs(r) for r in spec.reads):
        raise ServiceError(f"paths the service reads must be absolute: {spec.reads}")
    if spec.nvidia_modprobe and not _PATH.fullmatch(spec.nvidia_modprobe):
        raise ServiceError(f"nvidia-modprobe path {spec.nvidia_modprobe!r} is not usable in a unit file")


def unit_text(spec: ServiceSpec) -> str:
    """The systemd unit for ``spec``."""
    home = str(spec.home)
    under_home = [p for p in (*spec.exec_argv, *spec.reads) if (p.rstrip("/") + "/").startswith(_HOME_DIRS)]
    protect_home = "read-only" if under_home else "yes"
    lines = [
        "# Written by `p2pgpu node install-service`; see docs/operating.md (running as a service).",
        "[Unit]",
        "Description=p2pgpu node: peer-to-peer GPU compute",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=exec",
        f"User={spec.user}",
        f"Group={spec.user}",
        f"Environment=P2PGPU_HOME={home}",
        "Environment=PYTHONUNBUFFERED=1",
    ]
    if spec.nvidia_modprobe:
        lines += ["# Make /dev/nvidia-uvm and the GPUs' device nodes after a reboot ('+': as root, '-': may fail).",
                  f"ExecStartPre=-+{spec.nvidia_modprobe} -u -c=0"]
    lines += [
        f"ExecStart={' '.join(spec.exec_argv)} node run --home {home} --log-format json",
        "# SIGHUP: the node reloads config.toml (docs/operating.md lists what applies live).",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "RestartSec=5s",
        "TimeoutStopSec=30s",
        "# The jobs' sandboxes are in the node's cgroup: stopping the node stops them.",
        "KillMode=control-group",
        "# The node makes a child cgroup per job for its memory limit.",
        "Delegate=yes",
    ]
    if spec.state_directory:
        lines += [f"StateDirectory={spec.state_directory}", "StateDirectoryMode=0700"]
    else:
        lines += [f"ReadWritePaths={home}"]
    lines += ["UMask=0077", "LimitNOFILE=65536", "",
              "# Hardening that bubblewrap tolerates (each one checked by tests/test_service.py).",
              f"ProtectHome={protect_home}"]
    lines += [f"{k}={v}" for k, v in HARDENING]
    lines += ["# Left out on purpose:"]
    lines += [f"#   {what}: {why}" for what, why in OMITTED]
    lines += ["", "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------- installing


@dataclass(frozen=True, kw_only=True)
class Machine:
    """What :func:`plan_install` needs to know about this machine."""

    is_root: bool
    user_exists: bool
    home_has_identity: bool
    home_owner: str | None  # user name owning the home, None when it does not exist
    unit_existing: str | None  # text of an existing unit file of that name, None when none
    #: Path components of the executable the service user cannot enter or read
    #: (empty: it can run it).
    exec_unreachable: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Plan:
    unit_path: Path
    unit: str
    create_user: bool
    init_home: bool
    chown_home: bool
    write_unit: bool
    next_steps: tuple[str, ...] = field(default_factory=tuple)

    def actions(self) -> list[str]:
        out = []
        if self.create_user:
            out.append("create the system user")
        if self.init_home:
            out.append("create the node home (identity, config.toml)")
        if self.chown_home:
            out.append("give the home to the service user")
        out.append(f"write {self.unit_path}" if self.write_unit else f"{self.unit_path} is already up to date")
        return out


def plan_install(spec: ServiceSpec, unit_dir: Path, machine: Machine, *, force: bool = False) -> Plan:
    """What installing ``spec`` takes on ``machine``; raises ServiceError, with
    the fix, where it cannot be done."""
    unit = unit_text(spec)
    if not machine.is_root:
        raise ServiceError("installing a service writes to the system's unit directory and creates a user: run "
                           "it as root (sudo p2pgpu node install-service ...), or add --print to see the unit")
    if machine.exec_unreachable:
        raise ServiceError(f"the {spec.user} user could not run this installation of p2pgpu "
                           f"({spec.exec_argv[0]}): {', '.join(machine.exec_unreachable)} is closed to it. "
                           "Install p2pgpu where every user can read it, e.g. python3 -m venv /opt/p2pgpu && "
                           "/opt/p2pgpu/bin/pip install p2pgpu, and run that copy's install-service")
    if machine.unit_existing is not None and machine.unit_existing != unit and not force:
        raise ServiceError(f"{unit_dir / spec.unit_name} exists and differs: add --force to replace it "
                           "(--print shows the new one)")
    return Plan(
        unit_path=unit_dir / spec.unit_name,
        unit=unit,
        create_user=not machine.user_exists,
        init_home=not machine.home_has_identity,
        chown_home=machine.home_owner != spec.user,
        write_unit=machine.unit_existing != unit,
        next_steps=(f"systemctl daemon-reload && systemctl enable --now {spec.name}",
                    f"journalctl -u {spec.name} -f -o cat      # its logs, one JSON object per line",
                    f"p2pgpu doctor --home {spec.home}          # check the machine",
                    f"systemctl reload {spec.name}              # after editing {spec.home}/config.toml"),
    )


def unreachable_parts(path: Path, uid: int, gids: Sequence[int],
                      stat_fn: Callable[[Path], os.stat_result] = os.stat) -> tuple[str, ...]:
    """Directories on the way to ``path`` that ``uid`` (in ``gids``) cannot
    enter, and ``path`` itself when it cannot read or run it."""
    bad = []
    parts = [*reversed(path.parents), path]
    for i, p in enumerate(parts):
        try:
            st = stat_fn(p)
        except OSError:
            bad.append(str(p))
            break
        need = (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)
        if i == len(parts) - 1:
            need = (stat.S_IXUSR | stat.S_IRUSR, stat.S_IXGRP | stat.S_IRGRP, stat.S_IXOTH | stat.S_IROTH)
        if uid == 0:
            continue
        mask = need[0] if st.st_uid == uid else need[1] if st.st_gid in gids else need[2]
        if st.st_mode & mask != mask:
            bad.append(str(p))
    return tuple(bad)


@dataclass(kw_only=True)
class Operations:
    """The side effects of installing, injected so tests can watch them."""

    run: Callable[[list[str]], None]
    init_home: Callable[[Path], None]
    chown_tree: Callable[[Path, str], None]
    write_file: Callable[[Path, str], None]


def install(spec: ServiceSpec, plan: Plan, ops: Operations) -> list[str]:
    """Carry out ``plan``; returns what was done, in order."""
    done = []
    if plan.create_user:
        ops.run(["useradd", "--system", "--user-group", "--home-dir", str(spec.home), "--no-create-home",
                 "--shell", "/usr/sbin/nologin", spec.user])
        done.append(f"created the system user {spec.user}")
    if plan.init_home:
        ops.init_home(spec.home)
        done.append(f"created the node home {spec.home}")
    if plan.chown_home or plan.init_home:
        ops.chown_tree(spec.home, spec.user)
        done.append(f"gave {spec.home} to {spec.user}")
    if plan.write_unit:
        ops.write_file(plan.unit_path, plan.unit)
        done.append(f"wrote {plan.unit_path}")
    return done


def write_unit_file(path: Path, text: str) -> None:
    """Atomically, mode 0644 (systemd reads units as any user)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def chown_tree(path: Path, user: str) -> None:
    """``chown -R user:user path`` without following links."""
    import pwd

    pw = pwd.getpwnam(user)
    os.chown(path, pw.pw_uid, pw.pw_gid, follow_symlinks=False)
    for root, dirs, files in os.walk(path):
        for n in dirs + files:
            os.chown(os.path.join(root, n), pw.pw_uid, pw.pw_gid, follow_symlinks=False)


__all__ = ["HARDENING", "OMITTED", "Machine", "Operations", "Plan", "ServiceError", "ServiceSpec", "chown_tree",
           "install", "plan_install", "unit_text", "unreachable_parts", "write_unit_file"]
