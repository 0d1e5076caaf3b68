"""Installing merged K/V projections on an attention layer: the last step of both GQA merges (mean and calibrated)."""

from __future__ import annotations

import torch
from torch import nn

from edgeattn.models.kv_codec import KVCodec

NAME = "gqa"  # the rewrite's name in its LayerChange records


def set_kv_projections(attn, kv_heads: int, k_weight, k_bias, v_weight, v_bias) -> None:
    """Install merged K/V projections ([kv_heads*D, hidden]) on an EdgeAttention."""
    attn.k_proj = linear(k_weight, k_bias)
    attn.v_proj = linear(v_weight, v_bias)
    attn.num_kv_heads = kv_heads
    attn.codec = KVCodec(attn.codec.dtype, attn.codec.mode, kv_heads, attn.head_dim, residual=attn.codec.residual)


def linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer
