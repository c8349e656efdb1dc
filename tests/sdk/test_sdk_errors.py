"""The SDK's typed errors, each provoked for real: no daemon, a daemon that
hangs or floods, a bad manifest (TOML, dict, path), an unknown job, a job
this node may not cancel, hostile parameters to the new control methods.

Each error must be its own type and say what to do in its message.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sdk_jobs import sleeper, writes_file

from p2pgpu import (
    AsyncClient,
    BadManifest,
    Client,
    DaemonNotRunning,
    P2pgpuError,
    RequestRefused,
    Timeout,
    UnknownJob,
)
from p2pgpu.home import Home
from p2pgpu.localnet import LocalNet
from p2pgpu.sdk import _transport

# ------------------------------------------------------------ no daemon at all


def test_no_home_says_run_init(tmp_path: Path) -> None:
    with pytest.raises(DaemonNotRunning) as info:
        Client(tmp_path / "nothing").status()
    assert "p2pgpu init" in str(info.value)


def test_home_without_daemon_says_start_one(tmp_path: Path) -> None:
    home = Home(tmp_path / "h")
    home.init(network="local")
    with pytest.raises(DaemonNotRunning) as info:
        Client(home.path).submit(writes_file())
    assert "p2pgpu node run" in str(info.value) and str(home.path) in str(info.value)


def test_stale_control_file_is_daemon_not_running(tmp_path: Path) -> None:
    home = Home(tmp_path / "h")
    home.init(network="local")
    with socket.socket() as s:  # a port nobody listens on any more
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home.control_path.write_text(json.dumps({"port": port, "pid": 1}))
    with pytest.raises(DaemonNotRunning) as info:
        Client(home.path).job("ab" * 32).status()
    assert "no daemon answers" in str(info.value)


async def test_async_client_no_daemon(tmp_path: Path) -> None:
    home = Home(tmp_path / "h")
    home.init(network="local")
    with pytest.raises(DaemonNotRunning):
        await AsyncClient(home.path).status()
    # payouts and earnings still answer from the home's store.
    assert await AsyncClient(home.path).payouts() == []
    assert Client(home.path).earnings() == []


# ------------------------------------------- a hostile or hung "daemon"


@pytest.fixture
def fake_daemon(tmp_path: Path) -> Iterator[tuple[Home, list[bytes]]]:
    """A TCP server posing as the daemon: it answers each connection with the
    bytes queued in the list (nothing: it hangs until the client gives up)."""
    home = Home(tmp_path / "h")
    home.init(network="local")
    srv = socket.create_server(("127.0.0.1", 0))
    home.control_path.write_text(json.dumps({"port": srv.getsockname()[1]}))
    replies: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)
                if replies:
                    try:
                        conn.sendall(replies.pop(0))
                    except OSError:
                        pass  # the client gave up first: what the test wants
                else:
                    stop.wait(5)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield home, replies
    finally:
        stop.set()
        t.join(5)
        srv.close()


def test_a_daemon_that_never_answers_times_out(fake_daemon: tuple[Home, list[bytes]]) -> None:
    home, _ = fake_daemon
    with pytest.raises(Timeout) as info:
        Client(home.path, timeout_s=0.5).status()
    assert isinstance(info.value, TimeoutError) and "did not answer status within 0.5 s" in str(info.value)


async def test_async_a_daemon_that_never_answers_times_out(fake_daemon: tuple[Home, list[bytes]]) -> None:
    home, _ = fake_daemon
    with pytest.raises(Timeout):
        await AsyncClient(home.path, timeout_s=0.5).status()


def test_an_oversized_reply_is_refused(fake_daemon: tuple[Home, list[bytes]],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    home, replies = fake_daemon
    monkeypatch.setattr(_transport, "reply_bytes_max", 4096)
    replies.append(b'{"ok": true, "result": "' + b"x" * 10_000 + b'"}\n')
    with pytest.raises(P2pgpuError, match="larger than 4096 bytes"):
        Client(home.path).status()


async def test_async_an_oversized_reply_is_refused(fake_daemon: tuple[Home, list[bytes]],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from p2pgpu.sdk import _async

    home, replies = fake_daemon
    monkeypatch.setattr(_async, "reply_bytes_max", 4096)
    replies.append(b"y" * 10_000)  # and no newline at all
    with pytest.raises(P2pgpuError, match="larger than 4096 bytes"):
        await AsyncClient(home.path).status()


@pytest.mark.parametrize("reply", [b"not json\n", b"[1, 2]\n", b'{"ok": false}\n'])
def test_garbage_replies_are_errors_not_crashes(fake_daemon: tuple[Home, list[bytes]], reply: bytes) -> None:
    home, replies = fake_daemon
    replies.append(reply)
    with pytest.raises(P2pgpuError):
        Client(home.path).status()


def test_a_streamed_item_before_the_result_is_skipped(fake_daemon: tuple[Home, list[bytes]]) -> None:
    home, replies = fake_daemon
    replies.append(b'{"ok": true, "item": 1}\n{"ok": true, "result": {"peer_id": "x"}}\n')
    assert Client(home.path).status() == {"peer_id": "x"}


# ------------------------------------------------- refusals of a real daemon




@pytest.mark.processes
@pytest.mark.parametrize(("manifest", "field"), [
    ("name = \n", "toml"),
    ('name = "x"\n[requirements]\nnodes = "two"\n[runtime]\ncommand = ["true"]\n', "requirements.nodes"),
    ({"runtime": {"command": ["true"]}, "requirements": {"nodes": 0}}, "requirements.nodes"),
    ({"runtime": {"command": ["true"]}, "colour": "blue"}, "colour"),
    ({"runtime": {"command": ["true"]}, "requirements": {"gpus": 1}}, "requirements.gpus"),
    ({"runtime": {}}, "runtime.command"),
    ({"runtime": {"command": ["true"], "env": {"A": 1}}}, "runtime.env"),
    ({"runtime": {"command": ["true"]}, "inputs": {"../etc/passwd": {"text": "x"}}}, "inputs.../etc/passwd"),
    ({"runtime": {"command": ["true"]}, "inputs": {"big": {"text": "x" * 300_000}}}, "inputs.big"),
])
def test_bad_manifest_names_the_field(net: LocalNet, manifest: str | dict[str, object], field: str) -> None:
    with pytest.raises(BadManifest) as info:
        Client(net.nodes[0].home.path).submit(manifest)
    assert info.value.field == field, str(info.value)
    assert info.value.code == "bad_manifest" and field in str(info.value)


@pytest.mark.processes
def test_bad_manifest_paths(net: LocalNet, tmp_path: Path) -> None:
    c = Client(net.nodes[0].home.path)
    with pytest.raises(BadManifest, match="no such file") as info:
        c.submit(tmp_path / "missing.toml")
    assert info.value.field == "manifest"
    with pytest.raises(BadManifest, match="no such file"):
        c.submit(str(tmp_path / "missing.toml"))
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (600 * 1024))
    with pytest.raises(BadManifest, match="byte limit"):
        c.submit(big)
    with pytest.raises(TypeError):
        c.submit(42)  # type: ignore[arg-type]


@pytest.mark.processes
def test_unknown_job(net: LocalNet) -> None:
    c = Client(net.nodes[0].home.path)
    job = c.job("f" * 64)
    for call in (job.status, lambda: list(job.logs()), job.cancel, lambda: job.wait(timeout_s=5)):
        with pytest.raises(UnknownJob) as info:
            call()
        assert info.value.job_id == "f" * 64 and "p2pgpu job list" in str(info.value)


@pytest.mark.processes
def test_only_the_submitter_may_cancel(net: LocalNet) -> None:
    job = Client(net.nodes[0].home.path).submit(sleeper(sleep_s=5))
    other = Client(net.nodes[1].home.path)
    net.wait_until(lambda: job.id in {r["job_id"] for r in other.network_jobs()}, timeout_s=30,
                   what="node 1 to see the job")
    with pytest.raises(RequestRefused) as info:
        other.job(job.id).cancel()
    assert info.value.code == "not_submitter" and not isinstance(info.value, UnknownJob)
    job.cancel()


@pytest.mark.processes
@pytest.mark.parametrize(("method", "params"), [
    ("job.logs", {"job_id": "x", "since": -1}),
    ("job.logs", {"job_id": "x", "since": "0"}),
    ("job.logs", {"job_id": "x", "limit": 10**9}),
    ("job.logs", {"job_id": 7}),
    ("network.jobs", {"limit": 0}),
    ("network.jobs", {"limit": 10**9}),
    ("market.match", {"requirements": "H100"}),
    ("reputation", {"fresh": "yes"}),
    ("receipts.fetch", {"peer_id": 7}),
    ("receipts.fetch", {"peer_id": "x" * 1000}),
])
def test_hostile_params_are_refused(net: LocalNet, method: str, params: dict[str, object]) -> None:
    with pytest.raises(RequestRefused) as info:
        Client(net.nodes[0].home.path).call(method, params)
    assert info.value.code == "bad_params", str(info.value)


@pytest.mark.processes
@pytest.mark.parametrize(("req", "field"), [
    ({"gpus_per_node": 0}, "requirements.gpus_per_node"),
    ({"models": "H100"}, "requirements.models"),
    ({"colour": "red"}, "requirements.colour"),
    ({"runtime": "docker"}, "runtime.kind"),
    ({"compute_capability_min": "nine"}, "requirements.compute_capability_min"),
])
def test_market_requirements_are_checked(net: LocalNet, req: dict[str, object], field: str) -> None:
    with pytest.raises(BadManifest) as info:
        Client(net.nodes[0].home.path).market(req)
    assert info.value.field == field, str(info.value)
