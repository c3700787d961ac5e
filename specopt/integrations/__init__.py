"""Trainer integrations (optional dependencies, imported only when used).

- :mod:`specopt.integrations.huggingface`: ``SpectralMonitorCallback`` for
  ``transformers.Trainer`` (``pip install 'specopt[hf]'``).
- :mod:`specopt.integrations.lightning`: ``SpectralMonitorCallback`` for Lightning
  (``pip install 'specopt[lightning]'``).

Both do the same three things, from one shared piece (:class:`_common.MonitorSession`):
build a :class:`specopt.SpectralMonitor` on the trainer's model when training starts
(logging to ``log_dir``, else the trainer's TensorBoard directory), attach the PC layers'
u/v refresh to the optimizer the trainer steps when the model has PC layers, and step the
monitor after every optimizer step with the trainer's global step, so spectral tags line
up with the trainer's own loss curves.
"""

__all__: list[str] = []
