"""The ``specopt`` command: ``train``, ``compare``, ``inspect``, ``diagnose``, ``merge``, ``bench``.

Each subcommand lives in its own module (``specopt/cli/<command>.py``) exposing
``add_parser(subparsers)``, which registers its flags and sets ``func`` to its ``run(args)``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from rich.markup import escape

from specopt import __version__
from specopt.cli._console import CommandError, err_console

__all__ = ["COMMANDS", "build_parser", "main"]

#: Subcommand modules, in the order ``specopt --help`` lists them.
COMMANDS = ("train", "compare", "inspect", "diagnose", "merge", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specopt",
        description="Muon/AdamW, the PC layer and spectral monitoring: train, watch, diagnose.",
    )
    parser.add_argument("--version", action="version", version=f"specopt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"specopt.cli.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status.

    0: success; 1: the command ran but found a failure (a diverged run, a failing
    benchmark); 2: bad usage or input (the message names the problem, no traceback).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CommandError as exc:
        err_console.print(f"[bold red]specopt {args.command}: error:[/] {escape(str(exc))}")
        return 2
    except KeyboardInterrupt:
        err_console.print(f"specopt {args.command}: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
