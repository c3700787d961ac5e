"""Odd polynomials acting on singular values: the published PC levels and their evaluation.

An odd polynomial ``f(x) = c1 x + c3 x^3 + ... + c_{2d+1} x^{2d+1} = x * p(x^2)`` applied to
a matrix ``X = U diag(sigma) V^T`` gives ``f(X) = U diag(f(sigma)) V^T``: it reshapes the
singular values and keeps the singular vectors. It needs no SVD, only matrix products:

    tall (m >= n):  f(X) = X @ p(X^T X)      Gram side n x n
    wide (m <  n):  f(X) = p(X X^T) @ X      Gram side m x m

``p`` is evaluated in Horner form on the Gram matrix ``G`` (the smaller side ``r``);
each Horner step ``c I + G @ T`` is one ``torch.addmm``, and the innermost step
``c_{2d-1} I + c_{2d+1} G`` needs no product. Cost for degree ``2d+1`` (level ``d``):
``4 M r^2 + 2 (d-1) r^3`` FLOPs, ``M`` the larger side and ``r`` the smaller.

Source of the levels: arXiv 2606.06470 (PC layer) and the authors' public training code,
as transcribed in ``shared/reference/pc-layer.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "PC_LEVELS",
    "OddPolynomial",
    "odd_matrix_polynomial",
    "resolve_polynomial",
]


@dataclass(frozen=True)
class OddPolynomial:
    """``f(x) = sum_j coefficients[j] * x**(2j+1)``, an odd polynomial on singular values.

    Attributes:
        coefficients: ``(c1, c3, c5, ...)``; at least one, all finite.
        name: label used in reports (``"level4"``, ``"custom"``, ...).

    The PC layer normalises ``W`` by its spectral norm, so singular values enter ``f`` in
    ``[0, 1]``; ``f(1) = sum(coefficients)`` is the gain on the top singular value (1 for
    every published level, which is what lets ``s * f(W / s)`` keep the spectral norm).
    """

    coefficients: tuple[float, ...]
    name: str = "custom"

    def __post_init__(self) -> None:
        coeffs = tuple(float(c) for c in self.coefficients)
        if not coeffs:
            raise ValueError("OddPolynomial.coefficients must hold at least one coefficient")
        if not all(math.isfinite(c) for c in coeffs):
            raise ValueError(f"OddPolynomial.coefficients must be finite, got {coeffs}")
        object.__setattr__(self, "coefficients", coeffs)

    @property
    def degree(self) -> int:
        """Degree ``2 * len(coefficients) - 1``."""
        return 2 * len(self.coefficients) - 1

    @property
    def slope_at_zero(self) -> float:
        """``f'(0) = c1``: the gain applied to the smallest singular values."""
        return self.coefficients[0]

    def __call__(self, x: np.ndarray | float) -> np.ndarray:
        """Evaluate ``f`` elementwise on a scalar or array (float64 numpy)."""
        x = np.asarray(x, dtype=np.float64)
        x2 = x * x
        acc = np.zeros_like(x)
        for c in reversed(self.coefficients):  # Horner in x^2: p(y) = c1 + y (c3 + y (...))
            acc = acc * x2 + c
        return x * acc

    def _power_coefficients(self) -> np.ndarray:
        """Coefficients in increasing powers of x (numpy.polynomial order)."""
        full = np.zeros(self.degree + 1)
        full[1::2] = self.coefficients
        return full

    def value_range(self, lo: float, hi: float) -> tuple[float, float]:
        """Exact ``(min f, max f)`` on ``[lo, hi]`` (endpoints and real critical points)."""
        if not lo <= hi:
            raise ValueError(f"value_range needs lo <= hi, got lo={lo}, hi={hi}")
        deriv = np.polynomial.polynomial.polyder(self._power_coefficients())
        points = [lo, hi]
        if deriv.size and np.any(deriv):
            roots = np.polynomial.polynomial.polyroots(np.trim_zeros(deriv, "b"))
            real = roots[np.abs(roots.imag) < 1e-9].real
            points.extend(r for r in real if lo <= r <= hi)
        values = self(np.array(points))
        return float(values.min()), float(values.max())

    def peak(self, hi: float = 1.0) -> float:
        """``max f`` on ``[0, hi]``; the published levels overshoot 1 slightly (<= 1.021)."""
        return self.value_range(0.0, hi)[1]

    def condition_number_after(self, k: float) -> float:
        """Condition number of the output for an input spectrum filling ``[1/k, 1]``.

        ``kappa_out = max f / min f`` over ``[1/k, 1]`` (``inf`` if ``f`` reaches 0 or
        changes sign there). For level 4, ``k = 100 -> 28.2``: a 100x spread becomes 28x.
        """
        if not k >= 1:
            raise ValueError(f"condition number k must be >= 1, got {k}")
        lo, hi = self.value_range(1.0 / k, 1.0)
        return math.inf if lo <= 0 else hi / lo

    def summary(self, ks: Sequence[float] = (10.0, 100.0)) -> dict[str, float | str]:
        """Slope at 0, f(1), peak on [0, 1] and ``kappa_out`` for each ``k`` in ``ks``."""
        out: dict[str, float | str] = {
            "name": self.name,
            "degree": self.degree,
            "slope_at_0": self.slope_at_zero,
            "f(1)": float(self(1.0)),
            "peak_[0,1]": self.peak(),
        }
        for k in ks:
            out[f"kappa_out(k={k:g})"] = self.condition_number_after(k)
        return out


def _level(level: int, coefficients: tuple[float, ...]) -> OddPolynomial:
    return OddPolynomial(coefficients, name=f"level{level}")


#: Published PC levels (coefficients of x, x^3, x^5, ...); each sums to 1 so f(1) = 1.
#: AdamW runs in the paper use level 4, Muon runs level 2.
PC_LEVELS: dict[int, OddPolynomial] = {
    1: _level(1, (1.507, -0.507)),
    2: _level(2, (2.083, -1.643, 0.560)),
    3: _level(3, (2.909, -4.649, 4.023, -1.283)),
    4: _level(4, (3.625, -9.261, 14.097, -10.351, 2.890)),
}


def resolve_polynomial(
    level: int | None = None,
    coefficients: OddPolynomial | Sequence[float] | None = None,
) -> OddPolynomial:
    """The polynomial named by ``level`` (1-4) or given by ``coefficients``; default level 4.

    Raises:
        ValueError: both given, an unknown level, or invalid coefficients.
    """
    if level is not None and coefficients is not None:
        raise ValueError(
            f"give either level or coefficients, not both (level={level}, "
            f"coefficients={coefficients})"
        )
    if coefficients is not None:
        if isinstance(coefficients, OddPolynomial):
            return coefficients
        if isinstance(coefficients, (str, bytes)) or not isinstance(coefficients, Sequence):
            raise ValueError(
                "coefficients must be an OddPolynomial or a sequence of odd-power coefficients "
                f"(c1, c3, ...), got {coefficients!r}"
            )
        return OddPolynomial(tuple(coefficients))
    level = 4 if level is None else level
    if isinstance(level, bool) or level not in PC_LEVELS:
        raise ValueError(f"level must be one of {sorted(PC_LEVELS)}, got {level!r}")
    return PC_LEVELS[level]


def _gram_polynomial(gram: Tensor, coefficients: Sequence[float]) -> Tensor:
    """``p(G) = c1 I + c3 G + c5 G^2 + ...`` by Horner, for ``len(coefficients) >= 2``."""
    assert len(coefficients) >= 2
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    # Innermost step needs no product: c_{n-1} I + c_n G.
    acc = torch.add(eye * coefficients[-2], gram, alpha=coefficients[-1])
    for c in reversed(coefficients[:-2]):
        acc = torch.addmm(eye, gram, acc, beta=c)  # c I + G @ acc
    return acc


def odd_matrix_polynomial(x: Tensor, coefficients: Sequence[float]) -> Tensor:
    """``f(X) = U diag(f(sigma)) V^T`` for ``f(x) = sum_j c_j x^(2j+1)``, without an SVD.

    Args:
        x: ``(m, n)`` matrix (any float dtype; computed in that dtype).
        coefficients: ``(c1, c3, ...)``.

    Returns:
        ``(m, n)``; ``X @ p(X^T X)`` when ``m >= n``, ``p(X X^T) @ X`` otherwise (the Gram
        matrix is built on the smaller side). Differentiable by autograd.
    """
    if x.ndim != 2:
        raise ValueError(f"odd_matrix_polynomial needs a 2-D matrix, got shape {tuple(x.shape)}")
    coefficients = tuple(float(c) for c in coefficients)
    if len(coefficients) == 1:
        return x * coefficients[0]
    if x.shape[0] >= x.shape[1]:
        return x @ _gram_polynomial(x.mT @ x, coefficients)
    return _gram_polynomial(x @ x.mT, coefficients) @ x
