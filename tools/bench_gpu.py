"""GPU benchmark: Muon, the PC layer and a monitor snapshot against their peers, one table.

Meant for a lent GPU, under 5 minutes. Side by side in one process, medians of
``--repeats`` timed runs after warm-up (CUDA-synchronized):

1. **Muon step** on the 28 hidden matrices of a 4-layer width-``d`` transformer (per layer
   q, k, v, o ``d x d`` and three ``4d x d`` / ``d x 4d`` FFN matrices; ``d=2048``):
   ``specopt.Muon`` vs ``torch.optim.Muon``, both at their defaults, same parameters and
   gradients. Achieved NS GFLOP/s (counted by ``ns_matmul_flops``) and the share of the
   bf16 matmul peak measured in the same run.
2. **PC layer** at the paper's shapes ``1024 x 2816`` and ``2048 x 5632``, levels 2 and 4:
   forward + backward of a ``Linear`` with ``apply_pc`` on ``--tokens`` tokens vs the
   plain ``Linear`` (ratio = PC / plain).
3. **Monitor snapshot** of a 4-layer width-``d`` Llama: ``SpectralMonitor.snapshot`` (no
   sink) vs ``weightwatcher.WeightWatcher(model).analyze()`` (if installed).

Without CUDA it prints why and exits 0 (``--device cpu --quick`` is a seconds-long smoke
run of the same code on tiny shapes).

Usage::

    python tools/bench_gpu.py                     # on a CUDA machine
    python tools/bench_gpu.py --device cpu --quick --json out.json
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

from specopt import Muon, SpectralMonitor
from specopt.checkpoint import atomic_write
from specopt.models import Llama, LlamaConfig
from specopt.optim.muon import default_ns_dtype
from specopt.optim.newton_schulz import ns_matmul_flops, orthogonalize_flops
from specopt.pc import apply_pc

PC_SHAPES = ((1024, 2816), (2048, 5632))  # (in, out) of the paper's FFN layers
PC_LEVELS = (2, 4)


def median_time(fn: Callable[[], Any], repeats: int, device: torch.device, warmup: int = 1
                ) -> float:
    """Median wall time (s) of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    machine.sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        machine.sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def muon_shapes(d: int) -> list[tuple[int, int]]:
    """The 28 hidden matrices of a 4-layer width-``d`` transformer (FFN 4d)."""
    return [(d, d)] * 4 * 4 + [(4 * d, d), (d, 4 * d), (4 * d, d)] * 4


def bench_muon(d: int, repeats: int, device: torch.device) -> list[dict[str, Any]]:
    shapes = muon_shapes(d)
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=g).to(device) for s in shapes]
    rows = []
    opts: dict[str, Any] = {}
    params: dict[str, list[torch.nn.Parameter]] = {}
    for name in ("specopt", "torch"):
        ps = [torch.nn.Parameter(0.02 * torch.randn(s, generator=g).to(device)) for s in shapes]
        for p, gr in zip(ps, grads, strict=True):
            p.grad = gr
        params[name] = ps
        if name == "torch" and not hasattr(torch.optim, "Muon"):
            continue
        opts[name] = Muon(ps) if name == "specopt" else torch.optim.Muon(ps)
    ours_dtype = default_ns_dtype(device)
    ours = opts["specopt"].ns_options(opts["specopt"].param_groups[0], device)
    flops = {"specopt": sum(orthogonalize_flops(s, **ours) for s in shapes),
             "torch": sum(ns_matmul_flops(s, 5) for s in shapes)}
    dtypes = {"specopt": ours_dtype, "torch": torch.bfloat16}
    times = {k: median_time(o.step, repeats, device) for k, o in opts.items()}
    peak = {dt: machine.matmul_peak_gflops(dt, n=2048 if device.type == "cuda" else 512,
                                           device=device) for dt in set(dtypes.values())}
    for k, t in times.items():
        gflops = flops[k] / t / 1e9
        rows.append({
            "what": f"Muon step, d={d} set (28 matrices)", "variant": k,
            "ms": t * 1e3, "vs_peer": times.get("torch", t) / t if k == "specopt" else 1.0,
            "note": f"{str(dtypes[k])[6:]}, {gflops:.0f} GFLOP/s = "
                    f"{gflops / peak[dtypes[k]]:.0%} of peak",
        })
    return rows


def bench_pc(tokens: int, repeats: int, device: torch.device, shapes=PC_SHAPES,
             levels=PC_LEVELS) -> list[dict[str, Any]]:
    rows = []
    for fan_in, fan_out in shapes:
        x = torch.randn(tokens, fan_in, device=device, requires_grad=True)

        def fwd_bwd(layer: torch.nn.Module, x: torch.Tensor = x) -> Callable[[], None]:
            def run() -> None:
                layer.zero_grad(set_to_none=True)
                layer(x).square().mean().backward()
            return run

        plain = torch.nn.Sequential(torch.nn.Linear(fan_in, fan_out, bias=False)).to(device)
        t_plain = median_time(fwd_bwd(plain), repeats, device)
        rows.append({"what": f"PC layer {fan_in}x{fan_out}, {tokens} tokens",
                     "variant": "plain Linear", "ms": t_plain * 1e3, "vs_peer": 1.0,
                     "note": "forward + backward"})
        for level in levels:
            pc = torch.nn.Sequential(torch.nn.Linear(fan_in, fan_out, bias=False)).to(device)
            apply_pc(pc, level=level, include="*")
            t = median_time(fwd_bwd(pc), repeats, device)
            rows.append({"what": f"PC layer {fan_in}x{fan_out}, {tokens} tokens",
                         "variant": f"PC level {level}", "ms": t * 1e3, "vs_peer": t_plain / t,
                         "note": f"PC / plain = {t / t_plain:.2f}"})
    return rows


def bench_monitor(d: int, repeats: int, device: torch.device) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    cfg = LlamaConfig(dim=d, n_layers=4, n_heads=max(1, d // 64), ffn_hidden=4 * d)
    model = Llama(cfg).to(device)
    mon = SpectralMonitor(model, budget=None, alarms=())
    mon.snapshot(0)
    step = iter(range(1, 10_000))
    t_ours = median_time(lambda: mon.snapshot(next(step)), repeats, device, warmup=0)
    mon.close()
    rows = [{"what": f"monitor snapshot, 4-layer d={d} Llama", "variant": "specopt",
             "ms": t_ours * 1e3, "vs_peer": 1.0, "note": "SpectralMonitor.snapshot, no sink"}]
    try:
        import weightwatcher
    except ImportError:
        rows[0]["note"] += "; weightwatcher not installed"
        return rows
    import logging

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    watcher = weightwatcher.WeightWatcher(model=model)
    t_ww = median_time(lambda: watcher.analyze(), max(1, repeats // 2), device, warmup=0)
    rows[0]["vs_peer"] = t_ww / t_ours
    rows.append({"what": rows[0]["what"], "variant": "weightwatcher.analyze()",
                 "ms": t_ww * 1e3, "vs_peer": 1.0, "note": "its defaults"})
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--d", type=int, default=2048, help="width of the Muon set")
    ap.add_argument("--monitor-d", type=int, default=1024, help="width of the monitored Llama")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per PC forward")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats (smoke test)")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; nothing timed "
              "(run it on a GPU machine, or --device cpu --quick for a smoke run)")
        return None
    pc_shapes, levels = PC_SHAPES, PC_LEVELS
    if args.quick:
        args.d, args.monitor_d, args.tokens, args.repeats = 32, 64, 64, 2
        pc_shapes = ((32, 88), (64, 176))
    print(machine.describe(device))
    rows = bench_muon(args.d, args.repeats, device)
    rows += bench_pc(args.tokens, args.repeats, device, pc_shapes, levels)
    rows += bench_monitor(args.monitor_d, args.repeats, device)
    print(f"{'benchmark':<44} {'variant':<24} {'median ms':>10} {'vs peer':>8}  note")
    for r in rows:
        print(f"{r['what']:<44} {r['variant']:<24} {r['ms']:>10.2f} {r['vs_peer']:>7.2f}x  "
              f"{r['note']}")
    result = {"machine": machine.describe(device), "device": str(device), "rows": rows,
              "quick": args.quick}
    if args.json:  # atomic: never a half-written file
        atomic_write(args.json, lambda f: f.write(json.dumps(result, indent=2).encode()))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
