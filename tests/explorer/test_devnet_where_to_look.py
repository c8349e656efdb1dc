"""``p2pgpu devnet up --once`` says where to look: the explorer's URL and its
network view, while the devnet runs (stderr) and in the summary."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.processes


def test_devnet_prints_the_explorer_and_network_view(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "p2pgpu.cli", "devnet", "up", "--once", "--nodes", "2", "--jobs", "1",
                          "--dir", str(tmp_path / "dn")], check=False, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    m = re.search(r"\[devnet\] explorer: (http://127\.0\.0\.1:\d+/)  network view: (\S+)", res.stderr)
    assert m, res.stderr
    assert m.group(2) == m.group(1) + "#network"
    assert f"network view: {m.group(2)} (while the devnet runs)" in res.stdout
    assert f"explorer: {m.group(1)}" in res.stdout

    res = subprocess.run([sys.executable, "-m", "p2pgpu.cli", "devnet", "up", "--once", "--nodes", "1", "--jobs", "0",
                          "--json", "--dir", str(tmp_path / "dn2")], check=False, capture_output=True, text=True,
                         timeout=300)
    doc = json.loads(res.stdout)
    assert doc["network_view"] == doc["explorer"] + "#network"
