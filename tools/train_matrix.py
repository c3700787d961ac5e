"""Measure the default ``specopt train``: wall time and final validation bits/byte for
Muon and AdamW, each with and without the PC layer (the README table).

Each configuration is one ``python -m specopt train --optimizer O --[no-]pc`` process
with every other option at its default, so the wall time includes interpreter start-up,
corpus loading, the spectral monitor, evaluation and checkpoints: what a user waits for.
Runs are sequential (this is not a ratio benchmark: runs are not interleaved); the
1-minute load average before and after each run is recorded because the machine is shared.

    python tools/train_matrix.py --json docs/data/train_matrix.json
    python tools/train_matrix.py --quick            # 5 steps each, a smoke test
    python tools/train_matrix.py --only adamw --extra "--steps 100 --lr 0.01"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

__all__ = ["CONFIGS", "main", "run_config"]

#: (name, CLI flags) of the four measured configurations.
CONFIGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("muon", ("--optimizer", "muon", "--no-pc")),
    ("muon+pc", ("--optimizer", "muon", "--pc")),
    ("adamw", ("--optimizer", "adamw", "--no-pc")),
    ("adamw+pc", ("--optimizer", "adamw", "--pc")),
)
QUICK = ("--steps", "5", "--preset", "tiny", "--batch-size", "4", "--seq-len", "32",
         "--eval-every", "0", "--ckpt-every", "0")


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def run_config(name: str, flags: list[str], log_dir: Path, timeout: float) -> dict:
    """Run one configuration; returns its wall time, final val bits/byte and settings."""
    from specopt.cli._events import read_run

    cmd = [sys.executable, "-m", "specopt", "train", *flags, "--log-dir", str(log_dir),
           "--no-progress"]
    load_before = _load()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    row = {"name": name, "command": shlex.join(["specopt", *cmd[3:]]), "wall_s": wall,
           "returncode": proc.returncode, "load_before": load_before, "load_after": _load()}
    if proc.returncode != 0:
        row["error"] = proc.stderr.strip()[-500:]
        return row
    run = read_run(log_dir)
    steps, bpb = run.series("val/bpb")
    _, loss = run.series("train/loss")
    row.update(final_val_bpb=float(bpb[-1]), steps=int(steps[-1]),
               final_train_loss=float(loss[-5:].mean()))
    for line in proc.stdout.splitlines():
        if line.startswith("specopt train "):
            row["header"] = line
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 tiny steps per config")
    parser.add_argument("--only", nargs="+", default=None, help="configs containing NAME")
    parser.add_argument("--extra", default="", help="extra `specopt train` flags (one string)")
    parser.add_argument("--runs-dir", default=None, help="keep the runs here (default: temp)")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)

    configs = [(n, f) for n, f in CONFIGS if not args.only or any(o in n for o in args.only)]
    extra = [*(QUICK if args.quick else ()), *shlex.split(args.extra)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.runs_dir) if args.runs_dir else Path(tmp)
        for name, flags in configs:
            row = run_config(name, [*flags, *extra], root / name.replace("+", "-"), args.timeout)
            rows.append(row)
            print(f"{name:9s} wall {row['wall_s']:6.1f} s  val {row.get('final_val_bpb', 'n/a')}"
                  f"  load {row['load_before']:.1f}->{row['load_after']:.1f}", flush=True)
    print()
    print("| config | wall time (s) | final val bits/byte | load avg (before/after) |")
    print("|---|---:|---:|---:|")
    for r in rows:
        bpb = f"{r['final_val_bpb']:.3f}" if "final_val_bpb" in r else f"failed ({r['returncode']})"
        print(f"| {r['name']} | {r['wall_s']:.0f} | {bpb} | "
              f"{r['load_before']:.1f} / {r['load_after']:.1f} |")
    if args.json:
        import platform

        import torch

        out = {"rows": rows, "extra_flags": extra, "machine": {
            "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
        }}
        from specopt.checkpoint import atomic_write

        atomic_write(args.json, lambda f: f.write(json.dumps(out, indent=2).encode()))
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
