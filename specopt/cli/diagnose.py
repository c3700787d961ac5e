"""``specopt diagnose LOGDIR``: find loss spikes and the layers whose spectra rose first.

Reads a run's TensorBoard events (``train/loss`` and the monitor's per-layer
``spectral/<metric>/<layer>`` scalars and ``alarms`` text) and reports, ranked by
severity:

1. **Loss spikes.** A logged loss ``L_t`` is anomalous when it is non-finite, or
   ``L_t > median + max(k * 1.4826 * MAD, rel * |median|)`` over the previous ``window``
   normal losses (a sudden jump), or ``L_t > (1 + jump) * best`` with ``best`` the lowest
   rolling median seen so far (a run drifting upward, which a rolling baseline would
   follow). Median/MAD are robust, and anomalous losses never enter the baseline.
   Consecutive anomalous steps (gap <= ``merge_gap``) form one spike; severity = peak
   loss / baseline median (``inf`` for non-finite).
2. **Precursors.** For each spike at step ``s`` and each layer series of the metrics in
   :data:`PRECURSOR_METRICS`, over the ``lookback`` steps before ``s``: baseline = the
   median of the first three points (fewer when only a few exist); onset = first step
   where the value reaches ``(1 + rise) * baseline``; growth = last value before ``s`` /
   baseline. Layers that rose are ranked by onset (earliest first), then by growth.
3. **Alarms** the monitor fired (tag ``alarms``), with their steps; those inside a spike's
   look-back window are listed with it.

The run *ended diverged* (:func:`ended_diverged`; exit status 1, like ``specopt train``
on such a run) when its last logged loss is non-finite, or lies inside a spike and above
``(1 + jump)`` times that spike's baseline: a spike it did not recover from.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from specopt.cli._console import CommandError, console, err_console, fmt
from specopt.cli._events import RunLog, read_run
from specopt.cli._files import check_output_path, write_output

__all__ = [
    "PRECURSOR_METRICS",
    "Diagnosis",
    "Precursor",
    "Spike",
    "add_parser",
    "detect_spikes",
    "diagnose",
    "ended_diverged",
    "find_precursors",
    "run",
]

#: Per-layer metrics searched for precursors: the every-step power-iteration sigma_max,
#: and the snapshot metrics sigma_max and condition number.
PRECURSOR_METRICS = ("sigma_max_pi", "sigma_max", "condition_number")


@dataclass
class Precursor:
    layer: str
    metric: str
    onset_step: int  # first step the value reached (1 + rise) * baseline
    lead: int  # spike step - onset step
    baseline: float
    value: float  # last value before the spike
    growth: float  # value / baseline


@dataclass
class Spike:
    step: int  # first anomalous step
    end_step: int  # last anomalous step of this spike
    peak_loss: float
    baseline: float  # median loss before the spike
    severity: float  # peak / baseline (inf when the loss went non-finite)
    precursors: list[Precursor] = field(default_factory=list)
    alarms: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class Diagnosis:
    run: str
    steps: int  # last logged training step
    diverged: bool  # ended_diverged(): non-finite at the end, or ends in a spike
    spikes: list[Spike]  # ranked, most severe first
    alarms: list[tuple[int, str]]  # every alarm text, by step
    warnings: list[str] = field(default_factory=list)  # event files read only in part

    def to_dict(self) -> dict:
        return asdict(self)


def detect_spikes(
    steps: np.ndarray, losses: np.ndarray, *, window: int = 20, k: float = 6.0,
    rel: float = 0.1, jump: float = 0.5, merge_gap: int = 3, min_history: int = 3,
) -> list[tuple[int, int, float, float]]:
    """Spikes of a loss series as ``(first step, last step, peak, baseline)`` in step order.

    See the module docstring for the rule; ``peak`` is ``inf`` when a loss is non-finite.
    The first ``min_history`` finite losses are taken as normal.
    """
    normal: list[float] = []
    best = math.inf  # lowest rolling median so far
    flagged: list[tuple[int, float, float]] = []  # (step, loss, baseline)
    for s, x in zip(steps.tolist(), losses.tolist(), strict=True):
        hist = np.asarray(normal[-window:])
        if hist.size < min_history:
            if math.isfinite(x):
                normal.append(x)
            continue
        med = float(np.median(hist))
        best = min(best, med)
        mad = 1.4826 * float(np.median(np.abs(hist - med)))
        if (not math.isfinite(x) or x > med + max(k * mad, rel * abs(med))
                or (best > 0 and x > (1 + jump) * best)):
            flagged.append((s, x, med))
        else:
            normal.append(x)
    spikes: list[tuple[int, int, float, float]] = []
    for s, x, med in flagged:
        peak = x if math.isfinite(x) else math.inf
        if spikes and s - spikes[-1][1] <= merge_gap:
            first, _, old_peak, base = spikes[-1]
            spikes[-1] = (first, s, max(old_peak, peak), base)
        else:
            spikes.append((s, s, peak, med))
    return spikes


def ended_diverged(
    steps: np.ndarray, losses: np.ndarray, spikes: list[tuple[int, int, float, float]], *,
    jump: float = 0.5,
) -> bool:
    """Whether a loss series ends diverged: its last loss is non-finite, or the last step
    is inside one of ``spikes`` (:func:`detect_spikes` of the series) with a loss above
    ``(1 + jump)`` times the spike's baseline (not a blip the run recovered from)."""
    if not steps.size:
        return False
    last_step, last = int(steps[-1]), float(losses[-1])
    if not math.isfinite(last):
        return True
    return any(first <= last_step <= end and last > (1 + jump) * base
               for first, end, _, base in spikes)


def find_precursors(
    run: RunLog, spike_step: int, *, lookback: int = 50, rise: float = 0.25,
    metrics: tuple[str, ...] = PRECURSOR_METRICS,
) -> list[Precursor]:
    """Layers whose ``metrics`` rose by at least ``rise`` in the ``lookback`` steps before
    ``spike_step``, ranked by onset step then growth."""
    from specopt.spectral.sinks import parse_tag

    found: list[Precursor] = []
    for tag, (steps, values) in run.scalars.items():
        parsed = parse_tag(tag)
        if parsed is None or parsed[0] != "metric" or parsed[1] not in metrics or not parsed[2]:
            continue
        sel = (steps >= spike_step - lookback) & (steps < spike_step)
        s, v = steps[sel], values[sel]
        if s.size < 2:
            continue
        base = float(np.median(v[: min(3, s.size - 1)]))
        if not (math.isfinite(base) and base > 0):
            continue
        # Non-finite values count as having risen: a layer that went NaN/Inf first matters.
        risen = ~np.isfinite(v) | (v >= (1 + rise) * base)
        if not risen.any():
            continue
        onset = int(s[int(np.argmax(risen))])
        last = float(v[-1])
        growth = last / base if math.isfinite(last) else math.inf
        if growth < 1 + rise and math.isfinite(growth):
            continue  # rose and fell back before the spike: not a precursor
        found.append(Precursor(parsed[2], parsed[1], onset, spike_step - onset, base, last, growth))
    found.sort(key=lambda p: (p.onset_step, -p.growth, p.layer, p.metric))
    return found


def diagnose(
    logdir: str | Path, *, window: int = 20, k: float = 6.0, jump: float = 0.5, lookback: int = 50,
    rise: float = 0.25, top: int = 5,
) -> Diagnosis:
    """Analyse one run folder (see the module docstring); nothing is printed.

    Raises:
        CommandError: a bad setting (named), or a missing / unreadable run folder or
            event file (named).
    """
    for name, value, low in (("window", window, 1), ("lookback", lookback, 1), ("top", top, 0)):
        if not (isinstance(value, int) and value >= low):
            raise CommandError(f"--{name} must be an integer >= {low}, got {value!r}")
    for name, value in (("k", k), ("jump", jump), ("rise", rise)):
        if not (math.isfinite(value) and value > 0):
            raise CommandError(f"--{name} must be a positive finite number, got {value!r}")
    try:
        run = read_run(logdir)
    except (OSError, ValueError) as exc:  # missing folder, a file, corrupt event file
        raise CommandError(str(exc)) from exc
    steps, losses = run.series("train/loss")
    if not steps.size:
        raise CommandError(f"{str(logdir)!r} has no 'train/loss' scalars to diagnose")
    alarms = [(s, text) for s, tag, text in run.texts if tag == "alarms"]
    spikes = []
    found = detect_spikes(steps, losses, window=window, k=k, jump=jump)
    for first, last, peak, base in found:
        spike = Spike(first, last, peak, base, peak / base if base > 0 else math.inf)
        spike.precursors = find_precursors(run, first, lookback=lookback, rise=rise)[:top]
        spike.alarms = [(s, t) for s, t in alarms if first - lookback <= s <= last]
        spikes.append(spike)
    spikes.sort(key=lambda sp: (-sp.severity, sp.step))
    return Diagnosis(
        run=str(logdir), steps=int(steps[-1]),
        diverged=ended_diverged(steps, losses, found, jump=jump),
        spikes=spikes, alarms=alarms, warnings=run.warnings,
    )


def print_diagnosis(d: Diagnosis) -> None:
    from rich.markup import escape
    from rich.table import Table

    for warning in d.warnings:
        err_console.print(f"[yellow]specopt diagnose: warning:[/] {escape(warning)}")
    head = f"[bold]diagnosis of {escape(d.run)}[/]: {d.steps} steps"
    if d.diverged:
        head += (", [bold red]diverged (the loss at the end is non-finite or far above its "
                 "baseline)[/]")
    console.print(head)
    if not d.spikes:
        console.print("no loss spikes found")
    for rank, sp in enumerate(d.spikes, 1):
        span = f"step {sp.step}" + (f"-{sp.end_step}" if sp.end_step != sp.step else "")
        console.print(
            f"\n[bold]#{rank} loss spike at {span}[/]: {fmt(sp.baseline)} -> {fmt(sp.peak_loss)} "
            f"(x{fmt(sp.severity, 3)})"
        )
        if sp.precursors:
            table = Table(title="layers that rose first (lead: steps before the spike)")
            width = max(len(p.layer) for p in sp.precursors)
            table.add_column("layer", no_wrap=True, min_width=width)
            table.add_column("metric", no_wrap=True)
            for col in ("rose at", "lead", "from", "to", "growth"):
                table.add_column(col, justify="right", no_wrap=True)
            for p in sp.precursors:
                table.add_row(p.layer, p.metric, str(p.onset_step), str(p.lead), fmt(p.baseline),
                              fmt(p.value), f"x{fmt(p.growth, 3)}")
            console.print(table)
        else:
            console.print("  no layer's spectrum rose before it (is the monitor on?)")
        for _, text in sp.alarms:
            console.print(f"  alarm {escape(text)}")
    if d.alarms:
        console.print(f"\n{len(d.alarms)} alarm(s) fired in total; first at step {d.alarms[0][0]}:")
        for _, text in d.alarms[:10]:
            console.print(f"  {escape(text)}")
    else:
        console.print("\nno alarms fired")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "diagnose", help="find loss spikes in a run's logs and the layers that rose first",
        description=__doc__.split("\n\n")[0].replace("``", ""),
    )
    p.add_argument("logdir", help="run folder with TensorBoard event files")
    p.add_argument("--window", type=int, default=20, help="loss baseline window (logged steps)")
    p.add_argument("--k", type=float, default=6.0, help="spike threshold in robust std devs")
    p.add_argument("--jump", type=float, default=0.5,
                   help="loss above (1 + JUMP) x its best rolling median is a spike")
    p.add_argument("--lookback", type=int, default=50, help="steps searched before each spike")
    p.add_argument("--rise", type=float, default=0.25,
                   help="relative rise that counts (0.25: +25%%)")
    p.add_argument("--top", type=int, default=5, help="precursor layers shown per spike")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.json:
        check_output_path(args.json, flag="--json")  # before the work, not after
    d = diagnose(args.logdir, window=args.window, k=args.k, jump=args.jump, lookback=args.lookback,
                 rise=args.rise, top=args.top)
    print_diagnosis(d)
    if args.json:
        blob = json.dumps(d.to_dict(), indent=2, default=str).encode()
        write_output(args.json, lambda f: f.write(blob), flag="--json")
    return 1 if d.diverged else 0  # the command ran and found a failed run
