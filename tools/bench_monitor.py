"""Benchmark: training-step time with ``SpectralMonitor`` attached vs without, side by side.

Two identical Llama models and AdamW optimizers train on the same batches in one process,
taking turns every ``--chunk`` steps (plain x5, monitored x5, monitored x5, plain x5, ...),
so both see the same machine load (a chunk, not a single step, so that the monitor's
median step time is its own model's). Steps are grouped into blocks of ``--block`` steps
per model spanning whole snapshot periods: each monitored block pays its snapshots, so
its time is the *amortized* cost.
The overhead is the median over blocks of ``monitored time / plain time - 1``. The
monitor's own measured time (``own_time_s``) over the same steps is reported beside it:
on a loaded machine it is the steadier figure. Also reported: the time of one full
spectral snapshot (median of repeats), with and without writing to TensorBoard, and
whether the two runs ended with bit-identical weights (the monitor must not change
training numerics).

Target (issue 4): amortized overhead <= 2% at every=50 with all matrices monitored.

    python tools/bench_monitor.py                 # small preset, every=50
    python tools/bench_monitor.py --quick         # seconds; used by tests / specopt bench
    python tools/bench_monitor.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # (tools/machine.py: CPU kind and matmul peak)

from specopt.models import PRESETS, Llama
from specopt.spectral import SpectralMonitor


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--block", type=int, default=50, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=10, help="blocks of interleaved step pairs")
    p.add_argument("--chunk", type=int, default=5, help="steps per turn")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget", type=float, default=0.02)
    p.add_argument("--snapshot-repeats", type=int, default=5)
    p.add_argument("--snapshot-preset", default="d512", choices=sorted(PRESETS),
                   help="also time one snapshot of this (larger) preset")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 keeps a shared 2-core machine stable)")
    p.add_argument("--quick", action="store_true", help="tiny model, few steps: seconds")
    p.add_argument("--json", metavar="PATH", help="write results as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.batch, args.seq = "tiny", 4, 32
        args.every, args.block, args.rounds, args.warmup, args.chunk = 5, 10, 2, 1, 5
        args.snapshot_repeats, args.snapshot_preset = 2, "tiny"
    if args.block % args.every:
        p.error(f"--block ({args.block}) must be a multiple of --every ({args.every})")
    return args


def _setup(cfg, seed: int):
    torch.manual_seed(seed)
    model = Llama(cfg)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)


def _train_step(model, opt, x) -> float:
    """Wall time (s) of one training step."""
    t0 = time.perf_counter()
    loss = model.loss(x[:, :-1], x[:, 1:])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def _run_block(model, opt, batches) -> float:
    """Mean wall time per optimizer step (s) over the batches."""
    return sum(_train_step(model, opt, x) for x in batches) / len(batches)


def _time_snapshot(model, repeats: int, log_dir: str | None) -> float:
    mon = SpectralMonitor(model, log_dir=log_dir, budget=None, alarms=())
    mon.snapshot(0)  # first call also writes the custom-scalar layout
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        mon.snapshot(i + 1)
        times.append(time.perf_counter() - t0)
    mon.close()
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    print(machine.describe(), flush=True)
    cfg = replace(PRESETS[args.preset], max_seq_len=max(args.seq, 8))
    plain, plain_opt = _setup(cfg, 0)
    watched, watched_opt = _setup(cfg, 0)
    gen = torch.Generator().manual_seed(1)
    n_batches = args.warmup + args.rounds * args.block
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen)
               for _ in range(n_batches)]
    with tempfile.TemporaryDirectory() as tmp:
        monitor = SpectralMonitor(watched, log_dir=tmp, every=args.every, budget=args.budget)
        monitor.attach(watched_opt)
        _run_block(plain, plain_opt, batches[: args.warmup])
        _run_block(watched, watched_opt, batches[: args.warmup])
        own_at_start = monitor.own_time_s
        plain_t, watched_t, ratios = [], [], []
        for r in range(args.rounds):
            chunk = batches[args.warmup + r * args.block: args.warmup + (r + 1) * args.block]
            a = b = 0.0
            for i in range(0, len(chunk), args.chunk):
                part = chunk[i: i + args.chunk]
                # Take turns chunk by chunk, alternating which variant goes first.
                if (i // args.chunk) % 2 == 0:
                    a += sum(_train_step(plain, plain_opt, x) for x in part)
                    b += sum(_train_step(watched, watched_opt, x) for x in part)
                else:
                    b += sum(_train_step(watched, watched_opt, x) for x in part)
                    a += sum(_train_step(plain, plain_opt, x) for x in part)
            plain_t.append(a / len(chunk))
            watched_t.append(b / len(chunk))
            ratios.append(b / a)
        own = monitor.own_time_s - own_at_start
        own_fraction = own / (sum(watched_t) * args.block - own)
        cadence = monitor.current_every
        signal_every = monitor.current_signal_every
        est = monitor._cadence.overhead()
        snap_in_run = monitor._cadence.snapshot_ms
        monitor.close()
        identical = all(torch.equal(p, q) for p, q in
                        zip(plain.parameters(), watched.parameters(), strict=True))
        snap_tb = _time_snapshot(watched, args.snapshot_repeats, tmp + "/snap")
    snap_none = _time_snapshot(watched, args.snapshot_repeats, None)
    big_cfg = PRESETS[args.snapshot_preset]
    big, _ = _setup(big_cfg, 2)
    snap_big = _time_snapshot(big, max(1, args.snapshot_repeats // 2), None)
    n_mats = len(SpectralMonitor(watched, alarms=()).layers)
    n_big = len(SpectralMonitor(big, alarms=()).layers)

    overhead = statistics.median(ratios) - 1
    res = {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "device": "cpu", "machine": machine.describe(), "torch": torch.__version__,
        "threads": args.threads,
        "matrices": n_mats,
        "step_ms_plain_median": statistics.median(plain_t) * 1e3,
        "step_ms_monitored_median": statistics.median(watched_t) * 1e3,
        "overhead_median_paired": overhead,
        "overhead_ratio_of_medians": statistics.median(watched_t) / statistics.median(plain_t) - 1,
        "ratios": ratios,
        "monitor_every_final": cadence, "monitor_signal_every_final": signal_every,
        "monitor_own_overhead_estimate": est,
        "monitor_own_time_fraction": own_fraction,
        "snapshot_ms_in_run": snap_in_run,
        "snapshot_ms_tensorboard": snap_tb * 1e3,
        "snapshot_ms_no_sink": snap_none * 1e3,
        f"snapshot_ms_{args.snapshot_preset}_no_sink": snap_big * 1e3,
        f"matrices_{args.snapshot_preset}": n_big,
        "bit_identical_weights": identical,
        "target_overhead": 0.02,
    }
    rows = [
        ("model", f"{args.preset} ({n_mats} matrices), batch {args.batch}x{args.seq}, "
                  f"{args.threads} thread(s)"),
        ("step time, plain (median of blocks)", f"{res['step_ms_plain_median']:.2f} ms"),
        ("step time, monitored (median)", f"{res['step_ms_monitored_median']:.2f} ms"),
        ("amortized overhead (median of blocks)", f"{overhead * 100:+.2f} %  (target <= 2 %)"),
        ("paired ratios per block", " ".join(f"{r:.3f}" for r in ratios)),
        ("monitor cadence at end (every/signal)", f"{cadence} / {signal_every} "
                                                  f"(asked {args.every} / 1)"),
        ("monitor's own time / rest of step", f"{own_fraction * 100:.2f} %  (its running "
         f"estimate: {'n/a' if est is None else f'{est * 100:.2f} %'})"),
        ("one snapshot, TensorBoard sink", f"{res['snapshot_ms_tensorboard']:.1f} ms"),
        ("one snapshot, no sink (compute only)", f"{res['snapshot_ms_no_sink']:.1f} ms"),
        (f"one snapshot, {args.snapshot_preset} ({n_big} matrices)", f"{snap_big * 1e3:.1f} ms"),
        ("weights bit-identical with/without", str(identical)),
    ]
    if args.quick:
        rows.append(("note", "--quick: 20 tiny steps, the budget control has not settled; "
                             "overhead figures are a smoke test, not a measurement"))
    width = max(len(k) for k, _ in rows)
    print(f"SpectralMonitor overhead (side by side, interleaved every {args.chunk} steps)")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
