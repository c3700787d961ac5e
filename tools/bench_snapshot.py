"""Benchmark: one full ``SpectralMonitor`` snapshot vs ``weightwatcher.analyze()``, side by side.

Same model for both: a 4-layer Llama (byte vocabulary, ``dim`` d, FFN 4d, ``d / 64``
heads) at d = 256, 512, 1024. Repeats are interleaved (snapshot, analyze, snapshot, ...)
so machine load hits both alike; each row reports medians. The snapshot is the monitor's
whole work at a snapshot step: singular values of every matrix (float64 Gram
eigenvalues, batched by shape), all metrics, both histograms per layer and the write to a
TensorBoard event file. WeightWatcher's ``analyze()`` (default options) computes every
layer's eigenvalues and fits its power laws (its import is not timed). numpy / scipy run
with the same
thread count as torch (``threadpoolctl``).

A steady-state snapshot (``steady_snapshot_s``: after an optimizer step, so it also
computes every matrix's update ratio, the spectral norm of the step's delta) is timed
too; it is what training pays at each snapshot after the first.

Accuracy: every singular value of the snapshot is compared with numpy's float64 SVD of
the same matrix (``max_rel_err``: max over all values of ``|s - s_ref| / s_ref``).

Target (issue 12): speedup >= 3 at every size, max_rel_err <= 1e-6.

    python tools/bench_snapshot.py                    # d = 256, 512, 1024
    python tools/bench_snapshot.py --quick            # seconds; used by the tests
    python tools/bench_snapshot.py --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # (tools/machine.py: CPU kind and matmul peak)

from specopt.models import Llama, LlamaConfig
from specopt.spectral import SpectralMonitor


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 keeps a shared 2-core machine stable)")
    p.add_argument("--quick", action="store_true", help="d = 64, 128, one repeat: seconds")
    p.add_argument("--json", metavar="PATH", help="write results as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.dims, args.layers, args.repeats = [64, 128], 2, 1
    return args


def _model(dim: int, layers: int) -> Llama:
    torch.manual_seed(0)
    cfg = LlamaConfig(dim=dim, n_layers=layers, n_heads=max(1, dim // 64), ffn_hidden=4 * dim,
                      max_seq_len=128)
    return Llama(cfg).eval()


def _time_snapshot(model: Llama, log_dir: str) -> tuple[float, dict[str, np.ndarray]]:
    mon = SpectralMonitor(model, log_dir=log_dir, every=1, budget=None, alarms=())
    t0 = time.perf_counter()
    snap = mon.snapshot(1)
    mon.flush()
    elapsed = time.perf_counter() - t0
    mon.close()
    return elapsed, snap.spectra


def _time_steady_snapshot(model: Llama, log_dir: str) -> float:
    """A snapshot as training pays it after the first: it also computes each matrix's
    update ratio ``||dW||_2 / ||W||_2`` (the norm of one optimizer step's delta). Runs on
    a copy: ``model`` is untouched."""
    import copy

    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(twin.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    for p in twin.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    mon = SpectralMonitor(twin, log_dir=log_dir, every=2, budget=None, alarms=(),
                          signal_every=0)
    assert mon.step(1) is None  # not a snapshot step: copies W for step 2's update ratio
    opt.step()
    t0 = time.perf_counter()
    snap = mon.step(2)
    mon.flush()
    elapsed = time.perf_counter() - t0
    assert snap is not None and len(snap.update_ratio) == len(snap.spectra), "no update ratio"
    mon.close()
    return elapsed


def _time_weightwatcher(model: Llama) -> float:
    import weightwatcher  # imported before the first timing (main)

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        weightwatcher.WeightWatcher(model=model).analyze()
    return time.perf_counter() - t0


def _max_rel_err(model: Llama, spectra: dict[str, np.ndarray]) -> float:
    worst = 0.0
    modules = dict(model.named_modules())
    for key, sigma in spectra.items():
        w = modules[key].weight.detach().double().numpy()
        ref = np.linalg.svd(w, compute_uv=False)
        worst = max(worst, float(np.max(np.abs(sigma - ref) / ref)))
    return worst


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    print(machine.describe(), flush=True)
    print(f"torch threads: {args.threads}")
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            import weightwatcher  # noqa: F401  (its ~5 s import is not analyze() time)
    except ImportError as exc:  # the peer is optional: `pip install -e ".[bench]"`
        raise SystemExit(f"bench_snapshot: the peer is missing ({exc}); install it with "
                         "pip install weightwatcher (or the [bench] extra)") from exc
    from threadpoolctl import threadpool_limits

    # numpy / scipy (WeightWatcher's SVD) get the same thread count as torch.
    with threadpool_limits(limits=args.threads):
        rows = _rows(args)
    result = {"machine": machine.describe(), "threads": args.threads,
              "repeats": args.repeats, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def _rows(args: argparse.Namespace) -> list[dict]:
    rows = []
    for dim in args.dims:
        model = _model(dim, args.layers)
        snap_s, ww_s, steady_s = [], [], []
        spectra: dict[str, np.ndarray] = {}
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                t, spectra = _time_snapshot(model, tmp)
            snap_s.append(t)
            ww_s.append(_time_weightwatcher(model))
            with tempfile.TemporaryDirectory() as tmp:
                steady_s.append(_time_steady_snapshot(model, tmp))
        row = {"dim": dim, "layers": args.layers, "matrices": len(spectra),
               "snapshot_s": statistics.median(snap_s),
               "weightwatcher_s": statistics.median(ww_s),
               "steady_snapshot_s": statistics.median(steady_s),
               "max_rel_err": _max_rel_err(model, spectra)}
        row["speedup"] = row["weightwatcher_s"] / row["snapshot_s"]
        rows.append(row)
        print(f"d={dim:5d} ({row['matrices']} matrices): snapshot {row['snapshot_s']:.3f} s, "
              f"weightwatcher {row['weightwatcher_s']:.3f} s, speedup x{row['speedup']:.2f}, "
              f"max rel err {row['max_rel_err']:.2e}; with update ratio "
              f"{row['steady_snapshot_s']:.3f} s "
              f"({row['steady_snapshot_s'] / row['snapshot_s']:.2f}x the first)", flush=True)
    return rows


if __name__ == "__main__":
    main()
