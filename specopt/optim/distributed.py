"""Distributed Newton-Schulz stage: each matrix is orthogonalized on exactly one rank.

Muon's step is (1) momentum per parameter (elementwise, works on DTensor shards as is),
(2) the list of matrices to orthogonalize, (3) orthogonalization, (4) the update. Only (3)
needs whole matrices. :func:`orthogonalize_distributed` replaces (3) for a process group:

* **FSDP2 / DTensor, rows sharded** (``Shard(0)`` on a 1-D mesh). Owners are chosen by
  :func:`~specopt.distributed.assign_by_cost`. One ``all_to_all`` sends every
  rank's shard of matrix ``k`` to its owner, the owner orthogonalizes its whole matrices
  (batched by the given function), and a second ``all_to_all`` returns to each rank its
  rows of every result, as a DTensor with the input's layout. Per step each rank sends and
  receives about ``2 (W-1)/W * sum(numel)/W`` elements, against ``(W-1)/W * sum(numel)``
  received by the naive way (all-gather everything, every rank repeats all NS work): the
  same at W = 2, W/2 times less beyond. Momentum stays sharded throughout.
* **Replicated** (DDP: plain tensors, identical on every rank; opt in with
  ``replicated=True``). Each rank orthogonalizes the matrices it owns and one
  ``all_gather_single`` of the packed results gives every rank all updates.
* **Local**: no process group, world size 1, or plain tensors without ``replicated``:
  the function is called once on all matrices; single-process results are unchanged.

Other DTensor layouts fall back to all-gathering on every rank (correct, not fast).
Results are cast to each input's dtype (an fp32 copy of a bf16 NS output is exact), and
``comm_dtype`` moves data in the NS dtype (bf16: half the bytes, no loss, since NS rounds
its input to that dtype first). The owner's output for a matrix is bit-identical to what
one process computes from the same input, so a distributed run equals a single-process run
whose gradients are reduced the same way (tests/test_distributed.py checks this exactly).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from specopt.distributed import (
    assign_by_cost,
    from_local_rows,
    full_tensor,
    gather_rows_to_owners,
    get_rank,
    get_world_size,
    is_distributed,
    is_dtensor,
    is_row_sharded,
    row_chunks,
    shard_like,
    to_local,
)
from specopt.optim.newton_schulz import ns_matmul_flops

if TYPE_CHECKING:  # pragma: no cover - typing only; DTensor is imported lazily
    from torch.distributed import ProcessGroup
    from torch.distributed.tensor import DTensor

__all__ = ["DEFAULT_NS_STEPS", "CommStats", "ns_flops", "orthogonalize_distributed"]

#: ``orthogonalize(list_of_full_matrices) -> list_of_results`` (same shapes, same order).
OrthogonalizeFn = Callable[[list[Tensor]], list[Tensor]]

#: NS steps assumed by the cost model when the caller does not say (torch's default).
DEFAULT_NS_STEPS = 5


def ns_flops(shape: Sequence[int], steps: int = DEFAULT_NS_STEPS, method: str = "standard") -> int:
    """NS cost model for owner balancing: matmul FLOPs of ``steps`` iterations on ``shape``.

    Delegates to :func:`specopt.optim.newton_schulz.ns_matmul_flops` (the standard
    iteration on ``X`` of ``r x c``, ``r <= c``, costs ``steps * (4 r^2 c + 2 r^3)``).
    An N-D shape counts as Muon reshapes it, ``(shape[0], prod(shape[1:]))``; a shape
    with fewer than 2 dims costs its element count.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        n = 1
        for s in shape:
            n *= s
        return n
    cols = 1
    for s in shape[1:]:
        cols *= s
    return ns_matmul_flops((shape[0], cols), steps, method)


@dataclass
class CommStats:
    """Running counters of the distributed NS stage on this rank (payload bytes only).

    Attributes:
        steps: calls of :func:`orthogonalize_distributed` that communicated.
        bytes_sent, bytes_received: payload bytes exchanged with *other* ranks.
        collectives: collective calls issued.
        matrices_local: matrices orthogonalized on this rank.
        matrices_total: matrices handled (on all ranks together).
        per_rank_flops: NS cost model FLOPs assigned to each rank in the last call.
    """

    steps: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    collectives: int = 0
    matrices_local: int = 0
    matrices_total: int = 0
    per_rank_flops: list[float] = field(default_factory=list)

    def reset(self) -> None:
        """Zero all counters."""
        self.__init__()  # type: ignore[misc]


def _call(orthogonalize: OrthogonalizeFn, mats: list[Tensor]) -> list[Tensor]:
    if not mats:
        return []
    out = list(orthogonalize(mats))
    assert len(out) == len(mats), "orthogonalize must return one result per input"
    return out


def orthogonalize_distributed(
    matrices: Sequence[Tensor],
    orthogonalize: OrthogonalizeFn,
    *,
    replicated: bool = False,
    group: ProcessGroup | None = None,
    split: bool = True,
    costs: Sequence[float] | None = None,
    stats: CommStats | None = None,
    comm_dtype: torch.dtype | None = None,
) -> list[Tensor]:
    """Orthogonalize ``matrices`` with the NS work split across ranks.

    Args:
        matrices: tensors to orthogonalize (momentum-applied updates). Row-sharded
            DTensors (FSDP2) are gathered to one owner each; plain tensors are treated as
            replicated when ``replicated`` is true, else handled locally.
        orthogonalize: function mapping a list of *whole* plain matrices to their
            orthogonalized versions (it may batch same-shaped inputs).
        replicated: plain tensors hold the same values on every rank of ``group`` (DDP);
            split their NS work and all-gather the results.
        group: process group for plain replicated tensors (default group); DTensors use
            their own mesh's group.
        split: ``False`` selects the naive baseline (every rank gathers and
            orthogonalizes every matrix), kept for benchmarks.
        costs: per-matrix cost for load balancing (default :func:`ns_flops` of the shape).
        stats: counters updated in place (bytes, collectives, matrices per rank).
        comm_dtype: move matrices and results in this dtype (default: each input's). Pass
            the dtype ``orthogonalize`` computes in when it starts by rounding its input to
            it (as Newton-Schulz in bf16 does): then nothing is lost and bf16 halves the
            bytes of fp32 parameters.

    Returns:
        One result per input, in order, with the input's type, layout and dtype (a
        DTensor input gives a DTensor with the same placements holding this rank's rows).

    Collective: every rank of the group must call it with the same shapes in the same
    order.
    """
    n = len(matrices)
    if costs is None:
        costs = [float(ns_flops(m.shape)) for m in matrices]
    results: list[Tensor | None] = [None] * n
    local_idx: list[int] = []
    sharded: dict[int, list[int]] = {}  # id(process group) -> indices
    groups: dict[int, ProcessGroup] = {}
    replicated_idx: list[int] = []
    fallback_idx: list[int] = []
    for i, m in enumerate(matrices):
        if is_dtensor(m):
            if is_row_sharded(m) and m.device_mesh.size() > 1:
                pg = m.device_mesh.get_group()
                sharded.setdefault(id(pg), []).append(i)
                groups[id(pg)] = pg
            elif m.device_mesh.size() > 1:
                fallback_idx.append(i)
            else:
                local_idx.append(i)
        elif replicated and is_distributed() and get_world_size(group) > 1:
            replicated_idx.append(i)
        else:
            local_idx.append(i)

    if local_idx:
        mats = [to_local(matrices[i]) for i in local_idx]
        for i, o in zip(local_idx, _call(orthogonalize, mats), strict=True):
            results[i] = _like(o, matrices[i])
    for key, idx in sharded.items():
        _sharded(matrices, idx, orthogonalize, groups[key], split, costs, stats, results,
                 comm_dtype)
    if replicated_idx:
        _replicated(matrices, replicated_idx, orthogonalize, group, split, costs, stats, results,
                    comm_dtype)
    if fallback_idx:
        # Uncommon layouts: gather everywhere, compute everywhere, keep own piece.
        fulls = [full_tensor(matrices[i]) for i in fallback_idx]
        for i, o in zip(fallback_idx, _call(orthogonalize, fulls), strict=True):
            m = matrices[i]
            assert is_dtensor(m)
            results[i] = _shard_full(o.to(m.dtype), m)
    if stats is not None and (sharded or replicated_idx or fallback_idx):
        stats.steps += 1
        stats.matrices_total += n
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def _like(out: Tensor, m: Tensor) -> Tensor:
    out = out.to(m.dtype)
    if is_dtensor(m):  # world-size-1 mesh: local == full
        from torch.distributed.tensor import DTensor  # loaded: m is one

        return DTensor.from_local(out, m.device_mesh, m.placements, run_check=False)
    return out


def _shard_full(full: Tensor, like: DTensor) -> Tensor:
    return shard_like(full.contiguous(), like)


def _sharded(
    matrices: Sequence[Tensor],
    idx: list[int],
    orthogonalize: OrthogonalizeFn,
    pg: ProcessGroup,
    split: bool,
    costs: Sequence[float],
    stats: CommStats | None,
    results: list[Tensor | None],
    comm_dtype: torch.dtype | None = None,
) -> None:
    world = dist.get_world_size(pg)
    rank = dist.get_rank(pg)
    if not split:
        fulls = [full_tensor(matrices[i]) for i in idx]
        if stats is not None:
            for i in idx:
                m = matrices[i]
                own = m.to_local().numel() * m.element_size()
                stats.bytes_sent += own * (world - 1)
                stats.bytes_received += m.numel() * m.element_size() - own
                stats.collectives += 1
            stats.matrices_local += len(idx)
            stats.per_rank_flops = [float(sum(costs[i] for i in idx))] * world
        for i, o in zip(idx, _call(orthogonalize, fulls), strict=True):
            results[i] = _shard_full(o.to(matrices[i].dtype), matrices[i])  # type: ignore[arg-type]
        return

    # Bucket by dtype so each all_to_all moves one dtype.
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i in idx:
        by_dtype.setdefault(matrices[i].dtype, []).append(i)
    for dtype, ids in by_dtype.items():
        owners = assign_by_cost([costs[i] for i in ids], world)
        mats = [matrices[i] for i in ids]
        rows = [m.shape[0] for m in mats]
        cols = [m.numel() // max(m.shape[0], 1) for m in mats]
        chunks = [row_chunks(r, world) for r in rows]
        device = mats[0].to_local().device
        mine = [k for k, o in enumerate(owners) if o == rank]

        # Phase A: each rank's rows of matrix k go to owners[k].
        wire = dtype if comm_dtype is None else comm_dtype
        gathered, in_splits, out_splits = gather_rows_to_owners(mats, owners, pg, wire)
        fulls = [gathered[k] for k in mine]
        outs = [o.to(wire) for o in _call(orthogonalize, fulls)]

        # Phase B: the owner returns to each rank its rows of every result.
        back_parts: list[Tensor] = []
        for d in range(world):
            for j, k in enumerate(mine):
                off, size = chunks[k][d]
                back_parts.append(outs[j].reshape(rows[k], cols[k])[off : off + size].reshape(-1))
        send_b = torch.cat(back_parts) if back_parts else torch.empty(0, dtype=wire, device=device)
        recv_b = torch.empty(sum(in_splits), dtype=wire, device=device)
        dist.all_to_all_single(recv_b, send_b, in_splits, out_splits, group=pg)

        offset = 0
        for s in range(world):
            for k, o in enumerate(owners):
                if o == s:
                    size = chunks[k][rank][1] * cols[k]
                    local = recv_b[offset : offset + size]
                    local = local.view(chunks[k][rank][1], *mats[k].shape[1:]).to(dtype)
                    results[ids[k]] = from_local_rows(local, mats[k])
                    offset += size

        if stats is not None:
            item = torch.empty(0, dtype=wire).element_size()
            sent = sum(in_splits) - in_splits[rank] + sum(out_splits) - out_splits[rank]
            stats.bytes_sent += sent * item
            stats.bytes_received += sent * item  # phase B mirrors phase A
            stats.collectives += 2
            stats.matrices_local += len(mine)
            loads = [0.0] * world
            for k, o in enumerate(owners):
                loads[o] += costs[ids[k]]
            stats.per_rank_flops = loads


def _replicated(
    matrices: Sequence[Tensor],
    idx: list[int],
    orthogonalize: OrthogonalizeFn,
    group: ProcessGroup | None,
    split: bool,
    costs: Sequence[float],
    stats: CommStats | None,
    results: list[Tensor | None],
    comm_dtype: torch.dtype | None = None,
) -> None:
    if not split:
        # Naive baseline: every rank repeats every NS; no communication.
        outs = _call(orthogonalize, [matrices[i] for i in idx])
        for i, o in zip(idx, outs, strict=True):
            results[i] = o.to(matrices[i].dtype)
        if stats is not None:
            stats.matrices_local += len(idx)
        return
    world = get_world_size(group)
    rank = get_rank(group)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i in idx:
        by_dtype.setdefault(matrices[i].dtype, []).append(i)
    for dtype, ids in by_dtype.items():
        owners = assign_by_cost([costs[i] for i in ids], world)
        mats = [matrices[i] for i in ids]
        mine = [k for k, o in enumerate(owners) if o == rank]
        wire = dtype if comm_dtype is None else comm_dtype
        outs = [o.to(wire) for o in _call(orthogonalize, [mats[k] for k in mine])]
        lengths = [0] * world
        for k, o in enumerate(owners):
            lengths[o] += mats[k].numel()
        width = max(lengths)
        device = mats[0].device
        send = torch.zeros(width, dtype=wire, device=device)
        if outs:
            packed = torch.cat([o.reshape(-1) for o in outs])
            send[: packed.numel()] = packed
        recv = torch.empty(world * width, dtype=wire, device=device)
        dist.all_gather_single(recv, send, group=group)
        for s in range(world):
            offset = s * width
            for k, o in enumerate(owners):
                if o == s:
                    size = mats[k].numel()
                    results[ids[k]] = recv[offset : offset + size].view(mats[k].shape).to(dtype)
                    offset += size
        if stats is not None:
            item = torch.empty(0, dtype=wire).element_size()
            stats.bytes_sent += lengths[rank] * (world - 1) * item
            stats.bytes_received += (sum(lengths) - lengths[rank]) * item
            stats.collectives += 1
            stats.matrices_local += len(mine)
            loads = [0.0] * world
            for k, o in enumerate(owners):
                loads[o] += costs[ids[k]]
            stats.per_rank_flops = loads
