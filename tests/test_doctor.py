"""``p2pgpu doctor``: each check made to pass and to fail from injected sources, then the real command.

The checks are functions over what they read (an NVML-shaped object, a
directory of device nodes, ``/proc/sys`` files, a disk-usage function, a
clock sample, a bind function, the daemon's status), so each is driven to its
every verdict here.  The last tests run ``p2pgpu doctor --json`` on this
machine (no GPU: the NVML check fails and says why; bubblewrap passes) and
against a real ledger server.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar, Self

import pytest

from p2pgpu.doctor import (
    STATUSES,
    Check,
    ClockSample,
    bind_error,
    cgroup_layout,
    check_bubblewrap,
    check_cgroups,
    check_clock,
    check_disk,
    check_gpu_devices,
    check_home,
    check_ledger,
    check_nvml,
    check_ports,
    check_reachability,
    check_sandbox_probe,
    check_user_namespaces,
    check_wallet,
    clock_sample,
    install_command,
    nvml_snapshot,
    parse_listen,
)
from p2pgpu.home import Home

GiB = 1 << 30


class FakeNvml:
    """An NVML-shaped object: ``init_error`` fails nvmlInit with that NVML code;
    ``query_error`` fails the device queries."""

    class NVMLError(Exception):
        MESSAGES: ClassVar[dict[int, str]] = {
            12: "NVML Shared Library Not Found", 9: "Driver Not Loaded", 4: "Insufficient Permissions",
            18: "RM has detected an NVML/RM version mismatch", 15: "GPU is lost"}

        def __init__(self, value: int) -> None:
            self.value = value
            super().__init__(self.MESSAGES.get(value, f"NVML error {value}"))

    def __init__(self, gpus: list[tuple[str, int]] = (), init_error: int | None = None,  # type: ignore[assignment]
                 query_error: int | None = None) -> None:
        self.gpus, self.init_error, self.query_error = list(gpus), init_error, query_error
        self.shutdown = False

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.NVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        self.shutdown = True

    def nvmlSystemGetDriverVersion(self) -> bytes:
        return b"550.54.15"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 12040

    def nvmlDeviceGetCount(self) -> int:
        if self.query_error is not None:
            raise self.NVMLError(self.query_error)
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> str:
        return self.gpus[h][0]

    def nvmlDeviceGetMinorNumber(self, h: int) -> int:
        return self.gpus[h][1]


H100 = "NVIDIA H100 80GB HBM3"


def statuses(*checks: Check) -> list[str]:
    return [c.status for c in checks]


# ------------------------------------------------------------------ NVML


def test_nvml_passes_with_gpus_and_shuts_nvml_down() -> None:
    nvml = FakeNvml([(H100, 0), (H100, 1)])
    c = check_nvml(nvml_snapshot(nvml))
    assert c.status == "pass" and "2 GPU(s)" in c.summary and "550.54.15" in c.summary and "CUDA 12.4" in c.summary
    assert nvml.shutdown


@pytest.mark.parametrize(("code", "fix"), [
    (12, "install the NVIDIA driver"),
    (9, "modprobe nvidia"),
    (18, "reboot"),
    (4, "group"),
    (15, "fell off the bus"),
    (999, "install or repair the NVIDIA driver"),
])
def test_nvml_fails_with_why_and_the_fix(code: int, fix: str) -> None:
    c = check_nvml(nvml_snapshot(FakeNvml(init_error=code)))
    assert c.status == "fail" and c.summary.startswith("no GPUs: NVML unavailable (") and fix in c.fix
    assert c.details["error_code"] == code


def test_nvml_failing_mid_query_and_seeing_no_gpu_both_fail() -> None:
    assert check_nvml(nvml_snapshot(FakeNvml([(H100, 0)], query_error=15))).status == "fail"
    c = check_nvml(nvml_snapshot(FakeNvml([])))
    assert c.status == "fail" and "sees no GPU" in c.summary


# ------------------------------------------------------------ device nodes


def dev(tmp_path: Path, *names: str) -> Path:
    d = tmp_path / "dev"
    d.mkdir(exist_ok=True)
    for n in names:
        (d / n).touch()
    return d


def test_gpu_devices_pass_when_every_gpu_has_its_node(tmp_path: Path) -> None:
    d = dev(tmp_path, "nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "null")
    c = check_gpu_devices(nvml_snapshot(FakeNvml([(H100, 0), (H100, 1)])), d, access=lambda p: True)
    assert c.status == "pass" and c.details["device_nodes"] == ["nvidia-uvm", "nvidia0", "nvidia1", "nvidiactl"]


def test_a_gpu_without_its_node_fails(tmp_path: Path) -> None:
    d = dev(tmp_path, "nvidia0", "nvidiactl", "nvidia-uvm")
    c = check_gpu_devices(nvml_snapshot(FakeNvml([(H100, 0), (H100, 1)])), d, access=lambda p: True)
    assert c.status == "fail" and c.details["missing"] == ["nvidia1"] and "nvidia-modprobe" in c.fix


def test_no_nvidia_uvm_after_a_reboot_fails(tmp_path: Path) -> None:
    d = dev(tmp_path, "nvidia0", "nvidiactl")
    c = check_gpu_devices(nvml_snapshot(FakeNvml([(H100, 0)])), d, access=lambda p: True)
    assert c.status == "fail" and c.details["missing"] == ["nvidia-uvm"]


def test_a_node_with_no_gpu_behind_it_warns_of_a_vanished_gpu(tmp_path: Path) -> None:
    d = dev(tmp_path, "nvidia0", "nvidia1", "nvidia2", "nvidiactl", "nvidia-uvm")
    c = check_gpu_devices(nvml_snapshot(FakeNvml([(H100, 0), (H100, 2)])), d, access=lambda p: True)
    assert c.status == "warn" and c.details["extra_nodes"] == ["nvidia1"] and "xid" in c.fix


def test_nodes_the_user_cannot_open_fail(tmp_path: Path) -> None:
    d = dev(tmp_path, "nvidia0", "nvidiactl", "nvidia-uvm")
    c = check_gpu_devices(nvml_snapshot(FakeNvml([(H100, 0)])), d, access=lambda p: p.name != "nvidia0")
    assert c.status == "fail" and c.details["not_accessible"] == ["nvidia0"]


def test_without_nvml_device_nodes_are_judged_alone(tmp_path: Path) -> None:
    broken = nvml_snapshot(FakeNvml(init_error=18))
    assert "the driver is not loaded" in check_gpu_devices(broken, dev(tmp_path)).summary
    c = check_gpu_devices(broken, dev(tmp_path, "nvidia0", "nvidiactl"))
    assert c.status == "fail" and "but NVML fails" in c.summary


# ---------------------------------------------------------------- sandbox


def test_bubblewrap_missing_names_the_install_command() -> None:
    c = check_bubblewrap(which=lambda n: None, installer=lambda p: f"apt-get install -y {p}")
    assert (c.status, c.summary, c.fix) == ("fail", "bubblewrap (bwrap) is not installed",
                                           "apt-get install -y bubblewrap")


def test_bubblewrap_present_passes_and_setuid_warns() -> None:
    plain = os.stat_result((stat.S_IFREG | 0o755, 0, 0, 0, 0, 0, 0, 0, 0, 0))
    setuid = os.stat_result((stat.S_IFREG | stat.S_ISUID | 0o755, 0, 0, 0, 0, 0, 0, 0, 0, 0))
    assert check_bubblewrap(which=lambda n: "/usr/bin/bwrap", stat_fn=lambda p: plain).status == "pass"
    c = check_bubblewrap(which=lambda n: "/usr/bin/bwrap", stat_fn=lambda p: setuid)
    assert c.status == "warn" and "NoNewPrivileges" in c.fix


def only(tool: str) -> Callable[[str], str | None]:
    return lambda t: f"/usr/bin/{t}" if t == tool else None


def test_install_command_per_distribution() -> None:
    assert install_command("bubblewrap", which=only("apt-get"), is_root=True) == "apt-get install -y bubblewrap"
    assert install_command("bubblewrap", which=only("apt-get"), is_root=False) == \
        "sudo apt-get install -y bubblewrap"
    assert install_command("bubblewrap", which=only("dnf"), is_root=False) == "sudo dnf install -y bubblewrap"
    assert "bubblewrap" in install_command("bubblewrap", which=lambda t: None, is_root=True)


def proc_sys(tmp_path: Path, **values: int) -> Path:
    root = tmp_path / "sys"
    for rel, v in {"user/max_user_namespaces": 15000, **{k.replace("__", "/"): v for k, v in values.items()}}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"{v}\n")
    return root


def test_user_namespaces_pass_by_default(tmp_path: Path) -> None:
    assert check_user_namespaces(proc_sys(tmp_path), is_root=False).status == "pass"


@pytest.mark.parametrize(("values", "fix"), [
    ({"user__max_user_namespaces": 0}, "user.max_user_namespaces=15000"),
    ({"kernel__unprivileged_userns_clone": 0}, "kernel.unprivileged_userns_clone=1"),
    ({"kernel__apparmor_restrict_unprivileged_userns": 1}, "bwrap-userns-restrict"),
])
def test_user_namespaces_off_fail_for_a_user_and_warn_for_root(tmp_path: Path, values: dict[str, int],
                                                               fix: str) -> None:
    root = proc_sys(tmp_path, **values)
    as_user, as_root = check_user_namespaces(root, is_root=False), check_user_namespaces(root, is_root=True)
    assert (as_user.status, as_root.status) == ("fail", "warn")
    assert fix in as_user.fix and "service user cannot" in as_root.summary


def test_sandbox_probe_verdicts() -> None:
    assert check_sandbox_probe(lambda: None).status == "pass"
    c = check_sandbox_probe(lambda: "bubblewrap cannot make a sandbox here (exit 1): bwrap: setting up uid map",
                            Check(name="bubblewrap", status="pass", summary=""))
    assert c.status == "fail" and "uid map" in c.summary and "user_namespaces" in c.fix


MOUNTINFO_V2 = "35 1 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n"
MOUNTINFO_HYBRID = (MOUNTINFO_V2.replace("/sys/fs/cgroup ", "/sys/fs/cgroup/unified ")
                    + "36 1 0:31 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n")


def test_cgroup_layout_reads_the_version_and_our_cgroup() -> None:
    assert cgroup_layout(MOUNTINFO_V2, "0::/system.slice/p2pgpu.service\n") == {
        "version": "v2", "own_cgroup": "/system.slice/p2pgpu.service"}
    assert cgroup_layout(MOUNTINFO_HYBRID, "4:memory:/x\n0::/\n")["version"] == "hybrid"
    assert cgroup_layout("", "")["version"] == "none"


def test_cgroups_pass_only_with_a_delegated_v2_cgroup() -> None:
    layout = cgroup_layout(MOUNTINFO_V2, "0::/system.slice/p2pgpu.service\n")
    assert check_cgroups(layout, "cgroup2").status == "pass"
    assert check_cgroups(layout, "cgroup1").status == "warn"
    c = check_cgroups(layout, "rlimit")
    assert c.status == "warn" and "rlimit" in c.summary and "Delegate=yes" in c.fix


# ------------------------------------------------------------------ host


def usage(free: int) -> Any:
    return lambda p: SimpleNamespace(total=500 * GiB, used=500 * GiB - free, free=free)


@pytest.mark.parametrize(("free", "status"), [(GiB // 2, "fail"), (5 * GiB, "warn"), (100 * GiB, "pass")])
def test_disk_thresholds(tmp_path: Path, free: int, status: str) -> None:
    c = check_disk({"home": tmp_path, "content store": tmp_path / "store" / "not-made-yet"}, usage(free))
    assert c.status == status
    assert [r["what"] for r in c.details["paths"]] == ["home", "content store"]


def test_disk_of_a_home_not_made_yet_is_the_filesystem_it_will_be_on(tmp_path: Path) -> None:
    c = check_disk({"home": tmp_path / "missing" / "home"})
    row = c.details["paths"][0]
    assert row["path"] == str(tmp_path / "missing" / "home")
    assert row["total_bytes"] == shutil.disk_usage(tmp_path).total
    assert abs(row["free_bytes"] - shutil.disk_usage(tmp_path).free) < GiB  # others write to this disk meanwhile


@pytest.mark.parametrize(("offset", "uncertainty", "status"), [
    (200, 500, "pass"), (-1400, 500, "pass"), (-1600, 500, "warn"), (3000, 500, "warn"), (-8000, 500, "fail"), (5400, 500, "warn"),
])
def test_clock_thresholds_allow_for_the_measurement_uncertainty(offset: int, uncertainty: int, status: str) -> None:
    c = check_clock(ClockSample(offset_ms=offset, uncertainty_ms=uncertainty, source="ledger"))
    assert c.status == status and c.details["offset_ms"] == offset


def test_clock_offline_is_unknown() -> None:
    c = check_clock(None, "offline")
    assert (c.status, c.summary, c.details["offset_ms"]) == ("unknown", "clock offset unknown: offline", None)


def test_clock_sample_from_the_ledgers_date_header_and_block_time() -> None:
    server_ms = 1_800_000_000_000  # what the ledger's clock says
    ours = iter([server_ms - 7000, server_ms - 7000 + 100])  # we run 7 s behind, a 100 ms round trip

    def post_date(url: str, method: str, params: list[Any]) -> tuple[dict[str, Any], str]:
        return {"result": 5}, time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(server_ms / 1000))

    s, _ = clock_sample("https://api.devnet.solana.com", now_ms=lambda: next(ours), post=post_date)
    assert s is not None and abs(s.offset_ms - 7000) <= 600 and s.uncertainty_ms == 550
    assert check_clock(s).status == "fail"

    ours = iter([server_ms, server_ms + 40])

    def post_block(url: str, method: str, params: list[Any]) -> tuple[dict[str, Any], str]:
        return ({"result": 5}, "") if method == "getSlot" else ({"result": server_ms // 1000}, "")

    s, _ = clock_sample("http://203.0.113.7:8899", now_ms=lambda: next(ours), post=post_block)
    assert s is not None and "block time" in s.source and abs(s.offset_ms) <= 600


def test_clock_sample_refuses_itself_and_survives_an_unreachable_ledger() -> None:
    s, why = clock_sample("http://127.0.0.1:8899")
    assert s is None and "this very machine" in why

    def down(url: str, method: str, params: list[Any]) -> tuple[dict[str, Any], str]:
        raise OSError("connection refused")

    s, why = clock_sample("http://203.0.113.7:8899", post=down)
    assert s is None and "no reference reachable" in why


def test_parse_listen() -> None:
    assert parse_listen("/ip4/0.0.0.0/tcp/4001") == ("0.0.0.0", 4001)
    assert parse_listen("/ip6/::/tcp/4001/p2p/12D3KooW") == ("::", 4001)
    assert parse_listen("/ip4/1.2.3.4/udp/4001/quic") is None


def test_ports_taken_by_another_program_fail_and_free_ones_pass() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert bind_error("127.0.0.1", port) == "in use by another program"
        c = check_ports([f"/ip4/127.0.0.1/tcp/{port}"], 0, None)
        assert c.status == "fail" and c.details["unavailable"] == [f"/ip4/127.0.0.1/tcp/{port}"]
        c = check_ports(["/ip4/127.0.0.1/tcp/0"], port, None)
        assert c.status == "fail" and f"control port {port}" in c.summary
    assert check_ports(["/ip4/127.0.0.1/tcp/0"], 0, None).status == "pass"
    assert check_ports(["/ip4/1.2.3.4/udp/9/quic"], 0, None).status == "fail"
    assert check_ports([], 0, {"addrs": ["/ip4/127.0.0.1/tcp/5/p2p/x"], "control_port": 7}).status == "pass"


def test_reachability_verdicts() -> None:
    loop = ["/ip4/127.0.0.1/tcp/4001"]
    assert check_reachability(None, "mainnet", loop).status == "fail"
    assert check_reachability(None, "local", loop).status == "unknown"
    assert check_reachability({"peers": 0, "addrs": []}, "mainnet", ["/ip4/0.0.0.0/tcp/4001"]).status == "warn"
    assert check_reachability({"peers": 3, "addrs": []}, "mainnet", ["/ip4/0.0.0.0/tcp/4001"]).status == "pass"


# -------------------------------------------------------------- payments


def test_ledger_verdicts() -> None:
    assert check_ledger("embedded", lambda: "never asked").status == "pass"
    assert check_ledger("https://api.devnet.solana.com", lambda: None).status == "pass"
    c = check_ledger("http://127.0.0.1:8899", lambda: "connection refused")
    assert c.status == "fail" and "p2pgpu ledger serve" in c.fix
    assert "URL" in check_ledger("https://rpc.example.org", lambda: "timed out").fix


def test_wallet_verdicts() -> None:
    mine = "So11111111111111111111111111111111111111112"
    assert check_wallet("A", None, "ledger down", mine).status == "unknown"
    empty = check_wallet("A", 0, "", mine)
    assert empty.status == "warn" and "airdrop" in empty.fix
    assert check_wallet("A", 5, "", mine).status == "pass"
    c = check_wallet("A", 5, "", "")
    assert c.status == "warn" and "payout_address" in c.fix


def test_home_verdicts(tmp_path: Path) -> None:
    assert check_home(tmp_path, None, "").status == "fail"
    c = check_home(tmp_path, 0o644, "")
    assert c.status == "fail" and "chmod 600" in c.fix
    assert check_home(tmp_path, 0o600, "config.toml: price_per_gpu_hour must be of type int").status == "fail"
    assert check_home(tmp_path, 0o600, "").status == "pass"


# ------------------------------------------------------------- for real


def doctor(home: Path) -> tuple[int, dict[str, Any]]:
    out = subprocess.run([sys.executable, "-m", "p2pgpu.cli", "doctor", "--json", "--home", str(home)],
                         capture_output=True, text=True, timeout=120, check=False)
    try:
        return out.returncode, json.loads(out.stdout)
    except ValueError:
        raise AssertionError(f"doctor printed no JSON (exit {out.returncode}):\n{out.stderr[-3000:]}") from None


def by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in doc["checks"]}


def test_doctor_json_on_this_machine(tmp_path: Path) -> None:
    Home(tmp_path / "home").init()
    code, doc = doctor(tmp_path / "home")
    checks = by_name(doc)
    assert list(checks) == ["nvml", "gpu_devices", "bubblewrap", "user_namespaces", "sandbox", "cgroups", "disk",
                            "home", "clock", "ports", "reachability", "ledger", "wallet"]
    for c in doc["checks"]:
        assert set(c) == {"name", "status", "summary", "fix", "details"} and c["status"] in STATUSES
        assert c["status"] == "pass" or c["summary"]
    assert doc["counts"] == {s: sum(c["status"] == s for c in doc["checks"]) for s in STATUSES}
    assert (code == 0) == doc["ok"] == (doc["counts"]["fail"] == 0)
    snap = nvml_snapshot()
    if not snap.ok:  # this machine has no GPU: the check fails and says why
        assert checks["nvml"]["status"] == "fail"
        assert checks["nvml"]["summary"] == f"no GPUs: NVML unavailable ({snap.error})"
        assert checks["nvml"]["fix"]
    if shutil.which("bwrap"):
        assert checks["bubblewrap"]["status"] == "pass"
        assert checks["sandbox"]["status"] == "pass", checks["sandbox"]
    assert checks["home"]["status"] == "pass"
    assert checks["clock"]["status"] == "unknown"  # embedded ledger, nothing to compare with
    assert checks["reachability"]["status"] == "unknown"  # no daemon runs


def test_doctor_without_a_home_says_how_to_make_one(tmp_path: Path) -> None:
    code, doc = doctor(tmp_path / "nothing")
    assert code == 1 and by_name(doc)["home"]["fix"] == f"p2pgpu init --home {tmp_path / 'nothing'}"


@pytest.fixture
def ledger() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    proc = subprocess.Popen([sys.executable, "-m", "p2pgpu.cli", "ledger", "serve", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().decode()
        assert first.startswith("ledger ready http://127.0.0.1:"), first + proc.stdout.read(4000).decode()
        yield first.split()[2], proc
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.processes
def test_doctor_against_a_real_ledger_then_without_it(tmp_path: Path,
                                                      ledger: tuple[str, subprocess.Popen[bytes]]) -> None:
    url, proc = ledger
    home = tmp_path / "home"
    Home(home).init()
    with open(home / "config.toml", "a") as f:
        f.write(f'ledger = "{url}"\n')
    subprocess.run([sys.executable, "-m", "p2pgpu.cli", "wallet", "--home", str(home), "--airdrop", "5000000"],
                   check=True, capture_output=True, timeout=60)
    _, doc = doctor(home)
    checks = by_name(doc)
    assert checks["ledger"]["status"] == "pass"
    assert checks["wallet"]["status"] == "warn"  # funded, but payouts go to payer.json
    assert checks["wallet"]["details"]["balance"] == 5000000
    assert checks["clock"]["status"] == "unknown" and "this very machine" in checks["clock"]["summary"]
    proc.terminate()
    proc.wait(timeout=20)
    code, doc = doctor(home)
    checks = by_name(doc)
    assert code == 1 and checks["ledger"]["status"] == "fail" and "p2pgpu ledger serve" in checks["ledger"]["fix"]
    assert checks["wallet"]["status"] == "unknown"


def test_devnet_prerequisites_name_the_first_missing_thing_and_its_fix(tmp_path: Path) -> None:
    from p2pgpu.doctor import devnet_prerequisites

    missing = devnet_prerequisites(which=lambda n: None, probe=lambda: "never run",
                                   installer=lambda p: f"apt-get install -y {p}")
    assert [(c.name, c.fix) for c in missing] == [("bubblewrap", "apt-get install -y bubblewrap")]
    bwrap = only("bwrap")
    assert devnet_prerequisites(which=bwrap, probe=lambda: None, proc_sys=proc_sys(tmp_path)) == []
    off = proc_sys(tmp_path / "off", kernel__apparmor_restrict_unprivileged_userns=1)
    (c,) = devnet_prerequisites(which=bwrap, probe=lambda: "bwrap: setting up uid map: Permission denied",
                                proc_sys=off)
    assert c.name == "sandbox" and "uid map" in c.summary and "bwrap-userns-restrict" in c.fix


class HostileLedger:
    """A TCP server on 127.0.0.1 that answers every request with ``reply``
    (or, with ``reply=None``, accepts and never answers)."""

    def __init__(self, reply: bytes | None) -> None:
        import threading

        self.reply = reply
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stop = threading.Event()
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            if self.reply is None:
                self.held.append(conn)
                continue
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(65536)
                    conn.sendall(self.reply)
                except OSError:
                    pass  # the client gave up on a huge answer: that is the point

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        for c in self.held:
            c.close()
        self.sock.close()


@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 3000000\r\n\r\n" + b"[" * 3_000_000,
    b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nnot json at",
    b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n",
    None,
], ids=["huge", "garbage", "error", "silent"])
def test_a_hostile_ledger_fails_the_check_cleanly_and_in_bounded_time(tmp_path: Path, reply: bytes | None) -> None:
    server = HostileLedger(reply)
    try:
        home = tmp_path / "home"
        Home(home).init()
        with open(home / "config.toml", "a") as f:
            f.write(f'ledger = "{server.url}"\n')
        t0 = time.monotonic()
        code, doc = doctor(home)
        checks = by_name(doc)
        assert code == 1 and checks["ledger"]["status"] == "fail", checks["ledger"]
        assert checks["wallet"]["status"] == "unknown"
        assert time.monotonic() - t0 < 60
    finally:
        server.close()


def test_a_deeply_nested_answer_is_refused_as_not_json(monkeypatch: pytest.MonkeyPatch) -> None:
    from p2pgpu import doctor as d

    class Resp:
        headers: ClassVar[dict[str, str]] = {}

        def __enter__(self) -> Self:
            return self

        def __exit__(self, *a: object) -> None:
            return None

        def read(self, n: int) -> bytes:
            return b"[" * min(n, 200_000)

    import urllib.request

    monkeypatch.setattr(urllib.request, "urlopen", lambda req, timeout: Resp())
    with pytest.raises(ValueError, match="nested too deeply"):
        d._post("http://203.0.113.7:8899", "getHealth", [])
