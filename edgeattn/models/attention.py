"""EdgeAttention: the one attention module every family maps into and every rewrite targets.

Dimension legend: B batch, L new tokens, H query heads, Hkv kv heads, D head dim,
N keys visible this step (cached + new).

A step: project the new tokens, store their keys/values through the codec, gather
the visible keys, ask the visibility policy which ones each query may see, softmax
attention, write the new tokens into the cache. Prefill and decode are the same code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgeattn.models.kv_codec import KVCodec
from edgeattn.models.kvcache import KVCacheFullError, LayerKVCache
from edgeattn.models.rotary import RotaryEmbedding
from edgeattn.models.visibility import FullVisibility


class EdgeAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 qkv_bias: bool = False, o_bias: bool = False, rotary: RotaryEmbedding | None = None) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=o_bias)
        # Shared with the other layers; kept out of the module tree so it is not a submodule per layer.
        self._rotary = [rotary] if rotary is not None else []
        self.visibility: nn.Module = FullVisibility()
        self.codec = KVCodec("fp32", num_kv_heads=num_kv_heads, head_dim=head_dim)

    @property
    def rotary(self) -> RotaryEmbedding | None:
        return self._rotary[0] if self._rotary else None

    def new_cache(self, batch: int, max_length: int) -> LayerKVCache:
        capacity = self.visibility.capacity(max_length)
        return LayerKVCache.empty(batch, self.num_kv_heads, capacity, self.head_dim, self.k_proj.weight.dtype)

    def forward(self, x: torch.Tensor, start: int, cache: LayerKVCache | None = None) -> torch.Tensor:
        """x [B, L, hidden] at absolute positions start..start+L-1 -> [B, L, hidden]."""
        batch, length, _ = x.shape
        q_pos = torch.arange(start, start + length)
        q = self.split_heads(self.q_proj(x), self.num_heads)  # [B, H, L, D]
        k = self.split_heads(self.k_proj(x), self.num_kv_heads)  # [B, Hkv, L, D]
        v = self.split_heads(self.v_proj(x), self.num_kv_heads)
        ring = self.visibility.ring
        if self.rotary is not None and not ring:
            k = self.rotary.rotate(k, q_pos)  # full caches store rotated keys
        residual = self.codec.residual
        if not residual:  # with a residual window the cache keeps full precision; reads round-trip old tokens
            k = self.codec.roundtrip(k, "key")
            v = self.codec.roundtrip(v, "value")

        if cache is not None:
            old_k, old_v, old_pos = cache.visible()
            keys, values, k_pos = torch.cat((old_k, k), 2), torch.cat((old_v, v), 2), torch.cat((old_pos, q_pos))
        else:
            keys, values, k_pos = k, v, q_pos

        if residual:
            out = self._attend_with_residual(q, keys, values, q_pos, k_pos)
        elif cache is None and type(self.visibility) is FullVisibility:
            # A whole sequence under the plain causal mask (scoring, calibration, distillation): PyTorch's fused
            # kernel, which never materializes the [L, L] scores (distillation steps of 2048 tokens ~2x faster).
            q_rot = self.rotary.rotate(q, q_pos) if self.rotary is not None else q
            out = F.scaled_dot_product_attention(q_rot, keys, values, is_causal=True,
                                                 enable_gqa=self.num_heads != self.num_kv_heads)
        else:
            scores = self._scores(q, keys, q_pos, k_pos)  # [B, H, L, N]
            out = torch.softmax(scores, dim=-1) @ self._repeat_kv(values)  # [B, H, L, D]
        if cache is not None:
            self._store(cache, q_pos, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))

    def _attend_with_residual(self, q, keys, values, q_pos, k_pos) -> torch.Tensor:
        """Attention where each query reads its ``codec.residual`` most recent keys/values at full precision and
        the older ones through the codec (KIVI); keys/values [B, Hkv, N, D] at full precision -> [B, H, L, D]."""
        recent = (q_pos[:, None] - k_pos[None, :]) < self.codec.residual  # [L, N]
        scores = torch.where(recent, self._scores(q, keys, q_pos, k_pos),
                             self._scores(q, self.codec.roundtrip(keys, "key"), q_pos, k_pos))
        weights = torch.softmax(scores, dim=-1)  # [B, H, L, N]
        old_values = self._repeat_kv(self.codec.roundtrip(values, "value"))
        return (weights * recent) @ self._repeat_kv(values) + (weights * ~recent) @ old_values

    def _scores(self, q, keys, q_pos, k_pos) -> torch.Tensor:
        scale = self.head_dim**-0.5
        rotary = self.rotary
        if self.visibility.ring and rotary is not None:
            k_in_cache, q_in_cache, q_vs_sinks = self.visibility.rotary_positions(q_pos, k_pos)
            k_rot = self._repeat_kv(rotary.rotate(keys, k_in_cache))
            vs_window = rotary.rotate(q, q_in_cache) @ k_rot.transpose(-1, -2)
            vs_sinks = rotary.rotate(q, q_vs_sinks) @ k_rot.transpose(-1, -2)
            scores = torch.where(k_pos < self.visibility.sinks, vs_sinks, vs_window) * scale
            q_rot = None
        else:
            q_rot = rotary.rotate(q, q_pos) if rotary is not None else q
            scores = (q_rot @ self._repeat_kv(keys).transpose(-1, -2)) * scale
        mask = self.visibility.mask(q_pos, k_pos, q_rot, keys)
        return scores.masked_fill(~mask, float("-inf"))

    def _store(self, cache: LayerKVCache, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.visibility.ring:
            window, sinks = self.visibility.window, self.visibility.sinks
            # Of a long chunk only the sinks and the last `window` tokens survive in the ring.
            keep = (positions < sinks) | (positions > positions[-1] - window)
            positions, k, v = positions[keep], k[:, :, keep], v[:, :, keep]
            slots = self.visibility.slot_of(positions)
        else:
            if int(positions[-1]) >= cache.capacity:
                raise KVCacheFullError(
                    f"KV cache full: capacity {cache.capacity} tokens, token at position {int(positions[-1])} "
                    "does not fit (raise max_length, or use a sliding window for constant memory)"
                )
            slots = positions
        cache.write(slots, positions, k, v)

    def split_heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """A projection [B, L, heads*D] as [B, heads, L, D], the layout attention and the cache use."""
        batch, length, _ = x.shape
        return x.view(batch, length, heads, self.head_dim).transpose(1, 2)

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        """[B, Hkv, N, D] -> [B, H, N, D]: query head h reads kv head h // (H / Hkv)."""
        return x.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
