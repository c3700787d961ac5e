"""What machine a benchmark ran on: the CPU kind and its measured matmul peak.

Every benchmark in ``tools/`` prints :func:`describe` first, so a figure is never read
without the hardware it came from. On CPUs, bf16 matmul is native only with AVX512-BF16
(or AMX); elsewhere torch emulates it (~30x slower than fp32), so a bf16 figure from such
a CPU says nothing about GPUs or native-bf16 CPUs. Achieved GFLOP/s as a share of
:func:`matmul_peak_gflops` of the same machine is the figure that carries across kinds.

Scripts in ``tools/`` are run by path; they import this module with
``sys.path.insert(0, str(Path(__file__).parent))`` (tools/ is not a package).
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

__all__ = ["bf16_native", "cpu_kind", "cpu_model", "describe", "matmul_peak_gflops", "sync"]


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bf16_native(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 matmul runs on hardware (CUDA, or a CPU with AVX512-BF16 or AMX), not
    emulated: the rule specopt.Muon picks its Newton-Schulz dtype by."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    from specopt.optim.muon import default_ns_dtype

    return default_ns_dtype(device) == torch.bfloat16


def cpu_kind() -> str:
    """``"AVX512-BF16"`` (native bf16 matmul) or ``"AVX2"`` (bf16 emulated), plus the model."""
    kind = "AVX512-BF16 (native bf16 matmul)" if bf16_native() else "AVX2 (bf16 matmul emulated)"
    return f"{kind}; {cpu_model()}"


def sync(device: torch.device | str) -> None:
    """Wait for ``device``'s queued work (CUDA kernels run asynchronously); no-op on CPU.
    Every benchmark timer in ``tools/`` brackets its clock reads with it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_gflops(dtype: torch.dtype = torch.float32, n: int | None = None,
                       repeats: int | None = None, device: torch.device | str = "cpu") -> float:
    """Measured square-matmul rate (GFLOP/s, best of ``repeats``) at the current thread count.

    ``2 n^3`` FLOPs per ``n x n`` product; the best repeat approximates the peak this
    process can reach now (a loaded machine reads lower: measure it in the same run as the
    figure it is compared with). Defaults: ``n=1024``, 5 repeats; for emulated bf16
    (~30x slower) ``n=512``, 2 repeats, so the measurement stays short.
    """
    device = torch.device(device)
    emulated = dtype == torch.bfloat16 and not bf16_native(device)
    n = n or (512 if emulated else 1024)
    repeats = repeats or (2 if emulated else 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def describe(device: torch.device | str = "cpu") -> str:
    """One line: device kind, torch version, threads, measured fp32/bf16 matmul peaks, load."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        head = f"GPU: {name}"
    else:
        head = f"CPU: {cpu_kind()}; {torch.get_num_threads()} threads"
    fp32 = matmul_peak_gflops(torch.float32, device=device)
    bf16 = matmul_peak_gflops(torch.bfloat16, device=device)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{head}; torch {torch.__version__}; matmul peak fp32 {fp32:.0f} GFLOP/s, "
            f"bf16 {bf16:.0f} GFLOP/s ({'native' if bf16_native(device) else 'emulated'}); "
            f"load average {load}")


if __name__ == "__main__":
    print(describe())
