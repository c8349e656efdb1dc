"""The parallel run's scheduling (tests/conftest.py), on a small suite run by real pytest-xdist workers.

``scripts/test`` runs ``pytest -n N --dist loadfile``; the suite relies on three promises of
tests/conftest.py, each checked here: a test file runs whole on one worker (its module-scoped
fixtures are built once), the longest file (by ``tests/data/file_durations.json``) is handed out
first, and tests marked ``exclusive`` with one name never overlap, even on two workers.  The run
also records each file's time in pytest's cache, which is how the JSON is refreshed.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")

TEST_BODY = '''
import os, time, pytest

def _log(name, what="start"):
    with open(os.environ["SCHED_LOG"], "a") as f:
        f.write(f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')} {__name__} {name} {what} {time.monotonic()}\\n")
'''


def _write_suite(root: Path) -> None:
    (root / "pytest.ini").write_text("[pytest]\nmarkers =\n    exclusive(name): a resource lock\n")
    shutil.copy(CONFTEST, root / "conftest.py")
    (root / "data").mkdir()
    estimates = {f"test_many{i}.py": 1.0 for i in range(3)}
    # The longest file sorts last by name, and has the fewest tests (xdist's own order: most
    # first); the files of exclusive tests come next, so that each starts on a worker of its own.
    estimates.update({"test_zlongest.py": 100.0, "test_g1.py": 50.0, "test_g2.py": 50.0})
    (root / "data" / "file_durations.json").write_text(json.dumps(estimates))
    for i in range(3):
        body = TEST_BODY + "".join(f"\ndef test_{j}():\n    _log('{j}')\n    time.sleep(0.05)\n" for j in range(8))
        (root / f"test_many{i}.py").write_text(body)
    (root / "test_zlongest.py").write_text(TEST_BODY + "\ndef test_long():\n    _log('long')\n    time.sleep(0.5)\n")
    for g in ("g1", "g2"):
        body = TEST_BODY + "".join(
            f"\n@pytest.mark.exclusive('shared')\ndef test_{g}_{j}():\n    _log('{g}_{j}')\n    time.sleep(0.3)\n"
            f"    _log('{g}_{j}', 'end')\n"
            for j in range(3))
        (root / f"test_{g}.py").write_text(body)


def _run(root: Path, log: Path) -> list[tuple[str, str, str, str, float]]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(root), "SCHED_LOG": str(log), "PYTHONDONTWRITEBYTECODE": "1",
           "TMPDIR": str(root)}  # the locks' directory: this run's own
    out = subprocess.run([sys.executable, "-m", "pytest", "-n", "3", "--dist", "loadfile", "-q", str(root)],
                         cwd=root, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    rows = []
    for line in log.read_text().splitlines():
        worker, module, name, what, t = line.split()
        rows.append((worker, module, name, what, float(t)))
    return rows


def test_files_stay_whole_the_longest_goes_first_and_exclusive_tests_never_overlap(tmp_path: Path) -> None:
    root = tmp_path / "suite"
    root.mkdir()
    _write_suite(root)
    rows = _run(root, tmp_path / "log")
    starts = [r for r in rows if r[3] == "start"]
    assert len(starts) == 3 * 8 + 1 + 2 * 3  # every test ran once

    def workers_of(*modules: str) -> set[str]:
        return {w for w, m, _, _, _ in starts if m in modules}

    for m in ("test_many0", "test_many1", "test_many2", "test_g1", "test_g2"):
        assert len(workers_of(m)) == 1, rows  # a file never split between workers

    (worker,) = workers_of("test_zlongest")
    assert min((t, m) for w, m, _, _, t in starts if w == worker)[1] == "test_zlongest", rows  # handed out first

    # The two files of exclusive tests started at once on two workers; their tests took turns.
    assert workers_of("test_g1") != workers_of("test_g2"), rows
    spans: dict[str, dict[str, float]] = {}
    for _, m, name, what, t in rows:
        if m in ("test_g1", "test_g2"):
            spans.setdefault(name, {})[what] = t
    ordered = sorted((v["start"], v["end"]) for v in spans.values())
    assert len(ordered) == 6
    assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(ordered)), ordered

    recorded = json.loads((root / ".pytest_cache" / "v" / "p2pgpu" / "file_durations").read_text())
    assert set(recorded) == {"test_many0.py", "test_many1.py", "test_many2.py", "test_zlongest.py", "test_g1.py",
                             "test_g2.py"}
    assert recorded["test_zlongest.py"] >= 0.5 and recorded["test_g1.py"] >= 3 * 0.3


def test_a_resource_name_that_is_a_path_is_refused(tmp_path: Path) -> None:
    # By path: "conftest" in sys.modules is whichever conftest pytest imported last.
    spec = importlib.util.spec_from_file_location("p2pgpu_tests_conftest", CONFTEST)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    resource_lock = mod.resource_lock

    for bad in ("", "../etc", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="plain word"), resource_lock(bad, lock_dir=tmp_path):
            pass
    assert list(tmp_path.iterdir()) == []
    with resource_lock("fine", lock_dir=tmp_path):
        assert (tmp_path / "fine.lock").exists()
