"""Hierarchical block-sparse attention on standard ONNX ops: decode reads only the blocks it selects.

Dimension legend: B batch, L new tokens, H query heads, Hkv kv heads, D head dim, S sinks, W local window,
bs block size, NB = ceil(max_length / bs) blocks, C = NB * bs token rows, K = min(top_blocks, NB),
P cached tokens before this step, T = P + L.

The model (``HierarchicalVisibility``) scores every complete block for each query head with an upper bound
of q.k from the block keys' per-channel min/max, keeps the best K (or the fewest reaching ``block_mass``),
and attends to them, the sinks and the local window. Recomputing the min/max of every block each step
costs what full attention costs, so the summaries live in the cache, in two buffers of their own beside the
keys and values (``block_max``, ``block_min``: [B, Hkv, NB, D], bound like them), updated only for the
blocks being written. A step scores them where they lie: no copy of the summaries per step.

A decode step (``onnx_hierarchical_function``'s ``then`` branch) then costs O(NB*D) to score the blocks and
O(S + W + K*bs) to attend: a fixed token budget, whatever the context. Each query head's rows (sinks,
window, selected blocks) are read with one ``GatherND`` per buffer; with blocks selected per kv head
(``block_select`` kv-head) each kv head's rows are read once for all its query heads. A chunk (a prompt) attends densely over
its T keys with the selection as a mask, as the model does. The cache writes (new rows and the summaries of
the blocks they touch) sit outside the layer's ``If``, whose outputs onnxruntime copies: one in-place
``ScatterElements`` per buffer.
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
SUMMARIES = ("block_max", "block_min")  # the extra buffers' kinds: each block's per-channel key max and min


@dataclass(frozen=True)
class HierarchicalStep:
    """Per-step tensors shared by every layer (computed once in the graph)."""

    fast: torch.Tensor  # bool []: decode (L = 1), the sparse branch
    cos: torch.Tensor  # [L, D/2] rotation of the new tokens at their positions
    sin: torch.Tensor
    rows: torch.Tensor  # [B, L] row n of the new tokens reads row n of cos/sin
    block_mask: torch.Tensor  # [1, 1, 1, NB] decode: 0 for complete blocks, masked for the rest
    window_start: torch.Tensor  # [1] decode: the first of the W window rows read, max(0, T - W)
    local_mask: torch.Tensor  # [1, 1, 1, S+W] decode: sinks (unless in the window) and written window rows
    q_pos: torch.Tensor  # [L] absolute positions of the new tokens

    def function_inputs(self) -> tuple[torch.Tensor, ...]:
        return (self.fast, self.cos, self.sin, self.rows, self.block_mask, self.window_start, self.local_mask,
                self.q_pos)


class HierarchicalAttentionLowering(LoweringBase):
    """Block summaries in the cache, TopK, GatherND of the rows read and one ``Attention`` per layer."""

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
        which the first ``tokens`` hold tokens, and the two summary buffers; a decode step reads at most
        ``keys_read`` token rows and ``summary_rows`` summaries."""
        summaries = tuple(ExtraBuffer(kind, (self.kv_heads, self.blocks, self.head_dim), "float32")
                          for kind in SUMMARIES)
        return CacheLayout(self.kv_heads, self.rows, self.head_dim, "float32", ring=False,
                           max_positions=self.max_length, tokens=self.max_length, keys_read=self.keys_read(),
                           summary_rows=self.blocks, extra=summaries)

    def keys_read(self) -> int:
        """Keys one decode step attends to, at most, whatever the context: sinks, window and selected blocks."""
        return self.sinks + self.window + min(self.top_blocks, self.blocks) * self.block_size

    def functions(self) -> list[onnx.FunctionProto]:
        """The layer's body (inlined by the exporter, so the saved graph holds standard ops only)."""
        return onnx_hierarchical_function.hierarchical_function(
            self.num_heads, self.kv_heads, self.head_dim, self.sinks, self.window, self.block_size, self.blocks,
            self.top_blocks, self.block_mass, self.has_rotary, self.shared)

    def prepare_step(self, length: int, attention_mask: torch.Tensor) -> HierarchicalStep:
        """The tensors every layer shares for a step of ``length`` new tokens (``attention_mask`` [B, T])."""
        batch, total = attention_mask.shape
        q_pos = torch.arange(length) + (total - length)  # [L]
        first, end = q_pos[0], q_pos[-1] + 1  # P, T as tensors
        cos, sin = rope_angles.cos_sin(q_pos, self.inv_freq64, self.rotary_scaling)
        complete = torch.arange(self.blocks) < end // self.block_size
        block_mask = torch.where(complete, 0.0, MASKED).reshape(1, 1, 1, self.blocks)
        window_start = (end - self.window).clamp_min(0)
        sink = torch.arange(self.sinks)
        window_row = torch.arange(self.window) + window_start
        local = torch.cat(((sink < end) & (sink < window_start), window_row < end))
        return HierarchicalStep(end - first == 1, cos, sin, torch.arange(length).expand(batch, length), block_mask,
                                window_start.reshape(1), torch.where(local, 0.0, MASKED).reshape(1, 1, 1, -1), q_pos)

    def attend(self, attn: EdgeAttention, h: torch.Tensor, attention_mask: torch.Tensor,
               past_key: torch.Tensor, past_value: torch.Tensor, step: HierarchicalStep,
               past_max: torch.Tensor, past_min: torch.Tensor):
        batch, length, _ = h.shape
        qkv = h @ self.qkv_weight_T + (self.qkv_bias if self.qkv_bias is not None else 0)  # one MatMul
        buffers = (past_key, past_value, past_max, past_min)
        output, *presents = torch.onnx.ops.symbolic_multi_out(
            f"{onnx_ring_function.DOMAIN}::HierarchicalRows", (qkv, *buffers, *step.function_inputs()), {},
            dtypes=(qkv.dtype, *(buffer.dtype for buffer in buffers)),
            shapes=((batch, length, self.num_heads * self.head_dim), *(buffer.shape for buffer in buffers)),
            version=onnx_ring_function.VERSION)
        return attn.o_proj(output), *presents
