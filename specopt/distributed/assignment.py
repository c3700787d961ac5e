"""Deterministic, cost-balanced assignment of matrices to ranks.

Newton-Schulz (NS) needs whole matrices, so in a distributed job each matrix is
orthogonalized on exactly one rank (its *owner*). Owners are chosen to balance the NS
work, measured in FLOPs, with the longest-processing-time-first greedy rule: sort by cost
(largest first, ties by index) and give each matrix to the least-loaded rank (ties to
the lowest rank). The result depends only on the shapes and the world size, so every rank
computes the same assignment locally without communicating; LPT's makespan is at most
4/3 of the optimum.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["assign_by_cost", "ns_flops", "rank_loads"]

#: NS steps assumed by the cost model when the caller does not say (torch's default).
DEFAULT_NS_STEPS = 5


def ns_flops(shape: Sequence[int], steps: int = DEFAULT_NS_STEPS, method: str = "standard") -> int:
    """NS cost model: matmul FLOPs of ``steps`` iterations on a matrix of ``shape``.

    Delegates to :func:`specopt.optim.newton_schulz.ns_matmul_flops` (the standard
    iteration on ``X`` of ``r x c``, ``r <= c``, costs ``steps * (4 r^2 c + 2 r^3)``).
    An N-D shape counts as Muon reshapes it, ``(shape[0], prod(shape[1:]))``; a shape
    with fewer than 2 dims costs its element count.
    """
    from specopt.optim.newton_schulz import ns_matmul_flops  # lazy: optim imports us

    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        n = 1
        for s in shape:
            n *= s
        return n
    cols = 1
    for s in shape[1:]:
        cols *= s
    return ns_matmul_flops((shape[0], cols), steps, method)


def assign_by_cost(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank of each item, balancing the summed ``costs`` over ``world_size`` ranks.

    Args:
        costs: non-negative cost of each item (e.g. :func:`ns_flops` of its shape).
        world_size: number of ranks (>= 1).

    Returns:
        ``owners[i]`` in ``[0, world_size)`` for each item ``i``. Deterministic: the
        same inputs give the same owners on every process.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    for i, c in enumerate(costs):
        if not c >= 0:  # also rejects NaN
            raise ValueError(f"costs[{i}] must be a non-negative number, got {c}")
    owners = [0] * len(costs)
    if world_size == 1:
        return owners
    loads = [0.0] * world_size
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[i] = rank
        loads[rank] += costs[i]
    return owners


def rank_loads(costs: Sequence[float], owners: Sequence[int], world_size: int) -> list[float]:
    """Total cost per rank for an assignment (for reports and tests)."""
    loads = [0.0] * world_size
    for c, r in zip(costs, owners, strict=True):
        loads[r] += c
    return loads
