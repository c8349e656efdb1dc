"""The job commands of the CLI, now written on the SDK, against real daemons:
same flags, same ``--json`` keys (docs/cli.md), and a failed job always
says why on screen, in ``job status`` and in ``job submit --wait``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sdk_jobs import exits, writes_file

from p2pgpu.localnet import LocalNet

pytestmark = pytest.mark.processes
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "jobs"


def toml_of(doc: dict[str, object]) -> str:
    """The few shapes sdk_jobs uses, as TOML (strings, ints, lists of strings, tables)."""
    out: list[str] = []
    tables = {k: v for k, v in doc.items() if isinstance(v, dict)}
    for k, v in doc.items():
        if not isinstance(v, dict):
            out.append(f"{k} = {json.dumps(v)}")
    for name, t in tables.items():
        out.append(f"[{name}]")
        out += [f"{k} = {json.dumps(v)}" for k, v in t.items()]
    return "\n".join(out) + "\n"


def cli(net: LocalNet, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "p2pgpu.cli", *args, "--home", str(net.nodes[0].home.path)],
                         check=False, capture_output=True, text=True, timeout=180)
    if ok:
        assert res.returncode == 0, res.stderr
    return res


def test_submit_wait_json_then_status_list_logs_results(net: LocalNet, tmp_path: Path) -> None:
    m = tmp_path / "writer.toml"
    m.write_text(toml_of(writes_file("cli-writer")))
    res = cli(net, "job", "submit", str(m), "--wait", "--json")
    doc = json.loads(res.stdout)
    job = doc["job_id"]
    assert res.stderr.splitlines()[0] == job  # with --json the id goes to stderr
    assert f"[job {job[:12]}] succeeded: cluster of 1" in res.stderr
    assert doc["state"] == "succeeded" and doc["reason"] == ""
    assert {"job_id", "name", "state", "reason", "cluster", "timings", "proofs", "payouts", "roles"} <= set(doc)

    st = json.loads(cli(net, "job", "status", job[:10], "--json").stdout)
    assert st["job_id"] == job and st["cluster"] == doc["cluster"]
    rows = json.loads(cli(net, "job", "list", "--json").stdout)
    assert job in {r["job_id"] for r in rows}
    logs = json.loads(cli(net, "job", "logs", job, "--json").stdout)
    assert sorted(ln["line"] for ln in logs) == ["first", "second"]
    assert all({"t_ms", "stream", "line", "member", "member_index"} <= set(ln) for ln in logs)
    human = cli(net, "job", "logs", job)
    assert human.stdout.strip().endswith("first") and human.stderr.strip().endswith("second")
    out = json.loads(cli(net, "job", "results", job, "--out", str(tmp_path / "out"), "--json").stdout)
    assert out["job_id"] == job and [f["path"] for f in out["files"]] == ["out.txt"]
    assert Path(out["files"][0]["saved_as"]).read_text() == "result of the job\n"

    submitted = json.loads(cli(net, "job", "submit", str(EXAMPLES / "hello.toml"), "--json").stdout)
    assert set(submitted) == {"job_id", "members", "name"} and submitted["members"] == 1


def test_a_failed_job_says_why_on_screen(net: LocalNet, tmp_path: Path) -> None:
    m = tmp_path / "exits.toml"
    m.write_text(toml_of(exits(3, "cli-exits")))
    res = cli(net, "job", "submit", str(m), "--wait", ok=False)
    assert res.returncode == 1
    job = res.stdout.splitlines()[0]
    assert "state     failed" in res.stdout
    assert "exited with code 3" in res.stdout, res.stdout  # the reason, on screen
    assert "about to fail" in res.stdout  # what the command said on stderr before it ended
    st = cli(net, "job", "status", job)
    assert "reason    " in st.stdout and "exited with code 3" in st.stdout, st.stdout
    doc = json.loads(cli(net, "job", "status", job, "--json").stdout)
    assert "exited with code 3" in doc["reason"]


def test_dry_run_and_errors(net: LocalNet, tmp_path: Path) -> None:
    # Adverts carry free GPUs: the previous test's job may still hold one
    # until its node's next advert, so wait until both nodes show theirs.
    deadline = time.monotonic() + 30
    while True:
        res = cli(net, "job", "submit", str(EXAMPLES / "pair.toml"), "--dry-run", "--json", ok=False)
        if res.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads(res.stdout)
    assert doc["dry_run"] is True and doc["enough"] is True and doc["members_needed"] == 2
    big = tmp_path / "big.toml"
    big.write_text(toml_of(writes_file("big")).replace("nodes = 1", "nodes = 3"))
    res = cli(net, "job", "submit", str(big), "--dry-run", ok=False)
    assert res.returncode == 3 and "NOT enough" in res.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text('[runtime]\ncommand = ["true"]\n[requirements]\nnodes = 0\n')
    res = cli(net, "job", "submit", str(bad), ok=False)
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.startswith("p2pgpu: error: manifest: requirements.nodes:"), res.stderr
    res = cli(net, "job", "status", "0" * 64, ok=False)
    assert res.returncode == 1 and "is known to this node" in res.stderr
    res = cli(net, "job", "submit", str(tmp_path / "absent.toml"), ok=False)
    assert res.returncode == 1 and "no such file" in res.stderr
    res = subprocess.run([sys.executable, "-m", "p2pgpu.cli", "status", "--home", str(tmp_path / "none")],
                         check=False, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "p2pgpu init" in res.stderr
