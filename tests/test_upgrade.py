"""Upgrades: homes written by an earlier release open, migrate and lose nothing under this code.

``tests/data/home_883c1db/`` holds two homes that the release at main
883c1db wrote during a devnet run (a submitter that also worked, and a
worker), with what that release's daemon reported about them (see its
README).  Each is copied, opened by today's daemon (which applies every new
schema migration), and must report the same identity, jobs, proofs, payouts
and earnings; the identity and payer keys must be untouched.  When a later
change breaks an old home, this is the test that says so: keep the fixture,
add a newer one beside it at each release.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from p2pgpu.localnet import LocalNet
from p2pgpu.store import MIGRATIONS, apply_migrations

FIXTURE = Path(__file__).resolve().parent / "data" / "home_883c1db"
HOMES = ("node0", "node1")


def restore(name: str, dest: Path) -> Path:
    """Copy a fixture home as an operator restores a backup (git keeps no file modes)."""
    home = dest / name
    shutil.copytree(FIXTURE / name, home)
    home.chmod(0o700)
    for secret in ("identity.key", "payer.json"):
        (home / secret).chmod(0o600)
    return home


def expected(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((FIXTURE / f"{name}.expected.json").read_text())
    return doc


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def same_or_more(old: Any, new: Any, where: str) -> None:
    """``new`` has everything ``old`` had, equal; new keys are allowed (a newer
    release may record more), lost or changed ones are not."""
    if isinstance(old, dict):
        assert isinstance(new, dict), f"{where}: {new!r} is no longer a map"
        for k, v in old.items():
            assert k in new, f"{where}.{k} was lost"
            same_or_more(v, new[k], f"{where}.{k}")
    elif isinstance(old, list):
        assert isinstance(new, list) and len(new) == len(old), f"{where}: {len(old)} rows became {new!r}"
        for i, (a, b) in enumerate(zip(old, new)):
            same_or_more(a, b, f"{where}[{i}]")
    else:
        assert old == new, f"{where}: {old!r} became {new!r}"


def test_the_fixture_is_what_the_old_release_wrote() -> None:
    # Guard against editing the fixture by accident: these homes are evidence, not inputs to tidy.
    for name in HOMES:
        db = sqlite3.connect(f"file:{FIXTURE / name / 'state.db'}?mode=ro&immutable=1", uri=True)
        try:
            versions = [r[0] for r in db.execute("SELECT version FROM schema_migrations ORDER BY version")]
        finally:
            db.close()
        assert versions == [100, 200, 210, 220], versions
    assert len(expected("node0")["jobs"]) == 3 and len(expected("node0")["payouts"]) == 6
    assert len(expected("node1")["earnings"]) == 3


def test_old_store_migrates_in_place_and_stays_consistent(tmp_path: Path) -> None:
    for name in HOMES:
        home = restore(name, tmp_path)
        conn = sqlite3.connect(home / "state.db", isolation_level=None)
        try:
            before = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
            applied = apply_migrations(conn)
            after = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
            assert after == before | set(applied) == {v for v, _ in MIGRATIONS} | before
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
            assert apply_migrations(conn) == []  # once applied, never again
        finally:
            conn.close()


@pytest.fixture(scope="module")
def upgraded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Today's daemon on a copy of each old home (not connected to each other:
    what each home holds on its own is what is checked)."""
    root = tmp_path_factory.mktemp("upgrade")
    keys = {}
    for i, name in enumerate(HOMES):
        home = restore(name, root)
        home.rename(root / f"node{i}")
        shutil.copy(FIXTURE / f"gpus{i}.json", root / f"gpus{i}.json")
        keys[i] = (digest(root / f"node{i}" / "identity.key"), digest(root / f"node{i}" / "payer.json"))
    net = LocalNet(root, 0)
    try:
        for i in range(len(HOMES)):
            net.nodes.append(net.start_node(i, bootstrap=[]))
        yield {"net": net, "keys": keys, "root": root}
    finally:
        net.stop()


@pytest.mark.processes
@pytest.mark.parametrize("index", [0, 1])
def test_upgraded_daemon_keeps_the_identity(upgraded: dict[str, Any], index: int) -> None:
    node = upgraded["net"].nodes[index]
    assert node.call("status")["peer_id"] == expected(HOMES[index])["peer_id"]
    home = upgraded["root"] / f"node{index}"
    assert (digest(home / "identity.key"), digest(home / "payer.json")) == upgraded["keys"][index]


@pytest.mark.processes
@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize(("method", "key"), [("job.list", "jobs"), ("proofs", "proofs"), ("payouts", "payouts"),
                                             ("earnings", "earnings")])
def test_upgraded_daemon_lost_nothing(upgraded: dict[str, Any], index: int, method: str, key: str) -> None:
    old = expected(HOMES[index])[key]
    new = upgraded["net"].nodes[index].call(method)
    if key == "jobs":
        old, new = sorted(old, key=lambda j: j["job_id"]), sorted(new, key=lambda j: j["job_id"])
    same_or_more(old, new, f"{HOMES[index]}.{key}")


@pytest.mark.processes
def test_offline_commands_read_the_upgraded_store(upgraded: dict[str, Any]) -> None:
    for i, name in enumerate(HOMES):
        for cmd, key in (("payouts", "payouts"), ("earnings", "earnings")):
            out = subprocess.run([sys.executable, "-m", "p2pgpu.cli", cmd, "--json", "--home",
                                  str(upgraded["root"] / f"node{i}")], capture_output=True, text=True, timeout=60,
                                 check=False)
            assert out.returncode == 0, out.stderr
            same_or_more(expected(name)[key], json.loads(out.stdout), f"{name} {cmd}")
