"""``specopt compare RUN_A RUN_B ...``: loss curves and condition numbers side by side.

Reads each run folder's TensorBoard events (no re-computation), writes one PNG with
three panels (training loss, validation bits per byte, worst-layer condition number on a
log scale, each vs step) and prints a table: steps, final train loss, final and best
validation bits/byte, worst and geometric-mean condition number at the end, wall time.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from specopt.cli._console import CommandError, console, err_console, fmt
from specopt.cli._events import RunLog, read_run
from specopt.cli._files import check_output_path, write_output

__all__ = ["RunSummary", "add_parser", "compare_runs", "condition_trajectory", "run"]

def layer_series(
    run: RunLog, metric: str, *, include_raw: bool = False
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{layer key: (steps, values)}`` of the monitor's per-layer tags
    ``spectral/<metric>/<layer>`` (parsed with :func:`specopt.spectral.sinks.parse_tag`).

    Layer keys ending in ``/raw`` (a PC layer's raw, trained weight) are skipped unless
    ``include_raw``: the effective weight is what the network applies.
    """
    from specopt.spectral.sinks import RAW_SUFFIX, parse_tag

    out = {}
    for tag, series in run.scalars.items():
        parsed = parse_tag(tag)
        if parsed is None or parsed[0] != "metric" or parsed[1] != metric or parsed[2] is None:
            continue
        if include_raw or not parsed[2].endswith(RAW_SUFFIX):
            out[parsed[2]] = series
    return dict(sorted(out.items()))


def condition_trajectory(run: RunLog) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, worst-layer condition number, geometric mean over layers) per logged step.

    Worst layer: max over the per-layer effective-weight series the monitor logged.
    Geometric mean: the monitor's ``spectral/model/condition_number`` when logged, else
    :func:`specopt.spectral.metrics.geometric_mean` of the per-layer values.
    """
    import torch

    from specopt.spectral.metrics import geometric_mean

    per_layer = layer_series(run, "condition_number")
    if not per_layer:
        empty = np.zeros(0)
        return empty.astype(np.int64), empty, empty
    steps = np.unique(np.concatenate([s for s, _ in per_layer.values()]))
    table = np.full((steps.size, len(per_layer)), np.nan)
    for j, (s, v) in enumerate(per_layer.values()):
        table[np.searchsorted(steps, s), j] = v
    with np.errstate(all="ignore"):
        worst = np.where(np.isnan(table).all(axis=1), np.nan,
                         np.nanmax(np.where(np.isnan(table), -np.inf, table), axis=1))
    from specopt.spectral.sinks import model_tag

    m_steps, m_vals = run.series(model_tag("condition_number"))
    if m_steps.size and np.array_equal(m_steps, steps):
        gmean = m_vals
    else:
        gmean = geometric_mean(torch.from_numpy(table)).numpy()
    return steps, worst, gmean


@dataclass
class RunSummary:
    name: str
    steps: int
    train_loss: float  # mean of the last 10 logged training losses, nats/byte
    val_bpb: float  # last validation bits/byte
    best_val_bpb: float
    worst_cond: float  # worst-layer condition number at the last monitored step
    gmean_cond: float  # geometric mean over layers at the last monitored step
    wall_s: float


def summarize(run: RunLog) -> RunSummary:
    steps, loss = run.series("train/loss")
    _, bpb = run.series("val/bpb")
    _, worst, gmean = condition_trajectory(run)
    return RunSummary(
        name=run.name,
        steps=int(steps[-1]) if steps.size else 0,
        train_loss=float(np.mean(loss[-10:])) if loss.size else math.nan,
        val_bpb=float(bpb[-1]) if bpb.size else math.nan,
        best_val_bpb=float(np.nanmin(bpb)) if bpb.size and np.isfinite(bpb).any() else math.nan,
        worst_cond=float(worst[-1]) if worst.size else math.nan,
        gmean_cond=float(gmean[-1]) if gmean.size else math.nan,
        wall_s=run.wall[1] - run.wall[0],
    )


def _labels(paths: list[Path]) -> list[str]:
    """Shortest distinguishing labels: the folder name, with its parent when names clash."""
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{p.parent.name}/{p.name}" for p in paths]


def plot_runs(runs: list[RunLog], labels: list[str], out: Path) -> Path:
    """Write the three-panel comparison PNG (matplotlib Agg backend) atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    for run, label in zip(runs, labels, strict=True):
        steps, loss = run.series("train/loss")
        if loss.size:
            # EMA over ~1/30 of the run so noisy per-batch losses stay readable; the raw
            # values are drawn faintly behind.
            alpha = 2 / (max(1.0, loss.size / 30) + 1)
            smooth = np.empty_like(loss)
            acc = loss[0]
            for i, x in enumerate(loss):
                acc = (1 - alpha) * acc + alpha * x if np.isfinite(x) else x
                smooth[i] = acc
            line, = axes[0].plot(steps, smooth, label=label)
            axes[0].plot(steps, loss, color=line.get_color(), alpha=0.2, linewidth=0.7)
        vs, bpb = run.series("val/bpb")
        if bpb.size:
            axes[1].plot(vs, bpb, marker="o", markersize=3, label=label)
        cs, worst, gmean = condition_trajectory(run)
        if worst.size:
            marker = "o" if worst.size < 30 else None
            line, = axes[2].plot(cs, worst, marker=marker, markersize=3,
                                 label=f"{label} (worst layer)")
            axes[2].plot(cs, gmean, color=line.get_color(), linestyle="--", marker=marker,
                         markersize=3, label=f"{label} (geo. mean)")
    axes[0].set(title="training loss (smoothed)", xlabel="step", ylabel="nats / byte")
    axes[1].set(title="validation", xlabel="step", ylabel="bits / byte")
    axes[2].set(title="condition number", xlabel="step", ylabel="sigma_max / sigma_min")
    if any(line.get_ydata().size for line in axes[2].get_lines()):
        axes[2].set_yscale("log")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    try:
        return write_output(out, lambda f: fig.savefig(f, format="png", dpi=110), flag="--out")
    finally:
        plt.close(fig)


def compare_runs(run_dirs: list[str | Path], *, out: str | Path) -> list[RunSummary]:
    """Read runs, print the comparison table, write the PNG to ``out``; returns summaries."""
    from rich.markup import escape
    from rich.table import Table

    check_output_path(out, flag="--out")  # before reading the runs
    paths = [Path(p) for p in run_dirs]
    runs = []
    for p in paths:
        try:
            runs.append(read_run(p))
        except (OSError, ValueError) as exc:  # missing folder, a file, corrupt event file
            raise CommandError(str(exc)) from exc
    for warning in (w for r in runs for w in r.warnings):
        err_console.print(f"[yellow]specopt compare: warning:[/] {escape(warning)}")
    labels = _labels(paths)
    summaries = [summarize(r) for r in runs]
    table = Table(title="run comparison")
    table.add_column("run", no_wrap=True, min_width=max(len(label) for label in labels))
    for col in ("steps", "train loss", "val bits/byte", "best val", "worst cond",
                "geo-mean cond", "wall s"):
        table.add_column(col, justify="right")
    best = min((s.val_bpb for s in summaries if math.isfinite(s.val_bpb)), default=math.nan)
    for label, s in zip(labels, summaries, strict=True):
        val = fmt(s.val_bpb)
        if math.isfinite(s.val_bpb) and s.val_bpb == best and len(summaries) > 1:
            val = f"[bold green]{val}[/]"
        table.add_row(label, str(s.steps), fmt(s.train_loss), val, fmt(s.best_val_bpb),
                      fmt(s.worst_cond), fmt(s.gmean_cond), f"{s.wall_s:.1f}")
    console.print(table)
    png = plot_runs(runs, labels, Path(out))
    console.print(f"plot: [bold]{escape(str(png))}[/]")
    return summaries


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare", help="compare runs: loss and condition-number plots + table",
        description=__doc__.split("\n\n")[0].replace("``", ""),
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (TensorBoard log dirs)")
    p.add_argument("--out", default="compare.png", help="PNG path (default: compare.png)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    compare_runs(args.runs, out=args.out)
    return 0
