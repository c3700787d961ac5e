"""Checked file input and output for the CLI commands: every failure is a one-line
:class:`~specopt.cli._console.CommandError` naming the file (or flag) and the problem.

Inputs are checked before loading (exists, is a regular non-empty file, looks like the
format it claims), so a directory, a device or random bytes get a message that says so
instead of a loader's traceback. Outputs are checked before the command does its work
(the parent folder exists or can be created, and is writable), so ``inspect`` does not
print its table and then fail writing the PNG; the write itself is atomic
(:func:`specopt.checkpoint.atomic_write`), so a failure mid-write leaves no partial file.
"""

from __future__ import annotations

import os
import pickle
import stat
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

from torch import Tensor, nn

from specopt.checkpoint import state_mismatch
from specopt.cli._console import CommandError

__all__ = [
    "check_input_file",
    "check_output_path",
    "checkpoint_model",
    "is_distributed_checkpoint",
    "load_specopt_checkpoint",
    "load_weight_file",
    "refuse_nonfinite",
    "require_safetensors",
    "write_output",
]

#: How many tensor names an error message lists before "and N more".
_MAX_NAMES = 5
#: First bytes of a torch.save file: a zip archive (torch >= 1.6) or a pickle (protocol >= 2).
_TORCH_MAGICS = (b"PK\x03\x04", b"\x80")

#: What a failing weight loader raises on bad content (besides CommandError).
_LOAD_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError,
    zipfile.BadZipFile, TypeError, AttributeError,
)


def _q(path: str | os.PathLike[str]) -> str:
    return repr(str(path))


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES])
    return shown + (f" and {len(names) - _MAX_NAMES} more" if len(names) > _MAX_NAMES else "")


def check_input_file(path: str | os.PathLike[str], *, what: str) -> Path:
    """``path`` as a ``Path`` if it is an existing, readable, non-empty regular file.

    ``what`` names the file in messages (``"checkpoint"``, ``"weight file"``).
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise CommandError(f"{what} {_q(p)} does not exist") from None
    except OSError as exc:
        raise CommandError(f"cannot read {what} {_q(p)}: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(st.st_mode):
        raise CommandError(f"{what} {_q(p)} is a directory, expected a file")
    if not stat.S_ISREG(st.st_mode):
        raise CommandError(f"{what} {_q(p)} is not a regular file (a device, FIFO or socket)")
    if st.st_size == 0:
        raise CommandError(f"{what} {_q(p)} is empty (0 bytes)")
    if not os.access(p, os.R_OK):
        raise CommandError(f"cannot read {what} {_q(p)}: permission denied")
    return p


def check_output_path(
    path: str | os.PathLike[str], *, flag: str, inputs: Iterable[str | os.PathLike[str]] = ()
) -> Path:
    """``path`` as a ``Path`` if a file can be written there; leaves nothing behind.

    The parent folders need not exist (``atomic_write`` creates them), but the nearest
    existing one must be a folder where a file can be created: checked by creating and
    removing an empty temporary file (permission bits say nothing to root, nor about
    read-only mounts or /proc). ``path`` must not be one of the ``inputs`` (writing the
    output would replace the file being read). ``flag`` names the option in messages.
    """
    p = Path(path)
    if p.is_dir():
        raise CommandError(f"{flag} {_q(p)} is a directory, expected a file path")
    if p.exists() and not p.is_file():
        raise CommandError(f"{flag} {_q(p)} exists and is not a regular file")
    for source in inputs:
        if p.exists() and Path(source).exists() and os.path.samefile(p, source):
            raise CommandError(f"{flag} {_q(p)} is the input file {_q(source)}: writing it "
                               "would replace the input; choose another output path")
    ancestor = p.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CommandError(f"cannot write {flag} {_q(p)}: {_q(ancestor)} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".specopt-probe.", suffix=".tmp", dir=ancestor)
    except OSError as exc:
        raise CommandError(f"cannot write {flag} {_q(p)}: cannot create a file in folder "
                           f"{_q(ancestor)}: {exc.strerror or exc}") from exc
    os.close(fd)
    os.unlink(probe)
    return p


def write_output(
    path: str | os.PathLike[str], write: Callable[[IO[bytes]], None], *, flag: str
) -> Path:
    """:func:`~specopt.checkpoint.atomic_write` with an ``OSError`` (disk full, ...) turned
    into a one-line error; the target is untouched on failure."""
    from specopt.checkpoint import atomic_write

    try:
        return atomic_write(path, write)
    except OSError as exc:
        raise CommandError(f"cannot write {flag} {_q(path)}: {exc.strerror or exc}") from exc


def _load_reason(exc: BaseException) -> str:
    """The informative part of a loader's message, on one line.

    torch's weights-only refusal advises ``weights_only=False``, which is the wrong advice
    for a file that is not a checkpoint at all; keep only what the unpickler found.
    """
    root = exc.__cause__ or exc
    msg = str(root)
    if msg.startswith("Weights only load failed"):
        body = msg.split("Check the documentation")[0]
        if "WeightsUnpickler error:" in body:
            found = body.split("WeightsUnpickler error:", 1)[1]
        else:  # advice paragraph first, the finding in the last one
            paragraphs = [part for part in body.split("\n\n") if part.strip()]
            found = paragraphs[-1] if len(paragraphs) > 1 else ""
        found = " ".join(found.split())
        return "its pickle holds something other than tensors" + (f" ({found})" if found else "")
    if isinstance(root, KeyError):
        return f"missing entry {msg}"
    lines = [line.strip() for line in msg.splitlines() if line.strip()]
    first = lines[0] if lines else type(root).__name__
    # Long library messages (torch's zip reader) put the finding in the first sentence.
    return first.split(". ")[0] if len(first) > 120 else first


def _sniff(p: Path) -> str | None:
    """Why ``p`` is not the format its name says (None when it looks right)."""
    with open(p, "rb") as f:
        head = f.read(9)
    if p.suffix == ".safetensors":
        size = p.stat().st_size
        n = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
        if len(head) < 9 or not 2 <= n <= size - 8 or head[8:9] != b"{":
            return "not a safetensors file (no valid header)"
        return None
    if not head.startswith(_TORCH_MAGICS):
        return "not a checkpoint: neither a PyTorch file (zip or pickle) nor .safetensors"
    return None


def is_distributed_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder written by ``specopt.cli.dcp.save_distributed_checkpoint``
    (``specopt train --ddp/--fsdp``'s ``checkpoints/step_<n>/``)."""
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


def _load_distributed(p: Path) -> dict[str, Any]:
    """A distributed checkpoint folder as a specopt checkpoint dict (``step``, ``model``,
    ``config``; no optimizer state), loaded in this one process into the model its saved
    config describes."""
    import torch

    from specopt.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION
    from specopt.cli.dcp import _EXTRA_FILE, load_distributed_checkpoint

    try:
        extra = torch.load(p / _EXTRA_FILE, weights_only=True)
    except FileNotFoundError:
        raise CommandError(f"distributed checkpoint {_q(p)} has no {_EXTRA_FILE} (its config): "
                           "incomplete, or not written by `specopt train`") from None
    cfg = extra.get("config") if isinstance(extra, Mapping) else None
    if not isinstance(cfg, Mapping) or not isinstance(cfg.get("model"), Mapping):
        raise CommandError(f"distributed checkpoint {_q(p)} has no 'config' with the model "
                           "settings, so its model cannot be rebuilt")
    model = _config_model(cfg, p)
    load_distributed_checkpoint(p, model)
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "step": extra.get("step", 0), "model": model.state_dict(), "config": dict(cfg)}


def _load_distributed_checked(path: str | os.PathLike[str]) -> dict[str, Any]:
    """:func:`_load_distributed` with a reader failure (missing or damaged shard files) as
    a one-line error."""
    from torch.distributed.checkpoint import CheckpointException

    try:
        return _load_distributed(Path(path))
    except CommandError:
        raise
    except CheckpointException as exc:  # a BaseException; its text ends in the rank's error
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise CommandError(f"cannot load distributed checkpoint {_q(path)}: a shard file is "
                           f"missing, truncated or corrupt ({lines[-1] if lines else exc})"
                           ) from exc
    except Exception as exc:
        if not isinstance(exc, _LOAD_ERRORS):
            raise
        raise CommandError(f"cannot load distributed checkpoint {_q(path)}: "
                           f"{_load_reason(exc)}") from exc


def _load(path: str | os.PathLike[str], load: Callable[[Path], Any], *, what: str) -> Any:
    """``load(path)`` after the input checks, with a loader failure as a one-line error."""
    p = check_input_file(path, what=what)
    bad = _sniff(p)
    if bad is not None:
        raise CommandError(f"{_q(p)} is {bad}")
    if p.suffix == ".safetensors":
        require_safetensors(f"reading {_q(p)}")
    try:
        return load(p)
    except Exception as exc:  # safetensors raises its own SafetensorError (an Exception)
        if not isinstance(exc, _LOAD_ERRORS) and type(exc).__name__ != "SafetensorError":
            raise
        reason = _load_reason(exc)
        # Our own loaders' messages already name the file.
        raise CommandError(reason if _q(p) in reason else f"cannot load {_q(p)}: {reason}") \
            from exc


def load_weight_file(
    path: str | os.PathLike[str],
) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """:func:`specopt.checkpoint.load_weights` with every failure as a one-line error; also
    reads a distributed checkpoint folder (``--ddp/--fsdp`` runs).

    Returns ``(state_dict, checkpoint or None)`` like ``load_weights``.
    """
    from specopt.checkpoint import load_weights

    if is_distributed_checkpoint(path):
        ckpt = _load_distributed_checked(path)
        return ckpt["model"], ckpt
    state, ckpt = _load(path, load_weights, what="weight file")
    if ckpt is not None and not isinstance(ckpt.get("model"), Mapping):
        raise CommandError(f"{_q(path)} is a specopt checkpoint without its 'model' weights")
    return state, ckpt


def load_specopt_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """:func:`specopt.checkpoint.load_checkpoint` with every failure as a one-line error
    (also: its ``'model'`` entry must be a state_dict); also reads a distributed checkpoint
    folder (``--ddp/--fsdp`` runs; model weights and config, no optimizer state)."""
    from specopt.checkpoint import load_checkpoint

    if is_distributed_checkpoint(path):
        return _load_distributed_checked(path)
    ckpt = _load(path, load_checkpoint, what="checkpoint")
    if not isinstance(ckpt.get("model"), Mapping):
        raise CommandError(f"{_q(path)} is a specopt checkpoint without its 'model' weights")
    return ckpt


def require_safetensors(purpose: str) -> None:
    """Raise a one-line error naming the missing package when safetensors is absent."""
    try:
        import safetensors.torch  # noqa: F401
    except ImportError as exc:
        raise CommandError(
            f"{purpose} needs the 'safetensors' package (pip install safetensors)"
        ) from exc


def _config_model(cfg: Mapping[str, Any], path: str | os.PathLike[str]) -> nn.Module:
    """The (PC) Llama a checkpoint's ``config`` describes, freshly initialised; an invalid
    config is a one-line error naming ``path``."""
    from specopt.cli.train import build_model

    try:
        model, _ = build_model(dict(cfg["model"]), pc=bool(cfg.get("pc")),
                               pc_level=cfg.get("pc_level") or 1)
    except (TypeError, ValueError) as exc:
        raise CommandError(f"{_q(path)} has an invalid model config: {_load_reason(exc)}") from exc
    return model


def checkpoint_model(ckpt: Mapping[str, Any], path: str | os.PathLike[str]) -> nn.Module:
    """The model a specopt checkpoint describes (PC layers included), weights loaded,
    in eval mode; a missing/invalid config or mismatched tensors is a one-line error."""

    cfg = ckpt.get("config")
    if not isinstance(cfg, Mapping) or not isinstance(cfg.get("model"), Mapping):
        raise CommandError(
            f"{_q(path)} has no 'config' with the model settings, so its model cannot be "
            "rebuilt (is it a checkpoint written by `specopt train`?)"
        )
    model = _config_model(cfg, path)
    problem = state_mismatch(model, ckpt["model"])
    if problem is not None:
        raise CommandError(f"{_q(path)} does not match the model its config describes: {problem}")
    model.load_state_dict(ckpt["model"])
    return model.eval()


def refuse_nonfinite(state: Mapping[str, Tensor], path: str | os.PathLike[str], *,
                     action: str) -> None:
    """Raise naming the tensors of ``state`` that hold NaN/Inf (``action``: what is refused)."""
    from specopt.optim.nonfinite import nonfinite_indices

    names = [k for k, t in state.items() if isinstance(t, Tensor) and t.is_floating_point()]
    bad = nonfinite_indices([state[k].detach() for k in names])
    if bad:
        raise CommandError(
            f"{_q(path)} holds NaN/Inf in {len(bad)} tensor(s): {_names([names[i] for i in bad])}; "
            f"refusing to {action} (the run diverged? use an earlier checkpoint)"
        )
