"""RoPE cos/sin tables computed in the graph, exact at any absolute position.

A float32 angle ``position * inv_freq`` loses the position's low bits once positions
pass ~10^4 (at 10^5 the rounding is ~0.008 rad, enough to move a logit by more than
1e-4), so the angles are formed and reduced in float64 and only cos/sin are rounded to
float32: exact to float32 rounding at every position an int64 holds. The tables are
[N, D/2] (rotate-half layout), computed once per step and shared by every layer.
"""

from __future__ import annotations

import torch


def cos_sin(positions: torch.Tensor, inv_freq64: torch.Tensor, scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [N] (int64) -> cos, sin [N, D/2] float32, times ``scaling`` (the rotary attention scaling)."""
    angles = positions.to(torch.float64)[:, None] * inv_freq64  # [N, D/2], float64
    cos, sin = angles.cos().to(torch.float32), angles.sin().to(torch.float32)
    if scaling != 1.0:
        cos, sin = cos * scaling, sin * scaling
    return cos, sin


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, N, D] rotated row n by (cos[n], sin[n]) [N, D/2]: one ``RotaryEmbedding`` node."""
    rows = torch.arange(x.shape[2]).expand(x.shape[0], x.shape[2])  # [B, N]: row n reads table row n
    return torch.onnx.ops.rotary_embedding(x, cos, sin, rows)
