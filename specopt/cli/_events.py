"""Read a run's TensorBoard event files back into arrays (used by compare and diagnose).

TensorBoard's ``event_accumulator.EventAccumulator`` reads the run folder: every event file directly
under it (all writers of one run: the trainer's and the spectral monitor's), in name
order (the names embed the creation time), honouring TensorBoard's purge rule: a
``SessionLog.START`` event at step ``s`` (written when a run resumes from a checkpoint)
discards points at steps ``>= s`` read so far, so a crashed-and-resumed run reads as one
clean history. Nothing is subsampled (TensorBoard keeps a reservoir sample by default).
One deviation: the accumulator purges its scalar, histogram, image and audio reservoirs
but not its tensors, where texts (the monitor's alarms) and new-style scalars live; a
small subclass purges those too, so an alarm from a crashed segment does not survive.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["EventFileError", "RunLog", "find_event_files", "read_run"]

#: Points kept per tag and kind: 0 keeps every point (scalars; tensors: texts and
#: new-style scalars); kinds specopt never reads back keep 1, so memory stays bounded.
_SIZE_GUIDANCE = {"scalars": 0, "tensors": 0, "histograms": 1, "compressedHistograms": 1,
                  "images": 1, "audio": 1}


class EventFileError(ValueError):
    """An event file of the run folder is not a readable TensorBoard event file."""



@dataclass
class RunLog:
    """Scalars and text summaries of one run.

    Attributes:
        path: the run folder.
        scalars: tag -> (steps int64 (n,), values float64 (n,)), sorted by step; one value
            per step (the last written wins).
        texts: list of (step, tag, text), sorted by step.
        wall: tag -> (first, last) wall-clock time in seconds, for run duration.
        warnings: one line per event file read only in part (a damaged record).
    """

    path: Path
    scalars: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    texts: list[tuple[int, str, str]] = field(default_factory=list)
    wall: tuple[float, float] = (math.nan, math.nan)
    warnings: list[str] = field(default_factory=list)

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
    if not root.exists():
        raise FileNotFoundError(f"log folder {str(root)!r} does not exist")

    def created(p: Path) -> tuple[float, str]:
        # events.out.tfevents.<unix time>.<host>.<pid>.<counter><suffix>
        parts = p.name.split(".")
        try:
            return float(parts[3]), p.name
        except (IndexError, ValueError):
            return p.stat().st_mtime, p.name

    if not root.is_dir():
        raise NotADirectoryError(
            f"run folder {str(root)!r} is a file, expected the folder holding the run's "
            "TensorBoard event files"
        )
    return sorted((p for p in root.glob("events.out.tfevents.*") if p.is_file()), key=created)


def _scan_event_file(path: Path) -> str | None:
    """Check one event file's records; returns a warning when part of it is damaged.

    Raises :class:`EventFileError` unless ``path`` starts with a TensorBoard record:
    EventAccumulator silently yields nothing for a file of random bytes, and a run whose
    logs are garbage must say so rather than "no train/loss". An empty file (a writer
    killed as it opened) and a truncated last record (killed mid-write, or still being
    written) are normal. A damaged record with complete records after it is not: the
    accumulator, like TensorBoard, stops there, so the warning says how much is ignored.
    Records are 8-byte length, 4-byte CRC, data, 4-byte CRC (TFRecord framing); the
    scan reads the bytes once more but parses only the first record.
    """
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2

    try:
        size = path.stat().st_size
        if size == 0:
            return None
        records = iter(RawEventFileLoader(str(path)).Load())
        first = next(records, None)
        consumed = 0 if first is None else len(first) + 16
        for record in records:
            consumed += len(record) + 16
        if first is not None:
            first_event = event_pb2.Event.FromString(first)
        with open(path, "rb") as f:
            f.seek(consumed)
            header = f.read(8)
    except OSError as exc:
        raise EventFileError(f"cannot read event file {str(path)!r}: {exc.strerror or exc}") \
            from exc
    except Exception as exc:  # the record reader's DataLossError, a protobuf DecodeError
        raise EventFileError(f"event file {str(path)!r} is corrupt: {exc}") from exc
    if first is None or not first_event.HasField("file_version"):
        raise EventFileError(
            f"event file {str(path)!r} is not a TensorBoard event file (no valid first record)"
        )
    left = size - consumed
    if left and len(header) == 8 and consumed + 16 + int.from_bytes(header, "little") <= size:
        return (f"event file {str(path)!r} is damaged at byte {consumed}: the {left} bytes after "
                "it are ignored (as TensorBoard does)")
    return None


def _tensor_value(event, plugin: str) -> tuple[str, float | str] | None:
    """('scalar', x) or ('text', s) of a TensorEvent, None for other kinds."""
    from tensorboard.util import tensor_util

    array = tensor_util.make_ndarray(event.tensor_proto)
    if plugin == "text":
        items = array.reshape(-1).tolist()
        return "text", "\n".join(
            x.decode("utf-8", errors="replace") if isinstance(x, bytes) else str(x) for x in items
        )
    if plugin in ("scalars", "") and array.ndim == 0 and array.dtype.kind == "f":
        return "scalar", float(array)
    return None


def _accumulator_class() -> type:
    """EventAccumulator whose restart purge also covers its tensor reservoir (see the
    module docstring); built lazily so importing this module does not import tensorboard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    class _Accumulator(EventAccumulator):
        def _Purge(self, event, by_tags):  # overrides TensorBoard's method
            super()._Purge(event, by_tags)
            if not by_tags:  # a SessionLog.START restart at event.step
                self.tensors.FilterItems(lambda item: item.step < event.step)

    return _Accumulator


def read_run(logdir: str | Path) -> RunLog:
    """Parse all event files of one run folder with TensorBoard's ``EventAccumulator``.

    Raises:
        FileNotFoundError: the folder does not exist or holds no event files.
        NotADirectoryError: ``logdir`` is a file.
        EventFileError: an event file is unreadable or not an event file (named). A file
            damaged part-way is read up to the damage and named in ``RunLog.warnings``.
    """
    files = find_event_files(logdir)
    if not files:
        raise FileNotFoundError(
            f"no TensorBoard event files in {str(logdir)!r} (expected a run folder written by "
            "`specopt train` or SpectralMonitor)"
        )
    warnings = [w for w in map(_scan_event_file, files) if w is not None]
    acc = _accumulator_class()(str(logdir), size_guidance=_SIZE_GUIDANCE)
    # A resumed run's purge is expected, not news: TensorBoard logs each one as a warning.
    tb_logger = logging.getLogger("tensorboard")
    level = tb_logger.level
    tb_logger.setLevel(logging.ERROR)
    try:
        acc.Reload()
    finally:
        tb_logger.setLevel(level)
    tags = acc.Tags()
    points: dict[str, dict[int, float]] = {}
    texts: dict[tuple[int, str], str] = {}
    walls: list[float] = []
    for tag in tags["scalars"]:
        series = points.setdefault(tag, {})
        for ev in acc.Scalars(tag):  # in write order: the last value of a step wins
            series[int(ev.step)] = float(ev.value)
            walls.append(ev.wall_time)
    for tag in tags["tensors"]:
        plugin = acc.SummaryMetadata(tag).plugin_data.plugin_name
        for ev in acc.Tensors(tag):
            parsed = _tensor_value(ev, plugin)
            if parsed is None:
                continue
            walls.append(ev.wall_time)
            kind, x = parsed
            if kind == "scalar":
                points.setdefault(tag, {})[int(ev.step)] = float(x)
            else:
                # torch's add_text writes "<tag>/text_summary": report the user's tag.
                texts[(int(ev.step), tag.removesuffix("/text_summary"))] = str(x)
    run = RunLog(Path(logdir))
    for tag, series in points.items():
        if not series:
            continue
        steps = np.array(sorted(series), dtype=np.int64)
        run.scalars[tag] = (steps, np.array([series[s] for s in steps], dtype=np.float64))
    run.texts = [(s, tag, text) for (s, tag), text in sorted(texts.items())]
    if walls:
        run.wall = (min(walls), max(walls))
    run.warnings = warnings
    return run
