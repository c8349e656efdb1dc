"""Manifests the SDK tests share, as dicts (the SDK's dict form) or TOML text."""

from __future__ import annotations

from typing import Any


def job(name: str, command: list[str], *, nodes: int = 1, duration_s_max: int = 30, expires_in_s: int = 120,
        **requirements: Any) -> dict[str, Any]:
    return {
        "name": name,
        "expires_in_s": expires_in_s,
        "requirements": {"nodes": nodes, "gpus_per_node": 1, **requirements},
        "runtime": {"command": command, "duration_s_max": duration_s_max},
        "payment": {"price_per_gpu_hour_max": 36_000_000},
    }


def writes_file(name: str = "writer") -> dict[str, Any]:
    """Prints two lines and writes ``out.txt`` (an output file with a known hash)."""
    return job(name, ["sh", "-c", "echo first; echo second >&2; echo result of the job > out.txt"])


def ticking(name: str = "ticker", *, ticks: int = 6, every_s: float = 0.5) -> dict[str, Any]:
    """Prints ``tick N`` every ``every_s`` seconds: lines that arrive while a follower reads."""
    return job(name, ["sh", "-c", f"for i in $(seq 1 {ticks}); do echo tick $i; sleep {every_s}; done"])


def sleeper(name: str = "sleeper", *, sleep_s: int = 30) -> dict[str, Any]:
    return job(name, ["sh", "-c", f"echo started; sleep {sleep_s}; echo done"], duration_s_max=60)


def exits(code: int, name: str = "exits") -> dict[str, Any]:
    return job(name, ["sh", "-c", f"echo about to fail >&2; exit {code}"])
