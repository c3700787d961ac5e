"""Distributed tests: 2 gloo processes on 127.0.0.1 (see distributed_utils.run_distributed).

Workers are module-level functions (spawn pickles them by name); each returns plain
tensors that the parent compares with a single-process reference computed here.
"""

from __future__ import annotations

import pytest
import torch
from distributed_utils import run_distributed

from specopt.distributed import (
    assign_by_cost,
    get_rank,
    get_world_size,
    is_distributed,
    is_main_process,
    rank_loads,
    row_chunks,
)
from specopt.optim.distributed import CommStats, ns_flops, orthogonalize_distributed


def _monitor_is_distributed() -> bool:
    """The spectral monitor's DDP/FSDP2 support (specopt.spectral.owners) is wired in."""
    from specopt.spectral.monitor import SpectralMonitor

    return hasattr(SpectralMonitor, "_snapshot_distributed")


_NEEDS_MONITOR = pytest.mark.skipif(
    not _monitor_is_distributed(),
    reason="SpectralMonitor without distributed support (specopt.spectral.owners not wired)",
)

# ---------------------------------------------------------------- single process


def test_env_helpers_are_noops_without_process_group():
    assert not is_distributed()
    assert get_rank() == 0 and get_world_size() == 1 and is_main_process()


def test_ns_flops_formula_uses_short_side():
    # 5 steps of (4 r^2 c + 2 r^3) with r = 2, c = 3
    assert ns_flops((2, 3)) == 5 * (4 * 4 * 3 + 2 * 8)
    assert ns_flops((3, 2)) == ns_flops((2, 3))
    assert ns_flops((2, 1, 3), steps=1) == 4 * 4 * 3 + 2 * 8  # conv-like: (2, 1*3)


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


def test_muon_distributed_option_validated_and_noop_alone():
    from specopt import Muon

    w = torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"distributed must be one of \('auto', 'ddp', 'off'\), "
                       r"got 'bogus'"):
        Muon([w], distributed="bogus")
    # Without a process group every mode is the single-process step.
    outs = []
    for mode in ("auto", "ddp", "off"):
        p = torch.nn.Parameter(torch.ones(4, 3))
        p.grad = torch.arange(12.0).reshape(4, 3)
        Muon([p], lr=0.1, distributed=mode).step()
        outs.append(p.detach())
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


# ---------------------------------------------------------------- 2 processes

_SHAPES = [(5, 3), (7, 4), (2, 6), (1, 3), (3, 4, 2), (8, 8), (6, 2)]


def _inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g) for s in _SHAPES]


def _fn(mats: list[torch.Tensor]) -> list[torch.Tensor]:
    return [m * m.sum() + m.flatten()[0] for m in mats]


def _fn_bf16(mats: list[torch.Tensor]) -> list[torch.Tensor]:
    # Rounds its input to bf16 first, as NS does: bf16 on the wire then loses nothing.
    return [_fn([m.to(torch.bfloat16)])[0] for m in mats]


def _layer(name: str, shape: tuple[int, int]) -> torch.nn.Linear:
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    lin = torch.nn.Linear(shape[1], shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(shape, generator=g))
    return lin


#: Layers each rank holds (pipeline-like): "b" on both (identical), "a"/"c" on one each.
_RANK_LAYERS = {0: {"a": (6, 4), "b": (5, 5)}, 1: {"b": (5, 5), "c": (3, 7)}}


def _stage_worker(rank: int, world: int, log_dir: str) -> dict:
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
    for name, mats, kw in (("fsdp", sharded, {}), ("ddp", full, {"replicated": True})):
        stats = CommStats()
        res = orthogonalize_distributed(mats, _fn_bf16, comm_dtype=torch.bfloat16, stats=stats,
                                        **kw)
        out[f"{name}_bf16"] = [getattr(r, "full_tensor", lambda r=r: r)() for r in res]
        out[f"{name}_bf16_bytes"] = stats.bytes_sent

    # Monitor on ranks that hold different layers: no hang, rank 0 gets every layer.
    if not _monitor_is_distributed():
        return out
    from specopt import SpectralMonitor

    model = torch.nn.ModuleDict({k: _layer(k, v) for k, v in _RANK_LAYERS[rank].items()})
    monitor = SpectralMonitor(model, log_dir=log_dir, every=1, budget=None, signal_every=0)
    snaps = [monitor.step() for _ in range(2)]
    monitor.close()
    out["snap"] = None if snaps[-1] is None else {
        k: v["sigma_max"] for k, v in snaps[-1].metrics.items()}
    return out


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("stage_monitor")
    return log_dir, run_distributed(_stage_worker, args=(str(log_dir),))


@pytest.mark.slow
@_NEEDS_MONITOR
def test_monitor_with_ranks_holding_different_layers(stage_runs):
    """No hang; rank 0 gets every layer's spectrum (one computed by rank 1); only rank 0
    writes."""
    log_dir, results = stage_runs
    assert results[1]["snap"] is None
    expected = {k: torch.linalg.svdvals(_layer(k, v).weight.detach().double())[0].item()
                for layers in _RANK_LAYERS.values() for k, v in layers.items()}
    assert results[0]["snap"] == pytest.approx(expected, rel=1e-5)
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 1


@pytest.mark.slow
def test_distributed_stage_fsdp_and_ddp_match_local(stage_runs):
    ref = _fn(_inputs())
    _, results = stage_runs
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
    ref16 = [r.float() for r in _fn_bf16(_inputs())]
    for out in results:
        for mode in ("fsdp", "ddp"):
            for r, e in zip(out[f"{mode}_bf16"], ref16, strict=True):
                assert r.dtype == torch.float32
                torch.testing.assert_close(r, e, rtol=0, atol=0)
            assert out[f"{mode}_bf16_bytes"] * 2 == out[f"{mode}_stats_True"].bytes_sent
    fsdp = [out["fsdp_stats_True"] for out in results]
    assert fsdp[0].collectives == 2 and fsdp[0].bytes_sent > 0


# ---------------------------------------------------------------- training helpers

_CFG = dict(vocab_size=64, dim=32, n_layers=1, n_heads=2, max_seq_len=16)
_GLOBAL_BATCH = 4
_SEQ = 8
_TOL = dict(rtol=1e-6, atol=1e-7)  # fp32; see _train for why the runs agree this closely


def _model(pc: bool = False):
    from specopt.models import Llama, LlamaConfig

    torch.manual_seed(0)
    model = Llama(LlamaConfig(**_CFG))
    handle = None
    if pc:
        from specopt.pc import apply_pc

        handle = apply_pc(model, level=2)
    return model, handle


def _batch(step: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of the global batch of ``step`` (same global batch for any world)."""
    g = torch.Generator().manual_seed(1000 + step)
    data = torch.randint(0, _CFG["vocab_size"], (_GLOBAL_BATCH, _SEQ + 1), generator=g)
    per = _GLOBAL_BATCH // world
    data = data[rank * per : (rank + 1) * per]
    return data[:, :-1], data[:, 1:]


def _optimizer(name: str, model: torch.nn.Module, wrap: str = "none") -> torch.optim.Optimizer:
    inner = getattr(model, "module", model)  # DDP keeps the model at .module
    if name == "adamw":
        return torch.optim.AdamW(inner.parameters(), lr=1e-2)
    dist_mode = "ddp" if wrap == "ddp" else "auto"
    if name == "muon":
        from specopt import Muon

        mats = [p for n, p in inner.named_parameters() if p.ndim == 2 and "layers" in n]
        return Muon(mats, lr=0.02, distributed=dist_mode)
    if name == "hybrid":
        from specopt import build_optimizer

        return build_optimizer(inner, "muon", lr=0.02, distributed=dist_mode)
    raise ValueError(name)


def _train(model, opt, steps: range, rank: int = 0, world: int = 1, micro: int = 1) -> list[float]:
    """Train on this rank's share of each global batch, in ``micro`` equal micro-batches.

    The single-process reference uses ``micro=2`` (the global batch as the 2 ranks' halves,
    gradients accumulated as ``g0/2 + g1/2``): that equals DDP/FSDP's ``(g0 + g1)/2``
    exactly in floating point (halving is exact), so the runs can be compared tightly.
    """
    losses = []
    for step in steps:
        total = 0.0
        for m in range(micro):
            x, y = _batch(step, rank * micro + m, world * micro)
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            (loss / micro).backward()
            total += loss.item() / micro
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


def _full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from specopt.distributed import full_tensor

    inner = getattr(model, "module", model)
    return {k: full_tensor(p).detach().clone() for k, p in inner.named_parameters()}


def _pc_vectors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    inner = getattr(model, "module", model)
    return {k: b.detach().clone() for k, b in inner.named_buffers()
            if k.endswith((".u", ".v"))}


def _reference(opt_name: str, pc: bool, steps: int):
    model, handle = _model(pc)
    opt = _optimizer(opt_name, model)
    if handle is not None:
        handle.attach(opt)
    losses = _train(model, opt, range(steps), micro=2)
    return model, opt, losses


@pytest.fixture
def one_thread():
    """The workers run 1 thread each; the reference must too (BLAS splits by threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _train_worker(rank: int, world: int, wrap: str, opt_name: str, pc: bool, steps: int,
                  ckpt: str | None, log_dir: str | None = None) -> dict:
    import os

    from specopt.cli.dcp import save_distributed_checkpoint
    from specopt.cli.launch import ddp_model, fully_shard_model

    model, handle = _model(pc)
    model = fully_shard_model(model) if wrap == "fsdp" else ddp_model(model)
    opt = _optimizer(opt_name, model, wrap)
    if handle is not None:
        handle.attach(opt)
    monitor = None
    if log_dir is not None and _monitor_is_distributed():
        from specopt import SpectralMonitor

        # Every rank builds it; only rank 0 may write. Snapshot at the last step.
        monitor = SpectralMonitor(getattr(model, "module", model), log_dir=log_dir,
                                  every=steps, budget=None)
        monitor.attach(opt)
    losses = _train(model, opt, range(steps), rank, world)
    if monitor is not None:
        monitor.close()
    state = {}  # "<param name>.<state key>" -> (type name, local shape, global shape)
    names = {id(p): n for n, p in getattr(model, "module", model).named_parameters()}
    for p, st in opt.state.items():
        for k, v in st.items():
            if torch.is_tensor(v):
                local = getattr(v, "_local_tensor", v)
                state[f"{names[id(p)]}.{k}"] = (type(v).__name__, tuple(local.shape),
                                                tuple(v.shape))
    if ckpt is not None:
        save_distributed_checkpoint(ckpt, model, opt, extra={"step": steps})
    stats = getattr(opt, "comm_stats", None)
    if stats is None and hasattr(opt, "_muon"):
        stats = getattr(opt._muon, "comm_stats", None)
    return {"params": _full_params(model), "losses": losses, "state": state,
            "pc": _pc_vectors(model), "stats": stats, "pid": os.getpid()}


def _check_monitor_log(log_dir, results, ref_model, step: int) -> None:
    """One event file, written by rank 0, with spectra equal to the reference's SVD."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(p.name for p in log_dir.iterdir() if "tfevents" in p.name)
    assert len(files) == 1, files
    assert files[0].endswith(f".{results[0]['pid']}.0") or f".{results[0]['pid']}." in files[0]
    assert f".{results[1]['pid']}." not in files[0]
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    inner = getattr(ref_model, "module", ref_model)
    checked = 0
    for path, module in inner.named_modules():
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor) or w.ndim != 2 or "parametrizations" in path:
            continue
        tag = f"spectral/sigma_max/{path}"
        assert tag in tags, tag
        (event,) = [e for e in acc.Scalars(tag) if e.step == step]
        expected = torch.linalg.svdvals(w.detach().double())[0].item()
        assert event.value == pytest.approx(expected, rel=1e-4), path
        checked += 1
    assert checked >= 7


def _check_against_reference(results, ref_model, ref_losses) -> None:
    ref = _full_params(ref_model)
    for out in results:
        assert set(out["params"]) == set(ref)
        for k, p in ref.items():
            torch.testing.assert_close(out["params"][k], p, **_TOL, msg=k)
    # Each rank's loss is its half-batch mean; their average is the global-batch loss.
    mean_losses = [sum(ls) / len(ls) for ls in zip(*(o["losses"] for o in results), strict=True)]
    assert mean_losses == pytest.approx(ref_losses, rel=1e-5)
    ref_vectors = _pc_vectors(ref_model)
    for out in results:
        assert set(out["pc"]) == set(ref_vectors)
        for k, v in ref_vectors.items():
            torch.testing.assert_close(out["pc"][k], v, **_TOL, msg=k)
    # u, v bit-identical across ranks.
    for k in ref_vectors:
        assert torch.equal(results[0]["pc"][k], results[1]["pc"][k]), k


def _ddp_then_fsdp_worker(rank: int, world: int, steps: int, root: str) -> dict:
    """One process group for both runs: saves a spawn (~10-30 s on a busy box)."""
    ddp = _train_worker(rank, world, "ddp", "hybrid", True, steps, None, f"{root}/ddp_logs")
    fsdp = _train_worker(rank, world, "fsdp", "hybrid", True, steps, f"{root}/ckpt",
                         f"{root}/fsdp_logs")
    return {"ddp": ddp, "fsdp": fsdp}


_STEPS = 3


@pytest.fixture(scope="module")
def parallel_runs(tmp_path_factory):
    """DDP then FSDP2 training on 2 gloo ranks (Muon + AdamW + PC + monitor)."""
    root = tmp_path_factory.mktemp("parallel")
    results = run_distributed(_ddp_then_fsdp_worker, args=(_STEPS, str(root)), timeout=240)
    return root, {k: [r[k] for r in results] for k in ("ddp", "fsdp")}


@pytest.mark.slow
def test_fsdp_matches_single_process_and_resumes_on_one_process(parallel_runs, one_thread):
    """FSDP2, Muon + AdamW (build_optimizer) + PC (+ monitor attached): equal to one
    process; state sharded; a 2-process DCP checkpoint resumes on 1 process identically;
    merge_pc from it."""
    from specopt.cli.dcp import load_distributed_checkpoint

    opt_name, pc, steps, more = "hybrid", True, _STEPS, 2
    root, runs = parallel_runs
    ckpt, results = str(root / "ckpt"), runs["fsdp"]
    ref_model, ref_opt, ref_losses = _reference(opt_name, pc, steps)
    _check_against_reference(results, ref_model, ref_losses)
    _check_ns_split(results)
    # Optimizer state of every matrix stays sharded: a DTensor holding half the rows.
    for name, (kind, local, full) in results[0]["state"].items():
        if len(full) == 2:
            assert kind == "DTensor" and local[0] == row_chunks(full[0], 2)[0][1], name

    # Resume on one plain process from the 2-process checkpoint.
    _train(ref_model, ref_opt, range(steps, steps + more), micro=2)
    model, handle = _model(pc)
    opt = _optimizer(opt_name, model)
    if handle is not None:
        handle.attach(opt)
    extra = load_distributed_checkpoint(ckpt, model, opt)
    assert extra == {"step": steps}
    for k, p in _full_params(model).items():
        torch.testing.assert_close(p, results[0]["params"][k], rtol=0, atol=0, msg=k)
    _train(model, opt, range(steps, steps + more), micro=2)
    ref = _full_params(ref_model)
    for k, p in _full_params(model).items():
        torch.testing.assert_close(p, ref[k], **_TOL, msg=k)

    # merge_pc from the distributed checkpoint: same function, plain-model state_dict keys.
    from specopt.pc import merge_pc

    merged, _ = _model(pc)
    load_distributed_checkpoint(ckpt, merged)
    x, _ = _batch(0)
    with torch.no_grad():
        before = merged(x)
        merge_pc(merged)
        after = merged(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    assert set(merged.state_dict()) == set(_model(False)[0].state_dict())


@pytest.mark.slow
def test_ddp_matches_single_process(parallel_runs, one_thread):
    """DDP, Muon + AdamW + PC: equal to one process; NS split across the 2
    ranks."""
    _, runs = parallel_runs
    ref_model, _, ref_losses = _reference("hybrid", True, _STEPS)
    _check_against_reference(runs["ddp"], ref_model, ref_losses)
    _check_ns_split(runs["ddp"])


@pytest.mark.slow
@_NEEDS_MONITOR
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_monitor_only_rank0_writes_right_spectra(parallel_runs, one_thread, mode):
    """Monitor under DDP / FSDP2: one event file (rank 0's), spectra equal to the SVD of
    the single-process run's weights."""
    root, runs = parallel_runs
    ref_model, _, _ = _reference("hybrid", True, _STEPS)
    _check_monitor_log(root / f"{mode}_logs", runs[mode], ref_model, _STEPS)


def _check_ns_split(results) -> None:
    """Every matrix orthogonalized on exactly one rank, and both ranks did some."""
    stats = [out["stats"] for out in results]
    assert stats[0].matrices_total == stats[1].matrices_total > 0
    assert stats[0].matrices_local + stats[1].matrices_local == stats[0].matrices_total
    assert min(s.matrices_local for s in stats) > 0
    assert all(s.bytes_received > 0 for s in stats)


@pytest.mark.slow
def test_torchrun_cli_fsdp_smoke(tmp_path):
    """`torchrun --nproc_per_node 2 -m specopt train --fsdp` trains, logs once, checkpoints."""
    import os
    import subprocess
    import sys

    from distributed_utils import free_port

    from specopt.cli.dcp import load_distributed_checkpoint
    from specopt.cli.train import build_model
    from specopt.models import PRESETS

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
           "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "specopt", "train", "--fsdp",
           "--preset", "tiny", "--steps", "3", "--batch-size", "2", "--seq-len", "32",
           "--monitor-every", "3", "--eval-every", "0", "--eval-batches", "1",
           "--ckpt-every", "0", "--log-dir", str(run), "--no-progress"]
    if not _monitor_is_distributed():
        cmd.append("--no-monitor")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("final validation") == 1  # rank 0 alone prints
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    ckpt = run / "checkpoints" / "step_0000003"
    assert (ckpt / ".metadata").is_file()
    model, _ = build_model(PRESETS["tiny"], pc=True, pc_level=2)
    extra = load_distributed_checkpoint(ckpt, model)
    assert extra["step"] == 3


@pytest.mark.slow
def test_bench_distributed_quick(tmp_path, load_tool):
    """tools/bench_distributed.py --quick runs and reports both modes with a ratio."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "tools" / "bench_distributed.py"
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(script), "--quick", "--repeats", "1", "--d", "32",
         "--json", str(out)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "all/split" in proc.stdout
    summary = {row["mode"]: row for row in json.loads(out.read_text())["summary"]}
    assert set(summary) == {"ddp", "fsdp"}
    cfg = json.loads(out.read_text())["config"]
    shapes = load_tool("bench_distributed")._shapes(cfg["d"], cfg["layers"], cfg["ffn"])
    model_bytes = 4 * sum(r * c for r, c in shapes)  # every matrix once, fp32
    costs = [ns_flops(s) for s in shapes]
    largest_share = max(costs) / sum(costs)
    for row in summary.values():
        assert row["ratio_all_over_split"] == pytest.approx(
            row["all_ms"] / row["split_ms"], rel=1e-12)
        # Split mode: a rank receives other ranks' results, never more than the whole model.
        assert 0 < row["split_bytes_received_per_step"] <= model_bytes
        per_rank = row["split_ns_gflop_per_rank"]
        assert len(per_rank) == 2 and min(per_rank) > 0
        # Cost-balanced owners: the ranks' NS work differs by at most one matrix's share.
        assert (max(per_rank) - min(per_rank)) / sum(per_rank) <= largest_share + 1e-9
    assert summary["ddp"]["all_bytes_received_per_step"] == 0  # every rank did all NS
