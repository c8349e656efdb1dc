"""``p2pgpu doctor``: every prerequisite of a working node, checked, each with its fix.

Node operators lose their first day to drivers, missing device nodes,
sandboxes that cannot start, clocks that drift and ports nobody can reach.
Each check here is a small function over injected sources (a directory of
device nodes, an NVML-shaped object, the text of ``/proc`` files, a disk-usage
function, a clock sample, a bind function, the daemon's status), returning a
:class:`Check`: ``pass``, ``warn``, ``fail``, or ``unknown`` (it could not be
checked from here, e.g. the clock offline), a one-line summary, the fix, and
details.  :func:`run_checks` gathers the sources from this machine and a node
home; tests hand each check sources that make it fail.  ``--json`` keys are
documented in docs/cli.md.
"""

from __future__ import annotations

import errno
import http.client
import ipaddress
import json
import os
import re
import shutil
import socket
import stat
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

STATUSES = ("pass", "warn", "fail", "unknown")
disk_free_bytes_fail = 1 << 30  # under 1 GiB: jobs' work directories and the store cannot grow
disk_free_bytes_warn = 10 << 30
clock_offset_ms_warn = 1_000  # proofs are checked against the payer's clock with a 5 s tolerance
clock_offset_ms_fail = 5_000
http_timeout_s = 5.0

# NVML error codes (nvml.h) that have a fix of their own.
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18


@dataclass(frozen=True, kw_only=True)
class Check:
    name: str
    status: str
    summary: str
    fix: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "summary": self.summary, "fix": self.fix,
                "details": self.details}


def install_command(package: str, which: Callable[[str], str | None] = shutil.which,
                    is_root: bool | None = None) -> str:
    """The one command that installs a distribution package here."""
    root = os.geteuid() == 0 if is_root is None else is_root
    sudo = "" if root else "sudo "
    for tool, cmd in (("apt-get", f"apt-get install -y {package}"), ("dnf", f"dnf install -y {package}"),
                      ("yum", f"yum install -y {package}"), ("pacman", f"pacman -S --noconfirm {package}"),
                      ("zypper", f"zypper install -y {package}"), ("apk", f"apk add {package}")):
        if which(tool):
            return sudo + cmd
    return f"install the '{package}' package of your distribution"


# ------------------------------------------------------------------ GPUs


@dataclass(frozen=True, kw_only=True)
class NvmlSnapshot:
    """What NVML said, once: the driver and each GPU's index, name and minor number."""

    ok: bool
    error: str = ""
    error_code: int | None = None
    driver_version: str = ""
    cuda_version: str = ""
    gpus: tuple[tuple[int, str, int | None], ...] = ()


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def nvml_snapshot(nvml: Any = None) -> NvmlSnapshot:
    """Ask NVML (the ``pynvml`` module, or an NVML-shaped object); never raises."""
    if nvml is None:
        try:
            import pynvml
        except ImportError as exc:
            return NvmlSnapshot(ok=False, error=f"pynvml is not installed ({exc})")
        nvml = pynvml
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return NvmlSnapshot(ok=False, error=_text(exc), error_code=getattr(exc, "value", None))
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        raw = int(nvml.nvmlSystemGetCudaDriverVersion())
        gpus = []
        for i in range(int(nvml.nvmlDeviceGetCount())):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            try:
                minor: int | None = int(nvml.nvmlDeviceGetMinorNumber(h))
            except nvml.NVMLError:
                minor = None
            gpus.append((i, _text(nvml.nvmlDeviceGetName(h)), minor))
        return NvmlSnapshot(ok=True, driver_version=driver, cuda_version=f"{raw // 1000}.{(raw % 1000) // 10}",
                            gpus=tuple(gpus))
    except nvml.NVMLError as exc:
        return NvmlSnapshot(ok=False, error=_text(exc), error_code=getattr(exc, "value", None))
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass  # shutting down a half-initialised NVML: nothing left to release


def check_nvml(snap: NvmlSnapshot) -> Check:
    """The NVIDIA driver and NVML: the node's only source of truth about its GPUs."""
    if snap.ok and snap.gpus:
        names = sorted({name for _, name, _ in snap.gpus})
        return Check(name="nvml", status="pass",
                     summary=f"driver {snap.driver_version} (CUDA {snap.cuda_version}): {len(snap.gpus)} GPU(s), "
                             + ", ".join(names),
                     details={"driver_version": snap.driver_version, "cuda_version": snap.cuda_version,
                              "gpus": [{"index": i, "model": n, "minor": m} for i, n, m in snap.gpus]})
    if snap.ok:
        return Check(name="nvml", status="fail", summary=f"NVML works (driver {snap.driver_version}) but sees no GPU",
                     fix="check that the GPUs are seated and powered (lspci | grep -i nvidia), and dmesg for Xid "
                         "errors", details={"driver_version": snap.driver_version, "gpus": []})
    fixes = {
        NVML_ERROR_LIBRARY_NOT_FOUND: "install the NVIDIA driver (Debian: apt-get install nvidia-driver; Ubuntu: "
                                      "ubuntu-drivers install), reboot, and check that nvidia-smi lists the GPUs",
        NVML_ERROR_DRIVER_NOT_LOADED: "the driver's kernel module is not loaded: modprobe nvidia (or reboot), "
                                      "then check dmesg | grep -i nvidia",
        NVML_ERROR_LIB_RM_VERSION_MISMATCH: "the driver was upgraded but the old kernel module is still loaded: "
                                            "reboot",
        NVML_ERROR_NO_PERMISSION: "this user cannot open /dev/nvidia*: add it to the group that owns them",
        NVML_ERROR_GPU_IS_LOST: "a GPU fell off the bus: check dmesg for Xid 79, reseat or power-cycle it",
    }
    fix = fixes.get(snap.error_code or -1, "")
    if not fix and "pynvml" in snap.error:
        fix = "pip install nvidia-ml-py (in p2pgpu's environment)"
    return Check(name="nvml", status="fail", summary=f"no GPUs: NVML unavailable ({snap.error})",
                 fix=fix or "install or repair the NVIDIA driver; nvidia-smi must list the GPUs",
                 details={"error": snap.error, "error_code": snap.error_code})


def _nvidia_nodes(dev_dir: Path) -> dict[str, Path]:
    try:
        entries = sorted(dev_dir.iterdir())
    except OSError:
        return {}
    return {p.name: p for p in entries if re.fullmatch(r"nvidia(\d+|ctl|-uvm|-uvm-tools)", p.name)}


def check_gpu_devices(snap: NvmlSnapshot, dev_dir: Path,
                      access: Callable[[Path], bool] = lambda p: os.access(p, os.R_OK | os.W_OK)) -> Check:
    """The GPUs NVML sees against the device nodes jobs are given (``/dev/nvidia*``)."""
    nodes = _nvidia_nodes(dev_dir)
    minors_present = sorted(int(n[6:]) for n in nodes if n[6:].isdigit())
    details: dict[str, Any] = {"device_nodes": sorted(nodes)}
    if not snap.ok:
        if not nodes:
            return Check(name="gpu_devices", status="fail",
                         summary=f"no NVIDIA device nodes in {dev_dir}: the driver is not loaded",
                         fix="install the NVIDIA driver (see the nvml check), then reboot", details=details)
        return Check(name="gpu_devices", status="fail",
                     summary=f"{len(minors_present)} GPU device node(s) in {dev_dir} but NVML fails ({snap.error})",
                     fix="see the nvml check; a driver/library mismatch after an upgrade needs a reboot",
                     details=details)
    wanted = [m if m is not None else i for i, _, m in snap.gpus]
    missing = [f"nvidia{m}" for m in wanted if f"nvidia{m}" not in nodes]
    if snap.gpus and "nvidiactl" not in nodes:
        missing.append("nvidiactl")
    if snap.gpus and "nvidia-uvm" not in nodes:
        missing.append("nvidia-uvm")
    details["missing"] = missing
    if missing:
        return Check(name="gpu_devices", status="fail",
                     summary=f"NVML sees {len(snap.gpus)} GPU(s) but {', '.join(missing)} missing from {dev_dir}",
                     fix="nvidia-modprobe -u -c=0 (as root; the service's ExecStartPre does it at every start), "
                         "or load the modules at boot: echo nvidia-uvm > /etc/modules-load.d/nvidia-uvm.conf",
                     details=details)
    closed = [n for n in sorted(nodes) if not access(nodes[n])]
    details["not_accessible"] = closed
    if closed:
        return Check(name="gpu_devices", status="fail", summary=f"this user cannot open {', '.join(closed)}",
                     fix="add the node's user to the group that owns them (ls -l /dev/nvidia*), e.g. usermod -aG "
                         "video p2pgpu", details=details)
    extra = [m for m in minors_present if m not in wanted]
    details["extra_nodes"] = [f"nvidia{m}" for m in extra]
    if extra:
        return Check(name="gpu_devices", status="warn",
                     summary=f"device nodes for {len(minors_present)} GPUs but NVML sees {len(snap.gpus)}: "
                             f"nvidia{', nvidia'.join(map(str, extra))} has no GPU behind it",
                     fix="a GPU vanished (fell off the bus, or a reset failed): dmesg | grep -i xid; nvidia-smi -q; "
                         "a reboot or a power cycle usually brings it back", details=details)
    return Check(name="gpu_devices", status="pass",
                 summary=f"{len(wanted)} GPU(s), each with its device node, plus nvidiactl and nvidia-uvm",
                 details=details)


# --------------------------------------------------------------- sandbox


def check_bubblewrap(which: Callable[[str], str | None] = shutil.which,
                     stat_fn: Callable[[str], os.stat_result] = os.stat,
                     installer: Callable[[str], str] = install_command) -> Check:
    """bubblewrap is installed (every job runs in it)."""
    path = which("bwrap")
    if path is None:
        return Check(name="bubblewrap", status="fail", summary="bubblewrap (bwrap) is not installed",
                     fix=installer("bubblewrap"), details={"path": None})
    details: dict[str, Any] = {"path": path}
    st = stat_fn(path)
    if st.st_mode & stat.S_ISUID:
        details["setuid"] = True
        return Check(name="bubblewrap", status="warn", summary=f"{path} is setuid root",
                     fix="a setuid bwrap does not work under the service's NoNewPrivileges=yes: use the "
                         "distribution's non-setuid bubblewrap with unprivileged user namespaces", details=details)
    return Check(name="bubblewrap", status="pass", summary=f"{path}", details=details)


def check_user_namespaces(proc_sys: Path, is_root: bool) -> Check:
    """Unprivileged user namespaces: bubblewrap needs them when the node is not
    root (as the service's dedicated user)."""
    def read(rel: str) -> int | None:
        try:
            return int((proc_sys / rel).read_text().strip())
        except (OSError, ValueError):
            return None

    max_ns = read("user/max_user_namespaces")
    clone = read("kernel/unprivileged_userns_clone")  # Debian's older kernels
    apparmor = read("kernel/apparmor_restrict_unprivileged_userns")  # Ubuntu 23.10+
    details = {"max_user_namespaces": max_ns, "unprivileged_userns_clone": clone,
               "apparmor_restrict_unprivileged_userns": apparmor}
    problem, fix = "", ""
    if max_ns == 0:
        problem, fix = "user.max_user_namespaces is 0", ("sysctl -w user.max_user_namespaces=15000 (and in "
                                                         "/etc/sysctl.d/ to keep it)")
    elif clone == 0:
        problem, fix = "kernel.unprivileged_userns_clone is 0", ("sysctl -w kernel.unprivileged_userns_clone=1 "
                                                                "(and in /etc/sysctl.d/ to keep it)")
    elif apparmor == 1:
        problem = "AppArmor restricts unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_userns=1)"
        fix = ("give bwrap an AppArmor profile that allows them (Ubuntu ships one: cp /usr/share/apparmor/"
               "extra-profiles/bwrap-userns-restrict /etc/apparmor.d/ && apparmor_parser -r "
               "/etc/apparmor.d/bwrap-userns-restrict), or sysctl -w kernel.apparmor_restrict_unprivileged_userns=0")
    if not problem:
        return Check(name="user_namespaces", status="pass", summary="unprivileged user namespaces are allowed",
                     details=details)
    if is_root:
        return Check(name="user_namespaces", status="warn",
                     summary=f"{problem}: root can sandbox jobs, a dedicated service user cannot", fix=fix,
                     details=details)
    return Check(name="user_namespaces", status="fail", summary=f"{problem}: bubblewrap cannot sandbox jobs",
                 fix=fix, details=details)


def check_sandbox_probe(probe: Callable[[], str | None], bubblewrap: Check | None = None) -> Check:
    """A real probe sandbox (the one the node runs at start): jobs run only if it does."""
    reason = probe()
    if reason is None:
        return Check(name="sandbox", status="pass", summary="a probe job ran in a bubblewrap sandbox")
    fix = "see the bubblewrap check" if bubblewrap is not None and bubblewrap.status == "fail" else \
        "see the user_namespaces check; bubblewrap's own message is in the summary"
    return Check(name="sandbox", status="fail", summary=f"jobs cannot run here: {reason}", fix=fix,
                 details={"reason": reason})


def devnet_prerequisites(*, which: Callable[[str], str | None] = shutil.which,
                         probe: Callable[[], str | None] | None = None,
                         installer: Callable[[str], str] = install_command,
                         proc_sys: Path = Path("/proc/sys")) -> list[Check]:
    """What ``devnet up`` needs before it starts anything, as the failing
    checks (empty: go): bubblewrap, and a probe sandbox that runs as this user.
    The rest of a devnet is Python and loopback."""
    bw = check_bubblewrap(which=which, installer=installer)
    if bw.status == "fail":
        return [bw]
    if probe is None:
        from p2pgpu.runtime import check_sandbox

        probe = check_sandbox
    sandbox = check_sandbox_probe(probe, bw)
    if sandbox.status != "fail":
        return []
    userns = check_user_namespaces(proc_sys, os.geteuid() == 0)
    if userns.status != "pass":
        return [Check(name="sandbox", status="fail", summary=sandbox.summary, fix=userns.fix,
                      details=sandbox.details)]
    return [sandbox]


def cgroup_layout(mountinfo: str, proc_cgroup: str) -> dict[str, Any]:
    """The cgroup version (``v2``, ``hybrid``, ``v1`` or ``none``) and our own path in it."""
    v2 = v1 = False
    for line in mountinfo.splitlines():
        _, _, right = line.partition(" - ")
        fstype = right.split(" ", 1)[0] if right else ""
        v2 |= fstype == "cgroup2"
        v1 |= fstype == "cgroup"
    version = "hybrid" if v1 and v2 else "v2" if v2 else "v1" if v1 else "none"
    own = next((ln.split(":", 2)[2] for ln in proc_cgroup.splitlines() if ln.startswith("0::")), None)
    return {"version": version, "own_cgroup": own}


def check_cgroups(layout: dict[str, Any], backend: str) -> Check:
    """What bounds a job's memory here: a delegated cgroup v2 is exact."""
    details = {**layout, "memory_backend": backend}
    if backend == "cgroup2":
        return Check(name="cgroups", status="pass",
                     summary="job memory limits: cgroup v2, delegated (exact limits, OOM kills counted)",
                     details=details)
    fix = ("run the node as the systemd service (p2pgpu node install-service: Delegate=yes gives it a cgroup v2 "
           "subtree), on a host with the unified cgroup v2 hierarchy (systemd.unified_cgroup_hierarchy=1)")
    if backend == "cgroup1":
        return Check(name="cgroups", status="warn",
                     summary=f"job memory limits: cgroup v1 (works; cgroup {layout['version']} here)", fix=fix,
                     details=details)
    return Check(name="cgroups", status="warn",
                 summary="job memory limits fall back to an rlimit watchdog (less exact): the node cannot create "
                         "cgroups", fix=fix, details=details)


# -------------------------------------------------------------- the host


def check_disk(paths: dict[str, Path], usage: Callable[[Path], Any] = shutil.disk_usage) -> Check:
    """Free space where the home (state, jobs' work directories) and the content store live."""
    rows: list[dict[str, Any]] = []
    worst = "pass"
    for label, path in paths.items():
        p = path
        while not p.exists() and p != p.parent:
            p = p.parent  # not made yet: the filesystem it will be on
        u = usage(p)
        rows.append({"what": label, "path": str(path), "free_bytes": int(u.free), "total_bytes": int(u.total)})
        level = "fail" if u.free < disk_free_bytes_fail else "warn" if u.free < disk_free_bytes_warn else "pass"
        worst = max(worst, level, key=["pass", "warn", "fail"].index)
    text = ", ".join(f"{r['what']} {r['free_bytes'] / 2**30:.1f} GiB free" for r in rows)
    fix = "" if worst == "pass" else (f"free some space, or move the home to a larger disk (under "
                                      f"{disk_free_bytes_fail >> 30} GiB jobs fail; under "
                                      f"{disk_free_bytes_warn >> 30} GiB large outputs will)")
    return Check(name="disk", status=worst, summary=text, fix=fix, details={"paths": rows})


@dataclass(frozen=True, kw_only=True)
class ClockSample:
    """Our clock against a reference: ``offset_ms`` = reference - ours, at the
    middle of the round trip, good to ``uncertainty_ms``."""

    offset_ms: int
    uncertainty_ms: int
    source: str


def check_clock(sample: ClockSample | None, why_unknown: str = "") -> Check:
    if sample is None:
        return Check(name="clock", status="unknown", summary=f"clock offset unknown: {why_unknown}",
                     details={"offset_ms": None})
    details = {"offset_ms": sample.offset_ms, "uncertainty_ms": sample.uncertainty_ms, "source": sample.source}
    off = abs(sample.offset_ms) - sample.uncertainty_ms  # the least it can be
    text = f"{sample.offset_ms:+d} ms (± {sample.uncertainty_ms} ms) against {sample.source}"
    fix = "turn on time sync: timedatectl set-ntp true (systemd-timesyncd), or install chrony"
    if off >= clock_offset_ms_fail:
        return Check(name="clock", status="fail", summary=f"clock is off by {text}: proofs will be refused",
                     fix=fix, details=details)
    if off >= clock_offset_ms_warn:
        return Check(name="clock", status="warn", summary=f"clock is off by {text}", fix=fix, details=details)
    return Check(name="clock", status="pass", summary=f"clock offset {text}", details=details)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def clock_sample(url: str, now_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
                 post: Callable[..., tuple[dict[str, Any], str]] | None = None) -> tuple[ClockSample | None, str]:
    """Our clock against a JSON-RPC ledger's: its HTTP ``Date`` header (the
    server's clock, 1 s resolution), else the time of its latest block."""
    host = urllib.parse.urlparse(url).hostname or ""
    if _is_loopback(host):
        return None, "the only reference is a ledger on this very machine"
    post = post or _post
    try:
        t0 = now_ms()
        doc, date = post(url, "getSlot", [])
        t1 = now_ms()
        mid, rtt = (t0 + t1) // 2, t1 - t0
        if date:
            ref = int(parsedate_to_datetime(date).timestamp() * 1000) + 500  # the middle of that second
            return ClockSample(offset_ms=ref - mid, uncertainty_ms=500 + rtt // 2, source=f"{host} (HTTP Date)"), ""
        block, _ = post(url, "getBlockTime", [int(doc["result"])])
        if isinstance(block.get("result"), int):
            ref = block["result"] * 1000 + 500
            return ClockSample(offset_ms=ref - mid, uncertainty_ms=1500 + rtt // 2,
                               source=f"{host} (latest block time)"), ""
        return None, f"{host} gave no time"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"no reference reachable ({host}: {exc})"


def _post(url: str, method: str, params: list[Any]) -> tuple[dict[str, Any], str]:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=http_timeout_s) as resp:
            raw = resp.read(1 << 20)
            return json.loads(raw), resp.headers.get("Date", "")
    except http.client.HTTPException as exc:  # a broken answer (cut short, bad status line): not an OSError
        raise OSError(f"bad HTTP answer: {exc!r}") from None
    except RecursionError:  # [[[[... : json gives up by recursion, not with a ValueError
        raise ValueError("the answer is not JSON (nested too deeply)") from None


def parse_listen(addr: str) -> tuple[str, int] | None:
    """(host, port) of a ``/ip4/H/tcp/P`` or ``/ip6/H/tcp/P`` multiaddr."""
    m = re.fullmatch(r"/ip[46]/([^/]+)/tcp/(\d{1,5})(/.*)?", addr)
    return (m.group(1), int(m.group(2))) if m else None


def bind_error(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on, or None."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            return "in use by another program" if exc.errno == errno.EADDRINUSE else str(exc.strerror or exc)
    return None


def check_ports(listen: list[str], control_port: int, daemon: dict[str, Any] | None,
                bind: Callable[[str, int], str | None] = bind_error) -> Check:
    """The listen addresses and the control port can be taken (or the daemon holds them)."""
    if daemon is not None:
        return Check(name="ports", status="pass",
                     summary=f"the daemon listens on {', '.join(daemon.get('addrs', [])[:3]) or '?'} and "
                             f"127.0.0.1:{daemon.get('control_port')}", details={"daemon": True})
    wanted = [(a, parse_listen(a)) for a in listen]
    bad = [a for a, hp in wanted if hp is None]
    if bad:
        return Check(name="ports", status="fail", summary=f"not a TCP listen address: {', '.join(bad)}",
                     fix="use /ip4/0.0.0.0/tcp/4001 (or /ip6/::/tcp/4001) in config.toml listen",
                     details={"listen": listen})
    targets = [(a, h, p) for a, (h, p) in ((a, hp) for a, hp in wanted if hp) if p]
    if control_port:
        targets.append((f"control port {control_port}", "127.0.0.1", control_port))
    taken = [(a, err) for a, h, p in targets if (err := bind(h, p))]
    details = {"listen": listen, "control_port": control_port, "unavailable": [a for a, _ in taken]}
    if taken:
        return Check(name="ports", status="fail", summary="; ".join(f"{a}: {e}" for a, e in taken),
                     fix="find the program with ss -ltnp, stop it, or pick another port in config.toml",
                     details=details)
    free = ", ".join(a for a, _, _ in targets) or "none fixed (port 0 picks a free one)"
    return Check(name="ports", status="pass", summary=f"free: {free}", details=details)


def check_reachability(daemon: dict[str, Any] | None, network: str, listen: list[str]) -> Check:
    """Whether other nodes can reach this one, from the running daemon's view."""
    hosts = [hp[0] for a in listen if (hp := parse_listen(a))]
    local_only = bool(hosts) and all(_is_loopback(h) for h in hosts)
    if network != "local" and local_only:
        return Check(name="reachability", status="fail",
                     summary=f"listening on loopback only: no machine but this one can reach you on {network}",
                     fix='listen = ["/ip4/0.0.0.0/tcp/4001"] in config.toml, and open TCP 4001 in the firewall',
                     details={"listen": listen})
    if daemon is None:
        return Check(name="reachability", status="unknown",
                     summary="no daemon runs for this home: start it (p2pgpu node run) and run doctor again",
                     details={"listen": listen})
    peers = int(daemon.get("peers", 0))
    details = {"peers": peers, "addrs": daemon.get("addrs", [])}
    if peers == 0:
        return Check(name="reachability", status="warn", summary="the daemon has no peer",
                     fix="pass --bootstrap /ip4/.../tcp/.../p2p/PEER_ID (another node's status addrs), and check "
                         "that its port is open", details=details)
    return Check(name="reachability", status="pass", summary=f"{peers} peer(s) connected", details=details)


# ------------------------------------------------------------- payments


def check_ledger(spec: str, health: Callable[[], str | None]) -> Check:
    """The ledger payouts settle on answers."""
    if spec == "embedded":
        return Check(name="ledger", status="pass",
                     summary="embedded ledger in the home (only this node sees it: fine alone, not for a network)",
                     details={"ledger": spec})
    err = health()
    if err is None:
        return Check(name="ledger", status="pass", summary=f"{spec} answers", details={"ledger": spec})
    local = _is_loopback(urllib.parse.urlparse(spec).hostname or "")
    return Check(name="ledger", status="fail", summary=f"ledger {spec} unreachable: {err}",
                 fix="start it: p2pgpu ledger serve" if local else "check the ledger URL in config.toml and the "
                                                                    "network", details={"ledger": spec})


def check_wallet(address: str, balance: int | None, error: str, payout_address: str) -> Check:
    """The payer holds something (it pays for the jobs this node submits), and
    payouts go to the operator's own wallet."""
    details = {"address": address, "balance": balance, "payout_address": payout_address or address}
    if balance is None:
        return Check(name="wallet", status="unknown", summary=f"balance of {address} unknown: {error}",
                     details=details)
    notes = [] if payout_address else [("payouts go to this home's payer.json: set payout_address to your own "
                                       "wallet in config.toml")]
    if balance == 0:
        return Check(name="wallet", status="warn",
                     summary=f"payer {address} holds nothing: this node can work but not submit jobs",
                     fix="; ".join(["fund it (p2pgpu wallet --airdrop LAMPORTS on local ledgers)", *notes]),
                     details=details)
    return Check(name="wallet", status="warn" if notes else "pass",
                 summary=f"payer {address} holds {balance} lamports", fix="; ".join(notes), details=details)


def check_home(path: Path, identity_mode: int | None, config_error: str) -> Check:
    if identity_mode is None:
        return Check(name="home", status="fail", summary=f"no node home at {path}",
                     fix=f"p2pgpu init --home {path}", details={"home": str(path)})
    if identity_mode & 0o077:
        return Check(name="home", status="fail", summary=f"identity.key has mode {identity_mode:o}",
                     fix=f"chmod 600 {path / 'identity.key'}", details={"home": str(path)})
    if config_error:
        return Check(name="home", status="fail", summary=config_error, fix=f"edit {path / 'config.toml'}",
                     details={"home": str(path)})
    return Check(name="home", status="pass", summary=f"{path}: identity (0600) and config.toml load",
                 details={"home": str(path)})


# -------------------------------------------------------- this machine


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def daemon_status(home: Any) -> dict[str, Any] | None:
    """The running daemon's status, or None when none answers."""
    if not home.control_path.exists():
        return None
    from p2pgpu.node import ControlError, DaemonUnavailable, call

    try:
        port = int(json.loads(home.control_path.read_text())["port"])
        doc: dict[str, Any] = call(port, home.token(), "status", timeout_s=5.0)
        return doc
    except (DaemonUnavailable, ControlError, OSError, ValueError, KeyError):
        return None


def _wallet(home: Any, config: Any, spec: str) -> Check:
    from p2pgpu.solana import load_or_create_keypair, payer_keypair_path

    path = payer_keypair_path(home.path, config.extra)
    if not Path(path).exists():
        return Check(name="wallet", status="unknown", summary=f"no payer keypair yet ({path} is made on first use)",
                     details={"address": None, "balance": None})
    address = str(load_or_create_keypair(path).pubkey())
    if spec == "embedded":
        import trio

        from p2pgpu.solana import LedgerLocked, open_ledger

        async def read() -> int:
            try:
                ledger = open_ledger("embedded", home_path=home.path)
            except LedgerLocked:
                ledger = open_ledger("embedded", home_path=home.path, readonly=True)
            try:
                (bal,) = await ledger.balances([load_or_create_keypair(path).pubkey()])
                return int(bal)
            finally:
                await ledger.aclose()

        try:
            return check_wallet(address, trio.run(read), "", config.payout_address)
        except (OSError, ValueError) as exc:
            return check_wallet(address, None, str(exc), config.payout_address)
    try:
        doc, _ = _post(spec, "getBalance", [address])
        return check_wallet(address, int(doc["result"]["value"]), "", config.payout_address)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return check_wallet(address, None, f"the ledger did not answer ({exc})", config.payout_address)


def run_checks(home: Any, *, nvml: Any = None, dev_dir: Path = Path("/dev"), proc_sys: Path = Path("/proc/sys"),
               probe: Callable[[], str | None] | None = None) -> list[Check]:
    """Every check, on this machine, for the node home ``home`` (a ``p2pgpu.home.Home``)."""
    from p2pgpu.home import HomeError, load_networks
    from p2pgpu.runtime import SandboxPolicy, SandboxUnavailable, check_sandbox, sandbox_memory_backend

    checks: list[Check] = []
    snap = nvml_snapshot(nvml)
    checks += [check_nvml(snap), check_gpu_devices(snap, dev_dir)]
    is_root = os.geteuid() == 0
    config, config_error = None, ""
    try:
        config = home.config() if home.exists() else None
    except HomeError as exc:
        config_error = str(exc)
    policy = SandboxPolicy(allow_network=bool(config and config.allow_job_network))
    bw = check_bubblewrap()
    checks += [bw, check_user_namespaces(proc_sys, is_root),
               check_sandbox_probe(probe or (lambda: check_sandbox(policy)), bw)]
    try:
        backend = sandbox_memory_backend(policy)
    except SandboxUnavailable:
        backend = "rlimit"
    checks.append(check_cgroups(cgroup_layout(_read("/proc/self/mountinfo"), _read("/proc/self/cgroup")),
                                backend.split(" ")[0]))
    checks.append(check_disk({"home": home.path, "content store": home.path / "store"}))
    mode = stat.S_IMODE(home.identity_path.stat().st_mode) if home.identity_path.exists() else None
    checks.append(check_home(home.path, mode, config_error))
    if config is None:
        why = "no usable config.toml"
        checks += [check_clock(None, why), Check(name="ports", status="unknown", summary=why),
                   Check(name="reachability", status="unknown", summary=why),
                   Check(name="ledger", status="unknown", summary=why),
                   Check(name="wallet", status="unknown", summary=why)]
        return checks
    nets = load_networks()
    net = nets.get(config.network)
    spec = str(config.extra.get("ledger") or (net.ledger if net else "embedded"))
    daemon = daemon_status(home)
    if spec.startswith(("http://", "https://")):
        sample, why = clock_sample(spec)
    else:
        sample, why = None, "the ledger is embedded and no other reference is configured (offline)"
    checks.append(check_clock(sample, why))
    checks += [check_ports(config.listen, config.control_port, daemon),
               check_reachability(daemon, config.network, config.listen)]

    def health() -> str | None:
        try:
            doc, _ = _post(spec, "getHealth", [])
        except (OSError, ValueError) as exc:
            return str(getattr(exc, "reason", exc))
        return None if doc.get("result") == "ok" else f"getHealth answered {doc.get('error') or doc.get('result')}"

    ledger = check_ledger(spec, health)
    checks.append(ledger)
    if ledger.status == "fail":
        checks.append(Check(name="wallet", status="unknown", summary="the ledger is unreachable"))
    else:
        checks.append(_wallet(home, config, spec))
    return checks


def report(checks: list[Check], home: Path) -> dict[str, Any]:
    counts = {s: sum(1 for c in checks if c.status == s) for s in STATUSES}
    return {"ok": counts["fail"] == 0, "home": str(home), "counts": counts,
            "checks": [c.to_json() for c in checks]}


__all__ = ["STATUSES", "Check", "ClockSample", "NvmlSnapshot", "bind_error", "cgroup_layout", "check_bubblewrap",
           "check_cgroups", "check_clock", "check_disk", "check_gpu_devices", "check_home", "check_ledger",
           "check_nvml", "check_ports", "check_reachability", "check_sandbox_probe", "check_user_namespaces",
           "check_wallet", "clock_sample", "daemon_status", "devnet_prerequisites", "install_command", "nvml_snapshot", "parse_listen",
           "report", "run_checks"]
