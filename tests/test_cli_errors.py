"""Every failure of `specopt inspect / merge / diagnose / compare / bench` on bad files and
flags: one line on stderr naming the file or flag and the problem, exit 2, no traceback
(``--debug`` adds it), and nothing written.

Most cases run ``specopt.cli.main.main`` in-process; two go through a real subprocess
to show what a user's terminal gets.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from specopt.checkpoint import save_checkpoint
from specopt.cli.main import main
from specopt.models import LlamaConfig

TINY_MODEL = LlamaConfig(dim=16, n_layers=1, n_heads=2, max_seq_len=16)


def run_cli(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _checkpoint(path: Path, *, pc: bool = True, edit: Callable[[dict], None] | None = None) -> Path:
    """A real specopt checkpoint of a tiny (PC) Llama, optionally edited before saving."""
    from specopt.cli.train import build_model

    torch.manual_seed(0)
    model, _ = build_model(TINY_MODEL, pc=pc, pc_level=1)
    payload = {"step": 1, "model": model.state_dict(), "optimizer": {},
               "config": {"model": TINY_MODEL.to_dict(), "pc": pc, "pc_level": 1}}
    if edit is not None:
        edit(payload)
    save_checkpoint(path, payload)
    return path


def _any_weight(state: dict) -> str:
    return next(k for k, v in state.items() if v.ndim == 2 and "parametrizations" in k)


def _drop_config(p: dict) -> None:
    del p["config"]


def _drop_tensor(p: dict) -> None:
    del p["model"][_any_weight(p["model"])]


def _resize_tensor(p: dict) -> None:
    k = _any_weight(p["model"])
    p["model"][k] = torch.zeros(3, 5)


def _nan_tensor(p: dict) -> None:
    k = _any_weight(p["model"])
    p["model"][k] = p["model"][k].clone()
    p["model"][k][0, 0] = math.nan


def _bad_config(p: dict) -> None:
    p["config"]["model"]["n_heads"] = 3  # 16 not divisible by 3


def _no_model(path: Path) -> Path:
    """A file marked as a specopt checkpoint but without its weights."""
    torch.save({"format": "specopt-checkpoint", "version": 1, "step": 3, "config": {}}, path)
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _event_run(folder: Path, *, garbage: bool = False) -> Path:
    """A run folder with a real event file (loss at steps 1..5), or random bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    if garbage:
        _write(folder / "events.out.tfevents.1700000000.host.1.0", os.urandom(3000))
        return folder
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(folder))
    for step in range(1, 6):
        w.add_scalar("train/loss", 2.0, step)
    w.close()
    return folder


# (id, argv from tmp_path, regex the one error line must match)
CASES: list[tuple[str, Callable[[Path], list[object]], str]] = [
    # inspect: files that are not weights
    ("inspect-missing", lambda t: ["inspect", t / "nope.pt"],
     r"weight file '.*nope\.pt' does not exist"),
    ("inspect-directory", lambda t: ["inspect", t],
     r"weight file '.*' is a directory, expected a file"),
    ("inspect-device", lambda t: ["inspect", "/dev/null"],
     r"'/dev/null' is not a regular file"),
    ("inspect-empty-pt", lambda t: ["inspect", _write(t / "e.pt", b"")],
     r"'.*e\.pt' is empty \(0 bytes\)"),
    ("inspect-empty-safetensors", lambda t: ["inspect", _write(t / "e.safetensors", b"")],
     r"'.*e\.safetensors' is empty"),
    ("inspect-random-pt", lambda t: ["inspect", _write(t / "r.pt", os.urandom(4096))],
     r"'.*r\.pt' is not a checkpoint: neither a PyTorch file"),
    ("inspect-random-safetensors",
     lambda t: ["inspect", _write(t / "r.safetensors", os.urandom(4096))],
     r"'.*r\.safetensors' is not a safetensors file"),
    ("inspect-truncated-pt", lambda t: ["inspect", _write(
        t / "cut.pt", _checkpoint(t / "full.pt").read_bytes()[:300])],
     r"cannot load '.*cut\.pt': .*zip archive"),
    ("inspect-pickled-pt",
     lambda t: ["inspect", _write(t / "p.pt", b"\x80\x02cos\nsystem\nq\x00.")],
     r"cannot load '.*p\.pt': its pickle holds something other than tensors"),
    ("inspect-no-tensors", lambda t: [
        "inspect", (torch.save([1, 2], t / "l.pt"), t / "l.pt")[1]],
     r"holds no tensors by name"),
    ("inspect-missing-tensor", lambda t: ["inspect", _checkpoint(t / "c.pt", edit=_drop_tensor)],
     r"'.*c\.pt' does not match the model its config describes: missing tensors: "
     r"layers\.0\..*parametrizations"),
    ("inspect-wrong-shape", lambda t: ["inspect", _checkpoint(t / "c.pt", edit=_resize_tensor)],
     r"does not match .*: wrong shapes: layers\.0\..* is \(3, 5\), the model has "
     r"\(\d+, \d+\)"),
    ("inspect-bad-config", lambda t: ["inspect", _checkpoint(t / "c.pt", edit=_bad_config)],
     r"'.*c\.pt' has an invalid model config: .*divisible by n_heads"),
    ("inspect-no-model", lambda t: ["inspect", _no_model(t / "n.pt")],
     r"cannot load '.*n\.pt': missing entry 'model'"),
    ("inspect-bad-regex", lambda t: ["inspect", _checkpoint(t / "c.pt"), "--match", "(["],
     r"--match '\(\[' is not a valid regular expression"),
    ("inspect-out-under-a-file", lambda t: [
        "inspect", _checkpoint(t / "c.pt"), "--out", _write(t / "f", b"x") / "s.png"],
     r"cannot write --out '.*f/s\.png': '.*f' is a file, not a folder"),
    ("inspect-out-is-a-directory", lambda t: ["inspect", _checkpoint(t / "c.pt"), "--out", t],
     r"--out '.*' is a directory, expected a file path"),
    ("inspect-out-is-the-checkpoint", lambda t: [
        "inspect", _checkpoint(t / "c.pt"), "--out", t / "c.pt"],
     r"--out '.*c\.pt' is the input file"),
    # A folder where no file can be created although its mode says writable (root, /proc):
    # found by the up-front probe, before the table is printed.
    *([("inspect-out-in-proc", lambda t: [
        "inspect", _checkpoint(t / "c.pt"), "--out", "/proc/specopt-test.png"],
        r"cannot write --out '/proc/specopt-test\.png': cannot create a file in folder '/proc'")]
      if Path("/proc/self").is_dir() else []),
    # merge
    ("merge-missing", lambda t: ["merge", t / "nope.pt", t / "m.pt"],
     r"checkpoint '.*nope\.pt' does not exist"),
    ("merge-directory", lambda t: ["merge", t, t / "m.pt"], r"is a directory, expected a file"),
    ("merge-random", lambda t: ["merge", _write(t / "r.pt", os.urandom(2048)), t / "m.pt"],
     r"'.*r\.pt' is not a checkpoint"),
    ("merge-plain-state-dict", lambda t: [
        "merge", (torch.save({"w": torch.eye(3)}, t / "s.pt"), t / "s.pt")[1], t / "m.pt"],
     r"'.*s\.pt'.* not a specopt checkpoint"),
    ("merge-no-model", lambda t: ["merge", _no_model(t / "n.pt"), t / "m.pt"],
     r"checkpoint '.*n\.pt' has no 'model'"),
    ("merge-no-config", lambda t: ["merge", _checkpoint(t / "c.pt", edit=_drop_config), t / "m.pt"],
     r"'.*c\.pt' has no 'config' with the model settings"),
    ("merge-missing-tensor", lambda t: [
        "merge", _checkpoint(t / "c.pt", edit=_drop_tensor), t / "m.pt"],
     r"does not match the model its config describes: missing tensors"),
    ("merge-wrong-shape", lambda t: [
        "merge", _checkpoint(t / "c.pt", edit=_resize_tensor), t / "m.pt"],
     r"wrong shapes: .* is \(3, 5\), the model has"),
    ("merge-nan", lambda t: ["merge", _checkpoint(t / "c.pt", edit=_nan_tensor), t / "m.pt"],
     r"'.*c\.pt' holds NaN/Inf in 1 tensor\(s\): layers\.0\..*parametrizations.*; refusing to "
     r"merge it"),
    ("merge-out-under-a-file", lambda t: [
        "merge", _checkpoint(t / "c.pt"), _write(t / "f", b"x") / "m.pt"],
     r"cannot write OUT '.*f/m\.pt': '.*f' is a file, not a folder"),
    ("merge-out-is-a-directory", lambda t: ["merge", _checkpoint(t / "c.pt"), t],
     r"OUT '.*' is a directory"),
    # OUT naming the checkpoint itself would replace the run's checkpoint with plain weights.
    ("merge-out-is-the-checkpoint", lambda t: ["merge", _checkpoint(t / "c.pt"), t / "c.pt"],
     r"OUT '.*c\.pt' is the input file '.*c\.pt': writing it would replace the input"),
    ("merge-out-is-the-checkpoint-by-another-name", lambda t: [
        "merge", _checkpoint(t / "c.pt"), t / "." / "c.pt"], r"is the input file"),
    # diagnose / compare: run folders
    ("diagnose-missing", lambda t: ["diagnose", t / "nope"], r"log folder '.*nope' does not exist"),
    ("diagnose-a-file", lambda t: ["diagnose", _write(t / "f", b"x")],
     r"run folder '.*f' is a file, expected the folder"),
    ("diagnose-no-events", lambda t: ["diagnose", t], r"no TensorBoard event files in"),
    ("diagnose-corrupt-events", lambda t: ["diagnose", _event_run(t / "run", garbage=True)],
     r"event file '.*events\.out\.tfevents\.1700000000\.host\.1\.0' is (not a TensorBoard "
     r"event file|corrupt)"),
    ("diagnose-bad-window", lambda t: ["diagnose", _event_run(t / "run"), "--window", "0"],
     r"--window must be an integer >= 1, got 0"),
    ("diagnose-nan-k", lambda t: ["diagnose", _event_run(t / "run"), "--k", "nan"],
     r"--k must be a positive finite number, got nan"),
    ("diagnose-json-under-a-file", lambda t: [
        "diagnose", _event_run(t / "run"), "--json", _write(t / "f", b"x") / "d.json"],
     r"cannot write --json '.*f/d\.json'"),
    ("compare-corrupt-events", lambda t: ["compare", _event_run(t / "a"),
                                          _event_run(t / "b", garbage=True), "--out", t / "c.png"],
     r"event file '.*b/events\.out\.tfevents.*' is (not a TensorBoard event file|corrupt)"),
    ("compare-a-file", lambda t: ["compare", _write(t / "f", b"x"), "--out", t / "c.png"],
     r"run folder '.*f' is a file"),
    ("compare-out-under-a-file", lambda t: [
        "compare", _event_run(t / "a"), "--out", _write(t / "f", b"x") / "c.png"],
     r"cannot write --out '.*f/c\.png'"),
    # An empty string is refused, not read as "not given" (train --resume "" started a fresh
    # run, --log-dir "" trained into the current folder, --out "" wrote the default path).
    *[(f"empty-{name}", lambda t, argv=argv: argv, rf"{re.escape(flag)} is an empty string")
      for name, argv, flag in [
          ("train-resume", ["train", "--resume", ""], "--resume"),
          ("train-log-dir", ["train", "--log-dir", "", "--steps", "1"], "--log-dir"),
          ("train-data", ["train", "--data", "", "--steps", "1"], "--data"),
          ("inspect-checkpoint", ["inspect", ""], "CHECKPOINT"),
          ("inspect-out", ["inspect", "x.pt", "--out", ""], "--out"),
          ("merge-out", ["merge", "x.pt", ""], "OUT"),
          ("diagnose-json", ["diagnose", "run", "--json", ""], "--json"),
          ("compare-run", ["compare", "run", ""], "RUN"),
      ]],
    # bench
    ("bench-tools-dir-a-file", lambda t: ["bench", "--tools-dir", _write(t / "f", b"x")],
     r"--tools-dir '.*f' is a file, expected a folder"),
    ("bench-json-under-a-file", lambda t: [
        "bench", "--tools-dir", t, "--json", _write(t / "f", b"x") / "b.json"],
     r"cannot write --json '.*f/b\.json'"),
]


@pytest.mark.parametrize(("make_argv", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, make_argv, match):

    argv = make_argv(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, out, err = run_cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err  # one line, no traceback
    command = str(argv[0])
    assert lines[0].startswith(f"specopt {command}: error: "), err
    assert re.search(match, lines[0]), lines[0]
    # Refused before any output: no table printed, no file (or temp file) left behind.
    assert "spectra of" not in out
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_merge_safetensors_without_the_package(tmp_path, capsys, monkeypatch):
    ckpt = _checkpoint(tmp_path / "c.pt")
    # None in sys.modules makes `import safetensors...` raise ImportError.
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    code, _, err = run_cli(capsys, "merge", ckpt, tmp_path / "m.safetensors")
    assert code == 2
    assert "needs the 'safetensors' package (pip install safetensors)" in err
    assert not (tmp_path / "m.safetensors").exists()
    st = tmp_path / "w.safetensors"
    st.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")  # a valid, empty safetensors file
    code, _, err = run_cli(capsys, "inspect", st)
    assert code == 2 and "reading" in err and "'safetensors' package" in err


def test_disk_full_while_writing_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    """A write failing midway (ENOSPC) after the checks passed: one line, no partial file."""
    import errno

    ckpt = _checkpoint(tmp_path / "c.pt", pc=False)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    code, _, err = run_cli(capsys, "merge", ckpt, tmp_path / "out" / "m.pt")
    monkeypatch.setattr(torch, "save", real_save)
    assert code == 2
    assert err.strip().splitlines() == [
        f"specopt merge: error: cannot write OUT {str(tmp_path / 'out' / 'm.pt')!r}: "
        "No space left on device"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["c.pt", "out"]


def test_inspect_checkpoint_without_config_reads_its_weights(tmp_path, capsys):
    """No config: not an error for inspect; the raw tensors are read as a state_dict."""
    ckpt = _checkpoint(tmp_path / "c.pt", pc=False, edit=_drop_config)
    code, out, _ = run_cli(capsys, "inspect", ckpt, "--out", tmp_path / "s.png")
    assert code == 0 and "layers.0.attention.wq" in out and "(PC)" not in out
    assert (tmp_path / "s.png").stat().st_size > 0


def test_inspect_names_layers_with_nan_weights(tmp_path, capsys):
    w = torch.randn(8, 6)
    w[0, 0] = math.nan
    torch.save({"bad.weight": w, "good.weight": torch.randn(5, 7)}, tmp_path / "w.pt")
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "w.pt", "--out", tmp_path / "w.png")
    assert code == 0  # inspecting a diverged run is what the command is for
    assert "1 layer(s) hold NaN/Inf weights (left out of the means): bad" in out


def test_debug_flag_shows_the_traceback_before_or_after_the_command(tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    for argv in (["--debug", "inspect", missing], ["inspect", missing, "--debug"]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2
        assert "Traceback (most recent call last)" in err and "check_input_file" in err
        assert err.strip().splitlines()[-1].startswith("specopt inspect: error: weight file")
    code, _, err = run_cli(capsys, "inspect", missing)
    assert "Traceback" not in err


def test_unexpected_exception_is_one_line_exit_1_with_a_hint(tmp_path, capsys, monkeypatch):
    import specopt.cli.inspect as inspect_cmd

    def bug(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(inspect_cmd, "inspect_file", bug)
    ckpt = _checkpoint(tmp_path / "c.pt", pc=False)
    code, _, err = run_cli(capsys, "inspect", ckpt)
    assert code == 1
    assert err.strip().splitlines() == [
        "specopt inspect: error: unexpected ZeroDivisionError: division by zero "
        "(rerun with --debug for the traceback)"]
    code, _, err = run_cli(capsys, "--debug", "inspect", ckpt)
    assert code == 1 and "Traceback" in err and "in bug" in err


@pytest.mark.parametrize("argv", [
    ["inspect", "{rand}"],
    ["diagnose", "{file}"],
], ids=["inspect-random-bytes", "diagnose-a-file"])
def test_real_terminal_gets_one_line_and_no_traceback(tmp_path, argv):
    rand = _write(tmp_path / "rand.pt", os.urandom(4096))
    argv = [a.format(rand=rand, file=rand) for a in argv]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "specopt", *argv], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "weights_only" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(rand) in lines[0], proc.stderr


def test_train_data_from_a_device_is_refused(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--data", "/dev/zero", "--steps", "1",
                           "--log-dir", tmp_path / "run")
    assert code == 2 and "Traceback" not in err
    assert "data path '/dev/zero' is not a regular file" in err
