"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), resumable on any world size.

Model and optimizer state (Muon momenta, AdamW moments, PC buffers, the combined
optimizer of ``build_optimizer``) go through
``torch.distributed.checkpoint.state_dict.get_state_dict`` / ``set_state_dict``, which key
everything by parameter FQN and keep FSDP2 DTensors sharded; ``dcp.save`` then writes each
rank's shards in parallel. ``dcp.load`` reshards on read, so a checkpoint written by 2
FSDP2 ranks loads into 1 plain process (or DDP, or another FSDP2 size) unchanged.

Layout of a checkpoint directory ``path``: DCP's ``.metadata`` and ``__*_*.distcp`` shard
files, plus ``specopt_extra.pt`` (small picklable extras such as the step, written by rank
0). The directory is written under a temporary name and renamed into place only when all
ranks finished, so a crash never leaves a half-written checkpoint at ``path``.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from specopt.distributed import barrier, is_distributed, is_main_process

__all__ = ["load_distributed_checkpoint", "save_distributed_checkpoint"]

_EXTRA_FILE = "specopt_extra.pt"


def save_distributed_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save model (and optimizer) state to directory ``path`` with DCP; collective.

    Args:
        path: checkpoint directory (replaced if it exists). Must be visible to all ranks.
        model: the (possibly DDP- or FSDP2-wrapped) model.
        optimizer: its optimizer (specopt.Muon, build_optimizer's, or any torch optimizer).
        extra: small extras saved by rank 0 with ``torch.save`` (tensors, numbers,
            strings, containers of them), returned by :func:`load_distributed_checkpoint`.

    Returns:
        ``Path(path)``. Every rank must call this with the same ``path``.
    """
    # torch.distributed.checkpoint costs ~0.2 s to import: only when a checkpoint is saved.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    final = Path(path)
    tmp = final.with_name(f".{final.name}.partial")
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
        tmp.mkdir(parents=True)
    barrier()
    if optimizer is None:
        state: dict[str, Any] = {"model": get_model_state_dict(model)}
    else:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
    dcp.save(state, checkpoint_id=str(tmp), no_dist=not is_distributed())
    if is_main_process():
        torch.save(dict(extra or {}), tmp / _EXTRA_FILE)
        _fsync_dir(tmp)
        old = final.with_name(f".{final.name}.old")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(final.parent)
    barrier()
    return final


def load_distributed_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_distributed_checkpoint` into ``model``
    (and ``optimizer``), resharding to the current world size; collective.

    Works with no process group at all (a plain single process). An optimizer without
    state is initialized first by torch's ``get_state_dict`` (one ``step`` with zero
    grads and lr 0, so parameters do not move; post-step hooks run once), then
    overwritten.

    Returns:
        The ``extra`` dict saved with the checkpoint.

    Raises:
        FileNotFoundError: ``path`` is not a complete checkpoint.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(
            f"{path} is not a distributed checkpoint (no .metadata file); "
            "was it written by save_distributed_checkpoint?"
        )
    if optimizer is None:
        state: dict[str, Any] = {"model": get_model_state_dict(model)}
    else:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
    with warnings.catch_warnings():
        # Loading in one process is intended here; DCP warns about it regardless.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path), no_dist=not is_distributed())
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
    extra_file = path / _EXTRA_FILE
    return torch.load(extra_file, weights_only=True) if extra_file.is_file() else {}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
