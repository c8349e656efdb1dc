"""The output contract of ``p2pgpu sim run`` and ``p2pgpu sim sweep``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from p2pgpu.cli import main

ROOT = Path(__file__).resolve().parents[2]
FAULTY = str(ROOT / "simulations" / "ci-faulty.toml")


def test_run_prints_seed_first_and_trace_hash_last(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["sim", "run", FAULTY, "--seed", "5", "--out", str(out)]) == 0
    cap = capsys.readouterr()
    lines = cap.out.strip().splitlines()
    assert lines[0] == "seed: 5"
    assert lines[-1].startswith("trace_hash: ") and len(lines[-1]) == len("trace_hash: ") + 64
    assert any(line.startswith("advert_propagation_ms_p50: ") for line in lines)
    assert "[sim]" in cap.err or cap.err == ""  # progress goes to stderr only
    for name in ("metrics.json", "summary.csv", "series.csv", "propagation_cdf.png", "timeseries.png"):
        assert (out / name).stat().st_size > 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["summary"]["seed"] == 5
    assert (out / "propagation_cdf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_json_is_one_document_seed_first_hash_last(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "run", FAULTY, "--seed", "5", "--json", "--quiet"]) == 0
    cap = capsys.readouterr()
    doc = json.loads(cap.out)
    keys = list(doc)
    assert keys[0] == "seed" and keys[-1] == "trace_hash"
    assert doc["seed"] == 5
    assert "seed: 5" in cap.err  # still printed first, on stderr, for a run that dies


def test_bad_scenario_and_override_say_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[run]\nnodez = 3\n")
    assert main(["sim", "run", str(bad), "--seed", "1"]) != 0
    assert "run.nodez: unknown key" in capsys.readouterr().err
    assert main(["sim", "run", FAULTY, "--set", "nodes"]) != 0
    assert "SECTION.KEY=VALUE" in capsys.readouterr().err
    assert main(["sim", "run", str(tmp_path / "missing.toml")]) != 0
    assert "no such file" in capsys.readouterr().err


def test_sweep_json_and_ray_without_ray(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "sweep", FAULTY, "--seeds", "3", "--workers", "1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["seeds"] == 3 and doc["failures"] == []
    assert set(doc["metrics"]["advert_delivery_ratio"]) == {"mean", "ci95", "n"}
    try:
        import ray  # noqa: F401
    except ImportError:
        assert main(["sim", "sweep", FAULTY, "--seeds", "2", "--ray", "127.0.0.1:1"]) == 1
        assert "pip install" in capsys.readouterr().err


def test_entry_point_help() -> None:
    out = subprocess.run([sys.executable, "-m", "p2pgpu.cli", "sim", "run", "--help"],
                         capture_output=True, text=True, timeout=60, check=True)
    assert "--seed" in out.stdout and "--out" in out.stdout and "--json" in out.stdout
