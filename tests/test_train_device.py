"""`specopt train --device / --dtype`: bf16 autocast on CPU, device resolution, and (with a
GPU) a CUDA run whose monitor, PC layers and checkpoints work there and resume on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_utils import TINY, logged, steps_of, write_corpus

from specopt.checkpoint import load_checkpoint
from specopt.cli.main import main
from specopt.cli.train import resolve_device

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SPECTRAL_TAG = "spectral/condition_number/layers.0.feed_forward.w1"


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data"), 60_000)


def train(*argv: object) -> int:
    return main(["train", *(str(a) for a in argv)])


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_bf16_autocast_on_cpu(tmp_path, data_file, capsys):
    common = [*TINY, "--device", "cpu", "--steps", "3", "--monitor-every", "3",
              "--eval-every", "3", "--data", data_file]
    assert train(*common, "--log-dir", tmp_path / "fp32") == 0
    assert train(*common, "--dtype", "bf16", "--log-dir", tmp_path / "bf16") == 0
    fp32 = [v for _, v in logged(tmp_path / "fp32", "train/loss")]
    bf16 = [v for _, v in logged(tmp_path / "bf16", "train/loss")]
    # Same model and batches: losses agree to bf16 precision but differ (autocast is on).
    assert fp32 != bf16 and fp32 == pytest.approx(bf16, rel=2e-2)
    assert steps_of(tmp_path / "bf16", SPECTRAL_TAG) == [3]
    ckpt = load_checkpoint(tmp_path / "bf16" / "checkpoints" / "step_0000003.pt")
    assert ckpt["config"]["train"]["dtype"] == "bf16"
    assert {v.dtype for v in ckpt["model"].values() if v.is_floating_point()} == {torch.float32}
    capsys.readouterr()
    # Numerics cannot change on resume: --dtype is refused, --device is applied.
    code = train("--resume", tmp_path / "bf16", "--steps", "4", "--dtype", "fp32")
    assert code == 2 and "--dtype (checkpoint: 'bf16', given: 'fp32')" in capsys.readouterr().err


@needs_cuda
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_run_checkpoints_and_resumes_on_cpu(tmp_path, data_file, dtype):
    run = tmp_path / "run"
    assert train(*TINY, "--device", "cuda", "--dtype", dtype, "--steps", "4", "--ckpt-every",
                 "2", "--monitor-every", "2", "--data", data_file, "--log-dir", run) == 0
    assert steps_of(run, SPECTRAL_TAG) == [2, 4]  # the monitor ran on the GPU's weights
    raw = torch.load(run / "checkpoints" / "step_0000002.pt", weights_only=True,
                     map_location=None)
    assert {v.device.type for v in raw["model"].values()} == {"cuda"}
    pc_u = [k for k in raw["model"] if k.endswith(".u")]
    assert pc_u, "PC buffers are in the checkpoint"
    # Resume the CUDA run's step-2 checkpoint on CPU into the same run: steps once each.
    assert train("--resume", run / "checkpoints" / "step_0000002.pt", "--device", "cpu",
                 "--steps", "6", "--no-progress") == 0
    assert steps_of(run, "train/loss") == list(range(1, 7))
    ckpt = load_checkpoint(run / "checkpoints" / "step_0000006.pt")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
