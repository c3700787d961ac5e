"""The PC layer: polynomial weight preconditioning as a ``torch.nn.utils.parametrize`` hook.

For a Linear layer with raw (trained) weight ``W`` of shape ``(out, in)``::

    s     = u^T W v                      power-iteration estimate of sigma_max(W)
    W_eff = gamma * stopgrad(s) * f(W / s)          (norm recovery on, the default)
    W_eff = gamma * f(W / s)                        (norm recovery off)

``f`` is an odd polynomial (:mod:`specopt.pc.polynomials`) acting on the singular values of
``W / s``, which lie in ``[0, ~1]``. The gradient flows through the ``s`` that divides ``W``;
the ``s`` that multiplies back is detached (arXiv 2606.06470 and the authors' code).

Norm recovery (our name for the ``stopgrad(s)`` factor): with it, ``f(1) = 1`` makes the
top singular value of ``W_eff`` equal ``gamma * s``, i.e. the PC layer reshapes the
spectrum but keeps the raw weight's scale, so initialisation scale, weight decay and
learning rates keep their usual meaning (this is the published form). Without it, the
spectral norm of ``W_eff`` is ``gamma`` (1 at init) whatever the scale of ``W``: the raw
weight then only sets singular-value *ratios*, and ``gamma`` alone sets the scale.

``u``, ``v`` are persistent buffers (saved in checkpoints), refined by warm-started power
iteration (the shared :mod:`specopt.spectral.power_iteration`) *outside* the forward:
once when PC is applied and then after every optimizer step through the hook registered by
:meth:`PCHandle.attach`. The forward only reads them, so evaluating ``module.weight``
(e.g. by the spectral monitor) never changes training numerics.

Gradient accumulation: ``W_eff`` is otherwise recomputed at every access of
``module.weight``, i.e. once per micro-batch. Two ways to compute it once per step:

1. ``with torch.nn.utils.parametrize.cached(): (sum of micro-batch losses).backward()``:
   one PC forward, but the graphs of all micro-batches are alive together and
   ``backward`` must run once (a second backward through the cached ``W_eff`` fails
   unless ``retain_graph=True``, which repeats the PC backward).
2. ``with handle.accumulate(): for mb in micro_batches: model.loss(*mb).backward()``:
   ``W_eff`` is computed once on entry and handed to the model as a detached leaf; each
   micro-batch backward accumulates into that leaf; on exit a single backward through
   the PC graph moves the summed gradient to the raw ``W`` (and ``gamma``). Same
   gradients as recomputing per micro-batch, one PC forward and one PC backward per step.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from specopt.distributed import full_tensor
from specopt.pc.polynomials import OddPolynomial, odd_matrix_polynomial, resolve_polynomial
from specopt.spectral.power_iteration import (
    DEFAULT_EPS,
    init_singular_vectors,
    power_iteration_,
    sigma_max_estimate,
)

__all__ = [
    "DEFAULT_PC_TARGETS",
    "QKV_NAMES",
    "PCHandle",
    "PCParametrization",
    "apply_pc",
    "get_pc",
    "is_pc_module",
    "merge_pc",
    "pc_weight",
]

#: Last name component of the Linear layers PC wraps by default: FFN matrices and the
#: attention output projection of Llama (Meta and HF), GPT-2, OPT/ViT-style models.
DEFAULT_PC_TARGETS: tuple[str, ...] = (
    "w1", "w2", "w3",  # Meta Llama FFN
    "gate_proj", "up_proj", "down_proj",  # HF Llama/Mistral FFN
    "c_fc", "c_proj",  # GPT-2 FFN and attention output
    "fc1", "fc2",  # OPT, ViT, BERT-style FFN
    "wo", "o_proj", "out_proj",  # attention output projections
)

#: Query/key/value projections: never wrapped by default (the paper leaves them plain);
#: added to the defaults with ``include_qkv=True``.
QKV_NAMES: tuple[str, ...] = (
    "wq", "wk", "wv", "q_proj", "k_proj", "v_proj", "c_attn", "qkv", "qkv_proj",
    "query", "key", "value",
)

#: Power iterations run once when PC is applied (random start); later refreshes are warm.
DEFAULT_INIT_ITERS = 50


def _vector_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    # u, v and s in at least fp32 (a bf16 s would be off by ~0.4%).
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # device types without autocast (e.g. meta)
        return False


def pc_weight(
    weight: Tensor,
    u: Tensor,
    v: Tensor,
    gamma: Tensor | float | None,
    coefficients: Sequence[float],
    *,
    eps: float = DEFAULT_EPS,
    norm_recovery: bool = True,
) -> Tensor:
    """Effective PC weight ``gamma * stopgrad(s) * f(W / s)`` with ``s = u^T W v``.

    Args:
        weight: raw ``W``, ``(out, in)``; gradients flow to it (also through ``s``).
        u: ``(out,)``, v: ``(in,)`` unit vectors from power iteration; constants here
            (callers holding them in buffers pass clones).
        gamma: learnable scalar gain (0-D tensor), a float, or ``None`` for 1.
        coefficients: odd-power coefficients ``(c1, c3, ...)`` of ``f``.
        eps: floor on ``s``: ``s~ = max(s, eps)`` divides ``W``, so a zero matrix gives
            ``W_eff = 0`` (never NaN) and ``f(W / s~)`` stays bounded when ``s < eps``.
        norm_recovery: multiply back by ``stopgrad(s~)`` (keep ``W``'s scale); if False,
            ``W_eff = gamma * f(W / s~)`` has spectral norm ~``gamma``.

    Returns:
        ``W_eff`` with ``weight``'s shape and dtype (autocast is disabled inside: the
        polynomial is evaluated in the weight's own precision). Its singular values are
        ``gamma * s * f(sigma_i / s)`` for the singular values ``sigma_i`` of ``W``.
    """
    device_type = weight.device.type
    if _autocast_enabled(device_type):
        # Under bf16 autocast the Gram/Horner products would run in bf16: ~1% error in
        # W_eff for level 4 (its coefficients reach 14). Compute in the weight's dtype;
        # the layer's own matmul still autocasts W_eff.
        with torch.autocast(device_type, enabled=False):
            return pc_weight(weight, u, v, gamma, coefficients, eps=eps,
                             norm_recovery=norm_recovery)
    s = sigma_max_estimate(weight, u, v).clamp_min(eps)  # 0-D, in u's dtype (>= fp32)
    w_eff = odd_matrix_polynomial(weight / s.to(weight.dtype), coefficients)
    # One 0-D scale, one elementwise pass: stopgrad(s) * gamma.
    scale: Tensor | float | None = s.detach().to(weight.dtype) if norm_recovery else None
    if gamma is not None:
        scale = gamma if scale is None else scale * gamma
    return w_eff if scale is None else w_eff * scale


class PCParametrization(nn.Module):
    """Parametrization ``W -> W_eff`` for one weight; registered on ``module.weight``.

    State (all in the module's ``state_dict`` under
    ``<module>.parametrizations.weight.0.{u,v,gamma}``):
        u: buffer ``(out,)``, left singular vector estimate (fp32, fp64 for fp64 weights).
        v: buffer ``(in,)``, right singular vector estimate.
        gamma: 0-D ``nn.Parameter`` (init ``gamma_init``) or ``None`` when disabled.

    Attributes:
        polynomial: the :class:`OddPolynomial` ``f``.
        power_iters: power iterations per :meth:`refresh_` (10 in all published configs).
        eps: normalisation floor for power iteration and floor on ``s``.
        norm_recovery: see module docstring.

    ``forward`` never modifies ``u``, ``v``; :meth:`refresh_` does (in place, no grad).
    """

    #: Marker read by code that must not import specopt.pc (the spectral monitor finds PC
    #: layers by this attribute on a ``module.parametrizations.weight`` entry).
    is_pc_parametrization: ClassVar[bool] = True

    def __init__(
        self,
        weight: Tensor,
        *,
        polynomial: OddPolynomial,
        power_iters: int = 10,
        eps: float = DEFAULT_EPS,
        learn_gamma: bool = True,
        gamma_init: float = 1.0,
        norm_recovery: bool = True,
    ) -> None:
        super().__init__()
        if weight.ndim != 2:
            raise ValueError(f"PC needs a 2-D weight, got shape {tuple(weight.shape)}")
        if not weight.is_floating_point():
            raise TypeError(f"PC needs a floating-point weight, got dtype {weight.dtype}")
        if not isinstance(polynomial, OddPolynomial):
            raise TypeError(f"polynomial must be an OddPolynomial, got {type(polynomial).__name__}")
        if isinstance(power_iters, bool) or not isinstance(power_iters, int) or power_iters < 1:
            raise ValueError(f"power_iters must be an int >= 1, got {power_iters!r}")
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a finite float > 0, got {eps!r}")
        if not math.isfinite(gamma_init):
            raise ValueError(f"gamma_init must be finite, got {gamma_init!r}")
        self.polynomial = polynomial
        self.gamma_init = float(gamma_init)
        self.power_iters = power_iters
        self.eps = float(eps)
        self.norm_recovery = bool(norm_recovery)
        u, v = init_singular_vectors(
            weight.shape, device=weight.device, dtype=_vector_dtype(weight.dtype)
        )
        self.register_buffer("u", u)
        self.register_buffer("v", v)
        self.gamma: nn.Parameter | None = (
            nn.Parameter(torch.tensor(float(gamma_init), dtype=weight.dtype, device=weight.device))
            if learn_gamma
            else None
        )
        # Set only inside PCHandle.accumulate(): a detached leaf standing in for W_eff.
        self._accumulation_leaf: Tensor | None = None

    def forward(self, weight: Tensor) -> Tensor:
        """``W_eff`` from the raw weight; reads (clones) ``u``, ``v``, never advances them."""
        if self._accumulation_leaf is not None:
            return self._accumulation_leaf
        dtype = _vector_dtype(weight.dtype)
        # Clone: refresh_ updates the buffers in place, which would invalidate a saved graph.
        u = self.u.to(dtype=dtype, copy=True)
        v = self.v.to(dtype=dtype, copy=True)
        return pc_weight(
            weight, u, v, self.gamma, self.polynomial.coefficients,
            eps=self.eps, norm_recovery=self.norm_recovery,
        )

    def sigma(self, weight: Tensor) -> Tensor:
        """Current estimate ``s = u^T W v`` (0-D, no grad)."""
        with torch.no_grad():
            return sigma_max_estimate(weight, self.u, self.v)

    @torch.no_grad()
    def refresh_(self, weight: Tensor, iters: int | None = None) -> None:
        """Warm-started power iteration on ``weight`` (the raw W), updating ``u``, ``v`` in place.

        Runs ``iters`` (default ``power_iters``) iterations of the shared estimator. If the
        vectors have the wrong shape they are re-initialised first. If ``weight`` holds
        NaN/Inf the previous vectors are kept (no NaN enters the buffers); checked without
        a host sync.
        """
        weight = full_tensor(weight)  # FSDP2 (DTensor rows): gather; collective
        self._check_shapes(weight)
        u_prev, v_prev = self.u.clone(), self.v.clone()
        power_iteration_(weight, self.u, self.v, iters=self.power_iters if iters is None else iters,
                         eps=self.eps)
        ok = torch.isfinite(self.u).all() & torch.isfinite(self.v).all()
        self.u.copy_(torch.where(ok, self.u, u_prev))
        self.v.copy_(torch.where(ok, self.v, v_prev))

    @torch.no_grad()
    def reset_(self, weight: Tensor, iters: int = DEFAULT_INIT_ITERS) -> None:
        """Fresh ``u``, ``v`` (fixed-seed random, then ``iters`` power iterations) and
        ``gamma = gamma_init``: for weights materialised after meta-device construction
        (``to_empty`` leaves buffers uninitialised) or replaced wholesale."""
        u, v = init_singular_vectors(weight.shape, device=weight.device, dtype=self.u.dtype)
        self.u.copy_(u)
        self.v.copy_(v)
        if self.gamma is not None:
            self.gamma.fill_(self.gamma_init)
        self.refresh_(weight, iters)

    def _check_shapes(self, weight: Tensor) -> None:
        if tuple(self.u.shape) != (weight.shape[0],) or tuple(self.v.shape) != (weight.shape[1],):
            self._reinit(weight)

    def _reinit(self, weight: Tensor) -> None:
        u, v = init_singular_vectors(
            weight.shape, device=weight.device, dtype=_vector_dtype(weight.dtype)
        )
        self.u = u  # plain assignment to a registered buffer name re-registers it
        self.v = v

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # A checkpoint with NaN/zero vectors would poison every later s: re-init them
        # (the next refresh re-converges) rather than silently training on garbage.
        if not (
            torch.isfinite(self.u).all() and torch.isfinite(self.v).all()
            and self.u.norm() > 0 and self.v.norm() > 0
        ):
            warnings.warn(
                f"PC vectors loaded from '{prefix}u'/'{prefix}v' are zero or non-finite; "
                "re-initialised (call PCHandle.refresh() before the next forward)",
                stacklevel=2,
            )
            with torch.no_grad():
                u, v = init_singular_vectors((self.u.shape[0], self.v.shape[0]),
                                             device=self.u.device, dtype=self.u.dtype)
                self.u.copy_(u)
                self.v.copy_(v)

    def extra_repr(self) -> str:
        return (
            f"{self.polynomial.name}{self.polynomial.coefficients}, "
            f"power_iters={self.power_iters}, "
            f"eps={self.eps:g}, gamma={'on' if self.gamma is not None else 'off'}, "
            f"norm_recovery={self.norm_recovery}"
        )


def get_pc(module: nn.Module) -> PCParametrization | None:
    """The :class:`PCParametrization` on ``module.weight``, or ``None``."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations.weight:
        if isinstance(p, PCParametrization):
            return p
    return None


def is_pc_module(module: nn.Module) -> bool:
    """True when ``module.weight`` carries a :class:`PCParametrization`."""
    return get_pc(module) is not None


class PCHandle:
    """What :func:`apply_pc` wrapped, and the hooks that keep ``u``, ``v`` fresh.

    Attributes:
        modules: ``{qualified name: module}`` of the wrapped layers, in model order.
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules

    @property
    def names(self) -> list[str]:
        """Qualified names of the wrapped modules."""
        return list(self.modules)

    @property
    def parametrizations(self) -> dict[str, PCParametrization]:
        """``{name: PCParametrization}`` for every wrapped module."""
        return {name: self._pc(name, m) for name, m in self.modules.items()}

    def gamma_parameters(self) -> list[nn.Parameter]:
        """The learnable gains (0-D), for optimizers built by hand."""
        return [p.gamma for p in self.parametrizations.values() if p.gamma is not None]

    @staticmethod
    def _pc(name: str, module: nn.Module) -> PCParametrization:
        pc = get_pc(module)
        if pc is None:
            raise RuntimeError(f"module '{name}' no longer has PC (merged with merge_pc?)")
        return pc

    @torch.no_grad()
    def refresh(self, iters: int | None = None) -> None:
        """Run warm-started power iteration on every wrapped weight (``power_iters`` each).

        Same-shaped weights are refreshed together by one batched call of the shared
        estimator (the rule per matrix is unchanged; it saves ~10 tiny kernel launches per
        iteration and matrix, which dominate the refresh cost).
        """
        groups: dict[tuple, list[tuple[PCParametrization, Tensor]]] = {}
        for name, module in self.modules.items():
            pc = self._pc(name, module)
            # FSDP2 shards W by rows (DTensor): every rank gathers the full W and runs the
            # same iteration, so u, v stay identical across ranks (collective).
            weight = full_tensor(module.parametrizations.weight.original)
            key = (tuple(weight.shape), weight.device, pc.u.dtype, pc.v.dtype,
                   pc.power_iters if iters is None else iters, pc.eps)
            groups.setdefault(key, []).append((pc, weight))
        for (_, _, _, _, n_iters, eps), items in groups.items():
            if len(items) == 1:
                items[0][0].refresh_(items[0][1], n_iters)
                continue
            for pc, weight in items:
                pc._check_shapes(weight)
            w = torch.stack([weight.detach() for _, weight in items])
            u = torch.stack([pc.u for pc, _ in items])
            v = torch.stack([pc.v for pc, _ in items])
            u_prev, v_prev = u.clone(), v.clone()
            power_iteration_(w, u, v, iters=n_iters, eps=eps)
            ok = (torch.isfinite(u).all(-1) & torch.isfinite(v).all(-1)).unsqueeze(-1)
            u = torch.where(ok, u, u_prev)
            v = torch.where(ok, v, v_prev)
            for i, (pc, _) in enumerate(items):
                pc.u.copy_(u[i])
                pc.v.copy_(v[i])

    @torch.no_grad()
    def reset(self, iters: int = DEFAULT_INIT_ITERS) -> None:
        """:meth:`PCParametrization.reset_` on every wrapped module.

        Meta-device workflow: build the model on ``meta``, ``apply_pc``, ``to_empty``,
        initialise the raw weights (``module.parametrizations.weight.original``, or
        ``model.parameters()``; an in-place init of ``module.weight`` writes into the
        computed ``W_eff`` and is lost), then ``handle.reset()``. Simpler when possible:
        materialise and initialise first, then ``apply_pc``.
        """
        for name, module in self.modules.items():
            self._pc(name, module).reset_(module.parametrizations.weight.original, iters)

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Refresh ``u``, ``v`` after every ``optimizer.step()``; returns the removable hook.

        Uses ``optimizer.register_step_post_hook``, so it works with any
        ``torch.optim.Optimizer`` (``specopt.Muon``, ``build_optimizer``'s optimizer,
        ``torch.optim.AdamW``). It runs before ``scheduler.step()`` in the usual loop, so
        the forward at step t uses vectors refined on the current W.
        """
        register = getattr(optimizer, "register_step_post_hook", None)
        if not callable(register):
            raise TypeError(
                "attach needs a torch.optim.Optimizer (with register_step_post_hook), got "
                f"{type(optimizer).__name__}"
            )
        return register(lambda _opt, _args, _kwargs: self.refresh())

    @contextmanager
    def accumulate(self) -> Iterator[None]:
        """Compute each ``W_eff`` once for all micro-batches run inside the block.

        On entry, ``W_eff`` is computed with grad and the model sees a detached leaf copy;
        micro-batch backwards accumulate into the leaf; on normal exit one backward sends
        the summed gradient through the PC graph to the raw weights and ``gamma``. If the
        block raises, nothing is back-propagated. Do not call ``optimizer.step()`` inside.
        """
        entries: list[tuple[PCParametrization, Tensor, Tensor]] = []
        try:
            for name, module in self.modules.items():
                pc = self._pc(name, module)
                if pc._accumulation_leaf is not None:
                    raise RuntimeError(f"accumulate() is already active on '{name}'")
                w_eff = module.weight
                leaf = w_eff.detach().requires_grad_(w_eff.requires_grad)
                pc._accumulation_leaf = leaf
                entries.append((pc, w_eff, leaf))
            yield
        finally:
            for pc, _, _ in entries:
                pc._accumulation_leaf = None
        outputs = [w for _, w, leaf in entries if w.requires_grad and leaf.grad is not None]
        grads = [leaf.grad for _, w, leaf in entries if w.requires_grad and leaf.grad is not None]
        if outputs:
            torch.autograd.backward(outputs, grads)

    def __len__(self) -> int:
        return len(self.modules)

    def __repr__(self) -> str:
        return f"PCHandle({len(self)} modules: {', '.join(self.names)})"


def _select_targets(
    model: nn.Module,
    targets: Sequence[str] | str | None,
    predicate: Callable[[str, nn.Module], bool] | None,
    include_qkv: bool,
) -> dict[str, nn.Module]:
    named = [(name, m) for name, m in model.named_modules() if name]
    if targets is not None:
        patterns = [targets] if isinstance(targets, str) else list(targets)
        if not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise ValueError(f"targets must be non-empty glob strings, got {targets!r}")
        selected: dict[str, nn.Module] = {}
        for pattern in patterns:
            hits = [(n, m) for n, m in named if fnmatch.fnmatchcase(n, pattern)]
            linear = [(n, m) for n, m in hits if isinstance(m, nn.Linear)]
            if not hits:
                warnings.warn(f"apply_pc: target pattern {pattern!r} matches no module",
                              stacklevel=3)
            elif not linear:
                shown = ", ".join(f"{n} ({type(m).__name__})" for n, m in hits[:4])
                raise TypeError(
                    f"apply_pc: target pattern {pattern!r} matches only non-Linear modules "
                    f"({shown}); PC applies to nn.Linear weights"
                )
            selected.update(linear)
        return selected
    if predicate is not None:
        if not callable(predicate):
            raise TypeError(f"predicate must be callable(name, module), got {predicate!r}")
        return {n: m for n, m in named if isinstance(m, nn.Linear) and predicate(n, m)}
    names = set(DEFAULT_PC_TARGETS) | (set(QKV_NAMES) if include_qkv else set())
    chosen = {n: m for n, m in named if n.rsplit(".", 1)[-1] in names}
    skipped = [f"{n} ({type(m).__name__})" for n, m in chosen.items()
               if not isinstance(m, nn.Linear)]
    if skipped:
        warnings.warn(f"apply_pc: skipping non-Linear modules named like PC targets: "
                      f"{', '.join(skipped)}", stacklevel=3)
    return {n: m for n, m in chosen.items() if isinstance(m, nn.Linear)}


def apply_pc(
    model: nn.Module,
    *,
    level: int | None = None,
    coefficients: OddPolynomial | Sequence[float] | None = None,
    targets: Sequence[str] | str | None = None,
    predicate: Callable[[str, nn.Module], bool] | None = None,
    include_qkv: bool = False,
    power_iters: int = 10,
    eps: float = DEFAULT_EPS,
    learn_gamma: bool = True,
    gamma_init: float = 1.0,
    norm_recovery: bool = True,
    init_iters: int = DEFAULT_INIT_ITERS,
) -> PCHandle:
    """Wrap Linear layers of ``model`` (in place) with the PC parametrization.

    Args:
        model: any ``nn.Module``.
        level: published polynomial 1-4 (default 4 when ``coefficients`` is not given;
            the paper uses 4 with AdamW and 2 with Muon).
        coefficients: a custom odd polynomial ``(c1, c3, ...)`` or :class:`OddPolynomial`.
        targets: glob pattern(s) on qualified module names (``fnmatch``, ``*`` spans dots),
            e.g. ``"layers.*.feed_forward.*"``. Overrides the default selection.
        predicate: ``predicate(name, module) -> bool`` called for every ``nn.Linear``.
        include_qkv: also wrap q/k/v projections (:data:`QKV_NAMES`) in the default selection.
        power_iters: power iterations per refresh (after each optimizer step).
        eps: floor for power-iteration normalisation and for ``s``.
        learn_gamma: add a learnable scalar ``gamma`` per layer (init ``gamma_init``).
        norm_recovery: ``W_eff = gamma * stopgrad(s) * f(W/s)`` (True, published) or
            ``gamma * f(W/s)`` (False); see the module docstring.
        init_iters: power iterations run once now, from the random start, so the first
            forward already uses a converged ``s``.

    Default selection: every ``nn.Linear`` whose last name component is in
    :data:`DEFAULT_PC_TARGETS` (FFN matrices and attention output projections).

    The current weight becomes the raw ``W`` (``module.parametrizations.weight.original``,
    the same Parameter object); ``module.weight`` becomes ``W_eff``, so the model's
    function changes unless ``f`` is the identity: apply PC at initialisation.

    Returns:
        A :class:`PCHandle`; call ``handle.attach(optimizer)`` before training.

    Raises:
        ValueError: bad options, nothing selected, a weight already parametrized (apply
            twice), shared (tied) weights, non-finite weights.
        TypeError: a target pattern that only matches non-Linear modules.
    """
    polynomial = resolve_polynomial(level, coefficients)
    if targets is not None and predicate is not None:
        raise ValueError("give either targets or predicate, not both")
    if include_qkv and (targets is not None or predicate is not None):
        raise ValueError("include_qkv only extends the default selection; with targets or "
                         "predicate, select q/k/v explicitly")
    if isinstance(init_iters, bool) or not isinstance(init_iters, int) or init_iters < 0:
        raise ValueError(f"init_iters must be an int >= 0, got {init_iters!r}")
    selected = _select_targets(model, targets, predicate, include_qkv)
    if not selected:
        raise ValueError(
            "apply_pc selected no module: no nn.Linear matches "
            + (f"targets={targets!r}" if targets is not None else
               "the predicate" if predicate is not None else
               f"the default names {DEFAULT_PC_TARGETS}")
        )
    # Validate everything before touching the model, so a failure leaves it unchanged.
    share_count: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        share_count[id(p)] = share_count.get(id(p), 0) + 1
    for name, module in selected.items():
        if parametrize.is_parametrized(module, "weight"):
            what = "PC" if is_pc_module(module) else "another parametrization"
            raise ValueError(f"apply_pc: '{name}.weight' already has {what} "
                             "(apply_pc called twice? merge_pc first)")
        weight = module.weight
        if share_count.get(id(weight), 0) > 1:
            raise ValueError(f"apply_pc: '{name}.weight' {tuple(weight.shape)} is shared with "
                             "another module (tied weights); exclude it from the targets")
        if not weight.is_meta and not torch.isfinite(weight).all():
            raise ValueError(f"apply_pc: '{name}.weight' {tuple(weight.shape)} has "
                             "non-finite values")
    for module in selected.values():
        pc = PCParametrization(
            module.weight, polynomial=polynomial, power_iters=power_iters, eps=eps,
            learn_gamma=learn_gamma, gamma_init=gamma_init, norm_recovery=norm_recovery,
        )
        # Converge u, v before registering: registration evaluates forward once, and the
        # first training forward must already see a good s. (Meta weights have no values:
        # call handle.reset() once they are materialised.)
        if not module.weight.is_meta:
            pc.refresh_(module.weight, init_iters)
        parametrize.register_parametrization(module, "weight", pc)
    return PCHandle(dict(selected))


def merge_pc(model: nn.Module) -> nn.Module:
    """Bake ``W_eff`` into plain weights of every PC module of ``model`` (in place).

    Afterwards each module is its original class (e.g. plain ``nn.Linear``) with
    ``weight`` = the former ``W_eff``, stored in the same Parameter object that held the
    raw ``W``; no ``gamma``, ``u``, ``v`` remain, and ``model.state_dict()`` has exactly the
    keys of a model that never had PC. Outputs are unchanged.

    Returns:
        ``model``.

    Raises:
        ValueError: the model has no PC module, or some ``W_eff`` is non-finite (checked
            for all modules before any is modified).
    """
    pcs = [(name, m) for name, m in model.named_modules() if is_pc_module(m)]
    if not pcs:
        raise ValueError("merge_pc: the model has no PC-parametrized module (nothing to merge)")
    with torch.no_grad():
        for name, module in pcs:
            w_eff = module.weight
            if not torch.isfinite(w_eff).all():
                raise ValueError(f"merge_pc: effective weight of '{name}' "
                                 f"{tuple(w_eff.shape)} is not finite; nothing was merged")
        for _, module in pcs:
            _give_private_class(module)
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


def _give_private_class(module: nn.Module) -> None:
    # torch's remove_parametrizations deletes the ``weight`` property from the module's
    # generated class; copy.deepcopy shares that class between the copy and the original,
    # so merging a deep copy would break the original. A private copy of the class confines
    # the deletion to this module.
    cls = module.__class__
    namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)
