"""Trainer integrations: transformers.Trainer and Lightning callbacks, run for a few steps
with the real packages; spectral tags read back from the event files. Plus the examples."""

from __future__ import annotations

import importlib
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator
from torch import nn

import specopt
from specopt.pc import PCHandle

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
D, SEQ, VOCAB = 32, 16, 64


def _events(log_dir: Path | str) -> event_accumulator.EventAccumulator:
    acc = event_accumulator.EventAccumulator(str(log_dir),
                                             size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return acc


def _steps(acc: event_accumulator.EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


def _first_chart(log_dir: Path | str) -> tuple[str, list[str]]:
    """(category, tag regexes) of the first Custom Scalars chart the monitor wrote."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    proto = _events(log_dir).Tensors("custom_scalars__config__")[0].tensor_proto
    category = layout_pb2.Layout.FromString(proto.string_val[0]).category[0]
    return category.title, list(category.chart[0].multiline.tag)


@pytest.fixture
def count_refresh(monkeypatch) -> list[int]:
    """Counts PCHandle.refresh calls (the PC hook the callbacks attach)."""
    calls: list[int] = []
    original = PCHandle.refresh

    def counted(self, iters=None):
        calls.append(1)
        return original(self, iters)

    monkeypatch.setattr(PCHandle, "refresh", counted)
    return calls


# --------------------------------------------------------------------- transformers


class _Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = torch.randint(0, VOCAB, (SEQ,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": x, "labels": x}


def test_trainer_callback_logs_spectra_on_the_trainers_steps(tmp_path, count_refresh):
    transformers = pytest.importorskip("transformers")
    from specopt.integrations.huggingface import SpectralMonitorCallback

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=D, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=SEQ, bos_token_id=0,
        eos_token_id=0))
    pc = specopt.apply_pc(model, level=2)
    u0 = pc.parametrizations["transformer.h.0.mlp.c_fc"].u.clone()
    opt = specopt.build_optimizer(model, "muon", lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    callback = SpectralMonitorCallback(every=2, budget=None, histograms=False)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, logging_steps=2, report_to=[], save_strategy="no",
        use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(),
                                   optimizers=(opt, sched), callbacks=[callback])
    trainer.train()
    assert trainer.state.global_step == 4
    assert callback.monitor is None  # closed at on_train_end
    assert Path(callback.log_dir) == tmp_path / "runs" / "spectral"  # the default
    acc = _events(callback.log_dir)
    # One monitor step per optimizer step (not per micro-batch), on the Trainer's steps.
    assert _steps(acc, "spectral/sigma_max_pi/transformer.h.0.mlp.c_fc/raw") == [1, 2, 3, 4]
    assert _steps(acc, "spectral/condition_number/transformer.h.0.mlp.c_fc") == [2, 4]
    assert _steps(acc, "spectral/rms_to_rms/transformer.h.1.attn.c_attn") == [2, 4]
    # The dashboard opens on the Trainer's own loss tags.
    category, regexes = _first_chart(callback.log_dir)
    assert category == "loss"
    assert [t for t in ("train/loss", "eval/loss", "loss") if re.search(regexes[0], t)] == [
        "train/loss", "eval/loss"]
    # The PC refresh ran after each optimizer step, on the optimizer under accelerate.
    assert len(count_refresh) == 4
    assert not torch.equal(pc.parametrizations["transformer.h.0.mlp.c_fc"].u, u0)
    hooks = opt._optimizer_step_post_hooks
    assert not hooks  # removed with the session: the optimizer is left as it was


def test_trainer_callback_log_dir_and_bad_arguments(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from specopt.integrations.huggingface import SpectralMonitorCallback

    cb = SpectralMonitorCallback()
    args = type("Args", (), {"output_dir": str(tmp_path), "logging_dir": None})()
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    assert cb._resolve_log_dir(args) == str(tmp_path / "tb")
    args.logging_dir = str(tmp_path / "logs")  # transformers < 5
    assert cb._resolve_log_dir(args) == str(tmp_path / "logs")
    assert SpectralMonitorCallback(log_dir=tmp_path / "x")._resolve_log_dir(args) == str(
        tmp_path / "x")
    with pytest.raises(ValueError, match="every must be an int >= 1 or None, got 0"):
        SpectralMonitorCallback(every=0)
    with pytest.raises(TypeError, match=r"sets \['writer'\] itself"):
        SpectralMonitorCallback(writer=object())
    with pytest.raises(TypeError, match=r"unknown SpectralMonitor options \['evry'\]"):
        SpectralMonitorCallback(evry=5)


@pytest.mark.parametrize(("module", "missing", "extra"), [
    ("specopt.integrations.huggingface", "transformers", "hf"),
    ("specopt.integrations.lightning", "lightning", "lightning"),
])
def test_missing_optional_dependency_names_the_extra(monkeypatch, module, missing, extra):
    monkeypatch.delitem(sys.modules, module, raising=False)
    for name in list(sys.modules):
        if name == missing or name.startswith(missing + "."):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, missing, None)
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)
    with pytest.raises(ImportError, match=rf"pip install 'specopt\[{extra}\]'"):
        importlib.import_module(module)


# ------------------------------------------------------------------------- lightning


def test_lightning_callback_writes_into_the_tensorboard_logger(tmp_path, count_refresh):
    L = pytest.importorskip("lightning")
    from specopt.integrations.lightning import SpectralMonitorCallback

    class Lit(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, D), nn.ReLU(), nn.Linear(D, D), nn.ReLU(),
                                     nn.Linear(D, 1))
            self.pc = specopt.apply_pc(self.net, include="2", level=2)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return specopt.build_optimizer(self, "muon", lr=1e-2)

    torch.manual_seed(0)
    x = torch.randn(64, 8)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)),
                                       batch_size=8)
    callback = SpectralMonitorCallback(every=2, budget=None, histograms=False)
    trainer = L.Trainer(max_steps=3, accumulate_grad_batches=2, callbacks=[callback],
                        default_root_dir=tmp_path, accelerator="cpu", log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(Lit(), data)
    assert trainer.global_step == 3 and callback.monitor is None
    assert Path(callback.log_dir) == tmp_path / "lightning_logs" / "version_0"
    acc = _events(callback.log_dir)  # one event file: Lightning's metrics and ours
    tags = set(acc.Tags()["scalars"])
    assert "train_loss" in tags
    assert _steps(acc, "spectral/sigma_max_pi/net.2/raw") == [1, 2, 3]
    assert _steps(acc, "spectral/condition_number/net.2") == [2]
    assert "spectral/sigma_max/net.4" not in tags  # a (1, D) head: no spectrum to watch
    assert len(count_refresh) == 3  # once per optimizer step, not per micro-batch
    # The dashboard opens on the loss the module logged (found at the first step).
    category, regexes = _first_chart(callback.log_dir)
    assert category == "loss" and re.search(regexes[0], "train_loss")
    assert not re.search(regexes[0], "spectral/model/gmcn")


@pytest.mark.parametrize("integration", ["huggingface", "lightning"])
def test_callbacks_keep_the_budgeted_default_cadence(integration, monkeypatch):
    """No every= given: the monitor's default cadence under its time budget (an explicit
    every would switch the budget off); every= given: that cadence exactly."""
    pytest.importorskip("transformers" if integration == "huggingface" else "lightning")
    from specopt.integrations import _common
    from specopt.spectral.cadence import DEFAULT_BUDGET, DEFAULT_EVERY

    module = importlib.import_module(f"specopt.integrations.{integration}")
    built: list = []

    class Recording(_common.SpectralMonitor):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            built.append(self)

    cases = [({}, DEFAULT_EVERY, DEFAULT_BUDGET), ({"every": 3}, 3, None),
             ({"every": 3, "budget": 0.1}, 3, 0.1)]
    callbacks = [module.SpectralMonitorCallback(histograms=False, **kw) for kw, _, _ in cases]
    monkeypatch.setattr(_common, "SpectralMonitor", Recording)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for cb, (kwargs, every, budget) in zip(callbacks, cases, strict=True):
        session = _common.MonitorSession(model, [opt], start_step=0, log_dir=None, writer=None,
                                         every=cb.every, refresh_pc=False,
                                         monitor_kwargs=cb.monitor_kwargs)
        mon = built[-1]
        assert (mon.every, mon.budget) == (every, budget), kwargs
        if integration == "huggingface":
            assert mon.loss_tags == module.TRAINER_LOSS_TAGS
        session.close()


# -------------------------------------------------------------------------- examples


def _run_example(monkeypatch, capsys, name: str, *args: str) -> str:
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return capsys.readouterr().out


def _assert_snapshots(steps: list[int]) -> None:
    # The examples keep the monitor's default time budget, which may thin the cadence.
    assert steps and steps[0] == 2 and all(s % 2 == 0 and s <= 4 for s in steps), steps


def test_example_hf_trainer(monkeypatch, capsys, tmp_path):
    pytest.importorskip("transformers")
    out = _run_example(monkeypatch, capsys, "hf_trainer.py", "--steps", "4", "--dim", "32",
                       "--layers", "1", "--seq-len", "32", "--batch-size", "2", "--every", "2",
                       "--output-dir", str(tmp_path))
    assert "PC layers: 3" in out
    diff = float(out.split("max logit diff ")[1].split()[0])
    assert diff <= 1e-5  # the merged checkpoint loads into a stock GPT-2
    acc = _events(tmp_path / "runs" / "spectral")
    _assert_snapshots(_steps(acc, "spectral/condition_number/transformer.h.0.mlp.c_fc"))


def test_example_lightning_module(monkeypatch, capsys, tmp_path):
    pytest.importorskip("lightning")
    out = _run_example(monkeypatch, capsys, "lightning_module.py", "--steps", "4", "--dim",
                       "32", "--layers", "1", "--seq-len", "32", "--batch-size", "2",
                       "--every", "2", "--root-dir", str(tmp_path))
    assert "PC layers: 4" in out
    log_dir = out.split("spectral tags in ")[1].split()[0]
    acc = _events(log_dir)
    _assert_snapshots(_steps(acc, "spectral/condition_number/model.layers.0.feed_forward.w1"))
    assert "train_loss" in acc.Tags()["scalars"]


def test_lightning_loss_tags_train_first_then_logged_order():
    """The loss metrics a LightningModule logged, each once: train ones first, the rest in
    the order logged (logged_metrics, then callback_metrics); non-loss metrics left out."""
    pytest.importorskip("lightning")
    from types import SimpleNamespace

    from specopt.integrations.lightning import _logged_loss_tags

    trainer = SimpleNamespace(logged_metrics={"val_loss": 1.0, "lr": 0.1, "train_loss_step": 2.0},
                              callback_metrics={"train_loss_step": 2.0, "Loss": 3.0,
                                                "train/acc": 0.5})
    assert _logged_loss_tags(trainer) == ("train_loss_step", "val_loss", "Loss")
    assert _logged_loss_tags(SimpleNamespace()) == ()
