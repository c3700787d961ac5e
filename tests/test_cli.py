"""The `specopt` command end to end on tiny settings (in-process, one thread).

One module-scoped Muon + PC run feeds the compare / inspect / merge / resume tests; the
diagnose tests use a synthetic event file with a known precursor and a real absurd-LR run.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from specopt.checkpoint import load_checkpoint
from specopt.cli._events import read_run
from specopt.cli.diagnose import detect_spikes, diagnose, ended_diverged
from specopt.cli.main import main
from specopt.models import Llama, LlamaConfig

TINY = ["--preset", "tiny", "--batch-size", "4", "--seq-len", "32", "--threads", "1",
        "--monitor-budget", "0", "--no-progress"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def imread(path: Path) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(str(path))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    # Real text, small: faster than the full stdlib corpus and independent of it.
    import sysconfig

    src = Path(sysconfig.get_paths()["stdlib"])
    text = b"".join((src / name).read_bytes() for name in ("argparse.py", "textwrap.py"))
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_bytes(text[:200_000])
    return path


@pytest.fixture(scope="module")
def pc_run(tmp_path_factory, data_file) -> Path:
    """12 steps of Muon + PC level 2 with the monitor every 3 steps, checkpoints at 6, 12."""
    log_dir = tmp_path_factory.mktemp("runs") / "pc"
    code = main(["train", *TINY, "--optimizer", "muon", "--pc", "--steps", "12", "--warmup", "3",
                 "--monitor-every", "3", "--eval-every", "6", "--ckpt-every", "6",
                 "--data", str(data_file), "--log-dir", str(log_dir)])
    assert code == 0
    return log_dir


def test_train_writes_events_and_checkpoints(pc_run):
    run = read_run(pc_run)
    for tag in ("train/loss", "train/lr", "val/bpb", "val/loss",
                "spectral/condition_number/layers.0.feed_forward.w1",
                "spectral/condition_number/layers.1.attention.wq",
                "spectral/sigma_max_pi/layers.0.feed_forward.w2/raw",
                "spectral/model/condition_number"):
        assert tag in run.scalars, tag
    steps, loss = run.series("train/loss")
    assert steps.tolist() == list(range(1, 13)) and np.isfinite(loss).all()
    assert run.series("val/bpb")[0].tolist() == [6, 12]
    assert loss[-3:].mean() < loss[:3].mean()  # it learns
    ckpts = sorted((pc_run / "checkpoints").glob("step_*.pt"))
    assert [p.name for p in ckpts] == ["step_0000006.pt", "step_0000012.pt"]
    ckpt = load_checkpoint(ckpts[-1])
    assert ckpt["step"] == 12 and ckpt["config"]["pc"] and ckpt["config"]["pc_level"] == 2
    assert "layers.0.feed_forward.w1.parametrizations.weight.original" in ckpt["model"]
    assert not list((pc_run / "checkpoints").glob(".*tmp"))  # no temp files left behind


def test_train_prints_where_the_logs_are(tmp_path, capsys, data_file):
    log_dir = tmp_path / "r"
    code, out, _ = run_cli(capsys, "train", *TINY, "--optimizer", "adamw", "--no-pc",
                           "--no-monitor", "--steps", "2", "--data", data_file,
                           "--log-dir", log_dir)
    assert code == 0
    assert f"tensorboard --logdir {log_dir}" in out
    assert "final validation:" in out


def test_resume_is_bit_identical(pc_run, tmp_path, capsys):
    resumed = tmp_path / "resumed"
    code, out, _ = run_cli(capsys, "train", "--resume", pc_run / "checkpoints" / "step_0000006.pt",
                           "--log-dir", resumed, "--no-progress")
    assert code == 0 and "resumed from step 6" in out
    straight = load_checkpoint(pc_run / "checkpoints" / "step_0000012.pt")
    again = load_checkpoint(resumed / "checkpoints" / "step_0000012.pt")
    assert straight["model"].keys() == again["model"].keys()
    for key, value in straight["model"].items():
        assert torch.equal(value, again["model"][key]), key
    _, s_loss = read_run(pc_run).series("train/loss")
    r_steps, r_loss = read_run(resumed).series("train/loss")
    assert r_steps.tolist() == list(range(7, 13))
    np.testing.assert_array_equal(r_loss, s_loss[6:])


def test_fresh_run_refuses_an_used_log_dir(pc_run, capsys):
    code, _, err = run_cli(capsys, "train", *TINY, "--steps", "2", "--log-dir", pc_run)
    assert code == 2 and "already holds a run; pass --resume" in err


def test_train_compare_runs_baseline_and_pc(tmp_path, capsys, data_file):
    code, out, _ = run_cli(capsys, "train", "--compare", *TINY, "--steps", "3", "--no-monitor",
                           "--eval-every", "0", "--ckpt-every", "0", "--data", data_file,
                           "--log-dir", tmp_path)
    assert code == 0 and "run comparison" in out
    assert imread(tmp_path / "compare.png").ndim == 3
    base = load_checkpoint(tmp_path / "baseline" / "checkpoints" / "step_0000003.pt")
    pc = load_checkpoint(tmp_path / "pc" / "checkpoints" / "step_0000003.pt")
    assert not base["config"]["pc"] and pc["config"]["pc"]
    # Same seed: identical initial draw of the data stream.
    assert torch.equal(base["data"]["generator"], pc["data"]["generator"])


def test_resume_errors(pc_run, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--resume", tmp_path / "none")
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli(capsys, "train", "--resume", pc_run / "checkpoints" / "step_0000012.pt",
                           "--log-dir", tmp_path / "x")
    assert code == 2 and "already >= --steps 12" in err


def test_compare_plot_and_table(pc_run, tmp_path, capsys, data_file):
    baseline = tmp_path / "baseline"
    assert main(["train", *TINY, "--optimizer", "muon", "--no-pc", "--steps", "6",
                 "--monitor-every", "3", "--eval-every", "3", "--data", str(data_file),
                 "--log-dir", str(baseline)]) == 0
    capsys.readouterr()
    png = tmp_path / "cmp.png"
    code, out, _ = run_cli(capsys, "compare", baseline, pc_run, "--out", png)
    assert code == 0
    image = imread(png)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 600
    assert "baseline" in out and "pc" in out and "run comparison" in out


def test_inspect_specopt_checkpoint(pc_run, tmp_path, capsys):
    png = tmp_path / "spectra.png"
    code, out, _ = run_cli(capsys, "inspect", pc_run / "checkpoints" / "step_0000012.pt",
                           "--out", png)
    assert code == 0
    for name in ("layers.0.feed_forward.w1 (PC)", "layers.1.attention.wo (PC)",
                 "layers.1.attention.wq", "tok_embeddings", "output"):
        assert name in out, name
    assert "layers.1.attention.wq (PC)" not in out  # q/k/v are not PC layers
    assert imread(png).ndim == 3


def test_inspect_plain_state_dict_and_safetensors(tmp_path, capsys):
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("encoder_proj", torch.nn.Linear(12, 20))
    model.add_module("decoder_proj", torch.nn.Linear(20, 12))
    with torch.no_grad():  # a known condition number: singular values 10 .. 1
        u, _ = torch.linalg.qr(torch.randn(20, 12))
        v, _ = torch.linalg.qr(torch.randn(12, 12))
        model.encoder_proj.weight.copy_(u @ torch.diag(torch.linspace(10, 1, 12)) @ v.T)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "plain.pt", "--match", "encoder",
                           "--out", tmp_path / "p.png")
    assert code == 0 and "encoder_proj" in out and "decoder_proj" not in out
    row = next(line for line in out.splitlines() if "encoder_proj" in line)
    assert "10 " in row or "10.0" in row  # sigma_max and condition number are both 10
    st = pytest.importorskip("safetensors.torch")
    st.save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "m.safetensors", "--out",
                           tmp_path / "s.png")
    assert code == 0 and "encoder_proj" in out and "decoder_proj" in out
    assert imread(tmp_path / "s.png").ndim == 3


def test_inspect_errors(tmp_path, capsys):
    code, _, err = run_cli(capsys, "inspect", tmp_path / "missing.pt")
    assert code == 2 and "does not exist" in err
    torch.save({"bias": torch.zeros(3)}, tmp_path / "vec.pt")
    code, _, err = run_cli(capsys, "inspect", tmp_path / "vec.pt")
    assert code == 2 and "no 2-D weights found" in err


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_merge_loads_into_plain_model(pc_run, tmp_path, capsys, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    ckpt_path = pc_run / "checkpoints" / "step_0000012.pt"
    out = tmp_path / f"merged{suffix}"
    code, stdout, _ = run_cli(capsys, "merge", ckpt_path, out)
    assert code == 0 and "merged weights" in stdout
    cfg = LlamaConfig(**json.loads((tmp_path / f"merged{suffix}.json").read_text()))
    plain = Llama(cfg)
    if suffix == ".pt":
        state = torch.load(out, weights_only=True)
    else:
        from safetensors.torch import load_file

        state = load_file(str(out))
    plain.load_state_dict(state)  # strict: exactly a plain model's keys
    assert not any("parametrizations" in k for k in state)
    # Same function as the PC model it came from.
    from specopt.cli.train import build_model

    ckpt = load_checkpoint(ckpt_path)
    pc_model, _ = build_model(ckpt["config"]["model"], pc=True, pc_level=2)
    pc_model.load_state_dict(ckpt["model"])
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(tokens), pc_model.eval()(tokens),
                                   atol=1e-5, rtol=1e-5)


def _write_synthetic_run(log_dir: Path) -> None:
    """Flat noisy loss with a spike at step 80; layer A's sigma_max rises from step 60,
    layer B's from 70, layer C stays flat; one alarm at step 75."""
    from torch.utils.tensorboard import SummaryWriter

    rng = np.random.default_rng(0)
    w = SummaryWriter(str(log_dir))
    for step in range(1, 101):
        loss = 2.0 + 0.02 * rng.standard_normal() + (3.0 if 80 <= step <= 82 else 0.0)
        w.add_scalar("train/loss", loss, step)
        a = 1.0 if step < 60 else 1.0 + 0.1 * (step - 59)
        b = 2.0 if step < 70 else 2.0 + 0.15 * (step - 69)
        for layer, value in (("layers.0.attention.wq", a), ("layers.1.feed_forward.w2", b),
                             ("layers.0.feed_forward.w1", 3.0)):
            w.add_scalar(f"spectral/sigma_max_pi/{layer}", value * (1 + 1e-3 * rng.random()),
                         step)
    w.add_text("alarms", "step 75: sigma_max_growth in layers.0.attention.wq", 75)
    w.close()


def test_diagnose_ranks_the_injected_precursors(tmp_path, capsys):
    _write_synthetic_run(tmp_path)
    d = diagnose(tmp_path)
    assert len(d.spikes) == 1 and not d.diverged
    spike = d.spikes[0]
    assert (spike.step, spike.end_step) == (80, 82)
    assert spike.severity == pytest.approx(2.5, rel=0.05)
    layers = [(p.layer, p.metric, p.onset_step) for p in spike.precursors]
    assert layers[0] == ("layers.0.attention.wq", "sigma_max_pi", 62)  # 1.3 >= 1.25 * 1.0
    assert layers[1][0] == "layers.1.feed_forward.w2" and layers[1][2] == 73  # 2.6 >= 2.5
    assert all(p.layer != "layers.0.feed_forward.w1" for p in spike.precursors)
    assert [s for s, _ in spike.alarms] == [75]
    code, out, _ = run_cli(capsys, "diagnose", tmp_path, "--json", tmp_path / "d.json")
    assert code == 0 and "loss spike at step 80-82" in out
    assert out.index("layers.0.attention.wq") < out.index("layers.1.feed_forward.w2")
    assert json.loads((tmp_path / "d.json").read_text())["spikes"][0]["step"] == 80


def test_ended_diverged_only_when_the_run_ends_in_a_spike_far_above_its_baseline():
    steps = np.arange(1, 41)
    healthy = np.full(40, 3.0)  # flat: the 10% relative floor decides what a spike is
    blip = healthy.copy()
    blip[20:23] = 20.0  # a spike the run recovered from
    rising = healthy.copy()
    rising[30:] = 12.0  # ends at 2x its baseline
    slight = healthy.copy()
    slight[-1] *= 1.3  # a last-step jump that is a spike but under (1 + jump) x baseline
    nan_end = healthy.copy()
    nan_end[-1] = math.nan
    expected = {"healthy": False, "blip": False, "rising": True, "slight": False,
                "nan_end": True}
    for name, series in {"healthy": healthy, "blip": blip, "rising": rising,
                         "slight": slight, "nan_end": nan_end}.items():
        spikes = detect_spikes(steps, series)
        assert ended_diverged(steps, series, spikes) is expected[name], name
    assert detect_spikes(steps, slight)  # "slight" is a spike, yet not a divergence


def test_detect_spikes_ignores_noise_and_flags_nonfinite():
    steps = np.arange(1, 201)
    rng = np.random.default_rng(1)
    healthy = 3.0 * np.exp(-steps / 50) + 1.5 + 0.05 * rng.standard_normal(200)
    assert detect_spikes(steps, healthy) == []
    broken = healthy.copy()
    broken[150] = math.nan
    (first, last, peak, _), = detect_spikes(steps, broken)
    assert first == last == 151 and peak == math.inf


def test_diagnose_finds_absurd_lr_instability(tmp_path, capsys, data_file):
    log_dir = tmp_path / "absurd"
    code = main(["train", *TINY, "--optimizer", "adamw", "--no-pc", "--lr", "10", "--warmup",
                 "40", "--steps", "16", "--batch-size", "8", "--seq-len", "64",
                 "--monitor-every", "2", "--eval-every", "0", "--ckpt-every", "0",
                 "--data", str(data_file), "--log-dir", str(log_dir)])
    # Every step ran, but the run failed: exit 1 (main's docstring), not 0.
    assert code == 1 and "the loss diverged" in capsys.readouterr().out
    d = diagnose(log_dir)
    assert d.spikes, "the absurd learning rate must show up as a loss spike"
    first = d.spikes[0]
    assert first.severity > 2 and first.precursors
    names = {n for n, _ in Llama(LlamaConfig(dim=64, n_layers=2, n_heads=2)).named_modules()}
    for p in first.precursors:
        assert p.layer.removesuffix("/raw") in names and p.onset_step < first.step
        assert p.growth >= 1.25
    assert d.diverged  # it ends inside the spike, far above the baseline
    code, out, _ = run_cli(capsys, "diagnose", log_dir)
    assert code == 1 and first.precursors[0].layer in out and "diverged" in out


def test_bench_runs_scripts_and_reads_ratios(tmp_path, capsys):
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "bench_fast.py").write_text(textwrap.dedent("""
        import json, sys
        args = sys.argv[1:]
        assert "--quick" in args
        json.dump({"rows": [{"name": "ns", "speedup": 1.75, "ms": 3.0}],
                   "overhead_ratio": 1.02}, open(args[args.index("--json") + 1], "w"))
    """))
    (tools / "bench_broken.py").write_text("raise SystemExit('boom')\n")
    code, out, _ = run_cli(capsys, "bench", "--tools-dir", tools, "--json", tmp_path / "b.json")
    assert code == 1  # one benchmark failed
    assert "1.75" in out and "rows[ns].speedup" in out and "boom" in out
    ratios = json.loads((tmp_path / "b.json").read_text())
    assert ratios["bench_fast"]["ratios"] == {"rows[ns].speedup": 1.75, "overhead_ratio": 1.02}
    code, out, _ = run_cli(capsys, "bench", "--tools-dir", tools, "--only", "fast")
    assert code == 0 and "bench_broken" not in out


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: (p / "e.txt", (p / "e.txt").write_text(""))[0], "is empty"),
        (lambda p: (p / "s.txt", (p / "s.txt").write_text("short"))[0], "fewer than seq_len"),
    ],
    ids=["missing", "empty", "too-short"],
)
def test_train_bad_data_is_a_clean_error(tmp_path, capsys, setup, match):
    code, _, err = run_cli(capsys, "train", *TINY, "--data", setup(tmp_path),
                           "--log-dir", tmp_path / "r")
    assert code == 2 and match in err and "Traceback" not in err


def test_train_bad_option_names_it(capsys):
    code, _, err = run_cli(capsys, "train", "--steps", "0")
    assert code == 2 and "steps must be positive, got 0" in err


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "specopt", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    for command in ("train", "compare", "inspect", "diagnose", "merge", "bench"):
        assert command in proc.stdout
