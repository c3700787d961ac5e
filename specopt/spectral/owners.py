"""Owner plan for named matrices: which rank computes the spectrum of which layer.

The spectral monitor under DDP / FSDP2 computes each matrix's spectrum once, on one
rank, and sends only the small results to rank 0, which alone writes. Ranks may hold
different plain matrices (e.g. pipeline stages): the plan is agreed once at construction
by one ``all_gather_object`` of every rank's ``(name, shape, sharded)`` list, so every rank
knows every owner without further talk, and a rank only ever computes matrices it holds:

* FSDP2 matrices (DTensors sharded on dim 0, held by every rank): any rank may own one;
  its rows travel to the owner in one ``all_to_all`` (:func:`gather_rows_to_owners`).
* plain matrices: owned by one of the ranks that hold them (all ranks under DDP, so the
  work is split; a single rank for a layer only it has), no communication.

Owners are balanced by SVD cost ``m n min(m, n)`` with the LPT rule. Every collective here
(``gather``, ``to_main``, ``broadcast``) must be called by all ranks at the same steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from specopt.distributed import (
    gather_rows_to_owners,
    get_rank,
    get_world_size,
    is_dtensor,
    is_row_sharded,
)

__all__ = ["OwnerPlan", "svd_cost"]


def svd_cost(shape: Sequence[int]) -> float:
    """SVD cost model ``m n min(m, n)`` of a matrix viewed as ``(shape[0], -1)``."""
    m = int(shape[0])
    n = 1
    for s in shape[1:]:
        n *= int(s)
    return float(m * n * min(m, n))


class OwnerPlan:
    """Owner rank of every named matrix across the job (collective to build).

    Args:
        entries: ``(name, tensor)`` for the matrices this rank holds, in a deterministic
            order. DTensors must be row-sharded (FSDP2) and held by every rank.

    Attributes:
        owner: ``{name: rank}`` for every matrix of every rank.
        keys: all names, in plan order (rank 0's order, then names new on rank 1, ...).
        rank, world_size: this process's rank and the job size.
    """

    def __init__(self, entries: Sequence[tuple[str, Tensor]]) -> None:
        self.rank = get_rank()
        self.world_size = get_world_size()
        local = []
        for name, t in entries:
            sharded = is_dtensor(t)
            if sharded and not is_row_sharded(t):
                raise ValueError(
                    f"matrix {name!r}: only DTensors sharded on dim 0 (FSDP2) are supported, "
                    f"got placements {t.placements}"
                )
            local.append((name, tuple(t.shape), sharded))
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, local)
        holders: dict[str, list[int]] = {}
        info: dict[str, tuple[tuple[int, ...], bool]] = {}
        for r, items in enumerate(everyone):
            for name, shape, sharded in items:
                holders.setdefault(name, []).append(r)
                info.setdefault(name, (shape, sharded))
        self.keys = list(holders)
        self._sharded = [k for k in self.keys if info[k][1]]
        for k in self._sharded:
            if holders[k] != list(range(self.world_size)):
                raise ValueError(
                    f"sharded matrix {k!r} is held by ranks {holders[k]}, not by all "
                    f"{self.world_size} ranks of the job"
                )
        loads = [0.0] * self.world_size
        self.owner: dict[str, int] = {}
        order = sorted(self.keys, key=lambda k: (-svd_cost(info[k][0]), self.keys.index(k)))
        for k in order:
            r = min(holders[k], key=lambda r: (loads[r], r))
            self.owner[k] = r
            loads[r] += svd_cost(info[k][0])

    def mine(self) -> list[str]:
        """Names this rank computes, in plan order."""
        return [k for k in self.keys if self.owner[k] == self.rank]

    def gather(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Whole tensors for the names this rank owns (collective when any is sharded).

        ``tensors`` maps names to this rank's tensors; it must hold every sharded name of
        the plan (they are gathered with one ``all_to_all`` per dtype) and may hold plain
        ones (passed through if owned here). Names absent from ``tensors`` are skipped.
        """
        out: dict[str, Tensor] = {
            k: t for k, t in tensors.items()
            if not is_dtensor(t) and self.owner.get(k) == self.rank
        }
        sharded = [k for k in self._sharded if k in tensors]
        if sharded:
            group = tensors[sharded[0]].device_mesh.get_group()  # type: ignore[union-attr]
            by_dtype: dict[torch.dtype, list[str]] = {}
            for k in sharded:
                by_dtype.setdefault(tensors[k].dtype, []).append(k)
            for keys in by_dtype.values():
                got, _, _ = gather_rows_to_owners(
                    [tensors[k] for k in keys],  # type: ignore[misc]
                    [self.owner[k] for k in keys],
                    group,
                )
                out.update({keys[i]: v for i, v in got.items()})
        return out

    def to_main(self, payload: Any) -> list[Any] | None:
        """Every rank's ``payload`` on rank 0 (list by rank); None elsewhere. Collective."""
        gathered: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(payload, gathered, dst=0)
        return gathered

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank. Collective."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
