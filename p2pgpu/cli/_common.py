"""Shared pieces of the command line: errors, ``--home``/``--json`` flags, output."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from p2pgpu.home import Home, HomeError, resolve_home


class CliError(Exception):
    """A failure the user can act on; ``str()`` says what to do."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def add_home(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", metavar="DIR", help="node home (default: $P2PGPU_HOME, else ~/.p2pgpu)")


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def home_of(args: argparse.Namespace) -> Home:
    return Home(resolve_home(getattr(args, "home", None)))


def emit(args: argparse.Namespace, doc: Any, human: Callable[[Any], str]) -> None:
    """Print ``doc`` as JSON with ``--json``, else as ``human(doc)``."""
    if getattr(args, "json", False):
        json.dump(doc, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        text = human(doc)
        if text:
            print(text)


def table(rows: list[list[str]], header: list[str]) -> str:
    if not rows:
        return ""
    cols = [header, *rows]
    widths = [max(len(str(r[i])) for r in cols) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in cols]
    return "\n".join(lines)


def wrap_home_errors(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except HomeError as exc:
            raise CliError(str(exc)) from None

    return run


def read_path(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise CliError(f"{path}: no such file")
    return p
