"""PC layer cost: training step with vs without PC, and merged-model inference vs plain.

Side by side in one process, for Llama-style models (``specopt.models.Llama`` presets):

* ``train``: one optimizer step (forward, backward, ``torch.optim.AdamW`` step) of the plain
  model vs the same model with PC (level 4) on the FFN matrices and the attention output
  projection (``apply_pc`` defaults), including the post-step u, v refresh (10 power
  iterations). Ratio = PC / plain; overhead = ratio - 1.
* ``accum`` (full mode): the same step split into micro-batches, PC using
  ``PCHandle.accumulate()`` (W_eff once per step) vs plain with the same micro-batches;
  ``accum-naive``: PC recomputing W_eff (forward and backward) for every micro-batch.
* ``infer``: forward (no grad, eval) of ``merge_pc(model)`` vs a never-PC model of the same
  config. Same architecture, so the expected ratio is 1.00. Also the unmerged PC model
  (W_eff recomputed every forward) for reference.

Variants are interleaved (A, B, A, B, ...) and each figure is a median over repeats,
because the machine is shared. CPU runs use ``--threads`` (default 1) intra-op threads
and, by default, the CPU time of this process (``time.process_time``): on a busy 2-core
box elapsed time is mostly waiting for other processes and 2 threads oversubscribe.

The PC cost per matrix per forward is ~``4 M r^2 + 2 (k-1) r^3`` FLOPs (``r`` the
smaller side, ``M`` the larger, ``k`` the level) against ``2 M r T`` for the layer itself
over ``T`` tokens, so the overhead falls like ``1/T``: the sweep over tokens per step
shows it.

Usage::

    python tools/bench_pc.py                  # sizes small and base, 2048..16384 tokens/step
    python tools/bench_pc.py --quick          # seconds
    python tools/bench_pc.py --json out.json
    python tools/bench_pc.py --design         # designer vs published polynomial levels
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # tools/machine.py: CPU kind and matmul peak

from specopt.checkpoint import atomic_write
from specopt.models import PRESETS, Llama, LlamaConfig
from specopt.pc import apply_pc, merge_pc


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_CLOCK: Callable[[], float] = time.perf_counter


def _interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int,
                 device: torch.device) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved (order alternating)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeats):
        # Alternate the order (A B C, C B A, ...) so no variant always runs after the same one.
        for name, fn in list(fns.items())[:: 1 if i % 2 == 0 else -1]:
            _sync(device)
            t0 = _CLOCK()
            fn()
            _sync(device)
            times[name].append(_CLOCK() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _config(size: str, seq: int) -> LlamaConfig:
    base = PRESETS[size].to_dict()
    base["max_seq_len"] = max(base["max_seq_len"], seq)
    return LlamaConfig(**base)


def _model(cfg: LlamaConfig, device: torch.device) -> Llama:
    torch.manual_seed(0)
    return Llama(cfg).to(device)


def _train_step(model: Llama, opt: torch.optim.Optimizer, batches: list[tuple]) -> None:
    opt.zero_grad(set_to_none=True)
    for x, y in batches:
        model.loss(x, y).backward()
    opt.step()


def _accum_step(model: Llama, opt: torch.optim.Optimizer, handle, batches: list[tuple]) -> None:
    opt.zero_grad(set_to_none=True)
    with handle.accumulate():
        for x, y in batches:
            model.loss(x, y).backward()
    opt.step()


def bench_size(size: str, tokens_list: list[int], *, seq: int, repeats: int, warmup: int,
               level: int, accum: int, device: torch.device) -> Iterator[dict[str, Any]]:
    """Rows (dicts) for one model size, yielded as soon as each is measured."""
    cfg = _config(size, seq)
    plain = _model(cfg, device)
    pc = _model(cfg, device)
    handle = apply_pc(pc, level=level)
    merged = merge_pc(_model_with(cfg, device, level))  # same init as `pc`, then merged
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-4)
    opt_pc = torch.optim.AdamW(pc.parameters(), lr=1e-4)
    handle.attach(opt_pc)
    params = plain.num_parameters()
    g = torch.Generator().manual_seed(0)
    for tokens in tokens_list:
        batch = max(1, tokens // seq)
        data = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g).to(device)
        full = [(data[:, :-1], data[:, 1:])]
        t = _interleaved({
            "plain": lambda b=full: _train_step(plain, opt_plain, b),
            "pc": lambda b=full: _train_step(pc, opt_pc, b),
        }, repeats, warmup, device)
        yield _row(size, "train", batch * seq, params, t["plain"], t["pc"], "pc")
        if accum > 1 and batch % accum == 0:
            micro = [(x[i::accum], y[i::accum]) for x, y in full for i in range(accum)]
            t = _interleaved({
                "plain": lambda b=micro: _train_step(plain, opt_plain, b),
                "pc": lambda b=micro: _accum_step(pc, opt_pc, handle, b),
                "naive": lambda b=micro: _train_step(pc, opt_pc, b),
            }, repeats, warmup, device)
            yield _row(size, f"accum{accum}", batch * seq, params, t["plain"], t["pc"], "pc")
            yield _row(size, f"accum{accum}-naive", batch * seq, params, t["plain"], t["naive"],
                       "pc")
    # Inference on the largest batch: merged vs plain (and unmerged PC for reference).
    pc.eval()
    plain.eval()
    merged.eval()
    with torch.no_grad():
        x = full[0][0]
        t = _interleaved({
            "plain": lambda: plain(x),
            "merged": lambda: merged(x),
            "pc": lambda: pc(x),
        }, repeats, warmup, device)
    yield _row(size, "infer", x.numel(), params, t["plain"], t["merged"], "merged")
    yield _row(size, "infer-unmerged", x.numel(), params, t["plain"], t["pc"], "pc")


def _model_with(cfg: LlamaConfig, device: torch.device, level: int) -> Llama:
    model = _model(cfg, device)
    apply_pc(model, level=level)
    return model


def _row(size: str, kind: str, tokens: int, params: int, t_plain: float, t_ours: float,
         ours: str) -> dict[str, Any]:
    return {
        "name": f"{size}/{kind}/{tokens}",
        "size": size,
        "kind": kind,
        "tokens": tokens,
        "params": params,
        "plain_s": t_plain,
        f"{ours}_s": t_ours,
        "time_ratio": t_ours / t_plain,
        "overhead": t_ours / t_plain - 1.0,
    }


def print_design_table() -> None:
    """Published levels next to LP-designed polynomials of the same degree and peak."""
    from specopt.pc.design import compare_with_levels

    cols = ["name", "degree", "slope_at_0", "peak_[0,1]", "kappa_out(k=10)", "kappa_out(k=100)"]
    print("  ".join(f"{c:>17}" for c in cols))
    for objective, k in (("kappa", 100.0), ("kappa", 10.0), ("slope", 100.0)):
        for row in compare_with_levels(objective, k):
            if str(row["name"]).startswith("level") and (objective, k) != ("kappa", 100.0):
                continue  # print the published rows once
            print("  ".join(f"{row[c]:>17.4g}" if isinstance(row[c], float) else
                            f"{row[c]!s:>17}" for c in cols))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats (seconds)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--sizes", nargs="+", default=None, choices=sorted(PRESETS))
    parser.add_argument("--tokens", nargs="+", type=int, default=None,
                        help="tokens per optimizer step (batch = tokens // seq)")
    parser.add_argument("--seq", type=int, default=256, help="sequence length")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--level", type=int, default=4)
    parser.add_argument("--accum", type=int, default=None,
                        help="micro-batches for the accumulate() variant (1: off)")
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clock", choices=("auto", "process", "wall"), default="auto",
                        help="process: CPU time of this process (robust on a shared CPU box); "
                        "wall: elapsed time; auto: process on CPU, wall on GPU")
    parser.add_argument("--design", action="store_true",
                        help="only print the polynomial designer vs published levels table")
    args = parser.parse_args(argv)
    if args.design:
        print_design_table()
        return 0
    device = torch.device(args.device)
    global _CLOCK
    clock = args.clock if args.clock != "auto" else ("process" if device.type == "cpu" else "wall")
    _CLOCK = time.process_time if clock == "process" else time.perf_counter
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.quick:
        sizes = args.sizes or ["tiny"]
        tokens = args.tokens or [256, 1024]
        seq, repeats, warmup, accum = min(args.seq, 64), args.repeats or 3, 1, args.accum or 1
    else:
        sizes = args.sizes or ["small", "base"]
        tokens = args.tokens or [2048, 8192, 16384]
        seq, repeats, warmup, accum = args.seq, args.repeats or 5, 1, args.accum or 4
    rows: list[dict[str, Any]] = []
    print(machine.describe(device), flush=True)
    print(f"PC level {args.level} on FFN + wo, AdamW; device {device}"
          f"{f', {torch.get_num_threads()} thread(s)' if device.type == 'cpu' else ''}; "
          f"{clock} time, medians of {repeats} interleaved repeats", flush=True)
    header = f"{'size':>6} {'measure':>15} {'tokens':>7} {'plain ms':>9} {'ours ms':>9} " \
             f"{'ratio':>6} {'overhead':>8}"
    print(header)
    for size in sizes:
        for row in bench_size(size, tokens, seq=seq, repeats=repeats, warmup=warmup,
                              level=args.level, accum=accum, device=device):
            ours = row.get("pc_s", row.get("merged_s"))
            print(f"{row['size']:>6} {row['kind']:>15} {row['tokens']:>7} "
                  f"{1e3 * row['plain_s']:>9.1f} {1e3 * ours:>9.1f} {row['time_ratio']:>6.3f} "
                  f"{100 * row['overhead']:>+7.1f}%", flush=True)
            rows.append(row)
    if args.json:
        result = {"benchmark": "pc", "device": str(device), "level": args.level, "clock": clock,
                  "threads": torch.get_num_threads(), "repeats": repeats, "rows": rows}
        atomic_write(args.json, lambda f: f.write(json.dumps(result, indent=2).encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
