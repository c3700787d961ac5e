"""The one handle type that ``attach(optimizer)`` returns across specopt.

:meth:`specopt.PCHandle.attach` (the PC layer's u/v refresh) and
:meth:`specopt.SpectralMonitor.attach` (the monitor) both register step hooks on a
``torch.optim.Optimizer`` and return an :class:`AttachHandle`::

    with monitor.attach(optimizer):      # hooks removed when the block ends
        train(...)

    handle = pc.attach(optimizer)
    ...
    handle.remove()                      # idempotent; handle.active is now False

Imports nothing from specopt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["AttachHandle"]


class AttachHandle:
    """The optimizer hooks one ``attach`` call registered.

    Attributes:
        optimizer: the optimizer the hooks are on.
        owner: what attached them (e.g. ``"PCHandle"``, ``"SpectralMonitor"``), for repr.

    ``remove()`` (alias ``detach()``) unregisters every hook; calling it again does
    nothing. As a context manager, the hooks are removed on exit (also on an exception).
    """

    def __init__(
        self,
        optimizer: Any,
        hooks: Sequence[Any],
        *,
        owner: str = "",
        on_remove: Callable[[AttachHandle], None] | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.owner = owner
        self._hooks = list(hooks)
        self._on_remove = on_remove

    @property
    def active(self) -> bool:
        """True until :meth:`remove` is called."""
        return bool(self._hooks)

    def remove(self) -> None:
        """Unregister the hooks (idempotent)."""
        if not self._hooks:
            return
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._on_remove is not None:
            self._on_remove(self)

    detach = remove

    def __enter__(self) -> AttachHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return (f"AttachHandle({self.owner or 'hooks'} on {type(self.optimizer).__name__}, "
                f"{state})")
