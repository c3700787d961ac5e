"""specopt.layers and specopt.hooks: one selection vocabulary and one "nothing matched"
rule across build_optimizer, apply_pc and SpectralMonitor; one attach handle type."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import specopt
from specopt.hooks import AttachHandle
from specopt.layers import check_patterns, matches, matrix_spec, no_match_error
from specopt.models import Llama, LlamaConfig

CFG = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, max_seq_len=16)


def _model() -> Llama:
    torch.manual_seed(0)
    return Llama(CFG)


@pytest.mark.parametrize("pattern", ["layers.*.feed_forward.w2", re.compile(r"\.w2$")])
def test_one_pattern_selects_the_same_layers_everywhere(pattern):
    model = _model()
    want = ["layers.0.feed_forward.w2", "layers.1.feed_forward.w2"]
    # A module path (or regex on it) names the layer in all three APIs.
    report = specopt.describe_routing(model, exclude=pattern)
    assert [r.name for r in report if r.reason.startswith("exclude")] == [
        f"{n}.weight" for n in want]
    monitor = specopt.SpectralMonitor(model, include=pattern, budget=None, alarms=())
    assert monitor.layers == want
    assert specopt.apply_pc(model, include=pattern).names == want
    # After apply_pc the same pattern still finds the layers (their raw weights).
    assert specopt.SpectralMonitor(model, include=pattern, budget=None).layers == [
        *want, *(f"{n}/raw" for n in want)]
    report = specopt.describe_routing(model, exclude=pattern)
    assert {r.name for r in report if r.reason.startswith("exclude")} == {
        f"{n}.parametrizations.weight.original" for n in want}


@pytest.mark.parametrize("call", [
    lambda m, p: specopt.build_optimizer(m, include=p),
    lambda m, p: specopt.build_optimizer(m, exclude=p),
    lambda m, p: specopt.apply_pc(m, include=p),
    lambda m, p: specopt.apply_pc(m, exclude=p),
    lambda m, p: specopt.SpectralMonitor(m, include=p),
    lambda m, p: specopt.SpectralMonitor(m, exclude=p),
], ids=["optimizer-include", "optimizer-exclude", "pc-include", "pc-exclude",
        "monitor-include", "monitor-exclude"])
def test_a_pattern_that_matches_nothing_is_the_same_clear_error(call):
    model = _model()
    with pytest.raises(ValueError, match=r"(include|exclude) pattern 'layers\.\*\.feed_forwad"
                       r"\.w1' matches no \w+( \w+)? of the model; candidates \(of \d+\): "
                       r"'layers\.\d\.feed_forward\.w1"):
        call(model, ["*.w3", "layers.*.feed_forwad.w1"])
    assert not any(specopt.is_pc_module(m) for m in model.modules())  # nothing changed


@pytest.mark.parametrize("bad", [3, [""], [None], b"x"])
def test_bad_pattern_types_are_named(bad):
    with pytest.raises(TypeError, match="include must be a glob string, a compiled regex"):
        check_patterns("include", bad)


def test_matches_and_no_match_error():
    pats = check_patterns("include", ["a.*", re.compile("^b")])
    assert matches(pats, ["a.x"]) == [pats[0]] and matches(pats, ["b.y", "a.z"]) == list(pats)
    err = no_match_error("exclude", re.compile("zz"), ["a", "b"], "module")
    assert str(err) == ("exclude pattern re.compile('zz') matches no module of the model; "
                        "candidates: 'a', 'b'")


def test_matrix_spec_of_common_modules():
    lin = nn.Linear(3, 5)
    assert matrix_spec(lin, "weight", lin.weight).matrix_shape == (5, 3)
    assert matrix_spec(lin, "bias", lin.bias).kind == "vector"
    emb = nn.Embedding(10, 4)
    assert matrix_spec(emb, "weight", emb.weight).kind == "embedding"
    bare = nn.Parameter(torch.zeros(1, 7, 4))
    spec = matrix_spec(None, "pos_embed", bare)
    assert (spec.kind, spec.count, spec.matrix_shape, spec.has_unit_dim) == (
        "experts", 1, (7, 4), False)
    token = matrix_spec(None, "cls_token", nn.Parameter(torch.zeros(1, 1, 4)))
    assert token.has_unit_dim


def test_pc_and_monitor_attach_return_one_handle_type():
    model = _model()
    pc = specopt.apply_pc(model)
    opt = specopt.build_optimizer(model)
    monitor = specopt.SpectralMonitor(model, every=1, budget=None, alarms=())
    handles = [pc.attach(opt), monitor.attach(opt)]
    assert all(type(h) is AttachHandle for h in handles)
    assert specopt.spectral.MonitorHandle is AttachHandle  # the former name
    assert [h.active for h in handles] == [True, True]
    assert "PCHandle on HybridOptimizer, active" in repr(handles[0])
    assert len(opt._optimizer_step_post_hooks) == 2
    for h in handles:
        h.remove()
        h.remove()  # idempotent
        assert not h.active
    assert not opt._optimizer_step_post_hooks and not opt._optimizer_step_pre_hooks
    with pc.attach(opt) as h, monitor.attach(opt):
        assert len(opt._optimizer_step_post_hooks) == 2
    assert not h.active and not opt._optimizer_step_post_hooks  # both removed on exit
