"""The ``specopt`` command: ``train``, ``compare``, ``inspect``, ``diagnose``, ``merge``, ``bench``.

Each subcommand lives in its own module (``specopt/cli/<command>.py``) exposing
``add_parser(subparsers)``, which registers its flags and sets ``func`` to its ``run(args)``.

Errors: a command raises :class:`~specopt.cli._console.CommandError` for bad input; an
``OSError`` escaping a command (disk full, permission denied) or running out of memory
(CPU or GPU) is bad environment, not a bug. All print one line and exit 2. Anything else
is a bug: one line naming the exception, exit 1. ``--debug`` (before or after the
subcommand) adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import traceback
from collections.abc import Sequence

import torch
from rich.markup import escape

from specopt import __version__
from specopt.cli._console import CommandError, err_console

__all__ = ["COMMANDS", "EXIT_BUG", "EXIT_USAGE", "build_parser", "main"]

#: Subcommand modules, in the order ``specopt --help`` lists them.
COMMANDS = ("train", "compare", "inspect", "diagnose", "merge", "bench")
#: Exit status of bad usage or input (argparse uses 2 too).
EXIT_USAGE = 2
#: Exit status of an unexpected exception (a bug in specopt or a library).
EXIT_BUG = 1

_DEBUG_HELP = "on an error, also print the Python traceback"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specopt",
        description="Muon/AdamW, the PC layer and spectral monitoring: train, watch, diagnose.",
    )
    parser.add_argument("--version", action="version", version=f"specopt {__version__}")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"specopt.cli.{name}").add_parser(sub)
    for command_parser in sub.choices.values():
        if "--debug" in command_parser._option_string_actions:
            continue  # the command defines its own
        # Also accepted after the subcommand. SUPPRESS: when absent there, the
        # subparser sets nothing, so a top-level --debug is not reset to False.
        command_parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                    help=_DEBUG_HELP)
    return parser


def _report(command: str, message: str, exc: BaseException, *, debug: bool) -> None:
    if debug:
        err_console.print(escape("".join(traceback.format_exception(exc)).rstrip()))
    # One line: a multi-line message (some libraries' errors) is joined.
    line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    err_console.print(f"[bold red]specopt {command}: error:[/] {escape(line)}")


#: What torch's CPU allocator says when malloc fails (a plain RuntimeError, unlike CUDA's
#: torch.OutOfMemoryError).
_CPU_OOM_MARK = "can't allocate memory"
#: Per command: the flags that set its memory use, named in an out-of-memory message.
_MEMORY_HINTS = {"train": "a smaller --batch-size, --seq-len or --preset needs less"}


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and _CPU_OOM_MARK in str(exc))


def _memory_message(command: str, exc: BaseException) -> str:
    """One line: how much was asked for (torch says it) and the command's memory flags."""
    text = str(exc)
    asked = re.search(r"tried to allocate ([\d.]+ ?\w*)", text)
    what = f"tried to allocate {asked.group(1)}" if asked else type(exc).__name__
    hint = _MEMORY_HINTS.get(command)
    return f"out of memory ({what})" + (f": {hint}" if hint else "")


def _empty_argument(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """The first option or positional given as an empty string, in CLI words, or None.

    Why: every string argument here is a path (or pattern), and ``""`` means "not given"
    to the commands (``--resume ""`` started a fresh run, ``--log-dir ""`` trained into the
    current folder, ``--out ""`` wrote to the default path).
    """
    command_parser = parser._subparsers._group_actions[0].choices[args.command]  # type: ignore[union-attr]
    for action in command_parser._actions:
        value = getattr(args, action.dest, None)
        values = value if isinstance(value, list) else [value]
        if any(v == "" for v in values):
            return action.option_strings[-1] if action.option_strings else \
                (action.metavar or action.dest).upper()
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status.

    0: success; 1: the command ran but found a failure (a diverged run, a failing
    benchmark), or an unexpected exception (a bug: rerun with ``--debug``); 2: bad usage,
    input or environment (the message names the file or flag and the problem).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    empty = _empty_argument(parser, args)
    if empty is not None:
        err_console.print(f"[bold red]specopt {args.command}: error:[/] {escape(empty)} is an "
                          "empty string; give a value, or leave the option out")
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except CommandError as exc:
        _report(args.command, str(exc), exc, debug=debug)
        return EXIT_USAGE
    except OSError as exc:  # disk full, permission denied, ... outside the command's checks
        _report(args.command, str(exc) or type(exc).__name__, exc, debug=debug)
        return EXIT_USAGE
    except KeyboardInterrupt:
        err_console.print(f"specopt {args.command}: interrupted")
        return 130
    except Exception as exc:
        if _out_of_memory(exc):  # bad environment or too large a setting, not a bug
            _report(args.command, _memory_message(args.command, exc), exc, debug=debug)
            return EXIT_USAGE
        hint = "" if debug else " (rerun with --debug for the traceback)"
        _report(args.command, f"unexpected {type(exc).__name__}: {exc}{hint}", exc, debug=debug)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
