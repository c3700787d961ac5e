"""`specopt train` failure paths: every bad flag, bad checkpoint, unwritable output and
changed flag on `--resume` is one line naming the flag/file and the problem, exit 2, no
traceback, and nothing half-written; crash leftovers are cleaned and a run that stopped
before its first checkpoint restarts in place."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import pytest
import torch
from train_utils import TINY, steps_of, write_corpus

from specopt.checkpoint import load_checkpoint, save_checkpoint
from specopt.cli.main import main
from specopt.cli.train import available_cpus

QUIET = ["--monitor-every", "100"]  # no snapshot in these short runs
RUN = [*TINY, *QUIET]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data"), 60_000)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_file) -> Path:
    """A 2-step Muon + PC run (checkpoints at 1 and 2)."""
    run = tmp_path_factory.mktemp("runs") / "base"
    assert main(["train", *RUN, "--steps", "2", "--ckpt-every", "1", "--data", str(data_file),
                 "--log-dir", str(run)]) == 0
    return run


def fails(capsys, *argv: object) -> str:
    """Run `specopt ...`; assert exit 2 with a one-line message; return that line."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


BAD_FLAGS = [
    (["--pc-level", "9"], "--pc-level must be one of the published levels [1, 2, 3, 4], got 9"),
    (["--no-pc", "--pc-level", "9"], "--pc-level must be one of the published levels"),
    (["--no-pc", "--pc-level", "2"], "--pc-level 2 is given but the PC layer is off (--no-pc)"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0, got -1.0"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0, got nan"),
    (["--grad-clip", "-1"], "--grad-clip must be a finite number >= 0, got -1.0"),
    (["--grad-clip", "nan"], "--grad-clip must be a finite number >= 0, got nan"),
    (["--grad-clip", "inf"], "--grad-clip must be a finite number >= 0, got inf"),
    (["--lr", "nan"], "--lr must be a positive finite number, got nan"),
    (["--lr", "-0.1"], "--lr must be a positive finite number, got -0.1"),
    (["--monitor-budget", "nan"], "--monitor-budget must be in [0, 1], got nan"),
    (["--steps", "0"], "--steps must be positive, got 0"),
    (["--batch-size", "0"], "--batch-size must be positive, got 0"),
    (["--monitor-every", "0"], "--monitor-every must be positive, got 0"),
    (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
    (["--keep-checkpoints", "-1"], "--keep-checkpoints must be >= 0, got -1"),
    (["--threads", str(available_cpus() + 1)],
     f"--threads must be <= {available_cpus()} (the CPUs this process may use)"),
    (["--threads", "1000"], "--threads must be <= "),
    (["--seq-len", "100000"],
     "--seq-len must be <= 128, the tiny model's context (max_seq_len), got 100000"),
    (["--ddp"], "--ddp: distributed training needs a launcher: run it with torchrun"),
    (["--fsdp"], "--fsdp: distributed training needs a launcher"),
    (["--ddp", "--resume", "x"], "--ddp/--fsdp cannot be combined with --resume"),
    (["--compare", "--resume", "x"], "--compare starts two fresh runs"),
    (["--seed", str(2**64)], f"--seed must be < 2**63 ({2**63}), got {2**64}"),
    (["--resume", "/dev/null"], "--resume path '/dev/null' is not a regular file or folder"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_FLAGS,
                         ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, monkeypatch,
                                                        data_file, flags, message):
    for var in ("WORLD_SIZE", "RANK"):  # as if not launched by torchrun
        monkeypatch.delenv(var, raising=False)
    line = fails(capsys, "train", *RUN, *flags, "--data", data_file,
                 "--log-dir", tmp_path / "r")
    assert line.startswith("specopt train: error: ") and message in line, line
    assert not (tmp_path / "r").exists()


def test_out_of_memory_is_one_line_exit_2_naming_the_flags(tmp_path, capsys, monkeypatch,
                                                           data_file):
    """An allocation that fails (here: torch's real CPU allocator error for 2**60 bytes, in
    place of a huge --batch-size's forward) is the environment, not a bug."""
    import specopt.cli.train as train_cmd

    def huge(*args, **kwargs):
        return torch.empty(2**60, dtype=torch.uint8)

    monkeypatch.setattr(train_cmd, "train_loss", huge)
    line = fails(capsys, "train", *RUN, "--steps", "1", "--data", data_file,
                 "--log-dir", tmp_path / "r")
    assert line == ("specopt train: error: out of memory (tried to allocate "
                    f"{2**60} bytes): a smaller --batch-size, --seq-len or --preset needs less")


def test_device_cuda_without_cuda_is_refused(tmp_path, capsys, data_file):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    line = fails(capsys, "train", *RUN, "--device", "cuda", "--data", data_file,
                 "--log-dir", tmp_path / "r")
    assert "--device cuda: no CUDA device is available" in line


def test_log_dir_that_is_a_file(tmp_path, capsys, data_file):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    line = fails(capsys, "train", *RUN, "--data", data_file, "--log-dir", target)
    assert f"--log-dir {str(target)!r} is a file, not a folder" in line
    assert target.read_text() == "keep me"


def test_log_dir_below_a_file(tmp_path, capsys, data_file):
    (tmp_path / "f").write_text("")
    line = fails(capsys, "train", *RUN, "--data", data_file, "--log-dir", tmp_path / "f" / "r")
    assert "cannot create --log-dir" in line and "Not a directory" in line


# ---------------------------------------------------------------- --resume with changed flags


def test_resume_refuses_changed_flags_and_lists_them(finished_run, capsys):
    line = fails(capsys, "train", "--resume", finished_run, "--steps", "3", "--optimizer",
                 "adamw", "--no-pc", "--seed", "1", "--batch-size", "8", "--preset", "small",
                 "--data", "/elsewhere.txt", "--weight-decay", "0")
    for flag in ("--optimizer (checkpoint: 'muon', given: 'adamw')",
                 "--pc (checkpoint: True, given: False)", "--seed (checkpoint: 0, given: 1)",
                 "--batch-size (checkpoint: 4, given: 8)",
                 "--preset (checkpoint: 'tiny', given: 'small')", "--data (checkpoint:",
                 "--weight-decay (checkpoint: 0.1, given: 0.0)"):
        assert flag in line, flag
    assert "cannot change on --resume" in line and "--lr" in line  # names what may change


def test_resume_accepts_flags_equal_to_the_checkpoint(finished_run, tmp_path, capsys,
                                                      data_file):
    # --optimizer muon and --pc-level 2 are what the checkpoint has (implicitly): no change.
    assert main(["train", "--resume", str(finished_run / "checkpoints" / "step_0000001.pt"),
                 "--log-dir", str(tmp_path / "again"), "--optimizer", "muon", "--pc",
                 "--pc-level", "2", "--seed", "0", "--batch-size", "4", "--data",
                 str(data_file), "--no-progress", "--threads", "1"]) == 0


def test_resume_into_a_folder_holding_another_run_is_refused(finished_run, tmp_path, capsys,
                                                             data_file):
    """Before: the other run's events after the checkpoint step were purged and the two
    runs' checkpoints and events mixed in one folder."""
    other = tmp_path / "other"
    assert main(["train", *RUN, "--steps", "3", "--data", str(data_file),
                 "--log-dir", str(other)]) == 0
    before = {p: p.stat().st_mtime_ns for p in other.rglob("*")}
    line = fails(capsys, "train", "--resume", finished_run, "--steps", "4", "--log-dir", other)
    assert line == (f"specopt train: error: --log-dir {str(other)!r} already holds another run; "
                    f"resume into the checkpoint's own run ({str(finished_run)!r}, the default) "
                    "or an empty --log-dir")
    assert {p: p.stat().st_mtime_ns for p in other.rglob("*")} == before


def test_a_run_folder_in_use_by_another_training_is_refused(tmp_path, capsys, data_file):
    """The same command started twice (or a --resume of a run still going) would delete
    the other's checkpoint temp files and purge its events; the second one now stops."""
    from specopt.cli.train import lock_run_folder

    run = tmp_path / "r"
    run.mkdir()
    held = lock_run_folder(run)  # stands in for a training that is still running
    if held is None:
        pytest.skip("no flock on this OS")
    (run / "checkpoints").mkdir()
    in_flight = run / "checkpoints" / ".step_0000002.pt.abc123.tmp"
    in_flight.write_bytes(b"being written")
    line = fails(capsys, "train", *RUN, "--steps", "1", "--data", data_file, "--log-dir", run)
    assert line == (f"specopt train: error: --log-dir {str(run)!r} is in use by another "
                    f"specopt train (pid {os.getpid()}); wait for it to finish, or use another "
                    "--log-dir")
    assert in_flight.exists() and not list(run.glob("events.*"))
    held.close()  # the other training ended (or died: the kernel drops its lock)
    assert main(["train", *RUN, "--steps", "1", "--data", str(data_file),
                 "--log-dir", str(run)]) == 0
    assert not in_flight.exists()  # a stale leftover now, cleaned


def test_resume_that_raced_a_running_training_is_refused(tmp_path, capsys, monkeypatch,
                                                        data_file):
    """A resume chose the newest checkpoint, then the training still running wrote a newer
    one before releasing the folder: continuing would rewind the run by accident."""
    import shutil

    import specopt.cli.train as train_cmd

    run = tmp_path / "r"
    assert main(["train", *RUN, "--steps", "2", "--ckpt-every", "1", "--data", str(data_file),
                 "--log-dir", str(run)]) == 0
    real_lock = train_cmd.lock_run_folder

    def lock_after_the_other_training_ended(log_dir):
        folder = run / "checkpoints"
        shutil.copy(folder / "step_0000002.pt", folder / "step_0000003.pt")
        return real_lock(log_dir)

    monkeypatch.setattr(train_cmd, "lock_run_folder", lock_after_the_other_training_ended)
    capsys.readouterr()
    line = fails(capsys, "train", "--resume", run, "--steps", "5", "--no-progress")
    assert "got a newer checkpoint while this resume started" in line
    assert (run / "checkpoints" / "step_0000003.pt").exists()  # nothing set aside or purged


def test_resume_validates_applied_flags(finished_run, capsys):
    line = fails(capsys, "train", "--resume", finished_run, "--steps", "3", "--lr", "inf")
    assert "--lr must be a positive finite number, got inf" in line


# ---------------------------------------------------------------- bad checkpoints on --resume


def _edit_model(c):
    c["model"]["tok_embeddings.weight"] = torch.zeros(3, 5)


def _drop_tensor(c):
    del c["model"]["layers.0.attention.wq.weight"]


def _extra_tensor(c):
    c["model"]["surprise.weight"] = torch.zeros(2, 2)


def _bad_optimizer_state(c):
    entry = next(iter(c["optimizer"]["state"].values()))
    for key, value in entry.items():
        if isinstance(value, torch.Tensor) and value.ndim >= 1:
            entry[key] = torch.zeros(7)


def _nan_weight(c):
    w = c["model"]["layers.0.attention.wq.weight"].clone()
    w[0, 0] = float("nan")
    c["model"]["layers.0.attention.wq.weight"] = w


def _optimizer_groups(c):
    c["optimizer"]["param_groups"] = c["optimizer"]["param_groups"][:1]


BAD_CHECKPOINTS = [
    ("no-config", lambda c: c.pop("config"), "has no 'config'"),
    ("no-optimizer", lambda c: c.pop("optimizer"), "has no 'optimizer'"),
    ("no-rng", lambda c: c.pop("rng"), "has no 'rng'"),
    ("config-without-model", lambda c: c["config"].pop("model"),
     "'config' lacks the 'train' and 'model' option dicts"),
    ("bad-model-config", lambda c: c["config"]["model"].update(dim="wide"),
     "invalid model config"),
    ("bad-step", lambda c: c.update(step=-3), "has step -3; expected an int >= 0"),
    ("wrong-size-tensor", _edit_model,
     "wrong shapes: tok_embeddings.weight is (3, 5), the model has (256, 64)"),
    ("missing-tensor", _drop_tensor, "missing tensors: layers.0.attention.wq.weight"),
    ("unexpected-tensor", _extra_tensor, "unexpected tensors: surprise.weight"),
    ("optimizer-state-shape", _bad_optimizer_state, "optimizer state does not fit"),
    ("optimizer-groups", _optimizer_groups, "parameter groups"),
    # Resumed, it stopped at its first step with "loss nan" (exit 1), after writing events.
    ("nan-weights", _nan_weight, "holds NaN/Inf in 1 tensor(s): layers.0.attention.wq.weight; "
     "refusing to resume from it (the run diverged? use an earlier checkpoint)"),
]


@pytest.mark.parametrize(("edit", "message"), [(e, m) for _, e, m in BAD_CHECKPOINTS],
                         ids=[i for i, _, _ in BAD_CHECKPOINTS])
def test_bad_checkpoint_on_resume_names_file_and_problem(finished_run, tmp_path, capsys,
                                                         edit, message):
    ckpt = load_checkpoint(finished_run / "checkpoints" / "step_0000001.pt")
    edit(ckpt)
    ckpt.pop("format")
    path = save_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000001.pt", ckpt)
    line = fails(capsys, "train", "--resume", path, "--no-progress")
    assert str(path) in line and message in line, line
    assert not list((tmp_path / "run").glob("events.*"))  # refused before writing anything


def test_random_bytes_checkpoint(tmp_path, capsys):
    path = tmp_path / "step_0000001.pt"
    path.write_bytes(os.urandom(4096))
    line = fails(capsys, "train", "--resume", path)
    assert f"cannot load {str(path)!r} as a PyTorch file" in line
    assert "weights_only=False" not in line


# ---------------------------------------------------------------- unwritable / full disk


def test_disk_full_at_first_checkpoint(tmp_path, capsys, monkeypatch, data_file):
    import specopt.checkpoint as checkpoint

    real_save = torch.save

    def half_then_enospc(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.torch, "save", half_then_enospc)
    run = tmp_path / "r"
    line = fails(capsys, "train", *RUN, "--steps", "3", "--ckpt-every", "2", "--data",
                 data_file, "--log-dir", run)
    assert f"cannot write checkpoint {str(run / 'checkpoints' / 'step_0000002.pt')!r}" in line
    assert "No space left on device" in line and "no partial file" in line
    assert list((run / "checkpoints").iterdir()) == []  # no half checkpoint, no temp file
    monkeypatch.undo()
    from specopt.cli._events import read_run

    assert read_run(run).series("train/loss")[0].tolist() == [1, 2]  # logs were closed


def test_a_really_full_disk_is_one_line_exit_2(tmp_path, capsys, monkeypatch, data_file):
    """The real torch.save on a filling disk (not a mocked OSError): before, "unexpected
    RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos", exit 1."""
    from train_utils import fill_the_disk

    fill_the_disk(monkeypatch, room=1000)
    line = fails(capsys, "train", *RUN, "--steps", "1", "--data", data_file,
                 "--log-dir", tmp_path / "r")
    assert "cannot write checkpoint" in line and "No space left on device" in line, line
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.tmp"))


def test_unwritable_checkpoint_folder(tmp_path, capsys, data_file):
    run = tmp_path / "r"
    run.mkdir()
    (run / "checkpoints").write_text("")  # a file where the folder should go
    line = fails(capsys, "train", *RUN, "--steps", "1", "--data", data_file, "--log-dir", run)
    assert "cannot write checkpoint" in line and "step_0000001.pt" in line


def test_checkpoints_follow_the_umask(tmp_path, data_file):
    old = os.umask(0o027)
    try:
        assert main(["train", *RUN, "--steps", "1", "--data", str(data_file),
                     "--log-dir", str(tmp_path / "r")]) == 0
    finally:
        os.umask(old)
    ckpt = tmp_path / "r" / "checkpoints" / "step_0000001.pt"
    assert ckpt.stat().st_mode & 0o777 == 0o640


# ---------------------------------------------------------------- crash leftovers


def test_resume_removes_stale_temp_files(finished_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    stale = run / "checkpoints" / ".step_0000002.pt.k3j4h5.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert main(["train", "--resume", str(run), "--steps", "3", "--no-progress"]) == 0
    assert "an interrupted checkpoint write" in capsys.readouterr().out
    assert not stale.exists()


def test_run_stopped_before_its_first_checkpoint_restarts_in_place(tmp_path, capsys,
                                                                   data_file):
    import shutil

    run = tmp_path / "r"
    assert main(["train", *RUN, "--steps", "2", "--data", str(data_file),
                 "--log-dir", str(run)]) == 0
    shutil.rmtree(run / "checkpoints")  # as if killed at step 2, before any checkpoint
    capsys.readouterr()
    line = fails(capsys, "train", "--resume", run)
    assert "stopped before its first checkpoint: nothing to resume" in line
    assert main(["train", *RUN, "--steps", "3", "--data", str(data_file),
                 "--log-dir", str(run)]) == 0
    assert "starting it over in place" in capsys.readouterr().out
    assert steps_of(run, "train/loss") == [1, 2, 3]
    # A run that has a checkpoint is still protected.
    line = fails(capsys, "train", *RUN, "--steps", "3", "--data", data_file, "--log-dir", run)
    assert "already holds a run; pass --resume" in line


def test_resume_caps_the_checkpoints_threads_to_this_machine(finished_run, tmp_path, capsys):
    ckpt = load_checkpoint(finished_run / "checkpoints" / "step_0000001.pt")
    ckpt["config"]["train"]["threads"] = available_cpus() + 60  # saved on a bigger machine
    path = save_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000001.pt", ckpt)
    assert main(["train", "--resume", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"capped to the {available_cpus()} CPUs available here" in out
    resumed = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000002.pt")
    assert resumed["config"]["train"]["threads"] == available_cpus()


def test_nonfinite_loss_is_logged_once_at_the_step_it_stopped(tmp_path, data_file,
                                                               monkeypatch):
    """A non-finite loss at the third step: two finite losses at steps 1 and 2, the NaN at
    step 3 (the step not taken), no step logged twice, exit 1."""
    import math

    from train_utils import logged

    import specopt.cli.train as train_mod

    real, calls = train_mod.train_loss, []

    def nan_on_third(model, x, y):
        calls.append(1)
        loss = real(model, x, y)
        return loss * math.nan if len(calls) == 3 else loss

    monkeypatch.setattr(train_mod, "train_loss", nan_on_third)
    run = tmp_path / "run"
    assert main(["train", *RUN, "--steps", "5", "--ckpt-every", "0", "--data", str(data_file),
                 "--log-dir", str(run)]) == 1
    losses = logged(run, "train/loss")
    assert [s for s, _ in losses] == [1, 2, 3]
    assert all(math.isfinite(v) for _, v in losses[:2]) and math.isnan(losses[2][1])
