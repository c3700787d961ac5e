"""Distributed Muon: NS work split across 2 ranks vs every rank doing all NS work.

Side by side in one 2-process gloo job on 127.0.0.1 (one thread per rank), for the
matrices of a Llama-style transformer (per layer: wq, wk, wv, wo of d x d; w1, w3 of
ffn x d; w2 of d x ffn):

* ``ddp``:  replicated plain parameters (as under DDP, gradients already all-reduced).
  ``split``: ``specopt.Muon(..., distributed="ddp")``: each matrix's NS on one rank
  (balanced by FLOPs), results all-gathered. ``all``: ``distributed="off"``: every rank
  repeats every NS (what torch.optim.Muon does under DDP).
* ``fsdp``: parameters sharded on dim 0 (DTensor, FSDP2 layout).
  ``split``: default Muon: shards all_to_all'ed to one owner per matrix, NS there, result
  rows all_to_all'ed back. ``all``: ``distributed="off"``: every rank all-gathers every
  matrix and repeats every NS.

Step time is ``optimizer.step()`` between barriers (so the slower rank counts), variants
interleaved (split, all, split, all, ...), median over repeats. Bytes are payload bytes
this rank sent to / received from the other rank per step (``optimizer.comm_stats``).
The ratio is all / split (> 1: splitting is faster).

Usage::

    python tools/bench_distributed.py             # d=512, 4 layers (28 matrices)
    python tools/bench_distributed.py --quick     # seconds
    python tools/bench_distributed.py --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # tools/machine.py: CPU kind and matmul peak

from specopt.checkpoint import atomic_write

MODES = ("ddp", "fsdp")


def _shapes(d: int, layers: int, ffn: int) -> list[tuple[int, int]]:
    per_layer = [(d, d)] * 4 + [(ffn, d), (d, ffn), (ffn, d)]
    return per_layer * layers


def _params(shapes: list[tuple[int, int]], mode: str, world: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(s, generator=g) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    if mode == "ddp":
        params = [torch.nn.Parameter(w) for w in full]
        for p, gr in zip(params, grads, strict=True):
            p.grad = gr
        return params
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    params = [torch.nn.Parameter(distribute_tensor(w, mesh, [Shard(0)])) for w in full]
    for p, gr in zip(params, grads, strict=True):
        p.grad = distribute_tensor(gr, mesh, [Shard(0)])
    return params


def _muon(params: list[torch.nn.Parameter], mode: str, variant: str) -> torch.optim.Optimizer:
    from specopt import Muon

    if variant == "all":
        dist_mode = "off"
    else:
        dist_mode = "ddp" if mode == "ddp" else "auto"
    # lr=0 keeps the matrices (and so the work) identical across repeats.
    return Muon(params, lr=0.0, weight_decay=0.0, distributed=dist_mode)


def _timed_step(opt: torch.optim.Optimizer) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    opt.step()
    dist.barrier()
    return time.perf_counter() - t0


def _worker(rank: int, world: int, port: int, cfg: dict[str, Any], queue: Any) -> None:
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    try:
        shapes = _shapes(cfg["d"], cfg["layers"], cfg["ffn"])
        rows = []
        for mode in cfg["modes"]:
            opts = {v: _muon(_params(shapes, mode, world), mode, v) for v in ("split", "all")}
            for opt in opts.values():  # warm-up: allocate state, first-call costs
                _timed_step(opt)
            times: dict[str, list[float]] = {"split": [], "all": []}
            for _ in range(cfg["repeats"]):
                for v in ("split", "all"):
                    times[v].append(_timed_step(opts[v]))
            for v, opt in opts.items():
                stats = opt.comm_stats
                steps = max(stats.steps, 1)
                rows.append({
                    "mode": mode, "variant": v, "rank": rank,
                    "median_s": statistics.median(times[v]),
                    "times_s": times[v],
                    "bytes_sent_per_step": stats.bytes_sent / steps,
                    "bytes_received_per_step": stats.bytes_received / steps,
                    "matrices_on_rank_per_step": stats.matrices_local / steps,
                    "ns_gflop_per_rank": [f / 1e9 for f in stats.per_rank_flops],
                })
        queue.put(rows)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Launch the 2-rank job and collect a result dict (rows per mode, variant, rank)."""
    world = 2
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, cfg, queue)) for r in range(world)]
    for p in procs:
        p.start()
    rows: list[dict[str, Any]] = []
    try:
        for _ in range(world):
            rows.extend(queue.get(timeout=cfg["timeout"]))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    summary = []
    for mode in cfg["modes"]:
        def med(v: str, mode: str = mode) -> float:
            # The step ends at a barrier, so both ranks see about the same time: take max.
            return max(r["median_s"] for r in rows if r["mode"] == mode and r["variant"] == v)

        def bytes_(v: str, key: str, mode: str = mode) -> float:
            return max(r[key] for r in rows if r["mode"] == mode and r["variant"] == v)

        summary.append({
            "name": f"muon_step_{mode}",  # label for `specopt bench`
            "mode": mode,
            "split_ms": 1e3 * med("split"),
            "all_ms": 1e3 * med("all"),
            "ratio_all_over_split": med("all") / med("split"),
            "split_bytes_sent_per_step": bytes_("split", "bytes_sent_per_step"),
            "split_bytes_received_per_step": bytes_("split", "bytes_received_per_step"),
            "all_bytes_sent_per_step": bytes_("all", "bytes_sent_per_step"),
            "all_bytes_received_per_step": bytes_("all", "bytes_received_per_step"),
            "split_ns_gflop_per_rank": next(
                r["ns_gflop_per_rank"] for r in rows
                if r["mode"] == mode and r["variant"] == "split"
            ),
        })
    return {"config": cfg, "summary": summary, "rows": rows}


def _table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    n = len(_shapes(cfg["d"], cfg["layers"], cfg["ffn"]))
    header = ("mode", "split ms", "all ms", "all/split", "split MiB/step", "all MiB/step",
              "split GFLOP/rank")
    lines = [
        f"Muon step, 2 ranks (gloo, 1 thread each), {n} matrices: d={cfg['d']}, "
        f"ffn={cfg['ffn']}, {cfg['layers']} layers; median of {cfg['repeats']} interleaved steps",
        "MiB/step = payload bytes sent / received by one rank per step",
        "{:<6} {:>9} {:>9} {:>9} {:>15} {:>15} {:>17}".format(*header),
    ]
    mib = 1 / 2**20
    for s in result["summary"]:
        split_b = (f"{s['split_bytes_sent_per_step'] * mib:.2f}/"
                   f"{s['split_bytes_received_per_step'] * mib:.2f}")
        all_b = (f"{s['all_bytes_sent_per_step'] * mib:.2f}/"
                 f"{s['all_bytes_received_per_step'] * mib:.2f}")
        flops = "/".join(f"{g:.2f}" for g in s["split_ns_gflop_per_rank"])
        lines.append(
            f"{s['mode']:<6} {s['split_ms']:>9.1f} {s['all_ms']:>9.1f} "
            f"{s['ratio_all_over_split']:>9.2f} {split_b:>15} {all_b:>15} {flops:>17}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=None, help="model width (default 512; quick 128)")
    ap.add_argument("--ffn", type=int, default=None, help="FFN width (default 4*d)")
    ap.add_argument("--layers", type=int, default=None, help="default 4; quick 1")
    ap.add_argument("--repeats", type=int, default=None, help="default 7; quick 3")
    ap.add_argument("--modes", default="ddp,fsdp", help="comma list of ddp, fsdp")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, finishes in seconds")
    ap.add_argument("--json", default=None, metavar="PATH", help="write results as JSON")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds before giving up")
    args = ap.parse_args(argv)
    for name, full, quick in (("d", 512, 128), ("layers", 4, 1), ("repeats", 7, 3)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"--modes: unknown mode(s) {bad}; choose from {MODES}")
    cfg = {
        "d": args.d, "ffn": args.ffn or 4 * args.d, "layers": args.layers,
        "repeats": args.repeats, "modes": modes, "timeout": args.timeout,
        "torch": torch.__version__, "cpu_count": os.cpu_count(),
    }
    print(machine.describe(), flush=True)
    result = run(cfg)
    print(_table(result))
    if args.json:
        atomic_write(args.json, lambda f: f.write(json.dumps(result, indent=2).encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
