"""Where the spectral monitor's numbers go: TensorBoard, a rich console table, raw
spectra files, or nowhere.

Every sink implements the same small interface (:class:`Sink`, whose methods all do
nothing), so the monitor never branches on "is logging on": with no log dir it writes
to the base :class:`Sink`. :class:`SinkGroup` fans out to several sinks and isolates
failures: a sink that raises (disk full, deleted log dir) is reported once with a
``RuntimeWarning`` and training continues.

The tag scheme is documented in :mod:`specopt.spectral.monitor` and built by the
``*_tag`` functions here; :func:`parse_tag` inverts it for ``specopt diagnose``.
"""

from __future__ import annotations

import math
import os
import re
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from specopt.checkpoint import atomic_write
from specopt.spectral.alarms import Alarm

__all__ = [
    "ALARM_TAG",
    "ConsoleSink",
    "LayerInfo",
    "Sink",
    "SinkGroup",
    "Snapshot",
    "SpectraFileSink",
    "TensorBoardSink",
    "custom_scalar_layout",
    "histogram_tag",
    "metric_tag",
    "model_tag",
    "monitor_tag",
    "parse_tag",
]

#: Text tag of alarm entries.
ALARM_TAG = "alarms"
#: Equal-width bins per histogram (the TensorBoard UI shows ~30).
HISTOGRAM_BINS = 64
#: Suffix of the layer key of a parametrization's raw (trained) weight.
RAW_SUFFIX = "/raw"


def metric_tag(metric: str, layer: str) -> str:
    """``spectral/<metric>/<layer>`` (metric also ``update_ratio``, ``sigma_max_pi``)."""
    return f"spectral/{metric}/{layer}"


def histogram_tag(kind: str, layer: str) -> str:
    """``spectral_hist/<kind>/<layer>``, kind ``log10_sigma`` or ``sigma_over_max``."""
    return f"spectral_hist/{kind}/{layer}"


def model_tag(aggregate: str) -> str:
    """``spectral/model/<aggregate>``: model-level aggregates (geometric means)."""
    return f"spectral/model/{aggregate}"


def monitor_tag(name: str) -> str:
    """``monitor/<name>``: the monitor's own cost and cadence."""
    return f"monitor/{name}"


def parse_tag(tag: str) -> tuple[str, str, str | None] | None:
    """Inverse of the tag functions: ``(kind, name, layer)`` or None for foreign tags.

    kind is ``"metric"`` (name = metric, layer = key), ``"model"`` (name = aggregate,
    layer None), ``"histogram"`` (name = histogram kind), ``"monitor"`` or ``"alarms"``.
    """
    if tag in (ALARM_TAG, ALARM_TAG + "/text_summary"):  # add_text appends /text_summary
        return ("alarms", ALARM_TAG, None)
    head, _, rest = tag.partition("/")
    if head == "monitor" and rest:
        return ("monitor", rest, None)
    name, _, layer = rest.partition("/")
    if not name:
        return None
    if head == "spectral":
        if name == "model":
            return ("model", layer, None) if layer else None
        return ("metric", name, layer) if layer else None
    if head == "spectral_hist" and layer:
        return ("histogram", name, layer)
    return None


@dataclass(frozen=True)
class LayerInfo:
    """A monitored matrix.

    Attributes:
        key: tag key: the module path, plus ``/raw`` for a parametrization's raw weight.
        path: module path (``model.named_modules()`` name).
        shape: ``(m, n)`` = ``(fan_out, fan_in)`` of the operator (conv kernels
            flattened, transformers' ``Conv1D`` un-transposed; :mod:`specopt.layers`).
        block: ``"attention"``, ``"mlp"``, ``"embedding"``, ``"head"`` or ``"other"``
            (:func:`specopt.layers.block_of`).
        pc: the module carries a specopt PC parametrization.
        raw: this entry is the raw weight of a parametrized module.
    """

    key: str
    path: str
    shape: tuple[int, int]
    block: str
    pc: bool = False
    raw: bool = False


@dataclass
class Snapshot:
    """One full spectral snapshot.

    Attributes:
        step: optimizer step.
        metrics: ``{layer key: {metric: value}}`` (see :mod:`specopt.spectral.metrics`).
        spectra: ``{layer key: singular values, descending, float64}``.
        update_ratio: ``{layer key: ||W_t - W_{t-1}||_2 / ||W_t||_2}`` for the trained
            weights (raw weight of parametrized modules).
        aggregates: ``{name: value}`` model-level, over the effective weights.
        nonfinite: layer keys whose weights contain NaN/Inf.
        time_ms: wall time the snapshot took (ms).
    """

    step: int
    metrics: dict[str, dict[str, float]]
    spectra: dict[str, np.ndarray]
    update_ratio: dict[str, float] = field(default_factory=dict)
    aggregates: dict[str, float] = field(default_factory=dict)
    nonfinite: list[str] = field(default_factory=list)
    time_ms: float = 0.0


class Sink:
    """No-op sink and the interface every sink implements."""

    def write_layout(self, layers: Sequence[LayerInfo],
                     series: Mapping[str, Sequence[str]] | None = None) -> None:
        """Called once, before the first write, with the monitored layers and the series
        that will be logged (``series``: see :func:`custom_scalar_layout`)."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Every-step scalars ``{tag: value}`` (cheap sigma_max signal, monitor cost)."""

    def write_snapshot(self, snapshot: Snapshot) -> None:
        """A full snapshot; sinks flush here so a crash loses at most one cadence."""

    def write_alarm(self, alarm: Alarm) -> None:
        """One fired alarm."""

    def flush(self) -> None:
        """Push buffered data to storage."""

    def close(self) -> None:
        """Release resources; the sink is not used afterwards."""


def _layer_regex(keys: Sequence[str], metric: str) -> str:
    return "^(" + "|".join(re.escape(metric_tag(metric, k)) for k in keys) + ")$"


#: Per-layer metrics charted in the custom-scalar layout, with their chart titles.
LAYOUT_METRICS: tuple[tuple[str, str], ...] = (
    ("condition_number", "condition number"),
    ("gmcn", "GMCN"),
    ("sigma_max_pi", "sigma_max (power iteration, every step)"),
    ("update_ratio", "update ratio ||dW||/||W||"),
)


def custom_scalar_layout(layers: Sequence[LayerInfo],
                         series: Mapping[str, Sequence[str]] | None = None
                         ) -> dict[str, dict[str, list[Any]]]:
    """TensorBoard custom-scalar layout: the loss first, then condition numbers, GMCN,
    sigma_max and update ratios grouped by block (attention, MLP, ...) and PC vs non-PC,
    then the model aggregates. Lists only series that will exist (no empty charts).

    Args:
        layers: the monitored layers.
        series: ``{metric: layer keys logged for it}`` for the metrics of
            :data:`LAYOUT_METRICS` (a metric missing: every layer), plus ``"loss"``: the
            tags of loss scalars written beside the monitor (e.g. ``train/loss``), charted
            first; without them no loss chart.

    Format of ``SummaryWriter.add_custom_scalars``:
    ``{category: {chart title: ["Multiline", [tag regex, ...]]}}``.
    """
    series = series or {}
    layout: dict[str, dict[str, list[Any]]] = {}
    loss_tags = list(series.get("loss", ()))
    if loss_tags:
        layout["loss"] = {"loss": ["Multiline", ["^(" + "|".join(
            re.escape(t) for t in loss_tags) + ")$"]]}
    for metric, title in LAYOUT_METRICS:
        logged = set(series[metric]) if metric in series else None
        groups: dict[str, list[str]] = {}
        for info in layers:
            if logged is None or info.key in logged:
                kind = "PC raw" if info.raw else ("PC" if info.pc else "non-PC")
                groups.setdefault(f"{info.block} ({kind})", []).append(info.key)
        if groups:
            layout[f"spectral: {title}"] = {
                name: ["Multiline", [_layer_regex(keys, metric)]]
                for name, keys in sorted(groups.items())
            }
    layout["spectral: model"] = {
        "GMCN / condition number (geometric means)": [
            "Multiline", [r"^spectral/model/(gmcn|condition_number)$"]],
        "stable / effective rank (geometric means)": [
            "Multiline", [r"^spectral/model/(stable_rank|effective_rank)$"]],
        "monitor overhead": ["Multiline", [r"^monitor/.*$"]],
    }
    return layout


def _histogram_proto(x: np.ndarray) -> Any:
    """``HistogramProto`` with :data:`HISTOGRAM_BINS` equal-width buckets over
    ``[min, max]`` of finite ``x`` (same layout as torch's ``make_histogram``: right bucket
    edges, one empty bucket on the left). Five numpy calls instead of ~25: histograms
    were a third of the snapshot time."""
    from tensorboard.compat.proto.summary_pb2 import HistogramProto

    x = np.asarray(x, dtype=np.float64).reshape(-1)
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:  # constant input (e.g. a flat spectrum): a unit-wide range, like numpy
        lo, hi = lo - 0.5, hi + 0.5
    idx = np.minimum(((x - lo) * (HISTOGRAM_BINS / (hi - lo))).astype(np.int64),
                     HISTOGRAM_BINS - 1)
    counts = np.bincount(idx, minlength=HISTOGRAM_BINS)
    edges = np.linspace(lo, hi, HISTOGRAM_BINS + 1)
    return HistogramProto(
        min=float(x.min()), max=float(x.max()), num=float(x.size), sum=float(x.sum()),
        sum_squares=float(x @ x), bucket_limit=edges.tolist(), bucket=[0.0, *counts.tolist()],
    )


class TensorBoardSink(Sink):
    """Writes through a ``torch.utils.tensorboard.SummaryWriter``.

    Per snapshot and layer: one scalar per metric, the update ratio, and (when
    ``histograms``) histograms of ``log10(sigma)`` and ``sigma / sigma_max`` (TensorBoard
    re-bins histograms into ~30 equal bins, so raw sigma spanning decades is unreadable).
    Non-finite singular values are dropped from histograms (TensorBoard raises on an
    all-NaN histogram); NaN scalars are written as NaN. Flushes after each snapshot and
    alarm, on a helper thread (at most one at a time) so training does not wait for the
    disk; :meth:`flush` and :meth:`close` wait for it.

    Speed: for a real ``SummaryWriter`` all values of one call go into a single
    ``Summary`` event (``add_scalar`` costs ~0.1-0.5 ms per value in protobuf and queue
    hand-offs, which dominated snapshot time); other writer objects get the plain
    ``add_scalar`` / ``add_histogram`` calls.

    Args:
        writer: the SummaryWriter.
        owns_writer: close the writer in :meth:`close` (True when the monitor made it).
        histograms: write the two histograms per layer.
    """

    def __init__(self, writer: Any, *, owns_writer: bool = False, histograms: bool = True) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = writer
        self.owns_writer = owns_writer
        self.histograms = histograms
        self._batched = isinstance(writer, SummaryWriter)
        self._flusher: threading.Thread | None = None
        self._flush_error: BaseException | None = None

    def _flush_in_background(self) -> None:
        # Snapshot flushes (crash safety) must not stall training while the writer thread
        # serialises and writes: flush on a helper thread, one at a time. The writer's own
        # lock makes this safe; an error surfaces at the next call (and SinkGroup warns).
        self._raise_pending()
        if self._flusher is not None and self._flusher.is_alive():
            return

        def run() -> None:
            try:
                self.writer.flush()
            except BaseException as exc:  # reported on the caller's thread
                self._flush_error = exc

        self._flusher = threading.Thread(target=run, name="specopt-tb-flush", daemon=True)
        self._flusher.start()

    def _raise_pending(self) -> None:
        if self._flush_error is not None:
            exc, self._flush_error = self._flush_error, None
            raise exc

    def _join(self) -> None:
        if self._flusher is not None:
            self._flusher.join()
            self._flusher = None
        self._raise_pending()

    def _emit(self, step: int, scalars: Mapping[str, float],
              histograms: Sequence[tuple[str, np.ndarray]] = ()) -> None:
        if not self._batched:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
            for tag, values in histograms:
                self.writer.add_histogram(tag, values, step, bins=HISTOGRAM_BINS)
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=tag, simple_value=float(v)) for tag, v in scalars.items()]
        values += [Summary.Value(tag=tag, histo=_histogram_proto(h)) for tag, h in histograms]
        if values:
            self.writer._get_file_writer().add_summary(Summary(value=values), step)

    def write_layout(self, layers: Sequence[LayerInfo],
                     series: Mapping[str, Sequence[str]] | None = None) -> None:
        self.writer.add_custom_scalars(custom_scalar_layout(layers, series))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self._emit(step, scalars)

    def write_snapshot(self, snapshot: Snapshot) -> None:
        scalars: dict[str, float] = {}
        hists: list[tuple[str, np.ndarray]] = []
        for key, metrics in snapshot.metrics.items():
            for name, value in metrics.items():
                scalars[metric_tag(name, key)] = value
            if self.histograms:
                sigma = snapshot.spectra[key]
                sigma = sigma[np.isfinite(sigma)]
                if sigma.size and sigma[0] > 0:
                    # Equal-width bins (HISTOGRAM_BINS): ~20x cheaper to fill than
                    # TensorBoard's default exponential edges; the UI re-bins anyway.
                    hists.append((histogram_tag("log10_sigma", key), np.log10(sigma[sigma > 0])))
                    hists.append((histogram_tag("sigma_over_max", key), sigma / sigma[0]))
        for key, value in snapshot.update_ratio.items():
            scalars[metric_tag("update_ratio", key)] = value
        for name, value in snapshot.aggregates.items():
            scalars[model_tag(name)] = value
        self._emit(snapshot.step, scalars, hists)
        self._flush_in_background()

    def write_alarm(self, alarm: Alarm) -> None:
        self.writer.add_text(ALARM_TAG, alarm.message, alarm.step)
        self._flush_in_background()  # alarms are rare and precious: never sit in the queue

    def flush(self) -> None:
        self._join()
        self.writer.flush()

    def close(self) -> None:
        self._join()
        if self.owns_writer:
            self.writer.close()
        else:
            self.writer.flush()


class SpectraFileSink(Sink):
    """Saves each snapshot's raw spectra to ``<directory>/step_<step:08d>.npz``
    (one array per layer key, descending singular values, float64) for exact post-hoc
    analysis. Written with :func:`specopt.checkpoint.atomic_write` (temporary file,
    fsync, rename), so no half-written file remains.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = os.fspath(directory)
        os.makedirs(self.directory, exist_ok=True)

    def path_for(self, step: int) -> str:
        return os.path.join(self.directory, f"step_{step:08d}.npz")

    def write_snapshot(self, snapshot: Snapshot) -> None:
        atomic_write(self.path_for(snapshot.step), lambda f: np.savez(f, **snapshot.spectra))


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf"
    return f"{x:.4g}"


class ConsoleSink(Sink):
    """A rich table of the ``top`` worst-conditioned layers at each snapshot (non-finite
    layers first), printed, or kept on screen and updated with ``live=True``."""

    def __init__(self, *, top: int = 10, live: bool = False, console: Any = None) -> None:
        from rich.console import Console

        if not (isinstance(top, int) and top >= 1):
            raise ValueError(f"top must be an int >= 1, got {top!r}")
        self.top = top
        self.console = console if console is not None else Console(stderr=True)
        self.live = live
        self._live: Any = None

    def table(self, snapshot: Snapshot) -> Any:
        from rich.table import Table

        def badness(key: str) -> float:
            c = snapshot.metrics[key].get("condition_number", math.nan)
            return math.inf if math.isnan(c) else c

        keys = sorted(snapshot.metrics, key=lambda k: (not math.isnan(
            snapshot.metrics[k].get("condition_number", 0.0)), -badness(k), k))
        table = Table(title=f"worst-conditioned layers, step {snapshot.step}")
        for col in ("layer", "cond", "GMCN", "sigma_max", "stable rank", "eff. rank",
                    "update ratio"):
            if col == "layer":
                table.add_column(col, justify="left", no_wrap=True)
            else:
                table.add_column(col, justify="right")
        for key in keys[: self.top]:
            m = snapshot.metrics[key]
            table.add_row(key, *(_fmt(m.get(n, math.nan)) for n in (
                "condition_number", "gmcn", "sigma_max", "stable_rank", "effective_rank")),
                _fmt(snapshot.update_ratio.get(key, math.nan)))
        return table

    def write_snapshot(self, snapshot: Snapshot) -> None:
        table = self.table(snapshot)
        if not self.live:
            self.console.print(table)
            return
        if self._live is None:
            from rich.live import Live

            self._live = Live(table, console=self.console, auto_refresh=False)
            self._live.start()
        self._live.update(table, refresh=True)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


class SinkGroup(Sink):
    """Fans out to ``sinks``; a sink that raises is reported once with a RuntimeWarning
    (naming the sink and the error) and skipped for that call; training continues."""

    def __init__(self, sinks: Sequence[Sink]) -> None:
        self.sinks = list(sinks)
        self._warned: set[int] = set()
        self.failures = 0

    def _call(self, method: str, *args: Any) -> None:
        for sink in self.sinks:
            try:
                getattr(sink, method)(*args)
            except Exception as exc:  # any I/O or library error: never stop training
                self.failures += 1
                if id(sink) not in self._warned:
                    self._warned.add(id(sink))
                    warnings.warn(
                        f"spectral monitor: {type(sink).__name__}.{method} failed "
                        f"({type(exc).__name__}: {exc}); training continues, further "
                        "failures of this sink are not reported",
                        RuntimeWarning,
                        stacklevel=3,
                    )

    def write_layout(self, layers: Sequence[LayerInfo],
                     series: Mapping[str, Sequence[str]] | None = None) -> None:
        self._call("write_layout", layers, series)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self._call("write_scalars", step, scalars)

    def write_snapshot(self, snapshot: Snapshot) -> None:
        self._call("write_snapshot", snapshot)

    def write_alarm(self, alarm: Alarm) -> None:
        self._call("write_alarm", alarm)

    def flush(self) -> None:
        self._call("flush")

    def close(self) -> None:
        self._call("close")
