"""Newton-Schulz orthogonalization: the one NS core in specopt (used by Muon and anything
else that needs an approximate polar factor).

Given ``G`` with SVD ``U S V^T``, the polar factor is ``polar(G) = U V^T``. Newton-Schulz
approximates it with odd matrix polynomials: after normalizing ``X_0 = G / ||G||_F`` (so every
singular value lies in (0, 1]), each step applies ``p_t(x) = a_t x + b_t x^3 + c_t x^5`` to the
singular values::

    A = X X^T;  B = b_t A + c_t A A;  X <- a_t X + B X          (standard side)

Shapes: ``(m, n)`` or a batch ``(B, m, n)`` of same-shaped matrices. The iteration works
with the small side ``n_small x n_small`` (for tall inputs through transposed views,
multiplying from the right, so no transposed copy is made); the output has the input's
shape and the compute ``dtype``. :class:`NSWorkspace` holds the buffers so a caller that
orthogonalizes the same shapes every step (Muon) allocates them once.

Schedules (coefficient sets, see ``shared/reference/muon.md`` and :data:`SCHEDULES`):

- ``"jordan"``: Keller Jordan's constant (3.4445, -4.7750, 2.0315), 5 steps (torch.optim.Muon).
- ``"tuned"``: a published per-step quintic, 5 steps.
- ``"polar_express"``: the 5-step Polar Express set used with normalization ``1.02 ||X||_F``.
- ``"polar_express_paper"``: exactly the published algorithm (arXiv 2505.16932): its greedy
  l=1e-3 schedule (8 steps, the last repeated), the 1.01 safety factor on every step but
  that last one, and normalization by ``1.01 ||G||_F``.
- ``"pe4"``: a 4-step Polar Express schedule designed here by :func:`design_polar_express`
  (``steps=4, lower=3e-3``; the tests regenerate it). Meant for ``normalize="tight"``.

A schedule is a name, an :class:`NSSchedule`, one ``(a, b, c)`` tuple (constant) or a
sequence of tuples (one per step). **When ``steps`` exceeds the length of a per-step
schedule, its last entry repeats** (so a constant schedule is a length-1 sequence).

Gram side (``method="gram"``, arXiv "Gram Newton-Schulz", Zhang, Amsel, Chen, Dao 2026):
every iterate is ``Q_t X_0`` with ``Q_t`` a polynomial in ``R_0 = X_0 X_0^T``, so for a wide
``n x m`` matrix (``m = alpha n``) the loop runs on ``n x n`` matrices only::

    R = X X^T; Q = I
    each step: P = a I + b R + c R^2;  Q <- Q P;  R <- P R P
    output Q X

Half precision gives ``R`` spurious negative eigenvalues that the polynomials amplify; a
*restart* (``X <- Q X; R <- X X^T; Q <- I``) before step 2 keeps 5 steps stable in bf16.
``method="auto"`` uses the Gram side when ``max(m, n) / min(m, n) >= gram_min_aspect``
(square matrices gain nothing from it; see :func:`ns_matmul_flops`).

:func:`polar_factor` is the exact float64 SVD reference; :func:`orthogonality_error` is the
RMS of ``|sigma_i - 1|`` used by the tests and ``tools/bench_muon.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DEFAULT_EPS",
    "GRAM_MIN_ASPECT",
    "METHODS",
    "NORMALIZATIONS",
    "SCHEDULES",
    "Coefficients",
    "NSSchedule",
    "NSWorkspace",
    "ScheduleLike",
    "design_polar_express",
    "frobenius_normalize_",
    "narrow_range",
    "ns_matmul_flops",
    "orthogonality_error",
    "orthogonalize",
    "orthogonalize_flops",
    "orthogonalize_into_",
    "orthogonalize_many",
    "polar_factor",
    "resolve_schedule",
]

Coefficients = tuple[float, float, float]

#: Normalization floor ``X / max(safety * ||X||_F, eps)``; torch.optim.Muon's value.
DEFAULT_EPS = 1e-7

#: ``method="auto"`` uses the Gram side from this aspect ratio on. FLOP break-even for
#: 5 steps is 1.5 (see ns_matmul_flops); 2 leaves room for the extra small-matrix overhead.
GRAM_MIN_ASPECT = 2.0

#: Gram restarts (step indices before which ``X <- Q X`` is recomputed): one before step 2,
#: the published fix for bf16 (the reference's "restart after step 2").
DEFAULT_GRAM_RESTARTS: tuple[int, ...] = (2,)

METHODS = ("auto", "standard", "gram")
NORMALIZATIONS = ("frobenius", "tight")


@dataclass(frozen=True)
class NSSchedule:
    """A Newton-Schulz coefficient schedule.

    Attributes:
        coefficients: per-step ``(a, b, c)`` of ``p(x) = a x + b x^3 + c x^5``; steps past the
            end repeat the last entry.
        safety: normalization ``X_0 = G / max(safety * ||G||_F, eps)``; 1.0 is torch's.
        steps: default step count when the caller gives none.
        name: label for reports.
    """

    coefficients: tuple[Coefficients, ...]
    safety: float = 1.0
    steps: int = 5
    name: str = "custom"

    def at(self, step: int) -> Coefficients:
        """Coefficients of step ``step`` (0-based); the last entry repeats."""
        return self.coefficients[min(step, len(self.coefficients) - 1)]


ScheduleLike = str | NSSchedule | Coefficients | Sequence[Coefficients]


def _scale(c: Coefficients, s: float) -> Coefficients:
    # p(x / s): the safety factor that keeps rounding from pushing sigma above the interval.
    return (c[0] / s, c[1] / s**3, c[2] / s**5)


_PE_PAPER_L1E3 = (  # arXiv 2505.16932, greedy l=1e-3, before the 1.01 safety scaling
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)

#: Output of ``design_polar_express(4, 3e-3)`` (defaults: upper=1, cushion=0.02, safety=1.01
#: on non-final steps), stored so import needs no Remez solve; test_newton_schulz.py checks
#: that the design still reproduces it. l=3e-3 was picked by ``tools/bench_muon.py --sweep``
#: (with ``normalize="tight"``, 1e-3 and 1e-2 lift fewer small singular values in 4 steps).
_PE4_L3E3: tuple[Coefficients, ...] = (
    (8.169348612251861, -22.966678989328802, 16.542941470394528),
    (3.9794723910173757, -2.867432609321302, 0.5293765578506169),
    (3.484183286303255, -2.558951174128763, 0.5012668311273665),
    (2.506069581663809, -1.8478249605898895, 0.43832406856494716),
)

SCHEDULES: dict[str, NSSchedule] = {
    "jordan": NSSchedule(((3.4445, -4.7750, 2.0315),), 1.0, 5, "jordan"),
    "tuned": NSSchedule(
        (
            (4.0848, -6.8946, 2.9270),
            (3.9505, -6.3029, 2.6377),
            (3.7418, -5.5913, 2.3037),
            (2.8769, -3.1427, 1.2046),
            (2.8366, -3.0525, 1.2012),
        ),
        1.0,
        5,
        "tuned",
    ),
    # modded-nanogpt normalizes by 1.02 ||X||_F + 1e-6; here max(1.02 ||X||_F, eps).
    "polar_express": NSSchedule(
        (
            (8.156554524902461, -22.48329292557795, 15.878769915207462),
            (4.042929935166739, -2.808917465908714, 0.5000178451051316),
            (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
            (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
            (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
        ),
        1.02,
        5,
        "polar_express",
    ),
    # The published algorithm: every step but the last (repeated) one divided by 1.01, and
    # X_0 = G / (1.01 ||G||_F + 1e-7) (here max(1.01 ||G||_F, eps)).
    "polar_express_paper": NSSchedule(
        (*(_scale(c, 1.01) for c in _PE_PAPER_L1E3[:-1]), _PE_PAPER_L1E3[-1]),
        1.01,
        5,
        "polar_express_paper",
    ),
    "pe4": NSSchedule(_PE4_L3E3, 1.0, 4, "pe4"),
}


def resolve_schedule(schedule: ScheduleLike, *, argname: str = "schedule") -> NSSchedule:
    """Turn a schedule name, one ``(a, b, c)`` tuple or a per-step sequence into an
    :class:`NSSchedule`; raises ``ValueError`` naming ``argname`` on bad input."""
    if isinstance(schedule, NSSchedule):
        return schedule
    if isinstance(schedule, str):
        if schedule not in SCHEDULES:
            raise ValueError(
                f"{argname}: unknown schedule {schedule!r}; expected one of "
                f"{sorted(SCHEDULES)}, an (a, b, c) tuple or a sequence of them"
            )
        return SCHEDULES[schedule]
    try:
        items = list(schedule)
    except TypeError:
        raise ValueError(
            f"{argname}: expected a schedule name, an (a, b, c) tuple or a sequence of "
            f"them, got {schedule!r}"
        ) from None
    if len(items) == 3 and all(isinstance(x, (int, float)) for x in items):
        items = [tuple(items)]  # one constant (a, b, c)
    if not items:
        raise ValueError(f"{argname}: empty schedule")
    coeffs = []
    for i, c in enumerate(items):
        try:
            t = tuple(float(x) for x in c)
        except (TypeError, ValueError):
            raise ValueError(f"{argname}[{i}]: expected an (a, b, c) tuple, got {c!r}") from None
        if len(t) != 3 or not all(math.isfinite(x) for x in t):
            raise ValueError(f"{argname}[{i}]: expected 3 finite coefficients, got {c!r}")
        coeffs.append(t)
    steps = 5 if len(coeffs) == 1 else len(coeffs)
    return NSSchedule(tuple(coeffs), 1.0, steps, "custom")


def _check_input(G: Tensor) -> None:
    if not (G.is_floating_point() or G.is_complex()):
        raise ValueError(f"orthogonalize: expected a floating-point tensor, got {G.dtype}")
    if G.ndim not in (2, 3):
        raise ValueError(
            f"orthogonalize: expected a matrix (m, n) or a batch (B, m, n), "
            f"got shape {tuple(G.shape)}"
        )
    if G.is_complex():
        raise ValueError("orthogonalize: complex inputs are not supported")


#: Below this Frobenius norm the squares of fp32/bf16 entries may underflow; only matters
#: when the floor ``eps`` is smaller still (the fp16 path, see :func:`orthogonalize_into_`).
_NORM_UNDERFLOW = 1e-18


def frobenius_normalize_(X: Tensor, *, eps: float = DEFAULT_EPS, safety: float = 1.0) -> Tensor:
    """In place, per matrix of ``X`` (``(..., r, c)``): ``X /= max(safety * ||X||_F, eps)``.

    The same ops as torch.optim.Muon (so bit-identical to it in bf16). The norm's squares
    overflow for ``||X||_F`` above ~1.8e19 in fp32/bf16, which would divide by inf and give
    an all-zero update (and underflow below ~1e-18, which matters only for ``eps`` below
    that): such matrices, and only those, are first divided twice by ``sqrt(||X||_F)``
    computed in float64, then normalized as usual (one host sync, on that rare path only).
    Returns ``X``.
    """
    dims = (-2, -1)
    norm = torch.linalg.vector_norm(X, dim=dims, keepdim=True)
    unsafe = ~torch.isfinite(norm)
    if eps < _NORM_UNDERFLOW:
        unsafe |= norm < _NORM_UNDERFLOW
    if bool(unsafe.any()):
        exact = torch.linalg.vector_norm(X.double(), dim=dims, keepdim=True)
        root = torch.where(unsafe & (exact > 0), exact.sqrt(), 1.0).to(X.dtype)
        X.div_(root).div_(root)  # dividing by exactly 1.0 leaves the other matrices' bits alone
        norm = torch.linalg.vector_norm(X, dim=dims, keepdim=True)
    if safety != 1.0:
        norm = norm * safety
    return X.div_(norm.clamp(min=eps))


def narrow_range(dtype: torch.dtype) -> bool:
    """True for fp16-like dtypes, whose exponent range cannot hold ordinary gradients'
    squared norms (nor ``G / eps`` for tiny ``G``): NS normalizes in the input's precision
    before casting to them (see :func:`orthogonalize_into_`)."""
    return torch.finfo(dtype).max < 1e38  # bf16's max is 3.39e38, fp32's 3.40e38


class NSWorkspace:
    """Buffers for orthogonalizing a batch of ``batch`` same-shaped ``(rows, cols)`` matrices
    in ``dtype``, reused across calls so a training step allocates and copies no batch.

    Write the matrices into :attr:`input` (``(batch, rows, cols)``), or pass them to
    :func:`orthogonalize_into_`. The iteration works on the wide orientation ``(n, m)``,
    ``n <= m``, as transposed *views*: tall matrices keep their own memory layout (a
    transposed copy costs ~10x a contiguous pass on CPU) and are multiplied from the right
    (``X <- X P``, the transpose of ``P X``). ``torch_layout=True`` instead writes the
    iterates wide, as torch.optim.Muon does, so its mode is bit-identical to torch.
    The result returned by :meth:`run` is a view of a buffer, valid until the next run.
    """

    def __init__(
        self,
        batch: int,
        rows: int,
        cols: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        *,
        torch_layout: bool = False,
    ) -> None:
        self.dtype = dtype
        self.device = torch.device(device)
        self.n, self.m = min(rows, cols), max(rows, cols)
        self.tall = rows > cols
        self.right_side = self.tall and not torch_layout
        self.batch = batch
        #: ``(batch, rows, cols)``: the normalized matrices to orthogonalize.
        self.input = torch.empty(batch, rows, cols, dtype=dtype, device=self.device)
        self._x = [self._new_x(), self._new_x()]
        self._square: dict[str, Tensor] = {}

    def _new_x(self) -> Tensor:
        b, n, m = self.batch, self.n, self.m
        if self.right_side:
            return torch.empty(b, m, n, dtype=self.dtype, device=self.device).mT
        return torch.empty(b, n, m, dtype=self.dtype, device=self.device)

    def _sq(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        """An ``(batch, n, n)`` buffer, allocated on first use."""
        buf = self._square.get(name)
        if buf is None:
            buf = torch.empty(self.batch, self.n, self.n, dtype=dtype or self.dtype,
                              device=self.device)
            self._square[name] = buf
        return buf

    def buffers(self) -> list[Tensor]:
        """Every buffer allocated so far (tests check that steps reuse them)."""
        return [self.input, *self._x, *self._square.values()]

    def _lmul(self, P: Tensor, X: Tensor, out: Tensor, beta: float | None) -> Tensor:
        # out <- P X (+ beta X); all logical (batch, n, m). Right side: out^T = X^T P^T.
        if self.right_side:
            Xt, Pt = X.mT, P.mT
            if beta is None:
                torch.bmm(Xt, Pt, out=out.mT)
            else:
                torch.baddbmm(Xt, Xt, Pt, beta=beta, out=out.mT)
        elif beta is None:
            torch.bmm(P, X, out=out)
        else:
            torch.baddbmm(X, P, X, beta=beta, out=out)
        return out

    def _tight_poly(self, A: Tensor, coeffs: Coefficients, safety: float, out: str) -> Tensor:
        """``P = a r I + b r^3 A + c r^5 A^2`` with ``1/r = safety (sum sigma_i^8)^(1/8)``,
        so that ``P X = p(r X)``: the "tight" first step (no extra matmul: ``A^2`` is needed
        anyway), written into the square buffer ``out``. Built in fp32 so tiny scales cannot
        overflow a 16-bit coefficient."""
        a, b, c = coeffs
        S = torch.bmm(A, A, out=self._sq(out))
        wide = torch.promote_types(self.dtype, torch.float32)
        if wide == self.dtype:
            A32, S32 = A, S
        else:
            A32 = self._sq("A32", wide).copy_(A)
            S32 = self._sq("S32", wide).copy_(S)
        # ||A^2||_F = (sum sigma^8)^(1/2) >= sigma_max^2. A unit-Frobenius X has
        # sigma_max^2 >= 1/n, so the clamp only acts on zero or sub-eps inputs (bounding r).
        r2 = torch.linalg.vector_norm(S32, dim=(-2, -1), keepdim=True).sqrt_()
        r2 = (r2 * safety**2).clamp_(min=1.0 / self.n).reciprocal_()
        r = r2.sqrt()
        S32.mul_(r2 * r2 * r * c).addcmul_(A32, r2 * r * b)
        S32.diagonal(dim1=-2, dim2=-1).add_((r * a).squeeze(-1))
        return S if S32 is S else S.copy_(S32)

    def run(
        self,
        sched: NSSchedule,
        steps: int,
        *,
        method: str,
        tight: bool,
        restarts: tuple[int, ...] = (),
    ) -> Tensor:
        """Iterate on :attr:`input` (already normalized); returns ``(batch, rows, cols)``."""
        X = self.input.mT if self.tall else self.input  # (batch, n, m) view
        k = 0

        def next_x() -> Tensor:
            nonlocal k
            k ^= 1
            return self._x[k ^ 1]

        if method == "standard":  # torch's op sequence: A = X X^T; B = b A + c A^2; aX + B X
            A = self._sq("A")
            for t in range(steps):
                a, b, c = sched.at(t)
                torch.bmm(X, X.mT, out=A)
                if t == 0 and tight:
                    P = self._tight_poly(A, (a, b, c), sched.safety, "S")
                    X = self._lmul(P, X, next_x(), None)
                else:
                    Bm = torch.baddbmm(A, A, A, beta=b, alpha=c, out=self._sq("S"))
                    X = self._lmul(Bm, X, next_x(), a)
        else:
            X = self._gram(X, sched, steps, tight, restarts, next_x)
        return X.mT if self.tall else X

    def _gram(self, X, sched, steps, tight, restarts, next_x) -> Tensor:
        # Every iterate is Q X0, Q a polynomial in R0 = X0 X0^T: loop on (n, n) matrices only.
        R = torch.bmm(X, X.mT, out=self._sq("R"))
        q_name: str | None = None  # None while Q is the identity (saves a matmul)
        for t in range(steps):
            if t in restarts and q_name is not None:
                X = self._lmul(self._sq(q_name), X, next_x(), None)
                torch.bmm(X, X.mT, out=R)
                q_name = None
            a, b, c = sched.at(t)
            p_name = "P0" if q_name != "P0" else "P1"
            if t == 0 and tight:
                P = self._tight_poly(R, (a, b, c), sched.safety, p_name)
            else:
                P = torch.baddbmm(R, R, R, beta=b, alpha=c, out=self._sq(p_name))
                P.diagonal(dim1=-2, dim2=-1).add_(a)
            if q_name is None:
                q_name = p_name
            else:
                out_name = "Q0" if q_name != "Q0" else "Q1"
                torch.bmm(self._sq(q_name), P, out=self._sq(out_name))
                q_name = out_name
            if t + 1 < steps and (t + 1) not in restarts:
                T = torch.bmm(P, R, out=self._sq("T"))
                torch.bmm(T, P, out=R)  # R <- P R P
        return X if q_name is None else self._lmul(self._sq(q_name), X, next_x(), None)


def _resolve(
    shape: tuple[int, int],
    dtype: torch.dtype,
    *,
    schedule: ScheduleLike,
    steps: int | None,
    method: str,
    restarts: Sequence[int] | None,
    gram_min_aspect: float,
    normalize: str,
) -> tuple[NSSchedule, int, str, tuple[int, ...], bool]:
    if normalize not in NORMALIZATIONS:
        raise ValueError(
            f"orthogonalize: normalize must be one of {NORMALIZATIONS}, got {normalize!r}"
        )
    if method not in METHODS:
        raise ValueError(f"orthogonalize: method must be one of {METHODS}, got {method!r}")
    sched = resolve_schedule(schedule)
    steps = sched.steps if steps is None else steps
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps < 100:
        raise ValueError(f"orthogonalize: steps must be an int in [1, 100), got {steps!r}")
    n, m = sorted(shape)
    if method == "auto":
        method = "gram" if m >= gram_min_aspect * n else "standard"
    if restarts is None:
        restarts = DEFAULT_GRAM_RESTARTS if torch.finfo(dtype).bits <= 16 else ()
    return sched, steps, method, tuple(restarts), normalize == "tight"


def orthogonalize_into_(
    workspace: NSWorkspace,
    U: Tensor,
    *,
    schedule: ScheduleLike = "pe4",
    steps: int | None = None,
    eps: float = DEFAULT_EPS,
    method: str = "auto",
    restarts: Sequence[int] | None = None,
    gram_min_aspect: float = GRAM_MIN_ASPECT,
    normalize: str = "tight",
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Orthogonalize the batch ``U`` (``(batch, rows, cols)``, matching ``workspace``) with
    :class:`NSWorkspace` buffers; **``U`` is overwritten** (it may be ``workspace.input``).

    Options as in :func:`orthogonalize` (``dtype`` must be the workspace's if given).
    Normalization: after the cast to the workspace dtype (torch's order: the result depends
    only on the cast values, so the distributed stage may send them in that dtype), except
    for fp16, whose narrow exponent range needs it done in ``U``'s precision first, with
    ``eps`` replaced by fp32's smallest normal number (every nonzero matrix is scaled to
    unit norm: fp16 cannot hold ``G / eps`` for ``||G|| << eps``). Returns a view of a
    workspace buffer, valid until its next use.
    """
    ws = workspace
    assert dtype is None or dtype == ws.dtype, "the workspace fixes the compute dtype"
    sched, steps, method, restarts, tight = _resolve(
        (ws.n, ws.m), ws.dtype, schedule=schedule, steps=steps, method=method,
        restarts=restarts, gram_min_aspect=gram_min_aspect, normalize=normalize,
    )
    if narrow_range(ws.dtype):
        # fp16 cannot hold G / eps for ||G|| << eps: normalize every nonzero matrix to 1.
        eps = torch.finfo(torch.float32).tiny
    if U is ws.input:
        frobenius_normalize_(U, eps=eps, safety=sched.safety)
    elif narrow_range(ws.dtype):
        ws.input.copy_(frobenius_normalize_(U, eps=eps, safety=sched.safety))
    else:  # U is only read here (orthogonalize relies on it: no private copy of G)
        frobenius_normalize_(ws.input.copy_(U), eps=eps, safety=sched.safety)
    return ws.run(sched, steps, method=method, tight=tight, restarts=restarts)


def orthogonalize(
    G: Tensor,
    *,
    schedule: ScheduleLike = "pe4",
    steps: int | None = None,
    eps: float = DEFAULT_EPS,
    dtype: torch.dtype | None = None,
    method: str = "auto",
    restarts: Sequence[int] | None = None,
    gram_min_aspect: float = GRAM_MIN_ASPECT,
    normalize: str = "tight",
) -> Tensor:
    """Approximate polar factor ``U V^T`` of ``G`` by Newton-Schulz.

    Args:
        G: ``(m, n)`` or ``(B, m, n)``; any real floating dtype.
        schedule: see the module docstring; default ``"pe4"`` (benchmark-chosen).
        steps: number of NS steps; ``None`` takes the schedule's own count.
        eps: normalization floor: ``X_0 = G / max(safety * ||G||_F, eps)`` per matrix
            (with ``safety=1`` exactly torch.optim.Muon's). Overflow-safe for any finite
            ``G`` (see :func:`frobenius_normalize_`).
        dtype: compute (and output) dtype; ``None`` keeps ``G.dtype``. fp16 works to the
            same guarantees (normalized in fp32 first), but is slow on CPUs.
        method: ``"standard"`` (torch's iteration), ``"gram"`` or ``"auto"``
            (Gram when the aspect ratio is at least ``gram_min_aspect``).
        restarts: Gram only: 0-based steps before which ``X <- Q X`` and ``R`` are recomputed;
            ``None`` = ``(2,)`` for 16-bit dtypes and ``()`` otherwise.
        gram_min_aspect: threshold for ``method="auto"``.
        normalize: ``"frobenius"``: only ``X_0`` above, torch's iteration and layout
            (bit-identical to torch.optim.Muon in bf16); ``"tight"``: additionally divide
            ``X_0`` by ``safety * (sum sigma_i(X_0)^8)^(1/8)`` (the bound is at least
            ``sigma_max(X_0)`` and at most 1) computed from the ``A^2`` the first step needs
            anyway: same polar factor, larger small singular values, no extra matmul.
            (The tight normalization, not the schedule, is what gives specopt's default a
            smaller error than torch's; see ``tools/bench_muon.py --sweep``.)

    Returns:
        Tensor of ``G``'s shape in the compute dtype. A zero matrix maps to zero; a finite
        nonzero matrix never gives NaN or an all-zero result.
    """
    _check_input(G)
    dtype = G.dtype if dtype is None else dtype
    X = G if G.ndim == 3 else G.unsqueeze(0)
    ws = NSWorkspace(*X.shape, dtype, G.device, torch_layout=normalize == "frobenius")
    # fp16 normalizes U in place, so it gets a private copy in at least fp32 (G's own
    # precision if wider); other dtypes only read U (cast into the workspace's input).
    U = X.to(torch.promote_types(X.dtype, torch.float32), copy=True) if narrow_range(dtype) else X
    O = orthogonalize_into_(ws, U, schedule=schedule, steps=steps, eps=eps, method=method,
                            restarts=restarts, gram_min_aspect=gram_min_aspect,
                            normalize=normalize)
    return O if G.ndim == 3 else O.squeeze(0)


def orthogonalize_many(matrices: Sequence[Tensor], **kwargs) -> list[Tensor]:
    """Orthogonalize a list of 2-D matrices, batching those of the same shape, dtype and
    device into one batched iteration. ``kwargs`` go to :func:`orthogonalize`. Output
    order matches input order."""
    groups: dict[tuple, list[int]] = {}
    for i, M in enumerate(matrices):
        if M.ndim != 2:
            raise ValueError(
                f"orthogonalize_many: matrices[{i}] must be 2-D, got shape {tuple(M.shape)}"
            )
        groups.setdefault((tuple(M.shape), M.dtype, M.device), []).append(i)
    out: list[Tensor | None] = [None] * len(matrices)
    for idx in groups.values():
        if len(idx) == 1:
            out[idx[0]] = orthogonalize(matrices[idx[0]], **kwargs)
            continue
        O = orthogonalize(torch.stack([matrices[i] for i in idx]), **kwargs)
        for k, i in enumerate(idx):
            out[i] = O[k]
    return out  # type: ignore[return-value]


def polar_factor(G: Tensor) -> Tensor:
    """Exact polar factor ``U V^T`` of ``G`` (``(m, n)`` or ``(..., m, n)``) from a thin SVD
    in float64; returns float64. For rank-deficient ``G`` the factor is not unique (the
    SVD picks one)."""
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U @ Vh


def orthogonality_error(O: Tensor) -> Tensor:
    """RMS of ``|sigma_i(O) - 1|`` over the ``min(m, n)`` singular values, per matrix
    (float64; shape ``O.shape[:-2]``). 0 for an exact polar factor of a full-rank matrix."""
    s = torch.linalg.svdvals(O.double())
    return (s - 1).square().mean(dim=-1).sqrt()


def ns_matmul_flops(
    shape: tuple[int, int],
    steps: int,
    method: str = "standard",
    restarts: Sequence[int] = DEFAULT_GRAM_RESTARTS,
) -> int:
    """Matmul FLOPs (2 per multiply-add) of one NS call on an ``(m, n)`` matrix, counting
    exactly the products :func:`orthogonalize` issues (elementwise work excluded)."""
    n, m = sorted(shape)
    mm = lambda p, q, r: 2 * p * q * r  # noqa: E731
    if method == "standard":
        return steps * (mm(n, m, n) + mm(n, n, n) + mm(n, n, m))
    total = mm(n, m, n)  # R = X X^T
    have_q = False
    for t in range(steps):
        if t in restarts and have_q:
            total += mm(n, n, m) + mm(n, m, n)
            have_q = False
        total += mm(n, n, n)  # R^2
        total += mm(n, n, n) if have_q else 0
        have_q = True
        if t + 1 < steps and (t + 1) not in restarts:
            total += 2 * mm(n, n, n)
    return total + mm(n, n, m)


def orthogonalize_flops(
    shape: tuple[int, int],
    *,
    schedule: ScheduleLike = "pe4",
    steps: int | None = None,
    dtype: torch.dtype = torch.float32,
    method: str = "auto",
    restarts: Sequence[int] | None = None,
    gram_min_aspect: float = GRAM_MIN_ASPECT,
    normalize: str = "tight",
    **_: object,
) -> int:
    """Matmul FLOPs of ``orthogonalize(G, **options)`` for one ``shape`` matrix, with steps,
    ``method="auto"`` and default restarts resolved exactly as :func:`orthogonalize` does
    (extra keywords such as ``eps`` are ignored)."""
    _, steps, method, restarts, _tight = _resolve(
        shape, dtype, schedule=schedule, steps=steps, method=method, restarts=restarts,
        gram_min_aspect=gram_min_aspect, normalize=normalize,
    )
    return ns_matmul_flops(shape, steps, method, restarts)


# ---------------------------------------------------------------------------------------
# Schedule design (Polar Express, arXiv 2505.16932): greedy minimax odd quintics.


_CONVERGED_QUINTIC: Coefficients = (1.875, -1.25, 0.375)


def _remez_quintic(lo: float, hi: float, iters: int = 100) -> Coefficients:
    """Best odd quintic ``p`` minimizing ``max |1 - p(x)|`` on ``[lo, hi]`` (Remez exchange on
    4 alternation points ``lo < q < r < hi``)."""
    x = np.array([lo, lo + (hi - lo) / 3, lo + 2 * (hi - lo) / 3, hi])
    sign = np.array([-1.0, 1.0, -1.0, 1.0])  # p = 1 - E, 1 + E, 1 - E, 1 + E
    coef = np.zeros(3)
    for _ in range(iters):
        M = np.stack([x, x**3, x**5, -sign], axis=1)
        a, b, c, _E = np.linalg.solve(M, np.ones(4))
        coef = np.array([a, b, c])
        # new interior points: roots of p'(x) = a + 3 b y + 5 c y^2 with y = x^2
        disc = 9 * b * b - 20 * a * c
        if disc <= 0 or c == 0:
            break
        ys = sorted(((-3 * b - math.sqrt(disc)) / (10 * c), (-3 * b + math.sqrt(disc)) / (10 * c)))
        if ys[0] <= 0:
            break
        q, r = math.sqrt(ys[0]), math.sqrt(ys[1])
        if not lo < q < r < hi:
            break
        if abs(q - x[1]) + abs(r - x[2]) < 1e-15 * hi:
            break
        x[1], x[2] = q, r
    return float(coef[0]), float(coef[1]), float(coef[2])


def design_polar_express(
    steps: int,
    lower: float,
    *,
    upper: float = 1.0,
    cushion: float = 0.02,
    safety: float = 1.01,
) -> tuple[Coefficients, ...]:
    """Greedy Polar Express schedule for singular values in ``[lower, upper]``.

    Step t: design the minimax quintic on ``[max(l, cushion * u), u]`` (the cushion keeps
    ``p(x) / x`` bounded below for tiny ``x``), rescale it so ``p(l)`` and ``p(u)`` are
    symmetric around 1, then continue on ``[p(l), 2 - p(l)]``. Every step but the last is
    divided by ``safety`` (``p(x / safety)``) against rounding. Returns ``steps`` tuples.
    """
    if not 0 < lower < upper:
        raise ValueError(f"design_polar_express: need 0 < lower < upper, got {lower}, {upper}")
    out = []
    lo, hi = lower, upper
    for t in range(steps):
        step = None
        if hi - lo >= 1e-9:
            try:
                step = _symmetric(_remez_quintic(max(lo, cushion * hi), hi), lo, hi)
            except np.linalg.LinAlgError:  # narrow interval: the 4x4 exchange is singular
                step = None
            # Near convergence the exchange can return a useless quintic (e.g. (1, .5, -.5):
            # slope 1 at 0, small singular values never lifted): keep only real progress.
            if step is not None and not (
                all(math.isfinite(x) for x in step[0]) and step[0][0] > 1 and step[1] > lo
            ):
                step = None
        if step is None:  # converged: the quintic with p(1)=1, p'(1)=p''(1)=0 (slope 1.875)
            step = _symmetric(_CONVERGED_QUINTIC, lo, hi)
        (a, b, c), lo = step
        hi = 2.0 - lo
        out.append((a, b, c) if t == steps - 1 else _scale((a, b, c), safety))
    return tuple(out)


def _symmetric(c: Coefficients, lo: float, hi: float) -> tuple[Coefficients, float]:
    """Rescale ``p`` so that ``p(lo)`` and ``p(hi)`` are symmetric around 1; returns the
    coefficients and the new lower bound ``p(lo)`` (at most 1)."""
    a, b, cc = c
    p_lo, p_hi = (a * x + b * x**3 + cc * x**5 for x in (lo, hi))
    s = 2.0 / (p_lo + p_hi)
    return (a * s, b * s, cc * s), min(s * p_lo, 1.0)
