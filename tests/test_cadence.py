"""Cadence controller: explicit cadences honoured, bounded and reported back-off, the first
snapshot budgeted from an estimate, bounded snapshot memory at 300 layers."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator
from torch import nn

from specopt.spectral import SpectralMonitor, StableRankCollapseAlarm, metrics
from specopt.spectral import monitor as monitor_mod
from specopt.spectral.cadence import (
    DEFAULT_BUDGET,
    DEFAULT_EVERY,
    MAX_BACKOFF,
    CadenceController,
    estimate_snapshot_ms,
    resolve_budget,
)
from specopt.spectral.sinks import Sink


class _SlowSink(Sink):
    def write_snapshot(self, snapshot) -> None:
        import time

        time.sleep(0.02)  # each snapshot far above 2% of the ~0 ms steps below


def _mlp(n: int = 3, d: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(d, d) for _ in range(n)])


def _controller(every: int, budget: float | None, step_ms: float = 10.0) -> CadenceController:
    c = CadenceController(every, 1, budget)
    c.step_times.extend([step_ms / 1e3] * 5)
    return c


def test_resolve_budget_default_vs_explicit() -> None:
    assert resolve_budget(None, "auto") == (DEFAULT_EVERY, DEFAULT_BUDGET)
    assert resolve_budget(5, "auto") == (5, None)  # explicit every: fixed
    assert resolve_budget(5, 0.1) == (5, 0.1)  # explicit budget thins it
    assert resolve_budget(None, None) == (DEFAULT_EVERY, None)


def test_explicit_every_is_honoured_over_12_steps() -> None:
    """Issue 12: SpectralMonitor(model, every=5) over 12 steps logged only step 5."""
    mon = SpectralMonitor(_mlp(), every=5, alarms=())
    mon.sink.sinks.append(_SlowSink())
    steps = [i for i in range(1, 13) if mon.step(i) is not None]
    assert steps == [5, 10] and mon.current_every == 5


def test_backoff_doubles_is_bounded_and_warns_once(caplog) -> None:
    c = _controller(every=50, budget=0.02)  # 10 ms steps
    with caplog.at_level(logging.WARNING, logger="specopt.spectral"):
        for _ in range(3):
            c.after_snapshot(snapshot_ms=40.0)
    # 40 ms / (every * 10 ms) <= 1% (half the budget) needs every >= 400: 50 -> 400.
    assert c.every_eff == 400
    assert [r.message.count("backed off") for r in caplog.records] == [1]
    assert c.scalars()["backoff"] == 8.0 and c.scalars()["every"] == 400.0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="specopt.spectral"):
        c.after_snapshot(snapshot_ms=1e6)  # absurd: stays at the documented maximum
    assert c.every_eff == c.max_every == 50 * MAX_BACKOFF
    assert any("maximum cadence every 800" in r.message for r in caplog.records)


def test_cadence_recovers_but_never_below_every() -> None:
    c = _controller(every=10, budget=0.02)
    c.after_snapshot(snapshot_ms=50.0)
    assert c.every_eff == 160
    c.after_snapshot(snapshot_ms=0.01)
    assert c.every_eff == 10  # cheap again: back to the base cadence, not below


def test_no_budget_never_changes_cadence() -> None:
    c = _controller(every=3, budget=None)
    c.after_snapshot(snapshot_ms=1e6)
    c.plan_first_snapshot(1e6, step=3)
    assert (c.every_eff, c.signal_stride) == (3, 1) and not c.needs_first_estimate


def test_first_snapshot_planned_from_the_estimate(monkeypatch) -> None:
    """The first snapshot is not paid for when its estimate does not fit the budget."""
    calls = []
    monkeypatch.setattr(monitor_mod, "estimate_snapshot_ms",
                        lambda shapes, **kw: calls.append((shapes, kw["norm_shapes"])) or 1e9)
    ran = []
    monkeypatch.setattr(SpectralMonitor, "_snapshot", lambda self, step: ran.append(step))
    mon = SpectralMonitor(_mlp(), every=2, budget=0.5, alarms=(), signal_every=0)
    for i in range(1, 32):
        mon.step(i)
        assert (mon._previous is None) == (i not in (1, 31))  # postponed: copy freed
    # Step 2 is the first snapshot step with a step time: the estimate backs off to 32.
    assert calls == [({(16, 16): 3}, {(16, 16): 3})] and ran == []  # 3 spectra + 3 deltas
    assert mon.current_every == 2 * MAX_BACKOFF
    mon.step(32)
    assert ran == [32]


def test_estimate_counts_every_matrix() -> None:
    est = estimate_snapshot_ms({(8, 8): 10}, device=torch.device("cpu"), dtype=torch.float32,
                               per_matrix_ms=5.0)
    assert est >= 50.0  # per-matrix overhead times the count, plus the probe's time
    both = estimate_snapshot_ms({(8, 8): 10}, device=torch.device("cpu"), dtype=torch.float32,
                                per_matrix_ms=5.0, norm_shapes={(100, 90): 4})
    assert both >= est + 20.0  # the update ratio's norms are counted too


def test_backoff_scalars_in_event_file(tmp_path) -> None:
    mon = SpectralMonitor(_mlp(), log_dir=tmp_path, every=1, budget=0.02, alarms=())
    mon.sink.sinks.append(_SlowSink())
    for i in range(1, 34):
        mon.step(i)
    mon.close()
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    every = [(e.step, e.value) for e in acc.Scalars("monitor/every")]
    backoff = [(e.step, e.value) for e in acc.Scalars("monitor/backoff")]
    assert [s for s, _ in every] == [16, 32] and all(v == 16 for _, v in every)
    assert backoff == [(16, 16.0), (32, 16.0)]


def test_rank_alarm_ignores_single_singular_value() -> None:
    rule = StableRankCollapseAlarm()
    from specopt.spectral import Observation

    one = {"sigma_max": 3.0, "sigma_min": 3.0, "stable_rank": 1.0}
    wide = {"sigma_max": 3.0, "sigma_min": 1e-3, "stable_rank": 1.0}  # a real collapse
    fired = rule.check(Observation(step=1, metrics={"head": one, "w": wide}))
    assert [a.layer for a in fired] == ["w"]


def test_unit_side_heads_raise_no_rank_alarm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 1), nn.Linear(1, 16))
    fired = []
    mon = SpectralMonitor(model, every=1, on_alarm=fired.append)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon.attach(opt)
    for _ in range(5):
        model(torch.randn(4, 16)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert mon.layers == ["0"]  # (1, 16) / (16, 1): one singular value, no spectrum
    assert not [a for a in fired if a.rule == "stable_rank_collapse"]


def test_snapshot_memory_is_chunked(monkeypatch) -> None:
    """Every batched call stays under CHUNK_BYTES (float64) and gives the same spectra."""
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(300)])
    full = SpectralMonitor(model, every=1, budget=None, alarms=(), histograms=False)
    want = full.snapshot(1).spectra
    seen: list[int] = []
    real = monitor_mod.singular_values

    def spy(ws, **kw):  # the effective weights materialized at once, as float64 bytes
        seen.append(sum(8 * w.numel() for w in ws))
        return real(ws, **kw)

    monkeypatch.setattr(metrics, "CHUNK_BYTES", 64 * 1024)
    monkeypatch.setattr(monitor_mod, "singular_values", spy)
    got = SpectralMonitor(model, every=1, budget=None, alarms=()).snapshot(1).spectra
    assert len(seen) > 1 and max(seen) <= 64 * 1024
    assert got.keys() == want.keys()
    for k in want:
        assert (got[k] == want[k]).all()


_RSS_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from torch import nn
    from specopt.spectral import SpectralMonitor
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(*[nn.Linear(256, 256, bias=False) for _ in range(300)])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    mon = SpectralMonitor(model, every=2, budget=None, alarms=(), histograms=False)
    mon.attach(opt)
    def step():
        model(torch.randn(2, 256)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    step()  # grads and optimizer state allocated: the baseline
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # snapshot with update ratio
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((peak - base) * 1024, sum(p.numel() * 4 for p in model.parameters()))
""")


@pytest.mark.slow
def test_snapshot_peak_memory_at_300_layers() -> None:
    """300 layers (79 MB of weights): extra peak memory of a snapshot with the update ratio
    stays about one copy of the weights plus a chunk, not several copies of the model."""
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    extra, model_bytes = (int(x) for x in proc.stdout.split())
    assert extra <= 1.25 * model_bytes + 1.5 * metrics.CHUNK_BYTES, (extra, model_bytes)
