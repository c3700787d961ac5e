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
