"""When the monitor works: snapshot and cheap-signal cadences that fit a time budget.

:class:`CadenceController` holds the two cadences of :class:`~specopt.SpectralMonitor`
and the timings that size them. The rules:

1. An explicit ``every`` is honoured: the budget thins only the default cadence
   (:data:`DEFAULT_EVERY`), or any cadence when ``budget=`` is passed explicitly.
2. Under a budget the controller aims at :data:`TARGET_SHARE` of it. Snapshots may take
   :data:`SNAPSHOT_SHARE` of the budget: when one costs more, the cadence doubles; when it
   gets cheap again (under :data:`RECOVER_SHARE`) it halves, never below ``every``.
3. The back-off is bounded: the cadence never exceeds ``every * MAX_BACKOFF``
   (:data:`MAX_BACKOFF` = 16, so the default cadence 50 stays at most 800 steps). When
   even that does not fit, snapshots keep that cadence and a warning says so.
4. The first snapshot's cost is estimated before it runs (:meth:`plan_first_snapshot`,
   from a probe of one matrix per shape), so the budget holds from step 1: a model whose
   snapshot costs 100 steps' worth starts at the backed-off cadence.
5. The cheap signal gets what the snapshots leave (at least :data:`SIGNAL_MIN_SHARE`), by
   striding, sized from its mean cost and corrected by the overhead measured over the last
   snapshot interval.
6. Every back-off is reported once as a warning on the ``specopt.spectral`` logger, and
   at every snapshot as the scalars ``monitor/every`` and ``monitor/backoff``
   (``current every / every``).

Distributed runs: snapshots are collective, so every rank must change the snapshot
cadence at the same step to the same value. The controller decides only at snapshot
steps; :meth:`agree` broadcasts rank 0's decision there (one small broadcast per
snapshot, inside a step that is collective anyway). The cheap signal is local (no
collective), so its stride may differ between ranks.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from typing import Literal

import torch

__all__ = [
    "DEFAULT_BUDGET",
    "DEFAULT_EVERY",
    "MAX_BACKOFF",
    "CadenceController",
    "estimate_snapshot_ms",
    "resolve_budget",
]

logger = logging.getLogger("specopt.spectral")

#: Snapshot cadence (optimizer steps) when the caller does not choose one.
DEFAULT_EVERY = 50
#: Default budget: monitor time / training time the default cadence is thinned to.
DEFAULT_BUDGET = 0.02
#: Share of the budget aimed at; the rest is headroom for timing noise and for costs the
#: monitor cannot time (e.g. the TensorBoard writer thread).
TARGET_SHARE = 0.7
#: Share of the budget snapshots may use before their cadence doubles.
SNAPSHOT_SHARE = 0.5
#: Below this share (after halving) the snapshot cadence comes back down.
RECOVER_SHARE = 0.25
#: The cheap signal always gets at least this share of the budget.
SIGNAL_MIN_SHARE = 0.2
#: Maximum back-off: the snapshot cadence never exceeds ``every * MAX_BACKOFF``.
MAX_BACKOFF = 16
#: Recent training steps whose median estimates the step time.
STEP_WINDOW = 20


class CadenceController:
    """Snapshot cadence and cheap-signal stride of one monitor, sized to a budget.

    Args:
        every: base snapshot cadence in optimizer steps (>= 1).
        signal_every: base cheap-signal cadence (0: no signal).
        budget: target monitor time / training time, or None for fixed cadences.
        main: this process reports (rank 0); other ranks decide silently.

    Attributes:
        every_eff: snapshot cadence in use, in ``[every, every * MAX_BACKOFF]``.
        signal_stride: cheap-signal cadence in use (0: disabled).
    """

    def __init__(self, every: int, signal_every: int, budget: float | None, *,
                 main: bool = True) -> None:
        self.main = main
        self.every = every
        self.signal_every = signal_every
        self.budget = budget
        self.max_every = every * MAX_BACKOFF
        self.every_eff = every
        self.signal_stride = signal_every
        self.step_times: deque[float] = deque(maxlen=STEP_WINDOW)  # seconds
        self.signal_ms: deque[float] = deque(maxlen=STEP_WINDOW)
        self.snapshot_ms: float | None = None  # last snapshot (or its estimate)
        self.measured: float | None = None  # own / training time over the last interval
        self.own_interval_s = 0.0  # monitor time since the last snapshot
        self.steps_in_interval = 0  # monitor calls since then
        self._signal_floor = signal_every  # stride floor set by the measured feedback
        self._planned = budget is None
        self._warned: set[str] = set()

    # ------------------------------------------------------------ queries
    def is_snapshot_step(self, step: int) -> bool:
        return step % self.every_eff == 0

    def is_signal_step(self, step: int) -> bool:
        return bool(self.signal_stride) and step % self.signal_stride == 0

    @property
    def needs_first_estimate(self) -> bool:
        """True until :meth:`plan_first_snapshot` has run (always False without budget)."""
        return not self._planned

    def step_ms(self) -> float | None:
        """Median training-step time without the monitor, in ms (None before any)."""
        return statistics.median(self.step_times) * 1e3 if self.step_times else None

    def overhead(self) -> float | None:
        """Monitor time / training time: measured over the last snapshot interval when
        there is one, else modelled from the mean signal and last snapshot costs."""
        if self.measured is not None:
            return self.measured
        step_ms = self.step_ms()
        if not step_ms:
            return None
        frac = 0.0
        if self.snapshot_ms is not None:
            frac += self.snapshot_ms / (self.every_eff * step_ms)
        if self.signal_ms and self.signal_stride:
            frac += statistics.fmean(self.signal_ms) / (self.signal_stride * step_ms)
        return frac

    # ------------------------------------------------------------ events
    def charge(self, seconds: float) -> None:
        """Add monitor wall time to the current interval."""
        self.own_interval_s += seconds

    def record_signal(self, ms: float, step: int) -> None:
        """A cheap-signal step took ``ms``; re-size the stride between snapshots."""
        self.signal_ms.append(ms)
        if len(self.step_times) >= 3 and not self.is_snapshot_step(step):
            step_ms = self.step_ms()
            self._adapt_signal(self.snapshot_ms and step_ms and self.snapshot_ms / (
                self.every_eff * step_ms))

    def plan_first_snapshot(self, estimate_ms: float | None, step: int) -> None:
        """Before the first snapshot (at a snapshot ``step``): back off from its estimated
        cost ``estimate_ms`` so the budget holds from the start. Before any step time is
        known the snapshot waits for the next snapshot step (decided from step counts, so
        every rank agrees). ``estimate_ms=None``: ranks other than 0, which take rank 0's
        decision through :meth:`agree`."""
        step_ms = self.step_ms()
        if self.budget is not None and not step_ms:
            return  # still needs_first_estimate
        self._planned = True
        if self.budget is None or estimate_ms is None:
            return
        self.snapshot_ms = estimate_ms
        self._fit_snapshots(estimate_ms, step_ms, estimated=True)

    def after_snapshot(self, snapshot_ms: float) -> None:
        """A snapshot took ``snapshot_ms``; measure the interval's overhead, re-size both
        cadences, start a new interval."""
        self.snapshot_ms = snapshot_ms
        step_ms = self.step_ms()
        if step_ms and self.steps_in_interval:
            # Relative to the median step, so pauses between steps (evaluation,
            # checkpoints, another model) do not make the monitor look cheaper.
            self.measured = self.own_interval_s / (self.steps_in_interval * step_ms / 1e3)
        if self.budget is not None and step_ms:
            snap_old = snapshot_ms / (self.every_eff * step_ms)
            snap_frac = self._fit_snapshots(snapshot_ms, step_ms, estimated=False)
            self._adapt_signal(snap_frac, snap_old, feedback=True)

    def end_interval(self) -> None:
        self.own_interval_s, self.steps_in_interval = 0.0, 0

    def agree(self) -> None:
        """Distributed: take rank 0's cadences (call on every rank at the same step)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        box = [(self.every_eff, self.signal_stride)]
        dist.broadcast_object_list(box, src=0)
        self.every_eff, self.signal_stride = (int(x) for x in box[0])

    def scalars(self) -> dict[str, float]:
        """Cost and cadence scalars (tag names without the ``monitor/`` prefix)."""
        out = {"time_ms": self.own_interval_s * 1e3,
               "snapshot_ms": float(self.snapshot_ms or 0.0),
               "every": float(self.every_eff),
               "backoff": self.every_eff / self.every,
               "signal_every": float(self.signal_stride)}
        step_ms, overhead = self.step_ms(), self.overhead()
        if step_ms is not None:
            out["step_ms"] = step_ms
        if overhead is not None:
            out["overhead"] = overhead
        if self.signal_ms:
            out["signal_ms"] = self.signal_ms[-1]
        return out

    # ------------------------------------------------------------ internals
    def _fit_snapshots(self, snapshot_ms: float, step_ms: float, *, estimated: bool) -> float:
        """Double / halve ``every_eff`` within ``[every, max_every]`` so snapshots take
        at most SNAPSHOT_SHARE of the budget; returns their share at the new cadence."""
        assert self.budget is not None
        before = self.every_eff
        frac = snapshot_ms / (self.every_eff * step_ms)
        while frac > SNAPSHOT_SHARE * self.budget and 2 * self.every_eff <= self.max_every:
            self.every_eff *= 2
            frac /= 2
        while self.every_eff > self.every and 2 * frac < RECOVER_SHARE * self.budget:
            self.every_eff //= 2
            frac *= 2
        if self.every_eff > before:
            self._warn_once(
                "backoff",
                f"spectral monitor: a snapshot {'is estimated at' if estimated else 'took'} "
                f"{snapshot_ms:.0f} ms ({snapshot_ms / step_ms:.1f} training steps); snapshot "
                f"cadence backed off from every {before} to every {self.every_eff} steps to fit "
                f"the {self.budget:.0%} time budget (never beyond every {self.max_every}; "
                "pass every= without budget= to keep a fixed cadence)")
        if frac > self.budget and self.every_eff == self.max_every:
            self._warn_once(
                "max",
                f"spectral monitor: snapshots cost {frac:.1%} of training time even at the "
                f"maximum cadence every {self.max_every} steps, over the {self.budget:.0%} "
                "budget; monitor fewer layers (include=/exclude=) or raise budget=")
        return frac

    def _adapt_signal(self, snap_frac: float | None, snap_frac_old: float = 0.0, *,
                      feedback: bool = False) -> None:
        """Cheap-signal stride so that it fits what the snapshots leave of the budget
        (``feedback``: at a snapshot, also re-set the floor from the measured cost)."""
        step_ms = self.step_ms()
        if self.budget is None or not step_ms or not self.signal_every or not self.signal_ms:
            return
        snap_frac = snap_frac or 0.0
        left = max(TARGET_SHARE * self.budget - snap_frac, SIGNAL_MIN_SHARE * self.budget)
        need = statistics.fmean(self.signal_ms) / (left * step_ms)
        stride = max(self.signal_every, math.ceil(need))
        if feedback:
            self._signal_floor = self.signal_every
            if self.measured is not None and self.signal_stride:
                rest = self.measured - snap_frac_old  # what the interval cost beyond snapshots
                if rest > left:
                    self._signal_floor = math.ceil(self.signal_stride * rest / left)
        stride = max(stride, self._signal_floor)
        self.signal_stride = min(stride, max(self.every_eff, self.signal_every))

    def _warn_once(self, key: str, message: str) -> None:
        if self.main and key not in self._warned:
            self._warned.add(key)
            logger.warning(message)


def resolve_budget(every: int | None, budget: float | Literal["auto"] | None
                   ) -> tuple[int, float | None]:
    """``(every, budget)`` from the monitor's arguments: ``every=None`` means
    :data:`DEFAULT_EVERY`; ``budget="auto"`` means :data:`DEFAULT_BUDGET` for the default
    cadence and no budget (a fixed cadence) for an explicit ``every``."""
    if budget == "auto":
        budget = DEFAULT_BUDGET if every is None else None
    return (DEFAULT_EVERY if every is None else every), budget


def estimate_snapshot_ms(shapes: dict[tuple[int, int], int], *, device: torch.device,
                         dtype: torch.dtype, per_matrix_ms: float = 0.05,
                         norm_shapes: dict[tuple[int, int], int] | None = None) -> float:
    """Wall time of a snapshot in ms, estimated before running it: one random matrix per
    distinct shape goes through the snapshot's spectrum routine, times how many matrices
    have that shape, plus ``per_matrix_ms`` each for metrics, histograms and writes.

    Args:
        shapes: ``{(m, n): number of matrices of that shape}`` whose full spectrum one
            snapshot computes.
        device, dtype: where and how the snapshot decomposes them.
        norm_shapes: the same for matrices of which only the spectral norm is computed
            (the update ratio's deltas, :func:`~specopt.spectral.metrics.spectral_norms`).
    """
    import time

    from specopt.spectral.metrics import singular_values, spectral_norms

    gen = torch.Generator().manual_seed(0)
    # One untimed call first: the first decomposition pays one-off costs (importing scipy,
    # LAPACK workspace queries, CUDA context) that no later snapshot pays; timed cold, a
    # tiny model's snapshot read as 20x its real cost and the cadence backed off to its
    # maximum at once.
    singular_values([torch.randn(4, 4, generator=gen).to(device)], dtype=dtype)[0].cpu()
    total = 0.0
    for routine, counts in ((singular_values, shapes), (spectral_norms, norm_shapes or {})):
        for (m, n), count in counts.items():
            probe = torch.randn(m, n, generator=gen).to(device)
            best = float("inf")
            for _ in range(2):  # best of two: a probe is short, one hiccup dominates it
                t0 = time.perf_counter()
                routine([probe], dtype=dtype)[0].cpu()
                best = min(best, time.perf_counter() - t0)
            total += (best * 1e3 + per_matrix_ms) * count
    return total
