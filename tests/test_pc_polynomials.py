"""PC polynomials: published figures, Gram-side Horner evaluation vs SVD, the LP designer."""

import math

import numpy as np
import pytest
import torch

from specopt.pc import (
    PC_LEVELS,
    OddPolynomial,
    design_odd_polynomial,
    odd_matrix_polynomial,
    resolve_polynomial,
)
from specopt.pc.design import compare_with_levels

# Figures from shared/reference/pc-layer.md (slope at 0, peak on [0,1], kappa_out for
# input spectra [1/k, 1] with k = 100 and k = 10), rounded as published.
PUBLISHED = {
    1: (1.507, 1.000, 66.4, 6.66),
    2: (2.083, 1.010, 48.5, 4.89),
    3: (2.909, 1.019, 35.0, 3.56),
    4: (3.625, 1.021, 28.2, 2.89),
}


@pytest.mark.parametrize("level", sorted(PUBLISHED))
def test_published_levels_reproduce_reference_figures(level):
    poly = PC_LEVELS[level]
    slope, peak, k100, k10 = PUBLISHED[level]
    assert poly.degree == 2 * level + 1
    assert math.isclose(sum(poly.coefficients), 1.0, abs_tol=1e-12)
    assert float(poly(1.0)) == pytest.approx(1.0, abs=1e-12)
    assert poly.slope_at_zero == pytest.approx(slope, abs=5e-4)
    assert poly.peak() == pytest.approx(peak, abs=5e-4)
    assert poly.condition_number_after(100) == pytest.approx(k100, abs=0.05)
    assert poly.condition_number_after(10) == pytest.approx(k10, abs=0.005)


def test_value_range_is_exact_against_dense_grid():
    poly = PC_LEVELS[4]
    x = np.linspace(0.1, 1.0, 200_001)
    lo, hi = poly.value_range(0.1, 1.0)
    assert lo == pytest.approx(poly(x).min(), abs=1e-9)
    assert hi == pytest.approx(poly(x).max(), abs=1e-9)
    assert lo <= poly(x).min() + 1e-12 and hi >= poly(x).max() - 1e-12


def test_condition_number_after_is_inf_when_f_reaches_zero():
    assert OddPolynomial((1.0, -1.0)).condition_number_after(100) == math.inf  # f(1) = 0


def _svd_reference(x: torch.Tensor, poly: OddPolynomial) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(x, full_matrices=False)
    fs = torch.from_numpy(poly(S.numpy())).to(x.dtype)
    return U @ torch.diag(fs) @ Vh


@pytest.mark.parametrize("shape", [(24, 10), (10, 24), (16, 16)])
@pytest.mark.parametrize("poly", [*PC_LEVELS.values(), OddPolynomial((0.5,)),
                                  OddPolynomial((1.5, -0.5))], ids=lambda p: p.name
                         + str(len(p.coefficients)))
def test_odd_matrix_polynomial_matches_svd_float64(shape, poly):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    x = x / torch.linalg.matrix_norm(x, 2)
    got = odd_matrix_polynomial(x, poly.coefficients)
    assert got.shape == x.shape
    torch.testing.assert_close(got, _svd_reference(x, poly), rtol=0, atol=1e-12)


def test_odd_matrix_polynomial_rejects_non_matrix():
    with pytest.raises(ValueError, match=r"2-D matrix, got shape \(3, 4, 5\)"):
        odd_matrix_polynomial(torch.zeros(3, 4, 5), (1.0,))


def test_odd_polynomial_and_resolve_validation():
    with pytest.raises(ValueError, match="at least one coefficient"):
        OddPolynomial(())
    with pytest.raises(ValueError, match="must be finite"):
        OddPolynomial((1.0, float("nan")))
    with pytest.raises(ValueError, match="either level or coefficients"):
        resolve_polynomial(2, (1.0,))
    with pytest.raises(ValueError, match=r"level must be one of \[1, 2, 3, 4\], got 5"):
        resolve_polynomial(5)
    with pytest.raises(ValueError, match="sequence of odd-power coefficients"):
        resolve_polynomial(coefficients="1.5,-0.5")
    assert resolve_polynomial() is PC_LEVELS[4]
    assert resolve_polynomial(coefficients=[1.5, -0.5]).coefficients == (1.5, -0.5)


def test_designer_recovers_level1_for_degree3():
    # For a cubic with f(1)=1 and the level-1 peak, the kappa-optimal polynomial is level 1.
    d = design_odd_polynomial(3, peak=PC_LEVELS[1].peak(), k=100, grid=400)
    assert d.coefficients == pytest.approx(PC_LEVELS[1].coefficients, abs=2e-3)


@pytest.mark.parametrize("level", [2, 4])
def test_designed_kappa_polynomial_is_feasible_and_beats_published(level):
    pub = PC_LEVELS[level]
    d = design_odd_polynomial(pub.degree, objective="kappa", k=100, peak=pub.peak())
    assert float(d(1.0)) == pytest.approx(1.0, abs=1e-9)
    lo, hi = d.value_range(0.0, 1.0)
    assert hi <= pub.peak() + 1e-4 and lo >= -1e-4  # grid constraints hold between points
    # The published polynomial is feasible for the same LP, so the optimum is no worse.
    assert d.condition_number_after(100) <= pub.condition_number_after(100) + 1e-6


def test_designed_slope_polynomial_satisfies_constraints():
    d = design_odd_polynomial(7, objective="slope", peak=1.02, x_max=1.1)
    x = np.linspace(0, 1, 10_001)
    assert np.all(d(x) >= x - 1e-4)
    lo, hi = d.value_range(0.0, 1.1)
    assert hi <= 1.02 + 1e-4 and lo >= -1e-4
    assert d.slope_at_zero > 1.0


def test_designer_validation():
    with pytest.raises(ValueError, match="degree must be an odd int"):
        design_odd_polynomial(4)
    with pytest.raises(ValueError, match=r"peak must be a finite number >= 1"):
        design_odd_polynomial(5, peak=0.9)
    with pytest.raises(ValueError, match="objective must be 'kappa' or 'slope'"):
        design_odd_polynomial(5, objective="max")
    with pytest.raises(ValueError, match="x_max must be"):
        design_odd_polynomial(5, x_max=0.5)


def test_compare_with_levels_rows():
    rows = compare_with_levels("kappa", 100)
    assert [r["name"] for r in rows[::2]] == ["level1", "level2", "level3", "level4"]
    for pub, des in zip(rows[::2], rows[1::2], strict=True):
        assert des["degree"] == pub["degree"]
        assert des["kappa_out(k=100)"] <= pub["kappa_out(k=100)"] + 1e-6
