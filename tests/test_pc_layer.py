"""PC parametrization, apply_pc / merge_pc: exactness against SVD, gradients, state, bad input."""

import io
import re

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import specopt.pc.parametrization as pc_mod
from specopt import Muon, build_optimizer
from specopt.models import PRESETS, Llama, LlamaConfig
from specopt.pc import (
    PC_LEVELS,
    OddPolynomial,
    PCParametrization,
    apply_pc,
    get_pc,
    is_pc_module,
    merge_pc,
    pc_weight,
)

TINY = PRESETS["tiny"]



def _tiny_llama(seed: int = 0, **overrides) -> Llama:
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**TINY.to_dict(), **overrides})
    return Llama(cfg)


def _batch(seed: int = 0, batch: int = 2, seq: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (batch, seq + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _linear(out_f: int, in_f: int, dtype=torch.float32, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=False, dtype=dtype)


def _raw(module: nn.Module) -> torch.Tensor:
    return module.parametrizations.weight.original


def _predicted_singular_values(module: nn.Module) -> torch.Tensor:
    """gamma * s * f(sigma_i / s) from an SVD of the raw weight, in float64."""
    pc = get_pc(module)
    raw = _raw(module).detach().double()
    s = pc.sigma(_raw(module)).double().clamp_min(pc.eps)
    sig = torch.linalg.svdvals(raw)
    f = torch.from_numpy(pc.polynomial((sig / s).numpy()))
    gamma = 1.0 if pc.gamma is None else pc.gamma.detach().double()
    scale = s if pc.norm_recovery else 1.0
    return (gamma * scale * f).abs().sort(descending=True).values


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("shape", [(48, 20), (20, 48), (32, 32)], ids=["tall", "wide", "square"])
@pytest.mark.parametrize("level", [1, 4])
@pytest.mark.parametrize("norm_recovery", [True, False])
def test_singular_values_equal_gamma_s_f(dtype, rtol, shape, level, norm_recovery):
    lin = _linear(*shape, dtype=dtype)
    apply_pc(nn.Sequential(lin), include="0", level=level, norm_recovery=norm_recovery)
    with torch.no_grad():
        get_pc(lin).gamma.fill_(0.7)
    got = torch.linalg.svdvals(lin.weight.detach().double())
    want = _predicted_singular_values(lin)
    assert lin.weight.dtype == dtype and lin.weight.shape == shape
    torch.testing.assert_close(got, want, rtol=0, atol=rtol * want[0].item())


def test_identity_polynomial_gives_gamma_times_raw_weight():
    lin = _linear(12, 7, dtype=torch.float64)
    apply_pc(nn.Sequential(lin), include="0", coefficients=(1.0,), gamma_init=2.5)
    torch.testing.assert_close(lin.weight, 2.5 * _raw(lin), rtol=1e-14, atol=0)


def test_norm_recovery_off_sets_spectral_norm_to_gamma():
    lin = _linear(30, 20, dtype=torch.float64)
    apply_pc(nn.Sequential(lin), include="0", level=1, norm_recovery=False, gamma_init=0.5)
    # level 1 peaks at 1.00003 and f(1) = 1: sigma_max(W_eff) = gamma * max f(sigma_i / s).
    top = torch.linalg.matrix_norm(lin.weight.detach(), 2)
    assert top.item() == pytest.approx(0.5, rel=1e-4)


def test_forward_never_advances_power_iteration():
    model = _tiny_llama()
    apply_pc(model)
    pc = get_pc(model.layers[0].feed_forward.w1)
    u, v = pc.u.clone(), pc.v.clone()
    for _ in range(3):
        _ = model.layers[0].feed_forward.w1.weight
        model(_batch()[0])
    assert torch.equal(u, pc.u) and torch.equal(v, pc.v)


def test_default_targets_on_llama_and_qkv_opt_in():
    model = _tiny_llama()
    handle = apply_pc(model)
    want = [f"layers.{i}.{n}" for i in range(TINY.n_layers)
            for n in ("attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")]
    assert handle.names == want
    assert not is_pc_module(model.layers[0].attention.wq) and not is_pc_module(model.output)
    model2 = _tiny_llama()
    names = apply_pc(model2, include_qkv=True).names
    assert "layers.0.attention.wq" in names and "layers.1.attention.wv" in names
    assert len(names) == 7 * TINY.n_layers


def test_targets_globs_and_predicate():
    model = _tiny_llama()
    assert apply_pc(model, include="layers.*.feed_forward.w2").names == [
        "layers.0.feed_forward.w2", "layers.1.feed_forward.w2"]
    model = _tiny_llama()
    h = apply_pc(model, predicate=lambda name, m: name.endswith("wq") and m.out_features == 64)
    assert h.names == ["layers.0.attention.wq", "layers.1.attention.wq"]


def test_sigma_within_one_percent_after_warmup_steps():
    model = _tiny_llama()
    handle = apply_pc(model, init_iters=10)  # the published setting: 10 iterations
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    handle.attach(opt)
    x, y = _batch()
    for _ in range(5):
        opt.zero_grad()
        model.loss(x, y).backward()
        opt.step()
    for name, pc in handle.parametrizations.items():
        raw = _raw(handle.modules[name])
        true = torch.linalg.matrix_norm(raw.detach().double(), 2).item()
        est = pc.sigma(raw).item()
        assert est == pytest.approx(true, rel=1e-2), name
        assert est <= true * (1 + 1e-6)  # power iteration never overestimates


def test_gradcheck_float64_through_s():
    g = torch.Generator().manual_seed(3)
    for shape in [(6, 4), (4, 6)]:
        W = torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True)
        gamma = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
        pc = PCParametrization(W.detach(), polynomial=PC_LEVELS[4])
        pc.refresh_(W.detach(), 100)
        u, v = pc.u.clone(), pc.v.clone()

        s0 = (u @ W.detach() @ v).item()

        # Numerical differences see every s; multiplying by s0 / stopgrad(s) turns the
        # detached multiplier into the constant s0 for both sides, so gradcheck checks
        # gamma * s0 * f(W / s(W)) with the gradient flowing through s(W).
        def fn(W, gamma, u=u, v=v, s0=s0):
            out = pc_weight(W, u, v, gamma, PC_LEVELS[4].coefficients)
            return out * (s0 / (u @ W @ v).detach())

        assert torch.autograd.gradcheck(fn, (W, gamma))


def test_gradient_matches_svd_reference_with_detached_multiplier():
    # Reference: W_eff = stopgrad(s) * U f(S / s) V^T with s = u^T W v differentiable,
    # built from a differentiable SVD. Equal gradients show s divides with gradient and
    # multiplies back without.
    g = torch.Generator().manual_seed(4)
    W = torch.randn(7, 5, dtype=torch.float64, generator=g)
    poly = PC_LEVELS[2]
    pc = PCParametrization(W, polynomial=poly, learn_gamma=False)
    pc.refresh_(W, 200)
    G = torch.randn(7, 5, dtype=torch.float64, generator=g)

    W1 = W.clone().requires_grad_()
    (pc(W1) * G).sum().backward()

    W2 = W.clone().requires_grad_()
    s = pc.u @ W2 @ pc.v
    U, S, Vh = torch.linalg.svd(W2 / s, full_matrices=False)
    x = S
    f = sum(c * x ** (2 * j + 1) for j, c in enumerate(poly.coefficients))
    ref = s.detach() * (U * f) @ Vh
    (ref * G).sum().backward()
    torch.testing.assert_close(W1.grad, W2.grad, rtol=1e-8, atol=1e-10)

    # And the gradient is not the one with s fully detached (the test can fail).
    W3 = W.clone().requires_grad_()
    s3 = (pc.u @ W3 @ pc.v).detach()
    U, S, Vh = torch.linalg.svd(W3 / s3, full_matrices=False)
    f3 = sum(c * S ** (2 * j + 1) for j, c in enumerate(poly.coefficients))
    (s3 * (U * f3) @ Vh * G).sum().backward()
    assert (W3.grad - W1.grad).abs().max() > 1e-6


def _train_steps(model, handle, opt, steps=2):
    handle.attach(opt)
    x, y = _batch()
    for _ in range(steps):
        opt.zero_grad()
        model.loss(x, y).backward()
        opt.step()


def test_state_dict_round_trip():
    model = _tiny_llama(seed=0)
    handle = apply_pc(model)
    _train_steps(model, handle, torch.optim.AdamW(model.parameters(), lr=1e-2))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)
    assert "layers.0.feed_forward.w1.parametrizations.weight.original" in sd
    assert "layers.0.feed_forward.w1.parametrizations.weight.0.u" in sd
    assert sd["layers.0.feed_forward.w1.parametrizations.weight.0.gamma"].ndim == 0

    other = _tiny_llama(seed=1)
    apply_pc(other)
    other.load_state_dict(sd)
    x, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(get_pc(other.layers[1].attention.wo).v,
                               get_pc(model.layers[1].attention.wo).v, rtol=0, atol=0)


def test_loading_nonfinite_vectors_reinitialises_with_warning():
    model = _tiny_llama()
    apply_pc(model)
    sd = model.state_dict()
    sd["layers.0.attention.wo.parametrizations.weight.0.u"].fill_(float("nan"))
    with pytest.warns(UserWarning, match=r"layers\.0\.attention\.wo.*zero or non-finite"):
        model.load_state_dict(sd)
    assert torch.isfinite(get_pc(model.layers[0].attention.wo).u).all()


def test_merge_equivalence_and_plain_state_dict():
    model = _tiny_llama(seed=0)
    handle = apply_pc(model)
    _train_steps(model, handle, torch.optim.AdamW(model.parameters(), lr=1e-2), steps=3)
    x, _ = _batch(seed=5)
    with torch.no_grad():
        out_pc = model(x)
    raw_param = _raw(model.layers[0].feed_forward.w1)
    assert merge_pc(model) is model
    w1 = model.layers[0].feed_forward.w1
    assert type(w1) is nn.Linear and not parametrize.is_parametrized(w1)
    assert w1.weight is raw_param  # same Parameter object, now holding W_eff
    assert not any(n.endswith(("gamma", ".u", ".v")) for n in model.state_dict())
    with torch.no_grad():
        out_merged = model(x)
    rel = (out_merged - out_pc).norm() / out_pc.norm()
    assert rel <= 1e-5

    plain = _tiny_llama(seed=7)
    assert list(plain.state_dict()) == list(model.state_dict())
    plain.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        rel2 = (plain(x) - out_pc).norm() / out_pc.norm()
    assert rel2 <= 1e-5


def test_gradient_accumulation_computes_w_eff_once(monkeypatch):
    calls = {"n": 0}
    real = pc_mod.pc_weight

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    micro = [_batch(seed=s, batch=1) for s in range(3)]

    def grads_of(model):
        return [p.grad.clone() for p in model.parameters()]

    # Reference: W_eff recomputed for every micro-batch.
    ref = _tiny_llama(seed=0)
    n_pc = len(apply_pc(ref))
    for x, y in micro:
        ref.loss(x, y).backward()
    monkeypatch.setattr(pc_mod, "pc_weight", counting)

    # 1) handle.accumulate(): one PC forward + backward per step, backward per micro-batch.
    model = _tiny_llama(seed=0)
    handle = apply_pc(model)
    calls["n"] = 0
    with handle.accumulate():
        for x, y in micro:
            model.loss(x, y).backward()
    assert calls["n"] == n_pc
    for a, b in zip(grads_of(model), grads_of(ref), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    gammas = handle.gamma_parameters()
    assert len(gammas) == n_pc and all(g.grad is not None for g in gammas)

    # 2) parametrize.cached() with one backward of the summed loss.
    model2 = _tiny_llama(seed=0)
    apply_pc(model2)
    calls["n"] = 0
    with parametrize.cached():
        total = sum(model2.loss(x, y) for x, y in micro)
    total.backward()
    assert calls["n"] == n_pc
    for a, b in zip(grads_of(model2), grads_of(ref), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_accumulate_backpropagates_nothing_when_body_raises():
    model = _tiny_llama()
    handle = apply_pc(model)
    with pytest.raises(RuntimeError, match="boom"), handle.accumulate():
        model.loss(*_batch()).backward()
        raise RuntimeError("boom")
    assert _raw(model.layers[0].feed_forward.w1).grad is None
    assert get_pc(model.layers[0].feed_forward.w1)._accumulation_leaf is None


@pytest.mark.parametrize("optimizer", ["adamw", "muon", "build_optimizer"])
def test_tiny_training_run_with_pc(optimizer):
    model = _tiny_llama(seed=0)
    handle = apply_pc(model, level=4 if optimizer == "adamw" else 2)
    extra = None
    if optimizer == "adamw":  # plain torch AdamW
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    elif optimizer == "muon":  # specopt.Muon on the hidden 2-D weights, hook on it
        hidden = [p for n, p in model.named_parameters() if p.ndim == 2 and "layers." in n]
        ids = {id(p) for p in hidden}
        opt = Muon(hidden, lr=2e-2, adjust_lr_fn="match_rms_adamw")
        extra = torch.optim.AdamW([p for p in model.parameters() if id(p) not in ids], lr=1e-2)
    else:  # Muon for the raw PC weights (2-D), AdamW for gamma (0-D), norms, embeddings
        opt = build_optimizer(model, "muon", lr=2e-2, adamw_lr=1e-2)
        routes = {r.name: r.optimizer for r in opt.routing.routes}
        w1 = "layers.0.feed_forward.w1.parametrizations.weight"
        assert routes[f"{w1}.original"] == "muon" and routes[f"{w1}.0.gamma"] == "adamw"
    handle.attach(opt)
    x, y = _batch(batch=4, seq=32)
    losses = []
    gamma = handle.gamma_parameters()[0]
    for _ in range(15):
        opt.zero_grad()
        loss = model.loss(x, y)
        loss.backward()
        if extra is not None:
            extra.step()
            extra.zero_grad()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses
    assert gamma.item() != 1.0  # gamma is trained
    pc = get_pc(model.layers[0].feed_forward.w2)
    raw = _raw(model.layers[0].feed_forward.w2)
    true = torch.linalg.matrix_norm(raw.detach(), 2).item()
    assert pc.sigma(raw).item() == pytest.approx(true, rel=1e-2)


# -- bad input ----------------------------------------------------------------------------


def test_zero_weight_gives_zero_not_nan_and_finite_gradient():
    lin = _linear(8, 5)
    with torch.no_grad():
        lin.weight.zero_()
    apply_pc(nn.Sequential(lin), include="0")
    assert torch.equal(lin.weight, torch.zeros(8, 5))
    lin(torch.randn(3, 5)).sum().backward()
    grad = _raw(lin).grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0  # c1 * upstream: it can train


def test_nonfinite_weight_rejected_at_apply():
    lin = _linear(8, 5)
    with torch.no_grad():
        lin.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"'0\.weight' \(8, 5\) has non-finite values"):
        apply_pc(nn.Sequential(lin), include="0")
    assert not parametrize.is_parametrized(lin)


def test_nonfinite_weight_during_training_keeps_vectors_and_blocks_merge():
    model = nn.Sequential(_linear(8, 5))
    handle = apply_pc(model, include="0")
    pc = get_pc(model[0])
    u = pc.u.clone()
    with torch.no_grad():
        _raw(model[0])[1, 1] = float("nan")
    handle.refresh()
    assert torch.equal(pc.u, u)  # no NaN written into the buffers
    with pytest.raises(ValueError, match=r"effective weight of '0' \(8, 5\) is not finite"):
        merge_pc(model)
    assert is_pc_module(model[0])  # nothing merged


def test_apply_twice_rejected():
    model = _tiny_llama()
    apply_pc(model)
    with pytest.raises(ValueError, match=r"'layers\.0\.attention\.wo\.weight' already has PC"):
        apply_pc(model)


def test_merge_without_pc_rejected():
    with pytest.raises(ValueError, match="no PC-parametrized module"):
        merge_pc(_tiny_llama())


def test_non_linear_target_rejected():
    model = _tiny_llama()
    with pytest.raises(TypeError,
                       match=r"'tok_embeddings' matches only non-matrix modules.*Embedding"):
        apply_pc(model, include="tok_embeddings")
    assert not any(is_pc_module(m) for m in model.modules())


def test_patterns_matching_nothing():
    # One rule everywhere: a pattern that matches nothing is an error naming it, with
    # close candidates, and the model is left untouched.
    model = _tiny_llama()
    with pytest.raises(ValueError, match=r"apply_pc: include pattern 'layers\.\*\.feed_forwrd"
                       r"\.w2' matches no module of the model; candidates \(of \d+\): "
                       r"'layers\.1\.feed_forward\.w2', 'layers\.0\.feed_forward\.w2'"):
        apply_pc(model, include=["*.w1", "layers.*.feed_forwrd.w2"])
    with pytest.raises(ValueError, match=r"exclude pattern 'nope' matches no module"):
        apply_pc(model, exclude="nope")
    assert not any(is_pc_module(m) for m in model.modules())
    with pytest.raises(ValueError, match="selected no module"):
        apply_pc(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match=r"selected no module.*once exclude="):
        apply_pc(model, include="*.w2", exclude="*.w2")


def test_include_exclude_and_deprecated_targets():
    model = _tiny_llama()
    h = apply_pc(model, exclude=["layers.1.*", "*.wo"])  # from the default selection
    assert h.names == ["layers.0.feed_forward.w1", "layers.0.feed_forward.w2",
                       "layers.0.feed_forward.w3"]
    model = _tiny_llama()
    h = apply_pc(model, include=re.compile(r"feed_forward\.w[12]$"), exclude="layers.0.*")
    assert h.names == ["layers.1.feed_forward.w1", "layers.1.feed_forward.w2"]
    with pytest.warns(DeprecationWarning, match=r"targets=\.\.\.\) is deprecated; use include"):
        h = apply_pc(_tiny_llama(), targets="*.w2")
    assert h.names == ["layers.0.feed_forward.w2", "layers.1.feed_forward.w2"]
    with pytest.raises(TypeError, match="not both"):
        apply_pc(_tiny_llama(), targets="*.w2", include="*.w2")


def test_tied_weights_rejected():
    model = _tiny_llama(tie_embeddings=True)
    with pytest.raises(ValueError, match=r"'output\.weight' \(256, 64\) is shared"):
        apply_pc(model, include="output")


def test_bad_options_rejected():
    model = _tiny_llama()
    with pytest.raises(ValueError, match="power_iters must be an int >= 1, got 0"):
        apply_pc(model, power_iters=0)
    with pytest.raises(ValueError, match="eps must be a finite float > 0"):
        apply_pc(model, eps=-1.0)
    with pytest.raises(ValueError, match="either level or coefficients"):
        apply_pc(model, level=2, coefficients=(1.0,))
    with pytest.raises(ValueError, match="either include or predicate"):
        apply_pc(model, include="*", predicate=lambda n, m: True)
    with pytest.raises(ValueError, match="include_qkv only extends the default"):
        apply_pc(model, include="*.wq", include_qkv=True)
    assert not any(is_pc_module(m) for m in model.modules())
    handle = apply_pc(model)
    with pytest.raises(TypeError, match=r"needs a torch\.optim\.Optimizer"):
        handle.attach(object())
    merge_pc(model)
    with pytest.raises(RuntimeError, match="no longer has PC"):
        handle.refresh()


def test_custom_polynomial_object_accepted():
    lin = _linear(10, 6, dtype=torch.float64)
    poly = OddPolynomial((1.5, -0.5), name="ns3")
    apply_pc(nn.Sequential(lin), include="0", coefficients=poly, learn_gamma=False)
    pc = get_pc(lin)
    assert pc.gamma is None and pc.polynomial is poly
    want = _predicted_singular_values(lin)
    torch.testing.assert_close(torch.linalg.svdvals(lin.weight.detach()), want, rtol=1e-10,
                               atol=1e-12)


def test_batched_refresh_matches_per_module_refresh_and_isolates_nonfinite():
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 9, bias=False), nn.Linear(6, 9, bias=False),
                              nn.Linear(9, 6, bias=False))
        return model, apply_pc(model, include="*", init_iters=0)

    batched, handle = build()
    single, _ = build()
    handle.refresh(iters=3)  # two (9, 6) weights share one batched call
    for mb, ms in zip(batched, single, strict=True):
        get_pc(ms).refresh_(_raw(ms), 3)
        torch.testing.assert_close(get_pc(mb).u, get_pc(ms).u, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(get_pc(mb).v, get_pc(ms).v, rtol=1e-6, atol=1e-7)

    u0, v1 = get_pc(batched[0]).u.clone(), get_pc(batched[1]).v.clone()
    with torch.no_grad():
        _raw(batched[0])[0, 0] = float("nan")
    handle.refresh()
    assert torch.equal(get_pc(batched[0]).u, u0)  # kept: its weight is not finite
    v1_new = get_pc(batched[1]).v  # its batch neighbour still iterates
    assert not torch.equal(v1_new, v1) and v1_new.norm().item() == pytest.approx(1.0)


def test_autocast_does_not_lower_pc_precision():
    lin = _linear(40, 24)
    apply_pc(nn.Sequential(lin), include="0")
    want = lin.weight.detach().clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lin.weight
        out = lin(torch.randn(3, 24))
    assert got.dtype == torch.float32 and out.dtype == torch.bfloat16
    torch.testing.assert_close(got.detach(), want, rtol=0, atol=0)


def test_bench_pc_quick_runs_and_writes_json(tmp_path, load_tool):
    import json

    bench = load_tool("bench_pc")
    out = tmp_path / "pc.json"
    assert bench.main(["--quick", "--tokens", "128", "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    kinds = {r["kind"]: r for r in rows}
    assert {"train", "infer", "infer-unmerged"} <= set(kinds)
    for r in rows:  # each ratio is the two medians it reports, not a placeholder
        ours = r.get("pc_s", r.get("merged_s"))
        assert ours is not None and r["plain_s"] > 0, r
        assert r["time_ratio"] == pytest.approx(ours / r["plain_s"], rel=1e-12)
        assert r["overhead"] == pytest.approx(r["time_ratio"] - 1.0, abs=1e-12)
    assert "merged_s" in kinds["infer"] and "pc_s" in kinds["infer-unmerged"]
    assert len({r["params"] for r in rows}) == 1  # one model size compared throughout


def test_meta_device_construction_then_reset():
    with torch.device("meta"):
        model = Llama(TINY)
    handle = apply_pc(model)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():  # parameters() yields the raw PC weights (``...original``)
        for p in model.parameters():
            p.normal_(std=0.02)
    handle.reset(iters=200)  # random Gaussian weights: small spectral gap, slow convergence
    pc = get_pc(model.layers[0].feed_forward.w1)
    raw = _raw(model.layers[0].feed_forward.w1)
    assert pc.gamma.item() == 1.0
    true = torch.linalg.matrix_norm(raw.detach(), 2).item()
    assert pc.sigma(raw).item() == pytest.approx(true, rel=1e-2)
    # (the model's own rope buffers are left uninitialised by to_empty: check the PC layer)
    assert torch.isfinite(model.layers[0].feed_forward.w1(torch.randn(3, TINY.dim))).all()


def test_merging_a_deep_copy_leaves_the_original_pc_model_intact():
    import copy

    model = _tiny_llama()
    apply_pc(model)
    x, _ = _batch()
    with torch.no_grad():
        before = model(x)
    export = merge_pc(copy.deepcopy(model))
    assert is_pc_module(model.layers[0].feed_forward.w1)
    assert type(export.layers[0].feed_forward.w1) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
        torch.testing.assert_close(export(x), before, rtol=1e-5, atol=1e-6)
