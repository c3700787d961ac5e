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
    "spectral_norms",
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


#: Float64 working set of one batched spectrum call on an accelerator, in bytes (matrices
#: plus Gram matrices): bounds a snapshot's memory whatever the model size. On CPU the
#: matrices go one at a time through one reused float64 buffer per shape.
CHUNK_BYTES = 64 * 2**20
#: The Gram route loses relative accuracy in sigma_i as ``eps64 * (sigma_1 / sigma_i)^2``
#: (measured: about half that bound on random 256-1024 matrices); matrices whose condition
#: number exceeds this are recomputed with a float64 SVD, so every singular value stays
#: within ``eps64 * 5e4^2 = 5.5e-7`` relative of a float64 SVD. Not lower: random square
#: matrices (attention ``wo`` at init) sit at 1e4-5e4, and at 1e4 their SVD fallback
#: was a fifth of a d=512 snapshot.
GRAM_MAX_CONDITION = 5e4


def _check_matrices(weights: Sequence[Tensor]) -> list[Tensor]:
    mats = []
    for i, w in enumerate(weights):
        if not isinstance(w, Tensor) or w.ndim < 2 or w.numel() == 0:
            desc = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
            raise ValueError(f"weights[{i}] must be a non-empty matrix, got {desc}")
        mats.append(_as_matrix(w.detach()))
    return mats


def _by_shape(mats: Sequence[Tensor]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(mats):
        groups.setdefault((tuple(w.shape), w.device), []).append(i)
    return groups


@torch.no_grad()
def singular_values(
    weights: Sequence[Tensor] | Tensor, *, dtype: torch.dtype = torch.float32
) -> list[Tensor]:
    """Singular values (descending) of each matrix, on its device.

    Computed in float64 on the cheaper Gram side: ``sigma = sqrt(eigvalsh(W W^T))`` with
    ``W W^T`` of size ``min(m, n)``; matrices with a condition number above
    :data:`GRAM_MAX_CONDITION` (where the Gram route loses precision) fall back to a
    float64 SVD. On CPU each matrix is staged into one reused float64 buffer per shape,
    its Gram matrix is one BLAS ``dsyrk`` and its eigenvalues LAPACK's ``dsyevr`` (through
    scipy; 3-4x faster than ``svdvals``). On other devices same-shaped matrices go
    through torch's batched kernels, one call per chunk of :data:`CHUNK_BYTES` (one
    device sync each). Weights with more than 2 dims are flattened to ``(shape[0], -1)``.

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
    mats = _check_matrices(weights)
    out: list[Tensor | None] = [None] * len(mats)
    for ((m, n), device), idx in _by_shape(mats).items():
        if device.type == "cpu":
            stage = _CpuStage(m, n)
            with _blas_threads_like_torch():
                for i in idx:
                    out[i] = torch.from_numpy(stage.singular_values(mats[i])).to(dtype)
            continue
        for chunk in _chunks(idx, 8 * (m * n + min(m, n) ** 2)):  # matrix + its Gram
            sig = spectra_float64(_stack_float64([mats[i] for i in chunk])).to(dtype)
            for j, i in enumerate(chunk):
                out[i] = sig[j]
    return out  # type: ignore[return-value]


@torch.no_grad()
def spectral_norms(weights: Sequence[Tensor], *, dtype: torch.dtype = torch.float32) -> Tensor:
    """The largest singular value ``sigma_1`` of each matrix, exact to float64 rounding.

    What :func:`singular_values` gives as its first entry, for a fraction of its cost
    where only the norm is needed (the monitor's update ratio ``||dW||_2``): on CPU the
    largest eigenvalue of the float64 Gram matrix by ARPACK's Lanczos iteration (3-11 ms
    against ``dsyevr``'s 10-65 ms at 512-1024, measured), elsewhere the batched Gram
    eigenvalues. ``lambda_max`` of the Gram matrix is accurate to ``eps64`` relative
    whatever the conditioning, so no SVD fallback is needed; Lanczos stops at a residual
    of 1e-9, which leaves ``sigma_1`` within ~1e-12 relative (measured: 1e-14).

    Args:
        weights: tensors ``(m, n)`` (or conv kernels, flattened to ``(shape[0], -1)``),
            all on one device. Never modified.
        dtype: dtype of the result, ``torch.float32`` or ``torch.float64``.

    Returns:
        Shape ``(len(weights),)`` on the weights' device; NaN for a matrix with a NaN/Inf
        entry.
    """
    dtype = _compute_dtype(dtype)
    mats = _check_matrices(weights)
    if not mats:
        return torch.empty(0, dtype=dtype)
    out = torch.empty(len(mats), dtype=torch.float64)
    devices = {w.device for w in mats}
    if len(devices) > 1:
        raise ValueError(f"weights must be on one device, got {sorted(map(str, devices))}")
    for ((m, n), device), idx in _by_shape(mats).items():
        if device.type == "cpu":
            stage = _CpuStage(m, n)
            with _blas_threads_like_torch():
                for i in idx:
                    out[i] = stage.spectral_norm(mats[i])
            continue
        for chunk in _chunks(idx, 8 * (m * n + min(m, n) ** 2)):
            sig = spectra_float64(_stack_float64([mats[i] for i in chunk]))
            out[chunk] = sig[:, 0].cpu()
    return out.to(device=mats[0].device, dtype=dtype)


def _chunks(idx: list[int], bytes_per_matrix: int) -> list[list[int]]:
    size = max(1, CHUNK_BYTES // bytes_per_matrix)
    return [idx[c : c + size] for c in range(0, len(idx), size)]


def _stack_float64(mats: list[Tensor]) -> Tensor:
    batch = torch.empty(len(mats), *mats[0].shape, dtype=torch.float64, device=mats[0].device)
    for j, w in enumerate(mats):  # copy in place: no second float64 copy per chunk
        batch[j].copy_(w)
    return batch


def spectra_float64(batch: Tensor) -> Tensor:
    """Singular values ``(B, r)`` (descending) of a float64 batch ``(B, m, n)``.

    Gram eigenvalues with the SVD fallback of :func:`singular_values`; NaN rows for
    matrices with NaN/Inf entries (``svdvals`` and ``eigvalsh`` would raise). On CPU one
    matrix at a time through :class:`_CpuStage`; on other devices torch's batched
    ``eigvalsh`` of the Gram matrices.
    """
    if batch.device.type == "cpu":
        _, m, n = batch.shape
        stage = _CpuStage(m, n)
        with _blas_threads_like_torch():
            rows = [stage.singular_values(w) for w in batch.unbind(0)]
        return torch.from_numpy(np.stack(rows)) if rows else batch.new_empty(0, min(m, n))
    # A float64 copy of fp32 / bf16 weights cannot overflow: only a NaN/Inf entry makes a
    # matrix's spectrum undefined (NaN row). Every other matrix gets values: a failed
    # eigensolve (non-convergence, NaN eigenvalues) goes through svdvals below.
    finite = torch.isfinite(batch).all(dim=(-2, -1))  # (B,)
    gram = batch @ batch.mT if batch.shape[-2] <= batch.shape[-1] else batch.mT @ batch
    try:
        lam = torch.linalg.eigvalsh(torch.where(finite[:, None, None], gram, 0))
    except RuntimeError:  # non-convergence: every matrix goes through svdvals
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


_NUMPY_COPYABLE = (torch.float64, torch.float32, torch.float16)


class _CpuStage:
    """Float64 working memory for CPU spectra of one matrix shape ``(m, n)``, reused
    matrix after matrix: the staged copy of ``W`` and its Gram matrix. Fresh 8-32 MB
    arrays per matrix cost their page faults again each time (measured: 40-50 ms of a
    d=512 snapshot, plus 90 ms for a separate ``isfinite`` pass that the Gram diagonal
    makes unnecessary)."""

    def __init__(self, m: int, n: int) -> None:
        self.w = np.empty((m, n))  # C order: w.T is the Fortran-ordered (n, m) view
        r = min(m, n)
        self.gram = np.empty((r, r), order="F")
        self._wide = m <= n

    def _stage(self, w: Tensor) -> bool | None:
        """Copy ``w`` into the float64 buffer and form its Gram matrix (lower triangle).
        True: the Gram matrix is finite; False: ``w`` has a NaN/Inf entry; None: ``w`` is
        finite but its Gram matrix overflowed (float64 weights past ~1e150 only)."""
        from scipy.linalg.blas import dsyrk

        if w.dtype in _NUMPY_COPYABLE:
            # numpy's copy is single-threaded: a torch copy here opens an OpenMP region
            # whose worker threads then spin against BLAS's own threads (measured: a
            # d=512 snapshot at 2 threads took 0.80 s with torch's copy, 0.47 s without).
            np.copyto(self.w, w.detach().numpy())
        else:  # bf16 has no numpy dtype
            torch.from_numpy(self.w).copy_(w)
        # w.T is Fortran-ordered (no copy): trans=1 gives w w^T, trans=0 gives w^T w.
        dsyrk(1.0, self.w.T, beta=0.0, c=self.gram, trans=int(self._wide), lower=1,
              overwrite_c=1)
        # Every entry of W is in some diagonal entry's sum of squares, so a finite diagonal
        # proves W finite: no separate isfinite pass over W.
        if np.isfinite(np.diagonal(self.gram)).all():
            return True
        return None if np.isfinite(self.w).all() else False

    def singular_values(self, w: Tensor) -> np.ndarray:
        """Descending singular values of ``w`` (float64); all NaN for non-finite ``w``."""
        from scipy.linalg import LinAlgError, eigh

        staged = self._stage(w)
        if staged is False:
            return np.full(self.gram.shape[0], np.nan)
        if staged is None:
            return self._svd()
        try:
            lam = eigh(self.gram, lower=True, eigvals_only=True, overwrite_a=True,
                       driver="evr", check_finite=False)
            sig = np.sqrt(np.clip(lam[::-1], 0.0, None))  # descending, contiguous
        except (LinAlgError, ValueError):  # LAPACK non-convergence
            return self._svd()
        if np.isnan(sig).any() or sig[0] > GRAM_MAX_CONDITION * sig[-1]:
            sig = self._svd()
        return sig

    def spectral_norm(self, w: Tensor) -> float:
        """``sigma_1`` of ``w`` (float64, to ~1e-12 relative); NaN for non-finite ``w``."""
        from scipy.linalg.blas import dsymv
        from scipy.sparse.linalg import ArpackError, LinearOperator, eigsh

        r = self.gram.shape[0]
        if r <= 64:  # a small dense solve beats Lanczos's overhead
            return float(self.singular_values(w)[0])
        staged = self._stage(w)
        if staged is not True:
            return math.nan if staged is False else float(self._svd()[0])
        g = self.gram  # dsymv reads the lower triangle dsyrk wrote: no mirrored copy
        op = LinearOperator((r, r), matvec=lambda x: dsymv(1.0, g, x, lower=1),
                            dtype=np.float64)
        v0 = np.random.default_rng(0).standard_normal(r)  # fixed start: reproducible
        try:
            # One BLAS thread: Lanczos is a chain of small matvecs, which more threads
            # only slow down (measured: erratic 10-100 ms at 2 threads vs 3-11 ms at 1).
            # tol 1e-9 on the residual leaves lambda_max within ~1e-14 (measured).
            with _blas_threads_like_torch(1):
                lam = eigsh(op, k=1, which="LA", v0=v0, tol=1e-9,
                            return_eigenvectors=False)[0]
        except ArpackError:  # no convergence: the dense solve
            return float(self.singular_values(w)[0])
        return math.sqrt(max(float(lam), 0.0))

    def _svd(self) -> np.ndarray:
        from scipy.linalg import LinAlgError, svd

        try:  # gesdd: 2-3.5x faster than torch's svdvals on wide matrices (measured)
            return svd(self.w, compute_uv=False, check_finite=False, lapack_driver="gesdd")
        except (LinAlgError, ValueError):
            try:
                return svd(self.w, compute_uv=False, check_finite=False, lapack_driver="gesvd")
            except (LinAlgError, ValueError):  # still failing: reported as NaN
                return np.full(self.gram.shape[0], np.nan)


_BLAS_CONTROLLER: Any = None


def _blas_threads_like_torch(threads: int | None = None
                             ) -> contextlib.AbstractContextManager[Any]:
    """Limit scipy's / numpy's own OpenBLAS to ``torch.get_num_threads()`` threads (or
    ``threads``).

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
        limit = torch.get_num_threads() if threads is None else threads
        return _BLAS_CONTROLLER.limit(limits=limit, user_api="blas")
    except ImportError:
        return contextlib.nullcontext()


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
