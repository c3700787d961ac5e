"""The README's distributed command, `torchrun --nproc_per_node 2 -m specopt train --ddp`,
end to end on CPU (gloo), and its refusal without torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from distributed_utils import free_port
from train_utils import steps_of, write_corpus

from specopt.cli.main import main


@pytest.mark.slow
def test_readme_ddp_command_trains_logs_once_and_checkpoints(tmp_path):
    run = tmp_path / "run"
    data = write_corpus(tmp_path, 60_000)
    # The monitor's distributed cadence is another test's subject (tests/test_distributed.py);
    # here: the CLI path (launch, DDP wrap, rank-0 logging, DCP checkpoints).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
           "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "specopt", "train", "--ddp",
           "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--eval-every", "0",
           "--eval-batches", "1", "--ckpt-every", "2", "--no-monitor", "--no-progress",
           "--data", str(data), "--log-dir", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("final validation") == 1  # rank 0 alone prints
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    assert steps_of(run, "train/loss") == [1, 2, 3, 4]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_0000002", "step_0000004"]
    assert (run / "checkpoints" / "step_0000004" / ".metadata").is_file()


def test_ddp_without_torchrun_says_how_to_launch(tmp_path, capsys, monkeypatch):
    for var in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    assert main(["train", "--ddp", "--no-progress", "--log-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "torchrun --nproc_per_node 2 -m specopt train --ddp" in err
    assert not (tmp_path / "r").exists()
