"""The canonical decoder every family is mapped into ("own the forward pass").

One config dataclass covers every supported family: pre-norm blocks of
EdgeAttention + MLP, RMSNorm or LayerNorm, RoPE or learned positions, an optional
tied LM head. Family adapters (``edgeattn.models.families``) translate checkpoints
into it; rewrites only ever touch its ``EdgeAttention`` modules.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgeattn.errors import InvalidOptionError
from edgeattn.models.attention import EdgeAttention
from edgeattn.models.kvcache import DecoderCache
from edgeattn.models.rotary import RotaryEmbedding, default_inv_freq

ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


@dataclass(frozen=True)
class DecoderConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    norm: str = "rms"  # "rms" | "layer"
    activation: str = "silu"
    gated_mlp: bool = True
    positions: str = "rope"  # "rope" | "learned"
    rope_theta: float = 10000.0
    rope_parameters: dict[str, Any] = field(default_factory=dict)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class MLP(nn.Module):
    """Gated (SwiGLU: down(act(gate) * up)) or plain (down(act(up))) feed-forward."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias) if config.gated_mlp else None
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is None:
            return self.down_proj(self.act(self.up_proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: DecoderConfig, rotary: RotaryEmbedding | None) -> None:
        super().__init__()
        self.attn_norm = _norm(config)
        self.attn = EdgeAttention(
            config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
            qkv_bias=config.qkv_bias, o_bias=config.o_bias, rotary=rotary,
        )
        self.mlp_norm = _norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, start: int, cache=None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), start, cache)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    """Causal LM: ``logits = model(input_ids, cache)``; the cache advances in place."""

    def __init__(self, config: DecoderConfig, rope_inv_freq: torch.Tensor | None = None,
                 rope_attention_scaling: float = 1.0) -> None:
        super().__init__()
        self.config = config
        self.rotary = None
        if config.positions == "rope":
            inv_freq = rope_inv_freq if rope_inv_freq is not None else default_inv_freq(config.head_dim, config.rope_theta)
            self.rotary = RotaryEmbedding(inv_freq, rope_attention_scaling)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.pos_embed = (
            nn.Embedding(config.max_position_embeddings, config.hidden_size) if config.positions == "learned" else None
        )
        self.blocks = nn.ModuleList(Block(config, self.rotary) for _ in range(config.num_layers))
        self.final_norm = _norm(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    def attentions(self) -> list[EdgeAttention]:
        return [block.attn for block in self.blocks]

    def kv_bytes_per_token(self) -> int:
        """Exact KV-cache bytes one more cached token costs, summed over layers."""
        return sum(attn.codec.bytes_per_token() for attn in self.attentions())

    def kv_residual_bytes(self) -> int:
        """Constant KV-cache bytes per sequence, summed over layers: the full-precision recent windows."""
        return sum(attn.codec.residual_bytes() for attn in self.attentions())

    def new_cache(self, batch: int = 1, max_length: int | None = None) -> DecoderCache:
        max_length = max_length or self.config.max_position_embeddings
        return DecoderCache([attn.new_cache(batch, max_length) for attn in self.attentions()])

    def forward(self, input_ids: torch.Tensor, cache: DecoderCache | None = None) -> torch.Tensor:
        """input_ids [B, L] -> logits [B, L, vocab]. Without a cache: one full causal pass."""
        start = cache.length if cache is not None else 0
        x = self.hidden_states(input_ids, start, cache)
        if cache is not None:
            cache.length += input_ids.shape[1]
        return self.lm_head(self.final_norm(x))

    def hidden_states(self, input_ids: torch.Tensor, start: int = 0, cache: DecoderCache | None = None) -> torch.Tensor:
        x = self.embed(input_ids)
        if self.pos_embed is not None:
            end = start + input_ids.shape[1]
            if end > self.config.max_position_embeddings:
                raise InvalidOptionError(
                    f"position {end - 1} is beyond the learned position table "
                    f"({self.config.max_position_embeddings} positions)"
                )
            x = x + self.pos_embed(torch.arange(start, end))
        for index, block in enumerate(self.blocks):
            x = block(x, start, cache.layers[index] if cache is not None else None)
        return x


def _norm(config: DecoderConfig) -> nn.Module:
    if config.norm == "rms":
        return RMSNorm(config.hidden_size, config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
