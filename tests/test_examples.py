"""The scripts in examples/ run as users run them (in-process via runpy, tiny settings)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"



def run_example(monkeypatch, capsys, name: str, *args: str) -> str:
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return capsys.readouterr().out


def test_train_library(monkeypatch, capsys, tmp_path):
    out = run_example(monkeypatch, capsys, "train_library.py", "--steps", "6", "--preset",
                      "tiny", "--batch-size", "4", "--seq-len", "32", "--log-dir", str(tmp_path))
    before = float(out.split("validation: ")[1].split()[0])
    after = float(out.split("after merge_pc: ")[1].split()[0])
    assert before == pytest.approx(after, abs=1e-3)  # merging keeps the function
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_monitor_adamw(monkeypatch, capsys, tmp_path):
    out = run_example(monkeypatch, capsys, "monitor_adamw.py", "--steps", "11", "--log-dir",
                      str(tmp_path))
    assert "spectra logged for 16 matrices" in out
    from specopt.cli._events import read_run

    run = read_run(tmp_path)
    assert "spectral/condition_number/layers.0.attention.wq" in run.scalars


def test_swap_muon(monkeypatch, capsys):
    out = run_example(monkeypatch, capsys, "swap_muon.py", "--steps", "3")
    lines = {line.split("  loss")[0].strip(): line for line in out.splitlines()}
    assert "specopt.Muon, default" in lines
    if hasattr(torch.optim, "Muon"):
        # torch-compatible mode reproduces torch.optim.Muon's losses.
        final = {k: v.split("->")[1].split()[0] for k, v in lines.items()}
        assert final["torch.optim.Muon"] == final["specopt.Muon, torch mode"]
