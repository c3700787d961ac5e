"""One optimizer for a whole model: Muon for hidden matrices, torch's AdamW for the rest.

``build_optimizer(model, "muon")`` returns a single :class:`HybridOptimizer` (a
``torch.optim.Optimizer``) whose ``param_groups`` hold Muon groups and AdamW groups side
by side; ``build_optimizer(model, "adamw")`` returns a plain ``torch.optim.AdamW`` with
decay / no-decay groups. Both carry ``optimizer.routing``, a :class:`RoutingReport`
saying which parameter went where and why.

Routing rule (first match wins, per unique tensor; tied tensors appear once):

1. ``requires_grad=False`` -> not optimized ("frozen").
2. User glob patterns (``fnmatch``, ``*`` also matches dots) in ``muon_patterns`` /
   ``adamw_patterns``, tested against every name of the tensor (all tied aliases) and its
   layer name (``w1.parametrizations.weight.original`` is also known as ``w1.weight``).
3. 0-D / 1-D tensors (biases, norm gains, PC ``gamma``) -> AdamW.
4. Complex tensors -> AdamW (Muon orthogonalizes real matrices only).
5. ``nn.Embedding`` / ``nn.EmbeddingBag`` weights, and 2-D+ weights of modules with
   "embed" in their path (e.g. ``patch_embed.proj``) -> AdamW.
6. The output head -> AdamW: a tensor sharing storage with an embedding (tied head), a
   module named like a head (:data:`DEFAULT_HEAD_NAMES` as the first or last component of
   its path), or, when neither finds a head, the single ``nn.Linear`` whose
   ``out_features`` equals an embedding's ``num_embeddings``.
7. Every other tensor with ndim >= 2 (hidden Linear weights, the raw PC weight
   ``<module>.parametrizations.weight.original``, conv kernels) -> Muon.

Weight decay: tensors with ndim >= 2 are decayed (Muon matrices, and on the AdamW side
embeddings and the head, the nanoGPT convention: a tied head is an output matrix too);
0-D / 1-D tensors and anything matching ``no_decay_patterns`` get ``weight_decay=0``.
Add ``"tok_embeddings.*"`` to ``no_decay_patterns`` for the OLMo-2 style of undecayed
embeddings.

Non-finite gradients: before any weight moves, every gradient is checked (one fused
2-norm per device, one host sync per step; :mod:`specopt.optim.nonfinite`).
``nonfinite="raise"`` (default) raises
:class:`NonFiniteGradientError` naming each bad parameter and its shape, with no weight
changed; ``nonfinite="skip"`` hides that parameter's gradient for the step (no update, no
moment/momentum update, no weight decay), counts it in the group's ``"nonfinite_skips"``
list (saved in ``state_dict``) and warns.

Example::

    opt = specopt.build_optimizer(model, "muon", lr=3e-3)
    print(opt.routing)  # table: parameter, shape, optimizer, decay, reason
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10_000)
    loss.backward(); opt.step(); sched.step(); opt.zero_grad()
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.optim import Optimizer

from specopt.distributed import is_dtensor
from specopt.optim.muon import Muon
from specopt.optim.nonfinite import NonFiniteGradientError, nonfinite_indices

__all__ = [
    "DEFAULT_ADAMW_BETAS",
    "DEFAULT_HEAD_NAMES",
    "HybridOptimizer",
    "NonFiniteGradientError",
    "ParamRoute",
    "RoutingReport",
    "build_optimizer",
    "describe_routing",
]

#: Module names recognised as the output head (first or last component of the path).
DEFAULT_HEAD_NAMES: tuple[str, ...] = (
    "output",
    "lm_head",
    "head",
    "classifier",
    "embed_out",
)

#: AdamW betas for LLM training (GPT-3 / Llama-2 / the PC-layer paper); torch's default
#: beta2=0.999 reacts too slowly to loss spikes at LLM batch sizes.
DEFAULT_ADAMW_BETAS: tuple[float, float] = (0.9, 0.95)

_OPTIMIZERS = ("muon", "adamw")
_NONFINITE_POLICIES = ("raise", "skip")
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
    """

    name: str
    aliases: tuple[str, ...]
    layer_name: str
    shape: tuple[int, ...]
    optimizer: str
    weight_decay: bool
    reason: str
    param: Tensor = field(repr=False, compare=False)

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


def _check_patterns(arg: str, patterns: Sequence[str] | None) -> tuple[str, ...]:
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        raise TypeError(
            f"{arg} must be a sequence of glob strings, got the str {patterns!r}; "
            f"wrap it in a list: {arg}=[{patterns!r}]"
        )
    out = tuple(patterns)
    for p in out:
        if not isinstance(p, str) or not p:
            raise TypeError(f"{arg} entries must be non-empty strings, got {p!r}")
    return out


def _matches(patterns: Sequence[str], t: _Tensor) -> list[str]:
    keys = set(t.names) | set(t.layer_names)
    return [p for p in patterns if any(fnmatchcase(k, p) for k in keys)]


def _storage_key(p: Tensor) -> tuple[str, int] | None:
    # DTensor (FSDP2) and other wrapper subclasses have no storage of their own; tying
    # there is by Parameter identity, which _collect already merges.
    if p.numel() == 0 or p.device.type == "meta" or is_dtensor(p):
        return None
    try:
        return (str(p.device), p.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        return None


def _is_head_name(path: str, head_names: Sequence[str]) -> bool:
    parts = path.split(".") if path else []
    # DDP / torch.compile wrappers prefix "module." / "_orig_mod.": skip them.
    while parts and parts[0] in ("module", "_orig_mod"):
        parts = parts[1:]
    return bool(parts) and (parts[0] in head_names or parts[-1] in head_names)


def _small_reason(t: _Tensor) -> str:
    if "bias" in t.roles:
        return "bias"
    if any(isinstance(m, _NORM_TYPES) or "norm" in type(m).__name__.lower() for m in t.layers):
        return "norm weight"
    return "0-D scalar" if t.param.ndim == 0 else "1-D vector"


def _auto_route(
    t: _Tensor,
    emb_storage: Mapping[tuple[str, int], str],
    head_names: Sequence[str],
) -> tuple[str, str]:
    """(optimizer, reason) by module type and shape, before the vocab-size fallback."""
    p = t.param
    if p.ndim < 2:
        return "adamw", _small_reason(t)
    if p.is_complex():
        return "adamw", "complex (Muon orthogonalizes real matrices only)"
    is_emb = [isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in t.layers]
    if any(is_emb):
        others = [n for n, e in zip(t.names, is_emb, strict=True) if not e]
        tied = f" (tied: also the output head {', '.join(others)})" if others else ""
        return "adamw", "embedding" + tied
    key = _storage_key(p)
    if key is not None and key in emb_storage:
        return "adamw", f"output head (shares storage with embedding {emb_storage[key]})"
    if any(_is_head_name(path, head_names) for path in t.layer_paths):
        return "adamw", "output head (by module name)"
    if any("embed" in part for path in t.layer_paths for part in path.split(".")):
        return "adamw", "input embedding (by module name)"
    if p.ndim == 2:
        return "muon", "hidden matrix"
    return "muon", f"hidden {p.ndim}-D weight (Muon flattens to (out, -1))"


def describe_routing(
    model: nn.Module,
    optimizer: str = "muon",
    *,
    muon_patterns: Sequence[str] | None = None,
    adamw_patterns: Sequence[str] | None = None,
    no_decay_patterns: Sequence[str] | None = None,
    head_names: Sequence[str] = DEFAULT_HEAD_NAMES,
) -> RoutingReport:
    """Route every unique parameter of ``model`` (rules in the module docstring).

    Pure: reads the model, changes nothing. ``build_optimizer`` calls this with the same
    arguments and builds its groups from the result, so the report is exactly what the
    optimizer does. Raises ``ValueError`` for an unknown ``optimizer``, a pattern that
    matches no parameter, a parameter matched by both ``muon_patterns`` and
    ``adamw_patterns``, or a 0-D/1-D/complex parameter forced to Muon.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}")
    muon_pats = _check_patterns("muon_patterns", muon_patterns)
    adamw_pats = _check_patterns("adamw_patterns", adamw_patterns)
    nodecay_pats = _check_patterns("no_decay_patterns", no_decay_patterns)
    if optimizer == "adamw" and muon_pats:
        raise ValueError("muon_patterns has no meaning with optimizer='adamw'")
    head_names = _check_patterns("head_names", head_names)

    tensors = _collect(model)
    emb_storage: dict[tuple[str, int], str] = {}
    vocab: dict[int, str] = {}  # num_embeddings -> embedding name
    for t in tensors:
        for name, m in zip(t.names, t.layers, strict=True):
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and t.param.ndim == 2:
                key = _storage_key(t.param)
                if key is not None:
                    emb_storage.setdefault(key, name)
                vocab.setdefault(m.num_embeddings, name)

    used: set[str] = set()
    decisions: list[tuple[_Tensor, str, str]] = []
    for t in tensors:
        hit_m, hit_a = _matches(muon_pats, t), _matches(adamw_pats, t)
        used.update(hit_m, hit_a)
        shape = tuple(t.param.shape)
        if not t.param.requires_grad:
            decisions.append((t, "frozen", "requires_grad=False (not optimized)"))
        elif hit_m and hit_a:
            raise ValueError(
                f"parameter {t.names[0]!r} (shape {shape}) matches muon_patterns {hit_m} "
                f"and adamw_patterns {hit_a}; make the patterns disjoint"
            )
        elif hit_m:
            if t.param.ndim < 2 or t.param.is_complex():
                raise ValueError(
                    f"muon_patterns {hit_m} match parameter {t.names[0]!r} with shape {shape} "
                    f"and dtype {t.param.dtype}: Muon needs real tensors with ndim >= 2"
                )
            decisions.append((t, "muon", f"muon_patterns {hit_m[0]!r}"))
        elif hit_a:
            decisions.append((t, "adamw", f"adamw_patterns {hit_a[0]!r}"))
        else:
            decisions.append((t, *_auto_route(t, emb_storage, head_names)))

    notes: list[str] = []
    if vocab and not adamw_pats and not any("output head" in r for _, _, r in decisions):
        # No tied or named head (and no user routing to AdamW): fall back to the Linear
        # that produces vocab-sized logits.
        cands = [
            i
            for i, (t, opt, reason) in enumerate(decisions)
            if opt == "muon"
            and not reason.startswith("muon_patterns")
            and any(
                isinstance(m, nn.Linear) and m.out_features in vocab and r == "weight"
                for m, r in zip(t.layers, t.roles, strict=True)
            )
        ]
        if len(cands) == 1:
            t, _, _ = decisions[cands[0]]
            emb = next(vocab[m.out_features] for m in t.layers if isinstance(m, nn.Linear))
            decisions[cands[0]] = (t, "adamw", f"output head (out_features = vocab of {emb})")
        elif len(cands) > 1 and optimizer == "muon":  # with "adamw" they go to AdamW anyway
            names = [decisions[i][0].names[0] for i in cands]
            msg = (
                f"could not identify the output head: {len(cands)} Linear layers have "
                f"out_features equal to an embedding's num_embeddings ({names[:4]}...); "
                "they go to Muon. Pass adamw_patterns=[<head name>] to route the head to AdamW."
            )
            notes.append(msg)
            warnings.warn(msg, UserWarning, stacklevel=2)

    routes = []
    for t, opt, reason in decisions:
        decay = t.param.ndim >= 2 and not _matches(nodecay_pats, t)
        used.update(_matches(nodecay_pats, t))
        if optimizer == "adamw" and opt == "muon":
            opt, reason = "adamw", f"{reason} (optimizer='adamw')"
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
            )
        )

    for arg, pats in (
        ("muon_patterns", muon_pats),
        ("adamw_patterns", adamw_pats),
        ("no_decay_patterns", nodecay_pats),
    ):
        for pat in pats:
            if pat not in used:
                examples = ", ".join(repr(t.names[0]) for t in tensors[:3])
                raise ValueError(
                    f"{arg} entry {pat!r} matches no parameter of the model "
                    f"(names look like {examples})"
                )
    return RoutingReport(mode=optimizer, routes=tuple(routes), notes=tuple(notes))


# ---------------------------------------------------------------- non-finite screening


def _group_names(group: Mapping[str, Any], gi: int) -> list[str]:
    names = group.get("param_names")
    if names is not None and len(names) == len(group["params"]):
        return list(names)
    return [f"param_groups[{gi}].params[{i}]" for i in range(len(group["params"]))]


def _screen_nonfinite(
    param_groups: Sequence[dict[str, Any]], policy: str, kind_key: str | None
) -> list[tuple[Tensor, Tensor]]:
    """Check every dense gradient (:func:`~specopt.optim.nonfinite.nonfinite_indices`);
    raise, or hide bad ones (return them to restore)."""
    entries = [
        (gi, i, p)
        for gi, g in enumerate(param_groups)
        for i, p in enumerate(g["params"])
        if p.grad is not None and not p.grad.is_sparse
    ]
    bad = nonfinite_indices([p.grad for _, _, p in entries])
    if not bad:
        return []

    def describe(k: int) -> str:
        gi, i, p = entries[k]
        g = param_groups[gi]
        where = f", {g[kind_key]} group {gi}" if kind_key and kind_key in g else f", group {gi}"
        return f"{_group_names(g, gi)[i]!r} (shape {tuple(p.shape)}{where})"

    if policy == "raise":
        listed = "; ".join(describe(k) for k in bad[:8])
        more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
        raise NonFiniteGradientError(
            f"non-finite gradient (NaN or Inf) in parameter {listed}{more}; no weight was "
            "updated. Fix the loss/grad (or clip), or build with nonfinite='skip' to skip "
            "those parameters' updates and count them."
        )
    hidden = []
    for k in bad:
        gi, i, p = entries[k]
        g = param_groups[gi]
        counts = g.setdefault("nonfinite_skips", [0] * len(g["params"]))
        counts[i] += 1
        warnings.warn(
            f"skipping the update of parameter {describe(k)}: non-finite gradient",
            RuntimeWarning,
            stacklevel=3,
        )
        hidden.append((p, p.grad))
        p.grad = None  # torch optimizers skip params without grad: no update, no state change
    return hidden


def _restore(hidden: Sequence[tuple[Tensor, Tensor]]) -> None:
    for p, grad in hidden:
        p.grad = grad


def _skips_by_name(param_groups: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for gi, g in enumerate(param_groups):
        for name, n in zip(_group_names(g, gi), g.get("nonfinite_skips", ()), strict=False):
            if n:
                out[name] = out.get(name, 0) + n
    return out


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
    if nonfinite not in _NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {_NONFINITE_POLICIES}, got {nonfinite!r}")
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
        hidden = _screen_nonfinite(self.param_groups, self._nonfinite, "optimizer")
        try:
            for child in (self._muon, self._adamw):
                if child is not None:
                    _call_step_without_hooks(child)
        finally:
            _restore(hidden)
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
        return _skips_by_name(self.param_groups)


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


def _guard_plain(opt: Optimizer, nonfinite: str) -> None:
    """Non-finite screening for a plain torch optimizer, through its step hooks."""

    def pre(o: Optimizer, args: Any, kwargs: Any) -> None:
        o._specopt_hidden = _screen_nonfinite(o.param_groups, nonfinite, None)  # type: ignore[attr-defined]

    def post(o: Optimizer, args: Any, kwargs: Any) -> None:
        _restore(getattr(o, "_specopt_hidden", ()))
        o._specopt_hidden = []  # type: ignore[attr-defined]

    opt.register_step_pre_hook(pre)
    opt.register_step_post_hook(post)


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
    muon_patterns: Sequence[str] | None = None,
    adamw_patterns: Sequence[str] | None = None,
    no_decay_patterns: Sequence[str] | None = None,
    head_names: Sequence[str] = DEFAULT_HEAD_NAMES,
    nonfinite: str = "raise",
    adamw_kwargs: Mapping[str, Any] | None = None,
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
        adamw_eps: AdamW epsilon (default 1e-8).
        momentum, nesterov, adjust_lr_fn: Muon settings (defaults 0.95, True,
            ``"match_rms_adamw"``); ignored with ``optimizer="adamw"``.
        muon_patterns, adamw_patterns: glob patterns forcing tensors to one side.
        no_decay_patterns: glob patterns of extra tensors with ``weight_decay=0``.
        head_names: module names treated as the output head.
        nonfinite: ``"raise"`` (default) or ``"skip"``; see the module docstring.
        adamw_kwargs: extra ``torch.optim.AdamW`` arguments (``fused``, ``foreach``,
            ``amsgrad``, ``maximize``, ``capturable``).
        **muon_kwargs: extra ``specopt.Muon`` arguments (``ns_coefficients``,
            ``ns_steps``, ``eps``, ...); an error with ``optimizer="adamw"``.

    Returns:
        The optimizer, with ``.routing`` (a :class:`RoutingReport`). Group names (the
        ``"name"`` key): ``"muon"``, ``"muon_no_decay"``, ``"adamw"``,
        ``"adamw_no_decay"``; empty groups are left out.
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

    report = describe_routing(
        model,
        optimizer,
        muon_patterns=muon_patterns,
        adamw_patterns=adamw_patterns,
        no_decay_patterns=no_decay_patterns,
        head_names=head_names,
    )
    a_lr = lr if adamw_lr is None else adamw_lr
    groups: list[dict[str, Any]] = []
    for kind, group_lr in (("muon", lr), ("adamw", a_lr)):
        for decay in (True, False):
            routes = [r for r in report if r.optimizer == kind and r.weight_decay == decay]
            if routes:
                groups.append(
                    {
                        "params": [(r.name, r.param) for r in routes],
                        "optimizer": kind,
                        "name": kind if decay else f"{kind}_no_decay",
                        "lr": group_lr,
                        "weight_decay": weight_decay if decay else 0.0,
                        "nonfinite_skips": [0] * len(routes),
                    }
                )
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
