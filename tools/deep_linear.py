"""Deep linear networks v2: does holding every layer's singular values in [a, b] give linear
convergence of gradient descent? (PC-layer paper, arXiv 2606.06470, theory claim.)

Setting (see /work/shared/reference/pc-layer.md, "The theory claim"):

    f(X) = W_L ... W_1 X,   loss(W) = 1/2 ||W_L ... W_1 X - Y||_F^2,   Y = A X,

with X of shape (dim, samples) whitened (X X^T = I, so sigma_min(X) = 1), a target A whose
singular values are log-spaced in ``target_range``, and layers of shape
(width, dim), (width, width), ..., (dim, width) (square when width == dim).

What the theorem assumes (the PL argument): (i) whitened data; (ii) layers square or
widening then narrowing, so every partial product has rank ``dim``; (iii) along the whole
path every layer's singular values lie in [a, b] with a > 0: then
``||grad||^2 >= 2 mu loss`` with ``mu = L a^(2(L-1))`` at every iterate (tested exactly);
(iv) plain gradient steps small against the loss's smoothness on the box, so that one
step contracts the loss by ``1 - 2 lr mu`` to first order in lr. It then gives
``loss_t <= (1 - 2 lr mu)^t loss_0`` (a straight line on a log plot).

Arms, full-batch, float64, one learning rate per run:

- ``gd``: plain GD on the raw weights. From a ``near_target`` start (a balanced
  factorization of the target, each layer perturbed by ``near_delta`` relative noise, see
  :func:`_near_target_start`) its own path can stay in the box: whether it did is
  measured, not imposed. From an ``ill`` start
  (singular values in [1/init_cond, 1]) it starts outside the box.
- ``projected a=..``: GD, then each layer's singular values are projected onto [a, 1/a]
  with an SVD after every step (projected GD). (iii) holds by construction, but a step is
  no longer a plain gradient step (iv fails): the projection can undo part of the descent.
- ``pcK``: GD on the raw weights and a per-layer gain gamma (init 1) of the PC
  parametrization at level K: the network uses W_eff = gamma * s * f_K(W / s) with
  s = u^T W v from the shared power iteration (``specopt.pc.pc_weight``; u, v refreshed
  after every step with 10 warm-started iterations, as in the published code). The steps
  are gradient steps on (W, gamma), not on W_eff, so the theorem does not cover it
  directly; its W_eff path is measured against the box like the others.

Per run, measured along the path: a_path / b_path, the smallest / largest singular value
of any effective layer; ``in box``: a_path >= a and b_path <= 1/a for the study's declared
box (``box_a``); ``PL steps met``: the fraction of steps with
``loss_{t+1} / loss_t <= 1 - 2 lr L a_t^(2(L-1))``, a_t the smallest singular value at
iterate t (the bound the theorem gives for that step). Rates (``loss_t`` relative to
``loss_0``): ``tail rate``: exp(slope) of a least-squares line through log(loss_t) after
the loss first fell below 1e-2 (with its R^2); ``global rate``: (loss_T / loss_0)^(1/T);
``worst step``: max_t loss_{t+1} / loss_t; ``steps to tol``: first step with
loss <= tol * loss_0 (default 1e-10).

Usage::

    python tools/deep_linear.py --quick                      # seconds, prints the table
    python tools/deep_linear.py --json docs/data/deep_linear.json
    python tools/deep_linear.py --plot-only --json docs/data/deep_linear.json --plot docs/img
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/machine.py

__all__ = [
    "START_KINDS",
    "DeepLinearConfig",
    "Problem",
    "fit_rates",
    "make_problem",
    "markdown_table",
    "pl_rate_bound",
    "pl_steps_met",
    "project_spectrum",
    "run_arm",
    "run_study",
]

DIVERGED_FACTOR = 1e6  # loss above this multiple of loss_0 (or non-finite) = diverged
PC_POWER_ITERS = 10  # per refresh, as in all published PC-layer configs


START_KINDS = ("ill", "near_target")


@dataclass
class DeepLinearConfig:
    """One study: every (depth, width) x start kind x seed x lr, trained by every arm."""

    dim: int = 16  # input/output dimension d
    samples: int = 64  # columns of X (>= dim so X X^T = I is possible)
    # (depth L, hidden width h >= dim): square nets, plus one widening/narrowing net
    networks: list[tuple[int, int]] = field(
        default_factory=lambda: [(2, 16), (4, 16), (8, 16), (4, 32)]
    )
    starts: list[str] = field(default_factory=lambda: list(START_KINDS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # one start per seed
    lrs: list[float] = field(default_factory=lambda: [0.01, 0.03])
    a_values: list[float] = field(default_factory=lambda: [0.5])  # projected: [a, 1/a]
    box_a: float = 0.5  # declared box [a, 1/a] of the theorem check
    pc_levels: list[int] = field(default_factory=lambda: [2, 4])
    init_cond: float = 100.0  # "ill": singular values in [1/init_cond, 1]
    near_delta: float = 0.15  # "near_target": relative perturbation of a factorization of A
    target_range: tuple[float, float] = (0.5, 2.0)  # singular values of the target A
    steps: int = 2000
    tol: float = 1e-10  # relative loss at which a run stops (converged)

    def __post_init__(self) -> None:
        if self.samples < self.dim:
            raise ValueError(f"samples ({self.samples}) must be >= dim ({self.dim})")
        for depth, width in self.networks:
            if width < self.dim or depth < 1:
                raise ValueError(
                    f"networks need depth >= 1 and width >= dim ({self.dim}), got "
                    f"(depth={depth}, width={width})"
                )
        for a in [*self.a_values, self.box_a]:
            if not 0.0 < a < 1.0:
                raise ValueError(f"a_values and box_a must lie in (0, 1) (b = 1/a), got {a}")
        bad = sorted(set(self.starts) - set(START_KINDS))
        if bad:
            raise ValueError(f"starts must be among {START_KINDS}, got {bad}")
        if (not self.lrs or min(self.lrs) <= 0 or self.steps < 1 or self.init_cond < 1
                or self.near_delta < 0):
            raise ValueError(
                f"need lrs > 0, steps >= 1, init_cond >= 1, near_delta >= 0; got lrs="
                f"{self.lrs}, steps={self.steps}, init_cond={self.init_cond}, near_delta="
                f"{self.near_delta}"
            )

    def init_range(self, start: str) -> tuple[float, float] | None:
        """Singular-value range of every layer at an ``ill`` start (None: near_target)."""
        return (1.0 / self.init_cond, 1.0) if start == "ill" else None


@dataclass
class Problem:
    """Data, target and ill-conditioned start of one network (all float64)."""

    X: Tensor  # (dim, samples), X X^T = I
    Y: Tensor  # (dim, samples) = A X
    target: Tensor  # A, (dim, dim)
    init: list[Tensor]  # W_1 .. W_L, shapes (h, d), (h, h), ..., (d, h)


def _random_matrix(m: int, n: int, sigma: Tensor, gen: torch.Generator) -> Tensor:
    """U diag(sigma) V^T with Haar-random orthonormal U (m x r), V (n x r), r = len(sigma)."""
    r = sigma.numel()
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    return U @ torch.diag(sigma) @ V.T


def _logspace(lo: float, hi: float, n: int) -> Tensor:
    return torch.logspace(math.log10(hi), math.log10(lo), n, dtype=torch.float64)


def make_problem(
    *, dim: int, width: int, depth: int, samples: int, init_cond: float,
    target_range: tuple[float, float], seed: int,
    init_range: tuple[float, float] | None = None, near_target: float | None = None,
) -> Problem:
    """Build whitened data, a target with spectrum in ``target_range`` and a start whose
    every layer has singular values log-spaced in ``init_range`` (default
    [1/init_cond, 1], condition init_cond).

    ``near_target``: instead, a start near a balanced factorization of the target (see
    :func:`_near_target_start`) with relative perturbation ``near_target``.
    """
    lo, hi = init_range if init_range is not None else (1.0 / init_cond, 1.0)
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(samples, dim, generator=gen, dtype=torch.float64))
    X = Q.T.contiguous()  # rows orthonormal: X X^T = I
    A = _random_matrix(dim, dim, _logspace(*target_range, dim), gen)
    shapes = [(width, dim)] + [(width, width)] * (depth - 2) + [(dim, width)]
    if depth == 1:
        shapes = [(dim, dim)]
    init = [
        _random_matrix(m, n, _logspace(lo, hi, min(m, n)), gen) for m, n in shapes
    ]
    if near_target is not None:
        init = _near_target_start(A, shapes, near_target, gen)
    return Problem(X=X, Y=A @ X, target=A, init=init)


def _near_target_start(A: Tensor, shapes: list[tuple[int, int]], delta: float,
                       gen: torch.Generator) -> list[Tensor]:
    """Layers whose product is exactly ``A`` (each with singular values ``s_A^(1/L)``, padded
    with ones in wide hidden layers; random orthogonal factors in between), each then
    perturbed by ``delta * ||W||_2 * G / sqrt(max(shape))``, G standard normal.

    Why not a random near-orthogonal start: from most of them every path to the target
    passes through a (near-)singular product (a determinant sign to flip, or a rotation by
    ~pi), so plain GD leaves any box [a, b] with a > 0 whatever its step size."""
    U, S, Vh = torch.linalg.svd(A)
    depth = len(shapes)
    root = S ** (1.0 / depth)
    if depth == 1:
        layers = [A.clone()]
    else:
        h = shapes[0][0]
        Qs = [torch.linalg.qr(torch.randn(h, h, generator=gen, dtype=torch.float64))[0]
              for _ in range(depth - 1)]
        pad = torch.cat([root, torch.ones(h - root.numel(), dtype=torch.float64)])
        layers = [Qs[0][:, : root.numel()] * root @ Vh]
        layers += [Qs[i] * pad @ Qs[i - 1].T for i in range(1, depth - 1)]
        layers.append(U * root @ Qs[-1][:, : root.numel()].T)
    out = []
    for W in layers:
        G = torch.randn(W.shape, generator=gen, dtype=torch.float64)
        out.append(W + delta * torch.linalg.matrix_norm(W, 2) * G / max(W.shape) ** 0.5)
    return out


@torch.no_grad()
def project_spectrum(W: Tensor, a: float, b: float) -> Tensor:
    """Nearest matrix (Frobenius) to ``W`` with singular values in [a, b]: U clamp(S) V^T."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return (U * S.clamp(a, b).unsqueeze(-2)) @ Vh


def pl_rate_bound(depth: int, a_path: float, lr: float) -> float:
    """Per-step loss contraction ``1 - 2 lr mu``, mu = depth * a_path^(2(depth-1)) (whitened X).

    Valid to first order in lr while every layer's singular values stay >= a_path; a
    measured rate at or below it is consistent with the theory."""
    return 1.0 - 2.0 * lr * depth * a_path ** (2 * (depth - 1))


def _pc_tools(level: int) -> tuple[Any, Any]:
    """(pc_weight, coefficients of ``level``) from the PC layer package."""
    from specopt.pc import pc_weight, resolve_polynomial

    return pc_weight, resolve_polynomial(level=level).coefficients


def _by_shape(Ws: list[Tensor]) -> dict[tuple[int, ...], list[int]]:
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, W in enumerate(Ws):
        groups.setdefault(tuple(W.shape), []).append(i)
    return groups


def _svd_range(Ws: list[Tensor]) -> tuple[float, float]:
    """(smallest, largest) singular value over all matrices; one batched SVD per shape."""
    lo, hi = math.inf, 0.0
    for idx in _by_shape(Ws).values():
        s = torch.linalg.svdvals(torch.stack([Ws[i] for i in idx]))
        lo, hi = min(lo, float(s.min())), max(hi, float(s.max()))
    return lo, hi


def run_arm(
    problem: Problem, *, arm: str, steps: int, lr: float, tol: float,
    a: float | None = None, level: int | None = None,
) -> dict[str, Any]:
    """Train one arm (``"gd"``, ``"projected"`` with ``a`` (b = 1/a), ``"pc"`` with
    ``level``).

    Returns ``loss`` (relative to loss_0, one entry per step, index 0 = start),
    ``sigma_min`` / ``sigma_max`` (extremes over all effective layers at each step),
    ``status`` ("converged" | "diverged" | "max_steps") and ``seconds``.
    """
    raws = [W.clone().requires_grad_(True) for W in problem.init]
    pc_state: list[tuple[Tensor, Tensor]] = []
    gammas: list[Tensor] = []
    if arm == "projected":
        assert a is not None
        b = 1.0 / a
        with torch.no_grad():
            for W in raws:
                W.copy_(project_spectrum(W, a, b))  # the start is projected too
    elif arm == "pc":
        assert level is not None
        from specopt.spectral.power_iteration import init_singular_vectors, power_iteration_

        pc_weight, coefficients = _pc_tools(level)
        for W in raws:
            u, v = init_singular_vectors(W.shape, dtype=torch.float64)
            power_iteration_(W, u, v, iters=PC_POWER_ITERS)
            pc_state.append((u, v))
            # Learned per-layer gain (init 1, as published). Needed: f(1) = 1 and the
            # multiplying s is detached, so without gamma the top singular value of W_eff
            # receives no gradient and stays at its initial value.
            gammas.append(torch.ones((), dtype=torch.float64, requires_grad=True))
    elif arm != "gd":
        raise ValueError(f"arm must be 'gd', 'projected' or 'pc', got {arm!r}")

    def effective() -> list[Tensor]:
        if arm != "pc":
            return raws
        return [
            pc_weight(W, u.clone(), v.clone(), g, coefficients, eps=1e-7)
            for W, (u, v), g in zip(raws, pc_state, gammas, strict=True)
        ]

    losses: list[float] = []
    smin: list[float] = []
    smax: list[float] = []
    loss0 = None
    status = "max_steps"
    t0 = time.perf_counter()
    for step in range(steps + 1):
        Ws = effective()
        out = problem.X
        for W in Ws:
            out = W @ out
        loss = 0.5 * (out - problem.Y).pow(2).sum()
        value = float(loss.detach())
        if loss0 is None:
            loss0 = value
        rel = value / loss0
        lo, hi = _svd_range([W.detach() for W in Ws])
        losses.append(rel)
        smin.append(lo)
        smax.append(hi)
        if not math.isfinite(rel) or rel > DIVERGED_FACTOR:
            status = "diverged"
            break
        if rel <= tol:
            status = "converged"
            break
        if step == steps:
            break
        params = raws + gammas
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for P, g in zip(params, grads, strict=True):
                P.sub_(lr * g)
            if arm == "projected":
                for idx in _by_shape(raws).values():
                    projected = project_spectrum(torch.stack([raws[i] for i in idx]), a, 1.0 / a)
                    for j, i in enumerate(idx):
                        raws[i].copy_(projected[j])
            if arm == "pc":
                for W, (u, v) in zip(raws, pc_state, strict=True):
                    power_iteration_(W, u, v, iters=PC_POWER_ITERS)
    return {
        "loss": losses,
        "sigma_min": smin,
        "sigma_max": smax,
        "status": status,
        "seconds": time.perf_counter() - t0,
    }


def fit_rates(loss: list[float], tol: float) -> dict[str, float | int | None]:
    """Linear-convergence summaries of one relative-loss curve (see the module docstring)."""
    T = len(loss) - 1
    finite = [x for x in loss if math.isfinite(x)]
    out: dict[str, float | int | None] = {
        "steps_to_tol": T if loss[-1] <= tol else None,
        "final_rel_loss": loss[-1],
        "global_rate": (loss[-1] ** (1.0 / T)) if T > 0 and loss[-1] > 0 and math.isfinite(
            loss[-1]) else None,
        "worst_step": max(
            (loss[t + 1] / loss[t] for t in range(T) if loss[t] > 0), default=None
        ) if len(finite) == len(loss) else None,
    }
    start = next((t for t, x in enumerate(loss) if x <= 1e-2), None)
    if start is None:
        start = T // 2  # never reached 1e-2: fit the second half (flagged by the low drop)
    ys = [math.log(x) for x in loss[start:] if x > 0 and math.isfinite(x)]
    if len(ys) >= 3:
        n = len(ys)
        xm, ym = (n - 1) / 2, sum(ys) / n
        sxx = sum((i - xm) ** 2 for i in range(n))
        slope = sum((i - xm) * (y - ym) for i, y in enumerate(ys)) / sxx
        ss_res = sum((y - (ym + slope * (i - xm))) ** 2 for i, y in enumerate(ys))
        ss_tot = sum((y - ym) ** 2 for y in ys)
        out["tail_rate"] = math.exp(slope)
        out["tail_r2"] = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
        out["tail_start"] = start
    else:
        out["tail_rate"] = out["tail_r2"] = out["tail_start"] = None
    return out


def _subsample(xs: list[float], every: int) -> list[float]:
    """Every ``every``-th point plus the last, rounded to 4 digits (plots only)."""
    keep = xs[::every]
    if (len(xs) - 1) % every:
        keep.append(xs[-1])
    return [float(f"{x:.4g}") for x in keep]


def pl_steps_met(loss: list[float], sigma_min: list[float], depth: int, lr: float
                 ) -> tuple[int, int]:
    """(steps meeting the per-step PL bound, steps checked): step t meets it when
    ``loss[t+1] / loss[t] <= pl_rate_bound(depth, sigma_min[t], lr)``."""
    met = checked = 0
    for t in range(len(loss) - 1):
        if loss[t] > 0 and math.isfinite(loss[t + 1]):
            checked += 1
            met += loss[t + 1] / loss[t] <= pl_rate_bound(depth, sigma_min[t], lr)
    return met, checked


def _arms(cfg: DeepLinearConfig, log: Any) -> list[tuple[str, dict[str, Any]]]:
    try:
        _pc_tools(cfg.pc_levels[0]) if cfg.pc_levels else None
        levels = list(cfg.pc_levels)
    except ImportError as err:  # the PC layer is a separate package part; say so, don't die
        log(f"warning: PC arm skipped ({err})")
        levels = []
    arms: list[tuple[str, dict[str, Any]]] = [("gd", {"arm": "gd"})]
    arms += [(f"projected a={a:g}", {"arm": "projected", "a": a}) for a in cfg.a_values]
    arms += [(f"pc{k}", {"arm": "pc", "level": k}) for k in levels]
    return arms


def run_study(cfg: DeepLinearConfig, *, log: Any = print) -> dict[str, Any]:
    """Every arm on every (network, start, seed, lr); returns a JSON-ready dict (curves
    subsampled; the per-step checks use the full curves)."""
    arms = _arms(cfg, log)
    record_every = max(1, cfg.steps // 200)
    runs = []
    box_lo, box_hi = cfg.box_a, 1.0 / cfg.box_a
    for depth, width in cfg.networks:
        for start in cfg.starts:
            for seed in cfg.seeds:
                problem = make_problem(
                    dim=cfg.dim, width=width, depth=depth, samples=cfg.samples,
                    init_cond=cfg.init_cond, target_range=cfg.target_range,
                    seed=1000 * seed + depth, init_range=cfg.init_range(start),
                    near_target=cfg.near_delta if start == "near_target" else None,
                )
                for lr in cfg.lrs:
                    for name, kw in arms:
                        res = run_arm(problem, steps=cfg.steps, lr=lr, tol=cfg.tol, **kw)
                        a_path, b_path = min(res["sigma_min"]), max(res["sigma_max"])
                        met, checked = pl_steps_met(res["loss"], res["sigma_min"], depth, lr)
                        row = {
                            "depth": depth, "width": width, "start": start, "seed": seed,
                            "lr": lr, "arm": name, "a": kw.get("a"), "level": kw.get("level"),
                            "status": res["status"], "steps_run": len(res["loss"]) - 1,
                            "seconds": res["seconds"], "a_path": a_path, "b_path": b_path,
                            "in_box": bool(a_path >= box_lo * (1 - 1e-9)
                                           and b_path <= box_hi * (1 + 1e-9)),
                            "pl_met": met, "pl_checked": checked,
                            "pl_bound_path": pl_rate_bound(depth, a_path, lr),
                            **fit_rates(res["loss"], cfg.tol),
                            "curve_every": record_every,
                            "loss_curve": _subsample(res["loss"], record_every),
                            "sigma_min_curve": _subsample(res["sigma_min"], record_every),
                        }
                        runs.append(row)
                        log(_format_row(row))
    return {"config": asdict(cfg), "machine": _machine(), "torch": torch.__version__,
            "runs": runs}


def _machine() -> str:
    import machine  # tools/machine.py: the one description of the CPU

    return f"{machine.cpu_kind()}, {os.cpu_count()} cpu, 1 thread"


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(
        x, spec)


def _format_row(r: dict[str, Any]) -> str:
    return (f"L={r['depth']} h={r['width']} {r['start']:15s} seed {r['seed']} lr {r['lr']:<5g} "
            f"{r['arm']:14s} {r['status']:9s} steps {r['steps_run']:5d} "
            f"PL met {r['pl_met']}/{r['pl_checked']} a_path {r['a_path']:.3g} "
            f"b_path {r['b_path']:.3g} in box {'yes' if r['in_box'] else 'no'}")


SUMMARY_HEADER = (
    "| start | depth x width | arm | runs | converged to 1e-10 | median steps (converged) "
    "| path in box [a, 1/a] | steps meeting the PL bound | median tail rate (not diverged) "
    "| min a_path |"
)


def summary_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs pooled over seeds and learning rates, per (start, network, arm)."""
    groups: dict[tuple[str, int, int, str], list[dict[str, Any]]] = {}
    for r in data["runs"]:
        groups.setdefault((r["start"], r["depth"], r["width"], r["arm"]), []).append(r)
    rows = []
    for (start, depth, width, arm), rs in groups.items():
        conv = [r["steps_run"] for r in rs if r["status"] == "converged"]
        tails = [r["tail_rate"] for r in rs
                 if r["tail_rate"] is not None and r["status"] != "diverged"]
        rows.append({
            "start": start, "depth": depth, "width": width, "arm": arm, "runs": len(rs),
            "converged": len(conv), "median_steps": statistics.median(conv) if conv else None,
            "in_box": sum(r["in_box"] for r in rs),
            "pl_met": sum(r["pl_met"] for r in rs), "pl_checked": sum(r["pl_checked"] for r in rs),
            "median_tail": statistics.median(tails) if tails else None,
            "min_a_path": min(r["a_path"] for r in rs),
        })
    return rows


def markdown_table(data: dict[str, Any]) -> str:
    """The summary table (one row per start, network and arm), in markdown."""
    a = data["config"]["box_a"]
    lines = [SUMMARY_HEADER.replace("[a, 1/a]", f"[{a:g}, {1 / a:g}]"),
             "|" + "---|" * (SUMMARY_HEADER.count(" | ") + 1)]
    for s in summary_rows(data):
        frac = s["pl_met"] / s["pl_checked"] if s["pl_checked"] else math.nan
        lines.append(
            f"| {s['start']} | {s['depth']}x{s['width']} | {s['arm']} | {s['runs']} | "
            f"{s['converged']}/{s['runs']} | {_fmt(s['median_steps'], 'g')} | "
            f"{s['in_box']}/{s['runs']} | {_fmt(frac, '.3f')} ({s['pl_met']}/"
            f"{s['pl_checked']}) | {_fmt(s['median_tail'], '.5f')} | "
            f"{s['min_a_path']:.2e} |")
    return "\n".join(lines)


def plot(data: dict[str, Any], out_dir: Path) -> list[Path]:
    """One PNG per start kind: relative loss vs step (seed 0, smallest lr) per network."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = sorted({(r["width"], r["depth"]) for r in data["runs"]})
    arms = list(dict.fromkeys(r["arm"] for r in data["runs"]))
    colors = {arm: plt.get_cmap("tab10")(i % 10) for i, arm in enumerate(arms)}
    seed, lr = min(r["seed"] for r in data["runs"]), min(r["lr"] for r in data["runs"])
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in dict.fromkeys(r["start"] for r in data["runs"]):
        fig, axes = plt.subplots(1, len(nets), figsize=(3.3 * len(nets), 3.0), squeeze=False)
        for ax, (width, depth) in zip(axes[0], nets, strict=True):
            for r in data["runs"]:
                if (r["width"], r["depth"], r["start"], r["seed"], r["lr"]) != (
                        width, depth, start, seed, lr):
                    continue
                ys = r["loss_curve"]
                xs = [min(i * r["curve_every"], r["steps_run"]) for i in range(len(ys))]
                ax.semilogy(xs, ys, color=colors[r["arm"]], lw=1.2, label=r["arm"])
            ax.set_title(f"{start}: L={depth}, h={width}, lr={lr:g}", fontsize=8)
            ax.set_xlabel("GD step", fontsize=8)
            ax.tick_params(labelsize=7)
        axes[0][0].set_ylabel("loss / loss_0", fontsize=8)
        axes[0][-1].legend(fontsize=6, loc="best")
        fig.tight_layout()
        path = out_dir / f"deep_linear_{start}.png"
        _atomic_savefig(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths


def _atomic_savefig(fig: Any, path: Path) -> None:
    from specopt.checkpoint import atomic_write

    atomic_write(path, lambda f: fig.savefig(f, dpi=80, format="png"))


def _atomic_write_text(path: Path, text: str) -> None:
    """``text`` (UTF-8) to ``path`` through specopt's one atomic write (umask mode)."""
    from specopt.checkpoint import atomic_write

    atomic_write(path, lambda f: f.write(text.encode()))


def replace_doc_block(doc: Path, begin: str, end: str, body: str) -> None:
    """Replace the text between the ``begin`` and ``end`` marker lines of ``doc`` (atomic)."""
    text = doc.read_text() if doc.exists() else ""
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    _atomic_write_text(doc, text)


def doc_section(data: dict[str, Any], img_rel: str = "img") -> str:
    """Markdown for docs/results.md: the config line, the summary table, the plots."""
    c = data["config"]
    starts = [s for s in c["starts"] if any(r["start"] == s for r in data["runs"])]
    lines = [
        f"Config: d={c['dim']}, samples={c['samples']}, networks (depth, width)="
        f"{[tuple(n) for n in c['networks']]}; starts: `ill` (every layer's singular values "
        f"in [{1 / c['init_cond']:g}, 1]) and `near_target` (a balanced factorization of the "
        f"target, every layer perturbed by {c['near_delta']:g} x its norm), seeds {c['seeds']} "
        f"(one start and target per seed); target singular values in "
        f"[{c['target_range'][0]:g}, {c['target_range'][1]:g}]; lr {c['lrs']}; "
        f"steps <= {c['steps']}, stop at loss <= {c['tol']:g} loss_0; declared box "
        f"[{c['box_a']:g}, {1 / c['box_a']:g}]; float64; {len(data['runs'])} runs. "
        f"Machine: {data['machine']}, torch {data['torch']}.",
        "",
        markdown_table(data),
        "",
    ]
    lines += [f"![{s}: relative loss vs step]({img_rel}/deep_linear_{s}.png)" for s in starts]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny study that finishes in seconds")
    p.add_argument("--json", type=Path, help="write (or with --plot-only, read) results here")
    p.add_argument("--plot", type=Path, help="directory for the PNGs")
    p.add_argument("--plot-only", action="store_true", help="no training: re-plot from --json")
    p.add_argument("--nets", nargs="+", metavar="LxH", help="networks, e.g. 2x16 4x32")
    p.add_argument("--a", type=float, nargs="+", dest="a_values")
    p.add_argument("--pc-levels", type=int, nargs="*")
    p.add_argument("--steps", type=int)
    p.add_argument("--lrs", type=float, nargs="+")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--starts", nargs="+", choices=START_KINDS)
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 16x16 matrices: threads only add contention on a shared box
    try:
        return _main(p, args)
    finally:
        torch.set_num_threads(threads)


def _main(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.plot_only:
        if args.json is None:
            p.error("--plot-only needs --json PATH to read")
        data = json.loads(args.json.read_text())
    else:
        cfg = DeepLinearConfig()
        if args.quick:
            cfg = DeepLinearConfig(dim=8, samples=16, networks=[(2, 8), (3, 12)], seeds=[0],
                                   lrs=[0.05], steps=200)
        if args.nets is not None:
            cfg.networks = [tuple(int(x) for x in n.lower().split("x")) for n in args.nets]
        for name in ("a_values", "pc_levels", "steps", "lrs", "seeds", "starts"):
            if getattr(args, name) is not None:
                setattr(cfg, name, getattr(args, name))
        cfg.__post_init__()
        data = run_study(cfg, log=functools.partial(print, flush=True))
        if args.json is not None:
            _atomic_write_text(args.json, json.dumps(data, indent=None, separators=(",", ":")))
            print(f"wrote {args.json}")
    print()
    print(markdown_table(data))
    if args.plot is not None:
        for path in plot(data, args.plot):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
