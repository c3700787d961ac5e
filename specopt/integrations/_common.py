"""What the Trainer and Lightning callbacks share: one monitor session per fit."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from specopt.hooks import AttachHandle
from specopt.pc import PCHandle
from specopt.spectral.monitor import SpectralMonitor

__all__ = ["MonitorSession", "check_monitor_kwargs", "inner_optimizer", "missing_extra"]

#: SpectralMonitor arguments the callbacks set themselves.
_MANAGED = ("log_dir", "writer", "every", "start_step")


def missing_extra(package: str, extra: str, module: str) -> ImportError:
    """The error for an integration whose optional dependency is not installed."""
    return ImportError(
        f"{module} needs the optional dependency {package!r}, which is not installed: "
        f"pip install 'specopt[{extra}]' (or pip install {package})"
    )


def check_monitor_kwargs(every: int | None, log_dir: Any, monitor_kwargs: dict[str, Any]
                         ) -> None:
    """Validate the callback's arguments at construction (before any training runs)."""
    clash = sorted(set(_MANAGED) & set(monitor_kwargs))
    if clash:
        raise TypeError(f"SpectralMonitorCallback sets {clash} itself; pass every= and "
                        "log_dir= to the callback instead")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int)
                              or every < 1):
        raise ValueError(f"every must be an int >= 1 or None, got {every!r}")
    if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
        raise TypeError(f"log_dir must be a path or None, got {type(log_dir).__name__}")
    import inspect

    allowed = set(inspect.signature(SpectralMonitor.__init__).parameters) - {"self", "model"}
    unknown = sorted(set(monitor_kwargs) - allowed)
    if unknown:
        raise TypeError(f"unknown SpectralMonitor options {unknown}; expected some of "
                        f"{sorted(allowed - set(_MANAGED))}")


def inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under trainer wrappers (accelerate's ``AcceleratedOptimizer``,
    Lightning's ``LightningOptimizer``): its step hooks fire exactly when weights move
    (an AMP step skipped for overflow does not call it)."""
    seen = 0
    while not _is_plain(optimizer) and seen < 8:
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None:
            break
        optimizer, seen = inner, seen + 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer (or a trainer's wrapper of one), "
                        f"got {type(optimizer).__name__}")
    return optimizer


def _is_plain(optimizer: Any) -> bool:
    # Wrappers subclass torch's Optimizer too (AcceleratedOptimizer) but hold the real one.
    inner = getattr(optimizer, "optimizer", None)
    return isinstance(optimizer, torch.optim.Optimizer) and not isinstance(
        inner, torch.optim.Optimizer)


class MonitorSession:
    """One fit: a :class:`SpectralMonitor` on ``model`` plus the PC refresh hooks.

    Args:
        model: the (unwrapped) model being trained.
        optimizers: the optimizers the trainer steps (wrappers are unwrapped).
        start_step: the trainer's global step when training starts (resume).
        log_dir, writer: where the monitor writes (one of them).
        every: snapshot cadence in optimizer steps; None: the monitor's default cadence,
            thinned to fit its time budget (an explicit ``every`` is kept exactly).
        refresh_pc: attach the PC u/v refresh when the model has PC layers.
        monitor_kwargs: further :class:`SpectralMonitor` options.
    """

    def __init__(self, model: nn.Module, optimizers: Iterable[Any], *, start_step: int,
                 log_dir: str | os.PathLike[str] | None, writer: Any, every: int | None,
                 refresh_pc: bool, monitor_kwargs: dict[str, Any]) -> None:
        self.pc: PCHandle | None = None
        self.pc_hooks: list[AttachHandle] = []
        if refresh_pc:
            pc = PCHandle.from_model(model)
            if len(pc):
                self.pc = pc
                self.pc_hooks = [pc.attach(inner_optimizer(o)) for o in optimizers]
        try:
            self.monitor = SpectralMonitor(model, log_dir=log_dir, writer=writer, every=every,
                                           start_step=start_step, **monitor_kwargs)
        except Exception:
            self.remove_hooks()
            raise
        self.last_step = start_step

    def step(self, global_step: int, loss: Any = None) -> None:
        """Monitor the optimizer step that brought the trainer to ``global_step`` (once
        per step: repeated calls with the same step do nothing)."""
        if global_step <= self.last_step:
            return
        self.last_step = global_step
        self.monitor.step(global_step=global_step, loss=loss)

    def remove_hooks(self) -> None:
        for h in self.pc_hooks:
            h.remove()
        self.pc_hooks = []

    def close(self) -> None:
        """Remove the PC hooks and close the monitor (flushes its writer)."""
        self.remove_hooks()
        self.monitor.close()
