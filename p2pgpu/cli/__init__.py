"""The ``p2pgpu`` command (see docs/cli.md, which is its contract).

Each command group lives in its own module with a ``register(subparsers)``
function; this file only assembles them.  Modules import heavy libraries
(libp2p, solana) inside their handlers, so ``p2pgpu --help`` stays fast.
Errors a user can fix raise :class:`CliError`: one line on stderr saying what
to do, and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ._common import CliError

#: Command modules, in the order their commands appear in ``--help``.
COMMAND_MODULES = [
    "p2pgpu.cli._operator",
    "p2pgpu.cli._doctor",
    "p2pgpu.cli._jobs",
    "p2pgpu.cli._sim",
    "p2pgpu.cli._ledger",
    "p2pgpu.cli._devnet",
    "p2pgpu.cli._explorer",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2pgpu",
        description="An open, peer-to-peer GPU compute network: run a node, submit jobs, simulate the network.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except CliError as exc:
        print(f"p2pgpu: error: {exc}", file=sys.stderr)
        return exc.code
    except BrokenPipeError:
        # stdout closed early (e.g. `| head`): not an error of ours.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("p2pgpu: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
