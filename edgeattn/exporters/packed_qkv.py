"""q, k and v as one MatMul: at batch-1 decode every MatMul node costs a thread-pool dispatch."""

from __future__ import annotations

import torch

from edgeattn.models.attention import EdgeAttention


def packed_qkv(attn: EdgeAttention) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's q/k/v projections side by side: weight [hidden, (H + 2*Hkv)*D] (the layout MatMul reads,
    so the graph holds it as a plain initializer the weight quantizer sees) and bias [(H + 2*Hkv)*D] or None."""
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    weight = torch.cat([proj.weight.detach() for proj in projections]).T.contiguous()
    if all(proj.bias is None for proj in projections):
        return weight, None
    bias = torch.cat([proj.bias.detach() if proj.bias is not None else proj.weight.new_zeros(proj.out_features)
                      for proj in projections])
    return weight, bias


def split_heads(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int):
    """qkv [B, L, (H + 2*Hkv)*D] -> q [B, H, L, D], k, v [B, Hkv, L, D] (one Reshape, Transpose and Split)."""
    batch, length, _ = qkv.shape
    all_heads = qkv.reshape(batch, length, heads + 2 * kv_heads, head_dim).transpose(1, 2)
    return all_heads.split([heads, kv_heads, kv_heads], dim=1)
