"""Warm-started power iteration: the one sigma_max estimator in specopt.

Used by the PC layer (its persistent ``u``, ``v`` buffers) and by the spectral monitor
(its cheap every-step sigma_max signal). Works on one matrix ``(m, n)`` or a batch of
same-shaped matrices ``(..., m, n)`` with vectors ``u: (..., m)``, ``v: (..., n)``.

The rule, repeated ``iters`` times (as in torch's ``spectral_norm``)::

    v <- normalize(W^T u)
    u <- normalize(W v)

and the estimate is ``sigma = u^T W v``, which is at most the true sigma_max and converges
to it geometrically when warm-started: the vectors with ratio ``(sigma_2 / sigma_1)^2`` per
iteration, the estimate (its error is quadratic in theirs) with ``(sigma_2 / sigma_1)^4``.

Design choices (why):
- Vectors are updated in place under ``no_grad`` so they can live in module buffers and
  optimizer hooks without allocating; callers that use them inside an autograd graph
  must ``clone()`` them first (same reason as torch's spectral_norm: an in-place update
  of a saved tensor would invalidate backward).
- A vector whose new norm is below ``eps`` (zero matrix, or u orthogonal to the range)
  keeps its previous value instead of collapsing to zero, so ``u``, ``v`` stay unit
  vectors forever and a zero matrix gives ``sigma = 0``, never NaN.
- Initial vectors come from a fixed-seed generator keyed by the shape, so every rank of
  a distributed job starts from the same ``u``, ``v`` without a broadcast.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_EPS",
    "init_singular_vectors",
    "power_iteration_",
    "sigma_max_estimate",
    "vectors_are_valid",
]

#: Normalization floor; 1e-7 is the value in all published PC-layer configs.
DEFAULT_EPS = 1e-7

_INIT_SEED = 20260606  # arbitrary but fixed: identical init on every process


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision mat-vecs lose the last digits of sigma; the vectors are tiny, so
    # always iterate in at least fp32.
    return torch.float64 if dtype == torch.float64 else torch.float32


def init_singular_vectors(
    weight_shape: torch.Size | tuple[int, ...],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = _INIT_SEED,
) -> tuple[Tensor, Tensor]:
    """Deterministic random unit vectors for a matrix (or batch) of ``weight_shape``.

    Args:
        weight_shape: ``(..., m, n)``.
        device, dtype: of the returned vectors (fp32 or fp64 recommended).
        seed: generator seed; the same seed gives the same vectors on every process.

    Returns:
        ``u`` of shape ``(..., m)`` and ``v`` of shape ``(..., n)``, each of unit norm
        along the last dimension.
    """
    shape = tuple(weight_shape)
    if len(shape) < 2:
        raise ValueError(f"power iteration needs a matrix of shape (..., m, n), got {shape}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    u = torch.randn(*shape[:-1], generator=gen, dtype=torch.float64)
    v = torch.randn(*shape[:-2], shape[-1], generator=gen, dtype=torch.float64)
    u = u / u.norm(dim=-1, keepdim=True)
    v = v / v.norm(dim=-1, keepdim=True)
    return u.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)


def vectors_are_valid(weight: Tensor, u: Tensor | None, v: Tensor | None) -> bool:
    """True when ``u``, ``v`` have the shapes ``weight`` needs and are finite and nonzero."""
    if u is None or v is None:
        return False
    if tuple(u.shape) != tuple(weight.shape[:-1]):
        return False
    if tuple(v.shape) != (*weight.shape[:-2], weight.shape[-1]):
        return False
    if u.numel() == 0 or v.numel() == 0:
        return False
    return bool(
        torch.isfinite(u).all() and torch.isfinite(v).all()
        and (u.norm(dim=-1) > 0).all() and (v.norm(dim=-1) > 0).all()
    )


def _normalize_or_keep(x: Tensor, previous: Tensor, eps: float) -> Tensor:
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return torch.where(norm > eps, x / norm.clamp_min(eps), previous)


@torch.no_grad()
def power_iteration_(
    weight: Tensor, u: Tensor, v: Tensor, *, iters: int, eps: float = DEFAULT_EPS
) -> None:
    """Refine ``u`` and ``v`` in place with ``iters`` warm-started power iterations.

    Args:
        weight: ``(..., m, n)``; read only, never modified, any float dtype.
        u: ``(..., m)`` left singular vector estimate, unit norm; updated in place.
        v: ``(..., n)`` right singular vector estimate, unit norm; updated in place.
        iters: number of iterations (>= 0). Each costs two mat-vecs.
        eps: vectors whose norm falls at or below this keep their previous value.

    Non-finite entries of ``weight`` propagate into NaN vectors; callers that must
    survive them check with :func:`vectors_are_valid` and re-initialise.
    """
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    if iters == 0:
        return
    dtype = _compute_dtype(u.dtype)
    w = weight.detach().to(dtype)
    # Row vectors times the matrix, (..., 1, m) @ (..., m, n): on CPU the batched
    # matrix-times-column form (..., m, n) @ (..., n, 1) is ~8x slower for the same math.
    uu = u.to(dtype).unsqueeze(-2)
    vv = v.to(dtype).unsqueeze(-2)
    for _ in range(iters):
        vv = _normalize_or_keep(uu @ w, vv, eps)  # v <- normalize(W^T u)
        uu = _normalize_or_keep(vv @ w.mT, uu, eps)  # u <- normalize(W v)
    u.copy_(uu.squeeze(-2))
    v.copy_(vv.squeeze(-2))


def sigma_max_estimate(weight: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """``u^T W v`` for each matrix of the batch: shape ``weight.shape[:-2]``.

    Differentiable in ``weight`` (the gradient is ``u v^T``, the derivative of sigma_max
    when ``u``, ``v`` are the top singular vectors); ``u``, ``v`` are treated as constants.
    Computed in ``u``'s dtype (fp32 or fp64).
    """
    w = weight.to(u.dtype)
    return (u.unsqueeze(-2) @ w @ v.unsqueeze(-1)).squeeze(-1).squeeze(-1)
