"""specopt.spectral.metrics against float64 numpy SVD references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specopt.spectral.metrics import (
    METRIC_NAMES,
    geometric_mean,
    matrix_metrics,
    model_aggregates,
    singular_values,
    spectrum_metrics,
)


def _reference(w: np.ndarray) -> dict[str, float]:
    """Metrics from numpy's float64 SVD, written from the formulas, not from our code."""
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    r = s.size
    k = math.ceil(0.1 * r)
    p = s / s.sum()
    h = -np.sum(p * np.log(p))
    m, n = w.shape
    return {
        "sigma_max": s[0],
        "sigma_min": s[-1],
        "condition_number": s[0] / s[-1],
        "gmcn": s[0] / np.sort(s)[:k].mean(),
        "stable_rank": np.sum(w.astype(np.float64) ** 2) / s[0] ** 2,
        "effective_rank": math.exp(h),
        "spectral_entropy": h / math.log(r),
        "rms_to_rms": math.sqrt(n / m) * s[0],
    }


@pytest.mark.parametrize("shape", [(7, 7), (30, 12), (12, 30), (41, 64)])
def test_metrics_match_numpy_svd(shape: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    # A spread spectrum: random orthogonal factors around log-spaced singular values.
    m, n = shape
    r = min(shape)
    q1, _ = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    w = q1 @ torch.diag(torch.logspace(0, -3, r, dtype=torch.float64)) @ q2.T
    sigma = singular_values([w], dtype=torch.float64)[0]
    got = spectrum_metrics(sigma, shape=shape)
    ref = _reference(w.numpy())
    assert list(got) == list(METRIC_NAMES)
    for name in METRIC_NAMES:
        assert float(got[name]) == pytest.approx(ref[name], rel=1e-9), name
    # matrix_metrics is the same pipeline returning floats.
    assert matrix_metrics([w], dtype=torch.float64)[0]["gmcn"] == pytest.approx(ref["gmcn"])


def test_fp32_condition_number_close_to_fp64() -> None:
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    c32 = spectrum_metrics(singular_values([w])[0])["condition_number"]
    c64 = _reference(w.numpy())["condition_number"]
    assert float(c32) == pytest.approx(c64, rel=1e-4)


def test_batched_over_leading_dims_and_unsorted_input() -> None:
    w = torch.randn(2, 3, 9, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (sigma,) = singular_values(w, dtype=torch.float64)
    assert sigma.shape == (2, 3, 5)
    got = spectrum_metrics(sigma.flip(-1))  # order does not matter
    for i in range(2):
        for j in range(3):
            ref = _reference(w[i, j].numpy())
            assert float(got["condition_number"][i, j]) == pytest.approx(ref["condition_number"])
            assert float(got["stable_rank"][i, j]) == pytest.approx(ref["stable_rank"])
    assert "rms_to_rms" not in got


def test_gmcn_averages_smallest_ten_percent() -> None:
    sigma = torch.arange(25, 0, -1, dtype=torch.float64)  # 25..1, k = ceil(2.5) = 3
    assert float(spectrum_metrics(sigma)["gmcn"]) == pytest.approx(25 / 2.0)
    sigma = torch.tensor([4.0, 2.0, 1.0])  # k = 1: GMCN = condition number
    got = spectrum_metrics(sigma)
    assert float(got["gmcn"]) == float(got["condition_number"]) == 4.0


def test_degenerate_spectra_report_not_raise() -> None:
    zero = spectrum_metrics(torch.zeros(4))
    assert zero["condition_number"] == math.inf and zero["gmcn"] == math.inf
    assert zero["stable_rank"] == 0 and zero["effective_rank"] == 0
    assert zero["spectral_entropy"] == 0 and zero["sigma_max"] == 0
    singular = spectrum_metrics(torch.tensor([3.0, 1.0, 0.0]))
    assert singular["condition_number"] == math.inf
    assert singular["stable_rank"] == pytest.approx(10 / 9)
    nan = spectrum_metrics(torch.tensor([[1.0, math.nan], [2.0, 1.0]]))
    for name, value in nan.items():
        assert math.isnan(float(value[0])), name
        assert math.isfinite(float(value[1])), name
    one = spectrum_metrics(torch.tensor([2.0]))  # a vector-like (1, n) matrix
    assert one["spectral_entropy"] == 0 and one["effective_rank"] == 1


def test_singular_values_groups_shapes_keeps_order_and_survives_nan() -> None:
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(6, 4, generator=gen), torch.randn(3, 5, generator=gen)
    bad = a.clone()
    bad[0, 0] = math.nan
    inf = b.clone()
    inf[1, 1] = math.inf
    conv = torch.randn(4, 2, 3, 3, generator=gen)
    out = singular_values([a, b, bad, inf, a.bfloat16(), conv])
    np.testing.assert_allclose(out[0], np.linalg.svd(a.numpy(), compute_uv=False), rtol=1e-5)
    np.testing.assert_allclose(out[1], np.linalg.svd(b.numpy(), compute_uv=False), rtol=1e-5)
    assert out[2].shape == (4,) and torch.isnan(out[2]).all()
    assert out[3].shape == (3,) and torch.isnan(out[3]).all()
    assert out[4].dtype == torch.float32  # bf16 upcast (svdvals has no bf16 kernel)
    ref_bf16 = np.linalg.svd(a.bfloat16().float().numpy(), compute_uv=False)
    np.testing.assert_allclose(out[4], ref_bf16, rtol=1e-5)
    ref_conv = np.linalg.svd(conv.reshape(4, -1).numpy(), compute_uv=False)
    np.testing.assert_allclose(out[5], ref_conv, rtol=1e-5)
    assert singular_values([a], dtype=torch.float64)[0].dtype == torch.float64


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match=r"weights\[1\] must be a non-empty matrix, got \(3,\)"):
        singular_values([torch.ones(2, 2), torch.ones(3)])
    with pytest.raises(ValueError, match=r"dtype must be torch\.float32 or torch\.float64"):
        singular_values([torch.ones(2, 2)], dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"sigma must have shape \(..., r\) with r >= 1"):
        spectrum_metrics(torch.ones(3, 0))
    with pytest.raises(TypeError, match="sigma must be a floating tensor"):
        spectrum_metrics(torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="shape must be positive"):
        spectrum_metrics(torch.ones(3), shape=(0, 3))


def test_geometric_mean_and_model_aggregates() -> None:
    vals = torch.tensor([2.0, 8.0, math.inf, math.nan, 0.0])
    assert float(geometric_mean(vals)) == pytest.approx(4.0)
    assert math.isnan(float(geometric_mean(torch.tensor([math.nan]))))
    agg = model_aggregates({"condition_number": [1.0, 100.0, math.inf, math.nan],
                            "gmcn": torch.tensor([3.0, 12.0])})
    assert agg["condition_number"] == pytest.approx(10.0)
    assert agg["condition_number_max"] == math.inf
    assert agg["nonfinite_matrices"] == 1
    assert agg["gmcn"] == pytest.approx(6.0)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=40))
def test_rank_metrics_stay_in_their_ranges(values: list[float]) -> None:
    sigma = torch.tensor(values, dtype=torch.float64)
    r = len(values)
    got = spectrum_metrics(sigma)
    assert 1 - 1e-9 <= float(got["stable_rank"]) <= r + 1e-9
    assert 1 - 1e-9 <= float(got["effective_rank"]) <= r + 1e-9
    assert -1e-12 <= float(got["spectral_entropy"]) <= 1 + 1e-12
    assert float(got["gmcn"]) <= float(got["condition_number"]) * (1 + 1e-12)
    assert float(got["condition_number"]) >= 1


@pytest.mark.parametrize("shape", [(48, 200), (200, 48), (64, 64), (1, 30), (30, 1)])
@pytest.mark.parametrize("log10_cond", [0.5, 3.0, 4.65, 6.0])  # 4.65: Gram route at its limit
def test_gram_route_matches_float64_svd_to_1e6(shape, log10_cond) -> None:
    """The Gram eigenvalue route (and its svdvals fallback past GRAM_MAX_CONDITION) keeps
    every singular value within 1e-6 relative of numpy's float64 SVD, on both sides."""
    from specopt.spectral.metrics import GRAM_MAX_CONDITION

    gen = torch.Generator().manual_seed(7)
    m, n = shape
    r = min(m, n)
    q1, _ = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    s = torch.logspace(0, -log10_cond, r, dtype=torch.float64) if r > 1 else torch.ones(1)
    w = (q1 * s) @ q2.T
    ref = np.linalg.svd(w.numpy(), compute_uv=False)
    got = singular_values([w.float(), w], dtype=torch.float64)
    ref32 = np.linalg.svd(w.float().double().numpy(), compute_uv=False)
    np.testing.assert_allclose(got[0].numpy(), ref32, rtol=1e-6, atol=0)
    np.testing.assert_allclose(got[1].numpy(), ref, rtol=1e-6, atol=0)
    assert (10**log10_cond > GRAM_MAX_CONDITION) == (log10_cond == 6.0)  # both paths ran


def test_cpu_spectra_reuse_one_float64_stage_per_shape(monkeypatch) -> None:
    """CPU matrices go one at a time through one float64 buffer per shape (no batch copy,
    no per-matrix allocation), and the values still match float64 SVD."""
    import specopt.spectral.metrics as metrics

    stages = []
    real = metrics._CpuStage

    def spy(m, n):
        stages.append((m, n))
        return real(m, n)

    monkeypatch.setattr(metrics, "_CpuStage", spy)
    ws = [torch.randn(16, 32) for _ in range(5)] + [torch.randn(40, 24) for _ in range(3)]
    got = singular_values(ws)
    assert sorted(stages) == [(16, 32), (40, 24)]
    for w, s in zip(ws, got, strict=True):
        np.testing.assert_allclose(s.numpy(), np.linalg.svd(w.double().numpy(), compute_uv=False),
                                   rtol=1e-6)


def test_accelerator_batches_chunk_by_bytes() -> None:
    """Batched (non-CPU) calls split same-shaped matrices so matrix + Gram bytes of one
    call stay within CHUNK_BYTES; the CPU batch entry point agrees with the list one."""
    from specopt.spectral.metrics import CHUNK_BYTES, _chunks, spectra_float64

    per = 8 * (16 * 32 + 16 * 16)
    assert _chunks(list(range(7)), CHUNK_BYTES // 3 + 1) == [[0, 1], [2, 3], [4, 5], [6]]
    assert _chunks(list(range(7)), per) == [list(range(7))]
    assert _chunks([4], 4 * CHUNK_BYTES) == [[4]]  # one matrix larger than a chunk
    batch = torch.randn(3, 16, 32, dtype=torch.float64)
    want = torch.stack(singular_values(list(batch.unbind(0)), dtype=torch.float64))
    torch.testing.assert_close(spectra_float64(batch), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("shape", [(300, 128), (128, 300), (200, 200), (40, 50), (96, 8, 3, 3)])
def test_spectral_norms_match_float64_svd(shape) -> None:
    """sigma_1 exact to float64 rounding: random, clustered (an orthogonalized update:
    Lanczos's hard case), and ill-conditioned (1e8) spectra, conv kernels flattened."""
    from specopt.spectral.metrics import spectral_norms

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(*shape, generator=gen, dtype=torch.float64)
    m = w.reshape(shape[0], -1)
    u, s, vt = torch.linalg.svd(m, full_matrices=False)
    r = s.numel()
    clustered = (u * (1 + 1e-3 * torch.rand(r, generator=gen, dtype=torch.float64))) @ vt
    ill = (u * torch.logspace(0, -8, r, dtype=torch.float64)) @ vt
    mats = [w, clustered.reshape(shape), ill.reshape(shape), w.float()]
    got = spectral_norms(mats, dtype=torch.float64)
    assert got.shape == (4,) and got.dtype == torch.float64
    for g, x in zip(got.tolist(), mats, strict=True):
        ref = np.linalg.svd(x.reshape(shape[0], -1).double().numpy(), compute_uv=False)[0]
        assert g == pytest.approx(ref, rel=1e-12)
    assert spectral_norms([w], dtype=torch.float32).dtype == torch.float32


def test_spectral_norms_and_spectra_of_degenerate_matrices(capfd) -> None:
    """Zero -> 0; NaN/Inf entry -> NaN; finite float64 weights whose Gram overflows (1e200)
    -> the right values through the SVD path, without LAPACK's error chatter."""
    from specopt.spectral.metrics import spectral_norms

    big = torch.randn(150, 90, dtype=torch.float64) * 1e200
    bad = torch.randn(100, 120)
    bad[3, 7] = float("inf")
    norms = spectral_norms([torch.zeros(100, 200), big, bad], dtype=torch.float64)
    ref = np.linalg.svd(big.numpy(), compute_uv=False)
    assert norms[0] == 0 and norms[1].item() == pytest.approx(ref[0], rel=1e-12)
    assert math.isnan(norms[2])
    sig = singular_values([big, bad], dtype=torch.float64)
    np.testing.assert_allclose(sig[0].numpy(), ref, rtol=1e-12)
    assert torch.isnan(sig[1]).all()
    out = capfd.readouterr()
    assert "DLASCL" not in out.err + out.out and "illegal value" not in out.err + out.out
    with pytest.raises(ValueError, match=r"weights\[0\] must be a non-empty matrix"):
        spectral_norms([torch.zeros(3)])
    assert spectral_norms([]).shape == (0,)


def test_failed_eigensolve_falls_back_to_svdvals(monkeypatch) -> None:
    """A finite matrix whose Gram eigensolve fails (LAPACK non-convergence) or overflows
    (float64 entries near 1e200) gets svdvals' values, not NaN; NaN entries stay NaN."""
    import scipy.linalg

    gen = torch.Generator().manual_seed(5)
    a = torch.randn(8, 16, generator=gen, dtype=torch.float64)
    bad = a.clone()
    bad[2, 3] = math.nan
    ref = np.linalg.svd(a.numpy(), compute_uv=False)

    def no_convergence(*args, **kwargs):
        raise scipy.linalg.LinAlgError("did not converge")

    with monkeypatch.context() as patched:
        patched.setattr(scipy.linalg, "eigh", no_convergence)
        got_a, got_bad = singular_values([a, bad], dtype=torch.float64)
    np.testing.assert_allclose(got_a.numpy(), ref, rtol=1e-12)
    assert torch.isnan(got_bad).all()
    huge = singular_values([a * 1e200], dtype=torch.float64)[0]  # Gram overflows to inf
    np.testing.assert_allclose(huge.numpy(), ref * 1e200, rtol=1e-12)


def test_snapshot_blas_follows_torch_threads() -> None:
    """scipy's own OpenBLAS runs with torch's thread count during a decomposition (its
    default, one thread per core, spun on barriers under load: 35x slower on small Gram
    matrices), and gets its own setting back afterwards."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import scipy.linalg  # noqa: F401  (its BLAS loaded, as during a snapshot)

    from specopt.spectral.metrics import _blas_threads_like_torch

    def scipy_blas_threads() -> list[int]:
        return [i["num_threads"] for i in threadpoolctl.threadpool_info()
                if i["internal_api"] == "openblas"]

    before = scipy_blas_threads()
    assert before, "no OpenBLAS loaded (scipy / numpy wheels ship one)"
    with _blas_threads_like_torch():
        assert scipy_blas_threads() == [torch.get_num_threads()] * len(before)
    assert scipy_blas_threads() == before
