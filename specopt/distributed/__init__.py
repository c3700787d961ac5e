"""Distributed support: DDP and FSDP2 (DTensor) for Muon, the PC layer and the monitor.

* :mod:`~specopt.distributed.env`: rank/world helpers, no-ops without a process group.
* :mod:`~specopt.distributed.assignment`: NS cost model and balanced matrix-to-rank owners.
* :mod:`~specopt.distributed.dtensor`: FSDP2 row-shard layout, gather and re-shard.
* :mod:`~specopt.distributed.owners`: gather whole tensors to one owner each, compute there.
* :mod:`~specopt.distributed.spectra`: owner plan for the monitor's per-layer spectra.
* :mod:`~specopt.distributed.orthogonalize`: the distributed Newton-Schulz stage.
* :mod:`~specopt.distributed.fsdp`: FSDP2 / DDP wrapping (0-D PC gains handled).
* :mod:`~specopt.distributed.launch`: torchrun glue (init, wrap, grad clipping, rank-0 writer).
* :mod:`~specopt.distributed.checkpoint`: DCP save/load that resumes on another world size.
"""

from specopt.distributed.assignment import assign_by_cost, ns_flops, rank_loads
from specopt.distributed.checkpoint import load_distributed_checkpoint, save_distributed_checkpoint
from specopt.distributed.dtensor import (
    contiguous_stride,
    from_local_rows,
    full_tensor,
    is_dtensor,
    is_row_sharded,
    row_chunks,
    shard_like,
)
from specopt.distributed.env import (
    barrier,
    get_rank,
    get_world_size,
    is_distributed,
    is_main_process,
)
from specopt.distributed.fsdp import ddp_model, fully_shard_model
from specopt.distributed.launch import (
    NullWriter,
    broadcast_object,
    clip_grad_norm_,
    init_from_env,
    muon_mode,
    unwrap,
    wrap_model,
)
from specopt.distributed.orthogonalize import CommStats, orthogonalize_distributed
from specopt.distributed.owners import gather_rows_to_owners, map_on_owners
from specopt.distributed.spectra import OwnerPlan, svd_cost

__all__ = [
    "CommStats",
    "NullWriter",
    "OwnerPlan",
    "assign_by_cost",
    "barrier",
    "broadcast_object",
    "clip_grad_norm_",
    "contiguous_stride",
    "ddp_model",
    "from_local_rows",
    "full_tensor",
    "fully_shard_model",
    "gather_rows_to_owners",
    "get_rank",
    "get_world_size",
    "init_from_env",
    "is_distributed",
    "is_dtensor",
    "is_main_process",
    "is_row_sharded",
    "load_distributed_checkpoint",
    "map_on_owners",
    "muon_mode",
    "ns_flops",
    "orthogonalize_distributed",
    "rank_loads",
    "row_chunks",
    "save_distributed_checkpoint",
    "shard_like",
    "svd_cost",
    "unwrap",
    "wrap_model",
]
