import pytest
import torch

from specopt.models import PRESETS, Llama, LlamaConfig


def test_forward_shapes_and_causality():
    torch.manual_seed(0)
    model = Llama(PRESETS["tiny"]).eval()
    tokens = torch.randint(0, 256, (2, 16))
    logits = model(tokens)
    assert logits.shape == (2, 16, 256)
    # Changing a future token never changes earlier logits.
    altered = tokens.clone()
    altered[:, 10] = (altered[:, 10] + 1) % 256
    with torch.no_grad():
        assert torch.allclose(model(altered)[:, :10], logits[:, :10], atol=1e-6)


def test_tied_embeddings_share_one_parameter():
    model = Llama(LlamaConfig(dim=32, n_layers=1, n_heads=2, tie_embeddings=True))
    assert model.output.weight is model.tok_embeddings.weight
    untied = Llama(LlamaConfig(dim=32, n_layers=1, n_heads=2))
    assert model.num_parameters() == untied.num_parameters() - 256 * 32


def test_module_names_follow_llama_layout():
    names = {n for n, _ in Llama(PRESETS["tiny"]).named_modules()}
    expected_names = (
        "layers.0.attention.wo", "layers.1.feed_forward.w2", "tok_embeddings", "output"
    )
    for expected in expected_names:
        assert expected in names


def test_loss_backward_and_config_errors():
    model = Llama(PRESETS["tiny"])
    tokens = torch.randint(0, 256, (2, 9))
    loss = model.loss(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    assert torch.isfinite(loss) and 4.0 < loss.item() < 7.0  # ~ln(256) = 5.55 at init
    with pytest.raises(ValueError, match="divisible by n_heads"):
        LlamaConfig(dim=30, n_heads=4)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(torch.zeros(1, 1000, dtype=torch.long))


def test_reset_parameters_reaches_parametrized_weights_and_rope_tables():
    from torch.nn.utils import parametrize

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    model = Llama(PRESETS["tiny"])
    parametrize.register_parametrization(model.layers[0].feed_forward.w1, "weight", Double())
    raw = model.layers[0].feed_forward.w1.parametrizations.weight.original
    raw.data.fill_(7.0)
    model.rope_cos.fill_(0.0)
    model.reset_parameters()
    assert raw.abs().max() < 1.0  # re-drawn from N(0, 0.02^2)
    assert model.rope_cos[0].eq(1.0).all()  # cos(0) = 1
