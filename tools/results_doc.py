"""Render docs/results.md from the JSON of the three evidence studies (docs/data/).

Every number in the document comes from ``lm_study_v2.json`` (tools/lm_study.py),
``lr_sweep.json`` (tools/lr_sweep.py) and ``deep_linear.json`` (tools/deep_linear.py);
the prose is fixed text plus sentences generated from those numbers, so a partial study
renders with its completeness stated and a rerun of this script reproduces the committed
file exactly (tests/test_evidence.py checks it).

Usage::

    python tools/results_doc.py                      # rewrite docs/results.md
    python tools/results_doc.py --check              # exit 1 if it would change
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deep_linear as dl
import lm_study as lm
import lr_sweep as sw

__all__ = ["main", "plot_lm", "render"]

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "docs" / "data"
DOC = ROOT / "docs" / "results.md"
LM_PLOT = "img/lm_v2_val_loss.png"  # relative to docs/
RESUME = {
    "lm": "nice -n 15 python tools/lm_study.py --threads 1 --jobs 2 --resume "
          "--json docs/data/lm_study_v2.json",
    "sweep": "nice -n 15 python tools/lr_sweep.py --threads 1 --jobs 2 --resume "
             "--json docs/data/lr_sweep.json",
    "dl": "python tools/deep_linear.py --json docs/data/deep_linear.json --plot docs/img",
}


def _load(data_dir: Path, name: str) -> dict[str, Any] | None:
    path = data_dir / name
    return json.loads(path.read_text()) if path.exists() else None


def _n_params(preset: str) -> int:
    """Parameters of the preset's Llama without PC (PC adds one gain per wrapped layer)."""
    from specopt.models.llama import PRESETS, Llama

    return sum(p.numel() for p in Llama(PRESETS[preset]).parameters())


def _fmt(x: float, spec: str) -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def _deviations(data: dict[str, Any]) -> list[str]:
    r = data["recipe"]
    ns = {"fp32": "fp32, pinned so the NS precision is the same on every CPU kind (bf16 is "
                  "native on AVX512-BF16 and emulated, with other rounding, on AVX2; fp32 "
                  "kernels may still sum in another order there, so bit equality across "
                  "CPU kinds is not claimed)",
          "bf16": "bf16 (as published)",
          "native": "bf16 where matmul has a bf16 path, else fp32"}[r["ns_dtype"]]
    return [
        f"Newton-Schulz dtype: {ns}; the published runs use bf16.",
        "The `muon` arms use specopt's default Newton-Schulz (4-step `pe4` schedule, tight "
        "normalization), not the published recipe; `muon-kj` is the published recipe "
        "(KJ coefficients, 5 steps, Frobenius normalization) in the dtype above.",
        "Weight decay: " + ("on every parameter (as published)." if r["wd_all"] else
                            "specopt's routing (no decay on gains, norms, 1-D tensors); the "
                            "published runs decay every parameter (flag `--wd-all`)."),
        "PC effective weight: " + ("computed in bf16 (as published)." if r["pc_bf16"] else
                                   "computed in fp32; the published code computes it in bf16 "
                                   "under autocast (flag `--pc-bf16`)."),
        "Peak LRs: the main runs use the CLI's defaults (AdamW 3e-3, Muon 0.02 with its LR "
        "scaled by 0.2 sqrt(max(A, B))), chosen for this model, not the paper's; the tuned "
        "runs use each arm's own best LR of the full-length LR check; warmup then cosine to "
        "0.1x and grad clip 1.0 as published.",
        "Data: the Python standard library's source as bytes (vocabulary 256), not FineWeb.",
    ]


def _claims(data: dict[str, Any], part: str = "main") -> list[str]:
    out = []
    for name, ref in lm.COMPARISONS:
        c = lm.compare(data, name, ref, part)
        if c is None:
            continue
        e = c["efficiency"]
        n = len(c["seeds"])
        if name == ref:
            out.append(f"`{name}` against itself: token efficiency {_fmt(e['eff'], '.3f')}x "
                       f"by construction; its {e['floor_reached']} seeds that reached the "
                       f"target against their mean curve span [{_fmt(e['floor_min'], '.3f')}"
                       f", {_fmt(e['floor_max'], '.3f')}]: the noise floor of every "
                       f"efficiency against `{name}`. Seeds that end above the mean never "
                       "reach its final loss (their efficiency is below 1 and not "
                       "measurable within the budget), so the floor lists the others only.")
            continue
        if n < 2:
            out.append(f"`{name}` vs `{ref}`: {n} paired seed, no interval yet "
                       f"(difference {c['mean']:+.4f} bits/byte).")
            continue
        sig = c["lo"] > 0 or c["hi"] < 0
        verdict = ("the 95% interval excludes 0" if sig else
                   "the 95% interval includes 0: not distinguishable from no effect at "
                   f"n = {n}")
        floor = (f"[{_fmt(e['floor_min'], '.3f')}, {_fmt(e['floor_max'], '.3f')}]"
                 f" over {e['floor_reached']}/{n} reference seeds")
        outside = (math.isfinite(e["eff"]) and math.isfinite(e["floor_min"])
                   and not e["floor_min"] <= e["eff"] <= e["floor_max"])
        out.append(
            f"`{name}` vs `{ref}`: final loss {c['mean']:+.4f} bits/byte (95% CI "
            f"[{c['lo']:+.4f}, {c['hi']:+.4f}], paired t p = {lm.format_p(c['p'])}, {n} seeds); "
            f"{verdict}. " + (
                f"Token efficiency {e['eff']:.3f}x against a noise floor of {floor} "
                f"({'outside' if outside else 'inside or at'} the floor)."
                if math.isfinite(e["eff"]) else
                "Token efficiency: its mean curve never reaches the reference's final loss "
                f"within the budget (below 1x; noise floor {floor})."))
    return out


def lm_section(data: dict[str, Any] | None) -> list[str]:
    if data is None:
        return ["No data yet (docs/data/lm_study_v2.json missing)."]
    c = data["config"]
    have, planned = lm.completeness(data, "main")
    lc_have, lc_planned = lm.completeness(data, "lrcheck")
    t_have, t_planned = lm.completeness(data, "tuned")
    n_params = _n_params(c["preset"])
    tokens = c["steps"] * c["batch_size"] * c["seq_len"]
    cut = ("" if (have, lc_have, t_have) == (planned, lc_planned, t_planned) and t_planned else
           f" (not complete; resume with `{RESUME['lm']}`)")
    val_bytes = c["eval_batches"] * c["batch_size"] * c["seq_len"]
    lines = [
        f"Status: **{have} of {planned} main runs, {lc_have} of {lc_planned} LR-check "
        f"runs and {t_have} of {t_planned} tuned-LR runs present**{cut}.",
        "",
        f"Config: preset `{c['preset']}` ({n_params:,} parameters), {c['steps']} steps x "
        f"{c['batch_size']} x {c['seq_len']} = {tokens:,} training tokens per run "
        f"({tokens / n_params:.0f} tokens per parameter, random windows of the embedded "
        "corpus's 3.6 MB training split, so windows can overlap), "
        f"warmup {c['warmup']}, weight decay {c['weight_decay']}, validation on "
        f"{c['eval_batches']} fixed batches ({val_bytes:,} bytes) every {c['eval_every']} "
        f"steps; seeds {c['seeds']}; arms {c['arms']}; LR check from "
        f"x{c['lr_check_multipliers']} on seeds {c['lr_check_seeds']}, extended by factors "
        f"of 2 until each arm's best is bracketed (within x{c.get('lr_check_limit', 16):g}); "
        f"tuned-LR runs on seeds {c.get('tuned_seeds')}; {c['threads']} thread per run.",
        "",
        "Machines: " + "; ".join(data["machines"]) + f"; torch {data['torch']}. Wall "
        "times are from a 2-core machine shared with other jobs (noisy).",
        "",
        "Recipe deviations from the published runs:",
        "",
        *[f"- {d}" for d in _deviations(data)],
        "",
        lm.tables(data),
        "",
        f"![validation loss vs tokens, seed mean and range]({LM_PLOT})",
        "",
        "Claims at the default LRs (only with effect size, interval and p-value; "
        "differences are arm minus reference, negative = arm better):",
        "",
        *[f"- {s}" for s in _claims(data)],
    ]
    tuned = _claims(data, "tuned")
    if tuned:
        best = lm.tuned_multipliers(data)
        lrs = ", ".join(f"`{n}` x{m:g}" + ("" if ok else " (not bracketed)")
                        for n, (m, ok) in best.items())
        lines += [
            "",
            f"Claims at each arm's own best LR of the LR check ({lrs} of its default), on "
            f"seeds {c.get('tuned_seeds')}, which did not take part in choosing the LR:",
            "",
            *[f"- {s}" for s in tuned],
        ]
    return lines


def sweep_section(data: dict[str, Any] | None,
                  lm_data: dict[str, Any] | None = None) -> list[str]:
    if data is None:
        return ["No data yet (docs/data/lr_sweep.json missing)."]
    have = len(data["runs"])
    planned = len(data["planned"])
    lines = [
        f"Status: **{have} of {planned} runs present**"
        + ("" if have == planned else " (cut short by the session deadline; resume with `"
           + RESUME["sweep"] + "`)") + ".",
        "",
        f"Grid: peak LR = default x {', '.join(f'{m:g}' for m in data['multipliers'])}; "
        f"{data['config']['steps']} steps, validation on {data['config']['eval_batches']} "
        "fixed batches at the end; each cell is the seed-mean final bits/byte (seeds "
        "present). Edge: the first LR whose final loss is worse than the baseline's initial "
        "loss (the arm without PC, step 0) or non-finite in any seed.",
        "",
        sw.sweep_table(data),
    ]
    verdicts = []
    for name in data["config"]["arms"]:
        v = sw.edge_and_optimum(data, name)
        if v["optimum"] is None:
            continue
        verdicts.append(
            f"`{name}`: best swept LR x{v['optimum']:g} of its default ("
            + ("bracketed by worse LRs on both sides" if v["bracketed"] else
               "at the end of the swept range so far: not bracketed") + "); edge "
            + ("not reached in the swept range" if v["edge"] is None else f"x{v['edge']:g}")
            + ".")
    if verdicts:
        lines += ["", *[f"- {s}" for s in verdicts]]
    # Does PC move the divergence edge (the paper's stability claim)?
    moves = []
    for name in data["config"]["arms"]:
        base = lm.arm(name).baseline
        if base == name or base not in data["config"]["arms"]:
            continue
        e, eb = (sw.edge_and_optimum(data, n)["edge"] for n in (name, base))
        if e is None or eb is None:
            continue
        how = ("the same edge" if e == eb else
               f"an edge {max(e, eb) / min(e, eb):g}x {'higher' if e > eb else 'lower'}")
        moves.append(f"`{name}` diverges from x{e:g}, `{base}` from x{eb:g}: PC gives {how} "
                     "in this sweep (factor-2 grid, 3 seeds).")
    if moves:
        lines += ["", "Stability (the divergence edge with and without PC):", "",
                  *[f"- {m}" for m in moves]]
    if lm_data is not None:
        tuned = lm.tuned_multipliers(lm_data)
        rows = [f"`{n}`: x{sw.edge_and_optimum(data, n)['optimum']:g} at "
                f"{data['config']['steps']} steps, x{tuned[n][0]:g} at "
                f"{lm_data['config']['steps']} steps" for n in data["config"]["arms"]
                if n in tuned and sw.edge_and_optimum(data, n)["optimum"] is not None]
        if rows:
            lines += ["", "Best LR of this sweep against the full-length LR check of section 1 "
                      "(the optimum moves with the run length, so the sweep does not stand in "
                      "for the check): " + "; ".join(rows) + "."]
    return lines


def dl_section(data: dict[str, Any] | None) -> list[str]:
    if data is None:
        return ["No data yet (docs/data/deep_linear.json missing)."]
    if "starts" not in data["config"]:
        return ["docs/data/deep_linear.json holds the first edition's study (one start, one "
                f"LR); the second edition has not finished yet: `{RESUME['dl']}`."]
    rows = dl.summary_rows(data)

    def pooled(arm_prefix: str, start: str) -> tuple[int, int, int, int, int, int]:
        rs = [r for r in rows if r["arm"].startswith(arm_prefix) and r["start"] == start]
        return (sum(r["in_box"] for r in rs), sum(r["runs"] for r in rs),
                sum(r["pl_met"] for r in rs), sum(r["pl_checked"] for r in rs),
                sum(r["converged"] for r in rs), sum(r["runs"] for r in rs))

    facts = []
    for prefix, label in (("gd", "plain GD"), ("projected", "projected GD"), ("pc", "PC")):
        for start in data["config"]["starts"]:
            box, n, met, chk, conv, _ = pooled(prefix, start)
            if n:
                facts.append(f"{label}, `{start}` starts: path in the box in {box}/{n} runs, "
                             f"{conv}/{n} converged to 1e-10, {met}/{chk} steps "
                             f"({met / max(chk, 1):.3f}) met the per-step PL bound.")
    return [
        "What the theorem assumes (module docstring of tools/deep_linear.py): (i) whitened "
        "data; (ii) square or widening-then-narrowing layers; (iii) every layer's singular "
        "values in [a, b], a > 0, along the whole path; (iv) plain gradient steps small "
        "against the loss's smoothness on the box. Then ||grad||^2 >= 2 mu loss with "
        "mu = L a^(2(L-1)) at every iterate (tests/test_evidence.py checks this exactly) "
        "and each step contracts the loss by 1 - 2 lr mu to first order.",
        "",
        "Which arms satisfy it: **plain GD** satisfies (i), (ii), (iv) always and (iii) "
        "exactly in the runs whose measured path stayed in the box (column 'path in box'); "
        "from `ill` starts it starts outside the box. **Projected GD** satisfies (iii) by "
        "construction but not (iv): each step is a gradient step followed by an SVD "
        "projection, which can undo part of the descent (the steps that miss the per-step "
        "bound). **PC** trains (W, gamma), not the effective layers: the theorem does not "
        "cover it; its effective-layer path is measured against the same box.",
        "",
        *[f"- {s}" for s in facts],
        "",
        "How to read the PL column: the bound of step t uses that iterate's own smallest "
        "singular value a_t. Outside any box bounded away from 0 (a_t ~ 1e-6 on `ill` "
        "starts) it is vacuous (1 - 2 lr mu ~ 1): met, yet no linear rate follows, which is "
        "what the plain-GD rows from `ill` starts show. The PC arm starts from the same raw "
        "W, so its network W_eff = gamma s f(W / s) is not the near-target network (f "
        "reshapes the spectrum): from `near_target` it starts elsewhere and trains its "
        "gains with the same step size, which is why its rows there are not comparable "
        "with GD's.",
        "",
        dl.doc_section(data),
    ]


def plot_lm(data: dict[str, Any], path: Path) -> Path:
    """PNG of the seed-mean validation curves (bits/byte vs training tokens) of the main
    runs, one line per arm, the seed range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for i, name in enumerate(data["config"]["arms"]):
        rs = [r for r in lm._runs(data, "main", name).values()
              if math.isfinite(r["final_val_bpb"])]
        if not rs:
            continue
        steps, mean = lm._mean_curve(rs)
        n = len(steps)
        xs = [s * rs[0]["tokens_per_step"] for s in steps][1:]  # step 0: ~8 bits, off-scale
        lo = [min(r["val_bpb"][k] for r in rs) for k in range(1, n)]
        hi = [max(r["val_bpb"][k] for r in rs) for k in range(1, n)]
        color = plt.get_cmap("tab10")(i)
        ax.plot(xs, mean[1:], color=color, lw=1.3, label=f"{name} ({len(rs)} seeds)")
        ax.fill_between(xs, lo, hi, color=color, alpha=0.15, lw=0)
    ax.set_xlabel("training tokens", fontsize=8)
    ax.set_ylabel("validation bits/byte", fontsize=8)
    ax.set_ylim(top=3.2)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    dl._atomic_savefig(fig, path)
    plt.close(fig)
    return path


def render(data_dir: Path = DATA) -> str:
    """The whole of docs/results.md from the JSON present in ``data_dir``."""
    lm_data, sweep_data, dl_data = (_load(data_dir, n) for n in (
        "lm_study_v2.json", "lr_sweep.json", "deep_linear.json"))
    lines = [
        "# Results: the PC layer and Muon at toy scale (evidence, second edition)",
        "",
        "Generated by `python tools/results_doc.py` from docs/data/*.json; do not edit by "
        "hand. Each study writes its JSON after every run and resumes where it stopped, so "
        "each section states how many of its planned runs are present.",
        "",
        "Reproduce (one thread per run, niced, as here):",
        "",
        "```",
        RESUME["lm"],
        RESUME["sweep"],
        RESUME["dl"],
        "python tools/results_doc.py",
        "```",
        "",
        "A lent GPU runs the same study with `--device cuda` (it prints that CUDA is "
        "missing and exits 0 elsewhere); its numbers go to their own JSON: a study never "
        "mixes recipes, devices or sizes (`--resume` refuses).",
        "",
        "## 1. Language model: AdamW, Muon, with and without PC (tools/lm_study.py)",
        "",
        *lm_section(lm_data),
        "",
        "## 2. LR sweep (tools/lr_sweep.py)",
        "",
        *sweep_section(sweep_data, lm_data),
        "",
        "## 3. Deep linear networks: the convergence theorem (tools/deep_linear.py)",
        "",
        *dl_section(dl_data),
        "",
        "## 4. Two corrected statements",
        "",
        "- `sigma_max(W_eff)` is not exactly `gamma * s`: `f(1) = 1`, but levels 2-4 peak "
        "inside (0, 1) (1.010, 1.019, 1.021), so it can reach ~1.02 gamma * s "
        "(specopt/pc/parametrization.py).",
        "- The warm-started power-iteration estimate `u^T W v` converges like "
        "(sigma_2/sigma_1)^4 per iteration (the vectors like ^2) "
        "(specopt/spectral/power_iteration.py); tests/test_evidence.py measures both.",
        "",
        "## 5. What this does and does not show at this scale",
        "",
        "- It shows, for a 140k-parameter byte-level Llama trained on ~3M tokens with 4 "
        "seeds, whether each arm's final validation loss differs from its reference by more "
        "than seed noise (paired intervals above), and how many tokens each arm needs to "
        "reach its reference's final loss, next to that reference's own seed spread.",
        "- It does not show the paper's regime: the published runs have 271M-1B parameters, "
        "~160-213 tokens per parameter (here ~22), sequences of 8,192 (here 128) and "
        "batches of ~2.6M tokens (here 2,048). Effects of the PC layer or of Muon can grow, "
        "shrink or flip with scale; nothing here extrapolates.",
        "- The main comparison uses this model's default peak LRs; the LR check (full "
        "length, extended until each arm's best LR is bracketed) and the tuned-LR runs at "
        "each arm's own best say whether a verdict is an artifact of an LR being off its "
        "optimum. The best LR is chosen on one seed to a factor of 2, so the tuned verdicts "
        "still carry that much LR uncertainty.",
        "- The deep-linear study tests the theorem's mechanism on small float64 problems; "
        "it does not test the PC layer's effect on language models.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/results.md is stale")
    p.add_argument("--out", type=Path, default=DOC)
    p.add_argument("--data", type=Path, default=DATA, help="folder of the JSON files")
    args = p.parse_args(argv)
    text = render(args.data)
    if args.check:
        same = args.out.exists() and args.out.read_text() == text
        print(f"{args.out}: {'up to date' if same else 'STALE: rerun tools/results_doc.py'}")
        return 0 if same else 1
    dl._atomic_write_text(args.out, text)
    print(f"wrote {args.out}")
    lm_data = _load(args.data, "lm_study_v2.json")
    if lm_data is not None:
        print(f"wrote {plot_lm(lm_data, args.out.parent / LM_PLOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
