"""Muon: momentum, then Newton-Schulz orthogonalization of each hidden weight's update.

A strict superset of ``torch.optim.Muon`` (same arguments, same meaning, same defaults for
lr, weight_decay, momentum, nesterov, eps and adjust_lr_fn). Per parameter ``p`` with
gradient ``g`` and momentum buffer ``m`` (state key ``"momentum_buffer"``)::

    m <- m + (1 - momentum) (g - m)                        # EMA (torch's lerp)
    u <- g + momentum (m - g)   if nesterov else m
    U_k <- the 2-D matrices of u (matrix_views: see below)
    O_k <- NS(U_k), same-shaped matrices batched
    p <- p (1 - lr weight_decay)                            # decoupled, base lr
    p <- p - adjust(lr, (out, in) of U_k) O_k               # per matrix

Which matrices (:func:`matrix_views`, per group options): a 2-D parameter is one matrix
(``transposed=True``: stored ``(in, out)`` like transformers' ``Conv1D``; the LR adjustment
and ``split_sizes`` use the true ``(out, in)``); an ndim >= 3 parameter is flattened to
``(shape[0], -1)`` (``matrix_layout="flatten"``, the default: conv kernels) or read as a
batch of matrices over its leading dims (``matrix_layout="batch"``: MoE expert stacks
``(E, out, in)``, each expert orthogonalized and LR-adjusted on its own);
``split_sizes`` cuts each matrix into blocks of output rows (a fused QKV).
``build_optimizer`` sets these from the module types (:mod:`specopt.layers`).

The single-process step keeps, per bucket of same-shaped matrices, a persistent stacked
update buffer and :class:`~specopt.optim.newton_schulz.NSWorkspace` (no batch-sized
allocation or copy per step: the Nesterov update is written straight into its slot).
They stay allocated between steps: about 10 bytes per Muon parameter element (fp32
gradients, bf16 NS; 12 with fp32 NS), i.e. ~2.5x the fp32 weights they serve, the memory
a step used to allocate and free every time; :meth:`Muon.free_workspaces` drops them.
Distributed variants run four stages so they can replace stage 3 only: (1) momentum
(:func:`muon_momentum_`), (2) the matrices (:func:`matrix_views`), (3) their
orthogonalization (:meth:`Muon.orthogonalize`), (4) the update.

Orthogonalization configuration:

- ``ns_coefficients=(a, b, c)`` given: **torch-compatible mode**, exactly torch's iteration:
  constant coefficients, ``ns_steps`` (default 5), standard side, Frobenius normalization
  ``X / max(||X||_F, eps)``, computed in bf16 unless ``ns_dtype`` says otherwise; in bf16
  bit-identical to ``torch.optim.Muon`` (tested on native-bf16 CPUs).
- not given: **specopt default**, chosen by ``tools/bench_muon.py --sweep``: the 4-step
  ``"pe4"`` Polar Express schedule, ``normalize="tight"`` (divide additionally by the
  ``(sum sigma^8)^(1/8)`` bound, no extra matmul), the Gram side for matrices with aspect
  ratio >= 2 (one restart in 16-bit dtypes), same-shaped matrices batched, and
  ``ns_dtype`` = :func:`default_ns_dtype` (bf16 on CUDA and on CPUs with native bf16
  matmul; fp32 on other CPUs, where bf16 matmul is emulated and ~30x slower than fp32).
  4 steps of pe4 with the tight normalization leave a smaller RMS ``|sigma - 1|`` than
  torch's 5 jordan steps at 65% of its matmul FLOPs in bf16 (57% in fp32) on the d=512
  set; the tight normalization, not the schedule, is what wins (pe4 with Frobenius
  normalization alone is worse than torch on 3-decade spectra). Speed figures per CPU
  kind: README "Benchmarks". ``ns_schedule="polar_express"`` (5 steps) is the more
  accurate choice at 1.2x pe4's FLOPs.

LR adjustment ``adjust_lr_fn`` with ``(A, B)`` the ``(out, in)`` shape of each
orthogonalized matrix (see :func:`matrix_views`):

- ``None`` / ``"original"`` (Keller Jordan): ``lr * sqrt(max(1, A / B))``
- ``"match_rms_adamw"`` (Moonshot): ``lr * 0.2 * sqrt(max(A, B))``
- ``"spectral"``: ``lr * sqrt(A / B)``: with ``O``'s singular values ~1, the update's
  RMS->RMS operator norm ``sqrt(B / A) ||dW||_2`` equals ``lr`` (the spectral condition of
  Yang, Simon & Bernstein 2023), so ``lr`` is in "RMS-operator-norm per step" units.

Non-finite gradients (the one policy of :func:`specopt.optim.nonfinite.screen_nonfinite`,
shared with the hybrid; one scan per step): ``nonfinite="raise"`` (default) raises
``NonFiniteGradientError`` (a ``FloatingPointError``) naming every bad parameter (names from
``model.named_parameters()``, else ``param_groups[g].params[i]``) and its shape before
anything is modified; ``"skip"`` leaves that parameter (weights and momentum) untouched for
the step, warns, and counts it in the group's ``"nonfinite_skips"`` list
(see :attr:`Muon.nonfinite_skips`).

Distributed (``distributed=``, see :mod:`specopt.optim.distributed`): stages 1, 2
and 4 are elementwise and run on whatever each rank holds; stage 3 is split so that each
matrix is orthogonalized on exactly one rank, owners balanced by NS FLOPs.

- ``"auto"`` (default): FSDP2 parameters (DTensors sharded on dim 0) are gathered to their
  owner with one ``all_to_all`` and each rank gets its rows of the result back with a
  second; momentum buffers stay sharded DTensors. Plain tensors are handled locally, so a
  single process (or a job whose ranks hold different parameters) is unchanged.
- ``"ddp"``: plain parameters are replicated (DDP) on ``process_group``: each rank
  orthogonalizes its share and one ``all_gather`` gives every rank every update.
- ``"off"``: every rank orthogonalizes every matrix (DTensors are all-gathered), as
  ``torch.optim.Muon`` would; kept as the benchmark baseline.

Communication counters are in :attr:`Muon.comm_stats`. ``split_sizes`` is not supported
for sharded parameters (their row blocks would straddle shards).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from specopt.distributed import is_dtensor
from specopt.optim.distributed import CommStats, orthogonalize_distributed
from specopt.optim.newton_schulz import (
    DEFAULT_EPS,
    METHODS,
    NORMALIZATIONS,
    SCHEDULES,
    NSWorkspace,
    narrow_range,
    orthogonalize_into_,
    orthogonalize_many,
    resolve_schedule,
)
from specopt.optim.nonfinite import (
    NONFINITE_POLICIES,
    restore_grads,
    screen_nonfinite,
    skips_by_name,
)

__all__ = [
    "ADJUST_LR_FNS",
    "DEFAULT_NS_SCHEDULE",
    "Muon",
    "adjust_lr",
    "default_ns_dtype",
    "matrix_views",
    "muon_momentum_",
]

ADJUST_LR_FNS = ("original", "match_rms_adamw", "spectral")
DISTRIBUTED_MODES = ("auto", "ddp", "off")
MATRIX_LAYOUTS = ("flatten", "batch")
#: The specopt default schedule (see the module docstring and tools/bench_muon.py --sweep).
DEFAULT_NS_SCHEDULE = "pe4"
TORCH_NS_STEPS = 5  # torch.optim.Muon's default ns_steps
#: torch.optim.Muon's default ns_coefficients (Keller Jordan's constant quintic).
TORCH_NS_COEFFS = SCHEDULES["jordan"].coefficients[0]
# Group keys torch.optim.Muon reads with a stricter type than ours (None = "specopt's").
_TORCH_TYPED_KEYS = ("ns_coefficients", "ns_steps")


def default_ns_dtype(device: torch.device) -> torch.dtype:
    """bf16 where matmuls have a native bf16 path (CUDA, CPUs with AVX512-BF16 or AMX),
    fp32 elsewhere: on an AVX2-only CPU a 512^3 bf16 matmul measured 0.4 GFLOP/s against
    ~10 GFLOP/s in fp32."""
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, may move
        fast = any(getattr(torch.cpu, name, lambda: False)() for name in probes)
        return torch.bfloat16 if fast else torch.float32
    return torch.bfloat16


def adjust_lr(lr: float, adjust_lr_fn: str | None, shape: Sequence[int]) -> float:
    """LR for an orthogonalized matrix of 2-D ``shape = (A, B)``; rules in the module doc."""
    A, B = shape
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, A / B))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(A, B))
    if adjust_lr_fn == "spectral":
        return lr * math.sqrt(A / B)
    raise ValueError(f"adjust_lr_fn must be None or one of {ADJUST_LR_FNS}, got {adjust_lr_fn!r}")


def muon_momentum_(
    grads: list[Tensor], bufs: list[Tensor], *, momentum: float, nesterov: bool
) -> list[Tensor]:
    """Stage 1: ``buf <- lerp(buf, g, 1 - momentum)`` in place; returns the updates to
    orthogonalize (``lerp(g, buf, momentum)`` with nesterov, else the buffers)."""
    if not grads:
        return []
    torch._foreach_lerp_(bufs, grads, 1 - momentum)
    if nesterov:
        return [g.lerp(b, momentum) for g, b in zip(grads, bufs, strict=True)]
    return list(bufs)


def matrix_views(
    t: Tensor,
    *,
    matrix_layout: str | None = None,
    transposed: bool = False,
    split_sizes: Sequence[int] | None = None,
) -> list[tuple[Tensor, tuple[int, int]]]:
    """The 2-D matrices Muon orthogonalizes in ``t`` (a parameter, its gradient or its
    momentum), as views in ``t``'s storage orientation, each with its operator shape
    ``(out, in)`` (what the LR adjustment uses).

    - 2-D: ``t`` itself; ``transposed=True`` means it is stored ``(in, out)`` (transformers'
      ``Conv1D``): the view stays as stored (polar(W^T) = polar(W)^T), the shape flips.
    - ndim >= 3, ``matrix_layout="flatten"`` (default; conv kernels): ``(shape[0], -1)``.
    - ndim >= 3, ``matrix_layout="batch"`` (MoE expert stacks ``(E, out, in)``): one matrix
      per index of the leading dims, each orthogonalized and LR-adjusted on its own.
    - ``split_sizes``: each matrix cut into blocks of that many output rows (a fused QKV).
    """
    if t.ndim == 2:
        mats = [t]
    elif matrix_layout == "batch":
        mats = list(t.view(-1, *t.shape[-2:]).unbind(0))
    else:
        mats = [t.view(t.shape[0], -1)]
    out: list[tuple[Tensor, tuple[int, int]]] = []
    for M in mats:
        blocks = [M] if split_sizes is None else M.split(list(split_sizes), dim=int(transposed))
        for b in blocks:
            out.append((b, (b.shape[1], b.shape[0]) if transposed else (b.shape[0], b.shape[1])))
    return out


def _label(group: dict[str, Any], gi: int, i: int, p: Tensor) -> str:
    """How messages name parameter ``i`` of group ``gi``: its name when known."""
    names = group.get("param_names")
    label = repr(names[i]) if names else f"{i} of group {gi}"
    return f"parameter {label} (shape {tuple(p.shape)})"


def _layout(group: dict[str, Any]) -> dict[str, Any]:
    return {
        "matrix_layout": group.get("matrix_layout"),
        "transposed": group.get("transposed", False),
        "split_sizes": group.get("split_sizes"),
    }


def _add_blocks_(p: Tensor, blocks: list[Tensor], ops: list[tuple[int, int]],
                 how: dict[str, Any], lr: float, adjust_lr_fn: str | None) -> None:
    """``p -= adjust(lr, op) O`` for each orthogonalized block, in place."""
    if p.ndim > 2 and not p.is_contiguous():  # e.g. a channels_last conv kernel: no views
        scaled = [O * adjust_lr(lr, adjust_lr_fn, op) for O, op in zip(blocks, ops, strict=True)]
        p.sub_(torch.cat(scaled).reshape(p.shape))
        return
    for (pv, _), O, op in zip(matrix_views(p, **how), blocks, ops, strict=True):
        pv.add_(O.to(pv.dtype) if is_dtensor(pv) else O, alpha=-adjust_lr(lr, adjust_lr_fn, op))


class ComplexParameterError(ValueError, RuntimeError):
    """A complex parameter given to Muon (a ValueError at construction; also a RuntimeError,
    the type torch.optim.Muon raises for it)."""


def _fan_out(p: Tensor, matrix_layout: str | None, transposed: bool) -> int:
    """Output rows of each matrix :func:`matrix_views` reads from ``p``."""
    if p.ndim == 2 or matrix_layout == "batch":
        return p.shape[-1] if transposed else p.shape[-2]
    return p.shape[0]


def _check_range(name: str, value: Any, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


class Muon(Optimizer):
    """Muon optimizer for hidden weight matrices (2-D, or N-D reshaped to ``(out, -1)``).

    Args:
        params: tensors, ``(name, tensor)`` pairs (``model.named_parameters()``: names
            appear in error messages) or param-group dicts (any option below per group).
        lr: learning rate (float or 1-element tensor), default 1e-3.
        weight_decay: decoupled weight decay, applied as ``p *= 1 - lr * weight_decay``.
        momentum: EMA momentum in [0, 1), default 0.95.
        nesterov: Nesterov-style update ``lerp(g, buf, momentum)``, default True.
        ns_coefficients: one ``(a, b, c)`` (or a per-step list): torch-compatible mode.
        eps: Frobenius normalization floor, default 1e-7.
        ns_steps: NS steps (default: 5 with ns_coefficients, else the schedule's own count).
        adjust_lr_fn: ``None``/``"original"``, ``"match_rms_adamw"`` or ``"spectral"``.
        ns_schedule: schedule name (``specopt.optim.newton_schulz.SCHEDULES``) or
            coefficients; not together with ``ns_coefficients``.
        ns_dtype: NS compute dtype (default bf16 in torch-compatible mode, else
            :func:`default_ns_dtype`).
        ns_method: ``"auto"``, ``"standard"`` or ``"gram"`` (torch mode default:
            ``"standard"``; else ``"auto"``).
        ns_normalize: ``"frobenius"`` or ``"tight"`` (torch mode default ``"frobenius"``).
        split_sizes: blocks of output rows (summing to the fan-out) orthogonalized
            separately, e.g. ``(d, d, d)`` for a fused QKV weight; give it in that
            parameter's group.
        matrix_layout: how an ndim >= 3 tensor is read (see :func:`matrix_views`):
            ``None``/``"flatten"`` (conv kernels: ``(shape[0], -1)``) or ``"batch"`` (a
            stack of matrices over the leading dims, e.g. MoE experts ``(E, out, in)``,
            each orthogonalized and LR-adjusted on its own). Per group; ``build_optimizer``
            sets it from the module type (conv -> flatten, other ndim >= 3 -> batch).
        transposed: the matrices are stored ``(in, out)`` (transformers' ``Conv1D``): the LR
            adjustment and ``split_sizes`` use the true ``(out, in)`` orientation.
        nonfinite: ``"raise"`` or ``"skip"`` (module docstring).
        distributed: ``"auto"``, ``"ddp"`` or ``"off"``: how stage 3 is split across
            ranks (module docstring); no effect without a process group.
        process_group: the group replicated (``"ddp"``) parameters live on (default: the
            default group); DTensors use their own mesh.

    State per parameter: ``"momentum_buffer"`` (shape and dtype of the gradient).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: Any = None,
        eps: float = DEFAULT_EPS,
        ns_steps: int | None = None,
        adjust_lr_fn: str | None = None,
        *,
        ns_schedule: Any = None,
        ns_dtype: torch.dtype | None = None,
        ns_method: str | None = None,
        ns_normalize: str | None = None,
        split_sizes: Sequence[int] | None = None,
        matrix_layout: str | None = None,
        transposed: bool = False,
        nonfinite: str = "raise",
        distributed: str = "auto",
        process_group: Any = None,
    ) -> None:
        _check_range(
            "nonfinite", nonfinite, nonfinite in NONFINITE_POLICIES, f"one of {NONFINITE_POLICIES}"
        )
        _check_range(
            "distributed", distributed, distributed in DISTRIBUTED_MODES,
            f"one of {DISTRIBUTED_MODES}",
        )
        self.nonfinite = nonfinite
        self.distributed = distributed
        self.process_group = process_group
        #: Counters of the distributed stage 3 on this rank (bytes, matrices, collectives).
        self.comm_stats = CommStats()
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": ns_coefficients,
            "eps": eps,
            "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn,
            "ns_schedule": ns_schedule,
            "ns_dtype": ns_dtype,
            "ns_method": ns_method,
            "ns_normalize": ns_normalize,
            "split_sizes": split_sizes,
            "matrix_layout": matrix_layout,
            "transposed": transposed,
        }
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # load_state_dict lands here: groups saved by torch.optim.Muon (or an older specopt)
        # lack our keys; fill them with this instance's defaults so such checkpoints resume.
        super().__setstate__(state)
        for group in self.param_groups:
            for key in _TORCH_TYPED_KEYS:  # our own values, saved beside torch's (state_dict)
                if f"specopt_{key}" in group:
                    group[key] = group.pop(f"specopt_{key}")
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def state_dict(self) -> dict[str, Any]:
        """torch's state_dict, loadable by ``torch.optim.Muon`` too: ``ns_coefficients`` and
        ``ns_steps`` hold torch's types (an ``(a, b, c)`` tuple, an int; torch's defaults
        where specopt's schedule is in use) and specopt's own values ride along under
        ``specopt_ns_coefficients`` / ``specopt_ns_steps`` (restored on load here)."""
        sd = super().state_dict()
        for g in sd["param_groups"]:
            coeffs = g["ns_coefficients"]
            for key in _TORCH_TYPED_KEYS:
                g[f"specopt_{key}"] = g[key]
            constant = isinstance(coeffs, (tuple, list)) and len(coeffs) == 3 and all(
                isinstance(c, (int, float)) for c in coeffs)
            g["ns_coefficients"] = tuple(float(c) for c in coeffs) if constant else TORCH_NS_COEFFS
            g["ns_steps"] = g["ns_steps"] or TORCH_NS_STEPS
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load, after checking every momentum buffer's shape against its parameter
        (a checkpoint of a different model fails here, naming the parameter, and loads
        nothing; torch would fail only at the next step, naming none)."""
        saved = state_dict.get("param_groups", [])
        if len(saved) == len(self.param_groups):
            for gi, (sg, g) in enumerate(zip(saved, self.param_groups, strict=True)):
                for i, (idx, p) in enumerate(zip(sg["params"], g["params"], strict=False)):
                    buf = state_dict.get("state", {}).get(idx, {}).get("momentum_buffer")
                    if isinstance(buf, Tensor) and tuple(buf.shape) != tuple(p.shape):
                        raise ValueError(
                            f"checkpoint momentum_buffer for {_label(g, gi, i, p)} has shape "
                            f"{tuple(buf.shape)}: the checkpoint is from a different model"
                        )
        super().load_state_dict(state_dict)

    # -- validation (once per group, at construction / add_param_group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._validate_group(self.param_groups[-1], len(self.param_groups) - 1)
        except Exception:
            self.param_groups.pop()
            raise

    @staticmethod
    def _validate_group(g: dict[str, Any], gi: int) -> None:
        lr = g["lr"]
        if isinstance(lr, Tensor):
            if lr.numel() != 1:  # torch.optim.Muon's wording first (its tests match it)
                raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
            lr = float(lr)
        _check_range(
            "lr", lr, isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0,
            "finite and >= 0",
        )
        wd = g["weight_decay"]
        _check_range(
            "weight_decay", wd, isinstance(wd, (int, float)) and math.isfinite(wd) and wd >= 0,
            "finite and >= 0",
        )
        mom = g["momentum"]
        _check_range("momentum", mom, isinstance(mom, (int, float)) and 0 <= mom < 1, "in [0, 1)")
        _check_range("nesterov", g["nesterov"], isinstance(g["nesterov"], bool), "a bool")
        eps = g["eps"]
        _check_range("eps", eps, isinstance(eps, (int, float)) and eps > 0, "> 0")
        st = g["ns_steps"]
        _check_range(
            "ns_steps",
            st,
            st is None or (isinstance(st, int) and not isinstance(st, bool) and 1 <= st < 100),
            "None or an int in [1, 100)",
        )
        fn = g["adjust_lr_fn"]
        if fn is not None and fn not in ADJUST_LR_FNS:
            raise ValueError(
                f"Adjust learning rate function {fn} is not supported: adjust_lr_fn must be "
                f"None or one of {ADJUST_LR_FNS}"
            )
        _check_range(
            "matrix_layout", g["matrix_layout"], g["matrix_layout"] in (None, *MATRIX_LAYOUTS),
            f"None or one of {MATRIX_LAYOUTS}",
        )
        _check_range("transposed", g["transposed"], isinstance(g["transposed"], bool), "a bool")
        if g["ns_coefficients"] is not None and g["ns_schedule"] is not None:
            raise ValueError("give ns_coefficients (torch-compatible) or ns_schedule, not both")
        for key in ("ns_coefficients", "ns_schedule"):
            if g[key] is not None:
                resolve_schedule(g[key], argname=key)
        dt = g["ns_dtype"]
        _check_range(
            "ns_dtype",
            dt,
            dt is None or (isinstance(dt, torch.dtype) and dt.is_floating_point),
            "None or a float dtype",
        )
        _check_range(
            "ns_method",
            g["ns_method"],
            g["ns_method"] in (None, *METHODS),
            f"None or one of {METHODS}",
        )
        _check_range(
            "ns_normalize",
            g["ns_normalize"],
            g["ns_normalize"] in (None, *NORMALIZATIONS),
            f"None or one of {NORMALIZATIONS}",
        )
        split = g["split_sizes"]
        if split is not None:
            split = tuple(split)
            _check_range(
                "split_sizes",
                split,
                len(split) > 0 and all(isinstance(s, int) and s > 0 for s in split),
                "a sequence of positive ints",
            )
            g["split_sizes"] = split
        for i, p in enumerate(g["params"]):
            what = _label(g, gi, i, p)
            if p.ndim < 2:
                raise ValueError(
                    f"Muon only optimizes matrices (2-D, or N-D reshaped to (shape[0], -1)); "
                    f"{what} has {p.ndim} dims: give it to AdamW (see specopt.build_optimizer)"
                )
            if p.is_complex():
                raise ComplexParameterError(f"Muon does not support complex parameters: {what}")
            if not p.is_floating_point():
                raise ValueError(f"Muon needs floating-point parameters; {what} is {p.dtype}")
            fan_out = _fan_out(p, g["matrix_layout"], g["transposed"])
            if split is not None and sum(split) != fan_out:
                raise ValueError(
                    f"split_sizes {split} must sum to the fan-out {fan_out} (output rows) "
                    f"of {what}"
                )
            batched = p.ndim > 2 and g["matrix_layout"] == "batch"
            if is_dtensor(p) and (g["transposed"] or batched):
                raise ValueError(
                    f"matrix_layout='batch' / transposed are not supported for sharded (DTensor) "
                    f"{what}; FSDP2 shards dim 0, which would split its matrices"
                )
            if split is not None and is_dtensor(p):
                raise ValueError(
                    f"split_sizes is not supported for sharded (DTensor) {what}: its row blocks "
                    "would straddle shards; orthogonalize it whole or split the module"
                )

    # -- stage 3, separable (distributed variants override or wrap this)

    def ns_options(self, group: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """Keyword arguments for :func:`~specopt.optim.newton_schulz.orthogonalize` that this
        group's options resolve to on ``device``."""
        if group["ns_coefficients"] is not None:  # torch-compatible mode
            return {
                "schedule": group["ns_coefficients"],
                "steps": group["ns_steps"] or TORCH_NS_STEPS,
                "eps": group["eps"],
                "dtype": group["ns_dtype"] or torch.bfloat16,
                "method": group["ns_method"] or "standard",
                "normalize": group["ns_normalize"] or "frobenius",
            }
        return {
            "schedule": group["ns_schedule"] or DEFAULT_NS_SCHEDULE,
            "steps": group["ns_steps"],
            "eps": group["eps"],
            "dtype": group["ns_dtype"] or default_ns_dtype(device),
            "method": group["ns_method"] or "auto",
            "normalize": group["ns_normalize"] or "tight",
        }

    def orthogonalize(self, matrices: list[Tensor], group: dict[str, Any]) -> list[Tensor]:
        """Stage 3: orthogonalize 2-D matrices (same-shaped ones in one batched call)."""
        if not matrices:
            return []
        return orthogonalize_many(matrices, **self.ns_options(group, matrices[0].device))

    def _orthogonalize_stage(self, matrices: list[Tensor], group: dict[str, Any]) -> list[Tensor]:
        """Stage 3 as configured by ``distributed``: local, or split across ranks."""
        # getattr: an unpickled optimizer (torch pickles only defaults/state/groups).
        mode = getattr(self, "distributed", "auto")
        sharded = any(is_dtensor(m) for m in matrices)
        if not sharded and mode != "ddp":
            return self.orthogonalize(matrices, group)  # single-process path, unchanged
        if not hasattr(self, "comm_stats"):
            self.comm_stats = CommStats()
        # NS starts by rounding its input to the NS dtype and returns that dtype, so moving
        # matrices and results in it (bf16: half the bytes of fp32) loses nothing.
        ns_dtype = self.ns_options(group, matrices[0].device)["dtype"] if matrices else None
        # Not fp16: its range cannot carry unnormalized gradients (NS normalizes first there).
        send_in_ns_dtype = ns_dtype is not None and not narrow_range(ns_dtype) and all(
            ns_dtype.itemsize < m.dtype.itemsize for m in matrices)
        return orthogonalize_distributed(
            matrices,
            lambda mats: self.orthogonalize(mats, group),
            replicated=mode == "ddp",
            group=getattr(self, "process_group", None),
            split=mode != "off",
            stats=self.comm_stats,
            comm_dtype=ns_dtype if send_in_ns_dtype else None,
        )

    # -- the step

    def _param_label(self, group: dict[str, Any], i: int, p: Tensor) -> str:
        gi = next(k for k, g in enumerate(self.param_groups) if g is group)
        return _label(group, gi, i, p)

    def _init_group(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        params, grads = [], []
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"Muon does not support sparse gradients: {self._param_label(group, i, p)}"
                )
            params.append(p)
            grads.append(p.grad)
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(
                    p.grad, memory_format=torch.preserve_format
                )
            bufs.append(state["momentum_buffer"])
        return params, grads, bufs

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One Muon step over all groups (stages 1-4); returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # One scan of every gradient (same answer on every rank under FSDP2), unless the
        # hybrid already screened them for this step.
        screened_already = getattr(self, "_specopt_screened", False)
        hidden = [] if screened_already else screen_nonfinite(self.param_groups, self.nonfinite)
        try:
            self._step_groups()
        finally:
            restore_grads(hidden)
        return loss

    def _step_groups(self) -> None:
        work = [(g, *self._init_group(g)) for g in self.param_groups]  # all checks first
        for gi, (group, params, grads, bufs) in enumerate(work):
            if not params:
                continue
            if self._is_local(params):
                self._step_local(gi, group, params, grads, bufs)
                continue
            how = _layout(group)
            updates = muon_momentum_(
                grads, bufs, momentum=group["momentum"], nesterov=group["nesterov"]
            )
            views = [matrix_views(u, **how) for u in updates]
            ortho = self._orthogonalize_stage([m for v in views for m, _ in v], group)
            lr, fn = float(group["lr"]), group["adjust_lr_fn"]
            k = 0
            for p, v in zip(params, views, strict=True):
                p.mul_(1 - lr * group["weight_decay"])
                _add_blocks_(p, ortho[k : k + len(v)], [op for _, op in v], how, lr, fn)
                k += len(v)

    def _is_local(self, params: list[Tensor]) -> bool:
        """The single-process path: plain tensors (no DTensor, no "ddp" split) whose matrix
        views share the parameter's storage."""
        mode = getattr(self, "distributed", "auto")  # getattr: unpickled optimizers lack it
        return mode != "ddp" and not any(
            is_dtensor(p) or (p.ndim > 2 and not p.is_contiguous()) for p in params
        )

    def free_workspaces(self) -> None:
        """Drop the persistent per-bucket buffers (rebuilt at the next step), e.g. to give
        their memory to evaluation between training phases."""
        self.__dict__.pop("_workspaces", None)

    def _workspace(
        self, bucket: tuple, batch: int, shape: tuple[int, int], dtype: torch.dtype,
        device: torch.device, opts: dict[str, Any],
    ) -> tuple[NSWorkspace, Tensor]:
        """The persistent buffers for one bucket of same-shaped matrices: the NS workspace
        and the stacked update ``U`` (``(batch, *shape)`` in the gradients' dtype; the
        workspace's own input when that is already the NS dtype, saving a cast)."""
        cache = self.__dict__.setdefault("_workspaces", {})
        # One per bucket (``bucket`` names it: group index and bucket key), not per batch
        # size: a bucket whose size changes (a skipped non-finite gradient, a parameter
        # without grad) replaces its buffers, never piles up copies of them. Keyed by
        # bucket, not by shape alone: same-shaped buckets of different sizes (e.g. a fused
        # QKV's blocks in their own group beside other square matrices) would otherwise
        # evict each other and reallocate at every step.
        key = (*bucket, opts["dtype"], opts["normalize"] == "frobenius")
        hit = cache.get(key)
        if hit is None or hit[0].batch != batch:
            ws = NSWorkspace(batch, *shape, opts["dtype"], device,
                             torch_layout=opts["normalize"] == "frobenius")
            U = ws.input if dtype == opts["dtype"] else torch.empty(
                batch, *shape, dtype=dtype, device=device)
            hit = cache[key] = (ws, U)
        return hit

    def _step_local(
        self, gi: int, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
        bufs: list[Tensor],
    ) -> None:
        """Stages 1-4 without per-step batch allocations: momentum in place (one foreach),
        the Nesterov update written straight into the bucket's persistent stacked buffer,
        NS in reused workspaces, then one foreach add per bucket."""
        momentum, nesterov = group["momentum"], group["nesterov"]
        torch._foreach_lerp_(bufs, grads, 1 - momentum)
        how = _layout(group)
        buckets: dict[tuple, list[tuple[Tensor, Tensor, Tensor]]] = {}
        for p, g, b in zip(params, grads, bufs, strict=True):
            views = zip(matrix_views(p, **how), matrix_views(g, **how), matrix_views(b, **how),
                        strict=True)
            for (pv, op), (gv, _), (bv, _) in views:
                buckets.setdefault((tuple(pv.shape), op, g.dtype, p.device), []).append(
                    (pv, gv, bv))
        lr, fn = float(group["lr"]), group["adjust_lr_fn"]
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        opts = self.ns_options(group, params[0].device)
        for (shape, op, dtype, device), mats in buckets.items():
            ws, U = self._workspace((gi, shape, op, dtype, device), len(mats), shape, dtype,
                                    device, opts)
            for j, (_, gv, bv) in enumerate(mats):
                if nesterov:
                    torch.lerp(gv, bv, momentum, out=U[j])
                else:
                    U[j].copy_(bv)
            O = orthogonalize_into_(ws, U, **opts)
            torch._foreach_add_([pv for pv, _, _ in mats], list(O.unbind(0)),
                                alpha=-adjust_lr(lr, fn, op))

    @property
    def nonfinite_skips(self) -> dict[str, int]:
        """``{parameter name: steps skipped for a non-finite gradient}`` (non-zero only;
        unnamed parameters as ``param_groups[g].params[i]``)."""
        return skips_by_name(self.param_groups)
