"""`specopt train --resume` into the same run: every logged step exactly once, the LR
schedule continued without a jump, and a run killed with SIGKILL resumed to the same
weights as an uninterrupted one.

Event files are read back with TensorBoard's own ``EventAccumulator`` (which applies the
purge rule a resumed writer relies on and keeps duplicate steps, so "once" is checkable).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from specopt.checkpoint import load_checkpoint
from specopt.cli.main import main

TINY = ["--preset", "tiny", "--batch-size", "4", "--seq-len", "32", "--threads", "1",
        "--monitor-budget", "0", "--no-progress", "--eval-every", "0"]
SPECTRAL_TAG = "spectral/condition_number/layers.0.feed_forward.w1"


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    import sysconfig

    src = Path(sysconfig.get_paths()["stdlib"])
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_bytes((src / "argparse.py").read_bytes()[:100_000])
    return path


def logged(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every event of ``tag`` TensorBoard shows, duplicates included."""
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


def train(*argv: object) -> int:
    return main(["train", *(str(a) for a in argv)])


@pytest.mark.parametrize("resume_from", ["run", "step_0000003.pt"],
                         ids=["newest-checkpoint", "older-checkpoint"])
def test_resume_into_the_same_run_logs_every_step_once(tmp_path, data_file, resume_from):
    run = tmp_path / "run"
    assert train(*TINY, "--steps", "6", "--ckpt-every", "3", "--monitor-every", "2",
                 "--data", data_file, "--log-dir", run) == 0
    target = run if resume_from == "run" else run / "checkpoints" / resume_from
    assert train("--resume", target, "--steps", "8", "--no-progress") == 0
    assert steps_of(run, "train/loss") == list(range(1, 9))
    assert steps_of(run, "train/lr") == list(range(1, 9))
    # Snapshot at the checkpoint step (6) and those re-run after step 3 appear once each.
    assert steps_of(run, SPECTRAL_TAG) == [2, 4, 6, 8]


def test_resume_without_new_steps_keeps_the_schedule_and_weights(tmp_path, data_file):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = [*TINY, "--warmup", "2", "--steps", "8", "--monitor-every", "100",
              "--data", data_file]
    assert train(*common, "--ckpt-every", "0", "--log-dir", straight) == 0
    assert train(*common, "--ckpt-every", "4", "--log-dir", split) == 0
    assert train("--resume", split / "checkpoints" / "step_0000004.pt", "--no-progress") == 0
    assert logged(split, "train/lr") == logged(straight, "train/lr")
    a = load_checkpoint(straight / "checkpoints" / "step_0000008.pt")["model"]
    b = load_checkpoint(split / "checkpoints" / "step_0000008.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
