"""The CLI's bridge to the SDK: a :class:`~p2pgpu.sdk.Client` for ``--home``,
and SDK errors turned into the CLI's one-line errors.

The commands that talk to a daemon (``job ...``, ``status``, ``peers``,
``market``) and the reporting commands (``payouts``, ``earnings``,
``wallet``) are written on the SDK, so a script gets exactly what the CLI
prints: ``Client(home).status()`` is ``p2pgpu status --json``.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

from ._common import CliError, home_of, wrap_home_errors

if TYPE_CHECKING:
    from p2pgpu.sdk import Client


def client_of(args: argparse.Namespace) -> Client:
    from p2pgpu.sdk import Client

    return Client(home_of(args))


def wrap_sdk_errors(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``fn`` with every SDK error (and home error) as a :class:`CliError` (exit 1, its message)."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        from p2pgpu.sdk import P2pgpuError

        try:
            return fn(args)
        except P2pgpuError as exc:
            raise CliError(str(exc)) from None

    return wrap_home_errors(run)
