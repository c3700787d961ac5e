"""Alarm calibration: the loss-divergence rule fires within a few steps of an absurd LR
(and `specopt diagnose` reports it); healthy default runs of every optimizer, with and
without PC, raise no alarm at all (output heads included)."""

from __future__ import annotations

import math

import pytest

from specopt.spectral import (
    LossDivergenceAlarm,
    Observation,
    StableRankCollapseAlarm,
    default_alarms,
)

# `specopt train --lr 10 --steps 20` (tiny preset, Muon + PC): its first train/loss values.
ABSURD_LR_LOSSES = [5.54, 11.97, 13.15, 25.29, 37.31, 29.47, 40.97, 50.29, 116.6]
# A healthy run (default Muon): the loss falls from the untrained model's.
HEALTHY_LOSSES = [5.55, 5.52, 5.41, 5.2, 4.9, 4.6, 4.3, 4.1, 3.9, 3.6, 3.8, 3.5, 3.3]


def _fired(rule, losses, start=1):
    return [a for i, x in enumerate(losses, start=start)
            for a in rule.check(Observation(step=i, loss=x))]


def test_loss_divergence_fires_at_step_2_of_an_absurd_lr_once() -> None:
    fired = _fired(LossDivergenceAlarm(), ABSURD_LR_LOSSES)
    assert [(a.rule, a.step) for a in fired] == [("loss_divergence", 2)]  # latched after
    assert fired[0].threshold == pytest.approx(5.54 * 1.5) and fired[0].value == 11.97
    assert "the run is diverging" in fired[0].message


def test_loss_divergence_silent_on_healthy_loss_and_ignores_nonfinite() -> None:
    assert _fired(LossDivergenceAlarm(), HEALTHY_LOSSES) == []
    # NaN is not taken as the first loss (NonFiniteAlarm's job): the baseline is 2.0.
    fired = _fired(LossDivergenceAlarm(rel=0.1), [math.nan, 2.0, 2.1, 2.3])
    assert [(a.step, a.threshold) for a in fired] == [(4, pytest.approx(2.2))]
    with pytest.raises(ValueError, match="rel must be a finite positive number"):
        LossDivergenceAlarm(rel=0)


def test_default_rules_include_divergence_and_fire_on_the_absurd_lr() -> None:
    rules = default_alarms()
    fired = [a.rule for i, x in enumerate(ABSURD_LR_LOSSES[:4], start=1) for r in rules
             for a in r.check(Observation(step=i, loss=x))]
    assert "loss_divergence" in fired


def test_stable_rank_peak_counts_from_warmup_only() -> None:
    """A healthy AdamW output head: 12.5 at init, 1.19 at step 40 (not a collapse); after
    the warmup a 10x fall, or any value under min_value, is."""
    rule = StableRankCollapseAlarm(warmup=100)

    def obs(step, sr):
        return Observation(step=step, metrics={"output": {
            "stable_rank": sr, "sigma_max": 2.0, "sigma_min": 0.1}})

    assert rule.check(obs(10, 12.5)) == [] and rule.check(obs(40, 1.19)) == []
    assert [a.step for a in rule.check(obs(50, 1.01))] == [50]  # below 1.05: any step
    assert rule.check(obs(100, 20.0)) == []  # clears; peak 20 from the warmup on
    fired = rule.check(obs(150, 1.9))
    assert [a.threshold for a in fired] == [pytest.approx(2.0)]


# ------------------------------------------------------------- CLI runs (slow)
_SHORT = ["--preset", "tiny", "--steps", "60", "--monitor-budget", "0", "--eval-every", "0",
          "--ckpt-every", "0", "--threads", "1", "--no-progress"]


def _alarm_texts(log_dir) -> list[tuple[int, str]]:
    from specopt.cli._events import read_run

    return [(s, text) for s, tag, text in read_run(log_dir).texts if tag == "alarms"]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
@pytest.mark.parametrize("pc", ["--pc", "--no-pc"])
def test_healthy_default_runs_raise_no_alarm(optimizer, pc, tmp_path, capsys) -> None:
    """Default options (batch 16, seq 128, default LR and warmup) for 60 steps, a snapshot
    every 10 steps: the AdamW runs used to print stable_rank_collapse in output at 40."""
    from specopt.cli.main import main

    run = tmp_path / "run"
    assert main(["train", "--optimizer", optimizer, pc, *_SHORT, "--log-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert _alarm_texts(run) == [] and "spectral alarm" not in out


@pytest.mark.slow
def test_absurd_lr_raises_divergence_and_diagnose_reports_it(tmp_path, capsys) -> None:
    """README's unstable example: `specopt train --lr 10 --steps 20`."""
    from specopt.cli.main import main

    run = tmp_path / "run"
    assert main(["train", "--lr", "10", "--steps", "20", "--eval-every", "0", "--ckpt-every",
                 "0", "--threads", "1", "--no-progress", "--log-dir", str(run)]) == 1  # diverged
    capsys.readouterr()
    alarms = _alarm_texts(run)
    divergence = [s for s, text in alarms if "loss_divergence" in text]
    assert divergence and divergence[0] <= 4
    assert main(["diagnose", str(run)]) == 1  # diagnose exits 1 on a diverged run
    out = capsys.readouterr().out
    assert "loss_divergence" in out and "no alarms fired" not in out
