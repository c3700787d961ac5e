"""Embedded default corpus, byte tokenizer and seeded batch sampling.

The default corpus is the source of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``): real text that exists offline on every machine
that can run specopt. Bytes are tokens (vocabulary 256), so a loss in nats per token
divided by ln 2 is directly **bits per byte**.

Determinism (why it matters: resume must continue bit-identically, and two runs with
the same seed must see the same data):

- Files are ordered by the SHA-1 of their path relative to the corpus root, which is
  stable across machines and mixes modules (plain alphabetical order would fill a capped
  corpus with ``asyncio`` and ``collections`` only).
- Each file goes to validation when ``sha1(relpath) mod 1000 < 1000 * val_fraction``:
  whole files, so no validation text leaks into training as an overlapping window.
- A single text file (``--data FILE``) is split by position: the last
  ``val_fraction`` of its bytes is validation.
- Training batches are random windows drawn from a ``torch.Generator`` owned by
  :class:`BatchSampler`; its state (and the number of batches drawn) is the "data
  position" saved in checkpoints.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_VAL_FRACTION",
    "BatchSampler",
    "Corpus",
    "DataError",
    "bits_per_byte",
    "decode",
    "encode",
    "eval_windows",
    "load_corpus",
    "stdlib_root",
]

#: Cap on the corpus size in bytes (train + validation). 4 MB keeps loading under a
#: second while holding far more text than a few-minute CPU run can see.
DEFAULT_MAX_BYTES = 4_000_000
#: Share of files (or of a single file's bytes) held out for validation.
DEFAULT_VAL_FRACTION = 0.1
#: Directory names never read from the standard library tree (third-party code, caches).
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "idlelib", "turtledemo"})


class DataError(ValueError):
    """The requested data is missing, empty, unreadable or too small for the batch shape."""


def encode(text: str) -> Tensor:
    """UTF-8 bytes of ``text`` as a uint8 tensor of shape ``(n_bytes,)``."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()


def decode(tokens: Tensor) -> str:
    """Inverse of :func:`encode`; invalid UTF-8 sequences become U+FFFD."""
    return bytes(tokens.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


def bits_per_byte(loss_nats: float) -> float:
    """Convert a mean cross-entropy in nats per byte-token to bits per byte."""
    return loss_nats / math.log(2)


def stdlib_root() -> Path:
    """Directory holding the running interpreter's standard-library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


@dataclass(frozen=True)
class Corpus:
    """A byte corpus split into training and validation.

    Attributes:
        train: uint8 tensor ``(n_train,)``.
        val: uint8 tensor ``(n_val,)``.
        source: human-readable origin (path, or ``stdlib:<dir>``).
        n_files: number of files read.
    """

    train: Tensor
    val: Tensor
    source: str
    n_files: int

    def describe(self) -> str:
        return (
            f"{self.source}: {self.n_files} file(s), "
            f"{self.train.numel():,} train + {self.val.numel():,} val bytes"
        )


def _path_hash(rel: str) -> int:
    return int.from_bytes(hashlib.sha1(rel.encode("utf-8")).digest()[:8], "big")


def _list_files(root: Path, suffixes: tuple[str, ...] | None) -> list[tuple[str, Path]]:
    """(relative posix path, absolute path) of regular files under ``root``, hash-ordered."""
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorted + pruned in place: os.walk order is filesystem-dependent otherwise.
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or (suffixes is not None and not name.endswith(suffixes)):
                continue
            path = Path(dirpath) / name
            if path.is_file():
                found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: (_path_hash(item[0]), item[0]))
    return found


def _read_capped(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes from the start of the regular file ``path``.

    Streams: only ``limit`` bytes are ever read, however large the file (a 3 GB file
    costs one ``limit``-sized buffer, not 3 GB). Devices, FIFOs and sockets are refused
    before they are read (``/dev/zero`` never ends; opening a FIFO blocks until a writer
    appears, hence the non-blocking open).

    Raises:
        DataError: ``path`` is not a regular file.
        OSError: it cannot be opened or read (callers decide whether to skip it).
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb", buffering=0) as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DataError(
                f"data path {str(path)!r} is not a regular file (a device, FIFO or socket); "
                "pass a text file or a folder"
            )
        chunks = []
        left = limit
        while left > 0:  # a raw read may return less than asked
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    return b"".join(chunks)


def _to_tensor(chunks: list[bytes]) -> Tensor:
    blob = b"".join(chunks)
    if not blob:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)


def _load_folder(
    root: Path, *, suffixes: tuple[str, ...] | None, max_bytes: int, val_fraction: float,
    source: str, strict: bool,
) -> Corpus:
    files = _list_files(root, suffixes)
    if not files:
        kind = "no readable files" if suffixes is None else f"no {'/'.join(suffixes)} files"
        raise DataError(f"data folder {str(root)!r} contains {kind}")
    threshold = round(1000 * val_fraction)
    train: list[bytes] = []
    val: list[bytes] = []
    total = 0
    n_files = 0
    for rel, path in files:
        if total >= max_bytes:
            break
        try:
            blob = _read_capped(path, max_bytes - total)
        except OSError as exc:
            # The stdlib may hold a few unreadable files on odd installs: skip them;
            # a user's folder is theirs, so say which file failed.
            if strict:
                raise DataError(f"cannot read data file {str(path)!r}: {exc.strerror}") from exc
            continue
        if not blob:
            continue
        # Separate files by a blank line so windows spanning two files still look like text.
        blob += b"\n\n"
        (val if _path_hash(rel) % 1000 < threshold else train).append(blob)
        total += len(blob)
        n_files += 1
    if total == 0:
        raise DataError(f"data folder {str(root)!r} holds only empty files")
    if val_fraction > 0 and not (val and train):
        # Tiny folders can hash every file into one split: hold out the tail instead.
        train, val = _split_tail(b"".join(train + val), val_fraction)
    return Corpus(_to_tensor(train), _to_tensor(val), source, n_files)


def _split_tail(blob: bytes, val_fraction: float) -> tuple[list[bytes], list[bytes]]:
    n_val = int(len(blob) * val_fraction)
    cut = len(blob) - n_val
    return [blob[:cut]], [blob[cut:]]


def load_corpus(
    path: str | os.PathLike[str] | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    val_fraction: float = DEFAULT_VAL_FRACTION,
) -> Corpus:
    """Load a byte corpus and split it deterministically into train and validation.

    Args:
        path: ``None`` for the embedded standard-library corpus (``*.py`` files), a text
            file, or a folder (every non-hidden file under it, recursively).
        max_bytes: cap on the total bytes read (files are taken in hash order until the
            cap is reached; the last one is truncated). Applied while reading: no more
            than ``max_bytes`` bytes are read from disk, whatever the files' sizes.
        val_fraction: in ``[0, 1)``; share of files (folder) or of trailing bytes (file)
            used for validation.

    Raises:
        DataError: missing path, unreadable or empty data, a device / FIFO / socket
            given as ``path``, or bad arguments. (Inside a folder, only regular files
            are read; others are skipped.)
    """
    if max_bytes <= 0:
        raise DataError(f"max_bytes must be positive, got {max_bytes}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if path is None:
        root = stdlib_root()
        if not root.is_dir():
            raise DataError(f"standard-library folder {str(root)!r} not found; pass --data PATH")
        return _load_folder(
            root, suffixes=(".py",), max_bytes=max_bytes, val_fraction=val_fraction,
            source=f"stdlib:{root}", strict=False,
        )
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data path {str(p)!r} does not exist")
    if p.is_dir():
        return _load_folder(
            p, suffixes=None, max_bytes=max_bytes, val_fraction=val_fraction,
            source=str(p), strict=True,
        )
    try:
        blob = _read_capped(p, max_bytes)
    except OSError as exc:
        raise DataError(f"cannot read data file {str(p)!r}: {exc.strerror or exc}") from exc
    if not blob:
        raise DataError(f"data file {str(p)!r} is empty")
    train, val = _split_tail(blob, val_fraction)
    return Corpus(_to_tensor(train), _to_tensor(val), str(p), 1)


def _check_shape(data: Tensor, seq_len: int, what: str) -> None:
    if data.numel() < seq_len + 1:
        raise DataError(
            f"{what} split has {data.numel()} bytes, fewer than seq_len + 1 = {seq_len + 1}; "
            "use more data or a shorter --seq-len"
        )


class BatchSampler:
    """Random training windows from a seeded generator; resumable.

    Each call returns ``(x, y)``, both int64 of shape ``(batch_size, seq_len)`` with
    ``y[:, t] = x[:, t + 1]`` in the underlying byte stream; window starts are uniform
    over ``[0, len(data) - seq_len - 1]``.

    ``state_dict()`` holds the generator state and ``position`` (batches drawn so far);
    restoring it makes the next batch identical to the one an uninterrupted run draws.
    """

    def __init__(self, data: Tensor, *, batch_size: int, seq_len: int, seed: int) -> None:
        if batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        if seq_len <= 0:
            raise DataError(f"seq_len must be positive, got {seq_len}")
        _check_shape(data, seq_len, "training")
        self.data = data
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.position = 0
        self._gen = torch.Generator(device="cpu").manual_seed(seed)
        # (seq_len + 1,) offsets added to each start: one gather builds the whole batch.
        self._offsets = torch.arange(seq_len + 1)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        high = self.data.numel() - self.seq_len  # starts in [0, high)
        starts = torch.randint(0, high, (self.batch_size,), generator=self._gen)
        windows = self.data[starts[:, None] + self._offsets].long()  # (B, T + 1)
        self.position += 1
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict[str, object]:
        return {"generator": self._gen.get_state(), "position": self.position}

    def load_state_dict(self, state: dict[str, object]) -> None:
        gen_state = state["generator"]
        assert isinstance(gen_state, Tensor)
        self._gen.set_state(gen_state)
        self.position = int(state["position"])  # type: ignore[call-overload]


def eval_windows(data: Tensor, *, batch_size: int, seq_len: int, max_batches: int) -> list[Tensor]:
    """Fixed validation batches: evenly spaced windows over ``data``.

    Deterministic (no generator), so every evaluation of a run, and of every run on
    the same corpus, scores the same bytes. Returns up to ``max_batches`` int64 tensors
    of shape ``(b, seq_len + 1)`` (``b <= batch_size``); inputs are ``[:, :-1]``,
    targets ``[:, 1:]``.
    """
    _check_shape(data, seq_len, "validation")
    n_windows = min(max_batches * batch_size, (data.numel() - 1) // seq_len)
    n_windows = max(n_windows, 1)
    span = data.numel() - seq_len - 1
    starts = torch.linspace(0, span, n_windows).round().long()
    offsets = torch.arange(seq_len + 1)
    windows = data[starts[:, None] + offsets].long()
    return list(windows.split(batch_size))
