"""Finding non-finite gradients cheaply: the one check shared by Muon and the hybrid."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from specopt.distributed import is_dtensor, to_local

__all__ = ["NonFiniteGradientError", "nonfinite_indices"]


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
