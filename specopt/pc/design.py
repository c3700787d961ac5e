"""Design odd polynomials for the PC layer by linear programming, and compare with the levels.

The published levels (``PC_LEVELS``) came without a derivation. This designer states its
objective. For ``f(x) = sum_j c_j x^(2j+1)`` of a given odd degree it solves, on a dense
grid of ``[0, x_max]`` (scipy ``linprog``, HiGHS), one of

``objective="kappa"`` (default): minimise the output condition number for spectra in
``[1/k, 1]``::

    maximise  t
    s.t.      f(1) = 1,   0 <= f(x) <= peak on [0, x_max],   f(x) >= t on [1/k, 1]

  so ``kappa_out(k) = max f / min f <= peak / t`` is as small as the degree allows.

``objective="slope"``: the largest gain on small singular values::

    maximise  f'(0) = c1
    s.t.      f(1) = 1,   0 <= f(x) <= peak on [0, x_max],   f(x) >= x on [0, 1]

  (``f(x) >= x``: no singular value shrinks relative to the top one).

``peak`` bounds the overshoot (the published levels peak at 1.000-1.021). ``x_max > 1``
keeps ``f`` bounded for singular values slightly above the power-iteration estimate
``s <= sigma_max`` (``W / s`` can have singular values a little above 1).

``python tools/bench_pc.py --design`` prints the comparison with the published levels.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from specopt.pc.polynomials import PC_LEVELS, OddPolynomial

__all__ = ["compare_with_levels", "design_odd_polynomial"]

_MAX_DEGREE = 21  # monomial basis stays well conditioned on [0, ~1.2] up to here


def design_odd_polynomial(
    degree: int,
    *,
    objective: Literal["kappa", "slope"] = "kappa",
    k: float = 100.0,
    peak: float = 1.02,
    x_max: float = 1.0,
    grid: int = 1000,
    name: str | None = None,
) -> OddPolynomial:
    """Solve the LP described in the module docstring; returns the optimal odd polynomial.

    Args:
        degree: odd degree 1..21 (level L of the paper has degree 2L + 1).
        objective: ``"kappa"`` (minimise ``kappa_out`` on ``[1/k, 1]``) or ``"slope"``.
        k: input condition number targeted by ``"kappa"`` (> 1).
        peak: upper bound on ``f`` over ``[0, x_max]`` (>= 1, since ``f(1) = 1``).
        x_max: right end of the interval where ``0 <= f <= peak`` holds (>= 1).
        grid: number of grid points for the inequality constraints (>= 100). Between grid
            points constraints can be violated by ``O(1/grid^2)``; check with
            :meth:`OddPolynomial.value_range`.
        name: label of the result (default ``"<objective>-d<degree>"``).

    Raises:
        ValueError: an argument out of range, or the LP is infeasible.
    """
    from scipy.optimize import linprog  # scipy is heavy: import only when designing

    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1 or degree % 2 == 0 \
            or degree > _MAX_DEGREE:
        raise ValueError(f"degree must be an odd int in [1, {_MAX_DEGREE}], got {degree!r}")
    if objective not in ("kappa", "slope"):
        raise ValueError(f"objective must be 'kappa' or 'slope', got {objective!r}")
    if not (math.isfinite(k) and k > 1):
        raise ValueError(f"k must be a finite number > 1, got {k!r}")
    if not (math.isfinite(peak) and peak >= 1):
        raise ValueError(f"peak must be a finite number >= 1 (f(1) = 1), got {peak!r}")
    if not (math.isfinite(x_max) and x_max >= 1):
        raise ValueError(f"x_max must be a finite number >= 1, got {x_max!r}")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 100:
        raise ValueError(f"grid must be an int >= 100, got {grid!r}")

    n = (degree + 1) // 2
    # Cosine-spaced grid: dense near both ends, where the extremes of f sit.
    x = x_max * (1 - np.cos(np.linspace(0, np.pi, grid))) / 2
    x = np.union1d(x, [1.0 / k, 1.0])
    basis = np.stack([x ** (2 * j + 1) for j in range(n)], axis=1)  # (grid, n)
    zero = np.zeros((len(x), 1))
    rows = [np.hstack([basis, zero]), np.hstack([-basis, zero])]  # f <= peak, -f <= 0
    rhs = [np.full(len(x), peak), np.zeros(len(x))]
    cost = np.zeros(n + 1)
    if objective == "kappa":
        band = (x >= 1.0 / k) & (x <= 1.0)
        rows.append(np.hstack([-basis[band], np.ones((band.sum(), 1))]))  # t - f <= 0
        rhs.append(np.zeros(band.sum()))
        cost[-1] = -1.0
        bounds = [(None, None)] * n + [(0.0, None)]
    else:
        band = x <= 1.0
        rows.append(np.hstack([-basis[band], zero[band]]))  # x - f <= 0
        rhs.append(-x[band])
        cost[0] = -1.0
        bounds = [(None, None)] * n + [(0.0, 0.0)]
    result = linprog(
        cost, A_ub=np.vstack(rows), b_ub=np.concatenate(rhs),
        A_eq=np.r_[np.ones(n), 0.0][None], b_eq=[1.0], bounds=bounds, method="highs",
    )
    if not result.success:
        raise ValueError(f"design LP failed for degree={degree}, objective={objective!r}, "
                         f"peak={peak}, x_max={x_max}: {result.message}")
    coeffs = tuple(float(c) for c in result.x[:n])
    return OddPolynomial(coeffs, name=name or f"{objective}-d{degree}")


def compare_with_levels(
    objective: Literal["kappa", "slope"] = "kappa", k: float = 100.0
) -> list[dict[str, float | str]]:
    """Published levels 1-4 next to designed polynomials of the same degree and peak.

    Returns one :meth:`OddPolynomial.summary` row per polynomial (published first).
    """
    rows: list[dict[str, float | str]] = []
    for published in PC_LEVELS.values():
        rows.append(published.summary())
        designed = design_odd_polynomial(
            published.degree, objective=objective, k=k, peak=max(1.0, published.peak()),
            name=f"{objective}(k={k:g})-d{published.degree}" if objective == "kappa"
            else f"slope-d{published.degree}",
        )
        rows.append(designed.summary())
    return rows
