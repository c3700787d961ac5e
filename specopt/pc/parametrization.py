"""The PC layer: polynomial weight preconditioning as a ``torch.nn.utils.parametrize`` hook.

For a matrix layer with raw (trained) weight ``W``, read as ``(out, in)``::

    s     = u^T W v                      power-iteration estimate of sigma_max(W)
    W_eff = gamma * stopgrad(s) * f(W / s)          (norm recovery on, the default)
    W_eff = gamma * f(W / s)                        (norm recovery off)

``f`` is an odd polynomial (:mod:`specopt.pc.polynomials`) acting on the singular values of
``W / s``, which lie in ``[0, ~1]``. The gradient flows through the ``s`` that divides ``W``;
the ``s`` that multiplies back is detached (arXiv 2606.06470 and the authors' code).

Layers: ``nn.Linear`` (weight stored ``(out, in)``) and transformers' ``Conv1D`` (GPT-2;
stored ``(in, out)``, recognised by :mod:`specopt.layers`). ``u`` is always the ``(out,)``
vector and ``v`` the ``(in,)`` one. For a transposed layer ``W_eff`` is computed on the
stored tensor with the roles of ``u`` and ``v`` swapped: ``f`` is transpose-equivariant
(``f(X^T) = f(X)^T`` for an odd polynomial) and ``s`` is the same number, so the operator
is exactly the one the ``(out, in)`` formula gives, and ``W_eff`` keeps the stored layout.

Norm recovery (our name for the ``stopgrad(s)`` factor): with it, ``f(1) = 1`` maps the
top singular value of ``W`` to ``gamma * s``, but the levels peak inside (0, 1) (max of f:
1.010, 1.019, 1.021 for levels 2-4), so sigma_max(W_eff) can reach ~1.02 gamma * s. The
PC layer reshapes the
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

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from specopt.distributed import full_tensor
from specopt.hooks import AttachHandle
from specopt.layers import (
    Pattern,
    check_patterns,
    is_head_path,
    matches,
    matrix_spec,
    no_match_error,
)
from specopt.pc.polynomials import OddPolynomial, odd_matrix_polynomial, resolve_polynomial
from specopt.spectral.power_iteration import (
    DEFAULT_EPS,
    init_singular_vectors,
    power_iteration_,
    sigma_max_estimate,
)

__all__ = [
    "DEFAULT_PC_TARGETS",
    "PC_KINDS",
    "PC_TARGET_TABLE",
    "QKV_NAMES",
    "QKV_TARGETS",
    "PCHandle",
    "PCParametrization",
    "apply_pc",
    "get_pc",
    "is_pc_module",
    "merge_pc",
    "merged_state_dict",
    "pc_weight",
]

#: Default PC targets per model family: suffixes of module paths, matched component by
#: component (``"mlp.c_fc"`` matches ``transformer.h.0.mlp.c_fc``; ``"fc1"`` any module
#: named ``fc1``). FFN matrices and the attention output projection, as in the paper;
#: never q/k/v or a fused qkv (:data:`QKV_TARGETS`). Only matrix modules (``nn.Linear``,
#: transformers' ``Conv1D``) are wrapped; a non-matrix layer with such a name (e.g. a conv)
#: is skipped with a warning, a container module (DistilBERT's ``ffn``) silently. Modules
#: inside an output head (:func:`specopt.layers.is_head_path`: RoBERTa's
#: ``classifier.out_proj``, BART's ``classification_head.out_proj``) and weights that
#: already carry another parametrization (``weight_norm``, ``spectral_norm``: skipped with
#: a warning) are never wrapped by default.
PC_TARGET_TABLE: dict[str, tuple[str, ...]] = {
    "Llama / Mistral / Qwen / Gemma (HF)": ("gate_proj", "up_proj", "down_proj", "o_proj"),
    "Phi-3 (fused gate/up)": ("mlp.gate_up_proj",),
    "specopt Llama / Meta Llama": ("w1", "w2", "w3", "attention.wo"),
    "GPT-2 (Conv1D) / nanoGPT (Linear)": ("mlp.c_fc", "mlp.c_proj", "attn.c_proj"),
    "GPT-NeoX / Pythia, Falcon, ALBERT attention": ("dense_h_to_4h", "dense_4h_to_h",
                                                    "attention.dense",
                                                    "self_attention.dense"),
    "BERT / RoBERTa / DeBERTa, ViT (HF < 5)": ("intermediate.dense", "output.dense"),
    "DistilBERT": ("ffn.lin1", "ffn.lin2", "attention.out_lin"),
    "ALBERT FFN": ("ffn", "ffn_output"),
    "T5": ("wi", "wi_0", "wi_1", "DenseReluDense.wo", "SelfAttention.o", "EncDecAttention.o"),
    "Phi, OPT, BART, Whisper, CLIP, ViT / DeiT / Swin, timm ViT": (
        "fc1", "fc2", "self_attn.dense", "out_proj", "attn.proj"),
    "GPT-J / CodeGen": ("mlp.fc_in", "mlp.fc_out"),
    "ConvNeXt (HF)": ("pwconv1", "pwconv2"),
    "torch nn.TransformerEncoderLayer / DecoderLayer": ("linear1", "linear2"),
}

#: Every default target suffix, in table order (what ``apply_pc`` wraps by default).
DEFAULT_PC_TARGETS: tuple[str, ...] = tuple(
    dict.fromkeys(s for suffixes in PC_TARGET_TABLE.values() for s in suffixes)
)

#: Query/key/value projections (separate or fused): never wrapped by default (the paper
#: leaves them plain); added to the defaults with ``include_qkv=True``.
QKV_TARGETS: tuple[str, ...] = (
    "wq", "wk", "wv", "q_proj", "k_proj", "v_proj", "c_attn", "qkv", "qkv_proj",
    "query", "key", "value", "query_key_value", "SelfAttention.q", "SelfAttention.k",
    "SelfAttention.v", "EncDecAttention.q", "EncDecAttention.k", "EncDecAttention.v",
    "q_lin", "k_lin", "v_lin",  # DistilBERT
    "query_proj", "key_proj", "value_proj",  # DeBERTa
    "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",  # DeepSeek MLA
)
#: Former name of :data:`QKV_TARGETS`.
QKV_NAMES = QKV_TARGETS

#: Module kinds (:func:`specopt.layers.matrix_spec`) the PC layer wraps.
PC_KINDS: tuple[str, ...] = ("linear", "transposed")

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
        gamma: 0-D ``nn.Parameter`` (init ``gamma_init``; ``requires_grad`` as the weight's,
            so a frozen layer stays frozen) or ``None`` when disabled.

    ``(out, in)`` is the operator's orientation: with ``transposed=True`` the weight is
    stored ``(in, out)`` (transformers' ``Conv1D``) and ``u`` still has ``out`` entries.

    Attributes:
        polynomial: the :class:`OddPolynomial` ``f``.
        transposed: the weight is stored ``(in, out)``.
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
        transposed: bool = False,
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
        self.transposed = bool(transposed)
        u, v = init_singular_vectors(
            self._operator(weight).shape, device=weight.device, dtype=_vector_dtype(weight.dtype)
        )
        self.register_buffer("u", u)
        self.register_buffer("v", v)
        # A frozen weight (requires_grad=False) gets a frozen gamma: the layer stays frozen.
        self.gamma: nn.Parameter | None = (
            nn.Parameter(torch.tensor(float(gamma_init), dtype=weight.dtype, device=weight.device),
                         requires_grad=weight.requires_grad)
            if learn_gamma
            else None
        )
        # Set only inside PCHandle.accumulate(): a detached leaf standing in for W_eff.
        self._accumulation_leaf: Tensor | None = None

    def _operator(self, weight: Tensor) -> Tensor:
        """The stored weight as the ``(out, in)`` operator (a view)."""
        return weight.mT if getattr(self, "transposed", False) else weight

    def forward(self, weight: Tensor) -> Tensor:
        """``W_eff`` from the raw weight; reads (clones) ``u``, ``v``, never advances them."""
        if self._accumulation_leaf is not None:
            return self._accumulation_leaf
        dtype = _vector_dtype(weight.dtype)
        # Clone: refresh_ updates the buffers in place, which would invalidate a saved graph.
        u = self.u.to(dtype=dtype, copy=True)
        v = self.v.to(dtype=dtype, copy=True)
        if getattr(self, "transposed", False):
            # Stored (in, out): rows pair with v. f(W^T) = f(W)^T, so this is the operator's
            # W_eff in the stored layout (contiguous, no transposes).
            u, v = v, u
        return pc_weight(
            weight, u, v, self.gamma, self.polynomial.coefficients,
            eps=self.eps, norm_recovery=self.norm_recovery,
        )

    def sigma(self, weight: Tensor) -> Tensor:
        """Current estimate ``s = u^T W v`` (0-D, no grad); ``weight`` as stored."""
        with torch.no_grad():
            return sigma_max_estimate(self._operator(weight), self.u, self.v)

    @torch.no_grad()
    def refresh_(self, weight: Tensor, iters: int | None = None) -> None:
        """Warm-started power iteration on ``weight`` (the raw W), updating ``u``, ``v`` in place.

        Runs ``iters`` (default ``power_iters``) iterations of the shared estimator. If the
        vectors have the wrong shape they are re-initialised first. If ``weight`` holds
        NaN/Inf the previous vectors are kept (no NaN enters the buffers); checked without
        a host sync.
        """
        weight = self._operator(full_tensor(weight))  # FSDP2 (DTensor rows): gather; collective
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
        (``to_empty`` leaves buffers uninitialised) or replaced wholesale. ``weight`` as stored."""
        u, v = init_singular_vectors(self._operator(weight).shape, device=weight.device,
                                     dtype=self.u.dtype)
        self.u.copy_(u)
        self.v.copy_(v)
        if self.gamma is not None:
            self.gamma.fill_(self.gamma_init)
        self.refresh_(weight, iters)

    def _check_shapes(self, weight: Tensor) -> None:
        """``weight``: the ``(out, in)`` operator (see :meth:`_operator`)."""
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
            f"{'transposed, ' if getattr(self, 'transposed', False) else ''}"
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

    @classmethod
    def from_model(cls, model: nn.Module) -> PCHandle:
        """A handle over every PC module already in ``model`` (e.g. a model loaded from a
        checkpoint saved with PC, or one a trainer integration received). May be empty."""
        return cls({name: m for name, m in model.named_modules() if is_pc_module(m)})

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
        # Grouped by the (out, in) operator's shape: a Conv1D (in, out) and a Linear
        # (out, in) of the same operator shape share one batched call.
        groups: dict[tuple, list[tuple[PCParametrization, Tensor]]] = {}
        for name, module in self.modules.items():
            pc = self._pc(name, module)
            # FSDP2 shards W by rows (DTensor): every rank gathers the full W and runs the
            # same iteration, so u, v stay identical across ranks (collective).
            stored = full_tensor(module.parametrizations.weight.original)
            key = (tuple(pc._operator(stored).shape), stored.device, pc.u.dtype, pc.v.dtype,
                   pc.power_iters if iters is None else iters, pc.eps)
            groups.setdefault(key, []).append((pc, stored))
        for (_, _, _, _, n_iters, eps), items in groups.items():
            if len(items) == 1:
                items[0][0].refresh_(items[0][1], n_iters)
                continue
            ops = [pc._operator(stored).detach() for pc, stored in items]
            for (pc, _), op in zip(items, ops, strict=True):
                pc._check_shapes(op)
            w = torch.stack(ops)
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

    def attach(self, optimizer: torch.optim.Optimizer) -> AttachHandle:
        """Refresh ``u``, ``v`` after every ``optimizer.step()``.

        Uses ``optimizer.register_step_post_hook``, so it works with any
        ``torch.optim.Optimizer`` (``specopt.Muon``, ``build_optimizer``'s optimizer,
        ``torch.optim.AdamW``). It runs before ``scheduler.step()`` in the usual loop, so
        the forward at step t uses vectors refined on the current W. The hook is moved
        ahead of the optimizer's other post-step hooks, so a monitor attached earlier still
        reads ``W_eff`` with the refreshed ``s`` (the one the next forward uses).

        Returns:
            An :class:`~specopt.hooks.AttachHandle` (the type ``SpectralMonitor.attach``
            returns too): ``.remove()`` unregisters the hook; usable as a context manager.
        """
        register = getattr(optimizer, "register_step_post_hook", None)
        if not callable(register):
            raise TypeError(
                "attach needs a torch.optim.Optimizer (with register_step_post_hook), got "
                f"{type(optimizer).__name__}"
            )
        hook = register(lambda _opt, _args, _kwargs: self.refresh())
        # Hooks run in registration order; torch offers no prepend for step hooks, so move
        # ours to the front of the (private, OrderedDict) table when it is there.
        table = getattr(optimizer, "_optimizer_step_post_hooks", None)
        if isinstance(table, OrderedDict) and getattr(hook, "id", None) in table:
            table.move_to_end(hook.id, last=False)
        return AttachHandle(optimizer, [hook], owner="PCHandle")

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


def _suffix_matches(path: str, suffix: str) -> bool:
    """``suffix`` (dotted) equals the last components of ``path``."""
    parts, want = path.split("."), suffix.split(".")
    return len(parts) >= len(want) and parts[-len(want):] == want


def _pc_kind(module: nn.Module) -> bool:
    """True for a matrix module the PC layer wraps (:data:`PC_KINDS`)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        return False
    return matrix_spec(module, "weight", weight).kind in PC_KINDS


def _other_parametrization(module: nn.Module) -> bool:
    """``module.weight`` is parametrized, but not (only) by PC."""
    return parametrize.is_parametrized(module, "weight") and not is_pc_module(module)


def _describe(items: Sequence[tuple[str, nn.Module]], limit: int = 4) -> str:
    shown = ", ".join(f"{n} ({type(m).__name__})" for n, m in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _select_targets(
    model: nn.Module,
    include: tuple[Pattern, ...],
    exclude: tuple[Pattern, ...],
    predicate: Callable[[str, nn.Module], bool] | None,
    include_qkv: bool,
) -> dict[str, nn.Module]:
    # Modules of torch's parametrize machinery are not layers a user selects.
    named = [(name, m) for name, m in model.named_modules()
             if name and "parametrizations" not in name.split(".")]
    names = [n for n, _ in named]
    if include:
        selected: dict[str, nn.Module] = {}
        for pattern in include:
            hits = [(n, m) for n, m in named if matches([pattern], [n])]
            if not hits:
                raise no_match_error("apply_pc: include", pattern, names, "module")
            mats = [(n, m) for n, m in hits if _pc_kind(m)]
            if not mats:
                raise TypeError(
                    f"apply_pc: include pattern {pattern!r} matches only non-matrix modules "
                    f"({_describe(hits)}); PC applies to nn.Linear and transformers Conv1D "
                    "weights"
                )
            selected.update(mats)
    elif predicate is not None:
        if not callable(predicate):
            raise TypeError(f"predicate must be callable(name, module), got {predicate!r}")
        selected = {n: m for n, m in named if _pc_kind(m) and predicate(n, m)}
    else:
        suffixes = DEFAULT_PC_TARGETS + (QKV_TARGETS if include_qkv else ())
        chosen = [(n, m) for n, m in named if not is_head_path(n)
                  and any(_suffix_matches(n, s) for s in suffixes)]
        # Containers named like a target (DistilBERT's ``ffn`` holds lin1/lin2) are not
        # layers; a layer with a weight that is not a matrix module (a conv) is worth a word.
        skipped = [(n, m) for n, m in chosen
                   if not _pc_kind(m) and isinstance(getattr(m, "weight", None), Tensor)]
        if skipped:
            warnings.warn("apply_pc: skipping non-matrix modules named like PC targets: "
                          f"{_describe(skipped, 8)}", stacklevel=3)
        other = [(n, m) for n, m in chosen if _pc_kind(m) and _other_parametrization(m)]
        if other:
            warnings.warn("apply_pc: skipping modules whose weight already has another "
                          f"parametrization (weight_norm, spectral_norm, ...): "
                          f"{_describe(other, 8)}; PC does not stack on top of it",
                          stacklevel=3)
        selected = {n: m for n, m in chosen if _pc_kind(m) and not _other_parametrization(m)}
    for pattern in exclude:
        if not matches([pattern], names):
            raise no_match_error("apply_pc: exclude", pattern, names, "module")
    return {n: m for n, m in selected.items() if not matches(exclude, [n])}


def apply_pc(
    model: nn.Module,
    *,
    level: int | None = None,
    coefficients: OddPolynomial | Sequence[float] | None = None,
    include: Pattern | Sequence[Pattern] | None = None,
    exclude: Pattern | Sequence[Pattern] | None = None,
    predicate: Callable[[str, nn.Module], bool] | None = None,
    include_qkv: bool = False,
    power_iters: int = 10,
    eps: float = DEFAULT_EPS,
    learn_gamma: bool = True,
    gamma_init: float = 1.0,
    norm_recovery: bool = True,
    init_iters: int = DEFAULT_INIT_ITERS,
    targets: Pattern | Sequence[Pattern] | None = None,
) -> PCHandle:
    """Wrap matrix layers of ``model`` (in place) with the PC parametrization.

    Args:
        model: any ``nn.Module``.
        level: published polynomial 1-4 (default 4 when ``coefficients`` is not given;
            the paper uses 4 with AdamW and 2 with Muon).
        coefficients: a custom odd polynomial ``(c1, c3, ...)`` or :class:`OddPolynomial`.
        include: module-path pattern(s) (:mod:`specopt.layers` vocabulary: glob, ``*``
            spans dots, or a compiled regex), e.g. ``"layers.*.feed_forward.*"``; replaces
            the default selection. Each pattern must match a module, and among its matches
            at least one matrix module.
        exclude: module-path pattern(s) removed from the selection (default or
            ``include``); each must match some module.
        predicate: ``predicate(name, module) -> bool`` called for every matrix module
            (instead of ``include``).
        include_qkv: also wrap q/k/v projections (:data:`QKV_TARGETS`) in the default
            selection.
        power_iters: power iterations per refresh (after each optimizer step).
        eps: floor for power-iteration normalisation and for ``s``.
        learn_gamma: add a learnable scalar ``gamma`` per layer (init ``gamma_init``); it
            is frozen when the layer's weight is (``requires_grad=False``).
        norm_recovery: ``W_eff = gamma * stopgrad(s) * f(W/s)`` (True, published) or
            ``gamma * f(W/s)`` (False); see the module docstring.
        init_iters: power iterations run once now, from the random start, so the first
            forward already uses a converged ``s``.
        targets: deprecated alias of ``include`` (``DeprecationWarning``).

    Matrix modules: ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2, weight stored
    ``(in, out)``). Default selection: every matrix module whose path ends with a suffix
    of :data:`PC_TARGET_TABLE` (FFN matrices and attention output projections of Llama,
    GPT-2, GPT-NeoX, BERT, T5, Phi/OPT, ViT, nanoGPT, specopt's Llama and more), except
    modules inside an output head and weights with another parametrization (skipped with
    a warning).

    The current weight becomes the raw ``W`` (``module.parametrizations.weight.original``,
    the same Parameter object); ``module.weight`` becomes ``W_eff``, so the model's
    function changes unless ``f`` is the identity: apply PC at initialisation.

    Returns:
        A :class:`PCHandle`; call ``handle.attach(optimizer)`` before training.

    Raises:
        ValueError: bad options, a pattern that matches no module, nothing selected, a
            weight already parametrized (apply twice), shared (tied) weights, non-finite
            weights.
        TypeError: an ``include`` pattern that only matches non-matrix modules; both
            ``include`` and its alias ``targets``.
    """
    if targets is not None:
        if include is not None:
            raise TypeError("apply_pc: give include (targets is its deprecated alias), "
                            "not both")
        warnings.warn("apply_pc(targets=...) is deprecated; use include=... (same patterns)",
                      DeprecationWarning, stacklevel=2)
        include = targets
    polynomial = resolve_polynomial(level, coefficients)
    inc = check_patterns("include", include)
    exc = check_patterns("exclude", exclude)
    if include is not None and not inc:
        raise ValueError(f"include must hold at least one pattern, got {include!r}")
    if inc and predicate is not None:
        raise ValueError("give either include or predicate, not both")
    if include_qkv and (inc or predicate is not None):
        raise ValueError("include_qkv only extends the default selection; with include or "
                         "predicate, select q/k/v explicitly")
    if isinstance(init_iters, bool) or not isinstance(init_iters, int) or init_iters < 0:
        raise ValueError(f"init_iters must be an int >= 0, got {init_iters!r}")
    selected = _select_targets(model, inc, exc, predicate, include_qkv)
    if not selected:
        how = (f"include={include!r}" if inc else "the predicate" if predicate is not None
               else "the default targets (PC_TARGET_TABLE)")
        mats = [n for n, m in model.named_modules()
                if n and "parametrizations" not in n.split(".") and _pc_kind(m)]
        listed = ", ".join(repr(n) for n in mats[:5]) + (
            f" (of {len(mats)})" if len(mats) > 5 else "") if mats else "none"
        raise ValueError(
            f"apply_pc selected no module: no nn.Linear / Conv1D matches {how}"
            + (f" once exclude={exclude!r} is applied" if exc else "")
            + f"; pass include=[...] with module paths (matrix modules: {listed})"
        )
    # Validate everything before touching the model, so a failure leaves it unchanged.
    # Owners per tensor: tied weights have two modules; one module registered under two
    # paths (a weight-shared block repeated in a ModuleList) is one owner, and fine to wrap.
    owners: dict[int, set[int]] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(m))
    for name, module in selected.items():
        if parametrize.is_parametrized(module, "weight"):
            if is_pc_module(module):
                raise ValueError(f"apply_pc: '{name}.weight' already has PC "
                                 "(apply_pc called twice? merge_pc first)")
            kinds = ", ".join(type(p).__name__ for p in module.parametrizations["weight"])
            raise ValueError(
                f"apply_pc: '{name}.weight' already has another parametrization ({kinds}, "
                "e.g. weight_norm / spectral_norm); PC does not stack on top of it: exclude "
                "the module or remove it first (torch.nn.utils.parametrize."
                "remove_parametrizations)")
        weight = module.weight
        if not weight.is_floating_point():
            raise TypeError(f"apply_pc: '{name}.weight' {tuple(weight.shape)} has dtype "
                            f"{weight.dtype}; PC needs a floating-point weight (a quantized "
                            "layer? exclude it)")
        if len(owners.get(id(weight), ())) > 1:
            raise ValueError(f"apply_pc: '{name}.weight' {tuple(weight.shape)} is shared with "
                             "another module (tied weights); exclude it from the targets")
        if not weight.is_meta and not torch.isfinite(weight).all():
            raise ValueError(f"apply_pc: '{name}.weight' {tuple(weight.shape)} has "
                             "non-finite values")
    for module in selected.values():
        spec = matrix_spec(module, "weight", module.weight)
        pc = PCParametrization(
            module.weight, polynomial=polynomial, power_iters=power_iters, eps=eps,
            learn_gamma=learn_gamma, gamma_init=gamma_init, norm_recovery=norm_recovery,
            transposed=spec.transposed,
        )
        # Converge u, v before registering: registration evaluates forward once, and the
        # first training forward must already see a good s. (Meta weights have no values:
        # call handle.reset() once they are materialised.)
        if not module.weight.is_meta:
            pc.refresh_(module.weight, init_iters)
        parametrize.register_parametrization(module, "weight", pc)
    return PCHandle(dict(selected))


def _effective_weights(pcs: Sequence[tuple[str, nn.Module]], caller: str) -> dict[int, Tensor]:
    """``{id(module): W_eff}`` (detached), every one checked finite before any is used."""
    out: dict[int, Tensor] = {}
    with torch.no_grad():
        for name, module in pcs:
            w_eff = module.weight.detach()
            if not torch.isfinite(w_eff).all():
                raise ValueError(f"{caller}: effective weight of '{name}' "
                                 f"{tuple(w_eff.shape)} is not finite; nothing was merged")
            out[id(module)] = w_eff
    return out


def merge_pc(model: nn.Module) -> nn.Module:
    """Bake ``W_eff`` into plain weights of every PC module of ``model`` (in place).

    Afterwards each module is its original class (e.g. plain ``nn.Linear``) with
    ``weight`` = the former ``W_eff``, stored in the same Parameter object that held the
    raw ``W``; no ``gamma``, ``u``, ``v`` remain, and ``model.state_dict()`` has exactly the
    keys of a model that never had PC. Outputs are unchanged. To write such a checkpoint
    while training goes on, without changing the model: :func:`merged_state_dict`.

    Returns:
        ``model``.

    Raises:
        ValueError: the model has no PC module, or some ``W_eff`` is non-finite (checked
            for all modules before any is modified).
    """
    pcs = [(name, m) for name, m in model.named_modules() if is_pc_module(m)]
    if not pcs:
        raise ValueError("merge_pc: the model has no PC-parametrized module (nothing to merge)")
    _effective_weights(pcs, "merge_pc")
    with torch.no_grad():
        for _, module in pcs:
            _give_private_class(module)
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


_PC_KEY = "parametrizations.weight."


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` as it would be after :func:`merge_pc`, leaving ``model`` as is.

    Each PC module's ``<path>.parametrizations.weight.{original, 0.u, 0.v, 0.gamma}``
    become one ``<path>.weight`` = ``W_eff`` (detached, in the key's place), so the result
    loads into a model that never had PC. For checkpoints in the middle of training, e.g.
    ``model.save_pretrained(d, state_dict=merged_state_dict(model))``: a plain
    ``model.save_pretrained(d)`` of a PC model writes the raw ``W`` under PC keys, which
    ``from_pretrained`` into a plain model reports as UNEXPECTED / MISSING and replaces by
    random weights. A model without PC modules gives its ``state_dict()`` unchanged.

    Raises:
        ValueError: some ``W_eff`` is non-finite.
    """
    state = model.state_dict()
    pcs = [(name, m) for name, m in model.named_modules() if is_pc_module(m)]
    if not pcs:
        return state
    effective = _effective_weights(pcs, "merged_state_dict")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        at = key.find(_PC_KEY)
        prefix = key[:at]
        if at < 0 or (prefix and not prefix.endswith(".")):
            out[key] = value
            continue
        module = model.get_submodule(prefix[:-1]) if prefix else model
        if id(module) not in effective:  # another parametrization: keep its keys
            out[key] = value
        elif key == prefix + _PC_KEY + "original":
            out[prefix + "weight"] = effective[id(module)]
    return out


def _give_private_class(module: nn.Module) -> None:
    # torch's remove_parametrizations deletes the ``weight`` property from the module's
    # generated class; copy.deepcopy shares that class between the copy and the original,
    # so merging a deep copy would break the original. A private copy of the class confines
    # the deletion to this module.
    cls = module.__class__
    namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)
