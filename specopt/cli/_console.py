"""Shared terminal helpers for the CLI commands (one rich Console, number formatting)."""

from __future__ import annotations

import math
import sys

from rich.console import Console

__all__ = ["CommandError", "console", "err_console", "fmt"]

# Piped / captured output gets 120 columns instead of rich's 80, so tables keep their
# numbers and layer names whole; a terminal uses its own width.
console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True, highlight=False, soft_wrap=True,
                      width=None if sys.stderr.isatty() else 120)


class CommandError(Exception):
    """A user-facing failure: ``main`` prints the message (no traceback) and exits 2."""


def fmt(x: float, digits: int = 4) -> str:
    """Compact number: ``inf``/``nan`` spelled out, general format otherwise."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}g}"
