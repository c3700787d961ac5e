import pytest
import torch

from specopt.spectral.power_iteration import (
    init_singular_vectors,
    power_iteration_,
    sigma_max_estimate,
    vectors_are_valid,
)


def _matrix_with_spectrum(m: int, n: int, sigma: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    return U @ torch.diag(sigma) @ V.T


@pytest.mark.parametrize("shape", [(40, 20), (20, 40), (30, 30)])
def test_converges_to_svd_sigma_max(shape):
    r = min(shape)
    sigma = torch.linspace(1.0, 0.01, r, dtype=torch.float64)
    sigma[0] = 2.0  # gap 2:1 -> error shrinks 4x per iteration
    W = _matrix_with_spectrum(*shape, sigma)
    u, v = init_singular_vectors(W.shape, dtype=torch.float64)
    power_iteration_(W, u, v, iters=40)
    est = sigma_max_estimate(W, u, v)
    assert torch.allclose(est, torch.tensor(2.0, dtype=torch.float64), rtol=1e-10)
    assert torch.allclose(u.norm(), torch.tensor(1.0, dtype=torch.float64))


def test_estimate_is_lower_bound_and_warm_start_improves():
    W = torch.randn(64, 32, dtype=torch.float64)
    true = torch.linalg.matrix_norm(W, 2)
    u, v = init_singular_vectors(W.shape, dtype=torch.float64)
    errors = []
    for _ in range(5):
        power_iteration_(W, u, v, iters=2)
        est = sigma_max_estimate(W, u, v)
        assert est <= true * (1 + 1e-12)
        errors.append((true - est).item())
    assert errors[-1] < errors[0]


def test_batched_equals_unbatched():
    W = torch.randn(3, 16, 8, dtype=torch.float64)
    u, v = init_singular_vectors(W.shape, dtype=torch.float64)
    ub, vb = u.clone(), v.clone()
    power_iteration_(W, ub, vb, iters=7)
    for i in range(3):
        ui, vi = u[i].clone(), v[i].clone()
        power_iteration_(W[i], ui, vi, iters=7)
        assert torch.allclose(ui, ub[i]) and torch.allclose(vi, vb[i])
    assert sigma_max_estimate(W, ub, vb).shape == (3,)


def test_zero_matrix_gives_zero_sigma_and_unit_vectors():
    W = torch.zeros(5, 7)
    u, v = init_singular_vectors(W.shape)
    power_iteration_(W, u, v, iters=3)
    assert sigma_max_estimate(W, u, v).item() == 0.0
    assert torch.allclose(u.norm(), torch.tensor(1.0))
    assert torch.allclose(v.norm(), torch.tensor(1.0))


def test_init_is_deterministic_and_validated():
    u1, v1 = init_singular_vectors((6, 4))
    u2, v2 = init_singular_vectors((6, 4))
    assert torch.equal(u1, u2) and torch.equal(v1, v2)
    W = torch.randn(6, 4)
    assert vectors_are_valid(W, u1, v1)
    assert not vectors_are_valid(W, v1, u1)
    assert not vectors_are_valid(W, torch.full_like(u1, float("nan")), v1)
    assert not vectors_are_valid(W, torch.zeros_like(u1), v1)
    with pytest.raises(ValueError, match="matrix of shape"):
        init_singular_vectors((5,))
    with pytest.raises(ValueError, match="iters must be >= 0"):
        power_iteration_(W, u1, v1, iters=-1)


def test_bf16_weight_iterates_in_fp32():
    W = torch.randn(32, 16).to(torch.bfloat16)
    u, v = init_singular_vectors(W.shape)
    power_iteration_(W, u, v, iters=30)
    true = torch.linalg.matrix_norm(W.double(), 2)
    assert u.dtype == torch.float32
    assert abs(sigma_max_estimate(W, u, v).double() - true) / true < 1e-2


def test_gradient_is_outer_product_of_vectors():
    W = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    u, v = init_singular_vectors(W.shape, dtype=torch.float64)
    power_iteration_(W, u, v, iters=50)
    sigma_max_estimate(W, u, v).backward()
    assert torch.allclose(W.grad, torch.outer(u, v))
