"""Real model families through every part of specopt: routing, training, PC, merge and
save/load, and the monitor against float64 SVD.

Models are built from tiny configs with random init (nothing is downloaded): Hugging Face
GPT-2 (transformers' Conv1D, weights stored (in, out)), BERT, T5, Llama, ViT and a Mixtral
MoE block (3-D expert tensors), plus a timm-style ViT (bare cls/register tokens and
position embedding, ``no_weight_decay()``) and a torchvision-style ResNet written here
(torchvision does not import with this torch build, and timm needs it).
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import specopt  # noqa: E402
from specopt import Muon, apply_pc, build_optimizer, describe_routing, merge_pc  # noqa: E402
from specopt.layers import BLOCKS, block_of, is_transposed_linear, matrix_spec  # noqa: E402
from specopt.pc import PC_TARGET_TABLE, is_pc_module  # noqa: E402

D, SEQ, VOCAB, BATCH = 32, 16, 64, 4
CONV1D = transformers.pytorch_utils.Conv1D


# ------------------------------------------------------------------ models built here


class TimmStyleViT(nn.Module):
    """The timm VisionTransformer layout: bare ``cls_token`` (1, 1, D), ``reg_token``
    (1, 1, D) and ``pos_embed`` (1, N, D) on the root, ``patch_embed.proj`` conv,
    ``blocks.i.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2}``, ``head``, ``no_weight_decay()``."""

    def __init__(self, image: int = 16, patch: int = 4, dim: int = D, depth: int = 2,
                 classes: int = 5) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, stride=patch)
        n = (image // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.reg_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 2, dim) * 0.02)
        self.blocks = nn.ModuleList(_Block(dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)
        tokens = torch.cat([self.cls_token, self.reg_token], dim=1).expand(x.shape[0], -1, -1)
        x = torch.cat([tokens, x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


class _Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.attn.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.attn.proj(nn.functional.scaled_dot_product_attention(q, k, v))
        return x + self.mlp.fc2(nn.functional.gelu(self.mlp.fc1(self.norm2(x))))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                         nn.BatchNorm2d(cout)) if stride != 1 or cin != cout
                           else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNetLike(nn.Module):
    """torchvision's ResNet layout: conv1/bn1, layer1..2 of BasicBlocks, avgpool, fc."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(_BasicBlock(8, 8, 1))
        self.layer2 = nn.Sequential(_BasicBlock(8, 16, 2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(self.avgpool(self.layer2(self.layer1(x))).flatten(1))


# ----------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One model family. ``routing``: ordered ``(glob on the parameter name, optimizer,
    Muon options, weight decay)``; the first glob that matches a parameter is what it must
    get, and every parameter must match one. ``pc``: the default ``apply_pc`` targets as
    globs (each must match a wrapped module, and every wrapped module one of them)."""

    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], dict[str, torch.Tensor]]
    routing: list[tuple[str, str, dict[str, Any], bool]]
    pc: list[str] = field(default_factory=list)
    hf: bool = True
    lr: float = 1e-2

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.hf:
            return model(**batch).loss
        return nn.functional.cross_entropy(model(batch["x"]), batch["labels"])

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.hf:
            return model(**{k: v for k, v in batch.items() if k != "labels"},
                         **({"decoder_input_ids": batch["labels"]}
                            if "decoder_input_ids" in inspect.signature(model.forward).parameters
                            else {})).logits
        return model(batch["x"])


def _tokens(gen: torch.Generator) -> dict[str, torch.Tensor]:
    x = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    return {"input_ids": x, "labels": x}


def _classify(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen),
            "labels": torch.randint(0, 3, (BATCH,), generator=gen)}


def _seq2seq(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen),
            "labels": torch.randint(0, VOCAB, (BATCH, 8), generator=gen)}


def _pixels(key: str, classes: int) -> Callable[[torch.Generator], dict[str, torch.Tensor]]:
    def make(gen: torch.Generator) -> dict[str, torch.Tensor]:
        return {key: torch.randn(BATCH, 3, 16, 16, generator=gen),
                "labels": torch.randint(0, classes, (BATCH,), generator=gen)}
    return make


def _gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(n_embd=D, n_layer=2, n_head=2, vocab_size=VOCAB,
                                  n_positions=SEQ, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _bert() -> nn.Module:
    cfg = transformers.BertConfig(hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=2 * D, vocab_size=VOCAB,
                                  max_position_embeddings=SEQ, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg)


def _t5() -> nn.Module:
    cfg = transformers.T5Config(d_model=D, d_ff=2 * D, num_layers=2, num_heads=2, d_kv=16,
                                vocab_size=VOCAB, feed_forward_proj="gated-gelu",
                                dropout_rate=0.0, decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg)


def _llama() -> nn.Module:
    cfg = transformers.LlamaConfig(hidden_size=D, intermediate_size=2 * D, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1,
                                   vocab_size=VOCAB, max_position_embeddings=SEQ)
    return transformers.LlamaForCausalLM(cfg)


def _vit() -> nn.Module:
    cfg = transformers.ViTConfig(hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=2 * D, image_size=16, patch_size=4,
                                 num_labels=3, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)
    return transformers.ViTForImageClassification(cfg)


def _mixtral() -> nn.Module:
    cfg = transformers.MixtralConfig(hidden_size=D, intermediate_size=2 * D,
                                     num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=1, vocab_size=VOCAB,
                                     max_position_embeddings=SEQ, num_local_experts=4,
                                     num_experts_per_tok=2)
    return transformers.MixtralForCausalLM(cfg)


SMALL = [("*.bias", "adamw", {}, False), ("*norm*", "adamw", {}, False),
         ("*LayerNorm*", "adamw", {}, False), ("*ln_*", "adamw", {}, False)]
T = {"transposed": True}

CASES: dict[str, Case] = {
    "gpt2": Case(_gpt2, _tokens, [
        *SMALL,
        ("transformer.wte.weight", "adamw", {}, True),  # tied with lm_head
        ("transformer.wpe.weight", "adamw", {}, True),
        ("*.attn.c_attn.weight", "muon", T, True),
        ("*.attn.c_proj.weight", "muon", T, True),
        ("*.mlp.c_fc.weight", "muon", T, True),
        ("*.mlp.c_proj.weight", "muon", T, True),
    ], pc=["*.attn.c_proj", "*.mlp.c_fc", "*.mlp.c_proj"]),
    "bert": Case(_bert, _classify, [
        *SMALL,
        ("bert.embeddings.*", "adamw", {}, True),
        ("*.attention.self.*.weight", "muon", {}, True),
        ("*.dense.weight", "muon", {}, True),  # attention.output / intermediate / output / pooler
        ("classifier.weight", "adamw", {}, True),
    ], pc=["*.attention.output.dense", "*.intermediate.dense", "*.layer.?.output.dense"]),
    "t5": Case(_t5, _seq2seq, [
        *SMALL,
        ("shared.weight", "adamw", {}, True),
        ("*.relative_attention_bias.weight", "adamw", {}, True),
        ("*Attention.[qkvo].weight", "muon", {}, True),
        ("*.DenseReluDense.w*.weight", "muon", {}, True),
    ], pc=["*Attention.o", "*.DenseReluDense.wi_0", "*.DenseReluDense.wi_1",
           "*.DenseReluDense.wo"]),
    "llama": Case(_llama, _tokens, [
        *SMALL,
        ("model.embed_tokens.weight", "adamw", {}, True),
        ("lm_head.weight", "adamw", {}, True),
        ("*_proj.weight", "muon", {}, True),
    ], pc=["*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj"]),
    "vit": Case(_vit, _pixels("pixel_values", 3), [
        *SMALL,
        ("vit.embeddings.cls_token", "adamw", {}, True),
        ("vit.embeddings.position_embeddings", "adamw", {}, True),
        ("vit.embeddings.patch_embeddings.projection.weight", "adamw", {}, True),
        ("*.attention.?_proj.weight", "muon", {}, True),
        ("*.mlp.fc?.weight", "muon", {}, True),
        ("classifier.weight", "adamw", {}, True),
    ], pc=["*.attention.o_proj", "*.mlp.fc1", "*.mlp.fc2"]),
    "timm_vit": Case(TimmStyleViT, _pixels("x", 5), [
        *SMALL,
        ("cls_token", "adamw", {}, False),  # listed by no_weight_decay()
        ("pos_embed", "adamw", {}, False),
        ("reg_token", "adamw", {}, True),  # a token by name; timm decays it
        ("patch_embed.proj.weight", "adamw", {}, True),
        ("blocks.*.weight", "muon", {}, True),
        ("head.weight", "adamw", {}, True),
    ], pc=["*.attn.proj", "*.mlp.fc1", "*.mlp.fc2"], hf=False),
    "resnet": Case(ResNetLike, _pixels("x", 5), [
        *SMALL,
        ("*bn*", "adamw", {}, False),
        ("*downsample.1.*", "adamw", {}, False),
        ("*conv*.weight", "muon", {"matrix_layout": "flatten"}, True),
        ("*downsample.0.weight", "muon", {"matrix_layout": "flatten"}, True),
        ("fc.weight", "adamw", {}, True),  # the last module, named fc
    ], pc=[], hf=False, lr=3e-2),
    "mixtral": Case(_mixtral, _tokens, [
        *SMALL,
        ("model.embed_tokens.weight", "adamw", {}, True),
        ("lm_head.weight", "adamw", {}, True),
        ("*.mlp.experts.*", "muon", {"matrix_layout": "batch"}, True),
        ("*.mlp.gate.weight", "muon", {}, True),  # the router (E, D)
        ("*_proj.weight", "muon", {}, True),
    ], pc=["*.o_proj"]),
}
NAMES = list(CASES)


@functools.cache
def _built(name: str) -> nn.Module:
    torch.manual_seed(0)
    return CASES[name].build()


@pytest.fixture(params=NAMES)
def case(request) -> tuple[str, Case, nn.Module]:
    """(name, case, a fresh copy of the model; the build is shared across tests)."""
    return request.param, CASES[request.param], copy.deepcopy(_built(request.param))


def _batch(c: Case, seed: int = 0) -> dict[str, torch.Tensor]:
    return c.inputs(torch.Generator().manual_seed(seed))


def _expect(c: Case, name: str) -> tuple[str, dict[str, Any], bool]:
    for glob, opt, opts, decay in c.routing:
        if fnmatch.fnmatchcase(name, glob):
            return opt, opts, decay
    raise AssertionError(f"test table has no routing entry for {name!r}")


def _muon_supports(option: str) -> bool:
    """True once specopt.Muon reads the group option (the "muon" branch adds
    matrix_layout / transposed); update-value tests of those options run only then."""
    return option in Muon([nn.Parameter(torch.zeros(2, 2))]).defaults


# ---------------------------------------------------------------------------- routing


def test_routing(case):
    _, c, model = case
    report = describe_routing(model)
    opt = build_optimizer(model)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert len(group_of) == len(report.routes) == len({id(p) for p in model.parameters()})
    for r in report:
        want_opt, want_opts, want_decay = _expect(c, r.name)
        assert (r.optimizer, r.muon_options, r.weight_decay) == (want_opt, want_opts,
                                                                 want_decay), (r.name, r.reason)
        assert r.reason  # the report says why, for every tensor
        g = group_of[id(r.param)]
        assert g["optimizer"] == r.optimizer
        for key, value in r.muon_options.items():  # the options reach the Muon group
            assert g[key] == value, (r.name, key)
        if r.optimizer == "muon":  # options the route leaves unset hold Muon's defaults
            for key, default in (("matrix_layout", None), ("transposed", False)):
                if key not in r.muon_options:
                    assert g.get(key, default) == default, (r.name, key)


def test_routing_reasons_for_tokens_heads_and_experts():
    vit = describe_routing(TimmStyleViT())
    assert vit["cls_token"].reason == "listed by the model's no_weight_decay() ('cls_token')"
    assert vit["reg_token"].reason == "token / position embedding (bare parameter 'reg_token')"
    assert vit["head.weight"].reason == "output head (by module name)"
    res = describe_routing(ResNetLike())
    assert res["fc.weight"].reason == "output head (the model's last module, named 'fc')"
    assert "flattened to (out, in*k) = 8x72" in res["layer1.0.conv2.weight"].reason
    moe = describe_routing(_built("mixtral"))
    r = moe["model.layers.0.mlp.experts.gate_up_proj"]
    assert "batch of 4 matrices 128x32" in r.reason
    gpt2 = describe_routing(_built("gpt2"))
    assert gpt2["transformer.h.0.mlp.c_fc.weight"].reason == (
        "hidden matrix, stored (in, out): operator 128x32")
    # A (1, D) parameter in matrix form is a vector: AdamW whatever its name.
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1))
    assert "size-1 dimension (1x8)" in describe_routing(net)["1.weight"].reason


def test_split_sizes_for_gpt2_c_attn_by_output_rows():
    model = _built("gpt2")
    split = {"*.attn.c_attn": (D, D, D)}  # a module path: its weight, not its bias
    report = describe_routing(model, split_sizes=split)
    for i in range(2):
        r = report[f"transformer.h.{i}.attn.c_attn.weight"]
        assert r.muon_options == {"split_sizes": (D, D, D), "transposed": True}
        assert report[f"transformer.h.{i}.attn.c_attn.bias"].optimizer == "adamw"
    if _muon_supports("transposed"):  # Muon splits dim 1 of the (in, out) storage
        opt = build_optimizer(model, split_sizes=split)
        groups = [g for g in opt.param_groups if g.get("split_sizes") is not None]
        assert [g["name"] for g in groups] == ["muon_split_transposed"]
        assert groups[0]["split_sizes"] == (D, D, D) and groups[0]["transposed"] is True
        assert groups[0]["param_names"] == ["transformer.h.0.attn.c_attn.weight",
                                            "transformer.h.1.attn.c_attn.weight"]
    # Sizes are in output rows (3D = 96), not the stored dim 0 (D = 32).
    with pytest.raises(ValueError, match=r"stored \(in, out\), fan-out 96\) must sum to its 96"):
        build_optimizer(model, split_sizes={"*.attn.c_attn": (16, 16)})
    with pytest.raises(ValueError, match=r"split_sizes pattern '\*\.c_atn' matches no parameter"):
        build_optimizer(model, split_sizes={"*.c_atn": (D, D, D)})


@pytest.mark.skipif(not _muon_supports("transposed"),
                    reason="specopt.Muon does not read the 'transposed' group option yet")
def test_conv1d_muon_update_equals_linear_update_transposed():
    # The Conv1D weight (in, out) must move exactly as the same operator held by a Linear.
    conv = transformers.pytorch_utils.Conv1D(3 * D, D)
    lin = nn.Linear(D, 3 * D)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.T)
    grad = torch.randn(3 * D, D, generator=torch.Generator().manual_seed(0))
    for split in (None, (D, D, D)):
        kw = dict(lr=1e-2, weight_decay=0.0, adjust_lr_fn="original", ns_dtype=torch.float32)
        a = build_optimizer(nn.ModuleDict({"c": conv}), include="c.weight",
                            split_sizes=None if split is None else {"c": split}, **kw)
        b = build_optimizer(nn.ModuleDict({"c": lin}), include="c.weight",
                            split_sizes=None if split is None else {"c": split}, **kw)
        w0 = lin.weight.detach().clone()
        conv.weight.grad, lin.weight.grad = grad.T.clone(), grad.clone()
        conv.bias.grad = lin.bias.grad = None
        a.step()
        b.step()
        torch.testing.assert_close(conv.weight.T, lin.weight, rtol=1e-5, atol=1e-6)
        assert not torch.equal(lin.weight, w0)


@pytest.mark.skipif(not _muon_supports("matrix_layout"),
                    reason="specopt.Muon does not read the 'matrix_layout' group option yet")
def test_each_expert_moves_like_its_own_matrix():
    experts = _built("mixtral").model.layers[0].mlp.experts
    stack = nn.Parameter(experts.gate_up_proj.detach().clone())  # (E, 2I, D)
    holder = nn.Module()
    holder.gate_up_proj = stack
    opt = build_optimizer(holder, include="gate_up_proj", lr=1e-2, weight_decay=0.0,
                          ns_dtype=torch.float32)
    singles = [nn.Parameter(stack.detach()[e].clone()) for e in range(stack.shape[0])]
    ref = Muon(singles, lr=1e-2, weight_decay=0.0, adjust_lr_fn="match_rms_adamw",
               ns_dtype=torch.float32)
    grad = torch.randn(stack.shape, generator=torch.Generator().manual_seed(1))
    stack.grad = grad.clone()
    for e, p in enumerate(singles):
        p.grad = grad[e].clone()
    opt.step()
    ref.step()
    for e, p in enumerate(singles):
        torch.testing.assert_close(stack.detach()[e], p.detach(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- training


def test_twenty_steps_lower_the_loss(case):
    name, c, model = case
    handle = apply_pc(model, level=2) if c.pc else None
    opt = build_optimizer(model, "muon", lr=c.lr, weight_decay=0.0)
    if handle is not None:
        handle.attach(opt)
    batch = _batch(c)
    model.train()
    losses = []
    for _ in range(20):
        loss = c.loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < 0.7 * losses[0], (name, losses)


# -------------------------------------------------------------------------------- PC


def test_default_pc_targets(case):
    _, c, model = case
    if not c.pc:
        with pytest.raises(ValueError, match="apply_pc selected no module"):
            apply_pc(model)
        with pytest.raises(TypeError, match="matches only non-matrix modules"):
            apply_pc(model, include="layer1.0.conv1")
        return
    wrapped = apply_pc(model).names
    for glob in c.pc:
        assert any(fnmatch.fnmatchcase(n, glob) for n in wrapped), (glob, wrapped)
    for n in wrapped:
        assert any(fnmatch.fnmatchcase(n, g) for g in c.pc), n
        leaf = n.rsplit(".", 1)[-1]
        assert leaf not in ("q_proj", "k_proj", "v_proj", "c_attn", "qkv", "query", "q")
    # Every other matrix module stays plain, q/k/v included.
    for path, m in model.named_modules():
        if path in wrapped:
            assert is_pc_module(m)
        elif isinstance(m, nn.Linear) or is_transposed_linear(m):
            assert not is_pc_module(m), path


def test_pc_on_conv1d_is_the_linear_formula_on_the_operator():
    model = copy.deepcopy(_built("gpt2"))
    handle = apply_pc(model, level=2, include="*.mlp.c_fc")
    mod = model.transformer.h[0].mlp.c_fc
    pc = handle.parametrizations["transformer.h.0.mlp.c_fc"]
    raw = mod.parametrizations.weight.original.detach().double()  # stored (D, 4D)
    assert pc.transposed and pc.u.shape == (4 * D,) and pc.v.shape == (D,)  # (out,), (in,)
    sigma = torch.linalg.svdvals(raw)
    s = float(pc.sigma(mod.parametrizations.weight.original))
    assert s == pytest.approx(float(sigma[0]), rel=1e-5)
    # W_eff = s * f(W / s): singular values s * f(sigma_i / s), stored (in, out) like W.
    coeffs = pc.polynomial.coefficients
    f = sum(ck * (sigma / s) ** (2 * k + 1) for k, ck in enumerate(coeffs)) * s
    w_eff = mod.weight.detach().double()
    assert w_eff.shape == raw.shape
    torch.testing.assert_close(torch.linalg.svdvals(w_eff), f.sort(descending=True).values,
                               rtol=1e-4, atol=1e-6)
    # Same operator as the Linear formula applied to W^T.
    want = specopt.pc_weight(raw.T, pc.u.double(), pc.v.double(), pc.gamma.double(), coeffs)
    torch.testing.assert_close(w_eff, want.T, rtol=1e-5, atol=1e-7)


def test_merge_then_save_pretrained_into_a_model_that_never_had_pc(case, tmp_path):
    name, c, model = case
    if not c.pc:
        pytest.skip(f"{name}: no default PC targets")
    handle = apply_pc(model, level=2)
    opt = build_optimizer(model, "muon", lr=c.lr, weight_decay=0.0)
    handle.attach(opt)
    batch = _batch(c)
    for _ in range(3):  # move the raw weights and gammas away from their init
        c.loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        before = c.logits(model, batch)
    classes = {n: type(m) for n, m in _built(name).named_modules()}
    merge_pc(model)
    for n in handle.names:  # the original classes (Conv1D, Linear) come back
        assert type(model.get_submodule(n)) is classes[n], n
    assert set(model.state_dict()) == set(_built(name).state_dict())
    if c.hf:
        model.save_pretrained(tmp_path)
        fresh = type(model).from_pretrained(tmp_path).eval()
    else:
        torch.save(model.state_dict(), tmp_path / "model.pt")
        fresh = c.build().eval()
        fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert not any(is_pc_module(m) for m in fresh.modules())
    with torch.no_grad():
        after = c.logits(fresh, batch)
    rel = float((after - before).norm() / before.norm())
    assert rel <= 1e-5, (name, rel)


# --------------------------------------------------------------------------- monitor


def _expected_matrices(model: nn.Module) -> dict[str, tuple[torch.Tensor, tuple[int, int]]]:
    """Independent of the monitor: ``{tag layer: (effective matrix as (out, in), shape)}``
    for every matrix a model holds (tied tensors once, size-1 sides skipped)."""
    out: dict[str, tuple[torch.Tensor, tuple[int, int]]] = {}
    seen: set[int] = set()
    for path, m in model.named_modules():
        if "parametrizations" in path.split("."):
            continue
        parametrized = torch.nn.utils.parametrize.is_parametrized(m, "weight")
        plist = m.parametrizations.weight if parametrized else None
        # weight_norm trains original0 (gain) and original1 (direction, the weight's shape)
        raw = getattr(m, "weight", None)
        if parametrized:
            raw = plist.original if hasattr(plist, "original") else plist.original1
        if isinstance(raw, torch.Tensor) and raw.ndim >= 2 and id(raw) not in seen:
            seen.add(id(raw))
            w = m.weight.detach().double()
            if isinstance(m, nn.modules.conv._ConvNd):
                w = w.reshape(w.shape[0], -1)
            elif isinstance(m, CONV1D):
                w = w.T  # stored (in, out)
            if min(w.shape) > 1:
                out[path] = (w, tuple(w.shape))
                if parametrized:
                    r = raw.detach().double()
                    out[path + "/raw"] = (r.T if isinstance(m, CONV1D) else r, tuple(w.shape))
        for pname, p in m.named_parameters(recurse=False):
            if pname != "weight" and p.ndim == 2 and min(p.shape) > 1 and id(p) not in seen:
                seen.add(id(p))  # bare matrices: MHA in_proj_weight, LSTM weight_hh_l0
                out[f"{path}.{pname}" if path else pname] = (p.detach().double(), tuple(p.shape))
            if pname != "weight" and p.ndim == 3 and p.shape[0] > 1 and min(p.shape[1:]) > 1:
                for e in range(p.shape[0]):  # expert e of (E, out, in)
                    out[f"{path}.{pname}.{e}"] = (p.detach()[e].double(), tuple(p.shape[1:]))
    return out


def test_monitor_tags_and_values_match_float64_svd(case, tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    name, c, model = case
    if c.pc:
        apply_pc(model, level=2)
    monitor = specopt.SpectralMonitor(model, log_dir=tmp_path, every=1, budget=None,
                                      histograms=False, update_ratio=False, alarms=())
    monitor.step(1)
    monitor.close()
    acc = event_accumulator.EventAccumulator(str(tmp_path),
                                             size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = _expected_matrices(model)
    logged = {t.split("/", 2)[2] for t in tags if t.startswith("spectral/sigma_max/")}
    assert logged == set(expected), (name, sorted(logged ^ set(expected)))
    assert set(monitor.layers) == set(expected)
    for key, (w, (m, n)) in expected.items():
        sigma = np.linalg.svd(w.numpy(), compute_uv=False)

        def value(metric: str, key: str = key) -> float:
            return acc.Scalars(f"spectral/{metric}/{key}")[-1].value

        assert value("sigma_max") == pytest.approx(sigma[0], rel=1e-4), key
        assert value("condition_number") == pytest.approx(sigma[0] / sigma[-1], rel=1e-3), key
        # rms_to_rms = sqrt(fan_in / fan_out) * sigma_max in the operator's orientation.
        assert value("rms_to_rms") == pytest.approx(math.sqrt(n / m) * sigma[0], rel=1e-4), key


def test_monitor_rms_to_rms_uses_the_conv1d_operator_orientation():
    model = _built("gpt2")
    snap = specopt.SpectralMonitor(model, budget=None, alarms=(), update_ratio=False,
                                   include="*.mlp.c_fc").snapshot(0)
    w = model.transformer.h[0].mlp.c_fc.weight.detach().double()  # stored (32, 128)
    sigma_max = float(torch.linalg.matrix_norm(w, ord=2))
    got = snap.metrics["transformer.h.0.mlp.c_fc"]["rms_to_rms"]
    assert got == pytest.approx(math.sqrt(32 / 128) * sigma_max, rel=1e-5)  # (out, in) = (128, 32)


# ------------------------------------------------------------------- block labels


@pytest.mark.parametrize(("path", "block"), [
    ("transformer.h.0.attn.c_attn", "attention"), ("transformer.h.0.attn.c_proj", "attention"),
    ("transformer.h.0.mlp.c_fc", "mlp"), ("transformer.h.0.mlp.c_proj", "mlp"),
    ("transformer.wte", "embedding"), ("lm_head", "head"),
    ("bert.encoder.layer.0.attention.self.query", "attention"),
    ("bert.encoder.layer.0.attention.output.dense", "attention"),
    ("bert.encoder.layer.0.intermediate.dense", "mlp"),
    ("bert.encoder.layer.0.output.dense", "mlp"),
    ("bert.embeddings.word_embeddings", "embedding"), ("classifier", "head"),
    ("classification_head.out_proj", "head"),
    ("encoder.block.0.layer.0.SelfAttention.o", "attention"),
    ("decoder.block.0.layer.1.EncDecAttention.k", "attention"),
    ("encoder.block.0.layer.1.DenseReluDense.wi_0", "mlp"), ("shared", "embedding"),
    ("model.layers.0.self_attn.o_proj", "attention"), ("model.layers.0.mlp.down_proj", "mlp"),
    ("model.layers.0.mlp.experts.gate_up_proj.3", "mlp"), ("model.embed_tokens", "embedding"),
    ("gpt_neox.layers.0.attention.query_key_value", "attention"),
    ("gpt_neox.layers.0.mlp.dense_h_to_4h", "mlp"), ("embed_out", "head"),
    ("model.decoder.layers.0.fc1", "mlp"), ("model.decoder.layers.0.self_attn.out_proj",
                                            "attention"),
    ("vit.layers.0.attention.o_proj", "attention"), ("vit.layers.0.mlp.fc2", "mlp"),
    ("vit.embeddings.patch_embeddings.projection", "embedding"),
    ("blocks.0.attn.qkv", "attention"), ("blocks.0.mlp.fc1", "mlp"), ("head", "head"),
    ("layers.0.attention.wq", "attention"), ("layers.0.feed_forward.w2", "mlp"),
    ("tok_embeddings", "embedding"), ("output", "head"),
    ("module._orig_mod.layers.0.feed_forward.w1", "mlp"), ("layer1.0.conv1", "other"),
])
def test_block_labels_follow_one_rule_on_every_family(path, block):
    assert block in BLOCKS
    assert block_of(path) == block


def test_default_target_table_names_every_family():
    families = " ".join(PC_TARGET_TABLE)
    for family in ("Llama", "GPT-2", "GPT-NeoX", "BERT", "T5", "Phi", "OPT", "ViT", "nanoGPT"):
        assert family in families
    for suffixes in PC_TARGET_TABLE.values():
        assert not set(suffixes) & {"q_proj", "k_proj", "v_proj", "c_attn", "qkv", "query"}


def test_matrix_spec_kinds():
    conv1d = transformers.pytorch_utils.Conv1D(96, 32)
    spec = matrix_spec(conv1d, "weight", conv1d.weight)
    assert (spec.kind, spec.transposed, spec.matrix_shape) == ("transposed", True, (96, 32))
    conv = nn.Conv2d(4, 8, 3, groups=2)
    spec = matrix_spec(conv, "weight", conv.weight)
    assert (spec.kind, spec.layout, spec.matrix_shape) == ("conv", "flatten", (8, 18))
    experts = _built("mixtral").model.layers[0].mlp.experts
    spec = matrix_spec(experts, "down_proj", experts.down_proj)
    assert (spec.kind, spec.layout, spec.count, spec.matrix_shape) == ("experts", "batch", 4,
                                                                       (D, 2 * D))
    experts.is_transposed = True  # transformers' flag: (E, in, out)
    try:
        spec = matrix_spec(experts, "down_proj", experts.down_proj)
        assert spec.transposed and spec.matrix_shape == (2 * D, D)
    finally:
        del experts.is_transposed
