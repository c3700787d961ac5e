"""Singular-value metrics: the one place specopt turns spectra into numbers.

Used by :class:`specopt.SpectralMonitor` and by the ``inspect`` / ``diagnose`` / ``compare``
commands. Everything here is a pure function of tensors.

Metrics of one matrix ``W`` of shape ``(m, n)`` (``m = fan_out``, ``n = fan_in`` as in
``nn.Linear``) with singular values ``sigma_1 >= ... >= sigma_r``, ``r = min(m, n)``.
Names are stable (they appear in TensorBoard tags ``spectral/<metric>/<layer>``):

=====================  ===========================================================
``sigma_max``          ``sigma_1`` (spectral norm, units of W)
``sigma_min``          ``sigma_r``
``condition_number``   ``sigma_1 / sigma_r``; ``inf`` when ``sigma_r == 0``
``gmcn``               ``sigma_1 / mean(sigma_{r-k+1..r})``, ``k = ceil(0.1 r)``: the
                       "modified condition number" of the PC-layer paper, robust to a
                       single tiny singular value; ``inf`` when that mean is 0
``stable_rank``        ``||W||_F^2 / sigma_1^2 = sum(sigma^2) / sigma_1^2`` in ``[1, r]``
``effective_rank``     ``exp(H)``, ``H = -sum p_i ln p_i``, ``p_i = sigma_i / sum(sigma)``
                       (Roy & Vetterli 2007), in ``[1, r]``
``spectral_entropy``   ``H / ln r`` in ``[0, 1]`` (1: flat spectrum); 0 when ``r == 1``
``rms_to_rms``         ``sqrt(n / m) * sigma_1``: the RMS->RMS operator norm of the
                       modular-norm view (about 1 means "well scaled"); only when the
                       matrix shape is passed
=====================  ===========================================================

Conventions for degenerate input (reported, never raised):

- zero matrix: ``sigma_max = 0``, ``condition_number = gmcn = inf``,
  ``stable_rank = effective_rank = spectral_entropy = 0``;
- a matrix with NaN/Inf entries: :func:`singular_values` returns an all-NaN spectrum
  (``torch.linalg.svdvals`` raises on such input), so every metric is NaN. Callers that
  need to tell "diverged" from "fine" test ``isfinite`` on the spectrum.

WeightWatcher uses other conventions (its "spectral_norm" is ``sigma_1^2``, its stable
rank is ``sum(lambda) / lambda_max`` with ``lambda = sigma^2``): ours are on ``sigma``.

Model-level aggregates (:func:`model_aggregates`) are geometric means over matrices, as
the PC-layer paper aggregates GMCN.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "METRIC_NAMES",
    "geometric_mean",
    "matrix_metrics",
    "model_aggregates",
    "singular_values",
    "spectra_float64",
    "spectrum_metrics",
]

#: Metric names in the order :func:`spectrum_metrics` returns them.
METRIC_NAMES: tuple[str, ...] = (
    "sigma_max",
    "sigma_min",
    "condition_number",
    "gmcn",
    "stable_rank",
    "effective_rank",
    "spectral_entropy",
    "rms_to_rms",
)

#: Fraction of the smallest singular values GMCN averages (PC-layer paper: 10%).
GMCN_FRACTION = 0.1


def _ratio_or_inf(num: Tensor, den: Tensor) -> Tensor:
    # x / 0 -> inf (a singular matrix has an infinite condition number), also for a zero
    # numerator, where plain division would give NaN; NaN input stays NaN.
    inf = torch.full_like(num, math.inf)
    out = torch.where(den > 0, num / torch.where(den > 0, den, 1), inf)
    return torch.where(torch.isnan(num) | torch.isnan(den), num + den, out)


def spectrum_metrics(
    sigma: Tensor, *, shape: tuple[int, int] | None = None
) -> dict[str, Tensor]:
    """All metrics of a spectrum (see the module docstring for formulas).

    Args:
        sigma: singular values ``(..., r)``, non-negative, any order (sorted here);
            leading dims are a batch of matrices. Floating dtype (fp32/fp64).
        shape: ``(m, n)`` of the matrices (``fan_out, fan_in``); needed only for
            ``rms_to_rms``, which is omitted when ``shape`` is None.

    Returns:
        ``{name: tensor of shape sigma.shape[:-1]}`` for each name of
        :data:`METRIC_NAMES` (``rms_to_rms`` only with ``shape``), in ``sigma``'s dtype.
    """
    if sigma.ndim < 1 or sigma.shape[-1] == 0:
        raise ValueError(f"sigma must have shape (..., r) with r >= 1, got {tuple(sigma.shape)}")
    if not sigma.is_floating_point():
        raise TypeError(f"sigma must be a floating tensor, got {sigma.dtype}")
    r = sigma.shape[-1]
    s = sigma.sort(dim=-1, descending=True).values
    s1, sr = s[..., 0], s[..., -1]
    k = max(1, math.ceil(GMCN_FRACTION * r))
    total = s.sum(dim=-1)
    nonzero = total > 0
    safe_total = torch.where(nonzero, total, 1)
    p = s / safe_total.unsqueeze(-1)
    # 0 * ln 0 = 0 by continuity.
    plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1)), 0)
    entropy = -plogp.sum(dim=-1)
    zero = torch.zeros_like(s1)
    out = {
        "sigma_max": s1,
        "sigma_min": sr,
        "condition_number": _ratio_or_inf(s1, sr),
        "gmcn": _ratio_or_inf(s1, s[..., r - k :].mean(dim=-1)),
        "stable_rank": torch.where(nonzero, (s * s).sum(dim=-1) / torch.where(nonzero, s1, 1) ** 2,
                                   zero),
        "effective_rank": torch.where(nonzero, torch.exp(entropy), zero),
        "spectral_entropy": (
            torch.where(nonzero, entropy / math.log(r), zero) if r > 1 else zero.clone()
        ),
    }
    # NaN spectra (non-finite weights) must read as NaN everywhere, not as "zero matrix".
    bad = torch.isnan(s).any(dim=-1)
    if bool(bad.any()):
        out = {key: torch.where(bad, math.nan, val) for key, val in out.items()}
    if shape is not None:
        m, n = shape
        if m <= 0 or n <= 0:
            raise ValueError(f"shape must be positive (m, n), got {shape}")
        out["rms_to_rms"] = math.sqrt(n / m) * out["sigma_max"]
    return out


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return dtype


def _as_matrix(w: Tensor) -> Tensor:
    # Conv kernels (out, in, *k) are read as the (out, in * prod(k)) matrix they apply.
    return w if w.ndim == 2 else w.reshape(w.shape[0], -1)


#: Float64 working set of one batched spectrum call, in bytes (matrices plus Gram
#: matrices): bounds a snapshot's memory whatever the model size.
CHUNK_BYTES = 64 * 2**20
#: The Gram route loses relative accuracy in sigma_i as ``eps64 * (sigma_1 / sigma_i)^2``
#: (measured: about half that bound on random 256-1024 matrices); matrices whose condition
#: number exceeds this are recomputed with float64 svdvals, so every singular value stays
#: within ``eps64 * 5e4^2 = 5.5e-7`` relative of a float64 SVD. Not lower: random square
#: matrices (attention ``wo`` at init) sit at 1e4-5e4, and at 1e4 their svdvals fallback
#: was a fifth of a d=512 snapshot.
GRAM_MAX_CONDITION = 5e4


@torch.no_grad()
def singular_values(
    weights: Sequence[Tensor] | Tensor, *, dtype: torch.dtype = torch.float32
) -> list[Tensor]:
    """Singular values (descending) of each matrix, batched by shape, on its device.

    Computed in float64 on the cheaper Gram side: ``sigma = sqrt(eigvalsh(W W^T))`` with
    ``W W^T`` of size ``min(m, n)`` (3-4x faster than ``svdvals`` on CPU); matrices with
    a condition number above :data:`GRAM_MAX_CONDITION` (where the Gram route loses
    precision) fall back to float64 ``svdvals``. Same-shaped matrices on the same device
    go through one batched call per chunk of :data:`CHUNK_BYTES` (one device sync each).
    Weights with more than 2 dims are flattened to ``(shape[0], -1)``.

    Args:
        weights: a list of tensors ``(m, n)`` (or conv kernels), or one tensor
            ``(..., m, n)`` whose leading dims are a batch. Never modified.
        dtype: dtype of the result, ``torch.float32`` or ``torch.float64`` (the
            computation is float64 either way).

    Returns:
        One tensor per input matrix, shape ``(min(m, n),)`` (or ``(..., min(m, n))`` for
        a batched tensor input), on the weight's device, in ``dtype``. A matrix with any
        NaN/Inf entry gets an all-NaN spectrum instead of an exception.
    """
    dtype = _compute_dtype(dtype)
    if isinstance(weights, Tensor):
        if weights.ndim < 2:
            raise ValueError(f"weights must have shape (..., m, n), got {tuple(weights.shape)}")
        flat = weights.reshape(-1, *weights.shape[-2:])
        sig = singular_values(list(flat.unbind(0)), dtype=dtype)
        r = min(weights.shape[-2:])
        if not sig:
            return [torch.empty(*weights.shape[:-2], r, dtype=dtype, device=weights.device)]
        return [torch.stack(sig).reshape(*weights.shape[:-2], r)]
    mats = []
    for i, w in enumerate(weights):
        if not isinstance(w, Tensor) or w.ndim < 2 or w.numel() == 0:
            desc = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
            raise ValueError(f"weights[{i}] must be a non-empty matrix, got {desc}")
        mats.append(_as_matrix(w.detach()))
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(mats):
        groups.setdefault((tuple(w.shape), w.device), []).append(i)
    out: list[Tensor | None] = [None] * len(mats)
    for ((m, n), _), idx in groups.items():
        per_matrix = 8 * (m * n + min(m, n) ** 2)  # float64 matrix + its Gram matrix
        size = max(1, CHUNK_BYTES // per_matrix)
        for c in range(0, len(idx), size):
            chunk = idx[c : c + size]
            batch = torch.empty(len(chunk), m, n, dtype=torch.float64, device=mats[chunk[0]].device)
            for j, i in enumerate(chunk):  # copy in place: no second float64 copy per chunk
                batch[j].copy_(mats[i])
            sig = spectra_float64(batch).to(dtype)
            for j, i in enumerate(chunk):
                out[i] = sig[j]
    return out  # type: ignore[return-value]


def spectra_float64(batch: Tensor) -> Tensor:
    """Singular values ``(B, r)`` (descending) of a float64 batch ``(B, m, n)``.

    Gram eigenvalues with the svdvals fallback of :func:`singular_values`; NaN rows for
    matrices with NaN/Inf entries (``svdvals`` and ``eigvalsh`` would raise). On CPU the
    Gram matrix is one BLAS ``dsyrk`` (half a matmul: one triangle) and its eigenvalues
    LAPACK's ``dsyevr`` through scipy, 2-3x faster than ``matmul`` + ``eigvalsh`` at
    1024 x 4096 on one thread; other devices use torch's batched kernels.
    """
    # A float64 copy of fp32 / bf16 weights cannot overflow: only a NaN/Inf entry makes a
    # matrix's spectrum undefined (NaN row). Every other matrix gets values: a failed
    # eigensolve (LAPACK non-convergence, NaN eigenvalues) goes through svdvals below.
    finite = torch.isfinite(batch).all(dim=(-2, -1))  # (B,)
    if batch.device.type == "cpu":
        with _blas_threads_like_torch():
            lam = torch.from_numpy(np.stack([_gram_eigvals_cpu(w) for w in batch.numpy()]))
    else:
        gram = batch @ batch.mT if batch.shape[-2] <= batch.shape[-1] else batch.mT @ batch
        try:
            lam = torch.linalg.eigvalsh(torch.where(finite[:, None, None], gram, 0))
        except RuntimeError:  # LAPACK non-convergence: every matrix goes through svdvals
            lam = torch.full(gram.shape[:-1], math.nan, dtype=gram.dtype, device=gram.device)
    sig = lam.clamp_min(0).sqrt().flip(-1)
    # svdvals for failed eigensolves and for ill-conditioned (incl. singular) matrices,
    # where the Gram route is too coarse for sigma_min.
    failed = torch.isnan(sig).any(-1)
    exact = finite & (failed | (sig[:, 0] > GRAM_MAX_CONDITION * sig[:, -1]))
    for j in exact.nonzero().flatten().tolist():
        try:
            sig[j] = torch.linalg.svdvals(batch[j])
        except RuntimeError:  # still failing: reported as NaN
            sig[j] = math.nan
    sig[~finite] = math.nan
    return sig


_BLAS_CONTROLLER: Any = None


def _blas_threads_like_torch() -> contextlib.AbstractContextManager[Any]:
    """Limit scipy's / numpy's own OpenBLAS to ``torch.get_num_threads()`` threads.

    They ship their own BLAS, which starts one thread per core whatever torch was told:
    with the cores busy (other ranks, data loaders, a shared box) its threads spin on
    barriers and a 64 x 64 ``dsyevr`` took 8 ms instead of 0.23 ms (measured at load 5 on
    2 cores), so a tiny model's snapshot cost 20x its work. Without threadpoolctl the
    libraries keep their own setting.
    """
    global _BLAS_CONTROLLER
    try:
        if _BLAS_CONTROLLER is None:
            import scipy.linalg  # noqa: F401  (loads scipy's BLAS so the scan finds it)
            from threadpoolctl import ThreadpoolController

            _BLAS_CONTROLLER = ThreadpoolController()  # scans loaded libraries once (~5 ms)
        return _BLAS_CONTROLLER.limit(limits=torch.get_num_threads(), user_api="blas")
    except ImportError:
        return contextlib.nullcontext()


def _gram_eigvals_cpu(w: np.ndarray) -> np.ndarray:
    """Ascending eigenvalues of ``w w^T`` (or ``w^T w``, the smaller) of a float64 matrix;
    all NaN when the Gram matrix is not finite or LAPACK fails (the caller then falls back
    to svdvals for finite matrices)."""
    from scipy.linalg import LinAlgError, eigh
    from scipy.linalg.blas import dsyrk

    m, n = w.shape
    # w.T is Fortran-ordered (no copy): trans=1 gives w w^T, trans=0 gives w^T w.
    gram = dsyrk(1.0, w.T, trans=int(m <= n))  # upper triangle
    r = min(m, n)
    if not np.isfinite(np.diagonal(gram)).all():
        return np.full(r, np.nan)
    try:
        return eigh(gram, lower=False, eigvals_only=True, driver="evr", check_finite=False)
    except (LinAlgError, ValueError):
        return np.full(r, np.nan)


def matrix_metrics(
    weights: Sequence[Tensor], *, dtype: torch.dtype = torch.float32
) -> list[dict[str, float]]:
    """Metrics of each matrix as Python floats: :func:`singular_values` then
    :func:`spectrum_metrics` with the matrix shape (so ``rms_to_rms`` is included)."""
    sigmas = singular_values(weights, dtype=dtype)
    result = []
    for w, sig in zip(weights, sigmas, strict=True):
        m = _as_matrix(w)
        vals = spectrum_metrics(sig, shape=(m.shape[0], m.shape[1]))
        result.append({k: float(v) for k, v in vals.items()})
    return result


def geometric_mean(values: Tensor) -> Tensor:
    """``exp(mean(log x))`` over the last dim, counting only finite positive entries.

    Infinite condition numbers (zero-initialised layers) and NaN (diverged layers) are
    excluded so one degenerate matrix does not hide the rest; count them separately.
    Returns NaN where no entry qualifies.
    """
    x = values.double()
    ok = torch.isfinite(x) & (x > 0)
    logs = torch.where(ok, torch.log(torch.where(ok, x, 1)), 0).sum(dim=-1)
    count = ok.sum(dim=-1)
    return torch.where(count > 0, torch.exp(logs / count.clamp_min(1)), math.nan)


def model_aggregates(per_matrix: Mapping[str, Tensor | Sequence[float]]) -> dict[str, float]:
    """Model-level aggregates from per-matrix metrics.

    Args:
        per_matrix: ``{metric name: values over matrices}`` (1-D tensor or list).

    Returns:
        ``{metric: geometric mean over matrices}`` (see :func:`geometric_mean`) for each
        metric given, plus ``condition_number_max`` (max over matrices, may be inf) and
        ``nonfinite_matrices`` (how many have NaN metrics) when ``condition_number`` is
        given.
    """
    out: dict[str, float] = {}
    for name, vals in per_matrix.items():
        t = torch.as_tensor(vals, dtype=torch.float64).reshape(-1)
        if t.numel() == 0:
            continue
        out[name] = float(geometric_mean(t))
        if name == "condition_number":
            finite_or_inf = t[~torch.isnan(t)]
            out["condition_number_max"] = (
                float(finite_or_inf.max()) if finite_or_inf.numel() else math.nan
            )
            out["nonfinite_matrices"] = float(torch.isnan(t).sum())
    return out
