"""Every script in ``examples/sdk/`` runs, as a user would run it, against a
LocalNet of real daemons (three nodes with two simulated GPUs each), and
prints what its docstring promises.  A new example without a case here fails
``test_every_example_is_covered``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pgpu.localnet import LocalNet

pytestmark = pytest.mark.processes
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "sdk"

#: script -> lines (substrings) its output must contain.
EXPECTED = {
    "submit_and_wait.py": ["submitted ", "succeeded: cluster of 1", "hello from p2pgpu"],
    "results.py": ["squares-0.txt", "squares-1.txt", "0 1 4 9 16", "25 36 49 64 81"],
    "follow_logs.py": [" s  3", " s  liftoff", "final state: succeeded"],
    "cancel.py": ["running; cancelling", "ended cancelled: "],
    "market.py": ["2x NVIDIA L4", "GPUs per node", "enough peers for 2 nodes of 8 GPUs: False"],
    "async_trio.py": ["hello | hello from p2pgpu", "  pair | rank 1 of 2", "hello | succeeded", "  pair | succeeded"],
    "errors.py": ["bad manifest, field requirements.nodes", "unknown job: no job 000000",
                  "job failed: member", "exited with code 3", "no daemon: no node home at /nonexistent/home"],
}


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNet]:
    root = tmp_path_factory.mktemp("sdk-examples")
    with LocalNet(root, 3, gpu_mix=[("NVIDIA L4", 23034, "8.9", 2)]) as net:
        net.wait_until(lambda: all(n.call("status")["adverts_known"] == 3 for n in net.nodes), timeout_s=60,
                       what="every node sees every advert")
        yield net


def test_every_example_is_covered() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_runs(net: LocalNet, script: str, tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, str(EXAMPLES / script), "--home", str(net.nodes[0].home.path)],
                         check=False, capture_output=True, text=True, timeout=240, cwd=tmp_path,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert res.returncode == 0, res.stderr
    for want in EXPECTED[script]:
        assert want in res.stdout, f"{script} did not print {want!r}:\n{res.stdout}"
