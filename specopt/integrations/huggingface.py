"""``SpectralMonitorCallback`` for ``transformers.Trainer`` (``pip install 'specopt[hf]'``).

::

    from specopt.integrations.huggingface import SpectralMonitorCallback

    opt = specopt.build_optimizer(model, "muon", lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, sched),
                      callbacks=[SpectralMonitorCallback(every=50)])
    trainer.train()

At ``on_train_begin`` the callback builds a :class:`specopt.SpectralMonitor` on the
Trainer's model and, when the model has PC layers (:func:`specopt.apply_pc`), attaches
their u/v refresh to the optimizer the Trainer steps (the one under accelerate's wrapper).
After every optimizer step (``on_optimizer_step``) it steps the monitor with the Trainer's
global step, so spectral tags share the x-axis of the Trainer's own TensorBoard logs; the
loss the Trainer logs feeds the monitor's loss alarms. ``on_train_end`` closes it.

Log directory: ``log_dir`` if given, else ``args.logging_dir`` (transformers < 5), else
``$TENSORBOARD_LOGGING_DIR``, else ``<output_dir>/runs/spectral``.
"""

from __future__ import annotations

import os
from typing import Any

from specopt.integrations._common import MonitorSession, check_monitor_kwargs, missing_extra

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise missing_extra("transformers", "hf", "specopt.integrations.huggingface") from exc

__all__ = ["TRAINER_LOSS_TAGS", "SpectralMonitorCallback"]

#: The loss tags of transformers' ``TensorBoardCallback`` (it rewrites ``loss`` to
#: ``train/loss`` and ``eval_loss`` to ``eval/loss``): charted first by the monitor.
TRAINER_LOSS_TAGS: tuple[str, ...] = ("train/loss", "eval/loss")


class SpectralMonitorCallback(TrainerCallback):
    """Spectral monitoring (and the PC refresh) for a ``transformers.Trainer`` run.

    Args:
        every: snapshot cadence in optimizer steps. Default None: the monitor's default
            (every 50 steps, thinned to fit its 2% time budget); an explicit ``every`` is
            kept exactly unless ``budget=`` is passed too.
        log_dir: TensorBoard directory (default: the Trainer's, see the module docstring).
        refresh_pc: attach the PC layers' u/v refresh to the Trainer's optimizer when the
            model has PC layers (default True; pass False if you attach it yourself).
        **monitor_kwargs: further :class:`specopt.SpectralMonitor` options (``include``,
            ``exclude``, ``budget``, ``histograms``, ``alarms``, ``on_alarm``, ...).
            ``loss_tags`` defaults to :data:`TRAINER_LOSS_TAGS`, the tags the Trainer's
            TensorBoard logging writes, so the Custom Scalars dashboard opens on the loss.

    Attributes:
        monitor: the :class:`SpectralMonitor` of the current run (None outside training).
        log_dir: the directory it writes to (set at ``on_train_begin``).
    """

    def __init__(self, *, every: int | None = None, log_dir: str | os.PathLike[str] | None = None,
                 refresh_pc: bool = True, **monitor_kwargs: Any) -> None:
        check_monitor_kwargs(every, log_dir, monitor_kwargs)
        self.every = every
        self.refresh_pc = bool(refresh_pc)
        self.monitor_kwargs = {"loss_tags": TRAINER_LOSS_TAGS, **monitor_kwargs}
        self._log_dir = None if log_dir is None else os.fspath(log_dir)
        self.log_dir: str | None = self._log_dir
        self._session: MonitorSession | None = None

    @property
    def monitor(self) -> Any:
        return None if self._session is None else self._session.monitor

    def _resolve_log_dir(self, args: Any) -> str:
        if self._log_dir is not None:
            return self._log_dir
        for candidate in (getattr(args, "logging_dir", None),
                          os.environ.get("TENSORBOARD_LOGGING_DIR")):
            if candidate:
                return os.path.expanduser(os.fspath(candidate))
        return os.path.join(getattr(args, "output_dir", None) or ".", "runs", "spectral")

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        if model is None or optimizer is None:
            raise RuntimeError("SpectralMonitorCallback.on_train_begin needs the Trainer's "
                               "model and optimizer (transformers passes both)")
        if self._session is not None:  # a second trainer.train() call
            self._session.close()
        self.log_dir = self._resolve_log_dir(args)
        self._session = MonitorSession(
            model, [optimizer], start_step=int(state.global_step), log_dir=self.log_dir,
            writer=None, every=self.every, refresh_pc=self.refresh_pc,
            monitor_kwargs=self.monitor_kwargs,
        )

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Called right after optimizer.step(), before the Trainer increments global_step
        # and zeroes the gradients (the monitor's gradient check still sees them).
        if self._session is not None:
            self._session.step(int(state.global_step) + 1)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None,
               **kwargs: Any) -> None:
        if self._session is None or not logs or logs.get("loss") is None:
            return
        try:  # transformers 5 may hand formatted strings to on_log
            loss = float(logs["loss"])
        except (TypeError, ValueError):
            return
        self._session.monitor.record_loss(loss)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None
