"""Rotary position embedding in the Hugging Face "rotate half" layout.

Channel ``d`` and channel ``d + head_dim/2`` form one rotary frequency pair; the
GQA calibration relies on that layout when it keeps its maps RoPE-consistent.
"""

from __future__ import annotations

import torch
from torch import nn


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """Inverse frequencies of the original RoPE: theta ** (-2i / head_dim)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)).float()


class RotaryEmbedding(nn.Module):
    """Rotates query/key heads by their positions; shared by every layer."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.attention_scaling = float(attention_scaling)

    @property
    def head_dim(self) -> int:
        return 2 * self.inv_freq.numel()

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [..., T] (any integer or float tensor) -> cos, sin [..., T, head_dim]."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq  # [..., T, D/2]
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos() * self.attention_scaling, angles.sin() * self.attention_scaling

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, H, T, D] rotated by positions [T] (or broadcastable to [B, H, T])."""
        cos, sin = self.cos_sin(positions)
        half = x.shape[-1] // 2
        rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated_half * sin
