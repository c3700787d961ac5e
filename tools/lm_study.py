"""Language-model study v2: does the PC layer make AdamW / Muon reach a loss with fewer
tokens? (PC-layer paper, arXiv 2606.06470, at toy scale on the embedded corpus.)

Each run trains ``specopt``'s Llama with the pieces ``specopt train`` uses (``build_model``,
``build_optimizer``, ``lr_factor``: linear warmup then cosine to 0.1x, grad clip 1.0, the
same seeded ``BatchSampler`` and fixed ``eval_windows``), in a loop of its own so that the
published-recipe options the CLI does not expose can be switched on. With those options
off, a run reproduces ``specopt train`` bit for bit (tests/test_evidence.py checks it).

Arms (``ARMS``): ``adamw``, ``adamw+pc4`` (published level), ``muon`` (specopt's default
Newton-Schulz: 4-step ``pe4`` schedule, tight normalization), ``muon+pc2`` (published
level), ``muon-kj`` and ``muon-kj+pc2`` (the published NS recipe: Keller Jordan's constant
coefficients (3.4445, -4.7750, 2.0315), 5 steps, Frobenius normalization).

Recipe options (one value per study, recorded in the JSON and checked on ``--resume``):

- ``ns_dtype``: NS compute dtype of every Muon arm. Default ``fp32``, pinned so the NS
  precision is the same on every CPU kind (bf16 NS is native on AVX512-BF16, emulated with
  other rounding on AVX2; fp32 kernels may still differ in summation order);
  ``bf16`` is the published setting; ``native`` = bf16 where matmul has a bf16 path.
- ``wd_all``: weight decay on every parameter (gains, norms, embeddings too), as the
  published runs do; default off (specopt's routing: no decay on 1-D tensors).
- ``pc_bf16``: compute the PC effective weight in bf16, as the published code does under
  autocast; default off (specopt computes it in the weight's dtype).

Parts:

1. ``main``: every arm at the default peak LR (``specopt.cli.train.DEFAULT_LR``), each
   seed; validation on ``eval_batches`` fixed batches every ``eval_every`` steps and at
   step 0.
2. ``lrcheck``: every arm at ``lr_check_multipliers`` x its default LR, full length, on
   ``lr_check_seeds``; then, while an arm's best LR of the check (seed mean) sits at the
   edge of what it tried, one more LR a factor 2 beyond that edge, up to
   ``lr_check_limit`` x (or 1/``lr_check_limit`` x) its default: the check brackets each
   arm's own full-length optimum.
3. ``tuned``: every arm at its own best LR of the check, on ``tuned_seeds`` (by default
   1-4: not the seed that chose the LR, so the selection does not flatter the winner);
   the comparisons are repeated on these runs. A run whose (arm, seed, LR) another part
   already trained is copied, not retrained (runs are deterministic).

Statistics (``compare``): each comparison ``arm - reference`` is paired by seed (same init
and batches): mean difference of final validation bits/byte with a 95% t-interval and the
two-sided paired t-test p-value. Token efficiency of ``arm`` against ``reference``::

    target = mean over seeds of the reference's final loss
    eff    = T(mean reference curve, target) / T(mean arm curve, target)

with ``T(curve, target)`` the tokens at which the curve first reaches ``target`` (linear
interpolation between evaluations); the reference against itself is exactly 1.0 by
construction. Its noise floor is the spread of ``T(mean reference curve) / T(seed curve)``
over the reference's own seeds, printed with every efficiency.

Usage::

    python tools/lm_study.py --quick                                  # a few minutes
    nice -n 15 python tools/lm_study.py --threads 1 --resume \\
        --json docs/data/lm_study.json                                # the full study
    python tools/lm_study.py --device cuda --json lm_cuda.json         # on a lent GPU

The JSON is rewritten after every run; ``--resume`` skips runs already in it, so a study
cut short is usable and continues where it stopped. ``--jobs N`` trains N runs at once in
worker processes (each on ``--threads`` threads; results do not depend on N).
``tools/results_doc.py`` renders docs/results.md from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine
from deep_linear import _atomic_write_text

__all__ = [
    "ARMS",
    "COMPARISONS",
    "KJ_COEFFICIENTS",
    "Arm",
    "StudyConfig",
    "compare",
    "main",
    "paired_t",
    "run_study",
    "token_efficiency",
    "tokens_to_reach",
    "train_run",
]

#: Keller Jordan's constant NS coefficients, 5 steps (the published Muon runs).
KJ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
KJ_STEPS = 5
PC_TARGET_KEYS = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "attention.wo")
NON_PC_KEYS = ("attention.wq", "attention.wk", "attention.wv")
NS_DTYPES = ("fp32", "bf16", "native")


@dataclass(frozen=True)
class Arm:
    """One configuration: optimizer, NS recipe (Muon only) and PC level (None = no PC)."""

    optimizer: str  # "adamw" or "muon"
    pc_level: int | None
    ns: str = "specopt"  # "specopt" (pe4, 4 steps, tight) or "kj" (published, 5 steps)

    @property
    def name(self) -> str:
        return (self.optimizer + ("-kj" if self.ns == "kj" else "")
                + ("" if self.pc_level is None else f"+pc{self.pc_level}"))

    @property
    def baseline(self) -> str:
        """The same arm without PC."""
        return dataclasses.replace(self, pc_level=None).name


ARMS: tuple[Arm, ...] = (
    Arm("adamw", None), Arm("adamw", 4), Arm("muon", None), Arm("muon", 2),
    Arm("muon", None, "kj"), Arm("muon", 2, "kj"),
)

#: (arm, reference) pairs reported, when both are in the data. A baseline against itself
#: shows the noise floor: efficiency 1.0 by construction, its seeds' spread around it.
COMPARISONS: tuple[tuple[str, str], ...] = (
    ("adamw", "adamw"), ("muon", "muon"), ("muon-kj", "muon-kj"),
    ("adamw+pc4", "adamw"), ("muon+pc2", "muon"), ("muon-kj+pc2", "muon-kj"),
    ("muon", "adamw"), ("muon-kj", "muon"), ("muon-kj", "adamw"),
)


def arm(name: str) -> Arm:
    """The arm called ``name``; ``ValueError`` listing the choices otherwise."""
    for a in ARMS:
        if a.name == name:
            return a
    raise ValueError(f"unknown arm {name!r}; choose from {[a.name for a in ARMS]}")


@dataclass
class StudyConfig:
    """Sizes and recipe of one study (defaults: the full v2 study)."""

    preset: str = "tiny"
    steps: int = 1500  # x 16 x 128 = 3.1M tokens per run, ~22 tokens per parameter
    batch_size: int = 16
    seq_len: int = 128
    warmup: int = 100
    weight_decay: float = 0.1
    eval_every: int = 100
    eval_batches: int = 32  # x 16 x 128 = 65,536 validation bytes per evaluation
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    arms: list[str] = field(
        default_factory=lambda: ["adamw", "adamw+pc4", "muon", "muon+pc2", "muon-kj"])
    lr_check_multipliers: list[float] = field(default_factory=lambda: [0.5, 2.0])
    lr_check_seeds: list[int] = field(default_factory=lambda: [0])
    lr_check_limit: float = 16.0  # the check extends to at most x16 / x1/16 of the default
    tuned_seeds: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    ns_dtype: str = "fp32"  # see the module docstring
    wd_all: bool = False
    pc_bf16: bool = False
    device: str = "cpu"
    threads: int = 1  # torch intra-op threads; 0: torch's default

    def __post_init__(self) -> None:
        for name in self.arms:
            arm(name)
        if self.ns_dtype not in NS_DTYPES:
            raise ValueError(f"ns_dtype must be one of {NS_DTYPES}, got {self.ns_dtype!r}")
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def recipe(self) -> dict[str, Any]:
        """Everything a run's numbers depend on besides (arm, seed, lr): runs of two studies
        with different recipes never mix in one JSON."""
        keys = ("preset", "steps", "batch_size", "seq_len", "warmup", "weight_decay",
                "eval_every", "eval_batches", "ns_dtype", "wd_all", "pc_bf16", "device")
        return {k: getattr(self, k) for k in keys}


QUICK = dict(steps=30, batch_size=4, seq_len=32, warmup=5, eval_every=10, eval_batches=2,
             seeds=[0, 1], arms=["adamw", "adamw+pc4"], lr_check_multipliers=[2.0],
             lr_check_limit=2.0, tuned_seeds=[1])


def default_lr(optimizer: str) -> float:
    """The CLI's default peak LR for ``optimizer``."""
    from specopt.cli.train import DEFAULT_LR

    return DEFAULT_LR[optimizer]


@functools.lru_cache(maxsize=2)
def _corpus() -> Any:
    from specopt.cli.train import TrainConfig
    from specopt.data import load_corpus

    c = TrainConfig()
    return load_corpus(c.data, max_bytes=c.max_data_bytes)


def _ns_dtype(setting: str, device: torch.device) -> torch.dtype:
    from specopt.optim.muon import default_ns_dtype

    if setting == "native":
        return default_ns_dtype(device)
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[setting]


def _pc_in_bf16(model: nn.Module) -> int:
    """Make every PC parametrization of ``model`` compute W_eff in bf16 (the published
    code's autocast), returned in the weight's dtype; returns how many were changed."""
    n = 0
    for mod in model.modules():
        if getattr(mod, "is_pc_parametrization", False):
            fp = mod.forward

            def forward(weight: torch.Tensor, _fp: Any = fp) -> torch.Tensor:
                return _fp(weight.to(torch.bfloat16)).to(weight.dtype)

            mod.forward = forward
            n += 1
    return n


def build_run(sc: StudyConfig, a: Arm, seed: int, lr: float) -> tuple[nn.Module, Any, Any]:
    """(model, optimizer, scheduler) of one run, seeded exactly as ``specopt train``."""
    from specopt.cli.train import build_model, lr_factor
    from specopt.models.llama import PRESETS
    from specopt.optim import build_optimizer

    device = torch.device(sc.device)
    torch.manual_seed(seed)
    base = PRESETS[sc.preset]
    mcfg = dataclasses.replace(base, max_seq_len=max(base.max_seq_len, sc.seq_len))
    model, handle = build_model(mcfg, pc=a.pc_level is not None, pc_level=a.pc_level or 1)
    model.to(device)
    if sc.pc_bf16:
        _pc_in_bf16(model)
    kw: dict[str, Any] = {}
    if a.optimizer == "muon":
        kw["ns_dtype"] = _ns_dtype(sc.ns_dtype, device)
        if a.ns == "kj":
            kw.update(ns_coefficients=KJ_COEFFICIENTS, ns_steps=KJ_STEPS)
    opt = build_optimizer(model, a.optimizer, lr=lr, weight_decay=sc.weight_decay, **kw)
    if sc.wd_all:  # the published runs decay gains, norms and embeddings too
        for g in opt.param_groups:
            g["weight_decay"] = sc.weight_decay
    if handle is not None:
        handle.attach(opt)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, warmup=min(sc.warmup, sc.steps), total=sc.steps,
                                 final_ratio=0.1))
    return model, opt, sched


def _layer_gmcn(model: nn.Module) -> dict[str, float]:
    """Geometric-mean GMCN of the PC-target blocks (effective and raw W) and of q/k/v."""
    from specopt.spectral.metrics import matrix_metrics

    groups: dict[str, list[torch.Tensor]] = {"pc_blocks": [], "pc_blocks_raw": [], "qkv": []}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if not isinstance(mod, nn.Linear):
                continue
            if any(name.endswith(k) for k in PC_TARGET_KEYS):
                groups["pc_blocks"].append(mod.weight.detach())
                raw = getattr(getattr(mod, "parametrizations", None), "weight", None)
                groups["pc_blocks_raw"].append(
                    raw.original.detach() if raw is not None else mod.weight.detach())
            elif any(name.endswith(k) for k in NON_PC_KEYS):
                groups["qkv"].append(mod.weight.detach())
    out = {}
    for key, ws in groups.items():
        vals = [m["gmcn"] for m in matrix_metrics([w.float() for w in ws])] if ws else []
        out[key] = geomean(vals)
    return out


def train_run(sc: StudyConfig, a: Arm, seed: int, lr: float) -> dict[str, Any]:
    """Train one run; returns its curves (validation bits/byte at step 0, every
    ``eval_every`` steps and at the end), GMCN at each evaluation and final numbers."""
    from specopt.cli.train import evaluate
    from specopt.data import BatchSampler, bits_per_byte, eval_windows

    device = torch.device(sc.device)
    corpus = _corpus()
    sampler = BatchSampler(corpus.train, batch_size=sc.batch_size, seq_len=sc.seq_len,
                           seed=seed)
    val = [w.to(device) for w in eval_windows(corpus.val, batch_size=sc.batch_size,
                                              seq_len=sc.seq_len, max_batches=sc.eval_batches)]
    model, opt, sched = build_run(sc, a, seed, lr)
    curves: dict[str, list[float]] = {"val_steps": [], "val_bpb": [], "gmcn_pc_blocks": [],
                                      "gmcn_pc_blocks_raw": [], "gmcn_qkv": [],
                                      "train_steps": [], "train_loss": []}

    def record_eval(step: int) -> None:
        curves["val_steps"].append(step)
        curves["val_bpb"].append(bits_per_byte(evaluate(model, val)))
        g = _layer_gmcn(model)
        curves["gmcn_pc_blocks"].append(g["pc_blocks"])
        curves["gmcn_pc_blocks_raw"].append(g["pc_blocks_raw"])
        curves["gmcn_qkv"].append(g["qkv"])

    t0 = time.perf_counter()
    record_eval(0)
    model.train()
    step, nonfinite = 0, False
    every_train = max(1, sc.steps // 100)
    while step < sc.steps:
        x, y = next(sampler)
        loss = model.loss(x.to(device), y.to(device))
        loss_val = float(loss.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        if not (math.isfinite(loss_val) and math.isfinite(grad_norm)):
            nonfinite = True  # as `specopt train`: stop without stepping on it
            break
        opt.step()
        sched.step()
        step += 1
        if step % every_train == 0:
            curves["train_steps"].append(step)
            curves["train_loss"].append(float(f"{loss_val:.4g}"))
        if step % sc.eval_every == 0 or step == sc.steps:
            record_eval(step)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    done = curves["val_steps"][-1] == sc.steps
    final = curves["val_bpb"][-1] if done and not nonfinite else math.nan
    return {"arm": a.name, "optimizer": a.optimizer, "pc_level": a.pc_level, "ns": a.ns,
            "seed": seed, "lr": lr, "steps": sc.steps, "steps_done": step,
            "tokens_per_step": sc.tokens_per_step, "nonfinite": nonfinite or not
            math.isfinite(final), "initial_val_bpb": curves["val_bpb"][0],
            "final_val_bpb": final, "wall_s": wall, "threads": torch.get_num_threads(),
            **curves}


# ---------------------------------------------------------------- running, resuming


def _save(data: dict[str, Any], path: Path | None) -> None:
    if path is not None:
        _atomic_write_text(path, json.dumps(data, separators=(",", ":"), allow_nan=True))


def start_data(sc: StudyConfig, resume: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    """The JSON dict a study writes into: ``resume`` when its recipe matches, else new."""
    if resume is not None:
        old = resume.get("recipe", {})
        diff = {k: (old.get(k), v) for k, v in sc.recipe().items() if old.get(k) != v}
        if diff:
            raise ValueError(f"--resume: the JSON was written with another recipe "
                             f"(field: (in JSON, now)): {diff}; use another --json")
        data = resume
    else:
        data = {"kind": kind, "runs": []}
    data.update(config=asdict(sc), recipe=sc.recipe(), torch=torch.__version__,
                default_lr={o: default_lr(o) for o in ("adamw", "muon")})
    data.setdefault("machines", [])
    return data


def _machine_line(sc: StudyConfig) -> str:
    """This process's machine line (measured once); :func:`run_all` adds it to
    ``data['machines']`` when it trains a run, so the list names only machines that ran."""
    global _MACHINE
    if _MACHINE is None:
        _MACHINE = machine.describe(sc.device)
    return _MACHINE


_MACHINE: str | None = None


def _train_row(sc: StudyConfig, part: str, name: str, seed: int, lr: float) -> dict[str, Any]:
    """One run as a JSON row (also the worker function of ``--jobs``)."""
    if sc.threads:
        torch.set_num_threads(sc.threads)
    return {"part": part, **train_run(sc, arm(name), seed, lr)}


def run_all(data: dict[str, Any], plan: list[tuple[str, str, int, float]], sc: StudyConfig,
            json_path: Path | None, *, log: Any = print, jobs: int = 1) -> dict[str, Any]:
    """Run every ``(part, arm, seed, lr)`` of ``plan`` not yet in ``data['runs']``,
    saving after each run; ``jobs`` > 1 trains that many at once in worker processes.
    A run another part already trained with the same (arm, seed, lr) is copied."""
    done = {(r["part"], r["arm"], r["seed"], r["lr"]) for r in data["runs"]}
    todo = [p for p in plan if p not in done]
    log(f"{len(plan) - len(todo)} of {len(plan)} planned runs already in the JSON; "
        f"{len(todo)} to run")
    trained = {(r["arm"], r["seed"], r["lr"]): r for r in data["runs"] if "copied_from" not in r}
    t0 = time.perf_counter()
    count = 0

    def record(row: dict[str, Any]) -> None:
        nonlocal count
        count += 1
        data["runs"].append(row)
        _save(data, json_path)
        how = (f"copied from {row['copied_from']}" if "copied_from" in row
               else f"{row['wall_s']:.0f} s")
        log(f"[{time.perf_counter() - t0:7.0f}s] {count}/{len(todo)} {row['part']:7s} "
            f"{row['arm']:12s} seed {row['seed']} lr {row['lr']:<9g} final "
            f"{row['final_val_bpb']:.4f} bits/byte "
            f"{'NON-FINITE ' if row['nonfinite'] else ''}({how})")

    to_train = []
    for part, name, seed, lr in todo:
        same = trained.get((name, seed, lr))
        if same is not None:
            record({**same, "part": part, "copied_from": same["part"]})
        else:
            to_train.append((part, name, seed, lr))
    if to_train and (desc := _machine_line(sc)) not in data["machines"]:
        data["machines"].append(desc)
    if jobs <= 1 or len(to_train) <= 1:
        for p in to_train:
            record(_train_row(sc, *p))
        return data
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # no forked torch / OpenMP state
    with concurrent.futures.ProcessPoolExecutor(min(jobs, len(to_train)), mp_context=ctx) as ex:
        futures = [ex.submit(_train_row, sc, *p) for p in to_train]
        for f in concurrent.futures.as_completed(futures):
            record(f.result())
    return data


def plan_study(sc: StudyConfig, parts: set[str]) -> list[tuple[str, str, int, float]]:
    """The runs known before any result: seed-major main runs (a study cut short holds
    whole seeds of every arm), then the LR check's first multipliers. The check's
    extensions and the ``tuned`` runs depend on results (:func:`lr_check_extension`,
    :func:`tuned_plan`)."""
    plan = []
    if "main" in parts:
        plan += [("main", n, s, default_lr(arm(n).optimizer)) for s in sc.seeds for n in sc.arms]
    if "lrcheck" in parts:
        plan += [("lrcheck", n, s, default_lr(arm(n).optimizer) * m)
                 for s in sc.lr_check_seeds for m in sc.lr_check_multipliers for n in sc.arms]
    return plan


def _base_lr(data: dict[str, Any], name: str) -> float:
    """The default peak LR the JSON's runs were planned from (the CLI's if not recorded)."""
    opt = arm(name).optimizer
    return data.get("default_lr", {}).get(opt) or default_lr(opt)


def lr_check_results(data: dict[str, Any], name: str,
                     planned: set[tuple[str, str, int, float]] | None = None
                     ) -> dict[float, float]:
    """``{multiplier: seed-mean final loss}`` of one arm over the LR check's seeds (x1: the
    main runs of those seeds); only multipliers where every check seed is present, and
    only LR-check runs in ``planned`` when given."""
    base = _base_lr(data, name)
    seeds = data["config"]["lr_check_seeds"]
    rows: dict[float, dict[int, float]] = {}
    for r in data["runs"]:
        if r["arm"] != name or r["seed"] not in seeds or r["part"] not in ("main", "lrcheck"):
            continue
        if r["part"] == "lrcheck" and planned is not None and (
                r["part"], r["arm"], r["seed"], r["lr"]) not in planned:
            continue
        rows.setdefault(round(r["lr"] / base, 9), {})[r["seed"]] = r["final_val_bpb"]
    return {m: (statistics.fmean(v.values()) if all(map(math.isfinite, v.values()))
                else math.nan)
            for m, v in sorted(rows.items()) if set(v) == set(seeds)}


def best_lr_multiplier(results: dict[float, float]) -> tuple[float | None, bool]:
    """``(multiplier with the lowest finite loss, bracketed)``: bracketed when a smaller
    and a larger tried multiplier both exist (the optimum is not at an edge)."""
    finite = {m: v for m, v in results.items() if math.isfinite(v)}
    if not finite:
        return None, False
    best = min(finite, key=finite.get)
    return best, min(results) < best < max(results)


def lr_check_extension(data: dict[str, Any], sc: StudyConfig,
                       planned: list[tuple[str, str, int, float]] | None = None
                       ) -> list[tuple[str, str, int, float]]:
    """The next LR-check runs: for each arm whose best multiplier is the smallest (largest)
    it tried (among ``planned`` runs when given), half (twice) that multiplier, within
    ``lr_check_limit``. Replaying it from the first multipliers re-plans a resumed
    study's extensions in the order they were made."""
    plan = []
    keys = None if planned is None else set(planned)
    for n in sc.arms:
        res = lr_check_results(data, n, keys)
        best, bracketed = best_lr_multiplier(res)
        if best is None or bracketed:
            continue
        nxt = best / 2 if best == min(res) else best * 2
        if 1 / sc.lr_check_limit - 1e-12 <= nxt <= sc.lr_check_limit + 1e-12:
            plan += [("lrcheck", n, s, default_lr(arm(n).optimizer) * nxt)
                     for s in sc.lr_check_seeds]
    return plan


def tuned_multipliers(data: dict[str, Any]) -> dict[str, tuple[float, bool]]:
    """``{arm: (its best multiplier of the LR check, bracketed)}`` for the arms checked."""
    out = {}
    for n in data["config"]["arms"]:
        best, bracketed = best_lr_multiplier(lr_check_results(data, n))
        if best is not None:
            out[n] = (best, bracketed)
    return out


def tuned_plan(data: dict[str, Any], sc: StudyConfig) -> list[tuple[str, str, int, float]]:
    """Every arm at its own best LR of the check, on ``tuned_seeds`` (seed-major)."""
    best = tuned_multipliers(data)
    return [("tuned", n, s, default_lr(arm(n).optimizer) * best[n][0])
            for s in sc.tuned_seeds for n in sc.arms if n in best]


def run_study(sc: StudyConfig, parts: set[str], *, json_path: Path | None = None,
              resume: dict[str, Any] | None = None, log: Any = print,
              jobs: int = 1) -> dict[str, Any]:
    """Run (or continue) the study; the JSON holds the plan, so its completeness is known
    (the LR check's extensions and the tuned runs join it as results decide them)."""
    data = start_data(sc, resume, "lm_study")
    log(_machine_line(sc))
    plan = plan_study(sc, parts)

    def run(more: list[tuple[str, str, int, float]]) -> None:
        plan.extend(p for p in more if p not in plan)
        data["planned"] = [list(p) for p in plan]
        _save(data, json_path)
        run_all(data, plan, sc, json_path, log=log, jobs=jobs)

    run([])
    if "lrcheck" in parts:
        while extension := [p for p in lr_check_extension(data, sc, plan) if p not in plan]:
            run(extension)
    if "tuned" in parts:
        run(tuned_plan(data, sc))
    return data


# ---------------------------------------------------------------- statistics


def tokens_to_reach(steps: list[int], values: list[float], target: float,
                    tokens_per_step: int) -> float | None:
    """Tokens at which the (step, value) curve first reaches ``target`` (linear
    interpolation between evaluations); None if it never does."""
    prev_s, prev_v = 0, math.inf
    for s, v in zip(steps, values, strict=True):
        if math.isfinite(v) and v <= target:
            if not math.isfinite(prev_v):
                return float(s * tokens_per_step)
            frac = (prev_v - target) / (prev_v - v) if prev_v != v else 1.0
            return float((prev_s + frac * (s - prev_s)) * tokens_per_step)
        prev_s, prev_v = s, v
    return None


def geomean(xs: list[float]) -> float:
    """Geometric mean of the finite positive entries (nan if none)."""
    xs = [x for x in xs if math.isfinite(x) and x > 0]
    return math.exp(statistics.fmean(math.log(x) for x in xs)) if xs else math.nan


def paired_t(diffs: list[float]) -> dict[str, float]:
    """Mean of per-seed differences, its 95% t-interval and the two-sided p-value of the
    paired t-test (H0: mean difference 0). n < 2: interval and p are nan."""
    from scipy import stats

    d = [x for x in diffs if math.isfinite(x)]
    n = len(d)
    out = {"n": n, "mean": statistics.fmean(d) if d else math.nan,
           "lo": math.nan, "hi": math.nan, "p": math.nan, "sd": math.nan}
    if n >= 2:
        sd = statistics.stdev(d)
        half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
        out.update(sd=sd, lo=out["mean"] - half, hi=out["mean"] + half)
        if sd > 0:
            tval = out["mean"] / (sd / math.sqrt(n))
            out["p"] = float(2 * stats.t.sf(abs(tval), n - 1))
        else:
            out["p"] = 0.0 if out["mean"] != 0 else 1.0
    return out


def _mean_curve(runs: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    n = min(len(r["val_bpb"]) for r in runs)
    steps = runs[0]["val_steps"][:n]
    return steps, [statistics.fmean(r["val_bpb"][i] for r in runs) for i in range(n)]


def token_efficiency(arm_runs: list[dict[str, Any]],
                     ref_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Token efficiency of an arm against a reference (module docstring): ``eff`` on the
    seed-mean curves (exactly 1.0 when ``arm_runs is ref_runs``), and the noise floor:
    ``T(mean ref curve) / T(ref seed curve)`` for each reference seed."""
    tps = ref_runs[0]["tokens_per_step"]
    target = statistics.fmean(r["final_val_bpb"] for r in ref_runs)
    t_ref = tokens_to_reach(*_mean_curve(ref_runs), target, tps)
    t_arm = tokens_to_reach(*_mean_curve(arm_runs), target, tps)
    floor = []
    for r in ref_runs:
        t = tokens_to_reach(r["val_steps"], r["val_bpb"], target, tps)
        floor.append(t_ref / t if t and t_ref else math.nan)
    fin = [x for x in floor if math.isfinite(x)]
    return {"target": target, "tokens_ref": t_ref, "tokens_arm": t_arm,
            "eff": t_ref / t_arm if t_ref and t_arm else math.nan,
            "floor": floor, "floor_reached": len(fin),
            "floor_min": min(fin) if fin else math.nan, "floor_max": max(fin) if fin else math.nan}


def _runs(data: dict[str, Any], part: str, name: str, lr: float | None = None
          ) -> dict[int, dict[str, Any]]:
    return {r["seed"]: r for r in data["runs"] if r["part"] == part and r["arm"] == name
            and (lr is None or math.isclose(r["lr"], lr, rel_tol=1e-9))}


def compare(data: dict[str, Any], name: str, ref: str, part: str = "main"
            ) -> dict[str, Any] | None:
    """Paired comparison of two arms of ``part`` ("main": default LRs; "tuned": each arm
    at its own best LR) over the seeds both finished (finite)."""
    a, b = _runs(data, part, name), _runs(data, part, ref)
    seeds = sorted(s for s in set(a) & set(b) if math.isfinite(a[s]["final_val_bpb"])
                   and math.isfinite(b[s]["final_val_bpb"]))
    if not seeds:
        return None
    t = paired_t([a[s]["final_val_bpb"] - b[s]["final_val_bpb"] for s in seeds])
    eff = token_efficiency([a[s] for s in seeds], [b[s] for s in seeds])
    return {"arm": name, "ref": ref, "seeds": seeds, **t, "efficiency": eff}


def arm_summary(data: dict[str, Any], name: str, part: str = "main") -> dict[str, Any]:
    """Final loss, GMCN and wall time of one arm of ``part`` over its seeds."""
    rs = list(_runs(data, part, name).values())
    fin = [r["final_val_bpb"] for r in rs if math.isfinite(r["final_val_bpb"])]
    return {
        "n": len(rs), "finite": len(fin),
        "mean": statistics.fmean(fin) if fin else math.nan,
        "sd": statistics.stdev(fin) if len(fin) > 1 else math.nan,
        "gmcn_pc_blocks": geomean([r["gmcn_pc_blocks"][-1] for r in rs]),
        "gmcn_pc_blocks_raw": geomean([r["gmcn_pc_blocks_raw"][-1] for r in rs]),
        "gmcn_qkv": geomean([r["gmcn_qkv"][-1] for r in rs]),
        "wall_s": statistics.fmean(r["wall_s"] for r in rs) if rs else math.nan,
        "lr": rs[0]["lr"] if rs else math.nan,
    }


def _f(x: float | None, spec: str) -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def format_p(p: float) -> str:
    """A p-value for a table: 3 decimals, ``<0.001`` below that, ``-`` if undefined."""
    return "-" if not math.isfinite(p) else (f"{p:.3f}" if p >= 0.001 else "<0.001")


def completeness(data: dict[str, Any], part: str) -> tuple[int, int]:
    """(runs present, runs planned) of ``part`` ("main", "lrcheck" or "tuned")."""
    planned = [p for p in data.get("planned", []) if p[0] == part]
    keys = {(r["part"], r["arm"], r["seed"], r["lr"]) for r in data["runs"]}
    return sum(tuple(p) in keys for p in planned), len(planned)


def _arm_and_comparison_tables(data: dict[str, Any], part: str) -> list[str]:
    arms = [n for n in data["config"]["arms"] if _runs(data, part, n)]
    lines = ["| arm | peak LR (x default) | seeds | final val bits/byte: mean ± sd | GMCN "
             "PC-target blocks (raw W) | GMCN q/k/v | wall s/run |", "|---" * 7 + "|"]
    for n in arms:
        s = arm_summary(data, n, part)
        mult = s["lr"] / _base_lr(data, n)
        lines.append(f"| {n} | {s['lr']:g} (x{mult:g}) | {s['finite']}/{s['n']} | "
                     f"{_f(s['mean'], '.4f')} ± {_f(s['sd'], '.4f')} | "
                     f"{_f(s['gmcn_pc_blocks'], '.2f')} ({_f(s['gmcn_pc_blocks_raw'], '.2f')}) "
                     f"| {_f(s['gmcn_qkv'], '.2f')} | {_f(s['wall_s'], '.0f')} |")
    lines += ["", "| comparison | paired seeds | difference of final bits/byte, mean [95% CI] "
              "| p (paired t) | token efficiency | noise floor: reference seeds vs their mean "
              "[min, max] (reached) |", "|---|---|---|---|---|---|"]
    for name, ref in COMPARISONS:
        r = compare(data, name, ref, part)
        if r is None:
            continue
        e = r["efficiency"]
        lines.append(
            f"| {name} - {ref} | {len(r['seeds'])} | {_f(r['mean'], '+.4f')} "
            f"[{_f(r['lo'], '+.4f')}, {_f(r['hi'], '+.4f')}] | {format_p(r['p'])} | "
            f"{_f(e['eff'], '.3f')}x | [{_f(e['floor_min'], '.3f')}, "
            f"{_f(e['floor_max'], '.3f')}] ({e['floor_reached']}/{len(r['seeds'])}) |")
    return lines


def tables(data: dict[str, Any]) -> str:
    """Markdown: per-arm results and paired comparisons at the default LRs, the LR check,
    and the same at each arm's own best LR (each with its run count)."""
    c = data["config"]
    have, planned = completeness(data, "main")
    lines = [f"Main runs (default LRs) present: {have} of {planned} planned.", "",
             *_arm_and_comparison_tables(data, "main")]
    if any(r["part"] == "lrcheck" for r in data["runs"]):
        have, planned = completeness(data, "lrcheck")
        arms = [n for n in c["arms"] if _runs(data, "main", n) or _runs(data, "lrcheck", n)]
        results = {n: lr_check_results(data, n) for n in arms}
        mults = sorted({m for r in results.values() for m in r})
        lines += ["", f"LR check runs present: {have} of {planned} planned (seeds "
                  f"{c['lr_check_seeds']}, full length; x1 = the main runs of the same seeds; "
                  f"extended by factors of 2 until each arm's best is bracketed, within "
                  f"x{c.get('lr_check_limit', 16.0):g} of its default).", "",
                  "| arm | " + " | ".join(f"LR x{m:g}" for m in mults) + " | best |",
                  "|---|" + "---|" * (len(mults) + 1)]
        for n in arms:
            cells = ["-" if m not in results[n] else "non-finite"
                     if not math.isfinite(results[n][m]) else f"{results[n][m]:.4f}"
                     for m in mults]
            best, bracketed = best_lr_multiplier(results[n])
            tag = "-" if best is None else f"x{best:g}" + ("" if bracketed else " (edge)")
            lines.append(f"| {n} | " + " | ".join(cells) + f" | {tag} |")
    if any(r["part"] == "tuned" for r in data["runs"]):
        have, planned = completeness(data, "tuned")
        lines += ["", f"Tuned runs (each arm at its own best LR of the check) present: {have} "
                  f"of {planned} planned (seeds {c.get('tuned_seeds')}: not the seeds that "
                  "chose the LR).", "", *_arm_and_comparison_tables(data, "tuned")]
    return "\n".join(lines)


def add_study_flags(p: argparse.ArgumentParser) -> None:
    """The study flags :func:`study_config` reads (shared with ``tools/lr_sweep.py``)."""
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--steps", type=int)
    p.add_argument("--arms", nargs="+", help=f"subset of {[a.name for a in ARMS]}")
    p.add_argument("--ns-dtype", choices=NS_DTYPES, help="Muon NS dtype (default fp32)")
    p.add_argument("--wd-all", action="store_true", help="weight decay on every parameter")
    p.add_argument("--pc-bf16", action="store_true", help="PC effective weight in bf16")
    p.add_argument("--device", default="cpu", help="cpu or cuda (skips cleanly without CUDA)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default 1; 0: torch's)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, in worker processes (default 1)")


def study_config(args: argparse.Namespace, base: dict[str, Any],
                 **fields: Any) -> StudyConfig:
    """A :class:`StudyConfig` from ``base`` (a preset), ``fields`` and the command line's
    study flags (``--seeds --steps --arms --ns-dtype --threads --wd-all --pc-bf16
    --device``), validated. Shared by this script and ``tools/lr_sweep.py``."""
    sc = StudyConfig(**{**base, **fields})
    for name in ("seeds", "steps", "arms", "ns_dtype", "threads"):
        if getattr(args, name) is not None:
            setattr(sc, name, getattr(args, name))
    sc.wd_all, sc.pc_bf16, sc.device = args.wd_all, args.pc_bf16, args.device
    sc.__post_init__()
    return sc


def early_exit(args: argparse.Namespace, p: argparse.ArgumentParser,
               render: Callable[[dict[str, Any]], str]) -> int | None:
    """The command-line cases that train nothing (shared with ``tools/lr_sweep.py``):
    ``--tables`` prints ``render(--json)``, ``--device cuda`` without CUDA says so; the
    exit code, or None to go on. Also rejects ``--jobs`` < 1."""
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.tables:
        if args.json is None:
            p.error("--tables needs --json PATH")
        print(render(json.loads(args.json.read_text())))
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {args.device}: CUDA is not available on this machine; nothing run")
        return 0
    return None


def run_from_cli(args: argparse.Namespace, sc: StudyConfig,
                 run: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """``run(json_path=, resume=, log=)`` with ``--resume`` read from ``--json`` and
    ``sc.threads`` torch threads (restored afterwards)."""
    resume = None
    if args.resume and args.json is not None and args.json.exists():
        resume = json.loads(args.json.read_text())
    threads = torch.get_num_threads()
    if sc.threads:
        torch.set_num_threads(sc.threads)
    try:
        return run(json_path=args.json, resume=resume, log=functools.partial(print, flush=True),
                   jobs=args.jobs)
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny study (a few minutes)")
    p.add_argument("--json", type=Path, help="write results here (rewritten after every run)")
    p.add_argument("--resume", action="store_true", help="keep the runs already in --json")
    p.add_argument("--tables", action="store_true", help="no training: print --json's tables")
    p.add_argument("--parts", default="main,lrcheck,tuned",
                   help="comma list of main,lrcheck,tuned")
    add_study_flags(p)
    args = p.parse_args(argv)
    if (code := early_exit(args, p, tables)) is not None:
        return code
    sc = study_config(args, QUICK if args.quick else {})
    parts = set(args.parts.split(","))
    if parts - {"main", "lrcheck", "tuned"}:
        p.error(f"--parts must be a subset of main,lrcheck,tuned; got {sorted(parts)}")
    data = run_from_cli(args, sc, functools.partial(run_study, sc, parts))
    print()
    print(tables(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
