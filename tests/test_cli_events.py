"""`specopt.cli._events.read_run` (TensorBoard's EventAccumulator underneath) reads back
exactly what the writers wrote: every point (no reservoir sampling), texts, tensor-encoded
scalars, and a resumed run's purge of the steps after its restart point."""

from __future__ import annotations

import numpy as np
import pytest

from specopt.cli._events import EventFileError, find_event_files, read_run


def test_resumed_run_reads_as_one_history(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    first = SummaryWriter(str(tmp_path))
    for step in range(1, 7):
        first.add_scalar("train/loss", 10.0 + step, step)
        first.add_scalar("train/new_style", 0.5 * step, step, new_style=True)
    first.add_text("alarms", "step 2: early", 2)
    first.add_text("alarms", "step 5: orphaned", 5)
    first.close()
    # Crash after step 6, resume from the step-3 checkpoint: steps >= 4 are rewritten.
    resumed = SummaryWriter(str(tmp_path), purge_step=4)
    for step in range(4, 9):
        resumed.add_scalar("train/loss", 20.0 + step, step)
    resumed.close()
    assert len(find_event_files(tmp_path)) == 2
    run = read_run(tmp_path)
    steps, loss = run.series("train/loss")
    assert steps.tolist() == list(range(1, 9))
    assert loss.tolist() == [11.0, 12.0, 13.0, 24.0, 25.0, 26.0, 27.0, 28.0]
    s2, v2 = run.series("train/new_style")  # tensor-encoded scalars, purged from step 4
    assert s2.tolist() == [1, 2, 3] and v2.tolist() == [0.5, 1.0, 1.5]
    assert run.texts == [(2, "alarms", "step 2: early")]
    assert run.wall[0] <= run.wall[1] and np.isfinite(run.wall).all()


def test_every_point_is_kept_and_the_last_value_of_a_step_wins(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path))
    n = 12_000  # above TensorBoard's default reservoir of 10,000 scalars per tag
    for step in range(n):
        w.add_scalar("x", float(step), step)
    w.add_scalar("x", -1.0, 7)  # rewritten step: last write wins
    w.close()
    steps, values = read_run(tmp_path).series("x")
    expected = np.arange(n, dtype=np.float64)
    expected[7] = -1.0
    assert steps.tolist() == list(range(n)) and np.array_equal(values, expected)


def test_bad_run_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_run(tmp_path / "nope")
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="is a file, expected the folder"):
        read_run(tmp_path / "f")
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
        read_run(tmp_path)
    bad = tmp_path / "events.out.tfevents.1700000000.h.1.0"
    bad.write_bytes(b"\x00" * 64)  # zero length records, bad CRC / no file_version
    with pytest.raises(EventFileError, match=r"events\.out\.tfevents\.1700000000\.h\.1\.0"):
        read_run(tmp_path)
    bad.write_bytes(b"")  # a writer killed as it opened: nothing to read, not an error
    assert read_run(tmp_path).scalars == {}


def test_damaged_record_mid_file_is_named_and_a_truncated_tail_is_not(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    from specopt.cli.main import main

    w = SummaryWriter(str(tmp_path))
    for step in range(1, 201):
        w.add_scalar("train/loss", 2.0, step)
    w.close()
    (path,) = find_event_files(tmp_path)
    blob = path.read_bytes()
    path.write_bytes(blob[:-7])  # killed mid-write: normal, no warning
    run = read_run(tmp_path)
    assert run.warnings == [] and run.series("train/loss")[0].tolist() == list(range(1, 200))
    damaged = bytearray(blob)
    middle = len(blob) // 2
    damaged[middle:middle + 4] = bytes(b ^ 0xFF for b in damaged[middle:middle + 4])
    path.write_bytes(bytes(damaged))
    run = read_run(tmp_path)
    steps = run.series("train/loss")[0]
    assert 50 < steps.size < 150 and steps.tolist() == list(range(1, steps.size + 1))
    (warning,) = run.warnings
    assert str(path) in warning and "is damaged at byte" in warning and "ignored" in warning
    assert main(["diagnose", str(tmp_path)]) == 0
    assert "specopt diagnose: warning: event file" in capsys.readouterr().err
