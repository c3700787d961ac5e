"""``SpectralMonitorCallback`` for Lightning (``pip install 'specopt[lightning]'``).

::

    from specopt.integrations.lightning import SpectralMonitorCallback

    class LitModel(L.LightningModule):
        def configure_optimizers(self):
            return specopt.build_optimizer(self, "muon", lr=3e-3)

    L.Trainer(max_steps=1000, callbacks=[SpectralMonitorCallback(every=50)]).fit(...)

At ``on_fit_start`` the callback builds a :class:`specopt.SpectralMonitor` on the
LightningModule and, when it has PC layers (:func:`specopt.apply_pc`), attaches their
u/v refresh to every optimizer the Trainer steps. After each optimizer step (seen at
``on_train_batch_end`` as a new ``trainer.global_step``, so gradient accumulation is
safe) it steps the monitor with that global step and the batch's loss. Where it writes:
``log_dir`` if given; else the Trainer's ``TensorBoardLogger`` (the same event file as
Lightning's own metrics); else ``<default_root_dir>/spectral``. Works with the
``lightning`` and the ``pytorch_lightning`` package names.
"""

from __future__ import annotations

import os
from typing import Any

from specopt.integrations._common import MonitorSession, check_monitor_kwargs, missing_extra

try:
    from lightning.pytorch import Callback
    from lightning.pytorch.loggers import TensorBoardLogger
except ImportError:  # pragma: no cover - the older package name
    try:
        from pytorch_lightning import Callback
        from pytorch_lightning.loggers import TensorBoardLogger
    except ImportError as exc:
        raise missing_extra("lightning", "lightning", "specopt.integrations.lightning") from exc

__all__ = ["SpectralMonitorCallback"]


def _loss_of(outputs: Any) -> Any:
    if isinstance(outputs, dict):
        return outputs.get("loss")
    return outputs if hasattr(outputs, "detach") else None


def _logged_loss_tags(trainer: Any) -> tuple[str, ...]:
    """Names of the loss metrics logged so far (``self.log``), train ones first."""
    logged = [*getattr(trainer, "logged_metrics", {}), *getattr(trainer, "callback_metrics", {})]
    names = dict.fromkeys(k for k in logged if isinstance(k, str) and "loss" in k.lower())
    return tuple(sorted(names, key=lambda k: "train" not in k.lower()))  # stable: logged order


class SpectralMonitorCallback(Callback):
    """Spectral monitoring (and the PC refresh) for a Lightning ``Trainer.fit``.

    Args:
        every: snapshot cadence in optimizer steps. Default None: the monitor's default
            (every 50 steps, thinned to fit its 2% time budget); an explicit ``every`` is
            kept exactly unless ``budget=`` is passed too.
        log_dir: TensorBoard directory (default: the TensorBoardLogger's, see the module
            docstring).
        refresh_pc: attach the PC layers' u/v refresh to the Trainer's optimizers when the
            module has PC layers (default True; pass False if you attach it yourself).
        **monitor_kwargs: further :class:`specopt.SpectralMonitor` options. Without
            ``loss_tags`` the callback charts first (Custom Scalars) the metrics with
            ``loss`` in their name that the module has logged by the first optimizer step
            (``self.log("train_loss", ...)``), as the TensorBoardLogger names them.

    Attributes:
        monitor: the :class:`SpectralMonitor` of the current fit (None outside it).
        log_dir: the directory it writes to (set at ``on_fit_start``).
    """

    def __init__(self, *, every: int | None = None, log_dir: str | os.PathLike[str] | None = None,
                 refresh_pc: bool = True, **monitor_kwargs: Any) -> None:
        check_monitor_kwargs(every, log_dir, monitor_kwargs)
        self.every = every
        self.refresh_pc = bool(refresh_pc)
        self.monitor_kwargs = monitor_kwargs
        self._log_dir = None if log_dir is None else os.fspath(log_dir)
        self.log_dir: str | None = self._log_dir
        self._session: MonitorSession | None = None
        self._find_loss_tags = False

    @property
    def monitor(self) -> Any:
        return None if self._session is None else self._session.monitor

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self._session is not None:
            self._session.close()
        writer = None
        log_dir = self._log_dir
        if log_dir is None:
            tb = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
            if tb is not None:
                writer, log_dir = tb.experiment, tb.log_dir
                # The monitor writes to the logger's SummaryWriter (rank 0 only).
                if trainer.global_rank != 0:
                    writer = None
            else:
                log_dir = os.path.join(trainer.default_root_dir, "spectral")
        self.log_dir = log_dir
        self._find_loss_tags = "loss_tags" not in self.monitor_kwargs
        self._session = MonitorSession(
            pl_module, trainer.optimizers, start_step=int(trainer.global_step),
            log_dir=None if writer is not None else log_dir, writer=writer, every=self.every,
            refresh_pc=self.refresh_pc, monitor_kwargs=self.monitor_kwargs,
        )

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # global_step counts optimizer steps: it moves only on accumulation boundaries.
        session = self._session
        if session is None:
            return
        step = int(trainer.global_step)
        if self._find_loss_tags and step > session.last_step:
            # Before the monitor's first step, which writes the dashboard layout: the
            # loss names are known only once the module has logged them.
            session.monitor.loss_tags = _logged_loss_tags(trainer)
            self._find_loss_tags = False
        session.step(step, loss=_loss_of(outputs))

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.on_fit_end(trainer, pl_module)
