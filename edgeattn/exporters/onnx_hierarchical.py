"""Hierarchical block-sparse attention on standard ONNX ops: decode reads only the blocks it selects.

Dimension legend: B batch, L new tokens, H query heads, Hkv kv heads, D head dim, S sinks, W local window,
bs block size, NB = ceil(max_length / bs) blocks, C = NB * bs token rows, K = min(top_blocks, NB),
P cached tokens before this step, T = P + L.

The model (``HierarchicalVisibility``) scores every complete block for each query head with an upper bound
of q.k from the block keys' per-channel min/max, keeps the best K (or the fewest reaching ``block_mass``),
and attends to them, the sinks and the local window. Recomputing the min/max of every block each step
costs what full attention costs, so the summaries live in the cache, in a buffer of their own beside the
keys and values (``block_bounds``: [B, Hkv, NB, 2D], each block's per-channel key max, then minus its min,
so that one MatMul of [relu(q), relu(-q)] scores every block), updated only for the blocks being written.

A decode step (``onnx_hierarchical_function``'s ``then`` branch) then costs O(NB*D) to score the blocks and
O((S + W + K*bs) rounded up to whole blocks) to attend: a fixed token budget, whatever the context. It reads
whole blocks, one ``Gather`` per buffer: those holding the sinks and the window, and the K selected; with
blocks selected per kv head (``block_select`` kv-head) each kv head's blocks are read once for all its query
heads. A chunk (a prompt) attends densely over its T keys with the selection as a mask, as the model does.
The cache writes (new rows and the bounds of the blocks they touch) sit outside the layer's ``If``, whose
outputs onnxruntime copies: one in-place ``ScatterElements`` per buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import torch

from edgeattn.exporters import onnx_hierarchical_function, onnx_ring_function, rope_angles
from edgeattn.exporters.lowering_contract import CacheLayout, ExtraBuffer, LoweringBase
from edgeattn.exporters.onnx_ring import MASKED, register_packed_qkv, register_rotary
from edgeattn.models.attention import EdgeAttention
from edgeattn.spec import AttentionSpec

NAME = "onnx"
BOUNDS = "block_bounds"  # the extra buffer's kind: each block's per-channel key max, then minus its min


@dataclass(frozen=True)
class HierarchicalStep:
    """Per-step tensors shared by every layer (computed once in the graph)."""

    fast: torch.Tensor  # bool []: decode (L = 1), the sparse branch
    cos: torch.Tensor  # [L, D/2] rotation of the new tokens at their positions
    sin: torch.Tensor
    rows: torch.Tensor  # [B, L] row n of the new tokens reads row n of cos/sin
    # The writes: rows first_block*bs .. P-1 of the touched blocks, padding them to whole blocks, where they go.
    write_from: torch.Tensor  # [1] first row of the first block the step writes to
    write_to: torch.Tensor  # [1] P
    summary_pads: torch.Tensor  # [8] Pad of [B, Hkv, rows, 2D] to whole blocks
    row_index: torch.Tensor  # [B, Hkv, L, D] ScatterElements index of the new rows
    block_index: torch.Tensor  # [B, Hkv, nb, 2D] ScatterElements index of the touched blocks' bounds
    # Decode:
    scored_blocks: torch.Tensor  # [1] nb: the complete blocks, at least K (TopK's), at most NB
    block_mask: torch.Tensor  # [1, 1, 1, nb] 0 for complete blocks, masked for the rest
    local_blocks: torch.Tensor  # [B, Hkv, c, n] the blocks holding the sinks, then the window's
    block_offset: torch.Tensor  # [B, Hkv, 1, 1] (b*Hkv + h)*NB: the first block of each (batch, kv head)
    local_mask: torch.Tensor  # [B, Hkv, c, n*bs] 0 for their sink and window rows
    row_mask: torch.Tensor  # [NB, bs] 0 for the rows a selected block counts: not a sink, before the window
    # A chunk (dense):
    total: torch.Tensor  # [1] T
    prompt_block_mask: torch.Tensor  # [L, NB] 0 where a query's block is complete, masked for the rest
    key_block: torch.Tensor  # [T] each key's block
    causal: torch.Tensor  # bool [L, T]
    always: torch.Tensor  # bool [L, T] causal and a sink or in the query's window

    def function_inputs(self) -> tuple[torch.Tensor, ...]:
        return (self.fast, self.cos, self.sin, self.rows, self.write_from, self.write_to, self.summary_pads,
                self.row_index, self.block_index, self.scored_blocks, self.block_mask, self.local_blocks,
                self.block_offset, self.local_mask, self.row_mask,
                self.total, self.prompt_block_mask, self.key_block, self.causal, self.always)


class HierarchicalAttentionLowering(LoweringBase):
    """Block bounds in the cache, TopK, a Gather of the blocks read and one ``Attention`` per layer."""

    name = NAME
    op_type = "Attention"
    opset = onnx_ring_function.OPSET
    inline_functions = True

    def __init__(self, attn: EdgeAttention, spec: AttentionSpec, max_length: int) -> None:
        super().__init__(attn)
        if attn.codec.dtype != "fp32":
            raise ValueError(f"the hierarchical onnx lowering keeps an fp32 cache, not {attn.codec.dtype}")
        visibility = attn.visibility
        self.block_size, self.top_blocks, self.block_mass = visibility.block_size, visibility.top_blocks, visibility.block_mass
        self.sinks = visibility.sinks
        self.shared = visibility.select == "kv-head"  # blocks chosen once per kv head for its query heads
        self.max_length = max_length
        self.blocks = -(-max_length // self.block_size)
        self.rows = self.blocks * self.block_size
        # Rows past T are masked, so a window longer than the cache reads the whole cache.
        self.window = min(visibility.local_window, self.rows)
        register_rotary(self, attn)
        register_packed_qkv(self, attn)

    def cache_layout(self) -> CacheLayout:
        """How the runtime allocates this layer's buffers: key and value of ``capacity`` rows (whole blocks), of
        which the first ``tokens`` hold tokens, and the block bounds; a decode step reads at most ``keys_read``
        token rows and ``summary_rows`` block bounds."""
        bounds = ExtraBuffer(BOUNDS, (self.kv_heads, self.blocks, 2 * self.head_dim), "float32")
        return CacheLayout(self.kv_heads, self.rows, self.head_dim, "float32", ring=False,
                           max_positions=self.max_length, tokens=self.max_length, keys_read=self.keys_read(),
                           summary_rows=self.blocks, extra=(bounds,))

    def local_block_counts(self) -> tuple[int, int]:
        """Blocks a decode step reads for the sinks and for the window (which may start inside a block)."""
        window_blocks = min(-(-self.window // self.block_size) + 1, self.blocks)
        return -(-self.sinks // self.block_size), window_blocks

    def keys_read(self) -> int:
        """Cached rows one decode step reads, at most, whatever the context: the blocks holding the sinks and the
        window, and the selected ones (of which it attends to S + W + K*bs)."""
        return (sum(self.local_block_counts()) + min(self.top_blocks, self.blocks)) * self.block_size

    def functions(self) -> list[onnx.FunctionProto]:
        """The layer's body (inlined by the exporter, so the saved graph holds standard ops only)."""
        return onnx_hierarchical_function.hierarchical_function(
            self.num_heads, self.kv_heads, self.head_dim, self.block_size, self.blocks, self.top_blocks,
            self.block_mass, self.has_rotary, self.shared)

    def prepare_step(self, length: int, attention_mask: torch.Tensor) -> HierarchicalStep:
        """The tensors every layer shares for a step of ``length`` new tokens (``attention_mask`` [B, T])."""
        batch, total = attention_mask.shape
        bs, kv_heads, dim = self.block_size, self.kv_heads, self.head_dim
        q_pos = torch.arange(length) + (total - length)  # [L]
        first, end = q_pos[0], q_pos[-1] + 1  # P, T as tensors
        cos, sin = rope_angles.cos_sin(q_pos, self.inv_freq64, self.rotary_scaling)
        first_block, end_block = first // bs, (end - 1) // bs + 1
        summary_pads = torch.cat((torch.zeros(6, dtype=torch.long), (end_block * bs - end).reshape(1),
                                  torch.zeros(1, dtype=torch.long)))
        row_index = q_pos.reshape(1, 1, -1, 1).expand(batch, kv_heads, length, dim)
        block_index = torch.arange(first_block, end_block).reshape(1, 1, -1, 1).expand(batch, kv_heads, -1, 2 * dim)
        # Decode: the blocks holding the sinks and the window, whole, and which of their rows count.
        scored_blocks = (end // bs).clamp(min(self.top_blocks, self.blocks), self.blocks)
        complete = torch.arange(scored_blocks) < end // bs
        block_mask = torch.where(complete, 0.0, MASKED).reshape(1, 1, 1, -1)
        block_offset = torch.arange(batch * kv_heads).reshape(batch, kv_heads, 1, 1) * self.blocks
        window_start = (end - self.window).clamp_min(0)
        sink_blocks, window_blocks = self.local_block_counts()
        first_window_block = (window_start // bs).clamp_max(self.blocks - window_blocks)
        local = torch.cat((torch.arange(sink_blocks), torch.arange(window_blocks) + first_window_block))
        local_rows = local[:, None] * bs + torch.arange(bs)  # [n, bs]
        is_sink_block = (torch.arange(sink_blocks + window_blocks) < sink_blocks)[:, None]
        local_visible = ((is_sink_block & (local_rows < self.sinks) & (local_rows < window_start))
                         | (~is_sink_block & (local_rows >= window_start) & (local_rows < end)))
        choosers = 1 if self.shared else self.num_heads // kv_heads
        local_shape = (batch, kv_heads, choosers, -1)
        local_mask = torch.where(local_visible, 0.0, MASKED).reshape(1, 1, 1, -1).expand(local_shape)
        row = torch.arange(self.rows).reshape(self.blocks, bs)
        row_mask = torch.where((row >= self.sinks) & (row < window_start), 0.0, MASKED)
        # A chunk: every query's complete blocks, and the keys it always sees.
        query, key = q_pos[:, None], torch.arange(total)[None, :]
        prompt_complete = (torch.arange(self.blocks) + 1) * bs - 1 <= query  # [L, NB]
        causal = key <= query
        always = causal & (((query - key) < self.window) | (key < self.sinks))
        return HierarchicalStep(
            fast=end - first == 1, cos=cos, sin=sin, rows=torch.arange(length).expand(batch, length),
            write_from=(first_block * bs).reshape(1), write_to=first.reshape(1), summary_pads=summary_pads,
            row_index=row_index, block_index=block_index, scored_blocks=scored_blocks.reshape(1),
            block_mask=block_mask, local_blocks=local.expand(local_shape), block_offset=block_offset,
            local_mask=local_mask, row_mask=row_mask, total=end.reshape(1),
            prompt_block_mask=torch.where(prompt_complete, 0.0, MASKED), key_block=key[0] // bs, causal=causal,
            always=always)

    def attend(self, attn: EdgeAttention, h: torch.Tensor, attention_mask: torch.Tensor,
               past_key: torch.Tensor, past_value: torch.Tensor, step: HierarchicalStep, past_bounds: torch.Tensor):
        batch, length, _ = h.shape
        qkv = h @ self.qkv_weight_T + (self.qkv_bias if self.qkv_bias is not None else 0)  # one MatMul
        buffers = (past_key, past_value, past_bounds)
        output, *presents = torch.onnx.ops.symbolic_multi_out(
            f"{onnx_ring_function.DOMAIN}::HierarchicalRows", (qkv, *buffers, *step.function_inputs()), {},
            dtypes=(qkv.dtype, *(buffer.dtype for buffer in buffers)),
            shapes=((batch, length, self.num_heads * self.head_dim), *(buffer.shape for buffer in buffers)),
            version=onnx_ring_function.VERSION)
        return attn.o_proj(output), *presents
