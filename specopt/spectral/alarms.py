"""Instability alarms: small stateful rules over the monitor's streams.

Each rule sees one :class:`Observation` per monitored optimizer step (the cheap
power-iteration sigma_max of every matrix, and, on snapshot steps, the full metrics of
:mod:`specopt.spectral.metrics`) and returns the :class:`Alarm` objects that fired.
Rules latch per layer: an alarm fires when its condition becomes true and fires again only
after the condition has cleared, so a diverging layer raises one alarm, not one per step.

The :class:`~specopt.spectral.monitor.SpectralMonitor` dispatches every alarm three ways:
the user's ``on_alarm(alarm)`` callback, a TensorBoard text entry under the tag
``alarms``, and a ``logging`` warning on the ``specopt.spectral.alarms`` logger.

Defaults (:func:`default_alarms`) are chosen to stay silent on healthy runs (checked on
AdamW/Muon runs of the small Llama presets with and without PC, see
``tests/test_alarms.py``) and to fire
within a few steps of a layer whose weights blow up geometrically.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "Alarm",
    "AlarmRule",
    "ConditionNumberAlarm",
    "LossDivergenceAlarm",
    "LossSpikeAlarm",
    "NonFiniteAlarm",
    "Observation",
    "SigmaMaxGrowthAlarm",
    "StableRankCollapseAlarm",
    "default_alarms",
]


@dataclass(frozen=True)
class Alarm:
    """One fired alarm.

    Attributes:
        rule: name of the rule that fired (``"condition_number"``, ``"sigma_max_growth"``,
            ``"stable_rank_collapse"``, ``"nonfinite_weight"``, ``"nonfinite_grad"``,
            ``"nonfinite_loss"``, ``"loss_spike"``, ``"loss_divergence"``).
        step: optimizer step at which it fired.
        layer: monitored layer key (module path, ``<path>/raw`` for a parametrization's
            raw weight), or None for model-level alarms (loss).
        value: the observed value (NaN for non-finite tensors).
        threshold: the bound it crossed.
        message: one human-readable line naming the rule, layer and step.
    """

    rule: str
    step: int
    layer: str | None
    value: float
    threshold: float
    message: str


@dataclass(frozen=True)
class Observation:
    """What the rules see at one optimizer step.

    Attributes:
        step: optimizer step.
        sigma_max: ``{layer: sigma_max}`` from warm-started power iteration (the cheap
            every-step signal); empty on steps where it was not computed.
        metrics: ``{layer: {metric: value}}`` on full-snapshot steps, else None (the
            monitor passes effective weights only, not ``<path>/raw`` entries).
        nonfinite_weights: layers whose weights contain NaN/Inf.
        nonfinite_grads: layers whose gradients contain NaN/Inf.
        loss: training loss of this step when the user passed it, else None.
    """

    step: int
    sigma_max: Mapping[str, float] = field(default_factory=dict)
    metrics: Mapping[str, Mapping[str, float]] | None = None
    nonfinite_weights: Sequence[str] = ()
    nonfinite_grads: Sequence[str] = ()
    loss: float | None = None


class AlarmRule:
    """Base class: subclasses implement :meth:`_evaluate`, yielding
    ``(key, layer, value, threshold, message)`` for every condition that is true now; the
    base class latches per key so each episode fires once."""

    name: str = "rule"

    def __init__(self) -> None:
        self._active: set[str] = set()

    def reset(self) -> None:
        """Forget all history (e.g. after loading a different model)."""
        self._active.clear()

    def check(self, obs: Observation) -> list[Alarm]:
        """Alarms that start at this observation."""
        fired: list[Alarm] = []
        now_active: set[str] = set()
        evaluated: set[str] = set()
        for key, rule, layer, value, threshold, message in self._evaluate(obs, evaluated):
            now_active.add(key)
            if key not in self._active:
                text = f"step {obs.step}: {rule}" + (f" in {layer}" if layer else "")
                fired.append(Alarm(rule, obs.step, layer, value, threshold, f"{text}: {message}"))
        # A key the rule looked at and found fine clears its latch; keys not evaluated at
        # this step (e.g. metrics between snapshots) keep their state.
        self._active = (self._active - evaluated) | now_active
        return fired

    def _evaluate(self, obs: Observation, evaluated: set[str]):  # pragma: no cover - abstract
        raise NotImplementedError


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")


class ConditionNumberAlarm(AlarmRule):
    """Fires when a layer's ``metric`` (``gmcn`` or ``condition_number``) exceeds
    ``max_value`` at a snapshot (``inf`` counts: the matrix is singular).

    Default: GMCN above 1e4. GMCN (sigma_1 over the mean of the smallest 10%) rather
    than sigma_1 / sigma_r because sigma_r of a square matrix wanders over decades in
    healthy training (a healthy 300-step AdamW run of the ``tiny`` Llama reached
    sigma_1 / sigma_r = 3.7e6 in an attention output projection); pass
    ``metric="condition_number"`` for the classic ratio.
    """

    name = "condition_number"

    def __init__(self, max_value: float = 1e4, *, metric: str = "gmcn") -> None:
        super().__init__()
        _check_positive("max_value", max_value)
        if metric not in ("condition_number", "gmcn"):
            raise ValueError(f"metric must be 'condition_number' or 'gmcn', got {metric!r}")
        self.max_value = float(max_value)
        self.metric = metric

    def _evaluate(self, obs, evaluated):
        if obs.metrics is None:
            return
        for layer, m in obs.metrics.items():
            value = m.get(self.metric, math.nan)
            if math.isnan(value):
                continue  # non-finite weights are the NonFiniteAlarm's job
            evaluated.add(layer)
            if value > self.max_value:
                yield (layer, self.name, layer, value, self.max_value,
                       f"{self.metric} {value:.4g} > {self.max_value:.4g}")


class SigmaMaxGrowthAlarm(AlarmRule):
    """Fires when a layer's sigma_max grows by more than ``factor`` within ``window``
    optimizer steps: ``sigma_max(t) > factor * min(sigma_max(s), t - window <= s < t)``,
    counting only steps ``>= warmup``.

    Uses the every-step power-iteration signal (falls back to snapshot ``sigma_max``
    when the observation has none). Defaults: x4 within 100 steps, after 100 steps.
    The warmup matters: from a small init, healthy AdamW training grows sigma_max x4 in
    under 10 steps (``tiny`` Llama, lr 3e-3), then by ~x1.2 per 100 steps; a geometric
    blow-up (x1.5 per step) fires within 4 steps.
    """

    name = "sigma_max_growth"

    def __init__(self, factor: float = 4.0, window: int = 100, *, warmup: int = 100) -> None:
        super().__init__()
        _check_positive("factor", factor)
        if factor <= 1:
            raise ValueError(f"factor must be > 1, got {factor}")
        if not (isinstance(window, int) and window >= 1):
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        if not (isinstance(warmup, int) and warmup >= 0):
            raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
        self.factor = float(factor)
        self.window = window
        self.warmup = warmup
        self._history: dict[str, deque[tuple[int, float]]] = {}

    def reset(self) -> None:
        super().reset()
        self._history.clear()

    def _evaluate(self, obs, evaluated):
        if obs.step < self.warmup:
            return
        values = dict(obs.sigma_max)
        if not values and obs.metrics is not None:
            values = {k: m["sigma_max"] for k, m in obs.metrics.items() if "sigma_max" in m}
        for layer, value in values.items():
            if not math.isfinite(value):
                continue
            hist = self._history.setdefault(layer, deque())
            while hist and hist[0][0] < obs.step - self.window:
                hist.popleft()
            evaluated.add(layer)
            if hist:
                low = min(v for _, v in hist)
                if low > 0 and value > self.factor * low:
                    yield (layer, self.name, layer, value / low, self.factor,
                           f"sigma_max {low:.4g} -> {value:.4g} (x{value / low:.3g}) within "
                           f"{self.window} steps")
            hist.append((obs.step, value))


class StableRankCollapseAlarm(AlarmRule):
    """Fires when a layer's stable rank ``||W||_F^2 / sigma_1^2`` falls below
    ``fraction`` times the largest value seen for that layer from step ``warmup`` on, or
    below ``min_value`` (at any step).

    Stable rank decreases during healthy training as structure is learnt; a fall by
    10x, or to about 1 (one direction dominates the matrix), is a collapse. The warmup
    matters: a random init's stable rank is not learnt structure, and a healthy AdamW run
    of the ``tiny`` Llama takes its output head from 12.5 to 1.19 in 40 steps (the unigram
    direction). Matrices with a single singular value (``(1, n)`` / ``(m, 1)``) have no
    rank to lose and are ignored.
    """

    name = "stable_rank_collapse"

    def __init__(self, fraction: float = 0.1, *, min_value: float = 1.05,
                 warmup: int = 100) -> None:
        super().__init__()
        _check_positive("fraction", fraction)
        if fraction >= 1:
            raise ValueError(f"fraction must be < 1, got {fraction}")
        if not (isinstance(min_value, (int, float)) and min_value >= 0):
            raise ValueError(f"min_value must be >= 0, got {min_value!r}")
        if not (isinstance(warmup, int) and warmup >= 0):
            raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
        self.fraction = float(fraction)
        self.min_value = float(min_value)
        self.warmup = warmup
        self._peak: dict[str, float] = {}

    def reset(self) -> None:
        super().reset()
        self._peak.clear()

    def _evaluate(self, obs, evaluated):
        if obs.metrics is None:
            return
        for layer, m in obs.metrics.items():
            value = m.get("stable_rank", math.nan)
            if not math.isfinite(value) or value == 0:  # NaN weights / zero matrix
                continue
            if m.get("sigma_min", -1.0) >= m.get("sigma_max", math.inf):
                continue  # one singular value (a (1, n) / (m, 1) matrix): no rank to lose
            evaluated.add(layer)
            bound = self.min_value
            if obs.step >= self.warmup:
                peak = max(self._peak.get(layer, value), value)
                self._peak[layer] = peak
                bound = max(self.fraction * peak, self.min_value)
            if value < bound:
                peak_text = f" (peak {self._peak[layer]:.4g})" if layer in self._peak else ""
                yield (layer, self.name, layer, value, bound,
                       f"stable rank {value:.4g} < {bound:.4g}{peak_text}")


class NonFiniteAlarm(AlarmRule):
    """Fires when a layer's weights or gradients, or the loss, contain NaN/Inf."""

    name = "nonfinite"

    def _evaluate(self, obs, evaluated):
        weights, grads = set(obs.nonfinite_weights), set(obs.nonfinite_grads)
        for layer in weights:
            yield ("w:" + layer, "nonfinite_weight", layer, math.nan, math.nan,
                   "weights contain NaN/Inf")
        for layer in grads:
            yield ("g:" + layer, "nonfinite_grad", layer, math.nan, math.nan,
                   "gradients contain NaN/Inf")
        # Every key not yielded clears: the monitor checks all layers every step.
        evaluated.update(self._active)
        if obs.loss is not None:
            evaluated.add("loss")
            if not math.isfinite(obs.loss):
                yield ("loss", "nonfinite_loss", None, obs.loss, math.nan,
                       f"loss is {obs.loss}")


class LossSpikeAlarm(AlarmRule):
    """Fires when the loss exceeds ``mean + max(k * std, min_rel * |mean|)`` of the last
    ``window`` losses (needs ``min_history`` of them). Only when the loss is passed to the
    monitor. The relative floor keeps a very smooth loss curve from firing on noise.
    """

    name = "loss_spike"

    def __init__(self, k: float = 6.0, *, window: int = 100, min_history: int = 20,
                 min_rel: float = 0.1) -> None:
        super().__init__()
        _check_positive("k", k)
        if not (isinstance(window, int) and window >= 2):
            raise ValueError(f"window must be an int >= 2, got {window!r}")
        if not (isinstance(min_history, int) and 2 <= min_history <= window):
            raise ValueError(f"min_history must be an int in [2, window], got {min_history!r}")
        if not (isinstance(min_rel, (int, float)) and min_rel >= 0):
            raise ValueError(f"min_rel must be >= 0, got {min_rel!r}")
        self.k, self.window, self.min_history, self.min_rel = float(k), window, min_history, min_rel
        self._losses: deque[float] = deque(maxlen=window)

    def reset(self) -> None:
        super().reset()
        self._losses.clear()

    def _evaluate(self, obs, evaluated):
        if obs.loss is None or not math.isfinite(obs.loss):
            return
        evaluated.add("loss")
        if len(self._losses) >= self.min_history:
            n = len(self._losses)
            mean = sum(self._losses) / n
            std = math.sqrt(sum((x - mean) ** 2 for x in self._losses) / (n - 1))
            bound = mean + max(self.k * std, self.min_rel * abs(mean))
            if obs.loss > bound:
                yield ("loss", self.name, None, obs.loss, bound,
                       f"loss {obs.loss:.4g} > {bound:.4g} (mean {mean:.4g}, std {std:.3g} "
                       f"over {n} steps)")
        self._losses.append(obs.loss)


class LossDivergenceAlarm(AlarmRule):
    """Fires when the loss rises above the first loss seen by more than ``rel`` times
    its magnitude: ``loss > first + rel * |first|`` (default: 50% above the initial loss).

    Catches a run that diverges from its first steps (an absurd learning rate), where
    :class:`LossSpikeAlarm` has no history yet: ``specopt train --lr 10`` goes from 5.5 to
    12 nats at step 2. A healthy run starts near its highest loss (untrained model) and
    stays below it. Only when the loss is passed to the monitor.
    """

    name = "loss_divergence"

    def __init__(self, rel: float = 0.5) -> None:
        super().__init__()
        _check_positive("rel", rel)
        self.rel = float(rel)
        self._first: float | None = None

    def reset(self) -> None:
        super().reset()
        self._first = None

    def _evaluate(self, obs, evaluated):
        if obs.loss is None or not math.isfinite(obs.loss):
            return  # non-finite losses are the NonFiniteAlarm's
        if self._first is None:
            self._first = obs.loss
            return
        evaluated.add("loss")
        bound = self._first + self.rel * abs(self._first)
        if obs.loss > bound:
            yield ("loss", self.name, None, obs.loss, bound,
                   f"loss {obs.loss:.4g} > {bound:.4g} ({1 + self.rel:g}x the first loss "
                   f"{self._first:.4g}): the run is diverging")


def default_alarms() -> list[AlarmRule]:
    """A fresh set of the default rules (each monitor needs its own: rules keep state)."""
    return [
        ConditionNumberAlarm(),
        SigmaMaxGrowthAlarm(),
        StableRankCollapseAlarm(),
        NonFiniteAlarm(),
        LossSpikeAlarm(),
        LossDivergenceAlarm(),
    ]
