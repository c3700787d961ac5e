"""``SpectralMonitor``: stream per-layer spectra of a model's weight matrices during training.

One line attaches it to any torch optimizer::

    monitor = specopt.SpectralMonitor(model, log_dir="runs/x", every=50)
    monitor.attach(optimizer)          # step post-hook; or call monitor.step(step) yourself

What it does at each optimizer step (the cadence counts optimizer steps, so gradient
accumulation is safe):

1. Cheap signal (every ``signal_every`` steps, backed off to fit the budget): sigma_max of
   every matrix by warm-started power iteration (the shared
   :mod:`specopt.spectral.power_iteration`, batched over same-shaped matrices, with the
   monitor's own ``u``, ``v``), plus a NaN/Inf check of weights and gradients.
2. Snapshot (every ``every`` steps, backed off to fit the budget): exact singular values
   (:func:`specopt.spectral.metrics.singular_values`), every metric of
   :mod:`specopt.spectral.metrics`, histograms, the update ratio, model aggregates.
3. Alarms (:mod:`specopt.spectral.alarms`) over both streams.

Tag scheme (stable; ``specopt diagnose`` parses it with :func:`specopt.spectral.sinks.parse_tag`).
``<layer>`` is the module path from ``model.named_modules()`` (e.g.
``layers.0.feed_forward.w1``); for a parametrized weight (PC layer, torch ``spectral_norm``)
``<layer>`` is the *effective* weight ``module.weight`` and ``<layer>/raw`` the trained
tensor ``module.parametrizations.weight.original`` (``original1``, the direction, for
``weight_norm``). A matrix that is not a module's ``weight`` (what routing calls a bare
matrix: ``nn.MultiheadAttention.in_proj_weight``, ``nn.LSTM.weight_hh_l0``) is
``<module path>.<name>``. Module paths never contain ``/``::

    spectral/<metric>/<layer>             scalar, each snapshot; <metric> in METRIC_NAMES:
                                          sigma_max sigma_min condition_number gmcn
                                          stable_rank effective_rank spectral_entropy rms_to_rms
    spectral/update_ratio/<layer>         ||W_t - W_{t-1}||_2 / ||W_t||_2 of the trained
                                          tensor (so <path>/raw for parametrized layers)
    spectral/sigma_max_pi/<layer>         power-iteration sigma_max of the trained tensor,
                                          every signal step (<path>/raw for parametrized)
    spectral_hist/log10_sigma/<layer>     histogram of log10(sigma), each snapshot
    spectral_hist/sigma_over_max/<layer>  histogram of sigma / sigma_max, each snapshot
    spectral/model/<aggregate>            geometric mean over effective matrices of each
                                          metric, plus condition_number_max and
                                          nonfinite_matrices
    monitor/time_ms                       monitor wall time since the previous snapshot,
                                          this snapshot included (all its work, in ms)
    monitor/snapshot_ms                   wall time of the snapshot
    monitor/signal_ms                     wall time of the last cheap-signal step
    monitor/step_ms                       median training-step time without the monitor
    monitor/overhead                      monitor time over the last snapshot interval /
                                          (its steps x median step time), measured
    monitor/every, monitor/signal_every   current (possibly backed-off) cadences
    monitor/backoff                       monitor/every over the base ``every`` (1: none)
    alarms                                text, one entry per fired alarm (torch's
                                          add_text stores it as alarms/text_summary)

plus a custom-scalar layout (TensorBoard's "Custom Scalars" tab): the ``loss_tags`` charts
first, then condition numbers, GMCN, sigma_max and update ratios by block (attention, MLP,
...) and PC vs non-PC. (The plain Scalars tab sorts groups by the tag's first component:
``monitor/`` and ``spectral/`` come before a loop's ``train/``; the layout is the place
that puts the loss first.)
With ``save_spectra=True`` raw spectra go to ``<log_dir>/spectra/step_<step:08d>.npz``.

Side effects: none on training. Weights are read under ``no_grad``; a parametrized weight
is computed by calling its ``ParametrizationList`` directly (bypassing
``parametrize.cached()``) with the parametrization modules temporarily in eval mode, so
torch's ``spectral_norm`` does not advance its power iteration; the monitor's own power
iteration uses its own vectors and a private generator (global RNG untouched).

Overhead control (:mod:`specopt.spectral.cadence`): an explicit ``every`` is honoured.
The default cadence (every 50 steps) is thinned to fit a 2% time budget, and so is any
cadence when ``budget=`` is passed. The first snapshot's cost is estimated before it runs;
the back-off never goes beyond ``every * 16`` and is reported once as a warning and at each
snapshot as ``monitor/every`` and ``monitor/backoff``. Under torch.distributed rank 0
decides the snapshot cadence and broadcasts it at snapshot steps, so every rank enters the
collective snapshot at the same step.

Memory: a snapshot decomposes matrices in chunks of at most
:data:`specopt.spectral.metrics.CHUNK_BYTES` (float64 copies included); with
``update_ratio`` a copy of the monitored trained weights is held across the one optimizer
step before each snapshot. Peak extra memory is therefore about one copy of the monitored
weights plus one chunk.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from specopt.distributed import get_rank, get_world_size, is_dtensor
from specopt.hooks import AttachHandle
from specopt.layers import Pattern, block_of, check_patterns, matches, matrix_spec, no_match_error
from specopt.optim.nonfinite import nonfinite_indices
from specopt.spectral import metrics
from specopt.spectral.alarms import Alarm, AlarmRule, Observation, default_alarms
from specopt.spectral.cadence import CadenceController, estimate_snapshot_ms, resolve_budget
from specopt.spectral.metrics import (
    METRIC_NAMES,
    model_aggregates,
    singular_values,
    spectrum_metrics,
)
from specopt.spectral.power_iteration import (
    init_singular_vectors,
    power_iteration_,
    sigma_max_estimate,
)
from specopt.spectral.sinks import (
    RAW_SUFFIX,
    ConsoleSink,
    LayerInfo,
    Sink,
    SinkGroup,
    Snapshot,
    SpectraFileSink,
    TensorBoardSink,
    metric_tag,
    monitor_tag,
)

__all__ = ["MonitorHandle", "SpectralMonitor"]

logger = logging.getLogger("specopt.spectral.alarms")

#: Power iterations run once per matrix at construction so the first cheap reading is
#: already converged (later readings are warm-started and need only ``power_iters``).
_WARMUP_ITERS = 30


def _info_of(m: _Matrix, raw: bool) -> LayerInfo:
    """The LayerInfo of a monitored matrix's effective (or ``raw``) entry."""
    info = m.raw_info if raw else m.info
    assert info is not None, m.path
    return info


def _trained_original(plist: Any) -> Tensor | None:
    """The tensor the optimizer trains under a ``ParametrizationList``: ``original``, or
    for several originals (``weight_norm``: gain ``original0``, direction ``original1``)
    the largest one (the direction, shaped like the weight)."""
    original = getattr(plist, "original", None)
    if isinstance(original, Tensor):
        return original
    originals = [t for name, t in plist.named_parameters(recurse=False)
                 if name.startswith("original")]
    return max(originals, key=lambda t: t.numel(), default=None)


def _is_dtensor(t: Any) -> bool:
    return is_dtensor(t)


def _distributed_world() -> tuple[int, int]:
    """(rank, world size) of an initialised process group, else (0, 1)."""
    return get_rank(), get_world_size()


def _get_pc(module: nn.Module) -> Any:
    """The PC parametrization on ``module.weight``, or None.

    Duck-typed (the ``is_pc_parametrization`` marker of
    :class:`specopt.pc.PCParametrization`): spectral never imports specopt.pc, which
    imports spectral's power iteration.
    """
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations["weight"]:
        if getattr(p, "is_pc_parametrization", False):
            return p
    return None


def _chunked(work: Sequence[tuple[str, tuple[int, ...], Callable[[], Tensor]]],
             compute: Callable[[list[Tensor]], Sequence[Any]]) -> dict[str, Any]:
    """``{key: compute(matrices)[i]}`` of ``(key, shape, producer)`` items, materializing
    same-shaped matrices in chunks of about :data:`~specopt.spectral.metrics.CHUNK_BYTES`
    (as float64), so a snapshot never holds a copy of the model's effective weights."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, (_, shape, _) in enumerate(work):
        by_shape.setdefault(shape, []).append(i)
    out: dict[str, Any] = {}
    for shape, idx in by_shape.items():
        size = max(1, metrics.CHUNK_BYTES // (8 * math.prod(shape)))
        for c in range(0, len(idx), size):
            chunk = [work[i] for i in idx[c : c + size]]
            values = compute([make() for _, _, make in chunk])
            out.update((key, v) for (key, _, _), v in zip(chunk, values, strict=True))
    return out


@dataclass
class _Matrix:
    """A monitored matrix (internal): a module weight, or one matrix of a batched
    parameter (MoE experts ``(E, out, in)``: one entry per expert, ``index`` = e)."""

    path: str
    module: nn.Module
    trained: Tensor  # the tensor the optimizer updates (raw for parametrized modules)
    parametrized: bool
    info: LayerInfo  # effective weight (== trained for plain modules)
    raw_info: LayerInfo | None  # raw weight of a parametrized module
    index: int | None = None  # matrix of a batched tensor (trained.reshape(-1, m, n)[index])
    role: str = "weight"  # the tensor's name on ``module`` ("in_proj_weight", ...)

    @property
    def trained_key(self) -> str:
        return self.raw_info.key if self.raw_info is not None else self.info.key

    def matrix(self, t: Tensor | None = None) -> Tensor:
        """The trained tensor (or ``t``, a whole copy of it), detached, as this entry's
        matrix: itself (stored orientation; singular values do not depend on it), or
        matrix ``index`` of a batch."""
        t = (self.trained if t is None else t).detach()
        if self.index is None:
            return t
        return t.reshape(-1, *t.shape[-2:])[self.index]

    def grad(self) -> Tensor | None:
        """This entry's part of the trained tensor's gradient (None if absent)."""
        g = None if _is_dtensor(self.trained) else self.trained.grad
        if g is None or self.index is None:
            return g
        return g.reshape(-1, *g.shape[-2:])[self.index]

    @torch.no_grad()
    def effective(self, raw: Tensor | None = None) -> Tensor:
        """The weight the module computes with; ``raw``: a whole (gathered) copy of the
        trained tensor to apply the parametrizations to (FSDP2 owners)."""
        if not self.parametrized:
            return self.matrix(raw)
        plist = self.module.parametrizations[self.role]
        if raw is not None and not hasattr(plist, "original"):
            raw = None  # several originals (weight_norm): never sharded apart; use local
        if raw is not None:
            modes = [(m, m.training) for m in plist.modules()]
            try:
                for m, _ in modes:
                    m.training = False
                w = raw
                for p in plist:
                    w = p(w)
            finally:
                for m, mode in modes:
                    m.training = mode
            return (w.full_tensor() if _is_dtensor(w) else w).detach()
        modes = [(m, m.training) for m in plist.modules()]
        try:
            # Eval mode: torch's spectral_norm only advances its power iteration in
            # training mode. Calling the list directly bypasses parametrize.cached().
            for m, _ in modes:
                m.training = False
            w = plist()
        finally:
            for m, mode in modes:
                m.training = mode
        return w.detach()


@dataclass
class _SignalGroup:
    """Same-shaped trained matrices sharing one batched power iteration (internal)."""

    matrices: list[_Matrix]
    u: Tensor
    v: Tensor
    keys: list[str] = field(default_factory=list)


#: Former name of :class:`specopt.hooks.AttachHandle` (what :meth:`SpectralMonitor.attach`
#: returns, the same type as :meth:`specopt.PCHandle.attach`).
MonitorHandle = AttachHandle


class SpectralMonitor:
    """Streams weight spectra, metrics and alarms of ``model`` to TensorBoard and friends.

    Args:
        model: the model; every module whose ``weight`` has >= 2 dims is a matrix
            (conv kernels read as ``(out, in * k...)``, transformers' ``Conv1D`` as its
            ``(out, in)`` operator: :mod:`specopt.layers`; weights with a size-1 side
            are skipped), and so is each matrix of other
            parameters with >= 3 dims (MoE experts ``(E, out, in)``, keys
            ``<module>.<param>.<e>``); tied weights are monitored once.
        log_dir: directory for a TensorBoard event file (created; must be writable).
        writer: an existing ``SummaryWriter`` instead of ``log_dir`` (not closed by us).
            With neither, nothing is written to TensorBoard (alarms still fire).
        every: snapshot cadence in optimizer steps (snapshots at steps divisible by it).
            Given explicitly it is honoured (unless ``budget=`` is also passed); None:
            the default cadence, 50 steps, thinned to fit the default budget.
        include, exclude: layer patterns (the :mod:`specopt.layers` vocabulary: globs on
            the module path or key, e.g. ``"layers.*.attention.*"``, or compiled regexes);
            each must match some matrix of the model (else ``ValueError`` listing close
            names).
        histograms: log the two histograms per layer at each snapshot.
        save_spectra: also save raw spectra as ``.npz`` per snapshot (needs a log dir).
        budget: target amortized monitor time as a fraction of step time. ``"auto"``
            (default): 2% for the default cadence, none for an explicit ``every``; a
            float in (0, 1] thins any cadence (at most 16x, see
            :mod:`specopt.spectral.cadence`); None disables the back-off.
        alarms: alarm rules (default :func:`default_alarms`); ``()`` for none.
        on_alarm: ``callback(alarm)`` for each fired alarm (may raise to stop training).
        console: False, True (print a table of the worst-conditioned layers at each
            snapshot) or ``"live"`` (a rich live table).
        console_top: rows of that table.
        signal_every: cadence of the cheap power-iteration sigma_max signal (>= 1; may be
            backed off by the budget); 0 disables it.
        power_iters: warm-started power iterations per cheap-signal step.
        update_ratio: log ``||dW||_2 / ||W||_2`` at snapshots (keeps a copy of the
            monitored weights across the one optimizer step before each snapshot).
        dtype: ``torch.float32`` or ``torch.float64`` for the SVD.
        start_step: optimizer-step count before the first attached step (for resumed runs).
        loss_tags: tags of loss scalars the training loop writes to the same event file
            (e.g. ``("train/loss", "val/loss")``), charted first in the Custom Scalars
            dashboard.

    Raises:
        ValueError: bad arguments (named), an unwritable ``log_dir``, a model without
            matrices or patterns that select none.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        log_dir: str | os.PathLike[str] | None = None,
        writer: Any = None,
        every: int | None = None,
        include: str | re.Pattern[str] | Sequence[str | re.Pattern[str]] | None = None,
        exclude: str | re.Pattern[str] | Sequence[str | re.Pattern[str]] | None = None,
        histograms: bool = True,
        save_spectra: bool = False,
        budget: float | Literal["auto"] | None = "auto",
        alarms: Iterable[AlarmRule] | None = None,
        on_alarm: Callable[[Alarm], Any] | None = None,
        console: bool | str = False,
        console_top: int = 10,
        signal_every: int = 1,
        power_iters: int = 2,
        update_ratio: bool = True,
        dtype: torch.dtype = torch.float32,
        start_step: int = 0,
        loss_tags: Sequence[str] = (),
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if log_dir is not None and writer is not None:
            raise ValueError("give either log_dir or writer, not both")
        for name, value, low in (("every", 1 if every is None else every, 1),
                                 ("signal_every", signal_every, 0),
                                 ("power_iters", power_iters, 1), ("console_top", console_top, 1),
                                 ("start_step", start_step, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if budget != "auto" and budget is not None and not (
            isinstance(budget, (int, float)) and not isinstance(budget, bool) and 0 < budget <= 1
        ):
            raise ValueError(f"budget must be a float in (0, 1], None or 'auto', got {budget!r}")
        if console not in (False, True, "live"):
            raise ValueError(f"console must be False, True or 'live', got {console!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if on_alarm is not None and not callable(on_alarm):
            raise TypeError(f"on_alarm must be callable, got {type(on_alarm).__name__}")
        rules = default_alarms() if alarms is None else list(alarms)
        for rule in rules:
            if not isinstance(rule, AlarmRule):
                raise TypeError(f"alarms must be AlarmRule instances, got {type(rule).__name__}")
        self.model = model
        every, budget = resolve_budget(every, budget)
        self.every = every
        self.budget = None if budget is None else float(budget)
        self.signal_every = signal_every
        self.power_iters = power_iters
        self.update_ratio = update_ratio
        self.dtype = dtype
        if isinstance(loss_tags, str) or not all(isinstance(t, str) for t in loss_tags):
            raise TypeError(f"loss_tags must be a sequence of tag strings, got {loss_tags!r}")
        self.loss_tags = tuple(loss_tags)
        self.rules = rules
        self.on_alarm = on_alarm
        self.alarms_fired: deque[Alarm] = deque(maxlen=1000)
        self._matrices = self._discover(check_patterns("include", include),
                                        check_patterns("exclude", exclude))

        # Under torch.distributed every rank builds the monitor; rank 0 alone writes, and
        # each matrix's spectrum is computed once, on its owner rank (OwnerPlan).
        self._rank, world = _distributed_world()
        self._plan: Any = None
        if world > 1:
            from specopt.spectral.owners import OwnerPlan

            entries = [(m.info.key, m.trained) for m in self._matrices]
            entries += [(m.raw_info.key, m.trained) for m in self._matrices if m.raw_info]
            self._plan = OwnerPlan(entries)
        if self._rank != 0:
            log_dir = writer = None
            save_spectra = console = False
        log_path = self._prepare_log_dir(log_dir) if log_dir is not None else None
        if save_spectra and log_path is None and getattr(writer, "log_dir", None) is None:
            raise ValueError("save_spectra=True needs log_dir (or a writer with a log_dir)")
        sinks: list[Sink] = []
        if log_path is not None:
            from torch.utils.tensorboard import SummaryWriter

            # flush_secs: scalars between snapshots reach disk within 30 s; snapshots
            # and alarms flush immediately. A long queue lets add_scalar return at once
            # instead of handing the GIL to the writer thread every 10 events.
            sinks.append(TensorBoardSink(SummaryWriter(log_path, max_queue=1000, flush_secs=30),
                                         owns_writer=True, histograms=histograms))
        elif writer is not None:
            sinks.append(TensorBoardSink(writer, histograms=histograms))
        if save_spectra:
            base = log_path if log_path is not None else writer.log_dir
            sinks.append(SpectraFileSink(os.path.join(base, "spectra")))
        if console:
            sinks.append(ConsoleSink(top=console_top, live=console == "live"))
        self.sink = SinkGroup(sinks)
        self.log_dir = log_path

        self._groups = self._make_signal_groups()
        self._handles: list[AttachHandle] = []
        self._step = start_step
        self._cadence = CadenceController(every, signal_every, self.budget,
                                          main=self._rank == 0)
        self._last_end: float | None = None
        self._pending_loss: Any = None
        self._previous: dict[str, Tensor] | None = None  # trained weights before the step
        self._previous_step: int | None = None
        self._layout_written = False
        self._closed = False
        self._own_s = 0.0  # total monitor wall time (hooks and step())

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _prepare_log_dir(log_dir: str | os.PathLike[str]) -> str:
        path = os.fspath(log_dir)
        try:
            os.makedirs(path, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as exc:
            raise ValueError(f"log_dir {path!r} is not a writable directory: {exc}") from exc
        return path

    def _candidates(self) -> list[tuple[str, nn.Module, Tensor, str, Any, int | None, str]]:
        """Every matrix of the model, tied tensors once: ``(key, module, trained tensor,
        role, MatrixSpec, batch index, module path)``.

        What a matrix is comes from :func:`specopt.layers.matrix_spec`, as in routing:
        every parameter (or parametrized tensor) with >= 2 dims and no size-1 side of
        every module. A module's ``weight`` has key ``<module>``; any other 2-D tensor
        (``nn.MultiheadAttention.in_proj_weight``, ``nn.LSTM.weight_hh_l0``) key
        ``<module>.<name>``; a tensor with ndim >= 3 holding several matrices (MoE expert
        stacks) one entry per matrix, key ``<module>.<name>.<e>``. A parametrized tensor
        (``role`` in ``module.parametrizations``: PC, ``spectral_norm``,
        ``weight_norm``) is monitored as its effective value ``module.<role>``; its trained
        tensor is the original (``original``; for ``weight_norm``'s
        ``original0``/``original1`` pair the one with the weight's shape, the direction).
        """
        out = []
        seen: set[int] = set()
        for path, module in self.model.named_modules():
            if "parametrizations" in path.split("."):
                continue
            plists = getattr(module, "parametrizations", {}) if parametrize.is_parametrized(
                module) else {}
            tensors: list[tuple[str, Tensor]] = [
                (role, _trained_original(plist)) for role, plist in plists.items()]
            tensors += [(name, p) for name, p in module.named_parameters(recurse=False)]
            for role, trained in tensors:
                if (not isinstance(trained, Tensor) or trained.ndim < 2 or not trained.numel()
                        or id(trained) in seen):
                    continue
                spec = matrix_spec(module, role, trained)
                # A (1, n) / (m, 1) tensor (a scalar regression head, a weight_norm gain)
                # has one singular value, its norm: no spectrum to watch, and rank alarms
                # would misfire. (1, N, D) position embeddings are not operators.
                if spec.has_unit_dim or (spec.kind == "experts" and spec.count < 2):
                    continue
                seen.add(id(trained))  # tied weights (e.g. output = tok_embeddings): once
                base = path if role == "weight" else (f"{path}.{role}" if path else role)
                if spec.kind == "experts":
                    out.extend((f"{base}.{e}", module, trained, role, spec, e, path)
                               for e in range(spec.count))
                else:
                    out.append((base, module, trained, role, spec, None, path))
        return out

    def _discover(self, include: Sequence[Pattern], exclude: Sequence[Pattern]
                  ) -> list[_Matrix]:
        cands = self._candidates()
        if not cands:
            raise ValueError(
                f"model {type(self.model).__name__} has no weight matrices to monitor "
                "(no module with a >= 2-D weight)"
            )
        names = list(dict.fromkeys(n for c in cands for n in (c[0], c[6])))
        for arg, pats in (("include", include), ("exclude", exclude)):
            for pat in pats:
                if not any(matches([pat], (c[0], c[6])) for c in cands):
                    raise no_match_error(f"SpectralMonitor: {arg}", pat, names, "weight matrix")
        found: list[_Matrix] = []
        for key, module, trained, role, spec, index, path in cands:
            if include and not matches(include, (key, path)):
                continue
            if exclude and matches(exclude, (key, path)):
                continue
            # (out, in) of the operator: rms_to_rms and fan-based metrics need the true
            # orientation (transformers' Conv1D stores (in, out)); conv kernels flattened.
            shape = spec.matrix_shape
            # The one labelling call (the sharded snapshot path ships these LayerInfos).
            block = block_of(path if role == "weight" else key, spec.kind)
            pc = role == "weight" and _get_pc(module) is not None
            parametrized = parametrize.is_parametrized(module, role)
            info = LayerInfo(key=key, path=path, shape=shape, block=block, pc=pc)
            raw = (LayerInfo(key=key + RAW_SUFFIX, path=path, shape=shape, block=block, pc=pc,
                             raw=True) if parametrized else None)
            found.append(_Matrix(path, module, trained, parametrized, info, raw, index, role))
        if not found:
            raise ValueError(
                f"include/exclude patterns selected no weight matrix; available: "
                f"{', '.join(names[:20])}{' ...' if len(names) > 20 else ''}"
            )
        return found

    def _make_signal_groups(self) -> list[_SignalGroup]:
        by_shape: dict[tuple, list[_Matrix]] = {}
        for m in self._matrices:
            t = m.trained
            if _is_dtensor(t):
                continue  # sharded (FSDP2): no cheap signal, snapshots only
            by_shape.setdefault((tuple(m.matrix().shape), t.device, t.dtype), []).append(m)
        groups = []
        for (shape, device, dtype), mats in by_shape.items():
            vec_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            u, v = init_singular_vectors((len(mats), shape[0], math.prod(shape[1:])),
                                         device=device, dtype=vec_dtype)
            g = _SignalGroup(mats, u, v, [m.trained_key for m in mats])
            power_iteration_(self._stack(g), g.u, g.v, iters=_WARMUP_ITERS)
            self._repair_vectors(g)
            groups.append(g)
        return groups

    @staticmethod
    def _stack(g: _SignalGroup) -> Tensor:
        return torch.stack([m.matrix().reshape(m.matrix().shape[0], -1) for m in g.matrices])

    @staticmethod
    def _repair_vectors(g: _SignalGroup) -> None:
        # NaN weights turn their rows of u, v into NaN: re-initialise just those rows so
        # the signal recovers if the weights do.
        bad = ~(torch.isfinite(g.u).all(-1) & torch.isfinite(g.v).all(-1))
        if bool(bad.any()):
            u0, v0 = init_singular_vectors((g.u.shape[0], g.u.shape[1], g.v.shape[1]),
                                           device=g.u.device, dtype=g.u.dtype)
            g.u[bad], g.v[bad] = u0[bad], v0[bad]

    # ---------------------------------------------------------------- public
    @property
    def layers(self) -> list[str]:
        """Layer keys monitored at snapshots (effective, then ``/raw`` entries)."""
        keys = [m.info.key for m in self._matrices]
        return keys + [m.raw_info.key for m in self._matrices if m.raw_info is not None]

    @property
    def current_every(self) -> int:
        """Snapshot cadence in use (``every``, or larger when backed off)."""
        return self._cadence.every_eff

    @property
    def current_signal_every(self) -> int:
        """Cheap-signal cadence in use (0: disabled)."""
        return self._cadence.signal_stride

    @property
    def own_time_s(self) -> float:
        """Total wall time spent in the monitor (hooks and :meth:`step`), in seconds."""
        return self._own_s

    @property
    def global_step(self) -> int:
        """Optimizer steps seen (``start_step`` plus hook calls, or the last step())."""
        return self._step

    def attach(self, optimizer: torch.optim.Optimizer) -> MonitorHandle:
        """Register step pre/post hooks on ``optimizer``: the post-hook runs
        :meth:`step` after every ``optimizer.step()``; the pre-hook copies the monitored
        weights just before a snapshot step (for the update ratio). Returns a handle
        (:class:`~specopt.hooks.AttachHandle`, as ``PCHandle.attach`` returns) whose
        ``remove()`` unregisters both and which works as a context manager; the
        optimizer is otherwise untouched."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        hooks = [
            optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._pre_step()),
            optimizer.register_step_post_hook(lambda opt, args, kwargs: self.step()),
        ]
        handle = AttachHandle(optimizer, hooks, owner="SpectralMonitor",
                              on_remove=self._handles.remove)
        self._handles.append(handle)
        return handle

    def detach(self) -> None:
        """Remove every hook registered by :meth:`attach`."""
        for h in list(self._handles):
            h.remove()

    def record_loss(self, loss: Tensor | float) -> None:
        """Give the loss of the current step to the loss alarms (with :meth:`attach`).
        A tensor is kept and read at the next monitor step (no extra device sync)."""
        self._pending_loss = loss.detach() if isinstance(loss, Tensor) else float(loss)

    def _is_snapshot_step(self, step: int) -> bool:
        return self._cadence.is_snapshot_step(step)

    def _pre_step(self) -> None:
        if self.update_ratio and self._is_snapshot_step(self._step + 1):
            t0 = time.perf_counter()
            self._capture(self._step)
            self._charge(time.perf_counter() - t0)

    def _charge(self, seconds: float) -> None:
        self._own_s += seconds
        self._cadence.charge(seconds)

    @torch.no_grad()
    def _capture(self, step: int) -> None:
        # Sharded (DTensor) weights have no update ratio (snapshots decompose gathered
        # copies): copying their shards would only hold memory across the step.
        self._previous = {m.trained_key: m.matrix().clone() for m in self._matrices
                          if not _is_dtensor(m.trained)}
        self._previous_step = step

    def step(self, global_step: int | None = None, loss: Tensor | float | None = None
             ) -> Snapshot | None:
        """Monitor one optimizer step (called by the attached hook, or by you after
        ``optimizer.step()``; not both, or each step counts twice).

        Args:
            global_step: the optimizer step just completed; default: previous + 1.
            loss: this step's loss, for the loss alarms.

        Returns:
            The :class:`Snapshot` when this was a snapshot step, else None.
        """
        t0 = time.perf_counter()
        if self._closed:
            raise RuntimeError("SpectralMonitor.step() called after close()")
        cadence = self._cadence
        if self._last_end is not None:
            cadence.step_times.append(t0 - self._last_end)
        cadence.steps_in_interval += 1
        step = self._step + 1 if global_step is None else int(global_step)
        self._step = step
        if loss is None:
            loss, self._pending_loss = self._pending_loss, None
        if not self._layout_written:
            self._layout_written = True
            self.sink.write_layout([m.info for m in self._matrices]
                                   + [m.raw_info for m in self._matrices if m.raw_info],
                                   self._logged_series())

        sigma_pi: dict[str, float] = {}
        bad_w: list[str] = []
        bad_g: list[str] = []
        if cadence.is_signal_step(step):
            ts = time.perf_counter()
            sigma_pi, bad_w, bad_g = self._signal(step)
            cadence.record_signal((time.perf_counter() - ts) * 1e3, step)
        snapshot = None
        run_snapshot = cadence.is_snapshot_step(step)
        if run_snapshot and cadence.needs_first_estimate:
            # Budgeted: size the cadence from an estimate before paying for a snapshot.
            # Rank 0 decides for everyone (snapshots are collective).
            estimate = self._estimate_snapshot_ms() if self._rank == 0 else None
            cadence.plan_first_snapshot(estimate, step)
            if self._plan is not None:
                cadence.agree()
            run_snapshot = not cadence.needs_first_estimate and cadence.is_snapshot_step(step)
            if not run_snapshot:
                self._previous = self._previous_step = None  # postponed: free the copy
        if run_snapshot:
            ts = time.perf_counter()
            snapshot = (self._snapshot(step) if self._plan is None
                        else self._snapshot_distributed(step))  # includes the sink writes
            snapshot_ms = (time.perf_counter() - ts) * 1e3
            if snapshot is not None:
                bad_w = sorted(set(bad_w) | set(snapshot.nonfinite))
        # Snapshot rules judge the weights the model computes with (effective); a PC raw
        # weight may be ill-conditioned by design. Growth rules see the trained tensors.
        obs = Observation(
            step=step, sigma_max=sigma_pi,
            metrics=None if snapshot is None else {
                k: v for k, v in snapshot.metrics.items() if not k.endswith(RAW_SUFFIX)},
            nonfinite_weights=bad_w, nonfinite_grads=bad_g,
            loss=None if loss is None else float(
                loss.detach() if isinstance(loss, Tensor) else loss),
        )
        for rule in self.rules:
            for alarm in rule.check(obs):
                self._dispatch(alarm)
        if run_snapshot:
            self._charge(time.perf_counter() - t0)
            t0 = time.perf_counter()
            cadence.after_snapshot(snapshot_ms)
            if self._plan is not None:
                cadence.agree()  # every rank: rank 0's cadence, at the same step
            self.sink.write_scalars(step, {monitor_tag(k): v
                                           for k, v in cadence.scalars().items()})
            cadence.end_interval()
        # Without hooks (manual step() calls) capture for the update ratio here.
        if self.update_ratio and not self._handles and self._is_snapshot_step(step + 1):
            self._capture(step)
        self._last_end = time.perf_counter()
        self._charge(self._last_end - t0)
        return snapshot

    def _logged_series(self) -> dict[str, list[str]]:
        """Which layer keys each charted metric is logged for (the dashboard lists only
        those), plus the loss tags charted first."""
        keys = self.layers
        plain = [m.trained_key for m in self._matrices if not _is_dtensor(m.trained)]
        return {"condition_number": keys, "gmcn": keys,
                "sigma_max_pi": plain if self.signal_every else [],
                "update_ratio": plain if self.update_ratio else [],
                "loss": list(self.loss_tags)}

    def _estimate_snapshot_ms(self) -> float:
        """Cost of the next snapshot, estimated from one probe matrix per shape."""
        shapes: dict[tuple[int, int], int] = {}
        norm_shapes: dict[tuple[int, int], int] = {}  # the update ratio's deltas
        for m in self._matrices:
            shape = (m.info.shape[0], m.info.shape[1])
            shapes[shape] = shapes.get(shape, 0) + 1 + (m.raw_info is not None)
            if self.update_ratio:
                norm_shapes[shape] = norm_shapes.get(shape, 0) + 1
        if self._plan is not None:  # each rank decomposes about its share
            world = _distributed_world()[1]
            shapes = {k: max(1, math.ceil(v / world)) for k, v in shapes.items()}
            norm_shapes = {k: max(1, math.ceil(v / world)) for k, v in norm_shapes.items()}
        device = self._matrices[0].trained.device
        if _is_dtensor(self._matrices[0].trained):
            device = self._matrices[0].trained.to_local().device
        return estimate_snapshot_ms(shapes, device=device, dtype=self.dtype,
                                    norm_shapes=norm_shapes)

    def snapshot(self, step: int | None = None) -> Snapshot | None:
        """Take a full snapshot now (outside the cadence) and write it to the sinks
        (distributed: collective, None on ranks other than 0)."""
        step = self._step if step is None else step
        return self._snapshot(step) if self._plan is None else self._snapshot_distributed(step)

    def flush(self) -> None:
        self.sink.flush()

    def close(self) -> None:
        """Remove hooks, flush and close the sinks (a writer passed in is only flushed)."""
        if self._closed:
            return
        self.detach()
        self.sink.close()
        self._closed = True

    def __enter__(self) -> SpectralMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- internals
    @torch.no_grad()
    def _signal(self, step: int) -> tuple[dict[str, float], list[str], list[str]]:
        sigmas = []
        for g in self._groups:
            w = self._stack(g)
            power_iteration_(w, g.u, g.v, iters=self.power_iters)
            sigmas.append(sigma_max_estimate(w, g.u, g.v))
        keys = [k for g in self._groups for k in g.keys]
        values = (torch.cat([s.reshape(-1).double().cpu() for s in sigmas]).tolist()
                  if sigmas else [])
        sigma = dict(zip(keys, values, strict=True))
        bad_w = [k for k, s in sigma.items() if not math.isfinite(s)]
        if bad_w:
            for g in self._groups:
                self._repair_vectors(g)
        grads = [m.grad() for m in self._matrices]
        # Sparse gradients (nn.Embedding(sparse=True)): check their stored values. The
        # optimizer's check (fused norm, exact recheck of overflowing norms): an fp16
        # gradient of 1000.0 everywhere is finite although its 2-norm overflows.
        present = [(m.trained_key, gr._values() if gr.is_sparse else gr)
                   for m, gr in zip(self._matrices, grads, strict=True) if gr is not None]
        bad_g = [present[i][0] for i in nonfinite_indices([gr for _, gr in present])]
        self.sink.write_scalars(step, {metric_tag("sigma_max_pi", k): v for k, v in sigma.items()})
        return sigma, bad_w, bad_g

    @torch.no_grad()
    def _snapshot(self, step: int) -> Snapshot:
        t0 = time.perf_counter()
        # What to decompose, as (key, shape, producer): a producer materializes its matrix
        # only when its chunk is processed, so a snapshot holds at most CHUNK_BYTES of
        # effective weights / update deltas at a time, not a copy of the model.
        work: list[tuple[str, tuple[int, ...], Callable[[], Tensor]]] = []
        infos: list[LayerInfo] = []
        for m in self._matrices:
            infos.append(m.info)
            work.append((m.info.key, tuple(m.matrix().shape), m.effective))
        for m in self._matrices:
            if m.raw_info is not None:
                infos.append(m.raw_info)
                work.append((m.raw_info.key, tuple(m.matrix().shape), m.matrix))
        got = _chunked(work, lambda ws: singular_values(ws, dtype=self.dtype))
        spectra = {info.key: got[info.key] for info in infos}
        # Update ratio: ||W_t - W_{t-1}||_2 of the trained tensors (the norm only: a
        # Lanczos solve, not a second full spectrum).
        previous = self._previous if self._previous_step == step - 1 else None
        self._previous, self._previous_step = None, None
        deltas = [] if previous is None else [
            (m.trained_key, tuple(m.matrix().shape),
             lambda m=m, old=previous[m.trained_key]: m.matrix() - old)
            for m in self._matrices if m.trained_key in previous]
        delta_norms = {k: float(v) for k, v in _chunked(deltas, self._delta_norms).items()}
        previous = deltas = work = got = None  # free the update-ratio copy before the sinks run
        return self._finish_snapshot(step, t0, infos, spectra, delta_norms)

    def _delta_norms(self, deltas: list[Tensor]) -> Tensor:
        return metrics.spectral_norms(deltas, dtype=self.dtype).cpu()

    def _finish_snapshot(self, step: int, t0: float, infos: Sequence[LayerInfo],
                         sigmas: dict[str, Tensor], delta_norms: dict[str, float]) -> Snapshot:
        # Metrics batched per shape: one spectrum_metrics call and one host copy per group.
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, info in enumerate(infos):
            by_shape.setdefault(info.shape, []).append(i)
        values: list[dict[str, float]] = [{}] * len(infos)
        spectra_list: list[np.ndarray] = [np.empty(0)] * len(infos)
        for shape, idx in by_shape.items():
            stacked = torch.stack([torch.as_tensor(sigmas[infos[i].key]) for i in idx])
            stacked = stacked.double().cpu()
            got = {k: v.tolist() for k, v in spectrum_metrics(stacked, shape=shape).items()}
            block = stacked.numpy()
            for j, i in enumerate(idx):
                values[i] = {k: v[j] for k, v in got.items()}
                spectra_list[i] = block[j]
        spectra: dict[str, np.ndarray] = {}
        metrics: dict[str, dict[str, float]] = {}
        per_metric: dict[str, list[float]] = {name: [] for name in METRIC_NAMES}
        nonfinite: list[str] = []
        for info, vals, spectrum in zip(infos, values, spectra_list, strict=True):
            spectra[info.key] = spectrum
            metrics[info.key] = vals
            if math.isnan(vals["sigma_max"]):
                nonfinite.append(info.key)
            if not info.raw:
                for name, value in vals.items():
                    per_metric[name].append(value)
        update_ratio: dict[str, float] = {}
        for key, norm_d in delta_norms.items():
            norm_w = metrics[key]["sigma_max"]
            update_ratio[key] = norm_d / norm_w if norm_w > 0 else math.inf
        snap = Snapshot(
            step=step, metrics=metrics, spectra=spectra, update_ratio=update_ratio,
            aggregates=model_aggregates(per_metric), nonfinite=nonfinite,
            time_ms=(time.perf_counter() - t0) * 1e3,
        )
        self.sink.write_snapshot(snap)
        return snap

    @torch.no_grad()
    def _snapshot_distributed(self, step: int) -> Snapshot | None:
        """Each matrix's spectrum on its owner rank (:class:`specopt.spectral.owners.
        OwnerPlan`), results gathered to rank 0, which alone writes. Collective: every rank
        calls it at the same steps. Other ranks return None."""
        t0 = time.perf_counter()
        plan = self._plan
        local: dict[str, Tensor] = {}
        by_key: dict[str, tuple[_Matrix, bool]] = {}
        for m in self._matrices:
            local[m.info.key] = m.trained.detach()
            by_key[m.info.key] = (m, False)
            if m.raw_info is not None:
                local[m.raw_info.key] = m.trained.detach()
                by_key[m.raw_info.key] = (m, True)
        owned = plan.gather(local)
        for key in owned:
            m, raw = by_key[key]
            if m.parametrized and not raw:
                owned[key] = m.effective(owned[key] if _is_dtensor(m.trained) else None)
            else:
                owned[key] = m.matrix(owned[key])  # one expert of a gathered batch
        keys = list(owned)
        sig = singular_values([owned[k] for k in keys], dtype=self.dtype) if keys else []
        # Each owner ships its own LayerInfo (block, pc, raw): labels are made once, in
        # _discover, whichever rank writes.
        payload = {k: (_info_of(*by_key[k]), s.double().cpu())
                   for k, s in zip(keys, sig, strict=True)}
        previous = self._previous if self._previous_step == step - 1 else None
        self._previous, self._previous_step = None, None
        deltas = {}
        if previous is not None:
            dk = [k for k in keys if k in previous and by_key[k][0].trained_key == k]
            norms = self._delta_norms([by_key[k][0].matrix() - previous[k] for k in dk]
                                      ) if dk else []
            deltas = {k: float(v) for k, v in zip(dk, norms, strict=True)}
        gathered = plan.to_main((payload, deltas))
        if gathered is None:
            return None
        spectra: dict[str, Tensor] = {}
        meta: dict[str, LayerInfo] = {}
        delta_norms: dict[str, float] = {}
        for part, dpart in gathered:
            for k, (info, s) in part.items():
                spectra[k], meta[k] = s, info
            delta_norms.update(dpart)
        infos = [meta[k] for k in plan.keys if k in spectra]
        return self._finish_snapshot(step, t0, infos, spectra, delta_norms)

    def _dispatch(self, alarm: Alarm) -> None:
        self.alarms_fired.append(alarm)
        logger.warning("spectral alarm: %s", alarm.message)
        self.sink.write_alarm(alarm)
        if self.on_alarm is not None:
            self.on_alarm(alarm)
