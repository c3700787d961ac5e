"""build_optimizer / HybridOptimizer: routing, delegation to Muon and torch AdamW, resume."""

from __future__ import annotations

import copy
import io
import json
import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_post_hook

from specopt.models import Llama, LlamaConfig
from specopt.optim.hybrid import (
    HybridOptimizer,
    NonFiniteGradientError,
    build_optimizer,
    describe_routing,
)
from specopt.optim.muon import Muon

CFG = dict(vocab_size=64, dim=32, n_layers=2, n_heads=2, max_seq_len=16)
MATRICES = (
    "attention.wq",
    "attention.wk",
    "attention.wv",
    "attention.wo",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
)



def _model(tied: bool = False, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig(**CFG, tie_embeddings=tied))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, CFG["vocab_size"], (2, 9), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _backward(model: nn.Module, step: int) -> None:
    model.zero_grad(set_to_none=True)
    model.loss(*_batch(step)).backward()


class FakePC(nn.Module):
    """PC-like parametrization: a 0-D learnable gain on the raw weight."""

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.tensor(1.0))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.gamma * w


def _apply_fake_pc(model: Llama, names: tuple[str, ...] = ("attention.wo", "feed_forward.w1")):
    for block in model.layers:
        for n in names:
            parametrize.register_parametrization(block.get_submodule(n), "weight", FakePC())
    return model


def _optimized_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


# ------------------------------------------------------------------------- routing


@pytest.mark.parametrize("tied", [False, True])
def test_routing_llama(tied):
    model = _model(tied)
    opt = build_optimizer(model, "muon")
    report = opt.routing
    assert isinstance(opt, HybridOptimizer) and isinstance(opt, torch.optim.Optimizer)
    for i in range(CFG["n_layers"]):
        for n in MATRICES:
            r = report[f"layers.{i}.{n}.weight"]
            assert (r.optimizer, r.weight_decay, r.reason) == ("muon", True, "hidden matrix")
        for n in ("attention_norm", "ffn_norm"):
            r = report[f"layers.{i}.{n}.weight"]
            assert (r.optimizer, r.weight_decay, r.reason) == ("adamw", False, "norm weight")
    emb, head = report["tok_embeddings.weight"], report["output.weight"]
    assert emb.optimizer == head.optimizer == "adamw"
    assert report["norm.weight"].optimizer == "adamw"
    if tied:
        assert emb is head and emb.aliases == ("output.weight",)
        assert "tied" in emb.reason and "output head" in emb.reason
        assert len(report) == 2 + 9 * CFG["n_layers"]
    else:
        assert head.reason == "output head (by module name)" and emb.reason == "embedding"
        assert len(report) == 3 + 9 * CFG["n_layers"]
    # Every unique trainable tensor is optimized exactly once, on the side the report says.
    params = _optimized_params(opt)
    assert len(params) == len({id(p) for p in params}) == len(list(model.parameters()))
    muon = {id(p) for g in opt.param_groups if g["optimizer"] == "muon" for p in g["params"]}
    assert muon == {id(r.param) for r in report.select("muon")}
    assert {g["name"] for g in opt.param_groups} == {"muon", "adamw", "adamw_no_decay"}
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["adamw_no_decay"]["weight_decay"] == 0.0
    assert by_name["muon"]["weight_decay"] == by_name["adamw"]["weight_decay"] == 0.1


def test_routing_pc_like_parametrization():
    model = _apply_fake_pc(_model())
    parametrize.register_parametrization(model.output, "weight", FakePC())  # a PC head
    report = build_optimizer(model).routing
    raw = report["layers.0.feed_forward.w1.parametrizations.weight.original"]
    assert (raw.optimizer, raw.reason, raw.shape) == ("muon", "hidden matrix", (96, 32))
    assert raw.layer_name == "layers.0.feed_forward.w1.weight"
    assert report["layers.0.feed_forward.w1.weight"] is raw  # lookup by layer name
    assert report["layers.1.attention.wo.parametrizations.weight.original"].optimizer == "muon"
    gamma = report["layers.0.attention.wo.parametrizations.weight.0.gamma"]
    assert (gamma.optimizer, gamma.weight_decay, gamma.shape) == ("adamw", False, ())
    assert gamma.reason == "0-D scalar"
    head = report["output.parametrizations.weight.original"]
    assert head.optimizer == "adamw" and "output head" in head.reason
    # Patterns see the layer name of the raw weight too.
    report2 = describe_routing(model, exclude=["layers.0.feed_forward.w1.weight"])
    assert report2["layers.0.feed_forward.w1.weight"].optimizer == "adamw"


def test_head_fallback_by_vocab_and_shared_storage():
    class Net(nn.Module):
        def __init__(self, head_out: int = 50) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.proj = nn.Linear(16, 16)
            self.decoder = nn.Linear(16, head_out, bias=False)

    report = describe_routing(Net())
    dec = report["decoder.weight"]
    assert (
        dec.optimizer == "adamw"
        and dec.reason == "output head (out_features = vocab of emb.weight)"
    )
    assert report["proj.weight"].optimizer == "muon"
    assert report["proj.bias"].reason == "bias"

    net = Net()
    net.decoder.weight = nn.Parameter(net.emb.weight.detach())  # distinct Parameter, same storage
    assert (
        "shares storage with embedding emb.weight" in describe_routing(net)["decoder.weight"].reason
    )

    # Two candidates: ambiguous, so nothing is guessed, and the user is told.
    net = Net()
    net.proj2 = nn.Linear(16, 50)
    with pytest.warns(UserWarning, match="could not identify the output head"):
        report = describe_routing(net)
    assert report["decoder.weight"].optimizer == "muon" and report.notes


def test_conv_frozen_and_complex_params():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Linear(4, 4))
    net[2].weight.requires_grad_(False)
    net.register_parameter("z", nn.Parameter(torch.randn(4, 4, dtype=torch.complex64)))
    report = describe_routing(net)
    assert report["0.weight"].optimizer == "muon" and "4-D" in report["0.weight"].reason
    assert report["2.weight"].optimizer == "frozen" and not report["2.weight"].weight_decay
    assert report["z"].optimizer == "adamw" and report["z"].reason.startswith("complex")
    opt = build_optimizer(net, "adamw")
    assert all(p is not net[2].weight for p in _optimized_params(opt))
    assert len(_optimized_params(opt)) == 6  # 2 conv weights + 3 biases + z


def test_pattern_overrides():
    model = _model()
    report = describe_routing(
        model,
        include=["output.weight"],
        exclude="layers.*.attention.wq",  # a module path selects its parameters
        no_decay_patterns=["tok_embeddings.*"],
    )
    assert report["output.weight"].optimizer == "muon"
    assert report["output.weight"].reason == "include 'output.weight'"
    assert report["layers.1.attention.wq.weight"].optimizer == "adamw"
    assert report["layers.1.attention.wk.weight"].optimizer == "muon"
    emb = report["tok_embeddings.weight"]
    assert emb.optimizer == "adamw" and not emb.weight_decay
    opt = build_optimizer(model, no_decay_patterns=["layers.0.attention.wq.weight"])
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["muon_no_decay"]["param_names"] == ["layers.0.attention.wq.weight"]
    assert by_name["muon_no_decay"]["weight_decay"] == 0.0


def test_deprecated_pattern_aliases_still_route():
    model = _model()
    with pytest.warns(DeprecationWarning, match=r"muon_patterns= is deprecated; use include="):
        old = build_optimizer(model, muon_patterns=["output.weight"])
    with pytest.warns(DeprecationWarning, match=r"adamw_patterns= is deprecated; use exclude="):
        old2 = describe_routing(model, adamw_patterns=["*.wq.weight"])
    new = build_optimizer(model, include=["output.weight"])
    assert [(g["name"], g["param_names"]) for g in old.param_groups] == [
        (g["name"], g["param_names"]) for g in new.param_groups]
    assert old.routing["output.weight"].reason == "muon_patterns 'output.weight'"
    assert old2["layers.0.attention.wq.weight"].optimizer == "adamw"
    with pytest.raises(TypeError, match=r"give include \(muon_patterns is its deprecated"):
        build_optimizer(model, include=["x"], muon_patterns=["x"])


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (
            {"exclude": ["layers.0.attention.wqq"]},
            ValueError,
            r"exclude pattern 'layers\.0\.attention\.wqq' matches no parameter of the model; "
            r"candidates \(of \d+\): 'layers\.0\.attention\.wq'",
        ),
        ({"no_decay_patterns": ["x"]}, ValueError, "no_decay_patterns pattern 'x' matches no"),
        ({"include": [3]}, TypeError, r"include must be a glob string.*; got the entry 3"),
        (
            {"include": ["*.wq.weight"], "exclude": ["layers.0.*"]},
            ValueError,
            r"'layers.0.attention.wq.weight' \(shape \(32, 32\)\) matches include",
        ),
        (
            {"include": ["norm.weight"]},
            ValueError,
            r"match parameter 'norm.weight' with shape \(32,\).*ndim >= 2",
        ),
        (
            {"split_sizes": {"*.wq": (16, 15)}},
            ValueError,
            r"split_sizes \(16, 15\) for parameter 'layers.0.attention.wq.weight' \(shape "
            r"\(32, 32\), fan-out 32\) must sum to its 32 output rows",
        ),
        (
            {"split_sizes": {"norm.weight": (16, 16)}},
            ValueError,
            r"split_sizes pattern 'norm.weight' matches parameter 'norm.weight', which goes to "
            "adamw",
        ),
        ({"split_sizes": {"*.wq": (0, 32)}}, ValueError, r"positive ints"),
    ],
)
def test_bad_patterns(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        build_optimizer(_model(), **kwargs)


def test_report_forms():
    model = _model(tied=True)
    report = build_optimizer(model).routing
    text = str(report)
    assert text.splitlines()[0].split() == ["parameter", "shape", "optimizer", "decay", "reason"]
    assert "tok_embeddings.weight (= output.weight)  64x32" in text
    n_muon = 7 * CFG["n_layers"]
    numel_muon = CFG["n_layers"] * (4 * 32 * 32 + 3 * 96 * 32)
    assert report.summary()["muon"] == {"tensors": n_muon, "numel": numel_muon}
    assert f"muon: {n_muon} tensors, {numel_muon:,} params" in text
    dicts = json.loads(json.dumps(report.to_dicts()))
    assert dicts[0] == {
        "name": "tok_embeddings.weight",
        "aliases": ["output.weight"],
        "layer_name": "tok_embeddings.weight",
        "shape": [64, 32],
        "numel": 2048,
        "optimizer": "adamw",
        "weight_decay": True,
        "reason": "embedding (tied: also the output head output.weight)",
        "matrix_layout": None,
        "transposed": False,
        "split_sizes": None,
    }
    from rich.console import Console

    console = Console(record=True, width=200, file=io.StringIO())
    console.print(report)
    rendered = console.export_text()
    assert "layers.1.feed_forward.w3.weight" in rendered and "hidden matrix" in rendered
    with pytest.raises(KeyError, match="no parameter named 'missing'"):
        report["missing"]


def test_adamw_mode_groups():
    model = _apply_fake_pc(_model())
    opt = build_optimizer(model, "adamw", lr=2e-3, weight_decay=0.05)
    assert type(opt) is torch.optim.AdamW
    by_name = {g["name"]: g for g in opt.param_groups}
    assert set(by_name) == {"adamw", "adamw_no_decay"}
    assert (
        by_name["adamw"]["weight_decay"] == 0.05 and by_name["adamw_no_decay"]["weight_decay"] == 0
    )
    assert all(g["lr"] == 2e-3 and g["betas"] == (0.9, 0.95) for g in opt.param_groups)
    no_decay = set(by_name["adamw_no_decay"]["param_names"])
    assert "layers.0.feed_forward.w1.parametrizations.weight.0.gamma" in no_decay
    assert "norm.weight" in no_decay and "tok_embeddings.weight" in by_name["adamw"]["param_names"]
    assert all(r.optimizer == "adamw" for r in opt.routing)


# ------------------------------------------------------------- equivalence and resume


def test_parts_match_standalone_muon_and_adamw():
    model = _model()
    ref = copy.deepcopy(model)
    init = copy.deepcopy(model)
    opt = build_optimizer(model, lr=2e-2, adamw_lr=5e-3, weight_decay=0.1)
    named_ref = dict(ref.named_parameters())
    groups = {g["name"]: [named_ref[n] for n in g["param_names"]] for g in opt.param_groups}
    muon = Muon(
        groups["muon"], lr=2e-2, weight_decay=0.1, momentum=0.95, nesterov=True,
        adjust_lr_fn="match_rms_adamw",
    )  # fmt: skip
    adamw = torch.optim.AdamW(
        [{"params": groups["adamw"]}, {"params": groups["adamw_no_decay"], "weight_decay": 0.0}],
        lr=5e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
    )  # fmt: skip
    for step in range(3):
        _backward(model, step)
        for (_, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
            q.grad = p.grad.clone()
        opt.step()
        muon.step()
        adamw.step()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(p, q), n
        assert not torch.equal(p, init.get_parameter(n)), n  # every tensor actually moved


def _train(model, opt, sched, steps, start=0):
    for step in range(start, start + steps):
        _backward(model, step)
        opt.step()
        sched.step()


@pytest.mark.parametrize("mode", ["muon", "adamw"])
def test_bit_identical_resume(mode):
    def fresh():
        model = _apply_fake_pc(_model())
        opt = build_optimizer(model, mode, lr=1e-2)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6, eta_min=1e-3)
        return model, opt, sched

    m1, o1, s1 = fresh()
    _train(m1, o1, s1, 5)

    m2, o2, s2 = fresh()
    _train(m2, o2, s2, 2)
    buf = io.BytesIO()
    torch.save({"model": m2.state_dict(), "opt": o2.state_dict(), "sched": s2.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    m3, o3, s3 = fresh()
    m3.load_state_dict(ckpt["model"])
    o3.load_state_dict(ckpt["opt"])
    s3.load_state_dict(ckpt["sched"])
    _train(m3, o3, s3, 3, start=2)

    for (n, p), (_, q) in zip(m1.named_parameters(), m3.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    sd1, sd3 = o1.state_dict(), o3.state_dict()
    assert sd1["param_groups"] == sd3["param_groups"]
    for k, st in sd1["state"].items():
        for key, v in st.items():
            assert torch.equal(v, sd3["state"][k][key]), (k, key)


def test_state_dict_round_trip_and_kind_mismatch():
    model = _model()
    opt = build_optimizer(model)
    _backward(model, 0)
    opt.step()
    sd = opt.state_dict()
    assert [g["optimizer"] for g in sd["param_groups"]] == ["muon", "adamw", "adamw"]
    opt2 = build_optimizer(model)
    opt2.load_state_dict(copy.deepcopy(sd))
    assert opt2._muon.state is opt2.state and opt2._adamw.state is opt2.state
    assert opt2._muon.param_groups == [g for g in opt2.param_groups if g["optimizer"] == "muon"]
    sd2 = opt2.state_dict()
    assert sd2["param_groups"] == sd["param_groups"]
    assert sd2["state"].keys() == sd["state"].keys()
    # The Muon side got momentum buffers, the AdamW side moments and steps.
    muon_idx = sd["param_groups"][0]["params"][0]
    adamw_idx = sd["param_groups"][1]["params"][0]
    assert "exp_avg" in sd2["state"][adamw_idx] and "exp_avg" not in sd2["state"][muon_idx]
    swapped = copy.deepcopy(sd)
    swapped["param_groups"][0]["optimizer"] = "adamw"
    with pytest.raises(ValueError, match="loaded param group 0 is for optimizer 'adamw'"):
        opt2.load_state_dict(swapped)


def test_deepcopy_steps_identically():
    model = _model()
    opt = build_optimizer(model)
    _backward(model, 0)
    opt.step()
    copied = copy.deepcopy({"m": model, "o": opt})  # one memo: params stay shared
    model2, opt2 = copied["m"], copied["o"]
    assert opt2._muon.state is opt2.state and opt2.routing is not None
    for m, o in ((model, opt), (model2, opt2)):
        _backward(m, 1)
        o.step()
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters(), strict=True):
        assert torch.equal(p, q), n


# ---------------------------------------------------------- scheduler, hooks, groups


def test_lr_schedulers_act_per_group():
    model = _model()
    opt = build_optimizer(model, lr=1e-2, adamw_lr=3e-3)
    base = {g["name"]: g["lr"] for g in opt.param_groups}
    assert base == {"muon": 1e-2, "adamw": 3e-3, "adamw_no_decay": 3e-3}
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    for step in range(3):
        _backward(model, step)
        opt.step()
        sched.step()
        for g in opt.param_groups:
            assert g["initial_lr"] == base[g["name"]]
            assert g["lr"] == pytest.approx(base[g["name"]] * 0.5 ** (step + 1), rel=1e-12)
    # The inner optimizers read the very same dicts.
    assert opt._muon.param_groups[0]["lr"] == pytest.approx(1e-2 / 8)

    opt = build_optimizer(_model(), lr=1e-2, adamw_lr=3e-3)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4, eta_min=1e-4)
    for k in range(1, 5):
        opt.step()  # no grads: a no-op step, keeps the scheduler from warning
        cos.step()
        for g in opt.param_groups:
            want = 1e-4 + (base[g["name"]] - 1e-4) * (1 + math.cos(math.pi * k / 4)) / 2
            assert g["lr"] == pytest.approx(want, rel=1e-9)


def test_hooks_fire_once_per_step():
    model = _model()
    opt = build_optimizer(model)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    handle = register_optimizer_step_post_hook(
        lambda o, a, k: calls.append(f"global:{type(o).__name__}")
    )
    try:
        _backward(model, 0)
        opt.step()
    finally:
        handle.remove()
    assert calls == ["pre", "post", "global:HybridOptimizer"]


def test_add_param_group_and_closure():
    model = _model()
    opt = build_optimizer(model, lr=1e-2)
    extra = nn.Linear(8, 8)
    opt.add_param_group({"params": [extra.weight], "optimizer": "muon", "lr": 5e-3})
    opt.add_param_group({"params": [("extra.bias", extra.bias)], "optimizer": "adamw"})
    assert opt.param_groups[-2]["param_names"] == ["param_groups[3].params[0]"]
    assert opt.param_groups[-2]["momentum"] == 0.95 and opt.param_groups[-2]["lr"] == 5e-3
    assert opt.param_groups[-1]["param_names"] == ["extra.bias"]
    assert opt.param_groups[-1]["betas"] == (0.9, 0.95)
    with pytest.raises(ValueError, match="needs 'optimizer' set to one of"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(3))]})
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [extra.weight], "optimizer": "adamw"})
    n_groups = len(opt.param_groups)
    with pytest.raises(ValueError, match=r"Muon only optimizes matrices.*has 1 dims"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(3))], "optimizer": "muon"})
    assert len(opt.param_groups) == n_groups and len(opt._muon.param_groups) == n_groups - 3
    w0, b0 = extra.weight.detach().clone(), extra.bias.detach().clone()

    def closure():
        opt.zero_grad()
        loss = model.loss(*_batch(0)) + extra(torch.ones(2, 8)).square().sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.ndim == 0
    assert not torch.equal(extra.weight, w0) and not torch.equal(extra.bias, b0)
    opt.zero_grad()
    assert all(p.grad is None for p in _optimized_params(opt))
    # Groups added by hand survive a state_dict round trip.
    opt2 = build_optimizer(model, lr=1e-2)
    opt2.add_param_group({"params": [extra.weight], "optimizer": "muon", "lr": 5e-3})
    opt2.add_param_group({"params": [("extra.bias", extra.bias)], "optimizer": "adamw"})
    opt2.load_state_dict(opt.state_dict())
    assert len(opt2._muon.param_groups) == 2 and len(opt2._adamw.param_groups) == 3


def test_muon_side_created_lazily():
    emb_only = nn.Embedding(10, 4)
    opt = build_optimizer(emb_only)
    assert opt._muon is None and [g["name"] for g in opt.param_groups] == ["adamw"]
    w = nn.Parameter(torch.randn(4, 4))
    opt.add_param_group({"params": [w], "optimizer": "muon"})
    assert opt._muon is not None and opt._muon.state is opt.state
    w0 = w.detach().clone()
    w.grad = torch.randn(4, 4)
    opt.step()
    assert opt.state[w] and not torch.equal(w, w0)


# ------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "match"),
    [
        (("sgd",), {}, ValueError, r"optimizer must be one of \('muon', 'adamw'\), got 'sgd'"),
        ((), {"lr": -1.0}, ValueError, "lr must be finite and >= 0.0, got -1.0"),
        ((), {"adamw_lr": float("nan")}, ValueError, "adamw_lr must be finite"),
        ((), {"betas": (0.9, 1.0)}, ValueError, r"betas\[1\] must be finite and in \[0.0, 1.0\)"),
        ((), {"betas": 0.9}, ValueError, "betas must be a pair"),
        ((), {"weight_decay": "0.1"}, TypeError, "weight_decay must be a float, got str"),
        ((), {"nonfinite": "ignore"}, ValueError, r"nonfinite must be one of \('raise', 'skip'\)"),
        (("adamw",), {"ns_steps": 3}, TypeError, r"\['ns_steps'\] have no meaning with"),
        ((), {"adamw_kwargs": {"lr": 1.0}}, TypeError, r"adamw_kwargs must not set \['lr'\]"),
    ],
)
def test_bad_arguments(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        build_optimizer(_model(), *args, **kwargs)


def test_models_without_trainable_params():
    with pytest.raises(ValueError, match="model ReLU has no trainable parameters"):
        build_optimizer(nn.ReLU())
    frozen = nn.Linear(3, 3).requires_grad_(False)
    with pytest.raises(ValueError, match=r"no trainable parameters \(2 frozen tensors\)"):
        build_optimizer(frozen, "adamw")
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got list"):
        build_optimizer([nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="HybridOptimizer got an empty parameter list"):
        HybridOptimizer([])


# ------------------------------------------------------------------ non-finite, zero


@pytest.mark.parametrize("mode", ["muon", "adamw"])
def test_nonfinite_grad_raises_before_any_update(mode):
    model = _model()
    opt = build_optimizer(model, mode)
    _backward(model, 0)
    model.layers[1].attention.wk.weight.grad[0, 0] = float("nan")
    model.norm.weight.grad[3] = float("inf")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(
        NonFiniteGradientError,
        match=r"'layers.1.attention.wk.weight' \(shape \(32, 32\).*; 'norm.weight' \(shape \(32,\)",
    ):
        opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert not any(opt.state.values())


@pytest.mark.parametrize("mode", ["muon", "adamw"])
def test_nonfinite_grad_skip_and_count(mode):
    model = _model()
    ref = copy.deepcopy(model)
    opt = build_optimizer(model, mode, nonfinite="skip")
    opt_ref = build_optimizer(ref, mode)
    bad = "layers.0.feed_forward.w2.weight"
    for step in range(2):
        _backward(model, step)
        _backward(ref, step)
        dict(model.named_parameters())[bad].grad.fill_(float("nan"))
        dict(ref.named_parameters())[bad].grad = None  # the reference skips it by hand
        with pytest.warns(RuntimeWarning, match=f"skipping the update of parameter '{bad}'"):
            opt.step()
        opt_ref.step()
        assert torch.isnan(dict(model.named_parameters())[bad].grad).all()  # grad restored
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    counts = {
        name: c
        for g in opt.param_groups
        for name, c in zip(g["param_names"], g["nonfinite_skips"], strict=True)
        if c
    }
    assert counts == {bad: 2}
    if mode == "muon":
        assert opt.nonfinite_skips == {bad: 2}
    # The counts are part of the checkpoint.
    saved = {g["name"]: g["nonfinite_skips"] for g in opt.state_dict()["param_groups"]}
    assert saved["muon" if mode == "muon" else "adamw"].count(2) == 1


@pytest.mark.parametrize("mode", ["muon", "adamw"])
def test_zero_grads_give_zero_updates(mode):
    model = _model()
    opt = build_optimizer(model, mode, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    # With weight decay the only change is the decoupled decay p *= 1 - lr * wd.
    opt = build_optimizer(model, mode, lr=1e-2, weight_decay=0.5)
    opt.step()
    for n, p in model.named_parameters():
        decay = 1 - 1e-2 * 0.5 if p.ndim >= 2 else 1.0
        torch.testing.assert_close(p, before[n] * decay, rtol=1e-6, atol=0, msg=n)



@pytest.mark.parametrize("mode", ["muon", "adamw"])
def test_one_lr_trains_both_sides(mode):
    # Defaults (match_rms_adamw): the same lr fits a fixed batch on both sides.
    model = _apply_fake_pc(_model())
    opt = build_optimizer(model, mode, lr=1e-2)
    x, y = _batch(0)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = model.loss(x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_muon_kwargs_reach_muon_and_conv_weights_step():
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    coeffs = (3.4445, -4.7750, 2.0315)
    opt = build_optimizer(net, ns_coefficients=coeffs, ns_dtype=torch.float32, lr=1e-2)
    by_name = {g["name"]: g for g in opt.param_groups if g["optimizer"] == "muon"}
    # Conv kernels get their own group, read as (out, in * k) by an explicit option.
    assert by_name["muon"]["param_names"] == ["2.weight"]
    assert by_name["muon_flatten"]["param_names"] == ["0.weight"]
    assert by_name["muon_flatten"]["matrix_layout"] == "flatten"
    for g in by_name.values():
        assert g["ns_coefficients"] == coeffs and g["ns_dtype"] == torch.float32
        assert g["adjust_lr_fn"] == "match_rms_adamw" and g["momentum"] == 0.95
    w0 = net[0].weight.detach().clone()
    net(torch.randn(5, 2, 6, 6)).square().mean().backward()
    opt.step()
    assert torch.isfinite(net[0].weight).all() and not torch.equal(net[0].weight, w0)
    with pytest.raises(TypeError, match="bogus"):
        build_optimizer(net, bogus=1)


def test_huge_finite_grads_are_not_called_non_finite():
    # 1e30 is finite in fp32 but its square overflows: the fast 2-norm screen must confirm.
    model = _model()
    opt = build_optimizer(model, weight_decay=0.0)
    _backward(model, 0)
    model.layers[0].attention.wq.weight.grad.fill_(1e30)
    model.norm.weight.grad[0] = -1e30
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------------- fp16 weights


def _fp16_lm() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 32), nn.ReLU(),
                         nn.Linear(32, 16), nn.Linear(16, 50)).half()


def _step_on_few_tokens(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    # Tokens 0..3 only: the other embedding rows get an exactly zero gradient.
    model(torch.arange(4)).float().square().mean().backward()
    opt.step()


def test_fp16_plain_adamw_writes_nan_premise():
    """The failure the guard prevents: torch's AdamW, fp16, eps=1e-8, zero-grad rows."""
    model = _fp16_lm()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-8)
    _step_on_few_tokens(model, opt)
    assert not torch.isfinite(model[0].weight).all()


@pytest.mark.parametrize("mode", ["muon", "adamw"])
def test_fp16_adamw_params_refused_by_name(mode):
    model = _fp16_lm()
    with pytest.raises(ValueError, match=r"fp16 parameter.*eps=1e-08.*0\.weight \(50, 16\)"
                                         r".*autocast.*adamw_eps"):
        build_optimizer(model, mode)
    assert all(p.dtype == torch.float16 for p in model.parameters())  # nothing changed


@pytest.mark.parametrize("mode", ["muon", "adamw"])
def test_fp16_with_large_eps_steps_without_nan(mode):
    model = _fp16_lm()
    opt = build_optimizer(model, mode, adamw_eps=1e-4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(3):
        opt.zero_grad()
        _step_on_few_tokens(model, opt)
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
        assert p.dtype == torch.float16
    # Rows with a zero gradient only decay (weight decay), the used rows move.
    emb, emb0 = model[0].weight.float(), before["0.weight"].float()
    assert not torch.equal(emb[:4], emb0[:4])
    torch.testing.assert_close(emb[4:], emb0[4:], rtol=2e-3, atol=0)


def test_fp16_muon_side_zero_and_tiny_grads_stay_finite():
    """Muon needs no eps opt-in for fp16: zero and tiny gradients give finite updates."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(32, 16).half())
    z = nn.Parameter(torch.randn(32, 16).half())
    opt = Muon([w, z], lr=1e-2, weight_decay=0.0)
    w.grad = (torch.randn(32, 16) * 1e-6).half()
    z.grad = torch.zeros(32, 16, dtype=torch.float16)
    w0, z0 = w.detach().clone(), z.detach().clone()
    opt.step()
    assert torch.isfinite(w).all() and torch.isfinite(z).all()
    assert not torch.equal(w, w0)
    torch.testing.assert_close(z, z0, rtol=0, atol=0)  # a zero gradient moves nothing


def test_fp16_guard_on_hand_built_hybrid_groups():
    w = nn.Parameter(torch.randn(8, 8))
    b = nn.Parameter(torch.zeros(8, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"fp16 parameter.*params\[0\] \(8,\)"):
        HybridOptimizer([{"optimizer": "muon", "params": [w]},
                         {"optimizer": "adamw", "params": [b]}])
    opt = HybridOptimizer([{"optimizer": "muon", "params": [w]},
                           {"optimizer": "adamw", "params": [nn.Parameter(torch.zeros(2))]}])
    with pytest.raises(ValueError, match="fp16 parameter"):
        opt.add_param_group({"optimizer": "adamw", "params": [b]})
    opt.add_param_group({"optimizer": "adamw", "params": [b], "eps": 1e-4})  # opted in


# ------------------------------------------------------- vocab-sized head: when to warn


class _Block(nn.Module):
    def __init__(self, d: int, width: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, width), nn.Linear(width, d)


class _LM(nn.Module):
    """A causal LM whose FFN width equals its vocabulary and whose output projection has
    no head name: only the vocab fallback can find it."""

    def __init__(self, vocab: int = 48, d: int = 16, n_layers: int = 2, head: bool = True,
                 second: bool = False) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d)
        self.pos_emb = nn.Embedding(d, d)  # as many positions as d: not a vocabulary
        self.layers = nn.ModuleList(_Block(d, vocab) for _ in range(n_layers))
        self.mix = nn.Linear(d, d)  # out_features == the position table's size
        if head:
            self.to_logits = nn.Linear(d, vocab, bias=False)
        if second:
            self.to_logits_2 = nn.Linear(d, vocab, bias=False)


def _route_quietly(model: nn.Module):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        return describe_routing(model)


def test_vocab_head_found_past_ffns_of_vocab_width():
    report = _route_quietly(_LM())
    head = report["to_logits.weight"]
    assert head.optimizer == "adamw"
    assert head.reason == "output head (out_features = vocab of tok_emb.weight)"
    assert all(report[f"layers.{i}.fc1.weight"].optimizer == "muon" for i in range(2))
    assert report["mix.weight"].optimizer == "muon"  # position tables are no vocabulary


def test_no_warning_without_a_vocab_sized_output_projection():
    """An encoder / CLIP-like tower: FFN widths equal the vocabulary, no head at all."""
    report = _route_quietly(_LM(head=False))
    assert not report.notes
    assert all(r.optimizer == "muon" for r in report if r.name.endswith("fc1.weight"))


def test_two_top_level_vocab_projections_still_warn():
    with pytest.warns(UserWarning, match=r"could not identify the output head: 2 Linear.*"
                                         r"to_logits\.weight.*to_logits_2\.weight"):
        report = describe_routing(_LM(second=True))
    assert report["to_logits.weight"].optimizer == "muon" and report.notes


def test_position_bias_tables_go_to_adamw_without_decay():
    class Attn(nn.Module):  # Swin / SAM-style: bare tables next to the projections
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(16, 48)
            self.relative_position_bias_table = nn.Parameter(torch.randn(49, 2))
            self.rel_pos_h = nn.Parameter(torch.randn(13, 8))
            self.rel_pos_w = nn.Parameter(torch.randn(13, 8))
            self.hidden = nn.Parameter(torch.randn(16, 16))  # a bare matrix: Muon

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.absolute_pos_embed = nn.Parameter(torch.randn(1, 9, 16))
            self.attn = Attn()

    opt = build_optimizer(Net(), "muon", weight_decay=0.1)
    report = opt.routing
    for name in ("attn.relative_position_bias_table", "attn.rel_pos_h", "attn.rel_pos_w",
                 "absolute_pos_embed"):
        r = report[name]
        assert (r.optimizer, r.weight_decay) == ("adamw", False), (name, r.reason)
        assert "position bias" in r.reason
    assert (report["attn.hidden"].optimizer, report["attn.hidden"].weight_decay) == ("muon", True)
    assert report["attn.qkv.weight"].weight_decay
    nodecay = {n for g in opt.param_groups if g["weight_decay"] == 0.0
               for n in g["param_names"]}
    assert {"attn.relative_position_bias_table", "absolute_pos_embed"} <= nodecay
