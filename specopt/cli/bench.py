"""``specopt bench``: run the ``tools/bench_*.py`` benchmarks and print their ratios.

Each script is run in its own process (``python tools/bench_X.py --quick --json F``;
``--full`` drops ``--quick``), so one benchmark's threads and memory never disturb the
next. Ratios are read back from the JSON each script writes: every numeric field whose
key contains ``ratio``, ``speedup`` or ``overhead`` (nested keys joined with ``.``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from specopt.cli._console import CommandError, console, fmt
from specopt.cli._files import check_output_path, write_output

__all__ = [
    "RATIO_KEYS", "add_parser", "default_tools_dir", "extract_ratios", "run", "run_benchmarks",
]

RATIO_KEYS = ("ratio", "speedup", "overhead")


def default_tools_dir() -> Path:
    """``tools/`` of the source checkout this package was imported from."""
    return Path(__file__).resolve().parents[2] / "tools"


def extract_ratios(obj: Any, prefix: str = "") -> dict[str, float]:
    """Flatten ``obj`` and keep numeric leaves whose key names a ratio (see module doc)."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for key, val in obj.items():
            out.update(extract_ratios(val, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(obj, list):
        for i, val in enumerate(obj):
            label = val.get("name") if isinstance(val, dict) and "name" in val else i
            out.update(extract_ratios(val, f"{prefix}[{label}]"))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        leaf = prefix.rsplit(".", 1)[-1].lower()
        if any(k in leaf for k in RATIO_KEYS):
            out[prefix] = float(obj)
    return out


def run_benchmarks(
    tools_dir: Path, *, full: bool = False, only: list[str] | None = None, timeout: float = 600,
) -> list[tuple[str, int, float, dict[str, float], str]]:
    """Run every matching script; returns ``(name, returncode, seconds, ratios, stderr tail)``."""
    scripts = sorted(tools_dir.glob("bench_*.py"))
    if only:
        scripts = [s for s in scripts if any(o in s.stem for o in only)]
    if not scripts:
        raise CommandError(f"no benchmark scripts (bench_*.py) found in {str(tools_dir)!r}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for script in scripts:
            out = Path(tmp) / f"{script.stem}.json"
            cmd = [sys.executable, str(script), "--json", str(out)] + ([] if full else ["--quick"])
            console.print(f"running {script.name} {'--full' if full else '--quick'} ...")
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"})
                code, err = proc.returncode, proc.stderr
            except subprocess.TimeoutExpired:
                code, err = 124, f"timed out after {timeout:.0f} s"
            seconds = time.perf_counter() - t0
            ratios: dict[str, float] = {}
            if code == 0 and out.is_file():
                try:
                    ratios = extract_ratios(json.loads(out.read_text()))
                except json.JSONDecodeError as exc:
                    code, err = 1, f"invalid JSON output: {exc}"
            results.append((script.stem, code, seconds, ratios, err.strip()[-400:]))
    return results


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="run the tools/bench_*.py benchmarks (quick by default) and print ratios",
        description=__doc__.split("\n\n")[0].replace("``", ""),
    )
    p.add_argument("--full", action="store_true", help="full-size runs instead of --quick")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   help="only scripts whose name contains NAME")
    p.add_argument("--tools-dir", default=None, help="folder with bench_*.py (default: ./tools "
                   "of the source checkout)")
    p.add_argument("--json", default=None, metavar="PATH", help="write all ratios as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.markup import escape
    from rich.table import Table

    if args.json:
        check_output_path(args.json, flag="--json")  # before minutes of benchmarks
    tools = Path(args.tools_dir) if args.tools_dir else default_tools_dir()
    if tools.exists() and not tools.is_dir():
        raise CommandError(f"--tools-dir {str(tools)!r} is a file, expected a folder")
    if not tools.is_dir():
        raise CommandError(
            f"benchmark folder {str(tools)!r} not found; run from a source checkout or pass "
            "--tools-dir"
        )
    results = run_benchmarks(tools, full=args.full, only=args.only)
    table = Table(title="benchmark ratios (ours vs peer, measured side by side)")
    for col in ("benchmark", "measure", "ratio", "status", "s"):
        table.add_column(col, justify="right" if col in ("ratio", "s") else "left")
    failed = 0
    for name, code, seconds, ratios, err in results:
        status = "ok" if code == 0 else f"[red]exit {code}[/]"
        failed += code != 0
        if not ratios:
            reason = err.splitlines()[-1] if code != 0 and err else "-"
            table.add_row(name, escape(reason), "-", status, f"{seconds:.1f}")
        for i, (key, val) in enumerate(ratios.items()):
            table.add_row(name if i == 0 else "", escape(key), fmt(val), status if i == 0 else "",
                          f"{seconds:.1f}" if i == 0 else "")
    console.print(table)
    if args.json:
        blob = json.dumps({n: {"returncode": c, "seconds": s, "ratios": r}
                           for n, c, s, r, _ in results}, indent=2).encode()
        write_output(args.json, lambda f: f.write(blob), flag="--json")
    return 1 if failed else 0
