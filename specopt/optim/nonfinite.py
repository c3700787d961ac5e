"""Non-finite gradients: the one check (:func:`nonfinite_indices`) and the one raise/skip
policy (:func:`screen_nonfinite`) shared by Muon, the hybrid and the monitor."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from specopt.distributed import is_dtensor, to_local

__all__ = [
    "NONFINITE_POLICIES",
    "NonFiniteGradientError",
    "nonfinite_indices",
    "restore_grads",
    "screen_nonfinite",
    "screened",
    "skips_by_name",
]


class NonFiniteGradientError(FloatingPointError):
    """A gradient holds NaN or Inf; raised by ``step()`` before any weight changes."""


def nonfinite_indices(tensors: Sequence[Tensor]) -> list[int]:
    """Indices of the dense ``tensors`` that hold a NaN or Inf entry.

    One fused 2-norm per device and one host sync in the common (all finite) case: a
    NaN/Inf entry makes the norm non-finite. A non-finite norm can also come from
    overflow of finite entries above ~1e19, so only those tensors are re-checked exactly
    with ``isfinite``. (The fused 2-norm is ~30x faster than the inf-norm on CPU: 0.36 vs
    12 ms on the 0.9M-parameter "small" Llama.) DTensor (FSDP2) tensors are checked on
    their local shard and the flags max-all-reduced, so every rank gets the same answer
    (raising on one rank only would hang the others).
    """
    if not tensors:
        return []
    sharded = any(is_dtensor(t) for t in tensors)
    local = [to_local(t) for t in tensors]
    by_device: dict[torch.device, list[int]] = {}
    for k, t in enumerate(local):
        by_device.setdefault(t.device, []).append(k)
    flags = torch.zeros(len(local), dtype=torch.float32, device=local[0].device)
    for idx in by_device.values():
        norms = torch._foreach_norm([local[k] for k in idx], 2)
        suspect = (~torch.stack([n.float() for n in norms]).isfinite()).float()
        if len(by_device) == 1:
            flags = suspect.to(flags.device)
        else:
            flags[torch.tensor(idx, device=flags.device)] = suspect.to(flags.device)
    if bool(flags.any()):  # rare: tell NaN/Inf apart from a 2-norm overflowing on huge values
        for k in flags.nonzero().flatten().tolist():
            flags[k] = float(not bool(torch.isfinite(local[k]).all()))
    if sharded and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return flags.nonzero().flatten().tolist()


NONFINITE_POLICIES = ("raise", "skip")


def _group_names(group: Mapping[str, Any], gi: int) -> list[str]:
    names = group.get("param_names")
    if names is not None and len(names) == len(group["params"]):
        return list(names)
    return [f"param_groups[{gi}].params[{i}]" for i in range(len(group["params"]))]


def screen_nonfinite(
    param_groups: Sequence[dict[str, Any]], policy: str, kind_key: str | None = None
) -> list[tuple[Tensor, Tensor]]:
    """The one raise/skip policy (Muon, the hybrid, plain torch optimizers built by
    ``build_optimizer``): one :func:`nonfinite_indices` scan over every dense gradient.

    ``policy="raise"``: :class:`NonFiniteGradientError` naming each bad parameter (name,
    shape, group), before any weight or state changes. ``"skip"``: each bad parameter's
    ``grad`` is set to ``None`` for the step (torch optimizers then leave it, its state and
    its weight decay alone), counted in its group's ``"nonfinite_skips"`` list and warned
    about; returns the hidden ``(param, grad)`` pairs for :func:`restore_grads`.
    ``kind_key``: a group key (e.g. ``"optimizer"``) whose value the message names.
    """
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


def restore_grads(hidden: Sequence[tuple[Tensor, Tensor]]) -> None:
    """Put back the gradients :func:`screen_nonfinite` hid."""
    for p, grad in hidden:
        p.grad = grad


def skips_by_name(param_groups: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """``{parameter name: steps skipped}`` from the groups' ``"nonfinite_skips"`` lists."""
    out: dict[str, int] = {}
    for gi, g in enumerate(param_groups):
        for name, n in zip(_group_names(g, gi), g.get("nonfinite_skips", ()), strict=False):
            if n:
                out[name] = out.get(name, 0) + n
    return out


@contextmanager
def screened(optimizer: Any) -> Iterator[None]:
    """Mark ``optimizer``'s gradients as already screened for the duration (the hybrid
    screens once for all its children: one scan, one host sync per step)."""
    optimizer._specopt_screened = True
    try:
        yield
    finally:
        optimizer._specopt_screened = False
