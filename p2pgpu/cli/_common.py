"""Shared pieces of the command line: errors, ``--home``/``--json`` flags, output."""

from __future__ import annotations

import argparse
import json
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


#: The largest file the command reads by path (a manifest, a scenario, a
#: proof).  A manifest is the largest of them, and the daemon takes at most
#: 512 KiB of manifest text (``node/_job_api.py manifest_text_bytes_max``):
#: anything larger could never be submitted.
input_file_bytes_max = 512 * 1024


def read_path(path: str, *, bytes_max: int = input_file_bytes_max) -> Path:
    """``path`` as a Path, once it is known to be a readable file of at most
    ``bytes_max`` bytes (a pipe, e.g. ``<(...)``, has no size to check)."""
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except FileNotFoundError:
        raise CliError(f"{path}: no such file") from None
    except OSError as exc:
        raise CliError(f"{path}: cannot read it ({exc.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise CliError(f"{path} is a directory: name a file")
    if stat.S_ISREG(st.st_mode) and st.st_size > bytes_max:
        raise CliError(f"{path} is {_size(st.st_size)}, over the {_size(bytes_max)} this command reads; a job's "
                       "large inputs go by sha256 in the manifest, not inline (docs/manifest.md)")
    return p


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n // 1024} KiB" if n >= 1024 else f"{n} bytes"
