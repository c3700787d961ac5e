"""Benchmark: specopt.Muon vs torch.optim.Muon (and heavyball's Muon) on one transformer's matrices.

What it measures, side by side in one process:

1. **Step time.** The 28 hidden matrices of a 4-layer Llama of width ``d`` (per layer q, k, v, o
   ``d x d`` and the three ``4d x d`` / ``d x 4d`` FFN matrices; ``d=512`` is
   ``specopt.models.PRESETS["d512"]``). Every optimizer steps the *same* parameter tensors
   (each keeps its own state) on the same fixed gradients, all at their defaults; steps are
   interleaved (the order rotates every repeat) and the median of ``--repeats`` is reported
   with ``speedup_vs_torch = median(torch) / median(specopt)``. The ``torch-math`` row
   runs torch's exact iteration through ``specopt.Muon(ns_coefficients=...)`` in specopt's
   NS dtype, so ``speedup_same_dtype`` isolates the algorithmic gain from the dtype choice.
2. **Orthogonality error** RMS ``|sigma_i - 1|`` of each optimizer's orthogonalized update
   (taken from a real ``step()`` with lr=1, momentum=0, weight_decay=0 on zero weights, divided
   by the lr rule), averaged over the 28 matrices, on (a) momentum buffers after
   ``--llama-steps`` Muon steps of that Llama on random tokens and (b) random matrices of the
   same shapes with singular values log-spaced over 3 decades.
3. ``--sweep``: the selection evidence for specopt's default (``pe4`` schedule, 4 steps,
   ``normalize="tight"``, Gram side for aspect >= 2, batched by shape): NS time, matmul
   FLOPs and both errors of candidate configurations, with torch's NS as the reference row.

How the default was chosen (``--sweep`` on the 2-core dev CPU): with ``normalize="tight"``
4 steps of ``pe4`` beat torch's 5 jordan steps on both errors, and the Gram side cuts the
FFN matrices' FLOPs by 42% (ns_matmul_flops: 52 vs 90 units of n^3 at aspect 4), so the
d=512 set needs 65% of torch's FLOPs (1.55x fewer) in bf16, 57% (1.76x) in fp32 (no restart).
On CPUs without native bf16 (AVX2 only, like the dev box) specopt computes in fp32 while
torch.optim.Muon always casts to bf16, which such CPUs emulate ~30x slower; the speedup
there is mostly that dtype choice (the table says which dtype each side used).

Usage::

    python tools/bench_muon.py                 # d=512, CPU, median of 5
    python tools/bench_muon.py --d 128 --sweep --json out.json
    python tools/bench_muon.py --device cuda --d 2048
    python tools/bench_muon.py --quick         # seconds: d=32, 3 repeats (tests, specopt bench)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine

from specopt import Muon
from specopt.checkpoint import atomic_write
from specopt.models import PRESETS, Llama, LlamaConfig
from specopt.optim.muon import DEFAULT_NS_SCHEDULE, TORCH_NS_COEFFS, adjust_lr, default_ns_dtype
from specopt.optim.newton_schulz import (
    GRAM_MIN_ASPECT,
    NSSchedule,
    design_polar_express,
    ns_matmul_flops,
    orthogonality_error,
    orthogonalize,
    orthogonalize_flops,
    orthogonalize_many,
)

KJ = TORCH_NS_COEFFS  # torch.optim.Muon's default coefficients


# ------------------------------------------------------------------ inputs


def model_config(d: int) -> LlamaConfig:
    if d == 512:
        return PRESETS["d512"]
    return LlamaConfig(dim=d, n_layers=4, n_heads=8, ffn_hidden=4 * d, max_seq_len=512)


def hidden_matrices(model: Llama) -> list[tuple[str, torch.nn.Parameter]]:
    """The 28 attention/FFN matrices (embeddings, head and norms excluded)."""
    return [
        (n, p)
        for n, p in model.named_parameters()
        if p.ndim == 2 and n.startswith("layers.") and "norm" not in n
    ]


def momentum_buffers(d: int, steps: int, device: str, seed: int = 0) -> list[torch.Tensor]:
    """Momentum buffers after ``steps`` steps of specopt.Muon (fp32 NS) on random tokens."""
    torch.manual_seed(seed)
    model = Llama(model_config(d)).to(device)
    named = hidden_matrices(model)
    opt = Muon([p for _, p in named], lr=0.02, ns_dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    vocab = model_config(d).vocab_size
    for _ in range(steps):
        tokens = torch.randint(0, vocab, (4, 129), generator=g).to(device)
        model.zero_grad(set_to_none=True)
        model.loss(tokens[:, :-1], tokens[:, 1:]).backward()
        opt.step()
    return [opt.state[p]["momentum_buffer"].detach().clone() for _, p in named]


def logspaced(shapes: list[torch.Size], device: str, seed: int = 1) -> list[torch.Tensor]:
    """Random matrices with singular values log-spaced over [1e-3, 1]."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for m, n in shapes:
        k = min(m, n)
        U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
        s = torch.logspace(0, -3, k, dtype=torch.float64)
        out.append(((U * s) @ V.T).float().to(device))
    return out


# ------------------------------------------------------------------ optimizers under test


PEERS = ("torch", "torch-math", "heavyball")


def make_optimizers(params: list[torch.Tensor], peers: list[str]) -> dict[str, Any]:
    """specopt.Muon plus the requested peers, all at their defaults, on the same params."""
    opts: dict[str, Any] = {"specopt": Muon(params)}
    if "torch" in peers:
        opts["torch"] = torch.optim.Muon(params)
    if "torch-math" in peers:  # torch's exact iteration in specopt's dtype: algorithmic gain
        opts["torch-math"] = Muon(
            params, ns_coefficients=KJ, ns_dtype=default_ns_dtype(params[0].device)
        )
    if "heavyball" in peers:
        import heavyball

        opts["heavyball"] = heavyball.Muon(params, compile_step=False)
    return opts


def orthogonalized_updates(name: str, mats: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each optimizer's orthogonalized update of ``mats`` from one real step()."""
    if name == "heavyball":  # its lr rules differ; use its NS function itself
        from heavyball.utils import zeropower_via_newtonschulz5

        return [zeropower_via_newtonschulz5(m.float()) for m in mats]
    params = [torch.nn.Parameter(torch.zeros_like(m)) for m in mats]
    kw = dict(lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False)
    if name == "torch":
        opt = torch.optim.Muon(params, **kw)
    elif name == "torch-math":
        opt = Muon(params, ns_coefficients=KJ, ns_dtype=default_ns_dtype(mats[0].device), **kw)
    else:
        opt = Muon(params, **kw)
    for p, m in zip(params, mats, strict=True):
        p.grad = m.clone()
    opt.step()
    # p = 0 - adjust(lr=1, shape) * O with the default ("original") rule on both sides
    return [-p.detach() / adjust_lr(1.0, None, p.shape) for p in params]


def mean_error(updates: list[torch.Tensor]) -> float:
    return statistics.fmean(orthogonality_error(u).item() for u in updates)


# ------------------------------------------------------------------ timing


def interleaved_medians(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    device: str,
    warmup: int = 1,
    prepare: Callable[[], None] = lambda: None,
) -> dict[str, list[float]]:
    """Time each fn ``repeats`` times, interleaved (A, B, C, B, C, A, ...), after warmup;
    ``prepare()`` runs untimed before every call."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            prepare()
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            prepare()
            machine.sync(device)
            t0 = time.perf_counter()
            fns[n]()
            machine.sync(device)
            times[n].append(time.perf_counter() - t0)
    return times


# ------------------------------------------------------------------ sweep


def sweep_configs(device: torch.device, d: int) -> list[tuple[str, dict[str, Any], bool]]:
    """(label, orthogonalize kwargs, batched) candidates for the default."""
    dt = default_ns_dtype(device)
    # the bf16 row shows the Gram restart's bf16 accuracy; where bf16 is emulated (~0.3
    # GFLOP/s) it is only affordable for small d
    bf16_row = dt == torch.bfloat16 or d <= 128
    d4 = lambda lo: NSSchedule(design_polar_express(4, lo), 1.0, 4, f"pe4(l={lo:g})")  # noqa: E731
    return [
        (
            "jordan x5 fro std (torch math)",
            dict(schedule=KJ, steps=5, normalize="frobenius", method="standard", dtype=dt),
            True,
        ),
        ("jordan x5 tight auto", dict(schedule="jordan", normalize="tight", dtype=dt), True),
        ("tuned x5 tight auto", dict(schedule="tuned", normalize="tight", dtype=dt), True),
        (
            "polar_express x5 tight auto",
            dict(schedule="polar_express", normalize="tight", dtype=dt),
            True,
        ),
        ("pe4 x4 fro auto", dict(schedule="pe4", normalize="frobenius", dtype=dt), True),
        ("pe4 x4 tight std", dict(schedule="pe4", method="standard", dtype=dt), True),
        ("pe4(l=1e-3) x4 tight auto", dict(schedule=d4(1e-3), dtype=dt), True),
        ("pe4(l=1e-2) x4 tight auto", dict(schedule=d4(1e-2), dtype=dt), True),
        ("pe4 x4 tight auto unbatched", dict(schedule="pe4", dtype=dt), False),
        ("pe4 x4 tight auto  [default]", dict(schedule="pe4", dtype=dt), True),
    ] + (
        [("pe4 x4 tight auto bf16", dict(schedule="pe4", dtype=torch.bfloat16), True)]
        if bf16_row and dt != torch.bfloat16
        else []
    )


def _flops(shapes, kw) -> int:
    """Matmul FLOPs of orthogonalize(**kw) over ``shapes`` (resolved as orthogonalize does)."""
    return sum(orthogonalize_flops(tuple(s), **kw) for s in shapes)


def run_sweep(buffers, logs, repeats, device, with_torch: bool) -> list[dict[str, Any]]:
    shapes = [tuple(b.shape) for b in buffers]
    torch_flops = sum(ns_matmul_flops(s, 5) for s in shapes)
    from torch.optim._muon import _zeropower_via_newtonschulz as torch_ns

    def torch_fn(mats):
        return [torch_ns(m, KJ, 5, 1e-7) for m in mats]

    cands: dict[str, Callable[[list[torch.Tensor]], list[torch.Tensor]]] = {}
    flops = {}
    if with_torch:
        cands["torch.optim.Muon NS (bf16)"] = torch_fn
        flops["torch.optim.Muon NS (bf16)"] = torch_flops
    d = min(min(b.shape) for b in buffers)
    for label, kw, batched in sweep_configs(torch.device(device), d):
        if batched:
            cands[label] = lambda mats, kw=kw: orthogonalize_many(mats, **kw)
        else:
            cands[label] = lambda mats, kw=kw: [orthogonalize(m, **kw) for m in mats]
        flops[label] = _flops(shapes, kw)
    times = interleaved_medians(
        {k: (lambda f=f: f(buffers)) for k, f in cands.items()}, repeats, device
    )
    rows = []
    for k, f in cands.items():
        rows.append(
            {
                "name": k,
                "ns_time_s": statistics.median(times[k]),
                "flops_vs_torch": flops[k] / torch_flops,
                "err_momentum": mean_error(f(buffers)),
                "err_logspaced": mean_error(f(logs)),
            }
        )
    return rows


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=512, help="model width (FFN is 4d); 512 = d512 preset")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--llama-steps", type=int, default=3, help="steps before taking momenta")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="torch threads (CPU); several (e.g. 1 2) time the step at each")
    ap.add_argument(
        "--peers",
        nargs="+",
        choices=PEERS,
        default=["torch", "torch-math"],
        help="compared against specopt.Muon (heavyball: if installed; compiles ~2 min on CPU "
        "and, rounding to bf16, is as slow as torch where bf16 is emulated)",
    )
    ap.add_argument("--sweep", action="store_true", help="print the default-selection table")
    ap.add_argument("--quick", action="store_true", help="d=32, 3 repeats, 1 Llama step, 1 thread")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.d, args.repeats, args.llama_steps = 32, 3, 1
        # tiny matrices: 2 OpenMP threads on a shared box mostly spin (measured 4x slower)
        args.threads = args.threads or [1]
    thread_counts = args.threads or [torch.get_num_threads()]
    torch.set_num_threads(thread_counts[0])
    peers = args.peers
    print(machine.describe(args.device))

    buffers = momentum_buffers(args.d, args.llama_steps, args.device)
    shapes = [b.shape for b in buffers]
    logs = logspaced(shapes, args.device)

    # 1. step time, same params, same grads, interleaved
    g = torch.Generator().manual_seed(2)
    params = [
        torch.nn.Parameter(0.02 * torch.randn(s, generator=g).to(args.device)) for s in shapes
    ]
    grads = [torch.randn(p.shape, generator=g).to(args.device) for p in params]

    def set_grads() -> None:  # some optimizers (heavyball) consume .grad
        for p, gr in zip(params, grads, strict=True):
            p.grad = gr

    opts = make_optimizers(params, peers)
    dev = torch.device(args.device)
    ours_dtype = default_ns_dtype(dev)
    torch_flops = sum(ns_matmul_flops(tuple(s), 5) for s in shapes)
    flops = {k: torch_flops for k in opts}  # torch, torch-math, heavyball: torch's iteration
    ours = opts["specopt"].ns_options(opts["specopt"].param_groups[0], dev)  # as it steps
    flops["specopt"] = _flops([tuple(s) for s in shapes], ours)
    dtypes = {k: {"torch": torch.bfloat16, "heavyball": torch.float32}.get(k, ours_dtype)
              for k in opts}
    by_threads: dict[int, dict[str, Any]] = {}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        times = interleaved_medians(
            {k: o.step for k, o in opts.items()}, args.repeats, args.device, prepare=set_grads
        )
        med = {k: statistics.median(v) for k, v in times.items()}
        # Measured in the same run, under the same load as the step times.
        peak = {dt: machine.matmul_peak_gflops(dt, device=dev) for dt in set(dtypes.values())}
        by_threads[threads] = {
            "step_times_s": times,
            "median_step_s": med,
            "gflops": {k: flops[k] / med[k] / 1e9 for k in opts},
            "share_of_peak": {k: flops[k] / med[k] / 1e9 / peak[dtypes[k]] for k in opts},
            "peak_gflops": {str(dt)[6:]: v for dt, v in peak.items()},
            **{
                ("speedup_same_dtype" if k == "torch-math" else f"speedup_vs_{k}"): med[k]
                / med["specopt"]
                for k in peers
            },
        }
    first = by_threads[thread_counts[0]]
    times, med = first["step_times_s"], first["median_step_s"]

    # 2. orthogonality error of each one's update
    errors = {
        k: {
            "momentum": mean_error(orthogonalized_updates(k, buffers)),
            "logspaced": mean_error(orthogonalized_updates(k, logs)),
        }
        for k in opts
    }
    result: dict[str, Any] = {
        "d": args.d,
        "device": args.device,
        "threads": thread_counts[0],
        "machine": machine.describe(args.device),
        "matrices": len(shapes),
        "repeats": args.repeats,
        "ns_dtype": {"torch": "bfloat16", "specopt": str(ours_dtype).replace("torch.", "")},
        "specopt_default": {
            "schedule": DEFAULT_NS_SCHEDULE,
            "normalize": "tight",
            "gram_min_aspect": GRAM_MIN_ASPECT,
        },
        **first,  # the first thread count's figures at top level
        "by_threads": by_threads,
        "matmul_flops": flops,
        "flops_ratio_torch_over_specopt": torch_flops / flops["specopt"],
        "orthogonality_error": errors,
    }

    cpu_bf16 = dev.type == "cpu" and ours_dtype != torch.bfloat16
    if cpu_bf16:
        print(
            "note: this CPU has no native bf16 matmul; torch.optim.Muon casts to bf16 anyway, "
            "specopt's default computes in fp32 (compare with the torch-math row)"
        )
    for threads, r in by_threads.items():
        peaks = ", ".join(f"{k} {v:.0f}" for k, v in r["peak_gflops"].items())
        print(
            f"\nMuon step on {len(shapes)} matrices of a 4-layer d={args.d} transformer "
            f"({args.device}, {threads} threads, median of {args.repeats}; of peak = share of "
            f"the matmul peak measured in this run: {peaks} GFLOP/s)"
        )
        print(
            f"{'optimizer':<12} {'NS dtype':<9} {'median step s':>13} {'specopt faster':>14} "
            f"{'GFLOP/s':>8} {'of peak':>8} {'err(momentum)':>14} {'err(logspaced)':>15}"
        )
        m = r["median_step_s"]
        for k in opts:
            print(
                f"{k:<12} {str(dtypes[k])[6:]:<9} {m[k]:>13.4f} {m[k] / m['specopt']:>13.2f}x "
                f"{r['gflops'][k]:>8.0f} {r['share_of_peak'][k]:>7.0%} "
                f"{errors[k]['momentum']:>14.4f} {errors[k]['logspaced']:>15.4f}"
            )
    print(
        f"matmul FLOPs torch/specopt: {result['flops_ratio_torch_over_specopt']:.2f}x; "
        "torch-math = specopt.Muon(ns_coefficients=torch's) in specopt's dtype"
    )

    if args.sweep:
        rows = run_sweep(buffers, logs, args.repeats, args.device, "torch" in peers)
        result["sweep"] = rows
        print("\nsweep (NS only, same 28 momentum matrices, interleaved medians):")
        print(
            f"{'configuration':<34} {'NS time s':>10} {'FLOPs/torch':>11} "
            f"{'err(momentum)':>14} {'err(logspaced)':>15}"
        )
        for r in rows:
            print(
                f"{r['name']:<34} {r['ns_time_s']:>10.4f} {r['flops_vs_torch']:>11.2f} "
                f"{r['err_momentum']:>14.4f} {r['err_logspaced']:>15.4f}"
            )

    if args.json:  # atomic: never a half-written file
        atomic_write(args.json, lambda f: f.write(json.dumps(result, indent=2).encode()))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
