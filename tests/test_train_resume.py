"""`specopt train --resume` into the same run: every logged step exactly once, the LR
schedule continued without a jump, and a run killed with SIGKILL resumed to the same
weights as an uninterrupted one.

Event files are read back with TensorBoard's own ``EventAccumulator``
(``train_utils.logged``).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from train_utils import TINY, logged, steps_of, write_corpus

from specopt.checkpoint import load_checkpoint
from specopt.cli.main import main
from specopt.cli.train import lr_factor

SPECTRAL_TAG = "spectral/condition_number/layers.0.feed_forward.w1"


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data"))


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


def test_resume_from_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path, data_file):
    """Rewinding a run (resume from step 3 of 6, stopping at 5) abandons step 6: its
    checkpoint is moved aside, so the next `--resume RUN` continues the rewound timeline
    (before: it picked step 6 of the abandoned one, and step 6 was never logged again)."""
    run = tmp_path / "run"
    assert train(*TINY, "--steps", "6", "--ckpt-every", "3", "--monitor-every", "100",
                 "--data", data_file, "--log-dir", run) == 0
    abandoned = (run / "checkpoints" / "step_0000006.pt").read_bytes()
    assert train("--resume", run / "checkpoints" / "step_0000003.pt", "--steps", "5",
                 "--no-progress") == 0
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*.pt")) == [
        "step_0000003.pt", "step_0000005.pt"]
    aside = run / "checkpoints" / "superseded_at_step_0000003" / "step_0000006.pt"
    assert aside.read_bytes() == abandoned  # moved, not lost
    assert train("--resume", run, "--steps", "7", "--no-progress") == 0
    assert steps_of(run, "train/loss") == list(range(1, 8))
    assert load_checkpoint(run / "checkpoints" / "step_0000007.pt")["step"] == 7
    # The set-aside checkpoint still resumes into its run (a rewind to that continuation).
    assert train("--resume", aside, "--steps", "7", "--no-progress") == 0
    assert steps_of(run, "train/loss") == list(range(1, 8))
    assert not list(aside.parent.glob("events.*"))  # not a run inside checkpoints/


def test_resume_from_another_folder_reads_the_runs_data_file(tmp_path, monkeypatch, capsys):
    """`--data corpus.txt` is saved as an absolute path: a resume started in a folder that
    has another corpus.txt trains on the run's file (before: silently on the other one),
    and `--data ./corpus.txt` naming the same file is not a change."""
    first, other = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    other.mkdir()
    write_corpus(first, 40_000)
    (other / "corpus.txt").write_bytes(b"other text " * 5000)
    run = tmp_path / "run"
    monkeypatch.chdir(first)
    assert train(*TINY, "--steps", "2", "--monitor-every", "100", "--data", "corpus.txt",
                 "--log-dir", run) == 0
    saved = load_checkpoint(run / "checkpoints" / "step_0000002.pt")["config"]["train"]
    assert saved["data"] == str(first / "corpus.txt")
    monkeypatch.chdir(other)
    capsys.readouterr()
    assert train("--resume", run, "--steps", "3", "--no-progress") == 0
    assert f"{first / 'corpus.txt'}: 1 file(s)" in capsys.readouterr().out
    monkeypatch.chdir(first)
    assert train("--resume", run, "--steps", "4", "--data", "./corpus.txt",
                 "--no-progress") == 0


def test_lr_is_continuous_when_resume_extends_the_steps(tmp_path, data_file):
    run = tmp_path / "run"
    assert train(*TINY, "--warmup", "2", "--lr", "0.01", "--monitor-every", "100",
                 "--steps", "8", "--ckpt-every", "4", "--data", data_file,
                 "--log-dir", run) == 0
    before = dict(logged(run, "train/lr"))
    assert train("--resume", run / "checkpoints" / "step_0000004.pt", "--steps", "12",
                 "--no-progress") == 0
    lr = dict(logged(run, "train/lr"))
    assert sorted(lr) == list(range(1, 13))
    # Steps 1-4 as logged before; step 5 gets the LR the 8-step run gave it (no jump);
    # from there the cosine runs down to final_lr_ratio (0.1) at the new last step, 12.
    assert all(lr[s] == before[s] for s in range(1, 6))
    f4 = lr_factor(4, warmup=2, total=8, final_ratio=0.1)
    for step in range(5, 13):
        progress = (step - 5) / (12 - 1 - 4)
        want = 0.01 * (0.1 + (f4 - 0.1) * 0.5 * (1 + math.cos(math.pi * progress)))
        assert lr[step] == pytest.approx(want, rel=1e-6), step
    assert lr[12] == pytest.approx(0.001, rel=1e-6)
    values = [lr[s] for s in range(3, 13)]
    assert all(a > b for a, b in itertools.pairwise(values)), values  # after warmup: down
    # A second resume without --steps keeps the anchored schedule (it is in the config).
    ckpt = load_checkpoint(run / "checkpoints" / "step_0000008.pt")
    assert ckpt["config"]["train"]["lr_anchor_step"] == 4
    assert train("--resume", run / "checkpoints" / "step_0000008.pt", "--no-progress") == 0
    assert dict(logged(run, "train/lr")) == pytest.approx(lr, rel=1e-12)


def test_resume_with_a_new_lr_rescales_the_schedule(tmp_path, data_file, capsys):
    run = tmp_path / "run"
    assert train(*TINY, "--warmup", "2", "--lr", "0.01", "--monitor-every", "100",
                 "--steps", "8", "--ckpt-every", "4", "--data", data_file,
                 "--log-dir", run) == 0
    before = dict(logged(run, "train/lr"))
    capsys.readouterr()
    assert train("--resume", run / "checkpoints" / "step_0000004.pt", "--lr", "0.02",
                 "--no-progress") == 0
    assert "--lr 0.02 replaces the checkpoint's peak LR 0.01" in capsys.readouterr().out
    lr = dict(logged(run, "train/lr"))
    assert all(lr[s] == before[s] for s in range(1, 5))
    for step in range(5, 9):
        assert lr[step] == pytest.approx(2 * before[step], rel=1e-6), step


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


#: Runs `specopt train` in a child process that SIGKILLs itself at a chosen moment:
#: "step" kills at the start of step KILL_AT + 1 (everything up to KILL_AT logged and
#: checkpointed where due); "write" kills halfway through writing checkpoint KILL_AT.
_KILLER = """
import os, signal, sys
import torch
import specopt.cli.train as train_module
from specopt.cli.main import main

mode, kill_at = os.environ["KILL_MODE"], int(os.environ["KILL_AT"])
real_loss, real_save, calls = train_module.train_loss, torch.save, [0]

def loss_then_kill(*args, **kwargs):
    calls[0] += 1
    if mode == "step" and calls[0] == kill_at + 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_loss(*args, **kwargs)

def save_then_kill(obj, f, *args, **kwargs):
    if mode == "write" and isinstance(obj, dict) and obj.get("step") == kill_at:
        f.write(b"half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)

train_module.train_loss, torch.save = loss_then_kill, save_then_kill
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "kill_at", "resumes_at"), [("step", 5, 3), ("write", 6, 3)],
                         ids=["killed-mid-run", "killed-writing-a-checkpoint"])
def test_kill_and_resume_logs_each_step_once_and_ends_bit_identical(
        tmp_path, data_file, mode, kill_at, resumes_at):
    import os
    import signal
    import subprocess
    import sys

    flags = [*TINY, "--steps", "8", "--ckpt-every", "3", "--monitor-every", "2",
             "--data", str(data_file)]
    straight = tmp_path / "straight"
    assert train(*flags, "--log-dir", straight) == 0
    run = tmp_path / "killed"
    env = {**os.environ, "KILL_MODE": mode, "KILL_AT": str(kill_at), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _KILLER, "train", *flags, "--log-dir",
                           str(run)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert [n for n in names if n.startswith("step_")] == [f"step_{resumes_at:07d}.pt"]
    assert (mode == "write") == any(n.endswith(".tmp") for n in names)  # a leftover

    assert train("--resume", run, "--no-progress") == 0
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert steps_of(run, "train/loss") == list(range(1, 9))
    assert steps_of(run, SPECTRAL_TAG) == [2, 4, 6, 8]
    assert logged(run, "train/loss") == logged(straight, "train/loss")
    a = load_checkpoint(straight / "checkpoints" / "step_0000008.pt")["model"]
    b = load_checkpoint(run / "checkpoints" / "step_0000008.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
