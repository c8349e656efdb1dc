"""Emulating systemd's hardening options without systemd, to run the real sandbox probe under them.

No systemd runs as PID 1 on the test machines, so ``tests/test_service.py``
reproduces what each option does to a service's processes, with the same
kernel mechanisms systemd uses (systemd.exec(5)):

- options that change the mount namespace (``ProtectSystem``,
  ``ProtectKernelTunables``...): the equivalent ``mount`` calls inside
  ``unshare -m``;
- options that install a seccomp filter (``ProtectHostname``,
  ``RestrictAddressFamilies``...): the equivalent filter, loaded with
  libseccomp through ctypes by :func:`exec_filtered` (this file runs as a
  script for that);
- ``User=``, ``NoNewPrivileges``, ``CapabilityBoundingSet=``: ``setpriv``.

Then the node's own probe (``p2pgpu.runtime.check_sandbox``, a real
bubblewrap sandbox) runs as an unprivileged user under them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

NOBODY = 65534


@dataclass(frozen=True)
class Emulation:
    """What one option does: mount commands (run as root in the new mount
    namespace), seccomp rules (``deny=SYSCALL`` or ``families=N,N``), setpriv
    flags."""

    mounts: tuple[str, ...] = ()
    seccomp: tuple[str, ...] = ()
    setpriv: tuple[str, ...] = ()


_HOMES = ("/home", "/root", "/run/user")
# AF_UNIX 1, AF_INET 2, AF_INET6 10, AF_NETLINK 16.
_FAMILIES = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16}


def emulation_of(option: str, value: str) -> Emulation | None:
    """The emulation of ``option=value``, or None for options that do not
    touch what a sandbox needs (``Restart=``, ``UMask=``...)."""
    table: dict[tuple[str, str], Emulation] = {
        ("NoNewPrivileges", "yes"): Emulation(setpriv=("--no-new-privs",)),
        ("CapabilityBoundingSet", ""): Emulation(setpriv=("--bounding-set=-all", "--inh-caps=-all")),
        ("AmbientCapabilities", ""): Emulation(setpriv=("--ambient-caps=-all",)),
        ("ProtectSystem", "strict"): Emulation(mounts=("mount -o remount,bind,ro /",)),
        ("PrivateTmp", "yes"): Emulation(mounts=("mount -t tmpfs tmpfs /tmp",)),
        ("ProtectHome", "yes"): Emulation(mounts=tuple(
            f"[ ! -d {d} ] || mount -t tmpfs -o mode=000 tmpfs {d}" for d in _HOMES)),
        ("ProtectHome", "read-only"): Emulation(mounts=tuple(
            f"[ ! -d {d} ] || {{ mount --bind {d} {d} && mount -o remount,bind,ro {d}; }}" for d in _HOMES)),
        ("ProtectProc", "invisible"): Emulation(mounts=("mount -t proc -o hidepid=invisible proc /proc",)),
        ("ProtectKernelModules", "yes"): Emulation(
            mounts=("mount -t tmpfs -o mode=000 tmpfs /usr/lib/modules || true",),
            seccomp=("deny=init_module", "deny=finit_module", "deny=delete_module")),
        ("RestrictSUIDSGID", "yes"): Emulation(),  # only chmod/mkdir with S_ISUID: nothing bubblewrap does
        ("RestrictRealtime", "yes"): Emulation(seccomp=("deny=sched_setscheduler",)),
        ("LockPersonality", "yes"): Emulation(),  # personality() changes: nothing bubblewrap does
        ("SystemCallArchitectures", "native"): Emulation(),
        ("RemoveIPC", "yes"): Emulation(),
        # Options the unit leaves out, to show why.
        ("ProtectKernelTunables", "yes"): Emulation(
            mounts=("mount --bind /proc/sys /proc/sys", "mount -o remount,bind,ro /proc/sys")),
        ("ProtectKernelLogs", "yes"): Emulation(mounts=("mount --bind /dev/null /proc/kmsg",)),
        ("ProcSubset", "pid"): Emulation(mounts=("mount -t proc -o subset=pid proc /proc",)),
        ("ProtectHostname", "yes"): Emulation(seccomp=("deny=sethostname", "deny=setdomainname")),
        ("RestrictNamespaces", "yes"): Emulation(seccomp=("deny=unshare",)),
    }
    if option == "RestrictAddressFamilies":
        fams = ",".join(str(_FAMILIES[f]) for f in value.split())
        return Emulation(seccomp=(f"families={fams}",))
    return table.get((option, value))


@dataclass
class Combined:
    mounts: list[str] = field(default_factory=list)
    seccomp: list[str] = field(default_factory=list)
    setpriv: list[str] = field(default_factory=list)

    def add(self, e: Emulation) -> None:
        self.mounts += e.mounts
        self.seccomp += e.seccomp
        self.setpriv += [f for f in e.setpriv if f not in self.setpriv]


def can_emulate() -> str | None:
    """Why these emulations cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (mount namespaces, setpriv to another user)"
    for tool in ("unshare", "setpriv", "bwrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if ctypes.util.find_library("seccomp") is None:
        return "libseccomp is not installed"
    return None


def probe_under(emulations: list[Emulation], *, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the node's real sandbox probe as an unprivileged user under the
    given emulations; stdout is ``check_sandbox()`` as JSON (``null``: it runs)."""
    c = Combined()
    for e in emulations:
        c.add(e)
    probe = [sys.executable, "-c", "import json; from p2pgpu.runtime import check_sandbox; print(json.dumps(check_sandbox()))"]
    as_user = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *c.setpriv, *probe]
    inner = [sys.executable, os.path.abspath(__file__), *c.seccomp, "--", *as_user] if c.seccomp else as_user
    script = "set -e; " + "; ".join(c.mounts + ['exec "$@"'])
    argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "emulation", *inner]
    env = {**os.environ, "TMPDIR": "/tmp"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=env, cwd="/", check=False)


# ------------------------------------------------------------------- seccomp

class _Cmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]


_ALLOW = 0x7FFF0000
_CMP_EQ = 4


def _errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


def exec_filtered(rules: list[str], argv: list[str]) -> None:
    """Load a seccomp filter (allow everything but ``rules``) and exec ``argv``."""
    lib = ctypes.CDLL(ctypes.util.find_library("seccomp"))
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_Cmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    ctx = lib.seccomp_init(_ALLOW)
    for rule in rules:
        kind, _, value = rule.partition("=")
        if kind == "deny":
            nr = lib.seccomp_syscall_resolve_name(value.encode())
            if lib.seccomp_rule_add_array(ctx, _errno_action(errno.EPERM), nr, 0, None) != 0:
                raise SystemExit(f"seccomp: cannot filter {value}")
        elif kind == "families":  # as systemd: socket() of any other family fails with EAFNOSUPPORT
            allowed = {int(x) for x in value.split(",")}
            nr = lib.seccomp_syscall_resolve_name(b"socket")
            for fam in range(46):
                if fam not in allowed:
                    cmp = (_Cmp * 1)(_Cmp(0, _CMP_EQ, fam, 0))
                    if lib.seccomp_rule_add_array(ctx, _errno_action(errno.EAFNOSUPPORT), nr, 1, cmp) != 0:
                        raise SystemExit("seccomp: cannot filter socket families")
        else:
            raise SystemExit(f"unknown rule {rule!r}")
    if lib.seccomp_load(ctx) != 0:
        raise SystemExit("seccomp_load failed")
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    sep = sys.argv.index("--")
    exec_filtered(sys.argv[1:sep], sys.argv[sep + 1:])
