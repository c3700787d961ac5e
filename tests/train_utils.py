"""Helpers shared by the `specopt train` tests: tiny run flags, a small corpus, and the
event files read back the way TensorBoard shows them."""

from __future__ import annotations

from pathlib import Path

#: A run that takes well under a second per step on one thread.
TINY = ["--preset", "tiny", "--batch-size", "4", "--seq-len", "32", "--threads", "1",
        "--monitor-budget", "0", "--no-progress", "--eval-every", "0"]


def write_corpus(folder: Path, n_bytes: int = 100_000) -> Path:
    """Real text (the start of the stdlib's argparse.py) in ``folder/corpus.txt``."""
    import sysconfig

    src = Path(sysconfig.get_paths()["stdlib"]) / "argparse.py"
    path = folder / "corpus.txt"
    path.write_bytes(src.read_bytes()[:n_bytes])
    return path


def logged(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every event of ``tag`` TensorBoard shows, duplicates included.

    TensorBoard's own ``EventAccumulator`` applies the purge rule a resumed writer relies
    on (and keeps duplicate steps, so "each step once" is checkable)."""
    from tensorboard.backend.event_processing.event_accumulator import (
        SCALARS,
        EventAccumulator,
    )

    acc = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return []
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def steps_of(log_dir: Path, tag: str) -> list[int]:
    return [s for s, _ in logged(log_dir, tag)]


def fill_the_disk(monkeypatch, room: int = 100_000) -> None:
    """Make :func:`specopt.checkpoint.atomic_write`'s temp file take ``room`` bytes, then
    fail every write with ENOSPC, as a filling disk does (the writers, e.g. ``torch.save``,
    react as they really do: its zip writer reports "unexpected pos", not the errno)."""
    import errno
    import io
    import os

    import specopt.checkpoint as checkpoint

    class FillingFile(io.RawIOBase):
        def __init__(self, fd: int) -> None:
            self.fd, self.left = fd, room

        def writable(self) -> bool:
            return True

        def write(self, data) -> int:
            if self.left <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            n = os.write(self.fd, bytes(data[: self.left]))
            self.left -= n
            return n

        def fileno(self) -> int:
            return self.fd

        def close(self) -> None:
            if not self.closed:
                os.close(self.fd)
            super().close()

    class FullDiskOs:  # os for specopt.checkpoint alone (data loading opens files too)
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def fdopen(fd, mode="r", *args, **kwargs):
            return io.BufferedWriter(FillingFile(fd))

    monkeypatch.setattr(checkpoint, "os", FullDiskOs())
