"""The README's first command on a machine without bubblewrap (issue 17's "done when").

A fresh Debian or Ubuntu has no bubblewrap; the devnet used to start a ledger
and four nodes anyway and end three minutes later with ``devnet FAILED: 3
job(s) failed`` and no reason on screen.  Now it checks its prerequisites
before it starts anything and names what is missing and the command that
installs it.

The test runs the README's first command, word for word as the README has
it, in a copy of the repository, in a fresh virtual environment, with
``bwrap`` hidden from ``PATH``.  The only help it gets is where pip finds
packages: a wheel directory built once per dependency set and kept between
runs (``$P2PGPU_TEST_WHEELHOUSE``, else ``~/.cache/p2pgpu/test-wheels``), so
the command needs no network after the first run.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.processes
REPO = Path(__file__).resolve().parents[2]
HIDDEN = "bwrap"


def readme_first_command() -> str:
    """The first line of the README's first ``sh`` block: the command it
    tells a newcomer to run."""
    text = (REPO / "README.md").read_text()
    m = re.search(r"```sh\n(.+?)\n```", text, re.DOTALL)
    assert m, "the README has no sh block"
    return m.group(1).strip()


def path_without(name: str, farm: Path) -> str:
    """A PATH of one directory holding links to every program on this PATH but ``name``."""
    farm.mkdir()
    for d in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/sbin", "/sbin"]:
        if not os.path.isdir(d):
            continue
        for entry in sorted(os.listdir(d)):
            target = os.path.join(d, entry)
            if entry != name and not (farm / entry).exists() and os.access(target, os.X_OK):
                (farm / entry).symlink_to(target)
    return str(farm)


def copy_repo(dest: Path) -> Path:
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", ".hypothesis", "build", "dist",
        "test-artifacts", "out"))
    return dest


@pytest.fixture(scope="session")
def wheelhouse() -> Path:
    """Wheels of every dependency (and the build backend), built once per
    version of pyproject.toml and kept; built into a temporary directory and
    renamed, so concurrent runs never see half of one."""
    key = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:16]
    base = Path(os.environ.get("P2PGPU_TEST_WHEELHOUSE") or Path.home() / ".cache" / "p2pgpu" / "test-wheels")
    final = base / key
    if (final / "complete").exists():
        return final
    base.mkdir(parents=True, exist_ok=True)
    tmp = base / f".{key}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    src = copy_repo(base / f".{key}.{os.getpid()}.src")  # pip wheel writes build/ into its source
    for argv in ([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(tmp), str(src)],
                 [sys.executable, "-m", "pip", "download", "-q", "-d", str(tmp), "setuptools>=68", "wheel"]):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
        if out.returncode != 0:
            shutil.rmtree(src, ignore_errors=True)
            pytest.skip(f"cannot build the wheel directory (no package index?): {out.stderr[-500:]}")
    shutil.rmtree(src, ignore_errors=True)
    for own in tmp.glob("p2pgpu-*.whl"):
        own.unlink()  # the command installs the project itself from source (-e .)
    (tmp / "complete").write_text("")
    try:
        tmp.rename(final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another run finished first: use its copy
    return final


def hidden_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON", "PIP_"))}
    (tmp_path / "tmp").mkdir()
    env.update(PATH=path_without(HIDDEN, tmp_path / "bin"), TMPDIR=str(tmp_path / "tmp"), **extra)
    return env


def devnet_dirs(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "tmp").glob("p2pgpu-devnet-*"))


def expected_fix() -> str:
    from p2pgpu.doctor import install_command

    return install_command("bubblewrap")


def test_readme_first_command_without_bubblewrap_names_it_before_starting_anything(
        tmp_path: Path, wheelhouse: Path) -> None:
    command = readme_first_command()
    assert command.startswith("python3 -m venv .venv && .venv/bin/pip install") and "devnet up" in command
    repo = copy_repo(tmp_path / "repo")
    env = hidden_env(tmp_path, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheelhouse), PIP_NO_COMPILE="1")
    assert shutil.which(HIDDEN, path=env["PATH"]) is None and shutil.which("python3", path=env["PATH"])
    t0 = time.monotonic()
    out = subprocess.run(["bash", "-c", command], cwd=repo, env=env, capture_output=True, text=True, timeout=900,
                         check=False)
    said = out.stdout + out.stderr
    assert (repo / ".venv" / "bin" / "p2pgpu").exists(), said[-3000:]  # the install part ran
    if out.returncode == 0:  # a machine where the devnet can run without bwrap on PATH: it must have worked
        assert "devnet:" in out.stdout and "ledger balances match: yes" in out.stdout, said[-3000:]
        return
    assert out.returncode == 1, said[-3000:]
    assert ("devnet FAILED: missing prerequisite: bubblewrap (bwrap) is not installed. "
            f"To fix: {expected_fix()} (nothing was started)") in out.stdout, said[-3000:]
    assert "[devnet]" not in said  # no progress: no ledger, no node was started
    assert devnet_dirs(tmp_path) == []
    print(f"README command without bwrap: exit {out.returncode} after {time.monotonic() - t0:.1f} s")


def test_devnet_checks_prerequisites_before_it_makes_anything(tmp_path: Path) -> None:
    env = hidden_env(tmp_path)
    out = subprocess.run([sys.executable, "-m", "p2pgpu.cli", "devnet", "up", "--once", "--json",
                          "--dir", str(tmp_path / "devnet")], env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    import json

    doc = json.loads(out.stdout)
    assert out.returncode == 1 and doc["ok"] is False and doc["dir"] is None
    assert [c["name"] for c in doc["prerequisites"]] == ["bubblewrap"]
    assert doc["prerequisites"][0]["fix"] == expected_fix()
    assert not (tmp_path / "devnet").exists() and devnet_dirs(tmp_path) == []
