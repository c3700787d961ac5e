"""Atomic training checkpoints and loading of foreign weight files.

A specopt checkpoint is one ``torch.save`` file holding a dict::

    {
      "format": "specopt-checkpoint", "version": 1,
      "step": int,                     # optimizer steps completed
      "model": state_dict,             # PC runs: raw W, u, v, gamma (see specopt.pc)
      "optimizer": state_dict, "scheduler": state_dict,
      "rng": {"torch": ByteTensor, "python": tuple, "cuda": [ByteTensor] (if CUDA)},
      "data": BatchSampler.state_dict(),   # generator state + batches drawn
      "config": dict,                  # training options incl. "model" (LlamaConfig dict)
      "extra": dict,                   # e.g. the spectral monitor's state
    }

Only tensors and plain Python containers are stored, so it loads with
``torch.load(..., weights_only=True)`` (no pickled classes, safe on untrusted files).

Writes are atomic: the bytes go to a temporary file in the target directory, are flushed
and fsync'ed, then ``os.replace`` swaps the file in and the directory entry is fsync'ed.
A crash at any point leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "atomic_write",
    "capture_rng_state",
    "is_specopt_checkpoint",
    "load_checkpoint",
    "load_weights",
    "restore_rng_state",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "specopt-checkpoint"
CHECKPOINT_VERSION = 1


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(file)`` on a temporary file, then atomically move it to ``path``.

    The parent directory is created if needed. On any exception the temporary file is
    removed and ``path`` is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    # Persist the rename itself (POSIX); not possible on every platform.
    with contextlib.suppress(OSError):
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return target


def capture_rng_state() -> dict[str, Any]:
    """Global RNG states (torch CPU, CUDA if initialised, Python ``random``)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    # weights_only loading turns the tuple into lists; random.setstate wants tuples.
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """Atomically write a specopt checkpoint; ``payload`` holds the keys listed above.

    ``format`` and ``version`` are filled in. Returns the written path.
    """
    if "model" not in payload or "step" not in payload:
        raise ValueError(f"checkpoint payload needs 'model' and 'step', got {sorted(payload)}")
    data = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}
    return atomic_write(path, lambda f: torch.save(data, f))


def _torch_load(path: Path, map_location: str | torch.device) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # corrupt file, pickle with classes, not a torch file
        raise ValueError(f"cannot load {str(path)!r} as a PyTorch file: {exc}") from exc


def is_specopt_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT


def load_checkpoint(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a specopt checkpoint written by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a specopt checkpoint, or a newer version than this code reads.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist")
    obj = _torch_load(p, map_location)
    if not is_specopt_checkpoint(obj):
        raise ValueError(f"{str(p)!r} is not a specopt checkpoint (no 'format' key)")
    if obj.get("version", 0) > CHECKPOINT_VERSION:
        raise ValueError(
            f"{str(p)!r} has checkpoint version {obj['version']}; this specopt reads up to "
            f"{CHECKPOINT_VERSION}"
        )
    return obj


def load_weights(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """Tensors of any weight file: specopt checkpoint, plain state_dict or safetensors.

    Returns ``(state_dict, checkpoint)`` where ``checkpoint`` is the full specopt
    checkpoint dict when ``path`` is one (so callers can rebuild the model, PC layers
    included) and ``None`` otherwise. Nested dicts of plain files (``{"model": {...}}``,
    ``{"state_dict": {...}}``) are unwrapped.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weight file {str(p)!r} does not exist")
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise ValueError(
                f"{str(p)!r} is a safetensors file; install the 'safetensors' package to read it"
            ) from exc
        return load_file(str(p)), None
    obj = _torch_load(p, "cpu")
    if is_specopt_checkpoint(obj):
        return obj["model"], obj
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not any(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{str(p)!r} holds no tensors by name (expected a state_dict)")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}, None
