"""`specopt inspect` / `merge` / `train --resume` on a distributed checkpoint folder
(``checkpoints/step_<n>/`` of a ``--ddp``/``--fsdp`` run), written here in one process
(DCP needs no process group)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from specopt.cli.dcp import save_distributed_checkpoint
from specopt.cli.main import main
from specopt.models import Llama, LlamaConfig

TINY_MODEL = LlamaConfig(dim=16, n_layers=1, n_heads=2, max_seq_len=16)


def _distributed_run(root: Path) -> tuple[Path, torch.nn.Module]:
    """A run folder whose only checkpoint is a DCP folder of a PC Llama (as --ddp writes)."""
    from specopt.cli.train import build_model
    from specopt.optim import build_optimizer

    torch.manual_seed(0)
    model, _ = build_model(TINY_MODEL, pc=True, pc_level=2)
    optimizer = build_optimizer(model, "muon", lr=0.02)
    folder = root / "checkpoints" / "step_0000002"
    save_distributed_checkpoint(folder, model, optimizer, extra={
        "step": 2, "config": {"model": TINY_MODEL.to_dict(), "pc": True, "pc_level": 2}})
    return folder, model.eval()


def run_cli(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_inspect_reads_a_distributed_checkpoint_folder(tmp_path, capsys):
    folder, _ = _distributed_run(tmp_path / "run")
    code, out, err = run_cli(capsys, "inspect", folder)
    assert code == 0, err
    assert "layers.0.feed_forward.w1 (PC)" in out  # effective weights of the PC layers
    assert (folder.parent / "step_0000002_spectra.png").stat().st_size > 0


def test_merge_of_a_distributed_checkpoint_gives_the_pc_models_logits(tmp_path, capsys):
    folder, pc_model = _distributed_run(tmp_path / "run")
    out = tmp_path / "plain.pt"
    code, _, err = run_cli(capsys, "merge", folder, out)
    assert code == 0, err
    plain = Llama(TINY_MODEL)
    plain.load_state_dict(torch.load(out, weights_only=True))
    x = torch.randint(0, TINY_MODEL.vocab_size, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), pc_model(x), atol=1e-5, rtol=1e-5)


def test_resume_of_a_distributed_run_says_what_it_holds(tmp_path, capsys):
    _distributed_run(tmp_path / "run")
    code, _, err = run_cli(capsys, "train", "--resume", tmp_path / "run")
    assert code == 2
    assert err.strip().splitlines() == [
        f"specopt train: error: run {str(tmp_path / 'run')!r} holds only distributed "
        "checkpoints (step_*/ folders of a --ddp/--fsdp run): --resume of a distributed run "
        "is not supported yet; `specopt inspect` and `specopt merge` read them"]


@pytest.mark.parametrize("damage", ["no-extra", "bad-shards"])
def test_damaged_distributed_checkpoint_is_one_line(tmp_path, capsys, damage):
    folder, _ = _distributed_run(tmp_path / "run")
    if damage == "no-extra":
        (folder / "specopt_extra.pt").unlink()
        expected = "has no specopt_extra.pt (its config)"
    else:
        for shard in folder.glob("*.distcp"):
            shard.write_bytes(b"\x00" * 10)
        expected = f"cannot load distributed checkpoint {str(folder)!r}"
    for command in (["inspect", folder], ["merge", folder, tmp_path / "m.pt"]):
        code, _, err = run_cli(capsys, *command)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and expected in lines[0], err
    assert not (tmp_path / "m.pt").exists()
