"""Atomic checkpoint writes, safe loading, RNG capture and foreign weight files."""

from __future__ import annotations

import os
import random

import pytest
import torch

from specopt.checkpoint import (
    CheckpointError,
    atomic_write,
    capture_rng_state,
    check_optimizer_state,
    load_checkpoint,
    load_module_state,
    load_weights,
    remove_stale_temp_files,
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


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_atomic_write_gives_the_mode_open_would(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "out.bin", lambda f: f.write(b"x"))
        with open(tmp_path / "plain.bin", "wb"):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == mode
    assert (tmp_path / "plain.bin").stat().st_mode & 0o777 == mode


def test_load_checkpoint_requires_keys_and_names_the_file(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", {"step": 2, "model": {"w": torch.zeros(2)}})
    assert load_checkpoint(path)["step"] == 2  # inspect / merge need only step and model
    with pytest.raises(CheckpointError, match=r"c\.pt' has no 'optimizer', 'config'"):
        load_checkpoint(path, require=("step", "model", "optimizer", "config"))
    assert issubclass(CheckpointError, ValueError)
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        load_checkpoint(tmp_path)
    bad = save_checkpoint(tmp_path / "b.pt", {"step": 1, "model": {"w": [1, 2]}})
    with pytest.raises(CheckpointError, match="'model' is not a dict of tensors"):
        load_checkpoint(bad)


def test_load_module_state_checks_before_touching_the_module(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: torch.ones_like(v) for k, v in before.items()}
    state["0.weight"] = torch.ones(4, 5)
    del state["1.bias"]
    with pytest.raises(CheckpointError) as info:
        load_module_state(model, state, source="ck.pt")
    msg = str(info.value)
    assert "'ck.pt'" in msg and "missing tensors: 1.bias" in msg
    assert "wrong shapes: 0.weight is (4, 5), the model has (4, 3)" in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    good = {k: torch.ones_like(v) for k, v in before.items()}
    load_module_state(model, good, source="ck.pt")
    assert torch.equal(model[0].weight, torch.ones(4, 3))


def test_check_optimizer_state_names_the_parameter():
    model = torch.nn.Linear(3, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    state = opt.state_dict()
    names = {p: n for n, p in model.named_parameters()}
    check_optimizer_state(opt, state, names=names, source="ck.pt")  # fits
    state["state"][0]["exp_avg"] = torch.zeros(4, 7)
    with pytest.raises(CheckpointError, match=r"weight\.exp_avg is \(4, 7\), the parameter \(4, "):
        check_optimizer_state(opt, state, names=names, source="ck.pt")
    state["param_groups"] = state["param_groups"] * 2
    with pytest.raises(CheckpointError, match="2 parameter groups, this optimizer 1"):
        check_optimizer_state(opt, state, names=names, source="ck.pt")


def test_remove_stale_temp_files(tmp_path):
    (tmp_path / ".step_0000003.pt.ab12.tmp").write_bytes(b"half")
    (tmp_path / ".step_0000006.partial").mkdir()
    (tmp_path / "step_0000002.pt").write_bytes(b"keep")
    (tmp_path / ".other.tmp").write_bytes(b"not ours")
    removed = remove_stale_temp_files(tmp_path, "step_*")
    assert sorted(p.name for p in removed) == [".step_0000003.pt.ab12.tmp", ".step_0000006.partial"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp", "step_0000002.pt"]


def test_atomic_write_on_a_full_disk_raises_the_os_error(tmp_path, monkeypatch):
    """torch.save's zip writer reports a failed write as "RuntimeError: [enforce fail at
    inline_container.cc] unexpected pos"; atomic_write raises the ENOSPC underneath."""
    import errno

    from train_utils import fill_the_disk

    target = tmp_path / "c.pt"
    target.write_bytes(b"old")
    fill_the_disk(monkeypatch)
    with pytest.raises(OSError) as caught:
        atomic_write(target, lambda f: torch.save({"w": torch.randn(512, 512)}, f))
    assert caught.value.errno == errno.ENOSPC
    assert isinstance(caught.value.__cause__, RuntimeError)  # what torch.save raised
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]  # no temp file left
