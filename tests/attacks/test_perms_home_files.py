"""#12 (smaller): a node's database was readable by every local user.

The attack: ``state.db`` (jobs, proofs, payouts, earnings) and its WAL and
shared-memory files were created 0644, so any local user could read them as
soon as the home directory could be traversed (an operator's ``chmod 755`` of
a parent, a home made with ``mkdir`` before ``init``).  Here a real node runs,
its wallet is funded on the embedded ledger, the home is made traversable,
and the user ``nobody`` tries to read every file in it: it must be refused
for each.  The home itself is created 0700.

``control.json`` (the daemon's port) belongs to the control API's owner
("network", #12) and job directories to the runtime's: both are left out.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from p2pgpu.home import Home
from p2pgpu.localnet import LocalNet
from p2pgpu.store import db_path, open_db

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runuser") is None,
                                reason="needs root and runuser to act as another local user")

NOT_MINE = {"control.json"}


def _readable_by_nobody(path: Path) -> bool:
    r = subprocess.run(["runuser", "-u", "nobody", "--", "cat", str(path)], capture_output=True, timeout=30,
                       check=False)
    return r.returncode == 0


def _files_others_can_read(home: Path) -> tuple[set[str], list[str]]:
    files = sorted(p for p in home.iterdir() if p.is_file() and p.name not in NOT_MINE)
    loose = [p.name for p in files if p.stat().st_mode & 0o077]
    return {p.name for p in files}, sorted(set(loose) | {p.name for p in files if _readable_by_nobody(p)})


@pytest.mark.processes
def test_another_local_user_cannot_read_any_file_of_a_nodes_home() -> None:
    # Not under pytest's own (private) temporary root: this one is opened to others on purpose.
    root = Path(tempfile.mkdtemp(prefix="p2pgpu-perms-", dir="/tmp"))
    try:
        with LocalNet(root / "net", 1) as net:
            home = net.nodes[0].home.path
            assert net.nodes[0].call("wallet")["address"]
            assert home.stat().st_mode & 0o777 == 0o700
            for d in (home, home.parent, root):  # an operator lets others traverse the way to it
                os.chmod(d, os.stat(d).st_mode | 0o011)
            names, readable = _files_others_can_read(home)  # while the daemon writes its WAL
            assert {"state.db", "state.db-wal", "state.db-shm", "identity.key", "config.toml"} <= names, names
            assert readable == [], f"readable by another local user: {readable}"
        r = subprocess.run([sys.executable, "-m", "p2pgpu.cli", "wallet", "--home", str(home), "--airdrop",
                            "1000000000"], capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0, r.stderr
        names, readable = _files_others_can_read(home)  # the embedded ledger's files are there now
        assert {"payer.json", "ledger.state", "ledger.state.faucet", "ledger.state.lock"} <= names, names
        assert readable == [], f"readable by another local user: {readable}"
    finally:
        shutil.rmtree(root)


def test_a_database_left_readable_by_an_earlier_version_is_made_private(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    home.init(network="local")
    path = db_path(home.path)
    conn = sqlite3.connect(path)  # as an earlier version did: umask's 0644, WAL files alike
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE t (x)")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.commit()
    for p in path.parent.glob("state.db*"):
        os.chmod(p, 0o644)
    assert sorted(p.name for p in path.parent.glob("state.db*")) == ["state.db", "state.db-shm", "state.db-wal"]
    db = open_db(path)
    assert db.execute("SELECT x FROM t").fetchone()[0] == 1
    assert {p.name: p.stat().st_mode & 0o777 for p in path.parent.glob("state.db*")} == {
        "state.db": 0o600, "state.db-shm": 0o600, "state.db-wal": 0o600}
    db.close()
    conn.close()
