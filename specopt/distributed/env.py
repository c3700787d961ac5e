"""Rank and world helpers that are no-ops without an initialized process group.

Every function here answers as a single process would (rank 0, world size 1, main
process) when ``torch.distributed`` is unavailable or not initialized, so library code
calls them unconditionally instead of branching on "am I distributed?".
"""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed import ProcessGroup

__all__ = [
    "barrier",
    "get_rank",
    "get_world_size",
    "is_distributed",
    "is_main_process",
]


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
