"""Owner-computes helpers: gather whole tensors to one owner rank each, compute there.

Used by the distributed Newton-Schulz stage (:mod:`specopt.distributed.orthogonalize`) and
by the spectral monitor: work that needs whole matrices (NS, SVD) runs once per matrix, on
its owner, with owners balanced by cost (:func:`~specopt.distributed.assignment.assign_by_cost`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.distributed.tensor import DTensor

from specopt.distributed.assignment import assign_by_cost, ns_flops
from specopt.distributed.dtensor import is_row_sharded, row_chunks
from specopt.distributed.env import get_rank, get_world_size, is_distributed

__all__ = ["gather_rows_to_owners", "map_on_owners"]


def gather_rows_to_owners(
    mats: Sequence[DTensor],
    owners: Sequence[int],
    group: ProcessGroup,
    dtype: torch.dtype | None = None,
) -> tuple[dict[int, Tensor], list[int], list[int]]:
    """Gather row-sharded DTensors (one dtype) to their owners with one ``all_to_all``.

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


def map_on_owners(
    tensors: Sequence[Tensor],
    fn: Callable[[list[int], list[Tensor]], list[Any]],
    *,
    costs: Sequence[float] | None = None,
    replicated: bool = False,
    group: ProcessGroup | None = None,
    dst: int = 0,
) -> list[Any] | None:
    """Compute ``fn`` on whole tensors, each tensor on exactly one rank; results to ``dst``.

    Args:
        tensors: row-sharded DTensors (FSDP2; gathered to their owner), or plain tensors
            that are identical on every rank when ``replicated`` (DDP; the owner uses its
            own copy, nothing is sent), or plain local tensors (no process group, or not
            ``replicated``: everything is computed here).
        fn: ``fn(indices, whole_tensors) -> results`` (one small picklable result per
            tensor, e.g. a CPU vector of singular values); called once per rank with the
            tensors it owns (possibly none).
        costs: per-tensor cost for balancing owners (default: NS FLOPs of the shape).
        replicated: plain tensors are replicated across ``group``.
        group: group of plain replicated tensors (DTensors use their mesh's group).
        dst: rank (in the group) that receives all results.

    Returns:
        On ``dst`` (and when not distributed): the results in input order. Elsewhere None.
        Collective when distributed: every rank calls it with the same shapes and order.
    """
    n = len(tensors)
    sharded = [isinstance(t, DTensor) for t in tensors]
    if any(sharded):
        meshes = {t.device_mesh for t in tensors if isinstance(t, DTensor)}
        if len(meshes) != 1 or not all(sharded):
            raise ValueError("map_on_owners: give DTensors on one mesh, or plain tensors only")
        if not all(is_row_sharded(t) for t in tensors):
            raise ValueError("map_on_owners: DTensors must be sharded on dim 0 (FSDP2 layout)")
        group = next(iter(meshes)).get_group()
    distributed = is_distributed() and get_world_size(group) > 1 and (any(sharded) or replicated)
    if not distributed:
        out = fn(list(range(n)), [t.to_local() if isinstance(t, DTensor) else t for t in tensors])
        return list(out)
    world, rank = get_world_size(group), get_rank(group)
    if costs is None:
        costs = [float(ns_flops(t.shape)) for t in tensors]
    owners = assign_by_cost(costs, world)
    mine = [i for i, o in enumerate(owners) if o == rank]
    fulls: dict[int, Tensor] = {}
    if any(sharded):
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            by_dtype.setdefault(t.dtype, []).append(i)
        for ids in by_dtype.values():
            got, _, _ = gather_rows_to_owners(
                [tensors[i] for i in ids], [owners[i] for i in ids], group  # type: ignore[misc]
            )
            fulls.update({ids[k]: v for k, v in got.items()})
    else:
        fulls = {i: tensors[i] for i in mine}
    results = list(fn(mine, [fulls[i] for i in mine])) if mine else []
    assert len(results) == len(mine), "fn must return one result per tensor"
    payload = dict(zip(mine, results, strict=True))
    gathered: list[Any] | None = [None] * world if rank == dst else None
    dst_global = dist.get_global_rank(group, dst) if group is not None else dst
    dist.gather_object(payload, gathered, dst=dst_global, group=group)
    if rank != dst:
        return None
    merged: dict[int, Any] = {}
    for part in gathered or []:
        merged.update(part)
    return [merged[i] for i in range(n)]
