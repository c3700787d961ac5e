"""SpectralMonitor, alarms and sinks: event files read back, exact references, bad input."""

from __future__ import annotations

import io
import logging
import math
import os
import re
import statistics
import warnings

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator
from torch import nn

from specopt.models import Llama, LlamaConfig
from specopt.spectral import (
    ConditionNumberAlarm,
    ConsoleSink,
    LossSpikeAlarm,
    NonFiniteAlarm,
    Observation,
    SigmaMaxGrowthAlarm,
    SpectralMonitor,
    StableRankCollapseAlarm,
    default_alarms,
    parse_tag,
)
from specopt.spectral.sinks import Sink

CFG = LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, max_seq_len=32)
ATTN = ["layers.0.attention.wq", "layers.0.attention.wk", "layers.0.attention.wv",
        "layers.0.attention.wo"]


def _model(seed: int = 0, cfg: LlamaConfig = CFG) -> Llama:
    torch.manual_seed(seed)
    return Llama(cfg)


def _batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CFG.vocab_size, (4, 17), generator=gen) for _ in range(n)]


def _train(model, opt, batches, *, monitor=None, accumulate=1, before_step=None, after_step=None):
    for i, x in enumerate(batches):
        for _ in range(accumulate):  # gradient accumulation: several backward per step
            loss = model.loss(x[:, :-1], x[:, 1:]) / accumulate
            loss.backward()
        if monitor is not None:
            monitor.record_loss(loss)
        if before_step is not None:
            before_step(i)
        opt.step()
        opt.zero_grad()
        if after_step is not None:
            after_step(i)


def _events(log_dir: str) -> event_accumulator.EventAccumulator:
    acc = event_accumulator.EventAccumulator(
        log_dir, size_guidance={event_accumulator.SCALARS: 0, event_accumulator.HISTOGRAMS: 0,
                                event_accumulator.TENSORS: 0})
    acc.Reload()
    return acc


def _svd(w: torch.Tensor) -> np.ndarray:
    return np.linalg.svd(w.detach().double().numpy(), compute_uv=False)


@pytest.fixture(scope="module")
def pretrained() -> dict:
    """State after 100 healthy AdamW steps (past the sigma_max-growth warmup)."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    _train(model, opt, _batches(100, seed=3))
    return {"model": model.state_dict(), "opt": opt.state_dict()}


def _resume(pretrained: dict) -> tuple[Llama, torch.optim.Optimizer]:
    model = _model()
    model.load_state_dict(pretrained["model"])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    opt.load_state_dict(pretrained["opt"])
    return model, opt


# ----------------------------------------------------------------------- event files
def test_event_file_holds_selected_layers_at_cadence_and_matches_numpy(tmp_path) -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mon = SpectralMonitor(model, log_dir=tmp_path, every=3, include="layers.*.attention.*",
                          budget=None)
    with mon:
        mon.attach(opt)
        _train(model, opt, _batches(6), monitor=mon, accumulate=2)
    acc = _events(str(tmp_path))
    scalars, hists = set(acc.Tags()["scalars"]), set(acc.Tags()["histograms"])
    for layer in ATTN:
        for metric in ("condition_number", "gmcn", "sigma_max", "stable_rank", "rms_to_rms"):
            steps = [e.step for e in acc.Scalars(f"spectral/{metric}/{layer}")]
            assert steps == [3, 6], (metric, layer)  # optimizer steps, not backward calls
        for kind in ("log10_sigma", "sigma_over_max"):
            assert [e.step for e in acc.Histograms(f"spectral_hist/{kind}/{layer}")] == [3, 6]
        assert [e.step for e in acc.Scalars(f"spectral/sigma_max_pi/{layer}")] == [1, 2, 3, 4,
                                                                                   5, 6]
        assert [e.step for e in acc.Scalars(f"spectral/update_ratio/{layer}")] == [3, 6]
        # The logged condition number is numpy's, from an SVD of the same (final) weights.
        w = model.get_submodule(layer).weight
        s = _svd(w)
        logged = acc.Scalars(f"spectral/condition_number/{layer}")[-1].value
        assert logged == pytest.approx(s[0] / s[-1], rel=1e-3)
        # Power iteration (2 warm-started iterations a step) is a lower bound, close to it.
        pi = acc.Scalars(f"spectral/sigma_max_pi/{layer}")[-1].value
        assert 0.85 * s[0] < pi <= s[0] * (1 + 1e-5)
        hist = acc.Histograms(f"spectral_hist/log10_sigma/{layer}")[-1].histogram_value
        assert hist.num == len(s)
        assert hist.min == pytest.approx(np.log10(s[-1]), rel=1e-4)
        assert hist.max == pytest.approx(np.log10(s[0]), rel=1e-4)
    assert not any("feed_forward" in t for t in scalars | hists)  # not selected
    assert {"spectral/model/gmcn", "monitor/snapshot_ms", "monitor/time_ms"} <= scalars
    assert "custom_scalars__config__" in acc.Tags()["tensors"]
    gm = math.exp(np.mean([math.log(acc.Scalars(f"spectral/gmcn/{k}")[-1].value) for k in ATTN]))
    assert acc.Scalars("spectral/model/gmcn")[-1].value == pytest.approx(gm, rel=1e-4)
    for tag in scalars | hists:
        assert parse_tag(tag) is not None, tag


def test_update_ratio_norm_exact_on_wide_layers(monkeypatch) -> None:
    """Past 64 on the small side the delta's norm comes from the Lanczos route
    (spectral_norms), never from a second full spectrum; it matches float64 SVD."""
    import specopt.spectral.metrics as metrics

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(160, 200, bias=False), nn.Linear(200, 96, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    mon = SpectralMonitor(model, every=2, budget=None, alarms=(), dtype=torch.float64)
    full_calls = []
    real = metrics._CpuStage.singular_values
    monkeypatch.setattr(metrics._CpuStage, "singular_values",
                        lambda self, w: full_calls.append(tuple(w.shape)) or real(self, w))
    before = {}
    for i in range(1, 3):
        before = {k: m.weight.detach().double().clone() for k, m in model.named_children()}
        model(torch.randn(8, 160)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        snap = mon.step(i)
    assert sorted(full_calls) == [(96, 200), (200, 160)]  # the spectra only
    for k, m in model.named_children():
        w = m.weight.detach().double()
        ref = (np.linalg.svd((w - before[k]).numpy(), compute_uv=False)[0]
               / np.linalg.svd(w.numpy(), compute_uv=False)[0])
        assert snap.update_ratio[k] == pytest.approx(ref, rel=1e-10)


def test_update_ratio_is_spectral_norm_of_the_step(tmp_path) -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mon = SpectralMonitor(model, every=4, budget=None, include="*.w2")
    mon.attach(opt)
    w2 = model.layers[0].feed_forward.w2.weight
    before = {}
    _train(model, opt, _batches(4), before_step=lambda i: before.setdefault(i, w2.detach().clone()))
    snap = mon.snapshot(4)  # not a cadence step: no update ratio outside the cadence
    assert snap.update_ratio == {}
    # The attached run logged the ratio at step 4 through the pre-hook; recompute it.
    mon2 = SpectralMonitor(_model(), every=4, budget=None, include="*.w2")
    assert mon2.layers == ["layers.0.feed_forward.w2"]
    model3 = _model()
    opt3 = torch.optim.AdamW(model3.parameters(), lr=1e-2)
    mon3 = SpectralMonitor(model3, every=4, budget=None, include="*.w2")
    snaps = []
    # Manual step() calls (no attach): the monitor copies W after step 3 itself.
    _train(model3, opt3, _batches(4), after_step=lambda i: snaps.append(mon3.step(i + 1)))
    ratio = snaps[3].update_ratio["layers.0.feed_forward.w2"]
    delta = model3.layers[0].feed_forward.w2.weight - before[3]
    ref = _svd(delta)[0] / _svd(model3.layers[0].feed_forward.w2.weight)[0]
    assert ratio == pytest.approx(ref, rel=1e-4)
    assert torch.equal(model3.layers[0].feed_forward.w2.weight, w2)  # same run both ways
    mon.close()


# ------------------------------------------------------------- no effect on training
def _run_bitwise(with_monitor: bool, tmp_path) -> dict[str, torch.Tensor]:
    pc_mod = pytest.importorskip("specopt.pc.parametrization")
    model = _model(seed=5)
    nn.utils.parametrizations.spectral_norm(model.layers[0].attention.wq)
    handle = pc_mod.apply_pc(model, level=2, include="layers.0.feed_forward.*")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    handle.attach(opt)
    mon = None
    if with_monitor:
        mon = SpectralMonitor(model, log_dir=tmp_path / "bitwise", every=2, budget=None,
                              save_spectra=True)
        mon.attach(opt)
    _train(model, opt, _batches(5, seed=9), monitor=mon)
    if mon is not None:
        assert mon.snapshot().metrics  # an extra read in training mode changes nothing either
        mon.close()
    state = dict(model.state_dict())
    state.update({f"opt.{k}": v for k, v in opt.state_dict()["state"][0].items()})
    return state


def test_monitor_leaves_training_bit_identical_with_spectral_norm_and_pc(tmp_path) -> None:
    ref = _run_bitwise(False, tmp_path)
    got = _run_bitwise(True, tmp_path)
    assert ref.keys() == got.keys()
    assert any(k.endswith("_u") for k in ref)  # spectral_norm's power-iteration vector
    for key in ref:
        assert torch.equal(ref[key], got[key]), key


def test_reading_spectral_norm_weight_never_advances_its_power_iteration() -> None:
    model = _model()
    layer = nn.utils.parametrizations.spectral_norm(model.layers[0].attention.wq)
    layer.train()
    sn = layer.parametrizations.weight[0]
    u0, v0 = sn._u.clone(), sn._v.clone()
    mon = SpectralMonitor(model, include="*.wq", budget=None)
    snap = mon.snapshot(0)
    assert torch.equal(sn._u, u0) and torch.equal(sn._v, v0)
    assert sn.training  # mode restored
    assert set(snap.metrics) == {"layers.0.attention.wq", "layers.0.attention.wq/raw"}
    assert snap.metrics["layers.0.attention.wq"]["sigma_max"] == pytest.approx(1.0, rel=0.05)


def test_pc_effective_and_raw_spectra_differ_as_the_polynomial_says(tmp_path) -> None:
    pc_mod = pytest.importorskip("specopt.pc.parametrization")
    model = _model(seed=7)
    handle = pc_mod.apply_pc(model, level=4, include="layers.0.feed_forward.w2")
    mon = SpectralMonitor(model, log_dir=tmp_path, include="*.feed_forward.*", budget=None,
                          every=1, alarms=[ConditionNumberAlarm(1.0001, metric="condition_number")])
    snap = mon.step(1)
    mon.close()
    # Snapshot alarms judge effective weights only (a raw PC weight may be ill-conditioned).
    assert {a.layer for a in mon.alarms_fired} == {k for k in snap.metrics if "/raw" not in k}
    path = "layers.0.feed_forward.w2"
    assert {path, path + "/raw"} <= set(snap.metrics)
    assert "layers.0.feed_forward.w1/raw" not in snap.metrics  # plain layer: one entry
    module = model.get_submodule(path)
    pc = pc_mod.get_pc(module)
    raw = module.parametrizations.weight.original.detach().double()
    s = float(pc.sigma(raw.float()))
    gamma = 1.0 if pc.gamma is None else float(pc.gamma.detach())
    x = np.linalg.svd(raw.numpy(), compute_uv=False) / s
    f = sum(c * x ** (2 * j + 1) for j, c in enumerate(pc.polynomial.coefficients))
    expected = np.sort(gamma * s * np.abs(f))[::-1]
    np.testing.assert_allclose(snap.spectra[path], expected, rtol=2e-4, atol=1e-7)
    np.testing.assert_allclose(snap.spectra[path + "/raw"], x * s, rtol=1e-5)
    # Level 4 compresses the spectrum: the effective weight is better conditioned.
    assert snap.metrics[path]["gmcn"] < snap.metrics[path + "/raw"]["gmcn"]
    assert handle.names == [path]
    tags = set(_events(str(tmp_path)).Tags()["scalars"])
    assert f"spectral/gmcn/{path}/raw" in tags and f"spectral/gmcn/{path}" in tags


# ------------------------------------------------------------------------- alarms
def test_alarms_fire_on_blow_up_and_not_on_healthy_run(pretrained, tmp_path, caplog) -> None:
    # Healthy continuation of a pretrained run: default rules stay silent.
    model, opt = _resume(pretrained)
    mon = SpectralMonitor(model, every=5, budget=None, start_step=100)
    mon.attach(opt)
    _train(model, opt, _batches(30, seed=4), monitor=mon)
    assert list(mon.alarms_fired) == []
    mon.close()

    # Same start, one layer multiplied by 1.5 after every step.
    model, opt = _resume(pretrained)
    fired = []
    mon = SpectralMonitor(model, log_dir=tmp_path, every=5, budget=None, start_step=100,
                          on_alarm=fired.append)
    mon.attach(opt)
    wv = model.layers[0].attention.wv.weight

    def blow_up(i: int) -> None:
        with torch.no_grad():
            wv.mul_(1.5)

    with caplog.at_level(logging.WARNING, logger="specopt.spectral.alarms"):
        _train(model, opt, _batches(10, seed=4), monitor=mon, before_step=blow_up)
    mon.close()
    growth = [a for a in fired if a.rule == "sigma_max_growth"]
    assert growth and {a.layer for a in growth} == {"layers.0.attention.wv"}
    assert len(growth) == 1  # latched: one alarm per episode
    assert 101 <= growth[0].step <= 105 and growth[0].value > 4
    assert "layers.0.attention.wv" in caplog.text and f"step {growth[0].step}" in caplog.text
    texts = _events(str(tmp_path)).Tensors("alarms/text_summary")
    assert any(b"sigma_max_growth" in t.tensor_proto.string_val[0] for t in texts)


def test_nonfinite_weights_and_grads_alarm_without_crashing(tmp_path) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fired = []
    mon = SpectralMonitor(model, log_dir=tmp_path, every=2, budget=None, on_alarm=fired.append,
                          save_spectra=True)
    mon.attach(opt)

    def poison(i: int) -> None:
        if i == 0:
            model.layers[0].feed_forward.w1.weight.grad[0, 0] = math.nan

    _train(model, opt, _batches(2), before_step=poison)
    mon.close()
    rules = {(a.rule, a.layer) for a in fired}
    assert ("nonfinite_grad", "layers.0.feed_forward.w1") in rules
    assert ("nonfinite_weight", "layers.0.feed_forward.w1") in rules
    # Latched: w1 fires once although its gradient stays NaN; NaN then spreads to others.
    steps = [a.step for a in fired if a.layer == "layers.0.feed_forward.w1"]
    assert steps == [1, 1]
    assert len({a.layer for a in fired}) > 1
    acc = _events(str(tmp_path))
    assert math.isnan(acc.Scalars("spectral/condition_number/layers.0.feed_forward.w1")[-1].value)
    assert "spectral_hist/log10_sigma/layers.0.feed_forward.w1" not in acc.Tags()["histograms"]
    assert acc.Scalars("spectral/model/nonfinite_matrices")[-1].value == len(mon.layers) == 9


def test_rules_directly() -> None:
    rule = LossSpikeAlarm(window=10, min_history=5)
    out = [rule.check(Observation(step=i, loss=2.0 + 0.01 * (i % 3))) for i in range(8)]
    assert not any(out)
    (spike,) = rule.check(Observation(step=8, loss=5.0))
    assert spike.rule == "loss_spike" and spike.layer is None and "step 8" in spike.message
    assert rule.check(Observation(step=9, loss=6.0)) == []  # latched while it persists
    nf = NonFiniteAlarm()
    assert nf.check(Observation(step=1, loss=math.inf))[0].rule == "nonfinite_loss"
    assert nf.check(Observation(step=2, loss=1.0)) == []
    assert len(nf.check(Observation(step=3, loss=math.nan))) == 1  # re-arms after clearing
    cond = ConditionNumberAlarm(100, metric="condition_number")
    assert cond.check(Observation(step=1, metrics={"a": {"condition_number": math.inf}}))
    sr = StableRankCollapseAlarm(warmup=0)
    assert not sr.check(Observation(step=1, metrics={"a": {"stable_rank": 20.0}}))
    (collapse,) = sr.check(Observation(step=2, metrics={"a": {"stable_rank": 1.5}}))
    assert collapse.threshold == pytest.approx(2.0)
    g = SigmaMaxGrowthAlarm(factor=2, window=3, warmup=0)
    assert not g.check(Observation(step=0, sigma_max={"a": 1.0}))
    assert not g.check(Observation(step=4, sigma_max={"a": 2.5}))  # step 0 left the window
    assert g.check(Observation(step=5, sigma_max={"a": 5.1}))
    assert [r.name for r in default_alarms()] == [
        "condition_number", "sigma_max_growth", "stable_rank_collapse", "nonfinite",
        "loss_spike", "loss_divergence"]


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: ConditionNumberAlarm(-1), "max_value must be a finite positive number"),
        (lambda: ConditionNumberAlarm(metric="x"), "metric must be 'condition_number' or"),
        (lambda: SigmaMaxGrowthAlarm(factor=1.0), "factor must be > 1, got 1.0"),
        (lambda: SigmaMaxGrowthAlarm(window=0), "window must be an int >= 1, got 0"),
        (lambda: StableRankCollapseAlarm(2.0), "fraction must be < 1, got 2.0"),
        (lambda: LossSpikeAlarm(min_history=1), r"min_history must be an int in \[2, window\]"),
    ],
)
def test_rule_validation_messages(factory, match) -> None:
    with pytest.raises(ValueError, match=match):
        factory()


# ------------------------------------------------------------ attach/detach, sinks
def test_attach_detach_leaves_optimizer_unchanged() -> None:
    model, twin = _model(), _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt_twin = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    pre, post = dict(opt._optimizer_step_pre_hooks), dict(opt._optimizer_step_post_hooks)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    mon = SpectralMonitor(model, every=2, budget=None)
    handle = mon.attach(opt)
    _train(model, opt, _batches(3))
    _train(twin, opt_twin, _batches(3))
    assert mon.global_step == 3
    handle.remove()
    assert dict(opt._optimizer_step_pre_hooks) == pre
    assert dict(opt._optimizer_step_post_hooks) == post
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups
    _train(model, opt, _batches(1))
    _train(twin, opt_twin, _batches(1))
    assert mon.global_step == 3  # detached: no longer called
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    s1, s2 = opt.state_dict(), opt_twin.state_dict()
    for k in s1["state"]:
        for name in s1["state"][k]:
            assert torch.equal(s1["state"][k][name], s2["state"][k][name])
    mon.attach(opt)
    mon.close()  # close detaches too
    assert dict(opt._optimizer_step_post_hooks) == post


def test_tied_weights_monitored_once_and_save_spectra(tmp_path) -> None:
    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, max_seq_len=32,
                      tie_embeddings=True)
    model = _model(cfg=cfg)
    mon = SpectralMonitor(model, log_dir=tmp_path, every=1, save_spectra=True, budget=None)
    assert "output" not in mon.layers and "tok_embeddings" in mon.layers
    snap = mon.step(1)
    mon.close()
    files = os.listdir(tmp_path / "spectra")
    assert files == ["step_00000001.npz"]
    with np.load(tmp_path / "spectra" / files[0]) as z:
        assert set(z.files) == set(mon.layers)
        np.testing.assert_array_equal(z["tok_embeddings"], snap.spectra["tok_embeddings"])


class _FailingWriter:
    log_dir = None

    def __init__(self) -> None:
        self.calls = 0

    def add_scalar(self, *args, **kwargs) -> None:
        self.calls += 1
        raise OSError("No space left on device")

    def __getattr__(self, name):
        return lambda *a, **k: None


def test_write_failure_warns_once_and_training_continues() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    writer = _FailingWriter()
    mon = SpectralMonitor(model, writer=writer, every=1, budget=None)
    mon.attach(opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, opt, _batches(3))
    mon.close()
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "No space left on device" in msgs[0]
    assert "TensorBoardSink" in msgs[0] and writer.calls > 3
    assert mon.global_step == 3


class _SlowSink(Sink):
    """Makes every snapshot cost ~20 ms: far above 2% of a ~0 ms "training step"."""

    def write_snapshot(self, snapshot) -> None:
        import time

        time.sleep(0.02)


def test_explicit_budget_backs_off_to_the_bound_before_the_first_snapshot(caplog) -> None:
    mon = SpectralMonitor(_model(), every=1, budget=0.02, alarms=())
    mon.sink.sinks.append(_SlowSink())
    with caplog.at_level(logging.WARNING, logger="specopt.spectral"):
        steps = [i for i in range(1, 41) if mon.step(i) is not None]
    # The estimate (~ms vs ~us steps) backs off to the maximum (16x) before any snapshot
    # is paid for, and it says so once; the snapshots then follow that cadence.
    assert mon.current_every == 16 and steps == [16, 32]
    backoff = [r for r in caplog.records if "backed off from every 1 to every 16" in r.message]
    assert len(backoff) == 1
    fixed = SpectralMonitor(_model(), every=1, budget=None, alarms=())
    fixed.sink.sinks.append(_SlowSink())
    assert [i for i in range(1, 5) if fixed.step(i) is not None] == [1, 2, 3, 4]
    assert fixed.current_every == 1


def test_console_sink_lists_worst_layers_first() -> None:
    from rich.console import Console

    buf = io.StringIO()
    sink = ConsoleSink(top=2, console=Console(file=buf, width=200))
    mon = SpectralMonitor(_model(), budget=None)
    mon.sink.sinks.append(sink)
    snap = mon.snapshot(7)
    text = buf.getvalue()
    worst = max(snap.metrics, key=lambda k: snap.metrics[k]["condition_number"])
    assert "step 7" in text and worst in text
    assert text.count("layers.0") + text.count("tok_emb") + text.count("output") == 2
    live = ConsoleSink(live=True, console=Console(file=io.StringIO(), width=200))
    live.write_snapshot(snap)
    live.close()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"every": 0}, ValueError, "every must be an int >= 1, got 0"),
        ({"budget": 2.0}, ValueError,
         r"budget must be a float in \(0, 1\], None or 'auto', got 2.0"),
        ({"console": "yes"}, ValueError, "console must be False, True or 'live', got 'yes'"),
        ({"include": "nothing.*"}, ValueError, r"SpectralMonitor: include pattern 'nothing\.\*' "
                                                r"matches no weight matrix of the model"),
        ({"include": [3]}, TypeError, "include must be a glob string"),
        ({"alarms": [object()]}, TypeError, "alarms must be AlarmRule instances"),
        ({"save_spectra": True}, ValueError, "save_spectra=True needs log_dir"),
        ({"dtype": torch.float16}, ValueError, "dtype must be torch.float32 or torch.float64"),
        ({"log_dir": "x", "writer": object()}, ValueError, "either log_dir or writer"),
        ({"on_alarm": 3}, TypeError, "on_alarm must be callable"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        SpectralMonitor(_model(), **kwargs)


def test_bad_model_and_log_dir(tmp_path) -> None:
    with pytest.raises(ValueError, match="has no weight matrices to monitor"):
        SpectralMonitor(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)))
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        SpectralMonitor("model")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match=r"log_dir '.*file/run' is not a writable directory"):
        SpectralMonitor(_model(), log_dir=blocker / "run")
    mon = SpectralMonitor(_model())
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer"):
        mon.attach("sgd")
    mon.close()
    with pytest.raises(RuntimeError, match="after close"):
        mon.step(1)


@pytest.mark.slow
def test_bench_monitor_quick_runs_and_writes_json(tmp_path, load_tool) -> None:
    import json

    bench = load_tool("bench_monitor")
    threads = torch.get_num_threads()
    try:
        res = bench.main(["--quick", "--json", str(tmp_path / "out.json")])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["bit_identical_weights"] is True
    assert saved == json.loads(json.dumps(res))
    # Each figure is what its name says: the overhead is the median paired ratio - 1,
    # the final cadence a power-of-two back-off of the asked one, within the 16x bound.
    assert len(saved["ratios"]) == 2 == saved["config"]["rounds"]
    assert saved["overhead_median_paired"] == pytest.approx(
        statistics.median(saved["ratios"]) - 1)
    assert saved["overhead_ratio_of_medians"] == pytest.approx(
        saved["step_ms_monitored_median"] / saved["step_ms_plain_median"] - 1)
    every = saved["config"]["every"]
    assert saved["monitor_every_final"] in [every * 2**k for k in range(5)]
    assert res["matrices"] == 16


def _layout_charts(log_dir: str) -> list[tuple[str, str, list[str]]]:
    from tensorboard.plugins.custom_scalar import layout_pb2

    acc = _events(log_dir)
    proto = acc.Tensors("custom_scalars__config__")[0].tensor_proto
    layout = layout_pb2.Layout.FromString(proto.string_val[0])
    return [(c.title, ch.title, list(ch.multiline.tag)) for c in layout.category
            for ch in c.chart]


@pytest.mark.parametrize("signal_every", [1, 0])
def test_dashboard_lists_only_existing_series_loss_first(tmp_path, signal_every) -> None:
    """Issue 15: 4 of 27 charts were empty (sigma_max and update ratio of PC effective
    weights, logged under <path>/raw); every chart must match a logged scalar."""
    from torch.utils.tensorboard import SummaryWriter

    from specopt.pc import apply_pc

    model = _model()
    apply_pc(model, level=2, include=["*.feed_forward.*", "*.attention.wo"])
    writer = SummaryWriter(str(tmp_path))
    mon = SpectralMonitor(model, writer=writer, every=2, budget=None, alarms=(),
                          signal_every=signal_every, loss_tags=["train/loss"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon.attach(opt)
    for step, x in enumerate(_batches(4), start=1):
        loss = model.loss(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        writer.add_scalar("train/loss", float(loss.detach()), step)
    mon.close()
    writer.close()
    charts = _layout_charts(str(tmp_path))
    tags = _events(str(tmp_path)).Tags()["scalars"]
    assert charts[0][:2] == ("loss", "loss")
    for category, title, regexes in charts:
        assert any(re.search(rx, t) for rx in regexes for t in tags), (category, title)
    sigma_pi = [c for c in charts if c[0].startswith("spectral: sigma_max")]
    assert bool(sigma_pi) == bool(signal_every)
    assert any(title.endswith("(PC raw)") for c, title, _ in charts if "update ratio" in c)
    assert not any(title.endswith("(PC)") for c, title, _ in charts if "update ratio" in c)


def test_fp16_gradient_of_1000_is_not_nonfinite() -> None:
    """Issue 12: the 2-norm of an fp16 gradient of 1000.0 everywhere overflows (256,000 >
    65,504); the monitor uses the optimizer's check, which rechecks such norms exactly."""
    layer = nn.Linear(256, 256).half()
    fired: list = []
    mon = SpectralMonitor(nn.Sequential(layer), every=100, on_alarm=fired.append)
    layer.weight.grad = torch.full_like(layer.weight, 1000.0)
    mon.step(1)
    assert fired == []
    layer.weight.grad[3, 4] = math.inf
    mon.step(2)
    assert [(a.rule, a.layer) for a in fired] == [("nonfinite_grad", "0")]


# ------------------------------------------------- which matrices, how they are labelled


def _mixers() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict({"attn": nn.MultiheadAttention(16, 2), "rnn": nn.LSTM(16, 12),
                          "gru": nn.GRU(12, 8), "emb": nn.Embedding(10, 16),
                          "mlp": nn.Linear(16, 24)})


def test_bare_matrices_muon_trains_are_monitored_with_svd_values() -> None:
    from specopt import build_optimizer

    model = _mixers()
    mon = SpectralMonitor(model, every=1, budget=None, alarms=(), histograms=False)
    assert mon.layers == [
        "attn.in_proj_weight", "attn.out_proj", "rnn.weight_ih_l0", "rnn.weight_hh_l0",
        "gru.weight_ih_l0", "gru.weight_hh_l0", "emb", "mlp"]
    # Every tensor the router sends to Muon is monitored (module weights under the
    # module path, bare matrices under <module>.<name>).
    muon = [r.name for r in build_optimizer(model, "muon").routing.select("muon")]
    assert muon and all(n.removesuffix(".weight") in mon.layers for n in muon), muon
    snap = mon.snapshot(0)
    module_weights = ("attn.out_proj", "emb", "mlp")
    for key in mon.layers:
        w = model.get_parameter(f"{key}.weight" if key in module_weights else key)
        sigma = torch.linalg.svdvals(w.detach().double())
        assert snap.metrics[key]["sigma_max"] == pytest.approx(float(sigma[0]), rel=1e-5)
        assert snap.metrics[key]["sigma_min"] == pytest.approx(float(sigma[-1]), rel=1e-4)
    blocks = {m.info.key: m.info.block for m in mon._matrices}
    assert blocks["attn.in_proj_weight"] == "attention" == blocks["attn.out_proj"]
    assert blocks["emb"] == "embedding" and blocks["rnn.weight_hh_l0"] == "other"
    # include/exclude select bare matrices by key or by their module's path.
    only = SpectralMonitor(model, include="rnn", exclude="*hh*", budget=None, alarms=())
    assert only.layers == ["rnn.weight_ih_l0"]


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "pc"])
def test_parametrized_layers_monitor_their_effective_weight(kind) -> None:
    from torch.nn.utils import parametrizations

    from specopt.pc import apply_pc

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    if kind == "pc":
        apply_pc(model, include="0", level=2)
    else:
        getattr(parametrizations, kind)(model[0])
        if kind == "weight_norm":  # a gain that differs from the direction's norms
            with torch.no_grad():
                model[0].parametrizations.weight.original0.mul_(torch.rand(24, 1) + 0.5)
    mon = SpectralMonitor(model, every=1, budget=None, alarms=(), histograms=False)
    assert mon.layers == ["0", "2", "0/raw"]
    snap = mon.snapshot(0)
    plist = model[0].parametrizations.weight
    raw = plist.original1 if kind == "weight_norm" else plist.original
    with torch.no_grad():
        eff = torch.linalg.svdvals(model[0].weight.double())
    got = snap.metrics["0"]
    assert got["sigma_max"] == pytest.approx(float(eff[0]), rel=1e-5)
    assert got["condition_number"] == pytest.approx(float(eff[0] / eff[-1]), rel=1e-4)
    raw_sigma = torch.linalg.svdvals(raw.detach().double())
    assert snap.metrics["0/raw"]["sigma_max"] == pytest.approx(float(raw_sigma[0]), rel=1e-5)
    if kind != "spectral_norm":  # spectral_norm's u is not converged at init
        assert not math.isclose(got["sigma_max"], float(raw_sigma[0]), rel_tol=1e-3)


def test_sharded_snapshot_path_labels_layers_like_the_local_one(tmp_path) -> None:
    """The distributed snapshot (one process, a gloo group of one) ships the owner's
    LayerInfo: block (an nn.Embedding named "emb" is "embedding"), pc, raw as local."""
    import torch.distributed as dist

    from specopt.pc import apply_pc
    from specopt.spectral.owners import OwnerPlan

    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.Embedding(10, 16), "proj": nn.Linear(16, 16),
                           "attn": nn.MultiheadAttention(16, 2)})
    apply_pc(model, include="proj", level=2)
    local_infos: list = []
    mon = SpectralMonitor(model, every=1, budget=None, alarms=(), histograms=False)
    original = mon._finish_snapshot

    def spy(step, t0, infos, *rest):
        local_infos.append(list(infos))
        return original(step, t0, infos, *rest)

    mon._finish_snapshot = spy
    local = mon._snapshot(0)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        mon._plan = OwnerPlan([(m.info.key, m.trained) for m in mon._matrices]
                              + [(m.raw_info.key, m.trained) for m in mon._matrices
                                 if m.raw_info])
        sharded = mon._snapshot_distributed(0)
    finally:
        dist.destroy_process_group()
    by_key = [{i.key: i for i in infos} for infos in local_infos]
    assert by_key[0] == by_key[1]
    assert by_key[1]["emb"].block == "embedding" and by_key[1]["proj"].pc
    assert by_key[1]["proj/raw"].raw
    for key, vals in local.metrics.items():
        assert sharded.metrics[key]["sigma_max"] == pytest.approx(vals["sigma_max"], rel=1e-6)


def test_spectra_file_is_written_atomically_with_umask_permissions(tmp_path, monkeypatch) -> None:
    """The one atomic writer (specopt.checkpoint.atomic_write): a failed write leaves no
    file, not even a temporary one; a good one is readable by the group like any output."""
    from specopt.spectral import sinks
    from specopt.spectral.sinks import Snapshot, SpectraFileSink

    sink = SpectraFileSink(tmp_path / "spectra")
    snap = Snapshot(step=7, metrics={}, spectra={"fc": np.array([3.0, 1.0])}, update_ratio={},
                    aggregates={}, nonfinite=[], time_ms=0.0)
    real_savez = np.savez

    def broken(f, **arrays):
        f.write(b"half an npz")
        raise OSError("disk full")

    monkeypatch.setattr(sinks.np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        sink.write_snapshot(snap)
    assert list((tmp_path / "spectra").iterdir()) == []
    monkeypatch.setattr(sinks.np, "savez", real_savez)
    sink.write_snapshot(snap)
    path = tmp_path / "spectra" / "step_00000007.npz"
    assert [p.name for p in (tmp_path / "spectra").iterdir()] == [path.name]
    np.testing.assert_array_equal(np.load(path)["fc"], [3.0, 1.0])
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
