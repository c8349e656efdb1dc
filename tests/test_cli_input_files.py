"""Files the command reads by path are bounded before they are read (issue 12's smaller points).

Before: ``p2pgpu job submit`` sent any manifest to the daemon; one over the
control API's 2 MiB request limit got "request larger than 2097152 bytes",
and a larger one (20 MiB) a traceback (``ConnectionResetError`` while the
daemon had already closed the connection).  Now every file the CLI reads by path (manifests,
scenarios, inclusion proofs) is checked against ``input_file_bytes_max``
(the daemon's own manifest limit) first, with one line saying what to do.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pgpu.cli._common import input_file_bytes_max
from p2pgpu.localnet import LocalNet
from p2pgpu.node._job_api import manifest_text_bytes_max

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "jobs"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p2pgpu.cli", *args], capture_output=True, text=True, timeout=120,
                          check=False)


def padded_manifest(path: Path, size: int) -> Path:
    text = (EXAMPLES / "hello.toml").read_text()
    path.write_text(text + "#" * (size - len(text) - 1) + "\n")
    assert path.stat().st_size == size
    return path


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("input-files")
    with LocalNet(root, 1, gpu_mix=[("NVIDIA L4", 23034, "8.9", 1)]) as net:
        yield str(net.nodes[0].home.path)


def test_the_cli_limit_is_the_daemons_manifest_limit() -> None:
    assert input_file_bytes_max == manifest_text_bytes_max


@pytest.mark.processes
@pytest.mark.parametrize("size", [20 * 1024 * 1024, 2 * 1024 * 1024 + 1, input_file_bytes_max + 1])
def test_an_oversized_manifest_is_one_clear_line_not_a_traceback(home: str, tmp_path: Path, size: int) -> None:
    big = padded_manifest(tmp_path / "big.toml", size)
    out = cli("job", "submit", str(big), "--home", home)
    assert out.returncode == 1 and out.stdout == ""
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(f"p2pgpu: error: {big} is ") and "over the 512 KiB this command reads" in out.stderr


@pytest.mark.processes
def test_a_manifest_at_the_limit_still_reaches_the_daemon(home: str, tmp_path: Path) -> None:
    ok = padded_manifest(tmp_path / "ok.toml", input_file_bytes_max)
    out = cli("job", "submit", str(ok), "--dry-run", "--json", "--home", home)
    assert out.returncode in (0, 3) and '"dry_run": true' in out.stdout, out.stderr


def test_other_files_read_by_path_are_bounded_too(tmp_path: Path) -> None:
    big = tmp_path / "scenario.toml"
    big.write_text("#" * (input_file_bytes_max + 1))
    out = cli("sim", "run", str(big))
    assert out.returncode == 1 and "over the 512 KiB" in out.stderr and "Traceback" not in out.stderr
    out = cli("proof", "check", str(big))
    assert out.returncode == 1 and "over the 512 KiB" in out.stderr and "Traceback" not in out.stderr


def test_a_directory_or_a_missing_file_is_named(tmp_path: Path) -> None:
    out = cli("job", "submit", str(tmp_path), "--home", str(tmp_path))
    assert out.returncode == 1 and out.stderr == f"p2pgpu: error: {tmp_path} is a directory: name a file\n"
    out = cli("job", "submit", str(tmp_path / "nope.toml"), "--home", str(tmp_path))
    assert out.returncode == 1 and out.stderr == f"p2pgpu: error: {tmp_path / 'nope.toml'}: no such file\n"
