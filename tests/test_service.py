"""Running the node as a service: the systemd unit, its hardening, JSON logs, SIGHUP reload.

The unit is checked by ``systemd-analyze verify``; each hardening option it
keeps is emulated (service_emulation.py) and the node's real sandbox probe
must still work as an unprivileged user under all of them at once, while each
option it leaves out for bubblewrap's sake must break the probe (so the
reasons in the unit stay true).  Logs and the SIGHUP reload are checked on a
real ``node run`` process.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import service_emulation as emu

from p2pgpu.home import Config, Home, config_changes
from p2pgpu.localnet import LocalNet
from p2pgpu.logs import JsonFormatter, LogSetupError, default_log_format, setup_logging
from p2pgpu.service import (
    HARDENING,
    Machine,
    Operations,
    ServiceError,
    ServiceSpec,
    chown_tree,
    install,
    plan_install,
    unit_text,
    unreachable_parts,
    write_unit_file,
)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p2pgpu.cli", *args], capture_output=True, text=True, timeout=60,
                          env=env, check=False)


def unit_options(text: str) -> list[tuple[str, str]]:
    out = []
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            k, _, v = line.partition("=")
            out.append((k, v))
    return out


# -------------------------------------------------------------------- the unit


def test_printed_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    out = cli("node", "install-service", "--print")
    assert out.returncode == 0, out.stderr
    path = tmp_path / "p2pgpu.service"
    path.write_text(out.stdout)
    check = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60,
                           check=False)
    assert check.returncode == 0, check.stderr
    assert "p2pgpu.service" not in check.stderr, check.stderr  # no warning about our unit


def test_unit_runs_a_dedicated_user_restarts_and_takes_its_jobs_down() -> None:
    spec = ServiceSpec(exec_argv=("/opt/p2pgpu/bin/p2pgpu",))
    opts = dict(unit_options(unit_text(spec)))
    assert opts["User"] == opts["Group"] == "p2pgpu"
    assert opts["Restart"] == "on-failure"
    assert opts["KillMode"] == "control-group"
    assert opts["Delegate"] == "yes"
    assert opts["ExecStart"] == "/opt/p2pgpu/bin/p2pgpu node run --home /var/lib/p2pgpu --log-format json"
    assert opts["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert opts["StateDirectory"] == "p2pgpu"
    assert opts["ProtectHome"] == "yes"
    for broken in ("ProtectKernelTunables", "ProtectKernelLogs", "ProcSubset", "ProtectHostname",
                   "RestrictNamespaces", "PrivateDevices", "MemoryDenyWriteExecute", "SystemCallFilter"):
        assert broken not in opts


def test_home_outside_var_lib_is_made_writable_and_an_install_under_root_keeps_home_readable() -> None:
    spec = ServiceSpec(home=Path("/srv/p2pgpu/node"), exec_argv=("/root/venv/bin/p2pgpu",))
    opts = dict(unit_options(unit_text(spec)))
    assert opts["ReadWritePaths"] == "/srv/p2pgpu/node"
    assert "StateDirectory" not in opts
    assert opts["ProtectHome"] == "read-only"  # yes would hide the program itself
    spec = ServiceSpec(exec_argv=("/opt/p2pgpu/bin/p2pgpu",), reads=("/home/me/.pyenv/versions/3.11.7",))
    assert dict(unit_options(unit_text(spec)))["ProtectHome"] == "read-only"


def test_nvidia_modprobe_runs_as_root_before_the_node_when_present() -> None:
    opts = unit_options(unit_text(ServiceSpec(nvidia_modprobe="/usr/bin/nvidia-modprobe")))
    assert ("ExecStartPre", "-+/usr/bin/nvidia-modprobe -u -c=0") in opts
    assert "ExecStartPre" not in dict(unit_options(unit_text(ServiceSpec())))


@pytest.mark.parametrize("fields", [
    {"name": "p2pgpu\nExecStartPre=/bin/sh -c evil"},
    {"name": "../../etc/evil"},
    {"name": ""},
    {"user": "root"},
    {"user": "p2p gpu"},
    {"user": "x\nUser=root"},
    {"home": Path("/var/lib/p2p gpu")},
    {"home": Path("/var/lib/%h")},
    {"home": Path("relative/home")},
    {"home": Path("/etc")},
    {"home": Path("/var/lib/x/../../etc")},
    {"exec_argv": ("/opt/my venv/bin/p2pgpu",)},
    {"exec_argv": ("/opt/p2pgpu/bin/p2pgpu;reboot",)},
    {"exec_argv": ()},
    {"reads": ("relative",)},
])
def test_values_that_could_inject_into_the_unit_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ServiceError):
        ServiceSpec(**fields)  # type: ignore[arg-type]


def test_cli_refuses_a_hostile_name_with_one_clear_line() -> None:
    out = cli("node", "install-service", "--print", "--name", "x\nExecStartPre=/bin/true")
    assert out.returncode == 1
    assert out.stdout == ""
    assert out.stderr.startswith("p2pgpu: error: service name") and "Traceback" not in out.stderr


# ---------------------------------------------------- hardening, measured


needs_emulation = pytest.mark.skipif(emu.can_emulate() is not None, reason=str(emu.can_emulate()))


@needs_emulation
def test_the_sandbox_runs_as_the_service_user_under_every_hardening_option_of_the_unit() -> None:
    out = cli("node", "install-service", "--print")
    options = [(k, v) for k, v in unit_options(out.stdout)
               if k in {h for h, _ in HARDENING} | {"ProtectHome"}]
    assert len(options) == len(HARDENING) + 1
    emulations = []
    for k, v in options:
        e = emu.emulation_of(k, v)
        assert e is not None, f"{k}={v} is in the unit but not emulated: measure it before shipping it"
        emulations.append(e)
    res = emu.probe_under(emulations)
    assert (res.returncode, json.loads(res.stdout)) == (0, None), res.stdout + res.stderr


@needs_emulation
@pytest.mark.parametrize(("option", "value", "breaks"), [
    ("ProtectKernelTunables", "yes", "Can't mount proc"),
    ("ProtectKernelLogs", "yes", "Can't mount proc"),
    ("ProcSubset", "pid", "/proc/sys"),
    ("ProtectHostname", "yes", "hostname"),
    ("RestrictNamespaces", "yes", "unshare"),
    ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6", "NETLINK"),
])
def test_each_option_left_out_of_the_unit_breaks_the_sandbox(option: str, value: str, breaks: str) -> None:
    assert (option, value) not in unit_options(cli("node", "install-service", "--print").stdout)
    e = emu.emulation_of(option, value)
    assert e is not None
    res = emu.probe_under([e])
    assert res.returncode == 0, res.stderr
    reason = json.loads(res.stdout)
    assert reason.startswith("bubblewrap cannot make a sandbox here") and breaks in reason, reason


# ------------------------------------------------------------------ installing


def machine(**kw: object) -> Machine:
    base: dict[str, object] = {"is_root": True, "user_exists": True, "home_has_identity": False,
                               "home_owner": None, "unit_existing": None}
    return Machine(**{**base, **kw})  # type: ignore[arg-type]


def test_plan_needs_root_and_a_program_the_user_can_reach(tmp_path: Path) -> None:
    spec = ServiceSpec(exec_argv=("/root/venv/bin/p2pgpu",))
    with pytest.raises(ServiceError, match="run it as root"):
        plan_install(spec, tmp_path, machine(is_root=False))
    with pytest.raises(ServiceError, match="/root is closed to it"):
        plan_install(spec, tmp_path, machine(exec_unreachable=("/root",)))


def test_plan_never_replaces_a_different_unit_without_force(tmp_path: Path) -> None:
    spec = ServiceSpec()
    with pytest.raises(ServiceError, match="--force"):
        plan_install(spec, tmp_path, machine(unit_existing="[Service]\nExecStart=/bin/other\n"))
    assert plan_install(spec, tmp_path, machine(unit_existing="x"), force=True).write_unit
    same = plan_install(spec, tmp_path, machine(unit_existing=unit_text(spec), home_has_identity=True,
                                                home_owner="p2pgpu"))
    assert (same.write_unit, same.init_home, same.chown_home, same.create_user) == (False, False, False, False)
    new = plan_install(spec, tmp_path, machine(user_exists=False))
    assert (new.write_unit, new.init_home, new.chown_home, new.create_user) == (True, True, True, True)


def test_unreachable_parts_finds_the_closed_directory() -> None:
    modes = {"/": 0o755, "/root": 0o700, "/root/venv": 0o755, "/root/venv/p2pgpu": 0o755,
             "/opt": 0o755, "/opt/p2pgpu": 0o750, "/opt/p2pgpu/bin": 0o755, "/opt/p2pgpu/bin/p2pgpu": 0o744}

    def fake_stat(p: Path) -> os.stat_result:
        return os.stat_result((stat.S_IFDIR | modes[str(p)], 0, 0, 0, 0, 0, 0, 0, 0, 0))

    assert unreachable_parts(Path("/root/venv/p2pgpu"), 999, [999], fake_stat) == ("/root",)
    assert unreachable_parts(Path("/opt/p2pgpu/bin/p2pgpu"), 999, [999], fake_stat) == (
        "/opt/p2pgpu", "/opt/p2pgpu/bin/p2pgpu")
    assert unreachable_parts(Path("/opt/p2pgpu/bin/p2pgpu"), 999, [0], fake_stat) == ("/opt/p2pgpu/bin/p2pgpu",)
    assert unreachable_parts(Path("/root/venv/p2pgpu"), 0, [0], fake_stat) == ()


@pytest.mark.skipif(os.geteuid() != 0, reason="gives files to another user")
def test_install_makes_the_home_gives_it_to_the_user_and_writes_the_unit(tmp_path: Path) -> None:
    spec = ServiceSpec(user="nobody", home=tmp_path / "home", exec_argv=("/opt/p2pgpu/bin/p2pgpu",))
    plan = plan_install(spec, tmp_path / "units", machine(user_exists=True))
    ran: list[list[str]] = []
    def init_home(p: Path) -> None:
        Home(p).init()

    done = install(spec, plan, Operations(run=ran.append, init_home=init_home,
                                          chown_tree=chown_tree, write_file=write_unit_file))
    assert ran == []  # the user exists: no useradd
    assert len(done) == 3
    unit = tmp_path / "units" / "p2pgpu.service"
    assert unit.read_text() == unit_text(spec)
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    nobody = pwd.getpwnam("nobody").pw_uid
    for p in [spec.home, *spec.home.rglob("*")]:
        assert p.lstat().st_uid == nobody, p
    assert stat.S_IMODE((spec.home / "identity.key").stat().st_mode) == 0o600
    again = plan_install(spec, tmp_path / "units", machine(user_exists=True, home_has_identity=True,
                                                               home_owner="nobody", unit_existing=unit.read_text()))
    assert again.actions() == [f"{unit} is already up to date"]


def test_install_creates_a_missing_user_as_a_system_user(tmp_path: Path) -> None:
    spec = ServiceSpec(home=tmp_path / "home")
    plan = plan_install(spec, tmp_path / "units", machine(user_exists=False))
    ran: list[list[str]] = []
    install(spec, plan, Operations(run=ran.append, init_home=lambda p: None, chown_tree=lambda p, u: None,
                                   write_file=lambda p, t: None))
    assert ran == [["useradd", "--system", "--user-group", "--home-dir", str(spec.home), "--no-create-home",
                    "--shell", "/usr/sbin/nologin", "p2pgpu"]]


def test_cli_dry_run_changes_nothing(tmp_path: Path) -> None:
    units, home = tmp_path / "units", tmp_path / "home"
    out = cli("node", "install-service", "--dry-run", "--json", "--user", "nobody", "--home", str(home),
              "--unit-dir", str(units))
    closed = [p for p in {os.path.realpath(sys.executable), os.path.realpath(sys.base_prefix)}
              for p in unreachable_parts(Path(p), pwd.getpwnam("nobody").pw_uid, [pwd.getpwnam("nobody").pw_gid])]
    if closed and os.geteuid() == 0:
        # This installation lives where the service user cannot reach it (e.g. a Python under /root).
        assert out.returncode == 1 and "is closed to it" in out.stderr and closed[0] in out.stderr, out.stderr
    elif os.geteuid() != 0:
        assert out.returncode == 1 and "run it as root" in out.stderr
    else:
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["dry_run"] is True and doc["done"] == []
        assert "create the node home (identity, config.toml)" in doc["actions"]
    assert not units.exists() and not home.exists()


# ------------------------------------------------------------------------ logs


def test_json_log_lines_carry_time_level_logger_message_extras_and_traceback() -> None:
    fmt = JsonFormatter()
    rec = logging.LogRecord("p2pgpu.node", logging.WARNING, __file__, 1, "job %s failed", ("abc",), None)
    rec.job_id = "abc"
    doc = json.loads(fmt.format(rec))
    assert list(doc)[:5] == ["ts", "level", "logger", "msg", "pid"]
    assert (doc["level"], doc["logger"], doc["msg"], doc["job_id"]) == ("warning", "p2pgpu.node", "job abc failed",
                                                                        "abc")
    assert doc["ts"].endswith("Z") and "T" in doc["ts"]
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = fmt.format(rec)
    assert "\n" not in line and "RuntimeError: boom" in json.loads(line)["exc"]


def test_a_huge_message_is_cut_to_one_bounded_line() -> None:
    rec = logging.LogRecord("x", logging.INFO, __file__, 1, "%s", ("y" * 10_000_000,), None)
    assert len(JsonFormatter().format(rec)) < 20_000


def test_priority_prefix_only_when_journald_reads_our_stdout(tmp_path: Path) -> None:
    with open(tmp_path / "journal", "w") as out, open(tmp_path / "other", "w") as other:
        st = os.fstat(out.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert setup_logging("INFO", "json", stdout=out, environ=env) == "json"
        logging.getLogger("p2pgpu.test").warning("to the journal")
        setup_logging("INFO", "json", stdout=other, environ=env)  # journald reads another stream
        logging.getLogger("p2pgpu.test").warning("to a file")
    logging.getLogger().handlers.clear()
    line = (tmp_path / "journal").read_text()
    assert line.startswith("<4>{") and json.loads(line[3:])["msg"] == "to the journal"
    assert json.loads((tmp_path / "other").read_text())["msg"] == "to a file"


def test_default_format_is_text_on_a_terminal_and_json_elsewhere(tmp_path: Path) -> None:
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            assert default_log_format(tty) == "text"
    finally:
        os.close(master)
        os.close(slave)
    with open(tmp_path / "f", "w") as f:
        assert default_log_format(f) == "json"


def test_bad_log_level_or_format_is_refused() -> None:
    with pytest.raises(LogSetupError, match="DEBUG, INFO, WARNING, ERROR"):
        setup_logging("LOUD", "text")
    with pytest.raises(LogSetupError, match="text, json"):
        setup_logging("INFO", "xml")
    out = cli("node", "run", "--home", "/nonexistent", "--log-level", "LOUD")
    assert out.returncode == 1 and out.stderr.startswith("p2pgpu: error: --log-level 'LOUD'"), out.stderr


# --------------------------------------------------------- a real daemon: reload


def test_config_changes_split_live_and_restart_settings() -> None:
    old = Config()
    new = Config(price_per_gpu_hour=5, region="eu-west", listen=["/ip4/0.0.0.0/tcp/4001"], currency="USDC",
                 extra={"ledger": "http://127.0.0.1:8899"})
    ch = config_changes(old, new)
    assert ch.live == ("price_per_gpu_hour", "region")
    assert ch.needs_restart == ("listen", "currency", "ledger")
    assert config_changes(old, Config()).live == () and config_changes(old, Config()).needs_restart == ()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    root = tmp_path_factory.mktemp("service-node")
    with LocalNet(root, 1, gpu_mix=[("NVIDIA L4", 23034, "8.9", 1)], extra_args=["--log-format", "json"]) as net:
        yield SimpleNamespace(net=net, proc=net.nodes[0], config=net.nodes[0].home.config_path)


def own_row(n: SimpleNamespace) -> dict[str, object]:
    rows: list[dict[str, object]] = [r for r in n.proc.call("market") if r["peer_id"] == n.proc.peer_id]
    assert len(rows) == 1
    return rows[0]


def reload_with(n: SimpleNamespace, text: str) -> dict[str, object]:
    before = n.proc.call("status")["config_reload"]
    n.config.write_text(text)
    n.proc.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert n.proc.proc.poll() is None, n.proc.log_tail()
        report = n.proc.call("status")["config_reload"]
        if report != before:
            return report  # type: ignore[no-any-return]
        time.sleep(0.1)
    raise AssertionError("no reload happened")


@pytest.mark.processes
def test_node_logs_one_json_object_per_line(node: SimpleNamespace) -> None:
    lines = [ln for ln in node.proc.log_path.read_text().splitlines() if ln.strip()]
    docs = [json.loads(ln) for ln in lines]
    ready = [d for d in docs if d["msg"] == "node ready"]
    assert len(ready) == 1 and ready[0]["peer_id"] == node.proc.peer_id and ready[0]["level"] == "info"
    assert all({"ts", "level", "logger", "msg", "pid"} <= d.keys() for d in docs)


@pytest.mark.processes
def test_sighup_applies_live_settings_and_names_those_that_need_a_restart(node: SimpleNamespace) -> None:
    text = node.config.read_text()
    assert own_row(node)["price"] == 1_000_000
    changed = (text.replace("price_per_gpu_hour = 1000000", "price_per_gpu_hour = 4242")
               .replace('region = "local"', 'region = "eu-west"')
               .replace('listen = ["/ip4/127.0.0.1/tcp/0"]', 'listen = ["/ip4/127.0.0.1/tcp/4001"]'))
    report = reload_with(node, changed)
    assert report["ok"] is True and report["error"] == ""
    assert report["applied"] == ["price_per_gpu_hour", "region"]
    assert report["needs_restart"] == ["listen"]
    # The advert is re-signed with them (at most a second later: adverts are rate-limited).
    node.net.wait_until(lambda: (own_row(node)["price"], own_row(node)["region"]) == (4242, "eu-west"),
                        timeout_s=10, what="the re-signed advert")
    logs = node.proc.log_path.read_text()
    assert "config reloaded: applied price_per_gpu_hour, region; needs a restart: listen" in logs


@pytest.mark.processes
def test_advert_ttl_given_on_the_command_line_wins_over_a_reload(node: SimpleNamespace) -> None:
    good = node.config.read_text()
    report = reload_with(node, good.replace("advert_ttl_s = 600", "advert_ttl_s = 900"))
    assert (report["ok"], report["applied"], report["overridden"]) == (True, [], ["advert_ttl_s"])
    node.config.write_text(good)


@pytest.mark.processes
@pytest.mark.parametrize(("bad", "why"), [
    ("price_per_gpu_hour = [", "not valid TOML"),
    ('price_per_gpu_hour = "cheap"', "must be of type int"),
    ('payout_address = "not-an-address"', "not a Solana address"),
    ('region = "' + "r" * 40 + '"', "region"),
    ("advert_ttl_s = 100000", "advert lives"),
    ("price_per_gpu_hour = -5", "negative"),
])
def test_sighup_refuses_a_bad_config_and_keeps_the_running_one(node: SimpleNamespace, bad: str, why: str) -> None:
    good = node.config.read_text()
    before = own_row(node)
    lines = [ln for ln in good.splitlines() if not ln.startswith(bad.split(" =")[0] + " ")]
    report = reload_with(node, "\n".join([*lines, bad, ""]))
    assert report["ok"] is False and why in str(report["error"]), report
    assert node.proc.proc.poll() is None
    after = own_row(node)
    assert (after["price"], after["region"], after["payout_address"]) == (
        before["price"], before["region"], before["payout_address"])
    node.config.write_text(good)
