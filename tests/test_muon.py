"""specopt.Muon: torch.optim.Muon equivalence, N-D / split shapes, resume, bad input."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from specopt import Muon
from specopt.optim.muon import adjust_lr, default_ns_dtype
from specopt.optim.newton_schulz import orthogonality_error, orthogonalize

KJ = (3.4445, -4.7750, 2.0315)
HAS_TORCH_MUON = hasattr(torch.optim, "Muon")
needs_torch_muon = pytest.mark.skipif(not HAS_TORCH_MUON, reason="torch.optim.Muon missing")


def _params(seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(24, 40), (40, 24), (32, 32)]
    return [nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]


def _grads(params, step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g) for p in params]


def _run(opt, params, steps: int, start: int = 0) -> list[list[torch.Tensor]]:
    """Step ``opt`` on fixed gradients; returns each step's parameter deltas."""
    deltas = []
    for t in range(start, start + steps):
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, _grads(params, t), strict=True):
            p.grad = g
        opt.step()
        deltas.append([p.detach() - b for p, b in zip(params, before, strict=True)])
    return deltas


def _max_rel(da, db) -> float:
    return max(
        ((x - y).norm() / y.norm()).item()
        for step_a, step_b in zip(da, db, strict=True)
        for x, y in zip(step_a, step_b, strict=True)
    )


@needs_torch_muon
@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_torch_muon_bf16(nesterov, adjust_lr_fn):
    ours_p, ref_p = _params(), _params()
    kw = dict(lr=0.02, weight_decay=0.1, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    ours = _run(Muon(ours_p, ns_coefficients=KJ, **kw), ours_p, 3)
    ref = _run(torch.optim.Muon(ref_p, **kw), ref_p, 3)
    if torch.cpu._is_avx512_bf16_supported():
        # Same ops in the same order (batched bmm equals torch's per-matrix mm bit for bit on
        # native bf16); where bf16 is emulated the kernels may round differently.
        assert _max_rel(ours, ref) == 0.0
    else:
        assert _max_rel(ours, ref) < 1e-2


def _fp32_reference_ns(grad, ns_coefficients, ns_steps, eps):
    # The reference formula (shared/reference/muon.md) in fp32, patched into torch's Muon.
    a, b, c = ns_coefficients
    X = grad.float()
    tall = X.shape[0] > X.shape[1]
    X = X.T if tall else X
    X = X / X.norm().clamp(min=eps)
    for _ in range(ns_steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


@needs_torch_muon
@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_torch_muon_fp32(monkeypatch, nesterov, adjust_lr_fn):
    import torch.optim._muon as tm

    monkeypatch.setattr(tm, "_zeropower_via_newtonschulz", _fp32_reference_ns)
    ours_p, ref_p = _params(), _params()
    kw = dict(lr=0.02, weight_decay=0.1, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    ours = _run(Muon(ours_p, ns_coefficients=KJ, ns_dtype=torch.float32, **kw), ours_p, 3)
    ref = _run(torch.optim.Muon(ref_p, **kw), ref_p, 3)
    assert _max_rel(ours, ref) < 1e-5


def test_default_update_is_near_orthogonal_and_beats_torch_error():
    params = _params()
    opt = Muon(
        params, lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False, adjust_lr_fn="spectral"
    )
    (deltas,) = _run(opt, params, 1)
    for p, d, g in zip(params, deltas, _grads(params, 0), strict=True):
        A, B = p.shape
        O = -d / math.sqrt(A / B)  # undo the spectral lr rule
        # The NS dtype follows the CPU kind (bf16 where bf16 matmul is native); the update
        # is cast back to the parameter's dtype, so compare in that dtype at the NS precision.
        ns_dtype = default_ns_dtype(p.device)
        expected = orthogonalize(g, dtype=ns_dtype).to(p.dtype)
        tol = 1e-2 if ns_dtype == torch.bfloat16 else 1.3e-6
        torch.testing.assert_close(O, expected, rtol=tol, atol=tol)
        torch_mode = orthogonalize(g, schedule="jordan", normalize="frobenius", method="standard")
        assert orthogonality_error(O) < orthogonality_error(torch_mode)


@pytest.mark.parametrize("native", [True, False])
def test_default_ns_dtype_follows_the_cpu_kind(monkeypatch, native):
    # Both CPU kinds are exercised on any machine: the probe is patched, not the CPU.
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    expected = torch.bfloat16 if native else torch.float32
    assert default_ns_dtype(torch.device("cpu")) == expected
    opt = Muon(_params())
    assert opt.ns_options(opt.param_groups[0], torch.device("cpu"))["dtype"] == expected
    # torch-compatible mode is bf16 on every CPU kind, like torch.optim.Muon.
    compat = Muon(_params(), ns_coefficients=KJ)
    assert compat.ns_options(compat.param_groups[0], torch.device("cpu"))["dtype"] == torch.bfloat16


def test_default_options_resolve():
    opt = Muon(_params())
    opts = opt.ns_options(opt.param_groups[0], torch.device("cpu"))
    assert opts["schedule"] == "pe4" and opts["method"] == "auto"
    assert opts["normalize"] == "tight" and opts["dtype"] == default_ns_dtype(torch.device("cpu"))
    compat = Muon(_params(), ns_coefficients=KJ)
    opts = compat.ns_options(compat.param_groups[0], torch.device("cpu"))
    assert opts == dict(
        schedule=KJ,
        steps=5,
        eps=1e-7,
        dtype=torch.bfloat16,
        method="standard",
        normalize="frobenius",
    )


def test_adjust_lr_rules():
    assert adjust_lr(0.1, None, (512, 128)) == pytest.approx(0.2)
    assert adjust_lr(0.1, "original", (128, 512)) == pytest.approx(0.1)
    assert adjust_lr(0.1, "match_rms_adamw", (128, 512)) == pytest.approx(
        0.1 * 0.2 * math.sqrt(512)
    )
    assert adjust_lr(0.1, "spectral", (128, 512)) == pytest.approx(0.05)
    assert adjust_lr(0.1, "spectral", (512, 128)) == pytest.approx(0.2)


def test_conv_weight_is_orthogonalized_as_out_by_rest():
    w = nn.Parameter(torch.randn(8, 3, 3, 3))
    g = torch.randn(8, 3, 3, 3)
    opt = Muon([w], lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False, ns_dtype=torch.float64)
    w0 = w.detach().clone()
    w.grad = g
    opt.step()
    expected = orthogonalize(g.reshape(8, 27), dtype=torch.float64) * math.sqrt(max(1, 8 / 27))
    torch.testing.assert_close((w0 - w.detach()).reshape(8, 27), expected.float())


def _one_step_delta(w, g, **kw):
    opt = Muon([w], lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False,
               ns_dtype=torch.float64, **kw)
    w0 = w.detach().clone()
    w.grad = g
    opt.step()
    return w0 - w.detach()


def test_moe_experts_are_orthogonalized_one_by_one():
    # (E, out, in) expert stack, matrix_layout="batch": expert e's update is exactly the
    # 2-D update of that expert alone, with its own LR adjustment (not the (E, out*in) one).
    E, M, N = 3, 12, 5
    g = torch.randn(E, M, N)
    delta = _one_step_delta(nn.Parameter(torch.zeros(E, M, N)), g, matrix_layout="batch")
    for e in range(E):
        alone = _one_step_delta(nn.Parameter(torch.zeros(M, N)), g[e].clone())
        torch.testing.assert_close(delta[e], alone, rtol=1e-6, atol=1e-7)
        s = torch.linalg.svdvals(delta[e].double() / math.sqrt(M / N))
        assert ((s - 1).abs() < 0.35).all(), s  # singular values ~1 per expert
    flat = _one_step_delta(nn.Parameter(torch.zeros(E, M, N)), g)  # default: flatten
    assert not torch.allclose(flat, delta, atol=1e-3)


def test_transposed_conv1d_uses_out_in_orientation():
    # transformers' Conv1D stores (in, out) = (5, 12): the update is the transpose of the
    # (out, in) weight's update, LR-adjusted with (out, in) = (12, 5): sqrt(12 / 5).
    g = torch.randn(5, 12)
    delta = _one_step_delta(nn.Parameter(torch.zeros(5, 12)), g, transposed=True)
    as_linear = _one_step_delta(nn.Parameter(torch.zeros(12, 5)), g.T.clone())
    torch.testing.assert_close(delta, as_linear.T, rtol=1e-6, atol=1e-7)
    plain = _one_step_delta(nn.Parameter(torch.zeros(5, 12)), g)
    torch.testing.assert_close(delta, plain * math.sqrt(12 / 5), rtol=1e-6, atol=1e-7)
    # split_sizes count output rows: columns of the stored (in, out) matrix.
    split = _one_step_delta(nn.Parameter(torch.zeros(5, 12)), g, transposed=True,
                            split_sizes=(4, 8))
    for cols in (slice(0, 4), slice(4, 12)):
        alone = _one_step_delta(nn.Parameter(torch.zeros(5, 12)[:, cols].T.contiguous()),
                                g[:, cols].T.contiguous())
        torch.testing.assert_close(split[:, cols], alone.T, rtol=1e-6, atol=1e-7)


def test_build_optimizer_routes_moe_stacks_as_batches():
    from specopt import build_optimizer

    class MoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(6, 6, bias=False)
            self.experts = nn.Parameter(torch.randn(4, 6, 10) * 0.1)
            self.conv = nn.Conv2d(6, 6, 3, bias=False)
            self.out = nn.Linear(6, 6, bias=False)

    net = MoE()
    opt = build_optimizer(net, "muon", lr=1.0, weight_decay=0.0)
    layout = {id(p): g.get("matrix_layout") for g in opt.param_groups for p in g["params"]}
    assert layout[id(net.experts)] == "batch"
    assert layout[id(net.conv.weight)] == "flatten"
    g = torch.randn(4, 6, 10)
    before = net.experts.detach().clone()
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    net.experts.grad = g
    opt.step()
    delta = before - net.experts.detach()
    for e in range(4):  # each expert moved by its own near-orthogonal matrix
        s = torch.linalg.svdvals(delta[e].double())
        assert s.max() / s.min() < 3, s


def test_qkv_split_orthogonalizes_blocks_separately():
    d = 16
    w = nn.Parameter(torch.randn(3 * d, d))
    g = torch.randn(3 * d, d)
    opt = Muon(
        [{"params": [w], "split_sizes": (d, d, d)}],
        lr=1.0,
        weight_decay=0.0,
        momentum=0.0,
        nesterov=False,
        ns_dtype=torch.float64,
    )
    w0 = w.detach().clone()
    w.grad = g
    opt.step()
    delta = (w0 - w.detach()).double()
    for k in range(3):
        block = g[k * d : (k + 1) * d].double()
        torch.testing.assert_close(
            delta[k * d : (k + 1) * d], orthogonalize(block), atol=1e-6, rtol=1e-6
        )
    # not the same as orthogonalizing the fused matrix
    fused = orthogonalize(g.double()) * math.sqrt(3)
    assert (delta - fused).abs().max() > 0.05


def _model_and_opt(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 20, bias=False), nn.Linear(20, 12, bias=False))
    opt = Muon(model.parameters(), lr=0.05, weight_decay=0.01)
    return model, opt


def _train(model, opt, steps, start):
    for t in range(start, start + steps):
        g = torch.Generator().manual_seed(t)
        x = torch.randn(8, 12, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def test_resume_is_bit_identical():
    model, opt = _model_and_opt()
    _train(model, opt, 3, 0)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, 3, 3)

    model2, opt2 = _model_and_opt(seed=1)  # different init: everything must come from the ckpt
    buf.seek(0)
    ckpt = torch.load(buf)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    _train(model2, opt2, 3, 3)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


@needs_torch_muon
def test_resumes_from_a_torch_muon_checkpoint():
    ref_p, ours_p = _params(), _params()
    ref = torch.optim.Muon(ref_p, lr=0.02)
    _run(ref, ref_p, 2)
    ckpt = copy.deepcopy(ref.state_dict())
    with torch.no_grad():
        for a, b in zip(ours_p, ref_p, strict=True):
            a.copy_(b)
    ours = Muon(ours_p, lr=0.5)  # lr and NS settings come from the checkpoint
    ours.load_state_dict(ckpt)
    assert ours.param_groups[0]["ns_schedule"] is None  # filled in by __setstate__
    assert _max_rel(_run(ours, ours_p, 2, start=2), _run(ref, ref_p, 2, start=2)) == 0.0


def test_step_reuses_its_stacked_buffers():
    # No batch-sized allocation per step: the buckets' workspaces (stacked update, NS
    # iterates, Gram matrices) are allocated once and reused.
    params = _params() + _params(1)  # two of each shape -> batched buckets
    opt = Muon(params, lr=0.02, ns_dtype=torch.bfloat16)
    _run(opt, params, 1)
    spaces = list(opt._workspaces.values())
    ptrs = [b.data_ptr() for ws, U in spaces for b in (U, *ws.buffers())]
    assert {ws.batch for ws, _ in spaces} == {2}
    _run(opt, params, 2, start=1)
    assert list(opt._workspaces.values()) == spaces
    assert [b.data_ptr() for ws, U in spaces for b in (U, *ws.buffers())] == ptrs
    params[0].grad = None  # a bucket shrinks for a step: its buffers are replaced, not added
    opt.step()
    assert len(opt._workspaces) == len(spaces)
    opt.free_workspaces()
    assert not getattr(opt, "_workspaces", None)
    _run(opt, params, 1, start=3)  # rebuilt on demand
    assert len(opt._workspaces) == len(spaces)


def test_same_shaped_buckets_of_two_groups_keep_their_own_buffers():
    # Two groups with same-shaped matrices in buckets of different sizes (a fused QKV's
    # blocks in their own group beside the other square weights): neither evicts the
    # other's buffers, so no step after the first allocates.
    a, b = _params(), _params(1)
    params = a + b[2:]  # group 0: one of each shape; group 1: a second (32, 32)
    qkv = nn.Parameter(torch.randn(96, 32))  # three (32, 32) blocks
    opt = Muon([{"params": params}, {"params": [qkv], "split_sizes": (32, 32, 32)}], lr=0.02,
               ns_dtype=torch.float32)
    everything = [*params, qkv]
    _run(opt, everything, 1)
    spaces = dict(opt._workspaces)
    ptrs = [b.data_ptr() for ws, U in spaces.values() for b in (U, *ws.buffers())]
    assert sorted(ws.batch for ws, _ in spaces.values()) == [1, 1, 2, 3]
    _run(opt, everything, 2, start=1)
    assert opt._workspaces == spaces
    assert [b.data_ptr() for ws, U in spaces.values() for b in (U, *ws.buffers())] == ptrs


def test_loads_an_old_format_state_dict():
    # Checkpoints written before matrix_layout / transposed existed lack those group keys.
    model, opt = _model_and_opt()
    _train(model, opt, 2, 0)
    ckpt = copy.deepcopy(opt.state_dict())
    for g in ckpt["param_groups"]:
        del g["matrix_layout"], g["transposed"]
    model2, opt2 = _model_and_opt(seed=1)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(ckpt)
    assert opt2.param_groups[0]["matrix_layout"] is None
    assert opt2.param_groups[0]["transposed"] is False
    _train(model, opt, 2, 2)
    _train(model2, opt2, 2, 2)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


@needs_torch_muon
def test_torch_muon_loads_a_specopt_state_dict_and_steps():
    params = _params()
    ours = Muon(params, lr=0.02)  # specopt's schedule: no torch coefficients of its own
    _run(ours, params, 1)
    sd = ours.state_dict()
    g = sd["param_groups"][0]
    assert isinstance(g["ns_steps"], int) and g["ns_steps"] == 5
    assert isinstance(g["ns_coefficients"], tuple) and len(g["ns_coefficients"]) == 3
    assert all(isinstance(c, float) for c in g["ns_coefficients"])
    ref_p = [nn.Parameter(p.detach().clone()) for p in params]
    ref = torch.optim.Muon(ref_p)
    ref.load_state_dict(copy.deepcopy(sd))
    _run(ref, ref_p, 1, start=1)  # used to fail at its first step (ns_steps=None)
    assert all(torch.isfinite(p).all() for p in ref_p)
    # ... and specopt reads its own settings back, not torch's stand-ins.
    again = Muon(_params(), lr=0.5, ns_coefficients=KJ)
    again.load_state_dict(copy.deepcopy(sd))
    assert again.param_groups[0]["ns_coefficients"] is None
    assert again.param_groups[0]["ns_steps"] is None


def test_state_shape_mismatch_names_the_parameter_and_loads_nothing():
    small = nn.Sequential(nn.Linear(12, 20, bias=False))
    wide = nn.Sequential(nn.Linear(12, 24, bias=False))
    opt_small = Muon(small.named_parameters(), lr=0.05)
    small[0].weight.grad = torch.randn(20, 12)
    opt_small.step()
    opt = Muon(wide.named_parameters(), lr=0.05)
    with pytest.raises(ValueError, match=r"momentum_buffer for parameter '0.weight' \(shape "
                       r"\(24, 12\)\) has shape \(20, 12\)"):
        opt.load_state_dict(opt_small.state_dict())
    assert not opt.state


def test_lr_scheduler_drives_the_step():
    p = nn.Parameter(torch.zeros(6, 10))
    opt = Muon([p], lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    g = torch.randn(6, 10)
    sizes = []
    for _ in range(3):
        before = p.detach().clone()
        p.grad = g
        opt.step()
        sched.step()
        sizes.append((p.detach() - before).norm().item())
    assert sizes[1] == pytest.approx(sizes[0] / 2, rel=1e-6)
    assert sizes[2] == pytest.approx(sizes[0] / 4, rel=1e-6)


def test_zero_grad_gives_zero_update():
    params = _params()
    opt = Muon(params, weight_decay=0.0)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.detach(), b)


def test_nonfinite_grad_raises_with_name_and_changes_nothing():
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.Linear(6, 3, bias=False))
    opt = Muon(model.named_parameters(), lr=0.1)
    before = copy.deepcopy(model.state_dict())
    model[0].weight.grad = torch.randn(6, 4)
    model[1].weight.grad = torch.full((3, 6), float("nan"))
    with pytest.raises(
        FloatingPointError,
        match=r"non-finite gradient \(NaN or Inf\) in parameter '1.weight' "
        r"\(shape \(3, 6\), group 0\)",
    ):
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert len(opt.state) == 0


def test_nonfinite_unnamed_param_is_named_by_index():
    params = _params()
    opt = Muon(params)
    for p in params:
        p.grad = torch.randn_like(p)
    params[2].grad[0, 0] = float("inf")
    with pytest.raises(FloatingPointError,
                       match=r"parameter 'param_groups\[0\].params\[2\]' \(shape \(32, 32\)"):
        opt.step()


def test_nonfinite_skip_counts_and_updates_the_rest():
    params = _params()
    opt = Muon(params, nonfinite="skip")
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    params[1].grad[3, 3] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"skipping the update of parameter 'param_groups"):
        opt.step()
    assert torch.isnan(params[1].grad).any()  # the gradient is given back after the step
    assert torch.equal(params[1].detach(), before[1])
    assert "momentum_buffer" not in opt.state[params[1]]
    assert not torch.equal(params[0].detach(), before[0])
    assert torch.isfinite(params[0]).all()
    assert opt.nonfinite_skips == {"param_groups[0].params[1]": 1}
    assert opt.param_groups[0]["nonfinite_skips"] == [0, 1, 0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(lr=-1.0), r"lr must be finite and >= 0, got -1.0"),
        (dict(lr=math.inf), r"lr must be finite and >= 0, got inf"),
        (dict(lr=math.nan), r"lr must be finite and >= 0, got nan"),
        (dict(lr=torch.tensor(math.inf)), r"lr must be finite and >= 0, got inf"),
        (dict(weight_decay=math.nan), r"weight_decay must be finite and >= 0"),
        (dict(matrix_layout="stack"), r"matrix_layout must be None or one of"),
        (dict(momentum=1.0), r"momentum must be in \[0, 1\), got 1.0"),
        (dict(weight_decay=-0.1), r"weight_decay must be finite and >= 0"),
        (dict(adjust_lr_fn="rms"), r"adjust_lr_fn must be None or one of"),
        (dict(ns_schedule="fastest"), r"ns_schedule: unknown schedule 'fastest'"),
        (dict(ns_coefficients=(1.0, 2.0)), r"ns_coefficients\[0\]: expected an \(a, b, c\)"),
        (dict(ns_coefficients=KJ, ns_schedule="pe4"), "not both"),
        (dict(ns_method="magic"), r"ns_method must be None or one of"),
        (dict(ns_steps=0), r"ns_steps must be None or an int in \[1, 100\), got 0"),
        (dict(ns_dtype=torch.int32), r"ns_dtype must be None or a float dtype"),
        (dict(nonfinite="ignore"), r"nonfinite must be one of"),
        (dict(split_sizes=(10, 10)), r"split_sizes \(10, 10\) must sum to the fan-out 24"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Muon(_params(), **kwargs)


# torch.testing._internal.common_optimizers.optim_error_inputs_func_muon: torch's own error
# inputs and the regexes its tests match; a drop-in keeps them (adding detail after).
@pytest.mark.parametrize(
    ("params", "kwargs", "error", "regex"),
    [
        (None, dict(lr=torch.tensor([0.001, 0.001])), ValueError, "Tensor lr must be 1-element"),
        (None, dict(adjust_lr_fn="arbitrary"), ValueError,
         "Adjust learning rate function arbitrary is not supported"),
        ("complex", {}, RuntimeError, "Muon does not support complex parameters"),
    ],
)
def test_torch_error_inputs_keep_torch_messages(params, kwargs, error, regex):
    p = torch.rand(2, 3, dtype=torch.complex64 if params == "complex" else torch.float32)
    p.grad = torch.rand_like(p)
    with pytest.raises(error, match=regex):
        Muon([p], **kwargs)
    if HAS_TORCH_MUON:  # the same input makes torch say the same words
        with pytest.raises(error, match=regex):
            torch.optim.Muon([p], **kwargs).step()


def test_bad_params():
    with pytest.raises(ValueError, match=r"floating-point parameters; parameter 0 of group 0 "
                       r"\(shape \(3, 4\)\) is torch.int64"):
        Muon([torch.zeros(3, 4, dtype=torch.int64)])
    with pytest.raises(ValueError, match=r"parameter 'bias' \(shape \(3,\)\) has 1 dims"):
        Muon(nn.Linear(2, 3).named_parameters())
    with pytest.raises(ValueError, match="complex parameters"):
        Muon([nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))])
    opt = Muon(_params())
    with pytest.raises(ValueError, match=r"parameter 0 of group 1 \(shape \(4,\)\) has 1 dims"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(4))]})
    assert len(opt.param_groups) == 1


def test_one_gradient_scan_per_step(monkeypatch):
    # Muon alone and the hybrid (Muon + AdamW children) each scan the gradients once.
    import specopt.optim.nonfinite as nf
    from specopt import build_optimizer

    calls = []
    real = nf.nonfinite_indices
    monkeypatch.setattr(nf, "nonfinite_indices", lambda ts: calls.append(len(ts)) or real(ts))
    params = _params()
    opt = Muon([{"params": params[:1]}, {"params": params[1:], "lr": 0.01}])
    _run(opt, params, 1)
    assert calls == [3]
    calls.clear()
    net = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3))
    hybrid = build_optimizer(net, "muon")
    net(torch.randn(4, 6)).sum().backward()
    hybrid.step()
    assert calls == [len(list(net.parameters()))]


def test_sparse_grad_rejected():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = Muon(emb.named_parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"sparse gradients: parameter 'weight'"):
        opt.step()


@needs_torch_muon
@pytest.mark.slow
def test_bench_quick_runs_and_default_error_is_no_worse(tmp_path, load_tool):
    import json

    bench = load_tool("bench_muon")
    out = tmp_path / "muon.json"
    result = bench.main(["--quick", "--json", str(out)])
    assert json.loads(out.read_text())["matrices"] == result["matrices"] == 28
    import statistics

    med = {k: statistics.median(v) for k, v in result["step_times_s"].items()}
    assert result["speedup_vs_torch"] == pytest.approx(med["torch"] / med["specopt"])
    for k, m in med.items():  # GFLOP/s are the counted NS FLOPs over the median step
        assert result["gflops"][k] == pytest.approx(result["matmul_flops"][k] / m / 1e9)
        assert 0 < result["share_of_peak"][k] < 1.5  # a share of a peak measured in the run
    ratio = result["matmul_flops"]["torch"] / result["matmul_flops"]["specopt"]
    assert ratio == pytest.approx(result["flops_ratio_torch_over_specopt"])
    assert ratio > 1.5
    assert "AVX" in result["machine"] or "GPU" in result["machine"]
    err = result["orthogonality_error"]
    for inputs in ("momentum", "logspaced"):
        assert err["specopt"][inputs] <= err["torch"][inputs]
