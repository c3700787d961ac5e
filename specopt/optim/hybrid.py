"""One optimizer for a whole model: Muon for hidden matrices, torch's AdamW for the rest.

``build_optimizer(model, "muon")`` returns a single :class:`HybridOptimizer` (a
``torch.optim.Optimizer``) whose ``param_groups`` hold Muon groups and AdamW groups side
by side; ``build_optimizer(model, "adamw")`` returns a plain ``torch.optim.AdamW`` with
decay / no-decay groups. Both carry ``optimizer.routing``, a :class:`RoutingReport`
saying which parameter went where and why.

Routing rule (first match wins, per unique tensor; tied tensors appear once). What a
matrix is, its orientation and its block come from :mod:`specopt.layers`:

1. ``requires_grad=False`` -> not optimized ("frozen").
2. User patterns (the :mod:`specopt.layers` vocabulary: globs, ``*`` also matches dots,
   or compiled regexes) in ``include`` (-> Muon) / ``exclude`` (-> AdamW), tested against
   every name of the tensor (all tied aliases), its layer name
   (``w1.parametrizations.weight.original`` is also known as ``w1.weight``) and, for
   matrices, its module's path (``"*.mlp.*"`` selects the same layers as in ``apply_pc``;
   a module path names the layer's weight, not its bias).
3. 0-D / 1-D tensors (biases, norm gains, PC ``gamma``) -> AdamW.
4. Complex tensors -> AdamW (Muon orthogonalizes real matrices only).
5. Names the model lists in its own ``no_weight_decay()`` (timm's convention: position
   embeddings, class/distillation tokens; called on every submodule that has it, names
   prefixed with its path; entries may be globs) -> AdamW, no weight decay.
6. ``nn.Embedding`` / ``nn.EmbeddingBag`` weights -> AdamW.
7. The output head -> AdamW: a tensor sharing storage with an embedding (tied head), a
   module named like a head (:data:`DEFAULT_HEAD_NAMES` -- ``lm_head``, ``head``,
   ``classifier``, ``score``, ``cls``, ... -- as the first or last component of its path),
   a module named ``fc`` that is the model's last module with parameters (torchvision /
   timm ResNet), or, when none of these finds a head, the single ``nn.Linear`` / Conv1D
   whose fan-out equals a token embedding's ``num_embeddings`` (position / type tables
   do not count), preferring the one outside repeated blocks (``layers.N.*``) when
   several match; a warning only when several such projections sit outside them.
8. Bare parameters named like position biases (:data:`POSITION_BIAS_NAMES`: Swin's
   ``relative_position_bias_table``, any ``*_bias_table``, SAM/ViTDet's ``rel_pos_h``,
   Swin's ``absolute_pos_embed``; what timm's ``no_weight_decay()`` lists) -> AdamW,
   no weight decay. Other bare parameters (not the weight of a Linear / Conv1D / conv /
   embedding module) named like tokens or embeddings (a ``_``-separated word of :data:`TOKEN_WORDS`:
   ``cls_token``, ``reg_token``, ``pos_embed``, ``position_embeddings``, ``latents``, ...)
   -> AdamW.
9. 2-D+ weights of modules with "embed" in their path (e.g. ``patch_embed.proj``) -> AdamW.
10. A matrix with a size-1 side (e.g. a ``(1, D)`` token, a ``Linear(D, 1)``
    regression head) -> AdamW: a vector in matrix form, whose orthogonalized update
    would be its sign pattern.
11. Every other matrix -> Muon, with the group options that say how to read it:
    ``nn.Linear`` and bare 2-D tensors as they are; transformers' ``Conv1D`` (stored
    ``(in, out)``) with ``transposed=True``; ``nn.Conv1d/2d/3d`` kernels with
    ``matrix_layout="flatten"`` (``(out, in * k)``); other tensors with ndim >= 3 (MoE
    expert stacks ``(E, out, in)``) with ``matrix_layout="batch"`` (each matrix on its
    own). The raw PC weight ``<module>.parametrizations.weight.original`` is read as its
    layer's weight.

Fused projections (``split_sizes``): ``build_optimizer(..., split_sizes={pattern: sizes})``
orthogonalizes the matched Muon matrices in row blocks of ``sizes`` *output* rows, whatever
the storage orientation: GPT-2's fused ``c_attn`` (stored ``(d, 3d)``) takes
``split_sizes={"*.attn.c_attn": (d, d, d)}``. The sizes must sum to the fan-out.

Non-finite gradients: before any weight moves, every gradient is checked (one fused
2-norm per device, one host sync per step; :mod:`specopt.optim.nonfinite`).
``nonfinite="raise"`` (default) raises
:class:`NonFiniteGradientError` naming each bad parameter and its shape, with no weight
changed; ``nonfinite="skip"`` hides that parameter's gradient for the step (no update, no
moment/momentum update, no weight decay), counts it in the group's ``"nonfinite_skips"``
list (saved in ``state_dict``) and warns.

fp16 parameters: torch's AdamW keeps its moments in the parameter's dtype, and in fp16
the default ``eps=1e-8`` rounds to 0, so a parameter whose gradient is zero (an
embedding row not in the batch) gets ``0 / 0 = NaN``. AdamW groups with fp16 tensors
are refused (``ValueError`` naming them) unless their ``eps`` is at least
:data:`FP16_MIN_ADAMW_EPS` (fp16's smallest normal number; ``adamw_eps=1e-4`` is the
usual fp16 choice). Better: fp32 master weights with ``torch.autocast``, or bf16
weights. Muon's side is fp16-safe (its Newton-Schulz normalizes in fp16 first).

Example::

    opt = specopt.build_optimizer(model, "muon", lr=3e-3)
    print(opt.routing)  # table: parameter, shape, optimizer, decay, reason
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10_000)
    loss.backward(); opt.step(); sched.step(); opt.zero_grad()
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.optim import Optimizer

from specopt.distributed import is_dtensor
from specopt.layers import (
    HEAD_NAMES,
    MatrixSpec,
    Pattern,
    check_patterns,
    is_embedding_path,
    is_head_path,
    matches,
    matrix_spec,
    no_match_error,
    path_components,
)
from specopt.optim.muon import Muon
from specopt.optim.nonfinite import (
    NONFINITE_POLICIES,
    NonFiniteGradientError,
    restore_grads,
    screen_nonfinite,
    screened,
    skips_by_name,
)

__all__ = [
    "DEFAULT_ADAMW_BETAS",
    "DEFAULT_HEAD_NAMES",
    "FP16_MIN_ADAMW_EPS",
    "POSITION_BIAS_NAMES",
    "TOKEN_WORDS",
    "HybridOptimizer",
    "NonFiniteGradientError",
    "ParamRoute",
    "RoutingReport",
    "build_optimizer",
    "describe_routing",
]

#: Module names recognised as the output head (first or last component of the path);
#: the one list of :mod:`specopt.layers` (``fc`` counts only as the last module).
DEFAULT_HEAD_NAMES: tuple[str, ...] = HEAD_NAMES

#: Words (``_``-separated, lower-cased) that mark a bare parameter as a token or an
#: embedding (routing rule 8): ``cls_token``, ``pos_embed``, ``register_tokens``, ...
TOKEN_WORDS: frozenset[str] = frozenset({
    "token", "tokens", "cls", "reg", "register", "registers", "embed", "embeds",
    "embedding", "embeddings", "pos", "position", "positions", "positional", "latent",
    "latents", "prompt", "prompts",
})

#: Globs (matched against a bare parameter's attribute name) of position-bias tables and
#: absolute position embeddings: AdamW without weight decay, as timm's
#: ``no_weight_decay()`` lists them (Swin, SAM / ViTDet, MViT); HF's ports drop that list.
POSITION_BIAS_NAMES: tuple[str, ...] = (
    "*_bias_table", "relative_position_*", "rel_pos_*", "absolute_pos_embed",
)

#: Muon group options routing sets (the Muon side reads them; see specopt.Muon).
_MUON_OPTION_KEYS = ("matrix_layout", "transposed", "split_sizes")
#: Module kinds whose ``weight`` is a layer's own matrix (not a bare parameter).
_MODULE_KINDS = ("linear", "transposed", "conv", "embedding")

#: AdamW betas for LLM training (GPT-3 / Llama-2 / the PC-layer paper); torch's default
#: beta2=0.999 reacts too slowly to loss spikes at LLM batch sizes.
DEFAULT_ADAMW_BETAS: tuple[float, float] = (0.9, 0.95)

#: Smallest AdamW ``eps`` accepted for fp16 tensors: fp16's smallest normal number
#: (about 6.1e-5). A smaller eps rounds to a subnormal or to 0 (1e-8 does), and
#: ``exp_avg / (sqrt(exp_avg_sq) + eps)`` becomes 0/0 = NaN for a zero gradient.
FP16_MIN_ADAMW_EPS: float = torch.finfo(torch.float16).tiny

_OPTIMIZERS = ("muon", "adamw")
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.RMSNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,
)


# --------------------------------------------------------------------------- routing


@dataclass(frozen=True)
class ParamRoute:
    """Where one unique trainable tensor goes, and why.

    ``name`` is its first name in ``model.named_parameters()``; ``aliases`` are its other
    names (tied weights, shared modules); ``layer_name`` is the name with a
    parametrization path collapsed (``w1.parametrizations.weight.original`` ->
    ``w1.weight``). ``optimizer`` is ``"muon"``, ``"adamw"`` or ``"frozen"``.

    Muon options (set only on Muon routes, ``None`` / ``False`` otherwise; they become
    keys of the tensor's Muon param group): ``matrix_layout`` (``"flatten"`` for conv
    kernels, ``"batch"`` for other ndim >= 3 tensors), ``transposed`` (stored
    ``(in, out)``, transformers' Conv1D), ``split_sizes`` (row blocks in output rows).
    """

    name: str
    aliases: tuple[str, ...]
    layer_name: str
    shape: tuple[int, ...]
    optimizer: str
    weight_decay: bool
    reason: str
    param: Tensor = field(repr=False, compare=False)
    matrix_layout: str | None = None
    transposed: bool = False
    split_sizes: tuple[int, ...] | None = None

    @property
    def muon_options(self) -> dict[str, Any]:
        """The non-default Muon group options of this route (``{}`` for plain matrices)."""
        out: dict[str, Any] = {}
        if self.matrix_layout is not None:
            out["matrix_layout"] = self.matrix_layout
        if self.transposed:
            out["transposed"] = True
        if self.split_sizes is not None:
            out["split_sizes"] = self.split_sizes
        return out

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (no tensors): JSON-serialisable."""
        return {
            "name": self.name,
            "aliases": list(self.aliases),
            "layer_name": self.layer_name,
            "shape": list(self.shape),
            "numel": self.numel,
            "optimizer": self.optimizer,
            "weight_decay": self.weight_decay,
            "reason": self.reason,
            "matrix_layout": self.matrix_layout,
            "transposed": self.transposed,
            "split_sizes": None if self.split_sizes is None else list(self.split_sizes),
        }


@dataclass(frozen=True)
class RoutingReport:
    """The routing of every unique parameter of a model, in ``named_parameters`` order.

    ``str(report)`` is a fixed-width table; ``rich.print(report)`` renders a rich table;
    ``report.to_dicts()`` / ``report.summary()`` give the programmatic form;
    ``report["layers.0.attention.wq.weight"]`` looks a route up by any of its names.
    """

    mode: str  # "muon" or "adamw": the optimizer the report was built for
    routes: tuple[ParamRoute, ...]
    notes: tuple[str, ...] = ()

    def __iter__(self) -> Iterator[ParamRoute]:
        return iter(self.routes)

    def __len__(self) -> int:
        return len(self.routes)

    def __getitem__(self, name: str) -> ParamRoute:
        for r in self.routes:
            if name == r.name or name == r.layer_name or name in r.aliases:
                return r
        raise KeyError(f"no parameter named {name!r} in the routing report")

    def select(self, optimizer: str) -> list[ParamRoute]:
        """Routes whose ``optimizer`` is ``"muon"``, ``"adamw"`` or ``"frozen"``."""
        return [r for r in self.routes if r.optimizer == optimizer]

    def to_dicts(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.routes]

    def summary(self) -> dict[str, dict[str, int]]:
        """``{optimizer: {"tensors": n, "numel": total elements}}`` for each destination."""
        out: dict[str, dict[str, int]] = {}
        for r in sorted(self.routes, key=lambda r: ("muon", "adamw", "frozen").index(r.optimizer)):
            s = out.setdefault(r.optimizer, {"tensors": 0, "numel": 0})
            s["tensors"] += 1
            s["numel"] += r.numel
        return out

    def _rows(self) -> list[tuple[str, str, str, str, str]]:
        rows = []
        for r in self.routes:
            name = r.name + "".join(f" (= {a})" for a in r.aliases)
            shape = "x".join(map(str, r.shape)) or "scalar"
            rows.append((name, shape, r.optimizer, "yes" if r.weight_decay else "no", r.reason))
        return rows

    def _summary_line(self) -> str:
        total = sum(r.numel for r in self.routes) or 1
        parts = [
            f"{k}: {v['tensors']} tensors, {v['numel']:,} params ({100 * v['numel'] / total:.1f}%)"
            for k, v in self.summary().items()
        ]
        return " | ".join(parts)

    def __str__(self) -> str:
        header = ("parameter", "shape", "optimizer", "decay", "reason")
        rows = [header, *self._rows()]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(self._summary_line())
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __rich__(self) -> Any:
        from rich.table import Table  # rich is a dependency, imported only when rendering

        table = Table(title=f"specopt routing ({self.mode})", caption=self._summary_line())
        for col, justify in (
            ("parameter", "left"),
            ("shape", "right"),
            ("optimizer", "left"),
            ("decay", "left"),
            ("reason", "left"),
        ):
            table.add_column(col, justify=justify)
        for row in self._rows():
            table.add_row(*row)
        return table


@dataclass
class _Tensor:
    """Everything known about one unique parameter tensor while routing."""

    param: Tensor
    names: list[str]  # full names, first one canonical
    layer_names: list[str]  # parametrization paths collapsed
    layers: list[nn.Module]  # the module each name belongs to (layer, not ParametrizationList)
    layer_paths: list[str]
    roles: list[str]  # attribute name on the layer ("weight", "bias", "gamma", ...)

    @property
    def spec(self) -> MatrixSpec:
        """How the tensor reads as a matrix, from its first owner that knows (a module
        kind beats a bare alias, e.g. a tied head's Linear vs its embedding)."""
        specs = [matrix_spec(m, r, self.param)
                 for m, r in zip(self.layers, self.roles, strict=True)]
        return next((sp for sp in specs if sp.kind in _MODULE_KINDS), specs[0])

    @property
    def keys(self) -> list[str]:
        """Every name a pattern is tested against: full names, layer names and, for
        matrices, module paths (a module path names the layer's weight, not its bias)."""
        paths = [p for p in self.layer_paths if p] if self.param.ndim >= 2 else []
        return list(dict.fromkeys([*self.names, *self.layer_names, *paths]))


def _collect(model: nn.Module) -> list[_Tensor]:
    by_id: dict[int, _Tensor] = {}
    for mod_path, mod in model.named_modules(remove_duplicate=False):
        for attr, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            full = f"{mod_path}.{attr}" if mod_path else attr
            layer, layer_path, role = mod, mod_path, attr
            if isinstance(mod, parametrize.ParametrizationList) and attr.startswith("original"):
                # <layer>.parametrizations.<tensor>.original[N]: the raw tensor of <layer>.<tensor>
                parts = mod_path.split(".")
                layer_path = ".".join(parts[:-2])
                layer = model.get_submodule(layer_path)
                role = parts[-1]
            layer_name = f"{layer_path}.{role}" if layer_path else role
            t = by_id.get(id(p))
            if t is None:
                by_id[id(p)] = _Tensor(p, [full], [layer_name], [layer], [layer_path], [role])
            else:
                t.names.append(full)
                t.layer_names.append(layer_name)
                t.layers.append(layer)
                t.layer_paths.append(layer_path)
                t.roles.append(role)
    return list(by_id.values())


def _no_weight_decay_names(model: nn.Module) -> tuple[str, ...]:
    """Names (or globs) the model's modules list in ``no_weight_decay()`` (timm),
    prefixed with each module's path."""
    out: list[str] = []
    for path, mod in model.named_modules():
        fn = getattr(mod, "no_weight_decay", None)
        if not callable(fn):
            continue
        try:
            names = fn()
        except TypeError:  # a same-named method with another meaning
            continue
        if isinstance(names, str) or not isinstance(names, (set, frozenset, list, tuple)):
            continue
        out.extend(f"{path}.{n}" if path else n for n in names if isinstance(n, str) and n)
    return tuple(dict.fromkeys(out))


def _storage_key(p: Tensor) -> tuple[str, int] | None:
    # DTensor (FSDP2) and other wrapper subclasses have no storage of their own; tying
    # there is by Parameter identity, which _collect already merges.
    if p.numel() == 0 or p.device.type == "meta" or is_dtensor(p):
        return None
    try:
        return (str(p.device), p.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        return None


def _small_reason(t: _Tensor) -> str:
    if "bias" in t.roles:
        return "bias"
    if any(isinstance(m, _NORM_TYPES) or "norm" in type(m).__name__.lower() for m in t.layers):
        return "norm weight"
    return "0-D scalar" if t.param.ndim == 0 else "1-D vector"


def _last_param_module(model: nn.Module) -> str | None:
    """Path of the last module (registration order) that owns a trainable parameter."""
    last = None
    for path, mod in model.named_modules():
        if isinstance(mod, parametrize.ParametrizationList):
            continue
        own = any(p.requires_grad for p in mod.parameters(recurse=False))
        plist = getattr(mod, "parametrizations", None)
        if own or (plist is not None and any(p.requires_grad for p in plist.parameters())):
            last = path
    return last


def _is_position_bias(t: _Tensor) -> bool:
    """A bare parameter named like a position-bias table (:data:`POSITION_BIAS_NAMES`)."""
    return t.spec.kind not in _MODULE_KINDS and any(
        fnmatch.fnmatchcase(r.lower(), g) for r in t.roles for g in POSITION_BIAS_NAMES)


def _is_token_name(t: _Tensor) -> bool:
    return any(set(r.lower().split("_")) & TOKEN_WORDS for r in t.roles)


def _muon_route(t: _Tensor, spec: MatrixSpec, reason: str | None = None
                ) -> tuple[str, str, dict[str, Any]]:
    """Muon, with the group options that tell Muon how to read the tensor."""
    shape = "x".join(map(str, spec.matrix_shape))
    if spec.kind == "transposed":
        return "muon", reason or f"hidden matrix, stored (in, out): operator {shape}", {
            "transposed": True}
    if spec.layout == "flatten":
        return "muon", reason or (
            f"hidden {len(spec.shape)}-D conv kernel, flattened to (out, in*k) = {shape}"), {
            "matrix_layout": "flatten"}
    if spec.layout == "batch":
        how = "(in, out) each" if spec.transposed else "(out, in) each"
        opts: dict[str, Any] = {"matrix_layout": "batch"}
        if spec.transposed:
            opts["transposed"] = True
        return "muon", reason or (
            f"batch of {spec.count} matrices {shape} ({how}; e.g. MoE experts)"), opts
    bare = spec.kind == "matrix" and not any(
        matrix_spec(m, r, t.param).kind in _MODULE_KINDS
        for m, r in zip(t.layers, t.roles, strict=True))
    return "muon", reason or ("hidden matrix (bare parameter)" if bare else "hidden matrix"), {}


def _auto_route(
    t: _Tensor,
    emb_storage: Mapping[tuple[str, int], str],
    head_names: Sequence[str],
    last_module: str | None,
    nwd_hits: Sequence[str],
) -> tuple[str, str, dict[str, Any]]:
    """(optimizer, reason, Muon options) by module kind, name and shape (rules 3-11 of the
    module docstring), before the vocab-size head fallback."""
    p = t.param
    if p.ndim < 2:
        return "adamw", _small_reason(t), {}
    if p.is_complex():
        return "adamw", "complex (Muon orthogonalizes real matrices only)", {}
    if nwd_hits:
        return "adamw", f"listed by the model's no_weight_decay() ({nwd_hits[0]!r})", {}
    spec = t.spec
    is_emb = [isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in t.layers]
    if any(is_emb):
        others = [n for n, e in zip(t.names, is_emb, strict=True) if not e]
        tied = f" (tied: also the output head {', '.join(others)})" if others else ""
        return "adamw", "embedding" + tied, {}
    key = _storage_key(p)
    if key is not None and key in emb_storage:
        return "adamw", f"output head (shares storage with embedding {emb_storage[key]})", {}
    if any(is_head_path(path, head_names) for path in t.layer_paths):
        return "adamw", "output head (by module name)", {}
    if last_module is not None and any(
        path == last_module and path_components(path)[-1:] == ["fc"] for path in t.layer_paths
    ):
        return "adamw", "output head (the model's last module, named 'fc')", {}
    if _is_position_bias(t):
        return "adamw", f"position bias / embedding (bare parameter {t.roles[0]!r}; no decay)", {}
    if spec.kind not in _MODULE_KINDS and _is_token_name(t):
        return "adamw", f"token / position embedding (bare parameter {t.roles[0]!r})", {}
    if any(is_embedding_path(path) for path in t.layer_paths):
        return "adamw", "input embedding (by module name)", {}
    if spec.has_unit_dim:
        shape = "x".join(map(str, spec.matrix_shape))
        return "adamw", f"size-1 dimension ({shape}): a vector in matrix form", {}
    return _muon_route(t, spec)


def _split_option(
    t: _Tensor, spec: MatrixSpec, split: Mapping[Pattern, Sequence[int]], hits: list[Pattern]
) -> tuple[int, ...]:
    """The validated row-block sizes the ``split_sizes`` patterns ``hits`` give ``t``."""
    if len(hits) > 1 and len({tuple(split[h]) for h in hits}) > 1:
        raise ValueError(f"split_sizes patterns {hits} all match parameter {t.names[0]!r} "
                         "with different sizes; make them disjoint")
    sizes = tuple(split[hits[0]])
    if spec.layout != "matrix":
        raise ValueError(
            f"split_sizes {sizes} for parameter {t.names[0]!r} (shape {spec.shape}): "
            "row blocks apply to 2-D matrices only"
        )
    if sum(sizes) != spec.fan_out:
        stored = "stored (in, out), " if spec.transposed else ""
        raise ValueError(
            f"split_sizes {sizes} for parameter {t.names[0]!r} (shape {spec.shape}, "
            f"{stored}fan-out {spec.fan_out}) must sum to its {spec.fan_out} output rows"
        )
    return sizes


def _check_split_sizes(value: Any) -> dict[Pattern, tuple[int, ...]]:
    out: dict[Pattern, tuple[int, ...]] = {}
    for pat, sizes in value.items():
        check_patterns("split_sizes keys", pat)
        try:
            sizes = tuple(sizes)
        except TypeError:
            sizes = ()
        if not sizes or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes
        ):
            raise ValueError(f"split_sizes[{pat!r}] must be a sequence of positive ints, got "
                             f"{value[pat]!r}")
        out[pat] = sizes
    return out


def _resolve_aliases(include: Any, exclude: Any, muon_patterns: Any, adamw_patterns: Any
                     ) -> tuple[Any, Any, str, str]:
    """``include`` / ``exclude`` from their deprecated aliases (warning at the caller's
    caller); returns them and the argument names to use in messages."""
    out = []
    for new, new_value, old, old_value in (("include", include, "muon_patterns", muon_patterns),
                                           ("exclude", exclude, "adamw_patterns",
                                            adamw_patterns)):
        if old_value is None:
            out.append((new_value, new))
            continue
        if new_value is not None:
            raise TypeError(f"give {new} ({old} is its deprecated alias), not both")
        warnings.warn(f"{old}= is deprecated; use {new}= (same patterns)", DeprecationWarning,
                      stacklevel=3)
        out.append((old_value, old))
    (inc, inc_arg), (exc, exc_arg) = out
    return inc, exc, inc_arg, exc_arg


def describe_routing(
    model: nn.Module,
    optimizer: str = "muon",
    *,
    include: Pattern | Sequence[Pattern] | None = None,
    exclude: Pattern | Sequence[Pattern] | None = None,
    no_decay_patterns: Pattern | Sequence[Pattern] | None = None,
    split_sizes: Mapping[Pattern, Sequence[int]] | None = None,
    head_names: Sequence[str] = DEFAULT_HEAD_NAMES,
    muon_patterns: Pattern | Sequence[Pattern] | None = None,
    adamw_patterns: Pattern | Sequence[Pattern] | None = None,
) -> RoutingReport:
    """Route every unique parameter of ``model`` (rules in the module docstring).

    Pure: reads the model, changes nothing. ``build_optimizer`` calls this with the same
    arguments and builds its groups from the result, so the report is exactly what the
    optimizer does.

    Args:
        include: patterns of tensors Muon must take (each must be a real matrix).
        exclude: patterns of tensors kept off Muon (-> AdamW).
        no_decay_patterns: patterns of extra tensors with ``weight_decay=0``.
        split_sizes: ``{pattern: row-block sizes}`` for fused projections (output rows).
        head_names: module names treated as the output head.
        muon_patterns, adamw_patterns: deprecated aliases of ``include`` / ``exclude``.

    Raises ``ValueError`` for an unknown ``optimizer``, a pattern that matches no
    parameter (the message lists close names), a parameter matched by both ``include``
    and ``exclude``, a 0-D/1-D/complex parameter forced to Muon, or ``split_sizes`` that
    do not fit their parameter.
    """
    include, exclude, inc_arg, exc_arg = _resolve_aliases(include, exclude, muon_patterns,
                                                          adamw_patterns)
    return _route(model, optimizer, include=include, exclude=exclude, inc_arg=inc_arg,
                  exc_arg=exc_arg, no_decay_patterns=no_decay_patterns,
                  split_sizes=split_sizes, head_names=head_names)


def _route(
    model: nn.Module,
    optimizer: str,
    *,
    include: Any,
    exclude: Any,
    inc_arg: str,
    exc_arg: str,
    no_decay_patterns: Any,
    split_sizes: Any,
    head_names: Sequence[str],
) -> RoutingReport:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}")
    muon_pats = check_patterns(inc_arg, include)
    adamw_pats = check_patterns(exc_arg, exclude)
    nodecay_pats = check_patterns("no_decay_patterns", no_decay_patterns)
    if split_sizes is not None and not isinstance(split_sizes, Mapping):
        raise TypeError(f"split_sizes must be a mapping {{pattern: sizes}} here, got "
                        f"{type(split_sizes).__name__}")
    split = _check_split_sizes(split_sizes or {})
    if optimizer == "adamw" and (muon_pats or split):
        what = inc_arg if muon_pats else "split_sizes"
        raise ValueError(f"{what} has no meaning with optimizer='adamw'")
    if isinstance(head_names, str) or not all(isinstance(h, str) and h for h in head_names):
        raise TypeError(f"head_names must be a sequence of non-empty strings, got "
                        f"{head_names!r}")
    head_names = tuple(head_names)

    tensors = _collect(model)
    emb_storage: dict[tuple[str, int], str] = {}
    vocab: dict[int, str] = {}  # num_embeddings -> token embedding name
    for t in tensors:
        for name, m in zip(t.names, t.layers, strict=True):
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and t.param.ndim == 2:
                key = _storage_key(t.param)
                if key is not None:
                    emb_storage.setdefault(key, name)
                if not _is_position_table(name):  # nothing predicts positions / types
                    vocab.setdefault(m.num_embeddings, name)
    nwd = _no_weight_decay_names(model)
    last_module = _last_param_module(model)

    used: set[Pattern] = set()
    decisions: list[tuple[_Tensor, str, str, dict[str, Any]]] = []
    for t in tensors:
        keys = t.keys
        hit_m, hit_a = matches(muon_pats, keys), matches(adamw_pats, keys)
        used.update(hit_m, hit_a)
        shape = tuple(t.param.shape)
        if not t.param.requires_grad:
            decisions.append((t, "frozen", "requires_grad=False (not optimized)", {}))
        elif hit_m and hit_a:
            raise ValueError(
                f"parameter {t.names[0]!r} (shape {shape}) matches {inc_arg} {hit_m} "
                f"and {exc_arg} {hit_a}; make the patterns disjoint"
            )
        elif hit_m:
            if t.param.ndim < 2 or t.param.is_complex():
                raise ValueError(
                    f"{inc_arg} {hit_m} match parameter {t.names[0]!r} with shape {shape} "
                    f"and dtype {t.param.dtype}: Muon needs real tensors with ndim >= 2"
                )
            decisions.append((t, *_muon_route(t, t.spec, f"{inc_arg} {hit_m[0]!r}")))
        elif hit_a:
            decisions.append((t, "adamw", f"{exc_arg} {hit_a[0]!r}", {}))
        else:
            decisions.append((t, *_auto_route(t, emb_storage, head_names, last_module,
                                              matches(nwd, keys))))

    notes: list[str] = []
    if vocab and not adamw_pats and not any("output head" in r for _, _, r, _ in decisions):
        _vocab_head_fallback(decisions, vocab, optimizer, inc_arg, notes)

    routes = []
    split_used: set[Pattern] = set()
    for t, opt, reason, opts in decisions:
        hits_nd = matches(nodecay_pats, t.keys)
        used.update(hits_nd)
        decay = (t.param.ndim >= 2 and not hits_nd and not matches(nwd, t.keys)
                 and not _is_position_bias(t))
        if optimizer == "adamw" and opt == "muon":
            opt, reason, opts = "adamw", f"{reason} (optimizer='adamw')", {}
        sizes = None
        hits_s = matches(split, t.keys)
        if hits_s:
            split_used.update(hits_s)
            if opt != "muon":
                raise ValueError(f"split_sizes pattern {hits_s[0]!r} matches parameter "
                                 f"{t.names[0]!r}, which goes to {opt} ({reason}); "
                                 "split_sizes is a Muon option")
            sizes = _split_option(t, t.spec, split, hits_s)
        routes.append(
            ParamRoute(
                name=t.names[0],
                aliases=tuple(dict.fromkeys(t.names[1:])),
                layer_name=t.layer_names[0],
                shape=tuple(t.param.shape),
                optimizer=opt,
                weight_decay=decay and opt != "frozen",
                reason=reason,
                param=t.param,
                matrix_layout=opts.get("matrix_layout"),
                transposed=bool(opts.get("transposed", False)),
                split_sizes=sizes,
            )
        )

    candidates = [k for t in tensors for k in t.keys]
    for arg, pats, hit in (
        (inc_arg, muon_pats, used),
        (exc_arg, adamw_pats, used),
        ("no_decay_patterns", nodecay_pats, used),
        ("split_sizes", tuple(split), split_used),
    ):
        for pat in pats:
            if pat not in hit:
                raise no_match_error(arg, pat, candidates, "parameter")
    return RoutingReport(mode=optimizer, routes=tuple(routes), notes=tuple(notes))


#: ``_``-separated words of an embedding's name that mark a position / segment table,
#: not a vocabulary (``position_embedding``, ``wpe``'s HF name ``pos_embed``,
#: ``token_type_embeddings``): no output head predicts them.
_POSITION_WORDS = frozenset({"pos", "position", "positions", "positional", "type", "types",
                             "segment", "wpe"})


def _is_position_table(name: str) -> bool:
    return any(set(part.lower().split("_")) & _POSITION_WORDS for part in name.split("."))


def _in_repeated_block(path: str) -> bool:
    """True when ``path`` lies inside a numbered container item (``layers.3.mlp.fc1``):
    a hidden layer, repeated per block, never the model's single output projection (a
    ``Sequential``'s own item ``"4"`` is not inside one)."""
    parts = path.split(".")
    return any(p.isdigit() for p in parts[:-1])


def _vocab_head_fallback(decisions: list[tuple[_Tensor, str, str, dict[str, Any]]],
                         vocab: Mapping[int, str], optimizer: str, inc_arg: str,
                         notes: list[str]) -> None:
    """Routing rule 7's last resort, in place: with no tied or named head, the matrix
    module that produces vocab-sized logits goes to AdamW.

    Candidates: Muon-routed Linear / Conv1D weights (not forced by ``include``) whose
    fan-out is a token embedding's ``num_embeddings``. One candidate is the head. Of
    several, those outside repeated blocks are head-like (a per-block FFN whose width
    happens to equal the vocabulary is not a head): one head-like candidate is the head;
    several are ambiguous (warned, left to Muon); none means the model has no
    vocabulary-sized output projection (CLIP, encoders): nothing to say.
    """
    def fan_out(t: _Tensor) -> int | None:
        sp = t.spec
        return sp.fan_out if sp.kind in ("linear", "transposed") else None

    cands = [i for i, (t, opt, reason, _) in enumerate(decisions)
             if opt == "muon" and not reason.startswith(inc_arg) and fan_out(t) in vocab]
    if len(cands) > 1:
        cands = [i for i in cands
                 if not any(_in_repeated_block(p) for p in decisions[i][0].layer_paths)]
    if len(cands) == 1:
        t = decisions[cands[0]][0]
        emb = vocab[fan_out(t)]  # type: ignore[index]
        decisions[cands[0]] = (t, "adamw", f"output head (out_features = vocab of {emb})", {})
    elif len(cands) > 1 and optimizer == "muon":  # with "adamw" they go to AdamW anyway
        names = [decisions[i][0].names[0] for i in cands]
        msg = (
            f"could not identify the output head: {len(cands)} Linear layers outside the "
            f"repeated blocks have out_features equal to an embedding's num_embeddings "
            f"({names[:4]}...); they go to Muon. Pass exclude=[<head name>] to route the "
            "head to AdamW."
        )
        notes.append(msg)
        warnings.warn(msg, UserWarning, stacklevel=3)  # the caller of describe_routing


# --------------------------------------------------------------------- the optimizer


def _call_step_without_hooks(child: Optimizer) -> None:
    # torch wraps each Optimizer subclass's step so that it runs global and per-instance
    # hooks; the hybrid's own step already ran them once, so call the unwrapped step.
    step = type(child).step
    raw: Callable[[Optimizer], Any] | None = getattr(step, "__wrapped__", None)
    if getattr(step, "hooked", False) and raw is not None:
        raw(child)
    else:
        child.step()


def _validate_nonfinite(nonfinite: str) -> str:
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    return nonfinite


class HybridOptimizer(Optimizer):
    """Muon groups and ``torch.optim.AdamW`` groups in one ``torch.optim.Optimizer``.

    Args:
        params: parameter groups (dicts), each with ``"optimizer": "muon" | "adamw"`` and
            ``"params"`` (tensors or ``(name, tensor)`` pairs); other keys override the
            defaults of that side (``lr``, ``weight_decay``, ...).
        muon_kwargs: defaults for the Muon side (``specopt.Muon``'s keyword arguments).
        adamw_kwargs: defaults for the AdamW side (``torch.optim.AdamW``'s arguments).
        nonfinite: ``"raise"`` or ``"skip"`` (see the module docstring).
        routing: the :class:`RoutingReport` the groups came from (kept as ``.routing``).
        muon_cls: the Muon class (default ``specopt.Muon``).

    The math is delegated, never copied: a ``specopt.Muon`` instance steps the Muon
    groups and a ``torch.optim.AdamW`` instance steps the AdamW groups. Both share this
    object's ``state`` and the very same group dicts, so ``param_groups``,
    ``state_dict``/``load_state_dict``, LR schedulers (each group keeps its own ``lr`` and
    ``initial_lr``), ``zero_grad`` and step hooks act on the whole model. Step hooks
    registered on this object fire once per step; the two inner optimizers are stepped
    without their hooks. ``add_param_group`` needs the ``"optimizer"`` key.
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        *,
        muon_kwargs: Mapping[str, Any] | None = None,
        adamw_kwargs: Mapping[str, Any] | None = None,
        nonfinite: str = "raise",
        routing: RoutingReport | None = None,
        muon_cls: type[Optimizer] | None = None,
    ) -> None:
        groups = list(params)
        if not groups:
            raise ValueError("HybridOptimizer got an empty parameter list")
        for gi, g in enumerate(groups):
            self._check_group(g, gi)
        self._nonfinite = _validate_nonfinite(nonfinite)
        self._routing = routing
        self._muon_cls = muon_cls if muon_cls is not None else Muon
        self._child_kwargs = {"muon": dict(muon_kwargs or {}), "adamw": dict(adamw_kwargs or {})}
        self._muon: Optimizer | None = None
        self._adamw: Optimizer | None = None
        for kind in _OPTIMIZERS:
            mine = [_named(g, gi) for gi, g in enumerate(groups) if g["optimizer"] == kind]
            if mine:
                setattr(self, f"_{kind}", self._make_child(kind, mine))
        self._building = True
        try:
            super().__init__(groups, defaults={})
        finally:
            self._building = False
        self._rewire()

    # -- construction helpers

    @staticmethod
    def _check_group(group: Any, gi: int) -> None:
        if not isinstance(group, dict):
            raise TypeError(
                f"HybridOptimizer params must be dicts with an 'optimizer' key, "
                f"got {type(group).__name__} at index {gi}"
            )
        kind = group.get("optimizer")
        if kind not in _OPTIMIZERS:
            raise ValueError(
                f"param group {gi} needs 'optimizer' set to one of {_OPTIMIZERS}, got {kind!r}"
            )

    def _make_child(self, kind: str, groups: list[dict[str, Any]]) -> Optimizer:
        if kind == "adamw":
            _check_fp16_adamw(groups, self._child_kwargs["adamw"].get("eps", 1e-8))  # torch default
        cls = self._muon_cls if kind == "muon" else torch.optim.AdamW
        return cls(groups, **self._child_kwargs[kind])

    def _rewire(self) -> None:
        """Point each inner optimizer at this object's state and its own group dicts."""
        for kind in _OPTIMIZERS:
            child = getattr(self, f"_{kind}")
            if child is None:
                continue
            groups = [g for g in self.param_groups if g["optimizer"] == kind]
            # The child's own __setstate__ also applies its backward-compat group defaults.
            type(child).__setstate__(child, {"state": self.state, "param_groups": groups})

    # -- torch.optim.Optimizer API

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; it must say ``"optimizer": "muon"`` or ``"adamw"``."""
        if getattr(self, "_building", False):
            super().add_param_group(param_group)
            return
        gi = len(self.param_groups)
        self._check_group(param_group, gi)
        new = param_group["params"]
        new = [new] if isinstance(new, Tensor) else list(new)
        new_tensors = {p[1] if isinstance(p, tuple) else p for p in new}
        for g in self.param_groups:
            if not new_tensors.isdisjoint(g["params"]):
                raise ValueError("some parameters appear in more than one parameter group")
        param_group["params"] = new
        param_group = _named(param_group, gi)
        kind = param_group["optimizer"]
        child = getattr(self, f"_{kind}")
        if child is None:
            setattr(self, f"_{kind}", self._make_child(kind, [param_group]))
        else:
            if kind == "adamw":
                _check_fp16_adamw([param_group], child.defaults["eps"])
            child.add_param_group(param_group)
        super().add_param_group(param_group)
        self._rewire()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["param_groups"]
        if len(saved) == len(self.param_groups):
            for gi, (g, s) in enumerate(zip(self.param_groups, saved, strict=True)):
                if s.get("optimizer") != g["optimizer"]:
                    raise ValueError(
                        f"loaded param group {gi} is for optimizer {s.get('optimizer')!r} "
                        f"but this optimizer's group {gi} is {g['optimizer']!r}"
                    )
        super().load_state_dict(state_dict)  # ends in __setstate__, which rewires

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for key in ("_muon", "_adamw", "_nonfinite", "_routing", "_muon_cls", "_child_kwargs"):
            state[key] = self.__dict__[key]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._building = False
        if "_muon" in self.__dict__:
            self._rewire()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step: screen gradients, then Muon on Muon groups, AdamW on AdamW groups."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hidden = screen_nonfinite(self.param_groups, self._nonfinite, "optimizer")
        try:
            for child in (self._muon, self._adamw):
                if child is not None:
                    with screened(child):  # one gradient scan per step, done just above
                        _call_step_without_hooks(child)
        finally:
            restore_grads(hidden)
        return loss

    # -- extras

    @property
    def routing(self) -> RoutingReport | None:
        """The :class:`RoutingReport` this optimizer was built from (None if built by hand)."""
        return self._routing

    @property
    def nonfinite(self) -> str:
        return self._nonfinite

    @property
    def nonfinite_skips(self) -> dict[str, int]:
        """``{parameter name: steps skipped for a non-finite gradient}`` (non-zero only)."""
        return skips_by_name(self.param_groups)


def _named(group: dict[str, Any], gi: int) -> dict[str, Any]:
    """Give every tensor of a group a name (torch needs all groups named or none)."""
    params = group["params"]
    params = [params] if isinstance(params, Tensor) else list(params)
    if params and not all(isinstance(p, tuple) for p in params) and "param_names" not in group:
        params = [
            p if isinstance(p, tuple) else (f"param_groups[{gi}].params[{i}]", p)
            for i, p in enumerate(params)
        ]
    group["params"] = params
    return group


# ------------------------------------------------------------------ build_optimizer


def _check_float(name: str, value: Any, *, low: float = 0.0, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < low or (high is not None and value >= high):
        bound = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")


def _check_fp16_adamw(groups: Iterable[Mapping[str, Any]], default_eps: float) -> None:
    """Refuse AdamW groups holding fp16 tensors whose ``eps`` underflows in fp16
    (:data:`FP16_MIN_ADAMW_EPS`): torch's AdamW would write NaN into them."""
    bad: list[str] = []
    eps_seen = default_eps
    for gi, g in enumerate(groups):
        eps = g.get("eps", default_eps)
        if eps >= FP16_MIN_ADAMW_EPS:
            continue
        params = g["params"]
        params = [params] if isinstance(params, Tensor) else params
        for i, p in enumerate(params):
            name, t = p if isinstance(p, tuple) else (f"param_groups[{gi}].params[{i}]", p)
            if t.dtype == torch.float16:
                bad.append(f"{name} {tuple(t.shape)}")
                eps_seen = eps
    if bad:
        shown = ", ".join(bad[:4]) + (f" (+{len(bad) - 4} more)" if len(bad) > 4 else "")
        raise ValueError(
            f"{len(bad)} fp16 parameter(s) go to AdamW with eps={eps_seen:g}, which rounds "
            f"to {float(torch.tensor(eps_seen, dtype=torch.float16)):g} in fp16 and makes "
            f"NaN where a gradient is zero: {shown}. Keep fp32 master weights and train "
            "under torch.autocast(dtype=torch.float16), or use bf16 weights, or pass "
            f"adamw_eps >= {FP16_MIN_ADAMW_EPS:.3g} (e.g. 1e-4) to accept fp16 AdamW"
        )


def _guard_plain(opt: Optimizer, nonfinite: str) -> None:
    """Non-finite screening for a plain torch optimizer, through its step hooks."""

    def pre(o: Optimizer, args: Any, kwargs: Any) -> None:
        o._specopt_hidden = screen_nonfinite(o.param_groups, nonfinite, None)  # type: ignore[attr-defined]

    def post(o: Optimizer, args: Any, kwargs: Any) -> None:
        restore_grads(getattr(o, "_specopt_hidden", ()))
        o._specopt_hidden = []  # type: ignore[attr-defined]

    opt.register_step_pre_hook(pre)
    opt.register_step_post_hook(post)


def _param_groups(report: RoutingReport, *, lr: float, adamw_lr: float, weight_decay: float
                  ) -> list[dict[str, Any]]:
    """Groups by (side, decay, Muon options), in a fixed order: Muon before AdamW, decayed
    before not, plain matrices before those with options (first appearance after that)."""
    buckets: dict[tuple, list[ParamRoute]] = {}
    for kind in _OPTIMIZERS:
        for decay in (True, False):
            buckets[(kind, decay, ())] = []
    for r in report:
        if r.optimizer == "frozen":
            continue
        opts = tuple(sorted(r.muon_options.items())) if r.optimizer == "muon" else ()
        buckets.setdefault((r.optimizer, r.weight_decay, opts), []).append(r)
    order = sorted(buckets, key=lambda k: (_OPTIMIZERS.index(k[0]), not k[1], k[2] != ()))
    groups: list[dict[str, Any]] = []
    names: set[str] = set()
    for kind, decay, opts in order:
        routes = buckets[(kind, decay, opts)]
        if not routes:
            continue
        qualifiers = [str(v) if k == "matrix_layout" else k.split("_")[0] for k, v in opts]
        name = "_".join([kind, *qualifiers] + ([] if decay else ["no_decay"]))
        base, n = name, 2
        while name in names:  # e.g. two split_sizes groups with different sizes
            name, n = f"{base}_{n}", n + 1
        names.add(name)
        group = {
            "params": [(r.name, r.param) for r in routes],
            "optimizer": kind,
            "name": name,
            "lr": lr if kind == "muon" else adamw_lr,
            "weight_decay": weight_decay if decay else 0.0,
            "nonfinite_skips": [0] * len(routes),
        }
        group.update(dict(opts))
        groups.append(group)
    return groups


def build_optimizer(
    model: nn.Module,
    optimizer: str = "muon",
    *,
    lr: float = 1e-3,
    adamw_lr: float | None = None,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = DEFAULT_ADAMW_BETAS,
    adamw_eps: float = 1e-8,
    momentum: float = 0.95,
    nesterov: bool = True,
    adjust_lr_fn: str | None = "match_rms_adamw",
    include: Pattern | Sequence[Pattern] | None = None,
    exclude: Pattern | Sequence[Pattern] | None = None,
    no_decay_patterns: Pattern | Sequence[Pattern] | None = None,
    split_sizes: Mapping[Pattern, Sequence[int]] | Sequence[int] | None = None,
    head_names: Sequence[str] = DEFAULT_HEAD_NAMES,
    nonfinite: str = "raise",
    adamw_kwargs: Mapping[str, Any] | None = None,
    muon_patterns: Pattern | Sequence[Pattern] | None = None,
    adamw_patterns: Pattern | Sequence[Pattern] | None = None,
    **muon_kwargs: Any,
) -> Optimizer:
    """One optimizer for ``model``: Muon + AdamW (``"muon"``) or plain AdamW (``"adamw"``).

    Routing and weight-decay rules are in the module docstring; ``describe_routing`` with
    the same arguments shows the result without building anything.

    Args:
        model: the model; each unique trainable tensor is optimized exactly once.
        optimizer: ``"muon"`` -> a :class:`HybridOptimizer`; ``"adamw"`` -> a plain
            ``torch.optim.AdamW`` (every trainable tensor, decay / no-decay groups).
        lr: Muon learning rate (default 1e-3). With the default
            ``adjust_lr_fn="match_rms_adamw"`` a Muon matrix of shape (A, B) moves by
            ``lr * 0.2 * sqrt(max(A, B)) * O`` with ``O`` the orthogonalized momentum
            (RMS of O about ``1/sqrt(max(A, B))``), i.e. an update RMS of about
            ``0.2 * lr``, the typical RMS of an AdamW update at the same lr (Moonlight,
            arXiv 2502.16982) -- so one lr serves both sides.
        adamw_lr: lr of the AdamW groups (default: ``lr``).
        weight_decay: decoupled weight decay of decayed groups on both sides (default
            0.1); applied as ``p *= 1 - lr * weight_decay``.
        betas: AdamW betas (default (0.9, 0.95)).
        adamw_eps: AdamW epsilon (default 1e-8). fp16 tensors on the AdamW side need
            ``adamw_eps >= FP16_MIN_ADAMW_EPS`` (else ``ValueError``; see the module
            docstring).
        momentum, nesterov, adjust_lr_fn: Muon settings (defaults 0.95, True,
            ``"match_rms_adamw"``); ignored with ``optimizer="adamw"``.
        include: patterns (:mod:`specopt.layers` vocabulary, matched against parameter
            names and module paths) of tensors Muon must take.
        exclude: patterns of tensors kept off Muon (they go to AdamW).
        no_decay_patterns: patterns of extra tensors with ``weight_decay=0``.
        split_sizes: ``{pattern: sizes}``: orthogonalize the matched Muon matrices in row
            blocks of ``sizes`` output rows (a fused QKV: GPT-2's ``c_attn`` of width
            ``d`` takes ``{"*.attn.c_attn": (d, d, d)}``, whatever the storage
            orientation). A plain sequence is a Muon default for every Muon group
            (``specopt.Muon(split_sizes=...)``, as before).
        head_names: module names treated as the output head.
        nonfinite: ``"raise"`` (default) or ``"skip"``; see the module docstring.
        adamw_kwargs: extra ``torch.optim.AdamW`` arguments (``fused``, ``foreach``,
            ``amsgrad``, ``maximize``, ``capturable``).
        muon_patterns, adamw_patterns: deprecated aliases of ``include`` / ``exclude``.
        **muon_kwargs: extra ``specopt.Muon`` arguments (``ns_coefficients``,
            ``ns_steps``, ``eps``, ...); an error with ``optimizer="adamw"``.

    Returns:
        The optimizer, with ``.routing`` (a :class:`RoutingReport`). Group names (the
        ``"name"`` key): ``"muon"``, ``"muon_no_decay"``, ``"adamw"``,
        ``"adamw_no_decay"``; Muon tensors with group options (routing rule 11) get their
        own groups, named after the options (``"muon_transposed"``, ``"muon_flatten"``,
        ``"muon_batch"``, ``"muon_split"``, with ``"_no_decay"`` where it applies). Empty
        groups are left out.
    """
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}")
    _check_float("lr", lr)
    if adamw_lr is not None:
        _check_float("adamw_lr", adamw_lr)
    _check_float("weight_decay", weight_decay)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    _check_float("betas[0]", betas[0], high=1.0)
    _check_float("betas[1]", betas[1], high=1.0)
    _check_float("adamw_eps", adamw_eps)
    _validate_nonfinite(nonfinite)
    if optimizer == "adamw" and muon_kwargs:
        raise TypeError(
            f"Muon keyword arguments {sorted(muon_kwargs)} have no meaning with optimizer='adamw'"
        )
    adamw_kw = dict(adamw_kwargs or {})
    clash = {"params", "lr", "betas", "eps", "weight_decay"} & adamw_kw.keys()
    if clash:
        raise TypeError(
            f"adamw_kwargs must not set {sorted(clash)}: use build_optimizer's own "
            "lr/adamw_lr, betas, adamw_eps, weight_decay arguments"
        )

    include, exclude, inc_arg, exc_arg = _resolve_aliases(include, exclude, muon_patterns,
                                                          adamw_patterns)
    split_map = None
    if split_sizes is not None and not isinstance(split_sizes, Mapping):
        muon_kwargs["split_sizes"] = split_sizes  # a Muon-wide default, as before
    else:
        split_map = split_sizes
    report = _route(model, optimizer, include=include, exclude=exclude, inc_arg=inc_arg,
                    exc_arg=exc_arg, no_decay_patterns=no_decay_patterns,
                    split_sizes=split_map, head_names=head_names)
    a_lr = lr if adamw_lr is None else adamw_lr
    groups = _param_groups(report, lr=lr, adamw_lr=a_lr, weight_decay=weight_decay)
    if not groups:
        frozen = len(report.select("frozen"))
        raise ValueError(
            f"model {type(model).__name__} has no trainable parameters "
            f"({frozen} frozen tensors); nothing to optimize"
        )

    adamw_defaults = {"lr": a_lr, "betas": tuple(betas), "eps": adamw_eps, **adamw_kw}
    if optimizer == "adamw":
        for g in groups:
            del g["optimizer"]
        _check_fp16_adamw(groups, adamw_eps)
        opt: Optimizer = torch.optim.AdamW(groups, weight_decay=weight_decay, **adamw_defaults)
        _guard_plain(opt, nonfinite)
        opt.routing = report  # type: ignore[attr-defined]
        return opt

    muon_defaults = {
        "lr": lr,
        "weight_decay": weight_decay,
        "momentum": momentum,
        "nesterov": nesterov,
        "adjust_lr_fn": adjust_lr_fn,
        "nonfinite": nonfinite,  # never triggers (the hybrid screens first); kept consistent
        **muon_kwargs,
    }
    return HybridOptimizer(
        groups,
        muon_kwargs=muon_defaults,
        adamw_kwargs={"weight_decay": weight_decay, **adamw_defaults},
        nonfinite=nonfinite,
        routing=report,
    )
