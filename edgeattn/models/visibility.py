"""Which cached keys each query attends to: full, sliding window with sinks, hierarchical.

Dimension legend: B batch, H query heads, Hkv kv heads, L new (query) tokens,
N keys visible this step (cached + new), D head dim, NB blocks.

Every policy returns a boolean mask [B|1, H|1, L, N] (True = attend) from the
absolute positions of queries and keys; ``EdgeAttention`` does the rest.
"""

from __future__ import annotations

import torch
from torch import nn


class FullVisibility(nn.Module):
    """Causal attention over every cached token; the cache is a flat max-length buffer."""

    ring = False

    def capacity(self, max_length: int) -> int:
        return max_length

    def mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor, q_rot=None, k_rot=None) -> torch.Tensor:
        return (k_pos[None, :] <= q_pos[:, None])[None, None]


class SinkWindowVisibility(nn.Module):
    """Each query sees the first ``sinks`` tokens and the last ``window`` tokens (itself included).

    Cache: a ring of ``sinks + window`` slots. Sinks stay in slots 0..sinks-1; token
    ``t >= sinks`` lives in slot ``sinks + (t - sinks) % window``, so memory is constant
    however long generation runs.

    RoPE scheme (StreamingLLM, Xiao et al. 2023): keys are cached *before* rotation and
    rotated at read time with positions inside the cache, so no position ever exceeds
    ``sinks + window + L`` and generation can go past the trained context. Concretely the
    window keys keep their true distance to the query, and a sink is seen from the query's
    position clamped to ``sinks + window - 1``, i.e. as if the sinks sat right before the
    window. While nothing has been evicted (t < sinks + window) this equals full attention
    with original positions exactly. The alternative, keeping original positions, would
    need positions (and sink distances) beyond what the model was trained on.
    """

    ring = True

    def __init__(self, window: int, sinks: int = 0) -> None:
        super().__init__()
        self.window = window
        self.sinks = sinks

    def capacity(self, max_length: int) -> int:
        return self.sinks + self.window

    def slot_of(self, positions: torch.Tensor) -> torch.Tensor:
        """Ring slot of each absolute position."""
        return torch.where(
            positions < self.sinks, positions, self.sinks + (positions - self.sinks) % self.window
        )

    def mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor, q_rot=None, k_rot=None) -> torch.Tensor:
        causal = k_pos[None, :] <= q_pos[:, None]
        recent = (q_pos[:, None] - k_pos[None, :]) < self.window
        sink = (k_pos < self.sinks)[None, :]
        return (causal & (recent | sink))[None, None]

    def rotary_positions(
        self, q_pos: torch.Tensor, k_pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(key positions, query positions vs window keys, query positions vs sinks), all in-cache."""
        is_sink = k_pos < self.sinks
        later = k_pos[~is_sink]
        shift = (later.min() - self.sinks).clamp_min(0) if later.numel() else k_pos.new_zeros(())
        k_in_cache = torch.where(is_sink, k_pos, k_pos - shift)
        q_in_cache = q_pos - shift
        q_vs_sinks = q_in_cache.clamp_max(self.sinks + self.window - 1)
        return k_in_cache, q_in_cache, q_vs_sinks


class HierarchicalVisibility(nn.Module):
    """Two-level block-sparse attention (Quest-style block summaries).

    Keys are grouped in aligned blocks of ``block_size`` positions. Level 1 scores each
    *complete* block per query head with the upper bound sum_d max(q_d*min_d, q_d*max_d)
    of its keys' per-channel min/max and keeps the best ``top_blocks`` (with
    ``block_mass``: the fewest whose estimated attention mass reaches it, still capped by
    ``top_blocks``). Level 2 attends exactly over the kept blocks, the ``sinks`` and the
    ``local_window`` most recent tokens. Because ``local_window >= block_size`` the
    incomplete current block is always inside the local window, so keeping every block
    is exactly full attention, and prefill and decode select identically.

    ``select="kv-head"``: the query heads that read one kv head keep the same blocks, ranked by
    the largest of their bounds (a block is as good as its best query head finds it), so a
    kv head's rows are read once for its whole group.
    """

    ring = False

    def __init__(self, block_size: int, top_blocks: int, local_window: int, sinks: int = 0,
                 block_mass: float | None = None, select: str = "query-head") -> None:
        super().__init__()
        self.block_size = block_size
        self.top_blocks = top_blocks
        self.local_window = local_window
        self.sinks = sinks
        self.block_mass = block_mass
        self.select = select

    def capacity(self, max_length: int) -> int:
        return max_length

    def mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor, q_rot: torch.Tensor, k_rot: torch.Tensor) -> torch.Tensor:
        """q_rot [B, H, L, D], k_rot [B, Hkv, N, D] (rotated) -> mask [B, H, L, N]."""
        causal = k_pos[None, :] <= q_pos[:, None]  # [L, N]
        always = ((q_pos[:, None] - k_pos[None, :]) < self.local_window) | (k_pos < self.sinks)[None, :]
        selected = self._selected_keys(q_pos, k_pos, q_rot, k_rot)  # [B, H, L, N]
        return causal[None, None] & (always[None, None] | selected)

    def _selected_keys(self, q_pos, k_pos, q_rot, k_rot) -> torch.Tensor:
        batch, heads, length, dim = q_rot.shape
        kv_heads, bs = k_rot.shape[1], self.block_size
        num_blocks = int(k_pos.max().item()) // bs + 1 if k_pos.numel() else 0
        key_block = k_pos // bs  # [N]
        # Per-channel min/max of each block's keys: [B, Hkv, NB, D].
        index = key_block[None, None, :, None].expand(batch, kv_heads, -1, dim)
        kmin = k_rot.new_full((batch, kv_heads, num_blocks, dim), float("inf")).scatter_reduce(
            2, index, k_rot, reduce="amin")
        kmax = k_rot.new_full((batch, kv_heads, num_blocks, dim), float("-inf")).scatter_reduce(
            2, index, k_rot, reduce="amax")
        group = heads // kv_heads
        kmin = kmin.repeat_interleave(group, dim=1)
        kmax = kmax.repeat_interleave(group, dim=1)
        # Upper bound of q.k over each block: [B, H, L, NB].
        bound = q_rot.clamp_min(0) @ kmax.transpose(-1, -2) + q_rot.clamp_max(0) @ kmin.transpose(-1, -2)
        block_end = (torch.arange(num_blocks, device=k_pos.device) + 1) * bs - 1
        complete = block_end[None, :] <= q_pos[:, None]  # [L, NB]
        bound = bound.masked_fill(~complete[None, None], float("-inf"))
        if self.select == "kv-head":
            shared = bound.reshape(batch, kv_heads, group, length, num_blocks).amax(2)  # [B, Hkv, L, NB]
            keep = self._keep_blocks(shared, complete, dim).repeat_interleave(group, dim=1)
        else:
            keep = self._keep_blocks(bound, complete, dim)
        return torch.gather(keep, -1, key_block[None, None, None, :].expand(batch, heads, length, -1))

    def _keep_blocks(self, bound: torch.Tensor, complete: torch.Tensor, dim: int) -> torch.Tensor:
        """bound [B, H, L, NB] -> bool [B, H, L, NB] of kept blocks."""
        num_blocks = bound.shape[-1]
        k = min(self.top_blocks, num_blocks)
        order = bound.argsort(dim=-1, descending=True, stable=True)  # ties: the lower block first, as ONNX TopK
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(num_blocks).expand_as(order))
        budget = torch.full(bound.shape[:-1], k, dtype=torch.long)
        if self.block_mass is not None:
            # Estimated attention mass of each block: softmax of its scaled bound (all candidate
            # blocks are complete, so their sizes are equal and cancel out).
            mass = torch.softmax(bound / dim**0.5, dim=-1).nan_to_num(0.0)
            cumulative = torch.gather(mass, -1, order).cumsum(-1)
            needed = (cumulative < self.block_mass).sum(-1) + 1
            budget = torch.minimum(budget, needed)
        return (rank < budget[..., None]) & complete[None, None]
