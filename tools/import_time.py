"""What ``import specopt`` costs on top of ``import torch`` (target: < 0.3 s).

Each repeat is a fresh interpreter that times ``import torch`` and then ``import specopt``
with ``time.perf_counter``; the script prints the medians (and min/max) per source tree,
the trees interleaved repeat by repeat so machine load hits them alike, and the modules
with the largest cumulative ``-X importtime`` under ``import specopt`` for the first tree.

    python tools/import_time.py                      # this checkout, 9 repeats
    python tools/import_time.py --tree . --tree /tmp/old-checkout --repeats 15

Prints the CPU kind, the fp32 matmul rate and the load average first (figures on a busy
machine are noisy: compare trees side by side, not against numbers from another day).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402  (tools/machine.py: CPU kind and matmul peak)

_PROBE = """
import json, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import specopt
t2 = time.perf_counter()
print(json.dumps({"torch_s": t1 - t0, "specopt_s": t2 - t1, "file": specopt.__file__}))
"""


def _env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                     else "")
    return env


def measure(tree: Path) -> dict[str, float | str]:
    """One fresh interpreter: seconds for ``import torch`` and then ``import specopt``."""
    # cwd=tree: ``python -c`` puts the working directory first on sys.path.
    out = subprocess.run([sys.executable, "-c", _PROBE], env=_env(tree), cwd=tree,
                         capture_output=True, text=True, check=True, timeout=300)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not Path(result["file"]).is_relative_to(tree):
        raise RuntimeError(f"imported specopt from {result['file']}, not from {tree}")
    return result


def top_imports(tree: Path, n: int = 12) -> list[tuple[float, str]]:
    """``(cumulative seconds, module)`` of the slowest imports under ``import specopt``."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import torch; import specopt"],
        env=_env(tree), cwd=tree, capture_output=True, text=True, check=True, timeout=300,
    )
    rows: list[tuple[int, str]] = []
    inside = False
    # importtime prints children before their parent; the specopt block ends with the
    # line of the top-level "specopt" import itself.
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (part.strip() for part in line[len("import time:"):].split("|"))
        if not cumulative.isdigit():
            continue
        depth = len(line.split("|")[2]) - len(line.split("|")[2].lstrip())
        if name == "torch" and depth == 1:
            inside = True  # everything after torch's own line belongs to specopt
            continue
        if inside:
            rows.append((int(cumulative), name))
    rows.sort(reverse=True)
    return [(us / 1e6, name) for us, name in rows[:n]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", type=Path,
                    help="source tree to import specopt from (repeatable; default: this one)")
    ap.add_argument("--repeats", type=int, default=9, help="fresh interpreters per tree")
    ap.add_argument("--json", type=Path, help="also write the raw figures here")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    trees = [t.resolve() for t in (args.tree or [ROOT])]
    for t in trees:
        if not (t / "specopt" / "__init__.py").is_file():
            ap.error(f"--tree {t}: no specopt/__init__.py there")

    print(machine.describe())
    runs: dict[Path, list[dict]] = {t: [] for t in trees}
    for _ in range(args.repeats):
        for t in trees:  # interleaved
            runs[t].append(measure(t))
    print(f"\n{'tree':<40} {'import torch':>13} {'specopt over torch':>19} {'(min..max)':>14}")
    summary = {}
    for t, rs in runs.items():
        torch_s = statistics.median(r["torch_s"] for r in rs)
        spec = [r["specopt_s"] for r in rs]
        med = statistics.median(spec)
        summary[str(t)] = {"torch_s": torch_s, "specopt_s": med, "runs": rs}
        print(f"{str(t)[-40:]:<40} {torch_s:>12.3f}s {med:>18.3f}s "
              f"{min(spec):>6.3f}..{max(spec):.3f}")
    print(f"\nslowest imports under `import specopt` ({trees[0]}; cumulative, one run):")
    for s, name in top_imports(trees[0]):
        print(f"  {s:7.3f} s  {name}")
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
