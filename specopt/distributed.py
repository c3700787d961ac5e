"""Distributed primitives shared by Muon, the PC layer and the monitor (no specopt imports).

One dependency-free module, so every subpackage may import it without cycles:

* rank / world helpers that answer as a single process would (rank 0, world size 1,
  main process) without an initialized process group, so library code calls them
  unconditionally instead of branching on "am I distributed?";
* DTensor helpers for FSDP2's layout (each parameter a DTensor with placement
  ``Shard(0)`` over a 1-D mesh: rank ``r`` holds rows ``[r*k, min((r+1)*k, n))`` of a
  tensor with ``n`` rows, ``k = ceil(n / world)``, ``torch.chunk`` semantics, so trailing
  ranks may hold fewer or zero rows);
* deterministic cost-balanced owner assignment (:func:`assign_by_cost`);
* :func:`gather_rows_to_owners`: whole row-sharded tensors to their owners in one
  ``all_to_all``.

``torch.distributed.tensor`` costs ~0.9 s to import, so it is imported only when a
DTensor can exist: :func:`is_dtensor` answers False while the module is not loaded (no
object can be an instance of a class that was never created), and the helpers that build
DTensors import it on first use. Users of FSDP2 have imported it already.

Where the rest of the former ``specopt.distributed`` package lives (see
docs/ARCHITECTURE.md): Muon's distributed Newton-Schulz stage in
:mod:`specopt.optim.distributed`, the monitor's owner plan in
:mod:`specopt.spectral.owners`, torchrun / FSDP2 / DDP glue in :mod:`specopt.cli.launch`
and DCP checkpoints in :mod:`specopt.cli.dcp`.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover - typing only; imported lazily at run time
    from torch.distributed import ProcessGroup
    from torch.distributed.tensor import DTensor

__all__ = [
    "assign_by_cost",
    "barrier",
    "contiguous_stride",
    "from_local_rows",
    "full_tensor",
    "gather_rows_to_owners",
    "get_rank",
    "get_world_size",
    "is_distributed",
    "is_dtensor",
    "is_main_process",
    "is_row_sharded",
    "rank_loads",
    "row_chunks",
    "shard_like",
    "to_local",
]

_DTENSOR_MODULE = "torch.distributed.tensor"

# ---------------------------------------------------------------- rank / world


def is_distributed() -> bool:
    """True when a default process group is initialized (any world size)."""
    return dist.is_available() and dist.is_initialized()


def get_rank(group: ProcessGroup | None = None) -> int:
    """This process's rank in ``group`` (default group); 0 without a process group."""
    return dist.get_rank(group) if is_distributed() else 0


def get_world_size(group: ProcessGroup | None = None) -> int:
    """Number of ranks in ``group`` (default group); 1 without a process group."""
    return dist.get_world_size(group) if is_distributed() else 1


def is_main_process(group: ProcessGroup | None = None) -> bool:
    """True on rank 0 of ``group`` and on a lone process: the one rank that writes files."""
    return get_rank(group) == 0


def barrier(group: ProcessGroup | None = None) -> None:
    """``dist.barrier`` when distributed with more than one rank; otherwise nothing."""
    if is_distributed() and get_world_size(group) > 1:
        dist.barrier(group)


# ---------------------------------------------------------------- DTensor (FSDP2)


def _dtensor_module() -> Any:
    import torch.distributed.tensor as dtensor_module  # ~0.9 s: only when building DTensors

    return dtensor_module


def is_dtensor(x: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (e.g. an FSDP2 parameter).

    Never imports ``torch.distributed.tensor``: while it is not loaded, no DTensor exists.
    """
    module = sys.modules.get(_DTENSOR_MODULE)
    cls = getattr(module, "DTensor", None)
    return cls is not None and isinstance(x, cls)


def to_local(x: Tensor) -> Tensor:
    """This rank's shard of a DTensor (``x.to_local()``); any other tensor as is."""
    return x.to_local() if is_dtensor(x) else x  # type: ignore[attr-defined]


def is_row_sharded(x: Tensor) -> bool:
    """True for a DTensor sharded on dim 0 over a 1-D mesh: FSDP2's layout."""
    if not is_dtensor(x):
        return False
    shard = _dtensor_module().Shard
    return (
        x.device_mesh.ndim == 1  # type: ignore[attr-defined]
        and len(x.placements) == 1  # type: ignore[attr-defined]
        and isinstance(x.placements[0], shard)  # type: ignore[attr-defined]
        and x.placements[0].dim == 0  # type: ignore[attr-defined]
    )


def row_chunks(n_rows: int, world_size: int) -> list[tuple[int, int]]:
    """``(offset, size)`` of each rank's rows under ``Shard(0)`` (``torch.chunk`` layout)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    k = -(-n_rows // world_size)  # ceil
    out = []
    for r in range(world_size):
        start = min(r * k, n_rows)
        out.append((start, min(start + k, n_rows) - start))
    return out


def full_tensor(x: Tensor) -> Tensor:
    """The whole tensor as a plain ``Tensor``: all-gathers a DTensor, returns others as is.

    Collective for DTensors: every rank of the mesh must call it for the same tensor.
    """
    return x.full_tensor() if is_dtensor(x) else x  # type: ignore[attr-defined]


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """Cut ``full`` (the same on every rank) into a DTensor with ``like``'s layout.

    No communication: each rank keeps its own piece. ``like`` must be a DTensor whose
    global shape equals ``full.shape``; a plain ``like`` returns ``full`` unchanged.
    """
    if not is_dtensor(like):
        return full
    if tuple(full.shape) != tuple(like.shape):
        raise ValueError(
            f"shard_like: full tensor shape {tuple(full.shape)} != "
            f"DTensor shape {tuple(like.shape)}"
        )
    dt = _dtensor_module()
    mesh = like.device_mesh  # type: ignore[attr-defined]
    replicated = dt.DTensor.from_local(
        full, mesh, [dt.Replicate()] * mesh.ndim, run_check=False, shape=full.shape,
        stride=full.stride(),
    )
    # Replicate -> Shard is a local slice: no collective.
    return replicated.redistribute(mesh, like.placements)  # type: ignore[attr-defined]


def contiguous_stride(shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
    """Row-major strides of a contiguous tensor of ``shape``."""
    stride, acc = [], 1
    for s in reversed(tuple(shape)):
        stride.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(stride))


def from_local_rows(local: Tensor, like: Tensor) -> Tensor:
    """Wrap this rank's rows ``local`` as a DTensor with ``like``'s mesh, placement, shape."""
    assert is_row_sharded(like)
    shape = like.shape
    stride = contiguous_stride(shape)
    return _dtensor_module().DTensor.from_local(
        local, like.device_mesh, like.placements, run_check=False,  # type: ignore[attr-defined]
        shape=shape, stride=stride,
    )


# ---------------------------------------------------------------- owner assignment
#
# Work that needs whole matrices (Newton-Schulz, SVD) runs once per matrix, on its
# *owner* rank. Owners balance the summed cost with the longest-processing-time-first
# greedy rule: sort by cost (largest first, ties by index) and give each item to the
# least-loaded rank (ties to the lowest rank). The result depends only on the costs and
# the world size, so every rank computes the same assignment locally without
# communicating; LPT's makespan is at most 4/3 of the optimum.


def assign_by_cost(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank of each item, balancing the summed ``costs`` over ``world_size`` ranks.

    Args:
        costs: non-negative cost of each item (e.g.
            :func:`specopt.optim.distributed.ns_flops` of its shape).
        world_size: number of ranks (>= 1).

    Returns:
        ``owners[i]`` in ``[0, world_size)`` for each item ``i``. Deterministic: the
        same inputs give the same owners on every process.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    for i, c in enumerate(costs):
        if not c >= 0:  # also rejects NaN
            raise ValueError(f"costs[{i}] must be a non-negative number, got {c}")
    owners = [0] * len(costs)
    if world_size == 1:
        return owners
    loads = [0.0] * world_size
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[i] = rank
        loads[rank] += costs[i]
    return owners


def rank_loads(costs: Sequence[float], owners: Sequence[int], world_size: int) -> list[float]:
    """Total cost per rank for an assignment (for reports and tests)."""
    loads = [0.0] * world_size
    for c, r in zip(costs, owners, strict=True):
        loads[r] += c
    return loads


def gather_rows_to_owners(
    mats: Sequence[DTensor],
    owners: Sequence[int],
    group: ProcessGroup,
    dtype: torch.dtype | None = None,
) -> tuple[dict[int, Tensor], list[int], list[int]]:
    """Gather row-sharded DTensors (one dtype) to their owners with one ``all_to_all``.

    Used by Muon's distributed Newton-Schulz stage and the monitor's owner plan.

    Args:
        mats: DTensors sharded on dim 0 over ``group`` (FSDP2 layout), all of one dtype.
        owners: owner rank of each tensor (the same list on every rank).
        group: the mesh's process group.
        dtype: send (and return) in this dtype (default: the tensors' own).

    Returns:
        ``({k: whole tensor k for k owned here}, input_splits, output_splits)``: the
        element counts this rank sent to / received from each rank (for a mirrored reply).
    Collective over ``group``.
    """
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    own_dtype = mats[0].dtype
    dtype = own_dtype if dtype is None else dtype
    device = mats[0].to_local().device
    rows = [m.shape[0] for m in mats]
    cols = [m.numel() // max(m.shape[0], 1) for m in mats]
    chunks = [row_chunks(r, world) for r in rows]
    mine = [k for k, o in enumerate(owners) if o == rank]
    send_parts: list[Tensor] = []
    in_splits = [0] * world
    for d in range(world):
        for k, o in enumerate(owners):
            if o == d:
                local = mats[k].to_local()
                assert local.shape[0] == chunks[k][rank][1], "unexpected shard layout"
                assert local.dtype == own_dtype, "one dtype per all_to_all"
                send_parts.append(local.reshape(-1).to(dtype))
                in_splits[d] += chunks[k][rank][1] * cols[k]
    out_splits = [sum(chunks[k][s][1] * cols[k] for k in mine) for s in range(world)]
    send = torch.cat(send_parts) if send_parts else torch.empty(0, dtype=dtype, device=device)
    recv = torch.empty(sum(out_splits), dtype=dtype, device=device)
    dist.all_to_all_single(recv, send, out_splits, in_splits, group=group)
    pieces: dict[int, list[Tensor]] = {k: [] for k in mine}
    offset = 0
    for s in range(world):
        for k in mine:
            size = chunks[k][s][1] * cols[k]
            pieces[k].append(recv[offset : offset + size])
            offset += size
    fulls = {k: torch.cat(pieces[k]).view(mats[k].shape) for k in mine}
    return fulls, in_splits, out_splits


# ---------------------------------------------------------------- moved names
#
# Names the former ``specopt.distributed`` package exported that now live elsewhere.
# Resolved on first access only (module ``__getattr__``), so importing this module still
# imports nothing from specopt; each access warns once with the new path.
_MOVED = {
    "CommStats": "specopt.optim.distributed",
    "orthogonalize_distributed": "specopt.optim.distributed",
    "ns_flops": "specopt.optim.distributed",
    "OwnerPlan": "specopt.spectral.owners",
    "svd_cost": "specopt.spectral.owners",
    "NullWriter": "specopt.cli.launch",
    "broadcast_object": "specopt.cli.launch",
    "clip_grad_norm_": "specopt.cli.launch",
    "ddp_model": "specopt.cli.launch",
    "fully_shard_model": "specopt.cli.launch",
    "init_from_env": "specopt.cli.launch",
    "muon_mode": "specopt.cli.launch",
    "unwrap": "specopt.cli.launch",
    "wrap_model": "specopt.cli.launch",
    "load_distributed_checkpoint": "specopt.cli.dcp",
    "save_distributed_checkpoint": "specopt.cli.dcp",
}


def __getattr__(name: str) -> Any:
    target = _MOVED.get(name)
    if target is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"specopt.distributed.{name} moved to {target}.{name}; import it from there "
        "(the old path will be removed)",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(target), name)
