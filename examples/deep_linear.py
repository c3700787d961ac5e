"""Deep linear network, three ways: plain GD, GD with spectra clipped to [a, b], and GD
through the PC layer's functional core (``specopt.pc.pc_weight``).

    python examples/deep_linear.py [--steps 300]

Prints the loss every 50 steps (about a minute on 2 CPU cores). The full study (several
depths, rate fits, plots) is ``tools/deep_linear.py``; its results are in docs/results.md.
"""

import argparse

import torch

from specopt.pc import pc_weight, resolve_polynomial
from specopt.spectral.power_iteration import init_singular_vectors, power_iteration_

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=300)
steps = parser.parse_args().steps
torch.manual_seed(0)
d, depth, lr, a = 16, 4, 0.02, 0.5
X = torch.linalg.qr(torch.randn(64, d, dtype=torch.float64))[0].T  # whitened: X X^T = I
Y = torch.randn(d, d, dtype=torch.float64) / d**0.5 @ X + X  # target A = I + noise


def ill_conditioned(n: int) -> torch.Tensor:
    """Random singular vectors, singular values log-spaced in [1e-2, 1]."""
    U = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))[0]
    return U @ torch.diag(torch.logspace(0, -2, n, dtype=torch.float64)) @ V.T


start = [ill_conditioned(d) for _ in range(depth)]
coefficients = resolve_polynomial(level=4).coefficients


def train(arm: str) -> list[float]:
    Ws = [W.clone().requires_grad_(True) for W in start]
    gammas = [torch.ones((), dtype=torch.float64, requires_grad=True) for _ in Ws]
    uv = [init_singular_vectors(W.shape, dtype=torch.float64) for W in Ws]
    losses = []
    for _ in range(steps + 1):
        if arm == "pc":  # W_eff = gamma * s * f(W / s), gradients reach W and gamma
            with torch.no_grad():
                for W, (u, v) in zip(Ws, uv, strict=True):
                    power_iteration_(W, u, v, iters=10)  # warm-started sigma_max of W
            effective = [pc_weight(W, u.clone(), v.clone(), g, coefficients)
                         for W, (u, v), g in zip(Ws, uv, gammas, strict=True)]
        else:
            effective = Ws
        out = X
        for W in effective:
            out = W @ out
        loss = 0.5 * (out - Y).pow(2).sum()
        losses.append(float(loss.detach()))
        params = Ws + gammas if arm == "pc" else Ws
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= lr * g
            if arm == "clip":  # project each layer's singular values onto [a, 1/a]
                for W in Ws:
                    U, S, Vh = torch.linalg.svd(W)
                    W.copy_(U @ torch.diag(S.clamp(a, 1 / a)) @ Vh)
    return losses


curves = {arm: train(arm) for arm in ("gd", "clip", "pc")}
print("step   " + "  ".join(f"{arm:>10s}" for arm in curves))
for t in sorted({*range(0, steps + 1, 50), steps}):
    print(f"{t:5d}  " + "  ".join(f"{curves[arm][t]:10.3e}" for arm in curves))
