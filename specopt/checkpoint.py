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
A crash at any point leaves either the old file or the new one, never half of one (and,
after a SIGKILL mid-write, a stale ``.<name>.*.tmp`` that :func:`remove_stale_temp_files`
cleans). The file gets the mode ``open()`` would give (``0o666`` less the umask), not the
temporary file's ``0o600``.

Loading validates: :func:`load_checkpoint` checks the format and the keys a caller needs,
:func:`load_module_state` and :func:`check_optimizer_state` check every tensor's name and
shape against the live model, all raising :class:`CheckpointError` (a ``ValueError``)
whose message names the file and the problem.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor, nn

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "TRAINING_KEYS",
    "CheckpointError",
    "atomic_write",
    "capture_rng_state",
    "check_optimizer_state",
    "is_specopt_checkpoint",
    "load_checkpoint",
    "load_module_state",
    "load_weights",
    "remove_stale_temp_files",
    "restore_rng_state",
    "save_checkpoint",
    "state_mismatch",
]

CHECKPOINT_FORMAT = "specopt-checkpoint"
CHECKPOINT_VERSION = 1
#: Keys a checkpoint needs to resume training (``specopt train --resume``).
TRAINING_KEYS = ("step", "model", "optimizer", "scheduler", "rng", "data", "config")
#: How many names an error message lists before "... and N more".
_LISTED = 5


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message names the file and why.

    A ``ValueError`` so that callers catching bad input in general still catch it.
    """


def _names(names: list[str]) -> str:
    more = f" ... and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
    return ", ".join(names[:_LISTED]) + more


def _umask() -> int:
    """The process umask, read without changing it where the OS reports it (Linux):
    ``os.umask``'s set-and-restore briefly changes it for every thread."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class _ErrorRecordingFile:
    """A binary file that remembers the ``OSError`` its ``write`` raised.

    Why: ``torch.save``'s zip writer turns a failed write (disk full) into a RuntimeError
    ("[enforce fail at inline_container.cc] unexpected pos ..."), hiding the errno; with
    the original error recorded, :func:`atomic_write` raises that instead.
    """

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str) -> Any:  # flush, tell, fileno, ...: the file's own
        return getattr(self._file, name)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(file)`` on a temporary file, then atomically move it to ``path``.

    The parent directory is created if needed. On any exception the temporary file is
    removed and ``path`` is untouched; a write that failed in the OS (disk full, I/O
    error) raises that ``OSError`` even when ``write`` turned it into another exception.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        if hasattr(os, "fchmod"):  # mkstemp creates 0o600; outputs follow the umask
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            sink = _ErrorRecordingFile(f)
            try:
                write(sink)  # type: ignore[arg-type]  # a file by duck typing
            except OSError:
                raise
            except Exception as exc:
                if sink.error is not None:
                    raise sink.error from exc
                raise
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


def remove_stale_temp_files(folder: str | os.PathLike[str], pattern: str = "*") -> list[Path]:
    """Delete what an interrupted :func:`atomic_write` of ``folder/<pattern>`` left behind
    (``.<name>.*.tmp`` files; ``.<name>.partial`` folders of a distributed checkpoint).

    Call it only when no other process writes there (e.g. at the start of a run).
    Returns the removed paths.
    """
    import shutil

    root = Path(folder)
    removed = []
    for leftover in [*root.glob(f".{pattern}.*.tmp"), *root.glob(f".{pattern}.partial")]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed


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
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "Weights only load failed" in why:  # torch's advice to drop the safety: not ours
            why = ("it is not a torch.save file of tensors and plain containers (truncated, "
                   "corrupt, or pickled Python objects, which are not loaded for safety)")
        raise CheckpointError(f"cannot load {str(path)!r} as a PyTorch file: {why}") from exc


def is_specopt_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    map_location: str | torch.device = "cpu",
    require: tuple[str, ...] = ("step", "model"),
) -> dict[str, Any]:
    """Load a specopt checkpoint written by :func:`save_checkpoint`.

    Args:
        path: the checkpoint file.
        map_location: where tensors go (``torch.load``'s argument).
        require: keys the caller needs (:data:`TRAINING_KEYS` to resume training);
            ``step`` must be an int >= 0 and ``model`` a dict of tensors by name.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: a folder, not a specopt checkpoint, a newer version than this
            code reads, or a required key missing or malformed.
    """
    p = Path(path)
    if p.is_dir():
        raise CheckpointError(f"{str(p)!r} is a folder, not a checkpoint file")
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist")
    obj = _torch_load(p, map_location)
    if not is_specopt_checkpoint(obj):
        raise CheckpointError(f"{str(p)!r} is not a specopt checkpoint (no 'format' key)")
    if obj.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{str(p)!r} has checkpoint version {obj['version']}; this specopt reads up to "
            f"{CHECKPOINT_VERSION}"
        )
    missing = [k for k in require if k not in obj]
    if missing:
        raise CheckpointError(f"checkpoint {str(p)!r} has no {', '.join(map(repr, missing))} "
                              f"(needed here: {', '.join(require)})")
    step = obj.get("step", 0)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"checkpoint {str(p)!r} has step {step!r}; expected an int >= 0")
    model = obj.get("model", {})
    if not isinstance(model, dict) or not all(isinstance(v, Tensor) for v in model.values()):
        raise CheckpointError(f"checkpoint {str(p)!r}: 'model' is not a dict of tensors by name")
    return obj


def state_mismatch(module: nn.Module, state: Mapping[str, Any]) -> str | None:
    """What keeps ``module.load_state_dict(state)`` (strict) from succeeding: missing,
    unexpected, non-tensor and wrong-shaped entries, listed by name and shape; None when
    it will succeed. The one check behind :func:`load_module_state` and the CLI's
    checkpoint readers."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    not_tensors = [f"{k} is a {type(state[k]).__name__}" for k in expected
                   if k in state and not isinstance(state[k], Tensor)]
    wrong = [f"{k} is {tuple(state[k].shape)}, the model has {tuple(v.shape)}"
             for k, v in expected.items()
             if isinstance(state.get(k), Tensor) and state[k].shape != v.shape]
    problems = [f"{label}: {_names(names)}" for label, names in
                (("missing tensors", missing), ("unexpected tensors", unexpected),
                 ("not tensors", not_tensors), ("wrong shapes", wrong)) if names]
    return "; ".join(problems) or None


def load_module_state(module: nn.Module, state: dict[str, Tensor], *, source: str) -> None:
    """``module.load_state_dict(state)`` (strict), after checking every name and shape.

    Raises:
        CheckpointError: missing, unexpected or wrong-shaped tensors, listed by name and
            shape (:func:`state_mismatch`), with ``source`` (the file) named; ``module``
            is then left untouched.
    """
    problem = state_mismatch(module, state)
    if problem is not None:
        raise CheckpointError(f"{source!r} does not fit the model it describes ({problem})")
    module.load_state_dict(state)


def check_optimizer_state(
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    *,
    names: dict[Tensor, str],
    source: str,
) -> None:
    """Check a saved ``optimizer.state_dict()`` against ``optimizer`` before loading it.

    Groups and parameter counts must match, and every per-parameter state tensor of 1 or
    more dimensions (momenta, moments) must have its parameter's shape; ``names`` maps
    parameters to their names for the message.

    Raises:
        CheckpointError: naming ``source`` and the first parameters that do not fit.
    """
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list) or not isinstance(state.get("state"), dict):
        raise CheckpointError(f"{source!r}: 'optimizer' is not an optimizer state_dict")
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(f"{source!r}: the optimizer state has {len(groups)} parameter "
                              f"groups, this optimizer {len(optimizer.param_groups)}")
    by_id: dict[Any, Tensor] = {}
    for gi, (saved, live) in enumerate(zip(groups, optimizer.param_groups, strict=True)):
        if len(saved.get("params", [])) != len(live["params"]):
            raise CheckpointError(
                f"{source!r}: optimizer group {gi} has {len(saved.get('params', []))} "
                f"parameters, this optimizer's {len(live['params'])}")
        by_id.update(zip(saved["params"], live["params"], strict=True))
    wrong = []
    for pid, entry in state["state"].items():
        param = by_id.get(pid)
        if param is None or not isinstance(entry, dict):
            wrong.append(f"state for unknown parameter id {pid!r}")
            continue
        for key, value in entry.items():
            if isinstance(value, Tensor) and value.ndim >= 1 and value.shape != param.shape:
                wrong.append(f"{names.get(param, f'id {pid}')}.{key} is {tuple(value.shape)}, "
                             f"the parameter {tuple(param.shape)}")
    if wrong:
        raise CheckpointError(f"{source!r}: optimizer state does not fit ({_names(wrong)})")


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
