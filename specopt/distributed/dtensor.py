"""Helpers for FSDP2 / DTensor parameters (sharded on dim 0 over a 1-D device mesh).

FSDP2 (``torch.distributed.fsdp.fully_shard``) stores each parameter as a DTensor with
placement ``Shard(0)``: rank ``r`` holds rows ``[r*k, min((r+1)*k, n))`` of a tensor with
``n`` rows, where ``k = ceil(n / world)`` (``torch.chunk`` semantics, so trailing ranks may
hold fewer or zero rows). These helpers compute that layout, gather full tensors and cut
full tensors back into local shards.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard

__all__ = [
    "contiguous_stride",
    "from_local_rows",
    "full_tensor",
    "is_dtensor",
    "is_row_sharded",
    "row_chunks",
    "shard_like",
]


def is_dtensor(x: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (e.g. an FSDP2 parameter)."""
    return isinstance(x, DTensor)


def is_row_sharded(x: Tensor) -> bool:
    """True for a DTensor sharded on dim 0 over a 1-D mesh: FSDP2's layout."""
    return (
        isinstance(x, DTensor)
        and x.device_mesh.ndim == 1
        and len(x.placements) == 1
        and isinstance(x.placements[0], Shard)
        and x.placements[0].dim == 0
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
    return x.full_tensor() if isinstance(x, DTensor) else x


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """Cut ``full`` (the same on every rank) into a DTensor with ``like``'s layout.

    No communication: each rank keeps its own piece. ``like`` must be a DTensor whose
    global shape equals ``full.shape``; a plain ``like`` returns ``full`` unchanged.
    """
    if not isinstance(like, DTensor):
        return full
    if tuple(full.shape) != tuple(like.shape):
        raise ValueError(
            f"shard_like: full tensor shape {tuple(full.shape)} != "
            f"DTensor shape {tuple(like.shape)}"
        )
    mesh = like.device_mesh
    replicated = DTensor.from_local(
        full, mesh, [Replicate()] * mesh.ndim, run_check=False, shape=full.shape,
        stride=full.stride(),
    )
    # Replicate -> Shard is a local slice: no collective.
    return replicated.redistribute(mesh, like.placements)


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
    return DTensor.from_local(
        local, like.device_mesh, like.placements, run_check=False, shape=shape, stride=stride
    )
