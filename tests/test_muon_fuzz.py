"""Fuzz the NS core and Muon over dtypes with zero, tiny and huge inputs (issue 14.1):
never NaN, zero maps to zero, a finite nonzero input never gives an all-zero update."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from specopt import Muon
from specopt.optim.newton_schulz import orthogonalize

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = [(6, 10), (10, 6), (8, 8), (4, 16)]  # wide, tall, square, Gram side (aspect 4)
# (scale, whether the scaled matrix's Frobenius norm is at least eps, so it must come out
# near-orthogonal rather than merely nonzero: below eps torch's floor shrinks it on purpose)
SCALES = [(1.0, True), (1e-9, False), (1e-30, False), (1e19, True), (1e30, True), (3e38, True)]
MODES = [
    dict(),  # specopt default: pe4, tight, auto (Gram for aspect >= 2)
    dict(schedule="jordan", normalize="frobenius", method="standard"),  # torch's iteration
    dict(schedule="polar_express", method="gram"),
]


def _inputs(shape, scale, seed):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(*shape, generator=g)
    rank1 = torch.randn(shape[0], 1, generator=g) @ torch.randn(1, shape[1], generator=g)
    spike = torch.zeros(*shape)
    spike[0, 0] = 1.0
    for M in (dense, rank1, spike):
        M = M / M.abs().max()  # entries in [-1, 1], so scale * M stays finite in fp32
        yield (M.double() * scale).float()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES, ids=["default", "torch", "pe-gram"])
def test_ns_core_never_nan_nor_zero(dtype, mode):
    failures = []
    for (shape, (scale, normal)), seed in itertools.product(
        itertools.product(SHAPES, SCALES), range(2)
    ):
        for k, G in enumerate(_inputs(shape, scale, seed)):
            O = orthogonalize(G, dtype=dtype, **mode)
            case = f"{shape} scale={scale:g} input#{k} seed={seed}"
            if not torch.isfinite(O).all():
                failures.append(f"non-finite: {case}")
            elif not O.abs().amax() > 0:
                failures.append(f"all-zero: {case}")
            elif normal and not 0.5 < torch.linalg.matrix_norm(O.double(), ord=2) < 1.6:
                failures.append(f"sigma_max off: {case}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_maps_to_zero_in_every_dtype(dtype):
    for shape, mode in itertools.product(SHAPES, MODES):
        O = orthogonalize(torch.zeros(*shape), dtype=dtype, **mode)
        assert torch.equal(O, torch.zeros(*shape, dtype=dtype)), (shape, mode)


@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_muon_huge_and_tiny_gradients_move_the_weights(ns_dtype):
    # One 1e30 spike used to freeze a matrix (zero update); fp16 used to write NaN for 1e-9.
    # Below eps (||G||_F < 1e-7) torch's floor shrinks the update on purpose: nonzero only.
    for scale, least in ((1e30, 1e-3), (1e-9, 1e-3), (1e-25, 0.0)):
        w = nn.Parameter(torch.zeros(8, 12))
        opt = Muon([w], lr=0.1, weight_decay=0.0, ns_dtype=ns_dtype)
        w.grad = torch.randn(8, 12, generator=torch.Generator().manual_seed(0)) * scale
        opt.step()
        assert torch.isfinite(w).all(), scale
        assert w.abs().amax() > least, f"update vanished at gradient scale {scale}"
