"""LR sweep v2: where is each arm's best peak LR, and where does it stop training?

Each arm of ``tools/lm_study.py`` (same training loop, same recipe options) runs at peak
LR = default x ``multipliers`` (x1/4 .. x64 in factors of 2) for ``seeds`` seeds of
``steps`` steps, scored by the final validation loss (bits/byte on ``eval_batches`` fixed
batches). Per arm:

- ``optimum``: the multiplier with the lowest seed-mean final loss; ``bracketed`` when a
  larger and a smaller swept LR both do worse (the optimum is not at the grid's edge);
- ``edge``: the first (smallest) multiplier whose final loss is worse than the baseline's
  initial loss (the seed-mean validation loss at step 0 of the arm without PC: the loss of
  not training at all), or non-finite in any seed. ``None``: no swept LR fails.

After the grid, the sweep extends itself: an arm without an edge gets the next multiplier
(x2 above its largest) and an arm whose optimum is its smallest multiplier the next one
below, all seeds, until both are found or ``--edge-limit`` (default x4096, and 1/4096) is
reached.

Usage::

    python tools/lr_sweep.py --quick
    nice -n 15 python tools/lr_sweep.py --threads 1 --resume --json docs/data/lr_sweep.json

Seed-major order (a sweep cut short holds whole grids of its first seeds), JSON rewritten
after every run, ``--resume`` skips finished runs.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm_study as lm

__all__ = ["MULTIPLIERS", "edge_and_optimum", "main", "run_sweep", "sweep_extension",
           "sweep_table"]

MULTIPLIERS = [2.0**k for k in range(-2, 7)]  # x1/4 .. x64
EDGE_LIMIT = 4096.0  # the extension stops at x4096 (and x1/4096) of the default LR

SWEEP = dict(steps=400, eval_every=400, eval_batches=8, seeds=[0, 1, 2],
             arms=["adamw", "adamw+pc4", "muon", "muon+pc2", "muon-kj"])
QUICK = dict(steps=12, batch_size=4, seq_len=32, warmup=3, eval_every=12, eval_batches=2,
             seeds=[0], arms=["adamw", "adamw+pc4"])
QUICK_MULTIPLIERS = [1.0, 64.0, 4096.0]


def run_sweep(sc: lm.StudyConfig, multipliers: list[float], *, json_path: Path | None = None,
              resume: dict[str, Any] | None = None, log: Any = print, jobs: int = 1,
              edge_limit: float = EDGE_LIMIT) -> dict[str, Any]:
    """Run (or continue) the sweep of ``sc.arms`` x ``multipliers`` x ``sc.seeds``, then
    its extensions (:func:`sweep_extension`) up to ``edge_limit``."""
    data = lm.start_data(sc, resume, "lr_sweep")
    log(lm._machine_line(sc))
    data["multipliers"] = sorted(set(multipliers) | set(data.get("multipliers", [])))
    plan = [("sweep", n, s, lm.default_lr(lm.arm(n).optimizer) * m)
            for s in sc.seeds for n in sc.arms for m in multipliers]
    more: list[tuple[str, str, int, float]] = []
    while True:
        plan += [p for p in more if p not in plan]
        data["planned"] = [list(p) for p in plan]
        lm._save(data, json_path)
        lm.run_all(data, plan, sc, json_path, log=log, jobs=jobs)
        more = [p for p in sweep_extension(data, sc, edge_limit, plan) if p not in plan]
        if not more:
            return data
        data["multipliers"] = sorted(set(data["multipliers"]) | {
            round(lr / lm.default_lr(lm.arm(n).optimizer), 9) for _, n, _, lr in more})


def sweep_extension(data: dict[str, Any], sc: lm.StudyConfig, limit: float,
                    planned: list[tuple[str, str, int, float]] | None = None
                    ) -> list[tuple[str, str, int, float]]:
    """The next runs of the self-extending sweep: x2 above an arm's largest multiplier
    while it has no edge, /2 below its smallest while that is its optimum, within
    ``[1 / limit, limit]``; every seed. Only runs in ``planned`` count when given, so a
    resumed sweep replays its extensions in the order they were made."""
    if planned is not None:
        keys = set(planned)
        data = {**data, "runs": [r for r in data["runs"]
                                 if (r["part"], r["arm"], r["seed"], r["lr"]) in keys]}
    plan = []
    for n in sc.arms:
        by = _by_mult(data, n)
        if not by:
            continue
        v = edge_and_optimum(data, n)
        nxt = []
        if v["edge"] is None and max(by) * 2 <= limit * (1 + 1e-9):
            nxt.append(max(by) * 2)
        if v["optimum"] == min(by) and min(by) / 2 >= (1 - 1e-9) / limit:
            nxt.append(min(by) / 2)
        plan += [("sweep", n, s, lm.default_lr(lm.arm(n).optimizer) * m)
                 for m in nxt for s in sc.seeds]
    return plan


def _by_mult(data: dict[str, Any], name: str) -> dict[float, list[dict[str, Any]]]:
    base = data["default_lr"][lm.arm(name).optimizer]
    out: dict[float, list[dict[str, Any]]] = {}
    for r in data["runs"]:
        if r["arm"] == name:
            out.setdefault(round(r["lr"] / base, 9), []).append(r)
    return dict(sorted(out.items()))


def edge_and_optimum(data: dict[str, Any], name: str) -> dict[str, Any]:
    """The per-arm verdict of the module docstring (multipliers of the default LR)."""
    base_runs = [r for r in data["runs"] if r["arm"] == lm.arm(name).baseline]
    init = statistics.fmean(r["initial_val_bpb"] for r in base_runs) if base_runs else math.nan
    means: dict[float, float] = {}
    edge = None
    for m, rs in _by_mult(data, name).items():
        fails = any(not math.isfinite(r["final_val_bpb"]) for r in rs)
        v = math.nan if fails else statistics.fmean(r["final_val_bpb"] for r in rs)
        means[m] = v
        if edge is None and (fails or v > init):
            edge = m
    finite = {m: v for m, v in means.items() if math.isfinite(v)}
    opt = min(finite, key=finite.get) if finite else None
    bracketed = bool(opt is not None and any(m < opt for m in means)
                     and any(m > opt for m in means))
    return {"baseline_initial": init, "means": means, "optimum": opt,
            "bracketed": bracketed, "edge": edge}


def sweep_table(data: dict[str, Any]) -> str:
    """Markdown: seed-mean final loss per (arm, multiplier), optimum and edge per arm."""
    have = len({(r["arm"], r["seed"], r["lr"]) for r in data["runs"]})
    mults = sorted(set(data["multipliers"]) | {
        m for name in data["config"]["arms"] for m in _by_mult(data, name)})
    lines = [f"Sweep runs present: {have} of {len(data['planned'])} planned "
             f"({data['config']['steps']} steps each, seeds {data['config']['seeds']}).", "",
             "| arm (default LR) | " + " | ".join(f"x{m:g}" for m in mults)
             + " | optimum | edge | baseline initial |", "|---|" + "---|" * (len(mults) + 3)]
    for name in data["config"]["arms"]:
        by = _by_mult(data, name)
        if not by:
            continue
        v = edge_and_optimum(data, name)
        cells = []
        for m in mults:
            rs = by.get(round(m, 9), [])
            mean = v["means"].get(round(m, 9))
            cells.append("-" if not rs else "non-finite" if not math.isfinite(mean)
                         else f"{mean:.3f} ({len(rs)})")
        optimum = "-" if v["optimum"] is None else (
            f"x{v['optimum']:g}" + ("" if v["bracketed"] else " (grid end)"))
        edge = "none in grid" if v["edge"] is None else f"x{v['edge']:g}"
        lines.append(f"| {name} ({data['default_lr'][lm.arm(name).optimizer]:g}) | "
                     + " | ".join(cells) + f" | {optimum} | {edge} | "
                     f"{v['baseline_initial']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=Path)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--tables", action="store_true", help="no training: print --json's table")
    p.add_argument("--multipliers", type=float, nargs="+")
    p.add_argument("--edge-limit", type=float,
                   help="extend the grid by factors of 2 up to this multiplier (and 1/it) "
                        f"until each arm's edge and optimum are found (default {EDGE_LIMIT:g}; "
                        "with --quick 1: no extension)")
    lm.add_study_flags(p)
    args = p.parse_args(argv)
    if (code := lm.early_exit(args, p, sweep_table)) is not None:
        return code
    base = {**SWEEP, **(QUICK if args.quick else {})}
    if args.steps is not None:
        base["eval_every"] = args.steps  # a sweep validates at its end only
    sc = lm.study_config(args, base)
    mults = args.multipliers or (QUICK_MULTIPLIERS if args.quick else MULTIPLIERS)
    limit = args.edge_limit if args.edge_limit is not None else 1.0 if args.quick else EDGE_LIMIT
    if limit < 1:
        p.error(f"--edge-limit must be >= 1, got {limit:g}")
    data = lm.run_from_cli(args, sc, functools.partial(run_sweep, sc, mults, edge_limit=limit))
    print()
    print(sweep_table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
