"""A small Llama-style decoder, readable in one sitting.

RMSNorm (pre-norm), rotary position embeddings, SwiGLU feed-forward, causal attention
through ``F.scaled_dot_product_attention``, optional tied input/output embeddings.
Module names follow the Meta Llama layout (``attention.wq/wk/wv/wo``,
``feed_forward.w1/w2/w3``, ``tok_embeddings``, ``output``) so that
``specopt.pc.apply_pc`` and ``specopt.build_optimizer`` recognise them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PRESETS", "Llama", "LlamaConfig"]


@dataclass
class LlamaConfig:
    vocab_size: int = 256  # byte-level tokenizer by default
    dim: int = 128  # model width
    n_layers: int = 4
    n_heads: int = 4  # dim must be divisible by n_heads
    ffn_hidden: int = 0  # SwiGLU hidden width; 0 means round(8/3 * dim) up to a multiple of 32
    max_seq_len: int = 256  # longest sequence the rotary table covers
    tie_embeddings: bool = False  # share tok_embeddings.weight with output.weight
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02  # std of the normal init of every Linear and the embedding

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LlamaConfig.{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(
                f"LlamaConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})"
            )
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head dim {self.dim // self.n_heads} must be even for rotary")
        if self.ffn_hidden < 0:
            raise ValueError(f"LlamaConfig.ffn_hidden must be >= 0, got {self.ffn_hidden}")
        if self.ffn_hidden == 0:
            self.ffn_hidden = 32 * math.ceil(8 * self.dim / 3 / 32)

    def to_dict(self) -> dict:
        return asdict(self)


#: Size presets used by the CLI, tests and benchmarks (byte vocabulary).
PRESETS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(dim=64, n_layers=2, n_heads=2, max_seq_len=128),
    "small": LlamaConfig(dim=128, n_layers=4, n_heads=4, max_seq_len=256),
    "base": LlamaConfig(dim=256, n_layers=6, n_heads=8, max_seq_len=512),
    "d512": LlamaConfig(dim=512, n_layers=4, n_heads=8, ffn_hidden=2048, max_seq_len=512),
}


def rotary_table(head_dim: int, seq_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin tables of shape (seq_len, head_dim // 2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[..., 2i], x[..., 2i+1]); x: (B, nh, T, hs), cos/sin: (T, hs/2)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def _trainable_weight(module: nn.Module) -> Tensor:
    # Under a parametrization (e.g. the PC layer) module.weight is computed; the raw
    # trained tensor is the parametrization's `original`.
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and "weight" in parametrizations:
        return parametrizations.weight.original
    return module.weight


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, C = x.shape
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (
            w(x).view(B, T, self.n_heads, -1).transpose(1, 2) for w in (self.wq, self.wk, self.wv)
        )
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, C))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    """Decoder-only language model. ``forward(tokens)`` returns logits (B, T, vocab)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rotary_table(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        # Not persistent: derived from the config, so checkpoints stay architecture-only.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise weights and the rotary tables (also after ``to_empty``)."""
        cfg = self.config
        cos, sin = rotary_table(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(_trainable_weight(module), std=cfg.init_std)
        # Scale residual-branch outputs by depth (GPT-2 style) so the stream stays O(1).
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        for block in self.layers:
            nn.init.normal_(_trainable_weight(block.attention.wo), std=out_std)
            nn.init.normal_(_trainable_weight(block.feed_forward.w2), std=out_std)

    def forward(self, tokens: Tensor) -> Tensor:
        T = tokens.shape[1]
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
        x = self.tok_embeddings(tokens)  # (B, T, C)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        for block in self.layers:
            x = block(x, cos, sin)
        return self.output(self.norm(x))  # (B, T, vocab)

    def loss(self, tokens: Tensor, targets: Tensor) -> Tensor:
        """Mean next-token cross-entropy in nats; tokens, targets: (B, T) int64."""
        logits = self(tokens)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
