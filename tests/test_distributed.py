"""Distributed tests: 2 gloo processes on 127.0.0.1 (see distributed_utils.run_distributed).

Workers are module-level functions (spawn pickles them by name); each returns plain
tensors that the parent compares with a single-process reference computed here.
"""

from __future__ import annotations

import pytest
import torch
from distributed_utils import run_distributed

from specopt.distributed import (
    CommStats,
    assign_by_cost,
    get_rank,
    get_world_size,
    is_distributed,
    is_main_process,
    ns_flops,
    orthogonalize_distributed,
    rank_loads,
    row_chunks,
)

# ---------------------------------------------------------------- single process


def test_env_helpers_are_noops_without_process_group():
    assert not is_distributed()
    assert get_rank() == 0 and get_world_size() == 1 and is_main_process()


def test_ns_flops_formula_uses_short_side():
    # 5 steps of (4 r^2 c + 2 r^3) with r = 2, c = 3
    assert ns_flops((2, 3)) == 5 * (4 * 4 * 3 + 2 * 8)
    assert ns_flops((3, 2)) == ns_flops((2, 3))
    assert ns_flops((4, 2, 3), steps=1) == 4 * (4 * 4 * 3 + 2 * 8)


def test_assignment_is_balanced_and_deterministic():
    shapes = [(512, 512)] * 4 + [(2048, 512)] * 3
    costs = [float(ns_flops(s)) for s in shapes] * 4  # 28 matrices of a d=512 model
    owners = assign_by_cost(costs, 2)
    assert owners == assign_by_cost(costs, 2)
    loads = rank_loads(costs, owners, 2)
    assert abs(loads[0] - loads[1]) <= max(costs)
    assert max(loads) / (sum(costs) / 2) < 1.05
    assert assign_by_cost(costs, 1) == [0] * len(costs)
    assert sorted(set(assign_by_cost([1.0] * 5, 3))) == [0, 1, 2]


def test_assignment_rejects_bad_input():
    with pytest.raises(ValueError, match="world_size must be >= 1, got 0"):
        assign_by_cost([1.0], 0)
    with pytest.raises(ValueError, match=r"costs\[1\] must be a non-negative number, got nan"):
        assign_by_cost([1.0, float("nan")], 2)


def test_row_chunks_follow_torch_chunk():
    for n, w in [(5, 2), (7, 2), (1, 2), (5, 4), (0, 2)]:
        sizes = [c.shape[0] for c in torch.arange(n).chunk(w)] if n else []
        sizes += [0] * (w - len(sizes))
        assert [s for _, s in row_chunks(n, w)] == sizes


def test_local_path_calls_function_once():
    calls = []

    def fn(mats):
        calls.append(len(mats))
        return [2 * m for m in mats]

    x = [torch.randn(3, 4), torch.randn(2, 2)]
    out = orthogonalize_distributed(x, fn, replicated=True)
    assert calls == [2] and all(torch.equal(o, 2 * m) for o, m in zip(out, x, strict=True))


# ---------------------------------------------------------------- 2 processes

_SHAPES = [(5, 3), (7, 4), (2, 6), (1, 3), (3, 4, 2), (8, 8), (6, 2)]


def _inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g) for s in _SHAPES]


def _fn(mats: list[torch.Tensor]) -> list[torch.Tensor]:
    return [m * m.sum() + m.flatten()[0] for m in mats]


def _stage_worker(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = _inputs()
    sharded = [distribute_tensor(m, mesh, [Shard(0)]) for m in full]
    out: dict = {}
    for split in (True, False):
        stats = CommStats()
        res = orthogonalize_distributed(sharded, _fn, split=split, stats=stats)
        out[f"fsdp_{split}"] = [r.full_tensor() for r in res]
        out[f"fsdp_local_shape_{split}"] = [tuple(r.to_local().shape) for r in res]
        out[f"fsdp_stats_{split}"] = stats
        stats = CommStats()
        res = orthogonalize_distributed(full, _fn, replicated=True, split=split, stats=stats)
        out[f"ddp_{split}"] = res
        out[f"ddp_stats_{split}"] = stats
    return out


@pytest.mark.slow
def test_distributed_stage_fsdp_and_ddp_match_local():
    ref = _fn(_inputs())
    results = run_distributed(_stage_worker)
    for rank, out in enumerate(results):
        for key in ("fsdp_True", "fsdp_False", "ddp_True", "ddp_False"):
            for r, e in zip(out[key], ref, strict=True):
                torch.testing.assert_close(r, e, rtol=0, atol=0)
        expected_local = [(row_chunks(s[0], 2)[rank][1], *s[1:]) for s in _SHAPES]
        assert out["fsdp_local_shape_True"] == expected_local
    for mode in ("fsdp", "ddp"):
        split = [out[f"{mode}_stats_True"] for out in results]
        naive = [out[f"{mode}_stats_False"] for out in results]
        # Each matrix orthogonalized on exactly one rank; the naive way repeats all.
        assert sum(s.matrices_local for s in split) == len(_SHAPES)
        assert all(s.matrices_local > 0 for s in split)
        assert all(s.matrices_local == len(_SHAPES) for s in naive)
    fsdp = [out["fsdp_stats_True"] for out in results]
    assert fsdp[0].collectives == 2 and fsdp[0].bytes_sent > 0
