"""Glue for training scripts launched by ``torchrun``: process group, wrapping, grad clipping.

Used by ``specopt train --ddp / --fsdp``; a user's own script can call the same pieces::

    from specopt.cli.launch import clip_grad_norm_, init_from_env, muon_mode, unwrap, wrap_model

    distributed = init_from_env()                 # reads torchrun's RANK, WORLD_SIZE, ...
    model = wrap_model(model, "fsdp")             # or "ddp"
    optimizer = build_optimizer(unwrap(model), "muon", distributed=muon_mode("fsdp"))
    ...
    clip_grad_norm_(model.parameters(), 1.0)      # DTensor and plain grads together

FSDP2 and the PC layer: ``fully_shard`` rejects 0-D parameters, and the PC layer's
learnable gain ``gamma`` is one. :func:`fully_shard_model` keeps such parameters out of
FSDP2 (``ignored_params``: replicated plain tensors) and averages their gradients itself
with an all-reduce hook that fires when each one's gradient is accumulated, so every rank
applies the same update and they stay identical. Everything else is sharded on dim 0 as
FSDP2 does.
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from specopt.distributed import (
    full_tensor,
    get_world_size,
    is_distributed,
    is_dtensor,
    is_main_process,
)

__all__ = [
    "MODES",
    "LossForward",
    "NullWriter",
    "broadcast_object",
    "clip_grad_norm_",
    "ddp_model",
    "fully_shard_model",
    "init_from_env",
    "muon_mode",
    "train_loss",
    "unwrap",
    "wrap_model",
]

#: Data-parallel modes of :func:`wrap_model`.
MODES = ("ddp", "fsdp")


def init_from_env(backend: str | None = None, timeout_s: float = 600.0) -> bool:
    """Initialize the default process group from torchrun's environment, if any.

    Reads ``WORLD_SIZE``/``RANK``/``MASTER_ADDR``/``MASTER_PORT`` (``env://``). Backend
    default: ``"nccl"`` when CUDA is available, else ``"gloo"`` (CPU).

    Returns:
        True when a process group is (now) initialized.

    Raises:
        RuntimeError: not launched by torchrun (no ``WORLD_SIZE``) and no group exists.
    """
    if is_distributed():
        return True
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise RuntimeError(
            "distributed training needs a launcher: run it with torchrun, e.g. "
            "`torchrun --nproc_per_node 2 -m specopt train --ddp` (WORLD_SIZE/RANK not set)"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


class LossForward(nn.Module):
    """``forward(tokens, targets) = model.loss(tokens, targets)``.

    DDP synchronizes gradients only for forwards through its wrapper, and a model's
    ``loss`` method is not its ``forward``: wrapping this module instead keeps the model's
    own loss (no copy of its formula) on the synchronized path.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, targets: Tensor) -> Tensor:
        return self.model.loss(tokens, targets)


def wrap_model(model: nn.Module, mode: str) -> nn.Module:
    """``"ddp"``: ``DistributedDataParallel(LossForward(model))``; ``"fsdp"``: FSDP2 per
    block (in place). Compute the training loss with :func:`train_loss`."""
    if mode == "ddp":
        return ddp_model(LossForward(model))
    if mode == "fsdp":
        return fully_shard_model(model)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP (and :class:`LossForward`); FSDP2 wraps in place."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model.model if isinstance(model, LossForward) else model


def train_loss(model: nn.Module, tokens: Tensor, targets: Tensor) -> Tensor:
    """``model.loss(tokens, targets)`` through the wrapper, so DDP syncs the gradients."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and isinstance(
        model.module, LossForward
    ):
        return model(tokens, targets)
    return model.loss(tokens, targets)


def muon_mode(mode: str | None) -> str:
    """``specopt.Muon(distributed=...)`` for a data-parallel mode (``None``: one process)."""
    return "ddp" if mode == "ddp" else "auto"


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[Tensor], max_norm: float) -> float:
    """Clip the global gradient 2-norm to ``max_norm``; returns the norm before clipping.

    Like ``torch.nn.utils.clip_grad_norm_``, but accepts FSDP2 DTensor gradients mixed
    with plain replicated ones (e.g. PC gains kept out of FSDP2), which torch's version
    cannot stack together: ``norm^2 = ||DTensor grads||^2 (all ranks' shards) +
    ||plain grads||^2`` (counted once). Collective when DTensors are present.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    sharded = [g for g in grads if is_dtensor(g)]
    plain = [g for g in grads if not is_dtensor(g)]
    total_sq = torch.zeros((), dtype=torch.float64)
    if sharded:
        norm = torch.nn.utils.get_total_norm(sharded, 2.0)
        norm = full_tensor(norm)
        total_sq += norm.double().cpu() ** 2
    if plain:
        total_sq += torch.nn.utils.get_total_norm(plain, 2.0).double().cpu() ** 2
    total = float(total_sq.sqrt())
    if math.isfinite(total) and max_norm < math.inf and total > max_norm:
        coef = max_norm / (total + 1e-6)
        for g in grads:
            g.mul_(coef)
    return total


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (identity without a process group)."""
    if not is_distributed() or get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class NullWriter:
    """Stands in for ``SummaryWriter`` on ranks other than 0: every call does nothing."""

    log_dir = None

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None

    @staticmethod
    def for_rank(make_writer: Any) -> Any:
        """``make_writer()`` on rank 0 (or a lone process), a :class:`NullWriter` elsewhere."""
        return make_writer() if is_main_process() else NullWriter()


# ---------------------------------------------------------------- FSDP2 / DDP wrapping


def _default_device_type(model: nn.Module) -> str:
    p = next(model.parameters(), None)
    return "cpu" if p is None else p.device.type


def fully_shard_model(
    model: nn.Module,
    *,
    mesh: DeviceMesh | None = None,
    block_attr: str = "layers",
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Apply FSDP2 to each block in ``model.<block_attr>`` and then to ``model``; in place.

    Args:
        model: the model (after ``apply_pc`` if PC is used), identical on every rank.
        mesh: 1-D device mesh (default: all ranks of the default group, on the params'
            device type).
        block_attr: name of the ``nn.ModuleList`` of blocks to shard one by one (each is
            gathered only around its own forward/backward); missing -> root only.
        reshard_after_forward: passed to ``fully_shard``.

    Returns:
        ``model`` (now an ``FSDPModule``): parameters are DTensors sharded on dim 0,
        except 0-D ones, which stay replicated with averaged gradients.

    Raises:
        RuntimeError: no initialized process group.
    """
    from torch.distributed.fsdp import fully_shard

    if not is_distributed():
        raise RuntimeError(
            "fully_shard_model needs an initialized process group "
            "(launch with torchrun and call torch.distributed.init_process_group)"
        )
    if mesh is None:
        mesh = init_device_mesh(_default_device_type(model), (get_world_size(),))
    scalars = {p for p in model.parameters() if p.ndim == 0}
    kwargs = dict(mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=scalars)
    blocks = getattr(model, block_attr, None)
    if isinstance(blocks, nn.ModuleList):
        for block in blocks:
            fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    group = mesh.get_group()
    for p in scalars:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(_make_grad_averager(group))
    return model


def _make_grad_averager(group):  # type: ignore[no-untyped-def]
    world = dist.get_world_size(group)

    def hook(param: nn.Parameter) -> None:
        # gloo has no ReduceOp.AVG: sum, then divide.
        assert param.grad is not None
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM, group=group)
        param.grad.div_(world)

    return hook


def ddp_model(model: nn.Module, **ddp_kwargs: object) -> nn.Module:
    """``DistributedDataParallel(model, **ddp_kwargs)``; needs a process group.

    With DDP every rank holds full replicated parameters; pass ``distributed="ddp"`` to
    ``specopt.Muon`` so the Newton-Schulz work is split across ranks.
    """
    from torch.nn.parallel import DistributedDataParallel

    if not is_distributed():
        raise RuntimeError("ddp_model needs an initialized process group")
    return DistributedDataParallel(model, **ddp_kwargs)  # type: ignore[arg-type]
