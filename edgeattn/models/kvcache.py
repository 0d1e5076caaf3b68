"""The PyTorch KV cache: one fixed-capacity buffer of slots per layer.

``positions[slot]`` is the absolute position of the token a slot holds (-1: empty),
so full caches (slot == position) and ring buffers (slot from the visibility policy)
share one structure. Keys are stored in the form the attention policy asks for
(rotated for full caches, unrotated for ring buffers) after the codec round trip.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgeattn.errors import EdgeattnError


class KVCacheFullError(EdgeattnError, RuntimeError):
    """A full (non-ring) KV cache has no slot left for the next token."""


@dataclass
class LayerKVCache:
    keys: torch.Tensor  # [B, Hkv, C, D]
    values: torch.Tensor  # [B, Hkv, C, D]
    positions: torch.Tensor  # [C] long, -1 = empty

    @classmethod
    def empty(cls, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype=torch.float32) -> LayerKVCache:
        shape = (batch, kv_heads, capacity, head_dim)
        return cls(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype),
                   torch.full((capacity,), -1, dtype=torch.long))

    @property
    def capacity(self) -> int:
        return self.positions.numel()

    def visible(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Occupied slots in chronological order: keys, values [B, Hkv, n, D], positions [n]."""
        occupied = (self.positions >= 0).nonzero().flatten()
        order = occupied[self.positions[occupied].argsort()]
        return self.keys[:, :, order], self.values[:, :, order], self.positions[order]

    def write(self, slots: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store tokens at ``slots`` (unique); keys/values [B, Hkv, len(slots), D]."""
        self.keys[:, :, slots] = keys
        self.values[:, :, slots] = values
        self.positions[slots] = positions


class DecoderCache:
    """Per-layer caches plus the number of tokens the model has consumed."""

    def __init__(self, layers: list[LayerKVCache]) -> None:
        self.layers = layers
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.layers[0].capacity
