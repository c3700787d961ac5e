"""Atomic checkpoint writes, safe loading, RNG capture and foreign weight files."""

from __future__ import annotations

import random

import pytest
import torch

from specopt.checkpoint import (
    atomic_write,
    capture_rng_state,
    load_checkpoint,
    load_weights,
    restore_rng_state,
    save_checkpoint,
)


def test_atomic_write_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "ckpt.pt"
    atomic_write(target, lambda f: f.write(b"old"))

    def half_then_crash(f):
        f.write(b"half-written")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_crash)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_save_load_roundtrip_with_weights_only(tmp_path):
    payload = {
        "step": 3,
        "model": {"w": torch.randn(3, 4)},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "rng": capture_rng_state(),
        "config": {"train": {"lr": 0.1}, "model": {"dim": 8}},
    }
    path = save_checkpoint(tmp_path / "sub" / "c.pt", payload)
    ckpt = load_checkpoint(path)
    assert ckpt["format"] == "specopt-checkpoint" and ckpt["version"] == 1
    assert torch.equal(ckpt["model"]["w"], payload["model"]["w"])
    assert ckpt["config"] == payload["config"]


def test_rng_state_roundtrip_through_a_file(tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    path = save_checkpoint(tmp_path / "c.pt", {"step": 0, "model": {}, "rng": capture_rng_state()})
    expected = (torch.rand(3), random.random())
    torch.manual_seed(99)
    random.seed(99)
    restore_rng_state(load_checkpoint(path)["rng"])
    got = (torch.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"w": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="is not a specopt checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"cannot load .*junk\.pt.* as a PyTorch file"):
        load_checkpoint(tmp_path / "junk.pt")
    save_checkpoint(tmp_path / "future.pt", {"step": 0, "model": {}, "version": 99})
    with pytest.raises(ValueError, match="checkpoint version 99; this specopt reads up to 1"):
        load_checkpoint(tmp_path / "future.pt")
    with pytest.raises(ValueError, match="needs 'model' and 'step'"):
        save_checkpoint(tmp_path / "x.pt", {"step": 1})


def test_load_weights_formats(tmp_path):
    sd = {"fc.weight": torch.randn(4, 3), "fc.bias": torch.randn(4)}
    torch.save(sd, tmp_path / "a.pt")
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "b.pt")
    for name in ("a.pt", "b.pt"):
        got, ckpt = load_weights(tmp_path / name)
        assert ckpt is None and torch.equal(got["fc.weight"], sd["fc.weight"])
    save_checkpoint(tmp_path / "c.pt", {"step": 1, "model": sd})
    got, ckpt = load_weights(tmp_path / "c.pt")
    assert ckpt is not None and ckpt["step"] == 1 and set(got) == set(sd)
    torch.save({"a": 1}, tmp_path / "d.pt")
    with pytest.raises(ValueError, match="holds no tensors by name"):
        load_weights(tmp_path / "d.pt")


def test_load_weights_safetensors(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    sd = {"proj.weight": torch.randn(5, 6)}
    st.save_file(sd, str(tmp_path / "m.safetensors"))
    got, ckpt = load_weights(tmp_path / "m.safetensors")
    assert ckpt is None and torch.equal(got["proj.weight"], sd["proj.weight"])
