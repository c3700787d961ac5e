"""Every public entry point on model families specopt was not built around.

From tiny configs with random init (nothing downloaded): Qwen2/Qwen3, Mistral, Gemma,
Phi/Phi-3, GPT-NeoX, Falcon, OPT, RoBERTa, DistilBERT, DeBERTa-v2, ALBERT (one layer's
weights shared by all layers), BART / mBART (tied embeddings), Whisper (conv front-end),
CLIP (two towers), Swin / ConvNeXt / DeiT, Qwen2-MoE / OLMoE / DeepSeek-V3 (3-D expert
stacks, MLA attention), and plain-torch models: ``nn.MultiheadAttention`` (a bare
``in_proj_weight``), ``nn.TransformerEncoderLayer``, LSTM / GRU (``weight_ih_l0``, ...),
``EmbeddingBag``, tied input/output embeddings, frozen parameters, bf16 weights,
``weight_norm`` / ``spectral_norm`` already present, ``torch.compile`` (``_orig_mod.``).

Per model: the routing of :func:`specopt.build_optimizer` against an independent table
(matrices to Muon unless listed), a few steps with falling loss and finite weights, the
default :func:`specopt.apply_pc` targets (exact set, never q/k/v), PC training, merge ->
``save_pretrained`` -> ``from_pretrained`` logits, and :class:`specopt.SpectralMonitor`
values against float64 SVD of the effective weights. timm / torchvision are not installed
with this torch build; their layouts are covered by tests/test_real_models.py.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

transformers = pytest.importorskip("transformers")

from test_real_models import _expected_matrices  # noqa: E402

import specopt  # noqa: E402
from specopt import apply_pc, build_optimizer, describe_routing, merge_pc  # noqa: E402
from specopt.pc import QKV_TARGETS, is_pc_module, merged_state_dict  # noqa: E402

D, V, SEQ, BATCH = 32, 80, 8, 2  # V != 2 * D: no FFN width coincides with the vocabulary
Batch = dict[str, torch.Tensor]


# ------------------------------------------------------------------------- inputs


def _tokens(gen: torch.Generator) -> Batch:
    x = torch.randint(0, V, (BATCH, SEQ), generator=gen)
    return {"input_ids": x, "labels": x}


def _classify(gen: torch.Generator) -> Batch:
    return {"input_ids": torch.randint(0, V, (BATCH, SEQ), generator=gen),
            "labels": torch.randint(0, 3, (BATCH,), generator=gen)}


def _seq2seq(gen: torch.Generator) -> Batch:
    return {"input_ids": torch.randint(0, V, (BATCH, SEQ), generator=gen),
            "labels": torch.randint(0, V, (BATCH, 6), generator=gen)}


def _audio(gen: torch.Generator) -> Batch:
    return {"input_features": torch.randn(BATCH, 16, 60, generator=gen),
            "labels": torch.randint(0, V, (BATCH, 6), generator=gen)}


def _clip(gen: torch.Generator) -> Batch:
    return {"input_ids": torch.randint(0, V, (BATCH, SEQ), generator=gen),
            "pixel_values": torch.randn(BATCH, 3, 16, 16, generator=gen), "return_loss": True}


def _pixels(size: int) -> Callable[[torch.Generator], Batch]:
    def make(gen: torch.Generator) -> Batch:
        return {"pixel_values": torch.randn(BATCH, 3, size, size, generator=gen),
                "labels": torch.randint(0, 3, (BATCH,), generator=gen)}
    return make


def _ids(gen: torch.Generator) -> Batch:  # plain-torch models: next-token-free LM loss
    return {"x": torch.randint(0, 50, (BATCH, SEQ), generator=gen)}


# ------------------------------------------------------------------ plain-torch models


class _TorchLM(nn.Module):
    """Embedding -> mixer -> FFN -> head over a 50-token vocabulary (loss: predict x)."""

    vocab = 50

    def __init__(self, mixer: str = "mha", tied: bool = False, bag: bool = False) -> None:
        super().__init__()
        d = 16
        self.emb = nn.EmbeddingBag(self.vocab, d, mode="mean") if bag else nn.Embedding(
            self.vocab, d)
        self.mixer = mixer
        if mixer == "mha":
            self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        elif mixer in ("lstm", "gru"):
            self.rnn = (nn.LSTM if mixer == "lstm" else nn.GRU)(d, d, num_layers=2,
                                                                 batch_first=True)
        elif mixer == "encoder":
            self.enc = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=True), 1,
                enable_nested_tensor=False)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.lm_head = nn.Linear(d, self.vocab, bias=False)
        if tied:
            self.lm_head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.emb, nn.EmbeddingBag):
            h = self.emb(x)[:, None, :].expand(-1, x.shape[1], -1)
        else:
            h = self.emb(x)
        if self.mixer == "mha":
            h = h + self.attn(h, h, h, need_weights=False)[0]
        elif self.mixer in ("lstm", "gru"):
            h = h + self.rnn(h)[0]
        elif self.mixer == "encoder":
            h = self.enc(h)
        return self.lm_head(h + self.fc2(torch.relu(self.fc1(h))))


def _frozen() -> nn.Module:
    m = _TorchLM()
    m.emb.weight.requires_grad_(False)
    m.fc1.requires_grad_(False)
    return m


def _normed(kind: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        m = _TorchLM(mixer="none")
        wrap = parametrizations.weight_norm if kind == "weight_norm" else (
            parametrizations.spectral_norm)
        wrap(m.fc1)
        return m
    return build


# ---------------------------------------------------------------------- HF models

_DEC = dict(hidden_size=D, intermediate_size=2 * D, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=V, max_position_embeddings=SEQ)
_ENC = dict(hidden_size=D, intermediate_size=2 * D, num_hidden_layers=1, num_attention_heads=2,
            vocab_size=V, max_position_embeddings=SEQ + 4, num_labels=3)
_S2S = dict(d_model=D, encoder_ffn_dim=2 * D, decoder_ffn_dim=2 * D, encoder_layers=1,
            decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
            vocab_size=V, max_position_embeddings=SEQ)
_VIS = dict(hidden_size=D, intermediate_size=2 * D, num_hidden_layers=1, num_attention_heads=2,
            image_size=16, patch_size=4)


def _hf(model: str, config: str, **kw) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        return getattr(transformers, model)(getattr(transformers, config)(**kw))
    return build


# The matrices that must go to AdamW for every family (embeddings, output heads); any
# other >= 2-D trainable tensor without a size-1 side must go to Muon.
COMMON_ADAMW = ["*embed_tokens.weight", "*embeddings.*", "*embed_in.weight",
                "*word_embeddings.weight", "*embed_positions.weight", "*shared.weight",
                "lm_head.weight", "embed_out.weight", "classifier.*", "emb.weight"]
LLAMA_PC = ["*.self_attn.o_proj", "*.mlp.gate_proj", "*.mlp.up_proj", "*.mlp.down_proj"]
BART_PC = ["*.self_attn.out_proj", "*.encoder_attn.out_proj", "*.fc1", "*.fc2"]
BERT_PC = ["*.attention.output.dense", "*.intermediate.dense", "*.layer.0.output.dense"]
VIT_PC = ["*.attention.o_proj", "*.mlp.fc1", "*.mlp.fc2"]


@dataclass
class Case:
    """``adamw``: extra globs of matrices that must go to AdamW; ``pc``: globs of the
    exact default ``apply_pc`` set;
    ``hf``: a transformers model (save/from_pretrained, ``.loss``)."""

    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], Batch]
    pc: list[str]
    adamw: list[str] = field(default_factory=list)
    hf: bool = True
    lr: float = 1e-2

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        if self.hf:
            return model(**batch).loss
        out = model(batch["x"]).float()
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]),
                                           batch["x"].reshape(-1))

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        if not self.hf:
            return model(batch["x"]).float()
        kw = {k: v for k, v in batch.items() if k not in ("labels", "return_loss")}
        if model.config.is_encoder_decoder:
            kw["decoder_input_ids"] = batch["labels"]
        out = model(**kw)
        return out.logits_per_image if hasattr(out, "logits_per_image") else out.logits


MOE = dict(_DEC, num_experts=4, num_experts_per_tok=2)
CASES: dict[str, Case] = {
    "qwen2": Case(_hf("Qwen2ForCausalLM", "Qwen2Config", **_DEC), _tokens, LLAMA_PC),
    "qwen3": Case(_hf("Qwen3ForCausalLM", "Qwen3Config", **_DEC, head_dim=16), _tokens,
                  LLAMA_PC),
    "mistral": Case(_hf("MistralForCausalLM", "MistralConfig", **_DEC), _tokens, LLAMA_PC),
    "gemma": Case(_hf("GemmaForCausalLM", "GemmaConfig", **_DEC, head_dim=16), _tokens,
                  LLAMA_PC),  # tied embeddings
    "phi": Case(_hf("PhiForCausalLM", "PhiConfig", **_DEC), _tokens,
                ["*.self_attn.dense", "*.mlp.fc1", "*.mlp.fc2"]),
    "phi3": Case(_hf("Phi3ForCausalLM", "Phi3Config", **_DEC, pad_token_id=0), _tokens,
                 ["*.self_attn.o_proj", "*.mlp.gate_up_proj", "*.mlp.down_proj"]),
    "gpt_neox": Case(_hf("GPTNeoXForCausalLM", "GPTNeoXConfig", hidden_size=D,
                         intermediate_size=2 * D, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=V, max_position_embeddings=SEQ), _tokens,
                     ["*.attention.dense", "*.mlp.dense_h_to_4h", "*.mlp.dense_4h_to_h"]),
    "falcon": Case(_hf("FalconForCausalLM", "FalconConfig", hidden_size=D, num_hidden_layers=1,
                       num_attention_heads=2, vocab_size=V), _tokens,
                   ["*.self_attention.dense", "*.mlp.dense_h_to_4h", "*.mlp.dense_4h_to_h"]),
    "opt": Case(_hf("OPTForCausalLM", "OPTConfig", hidden_size=D, ffn_dim=2 * D,
                    num_hidden_layers=1, num_attention_heads=2, vocab_size=V,
                    max_position_embeddings=SEQ, word_embed_proj_dim=D), _tokens,
                ["*.self_attn.out_proj", "*.fc1", "*.fc2"]),
    "roberta": Case(_hf("RobertaForSequenceClassification", "RobertaConfig", **_ENC),
                    _classify, BERT_PC),  # never the head's classifier.out_proj
    "distilbert": Case(_hf("DistilBertForSequenceClassification", "DistilBertConfig", dim=D,
                           hidden_dim=2 * D, n_layers=1, n_heads=2, vocab_size=V,
                           max_position_embeddings=SEQ, num_labels=3), _classify,
                       ["*.attention.out_lin", "*.ffn.lin1", "*.ffn.lin2"]),
    "deberta_v2": Case(_hf("DebertaV2ForSequenceClassification", "DebertaV2Config", **_ENC),
                       _classify, BERT_PC),
    "albert": Case(_hf("AlbertForSequenceClassification", "AlbertConfig", **dict(
        _ENC, num_hidden_layers=2, embedding_size=16)), _classify,
        ["*.albert_layers.0.attention.dense", "*.albert_layers.0.ffn",
         "*.albert_layers.0.ffn_output"],
        adamw=["*.embedding_hidden_mapping_in.weight"]),  # (D, E) input projection
    "bart": Case(_hf("BartForConditionalGeneration", "BartConfig", **_S2S), _seq2seq, BART_PC),
    "mbart": Case(_hf("MBartForConditionalGeneration", "MBartConfig", **_S2S), _seq2seq,
                  BART_PC),
    "whisper": Case(_hf("WhisperForConditionalGeneration", "WhisperConfig", **dict(
        _S2S, num_mel_bins=16, max_source_positions=30, max_target_positions=SEQ,
        decoder_start_token_id=0, pad_token_id=0)), _audio, BART_PC),
    "clip": Case(_hf("CLIPModel", "CLIPConfig", projection_dim=16, text_config=dict(
        hidden_size=D, intermediate_size=2 * D, num_hidden_layers=1, num_attention_heads=2,
        vocab_size=V, max_position_embeddings=SEQ), vision_config=_VIS), _clip,
        ["*.self_attn.out_proj", "*.mlp.fc1", "*.mlp.fc2"],
        adamw=["*.patch_embedding.weight"]),
    "swin": Case(_hf("SwinForImageClassification", "SwinConfig", image_size=32, patch_size=4,
                     embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4,
                     num_labels=3), _pixels(32), VIT_PC,
                 adamw=["*.relative_position_bias_table"]),
    "convnext": Case(_hf("ConvNextForImageClassification", "ConvNextConfig", hidden_sizes=[8, 16],
                         depths=[1, 1], num_stages=2, num_labels=3), _pixels(32),
                     ["*.pwconv1", "*.pwconv2"]),
    "deit": Case(_hf("DeiTForImageClassification", "DeiTConfig", **_VIS, num_labels=3),
                 _pixels(16), VIT_PC),
    "qwen2_moe": Case(_hf("Qwen2MoeForCausalLM", "Qwen2MoeConfig", **MOE, moe_intermediate_size=D,
                          shared_expert_intermediate_size=D), _tokens,
                      ["*.self_attn.o_proj", "*.shared_expert.gate_proj",
                       "*.shared_expert.up_proj", "*.shared_expert.down_proj"]),
    "olmoe": Case(_hf("OlmoeForCausalLM", "OlmoeConfig", **MOE), _tokens, ["*.self_attn.o_proj"]),
    "deepseek_v3": Case(_hf("DeepseekV3ForCausalLM", "DeepseekV3Config", **dict(
        _DEC, num_hidden_layers=2, num_key_value_heads=2), moe_intermediate_size=D,
        first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8), _tokens,  # MLA's q/kv projections stay plain
        [*LLAMA_PC, "*.shared_experts.gate_proj", "*.shared_experts.up_proj",
         "*.shared_experts.down_proj"]),
    "mha": Case(_TorchLM, _ids, ["attn.out_proj", "fc1", "fc2"], hf=False),
    "transformer_encoder": Case(lambda: _TorchLM("encoder"), _ids,
                                ["*.self_attn.out_proj", "*.linear1", "*.linear2", "fc1", "fc2"],
                                hf=False),
    "lstm": Case(lambda: _TorchLM("lstm"), _ids, ["fc1", "fc2"], hf=False),
    "gru": Case(lambda: _TorchLM("gru"), _ids, ["fc1", "fc2"], hf=False),
    "embedding_bag": Case(lambda: _TorchLM("none", bag=True), _ids, ["fc1", "fc2"], hf=False),
    "tied": Case(lambda: _TorchLM("none", tied=True), _ids, ["fc1", "fc2"], hf=False),
    "frozen": Case(_frozen, _ids, ["attn.out_proj", "fc1", "fc2"], hf=False),
    "bf16": Case(lambda: _TorchLM().to(torch.bfloat16), _ids, ["attn.out_proj", "fc1", "fc2"],
                 hf=False),
    "weight_norm": Case(_normed("weight_norm"), _ids, ["fc2"], hf=False),
    "spectral_norm": Case(_normed("spectral_norm"), _ids, ["fc2"], hf=False),
}


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notes on tiny vocabularies
        return CASES[name].build()


def _batch(c: Case) -> Batch:
    return c.inputs(torch.Generator().manual_seed(0))


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parts = name.split(".")
    if "parametrizations" in parts:
        parts = [*parts[: parts.index("parametrizations")], "weight"]
    return model.get_submodule(".".join(parts[:-1])), parts[-1]


def _expected_optimizer(c: Case, model: nn.Module, name: str, p: torch.Tensor) -> str:
    """The routing rule, written independently of specopt.optim.hybrid."""
    if not p.requires_grad:
        return "frozen"
    owner, leaf = _owner(model, name)
    if p.ndim < 2 or min(p.shape[-2:]) == 1 or (leaf == "weight" and min(
            owner.weight.shape[-2:]) == 1):
        return "adamw"  # vectors, scalars, (1, D) tokens, (E, 1) gains
    if isinstance(owner, (nn.Embedding, nn.EmbeddingBag)):
        return "adamw"
    if any(fnmatch.fnmatchcase(name, g) for g in COMMON_ADAMW + c.adamw):
        return "adamw"
    return "muon"


def _train(c: Case, model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    batch = _batch(c)
    model.train()
    losses = []
    for _ in range(steps):
        loss = c.loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(params=list(CASES))
def case(request) -> tuple[str, Case, nn.Module]:
    return request.param, CASES[request.param], _build(request.param)


# ------------------------------------------------------------------------- per model


def test_routing_and_training(case):
    name, c, model = case
    report = describe_routing(model)
    # Shared / tied tensors once, frozen ones listed too.
    assert len(report) == len({id(p) for p in model.parameters()})
    for r in report:
        want = _expected_optimizer(c, model, r.name, r.param)
        assert r.optimizer == want, (name, r.name, tuple(r.param.shape), r.reason)
        assert r.reason
        if r.name.endswith("relative_position_bias_table"):  # timm's no_weight_decay list
            assert not r.weight_decay, (name, r.name)
    opt = build_optimizer(model, "muon", lr=c.lr, weight_decay=0.0)
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert trained == {id(p) for p in model.parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = _train(c, model, opt, 6)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], (name, losses)
    assert all(torch.isfinite(p).all() for p in model.parameters()), name
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n  # frozen tensors never move


def test_default_pc_train_merge_and_reload(case, tmp_path):
    name, c, model = case
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = apply_pc(model, level=2)
    wrapped = handle.names
    for glob in c.pc:
        assert any(fnmatch.fnmatchcase(n, glob) for n in wrapped), (name, glob, wrapped)
    for n in wrapped:
        assert any(fnmatch.fnmatchcase(n, g) for g in c.pc), (name, n)
        assert not any(n == t or n.endswith("." + t) for t in QKV_TARGETS), (name, n)
    pc_warnings = [str(w.message) for w in caught if "apply_pc" in str(w.message)]
    if name in ("weight_norm", "spectral_norm"):
        assert len(pc_warnings) == 1 and "fc1 (" in pc_warnings[0], pc_warnings
    else:
        assert not pc_warnings, (name, pc_warnings)  # containers named ffn: no noise
    opt = build_optimizer(model, "muon", lr=c.lr, weight_decay=0.0)
    handle.attach(opt)
    losses = _train(c, model, opt, 3)
    assert all(math.isfinite(v) for v in losses), (name, losses)
    model.eval()
    batch = _batch(c)
    with torch.no_grad():
        before = c.logits(model, batch)
    # The merged checkpoint without touching the model, then merge_pc itself.
    merged = merged_state_dict(model)
    assert len(handle) == sum(is_pc_module(m) for m in model.modules())
    plain = _build(name).eval()
    assert set(merged) == set(plain.state_dict())
    plain.load_state_dict(merged)
    merge_pc(model)
    assert not any(is_pc_module(m) for m in model.modules())
    assert set(model.state_dict()) == set(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(c.logits(plain, batch), before, rtol=1e-5, atol=1e-6)
    if c.hf:
        model.save_pretrained(tmp_path)
        fresh = type(model).from_pretrained(tmp_path).eval()
    else:
        torch.save(model.state_dict(), tmp_path / "model.pt")
        fresh = _build(name).eval()
        fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    with torch.no_grad():
        after = c.logits(fresh, batch)
    rel = float((after - before).norm() / before.norm())
    assert rel <= 1e-5, (name, rel)


def test_monitor_matches_float64_svd_of_the_effective_weights(case):
    name, c, model = case
    if c.pc:
        apply_pc(model, level=2)
    snap = specopt.SpectralMonitor(model, budget=None, alarms=(), update_ratio=False,
                                   histograms=False).snapshot(0)
    expected = _expected_matrices(model)
    assert set(snap.metrics) == set(expected), (name, sorted(set(snap.metrics) ^ set(expected)))
    for key, (w, (m, n)) in expected.items():
        sigma = np.linalg.svd(w.numpy(), compute_uv=False)
        got = snap.metrics[key]
        assert got["sigma_max"] == pytest.approx(sigma[0], rel=1e-3), (name, key)
        if sigma[-1] > 1e-6 * sigma[0]:  # position tables with zero padding rows: singular
            assert got["condition_number"] == pytest.approx(sigma[0] / sigma[-1],
                                                            rel=1e-2), key
        assert got["rms_to_rms"] == pytest.approx(math.sqrt(n / m) * sigma[0], rel=1e-3), key


# --------------------------------------------------------------- targeted behaviour


def test_save_pretrained_of_a_training_pc_model_with_merged_state_dict(tmp_path):
    c, model = CASES["gemma"], _build("gemma")  # tied embeddings
    handle = apply_pc(model, level=2)
    opt = build_optimizer(model, "muon", lr=c.lr, weight_decay=0.0)
    handle.attach(opt)
    _train(c, model, opt, 2)
    model.eval()
    batch = _batch(c)
    with torch.no_grad():
        before = c.logits(model, batch)
    model.save_pretrained(tmp_path, state_dict=merged_state_dict(model))
    assert len(handle) == 4 and all(is_pc_module(m) for m in handle.modules.values())
    fresh = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        after = c.logits(fresh, batch)
    assert float((after - before).norm() / before.norm()) <= 1e-5
    _train(c, model, opt, 1)  # training goes on with PC
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.parametrizations.weight.original[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"merged_state_dict: effective weight of "
                                         r"'model\.layers\.0\.mlp\.down_proj' \(32, 64\)"):
        merged_state_dict(model)


def test_weight_norm_in_include_is_a_clear_error_and_leaves_the_model_unchanged():
    model = _normed("weight_norm")()
    keys = set(model.state_dict())
    with pytest.raises(ValueError, match=r"'fc1\.weight' already has another parametrization "
                                         r"\(_WeightNorm, .*exclude the module"):
        apply_pc(model, include=["fc1", "fc2"])
    assert set(model.state_dict()) == keys and not is_pc_module(model.fc2)
    with pytest.raises(ValueError, match=r"already has PC \(apply_pc called twice"):
        apply_pc(model, include="fc2") and apply_pc(model, include="fc2")


def test_pc_on_a_frozen_layer_keeps_it_frozen():
    c, model = CASES["frozen"], _build("frozen")
    handle = apply_pc(model, level=2)
    pc = handle.parametrizations["fc1"]
    assert pc.gamma is not None and not pc.gamma.requires_grad
    assert handle.parametrizations["fc2"].gamma.requires_grad
    w_eff = model.fc1.weight.detach().clone()
    opt = build_optimizer(model, "muon", lr=c.lr, weight_decay=0.0)
    assert id(pc.gamma) not in {id(p) for g in opt.param_groups for p in g["params"]}
    handle.attach(opt)
    _train(c, model, opt, 3)
    torch.testing.assert_close(model.fc1.weight.detach(), w_eff, rtol=1e-5, atol=1e-7)


def test_nothing_selected_names_the_matrix_modules():
    class Tagger(nn.Module):  # an LSTM and a projection: no default target
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.proj = nn.LSTM(8, 8), nn.Linear(8, 8)

    with pytest.raises(ValueError, match=r"selected no module: .*default targets.*"
                                         r"\(matrix modules: 'proj'\)"):
        apply_pc(Tagger())


def test_pc_on_a_block_registered_twice_and_the_tied_error():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.fc2(torch.relu(self.fc1(x)))

    block = Block()
    model = nn.Sequential(block, block)  # one set of weights applied twice (shared depth)
    x = torch.randn(3, 8)
    assert apply_pc(model, level=2).names == ["0.fc1", "0.fc2"]
    with torch.no_grad():
        before = model(x)
    merge_pc(model)
    assert not is_pc_module(model[1].fc1)
    torch.testing.assert_close(model(x), before, rtol=1e-6, atol=1e-6)
    tied = _TorchLM("none", tied=True)  # the embedding is also the head: two modules
    with pytest.raises(ValueError, match=r"'lm_head\.weight' \(50, 16\) is shared with "
                                         r"another module \(tied weights\)"):
        apply_pc(tied, include="lm_head")


@pytest.mark.parametrize(("name", "leaves"), [
    ("distilbert", {"q_lin", "k_lin", "v_lin"}),
    ("deberta_v2", {"query_proj", "key_proj", "value_proj"}),
    ("deepseek_v3", {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"}),
])
def test_include_qkv_adds_each_familys_qkv(name, leaves):
    default = set(apply_pc(_build(name)).names)
    extra = set(apply_pc(_build(name), include_qkv=True).names) - default
    assert {n.rsplit(".", 1)[-1] for n in extra} == leaves


def test_integer_weight_is_named():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match=r"'1\.weight' \(4, 4\) has dtype torch\.int8"):
        apply_pc(model, include="*")
    assert not is_pc_module(model[0])  # validated before anything was wrapped


@pytest.mark.parametrize(("path", "block"), [
    ("albert.encoder.albert_layer_groups.0.albert_layers.0.ffn", "mlp"),
    ("albert.encoder.albert_layer_groups.0.albert_layers.0.ffn_output", "mlp"),
    ("distilbert.transformer.layer.0.attention.out_lin", "attention"),
    ("distilbert.transformer.layer.0.ffn.lin1", "mlp"),
    ("convnext.encoder.stages.0.layers.0.pwconv1", "mlp"),
    ("enc.layers.0.linear2", "mlp"), ("enc.layers.0.self_attn.out_proj", "attention"),
    ("model.layers.0.self_attn.kv_a_proj_with_mqa", "attention"),
    ("model.layers.0.mlp.shared_expert_gate", "mlp"), ("classification_head.dense", "head"),
    ("transformer.h.0.self_attention.dense", "attention"), ("model.decoder.embed_positions",
                                                           "embedding"),
])
def test_block_labels_on_more_families(path, block):
    assert specopt.layers.block_of(path) == block


def test_heads_are_never_default_pc_targets():
    # BART's classification_head (dense, out_proj) is a head for routing and PC alike.
    model = _hf("BartForSequenceClassification", "BartConfig", **_S2S, num_labels=3)()
    report = describe_routing(model)
    for n in ("classification_head.dense.weight", "classification_head.out_proj.weight"):
        assert report[n].optimizer == "adamw" and "head" in report[n].reason, report[n].reason
    wrapped = apply_pc(model).names
    assert wrapped and not [n for n in wrapped if n.startswith("classification_head")]


def test_torch_compile_prefix():
    pytest.importorskip("torch._dynamo")
    plain, compiled = _TorchLM(), torch.compile(_TorchLM())  # lazy: nothing compiles here
    routes = {r.name: r.optimizer for r in describe_routing(plain)}
    assert {r.name.removeprefix("_orig_mod."): r.optimizer
            for r in describe_routing(compiled)} == routes
    assert apply_pc(compiled).names == ["_orig_mod." + n for n in apply_pc(plain).names]


@pytest.mark.parametrize("make", [torch.optim.AdamW, torch.optim.SGD])
def test_monitor_and_pc_on_a_torch_optimizer(make, tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    c = CASES["qwen2"]
    model = _build("qwen2")
    pc = apply_pc(model, level=2)
    opt = make(model.parameters(), lr=1e-2)
    monitor = specopt.SpectralMonitor(model, log_dir=tmp_path, every=1, budget=None,
                                      alarms=(), histograms=False)
    # The monitor attached first: the PC refresh still runs before it reads W_eff.
    with monitor.attach(opt), pc.attach(opt):
        _train(c, model, opt, 2)
    monitor.close()
    acc = event_accumulator.EventAccumulator(str(tmp_path),
                                             size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    key = "model.layers.0.mlp.down_proj"
    events = acc.Scalars(f"spectral/sigma_max/{key}")
    assert [e.step for e in events] == [1, 2]
    w = model.get_submodule(key).weight.detach().double()
    assert events[-1].value == pytest.approx(float(torch.linalg.matrix_norm(w, ord=2)), rel=1e-4)
    assert not opt._optimizer_step_post_hooks  # both handles removed


def test_trainer_callback_on_qwen2_moe(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    from specopt.integrations.huggingface import SpectralMonitorCallback

    model = _build("qwen2_moe")
    pc = specopt.apply_pc(model, level=2)
    u0 = pc.parametrizations["model.layers.0.mlp.shared_expert.down_proj"].u.clone()
    opt = specopt.build_optimizer(model, "muon", lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    class Tokens(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> Batch:
            x = torch.randint(0, V, (SEQ,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": x, "labels": x}

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True)
    callback = SpectralMonitorCallback(every=1, log_dir=tmp_path / "tb", budget=None,
                                       histograms=False)
    transformers.Trainer(model=model, args=args, train_dataset=Tokens(),
                         optimizers=(opt, sched), callbacks=[callback]).train()
    acc = event_accumulator.EventAccumulator(str(Path(tmp_path) / "tb"),
                                             size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    expert = "spectral/sigma_max/model.layers.0.mlp.experts.gate_up_proj.3"
    assert expert in tags and [e.step for e in acc.Scalars(expert)] == [1, 2]
    w = model.model.layers[0].mlp.experts.gate_up_proj.detach()[3].double()
    assert acc.Scalars(expert)[-1].value == pytest.approx(
        float(torch.linalg.matrix_norm(w, ord=2)), rel=1e-4)
    assert "spectral/sigma_max/model.layers.0.mlp.shared_expert.down_proj/raw" in tags
    assert not torch.equal(pc.parametrizations["model.layers.0.mlp.shared_expert.down_proj"].u,
                           u0)  # the PC refresh ran on the Trainer's optimizer
    assert parametrize.is_parametrized(model.model.layers[0].mlp.shared_expert.down_proj)


@pytest.mark.parametrize("name", ["clip", "qwen2"])
def test_no_head_warning_when_ffn_width_equals_the_vocabulary(name):
    """CLIP has no output head; a causal LM's head is named. An FFN as wide as the
    vocabulary (2 layers of it) must not make routing warn about an unidentified head."""
    import transformers

    text = dict(hidden_size=D, intermediate_size=2 * D, num_hidden_layers=2,
                num_attention_heads=2, vocab_size=2 * D, max_position_embeddings=SEQ)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notes on tiny vocabularies
        if name == "clip":
            model = transformers.CLIPModel(transformers.CLIPConfig(
                projection_dim=16, text_config=text, vision_config=_VIS))
        else:
            model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
                **text, num_key_value_heads=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        report = describe_routing(model)
    assert not report.notes
    ffn = [r for r in report if r.name.endswith(("mlp.fc1.weight", "mlp.up_proj.weight"))]
    assert len(ffn) >= 2 and all(r.optimizer == "muon" for r in ffn)
    if name == "qwen2":
        assert report["lm_head.weight"].optimizer == "adamw"
