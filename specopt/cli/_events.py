"""Read a run's TensorBoard event files back into arrays (used by compare and diagnose).

Reads every ``events.out.tfevents.*`` file directly under the run folder (all writers of
one run: the trainer's and the spectral monitor's), in file-creation order, and honours
TensorBoard's purge rule: a ``SessionLog.START`` event at step ``s`` (written when a run
resumes from a checkpoint at step ``s``) discards points at steps ``>= s`` read so far,
so a crashed-and-resumed run reads as one clean history.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["RunLog", "find_event_files", "read_run"]


@dataclass
class RunLog:
    """Scalars and text summaries of one run.

    Attributes:
        path: the run folder.
        scalars: tag -> (steps int64 (n,), values float64 (n,)), sorted by step; one value
            per step (the last written wins).
        texts: list of (step, tag, text), sorted by step.
        wall: tag -> (first, last) wall-clock time in seconds, for run duration.
    """

    path: Path
    scalars: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    texts: list[tuple[int, str, str]] = field(default_factory=list)
    wall: tuple[float, float] = (math.nan, math.nan)

    @property
    def name(self) -> str:
        return self.path.name

    def series(self, tag: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of ``tag``, empty arrays when absent."""
        return self.scalars.get(tag, (np.zeros(0, np.int64), np.zeros(0)))

    def tags_with_prefix(self, prefix: str) -> list[str]:
        return sorted(t for t in self.scalars if t.startswith(prefix))

    def last(self, tag: str) -> float:
        _, values = self.series(tag)
        return float(values[-1]) if values.size else math.nan


def find_event_files(logdir: str | Path) -> list[Path]:
    """Event files directly in ``logdir``, oldest first (TensorBoard names embed the time)."""
    root = Path(logdir)
    if not root.is_dir():
        raise FileNotFoundError(f"log folder {str(root)!r} does not exist")

    def created(p: Path) -> tuple[float, str]:
        # events.out.tfevents.<unix time>.<host>.<pid>.<counter><suffix>
        parts = p.name.split(".")
        try:
            return float(parts[3]), p.name
        except (IndexError, ValueError):
            return p.stat().st_mtime, p.name

    return sorted((p for p in root.glob("events.out.tfevents.*") if p.is_file()), key=created)


def _value_of(value) -> tuple[str, float | str] | None:
    """('scalar', x) or ('text', s) for one Summary.Value, None for other kinds."""
    if value.HasField("simple_value"):
        return "scalar", float(value.simple_value)
    plugin = value.metadata.plugin_data.plugin_name
    if not value.HasField("tensor"):
        return None
    tensor = value.tensor
    if plugin == "text":
        texts = [s.decode("utf-8", errors="replace") for s in tensor.string_val]
        return "text", "\n".join(texts)
    if plugin in ("scalars", "") and not tensor.tensor_shape.dim:
        if tensor.float_val:
            return "scalar", float(tensor.float_val[0])
        if tensor.double_val:
            return "scalar", float(tensor.double_val[0])
        if tensor.tensor_content:
            dtype = {1: np.float32, 2: np.float64}.get(tensor.dtype)
            if dtype is not None:
                return "scalar", float(np.frombuffer(tensor.tensor_content, dtype=dtype)[0])
    return None


def read_run(logdir: str | Path) -> RunLog:
    """Parse all event files of one run folder.

    Raises:
        FileNotFoundError: the folder does not exist or holds no event files.
    """
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    files = find_event_files(logdir)
    if not files:
        raise FileNotFoundError(
            f"no TensorBoard event files in {str(logdir)!r} (expected a run folder written by "
            "`specopt train` or SpectralMonitor)"
        )
    points: dict[str, dict[int, float]] = {}
    texts: dict[tuple[int, str], str] = {}
    first_wall, last_wall = math.inf, -math.inf
    for path in files:
        for event in LegacyEventFileLoader(str(path)).Load():
            step = int(event.step)
            if event.HasField("session_log") and event.session_log.status == 1:  # START
                for series in points.values():
                    for s in [s for s in series if s >= step]:
                        del series[s]
                for key in [k for k in texts if k[0] >= step]:
                    del texts[key]
                continue
            if not event.HasField("summary"):
                continue
            first_wall = min(first_wall, event.wall_time)
            last_wall = max(last_wall, event.wall_time)
            for value in event.summary.value:
                parsed = _value_of(value)
                if parsed is None:
                    continue
                kind, x = parsed
                if kind == "scalar":
                    points.setdefault(value.tag, {})[step] = float(x)
                else:
                    # torch's add_text writes "<tag>/text_summary": report the user's tag.
                    tag = value.tag.removesuffix("/text_summary")
                    texts[(step, tag)] = str(x)
    run = RunLog(Path(logdir))
    for tag, series in points.items():
        if not series:
            continue
        steps = np.array(sorted(series), dtype=np.int64)
        run.scalars[tag] = (steps, np.array([series[s] for s in steps], dtype=np.float64))
    run.texts = [(s, tag, text) for (s, tag), text in sorted(texts.items())]
    if math.isfinite(first_wall):
        run.wall = (first_wall, last_wall)
    return run
