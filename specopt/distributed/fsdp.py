"""Wrap a model for data parallel training: FSDP2 (``fully_shard``) or DDP.

``fully_shard`` rejects 0-D parameters, and the PC layer's learnable gain ``gamma`` is
one. :func:`fully_shard_model` keeps such parameters out of FSDP2 (``ignored_params``:
replicated plain tensors) and averages their gradients itself with an all-reduce hook
that fires when each one's gradient is accumulated, so every rank applies the same update
and they stay identical. Everything else is sharded on dim 0 as FSDP2 does.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from specopt.distributed.env import get_world_size, is_distributed

__all__ = ["ddp_model", "fully_shard_model"]


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
    import torch.distributed as dist

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
