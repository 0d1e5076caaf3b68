"""The per-layer body of the ``onnx`` lowering's hierarchical attention (``onnx_hierarchical``), as an ONNX
function that the exporter inlines: standard ops only, one ``If`` per layer.

Dimension legend: B batch, H query heads, Hkv kv heads, R = H / Hkv, L new tokens, D head dim, S sinks,
W local window, bs block size, NB blocks, C = NB * bs token rows, K blocks selected per query head (or per kv head),
P cached tokens before this step, T = P + L.

Decode reads only what it selects: the block summaries (NB rows), the sinks, the local window and the K
selected blocks, one row ``GatherND`` per buffer. With blocks selected per kv head (``shared``) a kv head's
query heads share one choice, so the rows are gathered once per kv head ([B, Hkv, N, D]) and ``Attention``
reads them for the whole group; per query head they are gathered R times.
A chunk (a prompt) attends densely with the selection as a mask: its queries each select their own blocks,
and a dense pass over T keys is what a prefill costs anyway.
"""

from __future__ import annotations

import onnx
import onnxscript
from onnxscript import BOOL, FLOAT, INT64  # noqa: F401 - onnxscript reads the type names
from onnxscript import opset23 as op

from edgeattn.exporters.onnx_ring_function import INLINED

OPSET = op.version
_MASKED = -1e30
_SELECTABLE = -1e29  # a TopK value above this is a complete block's bound, below it the mask's
_LAST = [-1]


def hierarchical_function(heads: int, kv_heads: int, head_dim: int, sinks: int, window: int, block_size: int,
                          blocks: int, top_blocks: int, block_mass: float | None, rotary: bool, shared: bool = False):
    """``HierarchicalRows`` for one shape and the two helpers it calls; see ``onnx_hierarchical`` for the buffer
    layout."""
    SINKS = sinks  # noqa: N806 - onnxscript reads these as constants
    WINDOW = window  # noqa: N806
    HAS_SINKS = sinks > 0  # noqa: N806
    SINK_ROWS = list(range(sinks))  # noqa: N806
    BLOCK = block_size  # noqa: N806
    BLOCKS = blocks  # noqa: N806
    TOP = min(top_blocks, blocks)  # noqa: N806
    MASS = block_mass is not None  # noqa: N806
    BLOCK_MASS = block_mass if block_mass is not None else 1.0  # noqa: N806
    ROTARY = rotary  # noqa: N806
    SCALE = head_dim**-0.5  # noqa: N806
    ALL_HEADS = heads + 2 * kv_heads  # noqa: N806
    SPLIT = [heads, kv_heads, kv_heads]  # noqa: N806
    HEADS = heads  # noqa: N806
    KV_HEADS = kv_heads  # noqa: N806
    GROUP = heads // kv_heads  # noqa: N806
    HEAD_DIM = head_dim  # noqa: N806
    SHARED = shared  # noqa: N806 - blocks chosen per kv head
    CHOOSERS = 1 if shared else heads // kv_heads  # noqa: N806 - selections per kv head
    GATHERED_HEADS = kv_heads if shared else heads  # noqa: N806 - heads of the gathered keys

    @onnxscript.script(INLINED, default_opset=op)
    def BlockBounds(q_grouped, block_max, block_min):
        """q_grouped [B, Hkv, n, D] (rotated queries), block_max/min [B, Hkv, NB, D] -> [B, Hkv, n, NB]: an upper bound
        of q.k over each block's keys, sum_d max(q_d*max_d, q_d*min_d) (Quest)."""
        zero_f = op.Constant(value_float=0.0)
        return op.Add(op.MatMul(op.Max(q_grouped, zero_f), op.Transpose(block_max, perm=[0, 1, 3, 2])),
                      op.MatMul(op.Min(q_grouped, zero_f), op.Transpose(block_min, perm=[0, 1, 3, 2])))

    @onnxscript.script(INLINED, default_opset=op)
    def ChosenBlocks(bound):
        """bound [..., NB] (blocks that may not be chosen masked) -> the K best blocks [..., K] and which of them are
        kept: complete, and with block_mass within the fewest whose estimated attention mass reaches it."""
        top, chosen = op.TopK(bound, op.Constant(value_ints=[TOP]), axis=-1, largest=1, sorted=1)
        keep = op.Greater(top, op.Constant(value_float=_SELECTABLE))
        if MASS:
            total = op.ReduceLogSumExp(bound * op.Constant(value_float=SCALE), op.Constant(value_ints=_LAST), keepdims=1)
            mass = op.Exp(top * op.Constant(value_float=SCALE) - total)  # softmax of the scaled bounds
            before = op.CumSum(mass, op.Constant(value_int=-1), exclusive=1)
            keep = op.And(keep, op.Less(before, op.Constant(value_float=BLOCK_MASS)))
        return chosen, keep

    @onnxscript.script(INLINED, default_opset=op)
    def HierarchicalRows(qkv, past_key, past_value, past_max, past_min, fast, cos, sin, rows, block_mask,
                         window_start, local_mask, q_pos):
        """qkv [B, L, (H + 2*Hkv)*D] (the packed projections); past_key/value [B, Hkv, C, D]; past_max/min
        [B, Hkv, NB, D]: each block's per-channel key maximum and minimum; fast bool [] (L = 1); cos/sin
        [L, D/2] and rows [B, L]: the new tokens' rotation; q_pos [L]. Decode inputs: block_mask [1, 1, 1, NB]
        (0 for complete blocks, else masked), window_start [1] (first of the W window rows read), local_mask
        [1, 1, 1, S+W]. Returns [B, L, H*D] and the presents."""
        axis = op.Constant(value_ints=[2])
        zero = op.Constant(value_int=0)
        one = op.Constant(value_int=1)
        block = op.Constant(value_int=BLOCK)
        zero_f = op.Constant(value_float=0.0)
        batch_length = op.Shape(qkv, start=0, end=2)
        all_heads = op.Reshape(qkv, op.Concat(batch_length, op.Constant(value_ints=[ALL_HEADS, HEAD_DIM]), axis=0))
        q, k, v = op.Split(op.Transpose(all_heads, perm=[0, 2, 1, 3]), op.Constant(value_ints=SPLIT), axis=1)
        if ROTARY:
            q = op.RotaryEmbedding(q, cos, sin, rows)
            k = op.RotaryEmbedding(k, cos, sin, rows)
        # One write per buffer, outside the If (whose outputs onnxruntime would copy, the whole buffer): the new
        # rows, and the summaries of the blocks they touch from those blocks' earlier rows and the new ones.
        first = op.Gather(q_pos, zero)
        end = op.Gather(q_pos, op.Constant(value_int=-1)) + one
        first_block = op.Div(first, block)
        end_block = op.Div(end - one, block) + one
        earlier_keys = op.Slice(past_key, op.Unsqueeze(first_block * block, [0]), op.Unsqueeze(first, [0]), axis)
        block_rows = op.Concat(earlier_keys, k, axis=2)  # rows first_block*bs .. T-1
        padding = op.Concat(op.Constant(value_ints=[0, 0, 0, 0, 0, 0]), op.Unsqueeze(end_block * block - end, [0]),
                            op.Constant(value_ints=[0]), axis=0)
        per_block = op.Constant(value_ints=[0, KV_HEADS, -1, BLOCK, HEAD_DIM])
        reduce_rows = op.Constant(value_ints=[3])
        block_max = op.ReduceMax(op.Reshape(op.Pad(block_rows, padding, op.Constant(value_float=-3.0e38)), per_block),
                                 reduce_rows, keepdims=0)  # [B, Hkv, nb, D]
        block_min = op.ReduceMin(op.Reshape(op.Pad(block_rows, padding, op.Constant(value_float=3.0e38)), per_block),
                                 reduce_rows, keepdims=0)
        as_rows = op.Constant(value_ints=[1, 1, -1, 1])
        index = op.Expand(op.Reshape(q_pos, as_rows), op.Shape(k))
        present_key = op.ScatterElements(past_key, index, k, axis=2)
        present_value = op.ScatterElements(past_value, index, v, axis=2)
        block_index = op.Expand(op.Reshape(op.Range(first_block, end_block, one), as_rows), op.Shape(block_max))
        all_max = op.ScatterElements(past_max, block_index, block_max, axis=2)  # [B, Hkv, NB, D]
        all_min = op.ScatterElements(past_min, block_index, block_min, axis=2)
        if fast:
            # Level 1: each query head bounds each block's best score by its keys' per-channel min/max.
            q_grouped = op.Reshape(q, op.Constant(value_ints=[0, KV_HEADS, GROUP, HEAD_DIM]))  # [B, Hkv, R, D]
            bound = BlockBounds(q_grouped, all_max, all_min) + block_mask  # [B, Hkv, R, NB]
            if SHARED:
                bound = op.ReduceMax(bound, axis, keepdims=1)  # [B, Hkv, 1, NB]: a block as its best query head sees it
            chosen, keep = ChosenBlocks(bound)  # [B, Hkv, c, K]; c: R choosers, or 1 shared
            # Level 2: one row gather per buffer, per chooser: the sinks, the W window rows, the chosen blocks.
            chosen_rows = op.Unsqueeze(chosen * block, _LAST) + op.Range(zero, block, one)  # [B, Hkv, c, K, bs]
            position = op.Reshape(chosen_rows, op.Constant(value_ints=[0, KV_HEADS, CHOOSERS, -1]))  # [B, Hkv, c, K*bs]
            local = op.Range(window_start, window_start + op.Constant(value_ints=[WINDOW]), one)
            if HAS_SINKS:
                local = op.Concat(op.Constant(value_ints=SINK_ROWS), local, axis=0)  # [S+W]
            local_shape = op.Concat(op.Shape(position, start=0, end=3), op.Shape(local), axis=0)
            read = op.Concat(op.Expand(local, local_shape), position, axis=-1)  # [B, Hkv, c, S+W+K*bs]
            row_index = op.Unsqueeze(op.Reshape(read, op.Constant(value_ints=[0, KV_HEADS, -1])), _LAST)
            per_head = op.Constant(value_ints=[0, GATHERED_HEADS, -1, HEAD_DIM])
            keys = op.Reshape(op.GatherND(present_key, row_index, batch_dims=2), per_head)  # [B, Hkv*c, S+W+K*bs, D]
            values = op.Reshape(op.GatherND(present_value, row_index, batch_dims=2), per_head)
            # A chosen row counts unless it is a sink or in the window (read there) or its block was not kept.
            counted = op.And(op.And(op.GreaterOrEqual(chosen_rows, op.Constant(value_int=SINKS)),
                                    op.Less(chosen_rows, window_start)), op.Unsqueeze(keep, _LAST))
            chosen_mask = op.Where(counted, zero_f, op.Constant(value_float=_MASKED))  # [B, Hkv, c, K, bs]
            if SHARED:  # the group's query heads share the mask as they share the rows
                chosen_mask = op.Expand(chosen_mask, op.Constant(value_ints=[1, 1, GROUP, 1, 1]))
            chosen_mask = op.Reshape(chosen_mask, op.Constant(value_ints=[0, HEADS, 1, -1]))
            mask_shape = op.Concat(op.Shape(q, start=0, end=3), op.Shape(local_mask, start=3), axis=0)
            mask = op.Concat(op.Expand(local_mask, mask_shape), chosen_mask, axis=-1)  # [B, H, 1, S+W+K*bs]
            attended = op.Attention(q, keys, values, mask, scale=SCALE)  # [B, H, 1, D]; GQA when shared
        else:
            # Every query scores every complete block (dense: a chunk pays O(L*T) anyway).
            length = op.Shape(q_pos)
            q_grouped = op.Reshape(q, op.Constant(value_ints=[0, KV_HEADS, -1, HEAD_DIM]))  # [B, Hkv, R*L, D]
            bound = BlockBounds(q_grouped, all_max, all_min)
            heads_length = op.Concat(op.Constant(value_ints=[0, HEADS]), length, op.Constant(value_ints=[-1]), axis=0)
            if SHARED:  # the largest bound of a kv head's query heads, for each of them
                grouped = op.Reshape(bound, op.Concat(op.Constant(value_ints=[0, KV_HEADS, GROUP]), length,
                                                      op.Constant(value_ints=[-1]), axis=0))  # [B, Hkv, R, L, NB]
                bound = op.Expand(op.ReduceMax(grouped, axis, keepdims=1), op.Shape(grouped))
            bound = op.Reshape(bound, heads_length)  # [B, H, L, NB]
            block_id = op.Range(zero, op.Constant(value_int=BLOCKS), one)
            query = op.Unsqueeze(q_pos, [1])  # [L, 1]
            complete = op.LessOrEqual((block_id + one) * block - one, query)  # [L, NB]
            bound = op.Where(complete, bound, op.Constant(value_float=_MASKED))
            chosen, keep = ChosenBlocks(bound)  # [B, H, L, K]
            none_kept = op.Expand(op.Constant(value=onnx.helper.make_tensor("no", onnx.TensorProto.BOOL, [], [False])),
                                  op.Shape(bound))
            kept_blocks = op.ScatterElements(none_kept, chosen, keep, axis=-1)  # [B, H, L, NB]
            key_position = op.Range(zero, end, one)  # [T]
            selected = op.Gather(kept_blocks, op.Div(key_position, block), axis=3)  # [B, H, L, T], bool
            key = op.Unsqueeze(key_position, [0])
            always = op.Or(op.Less(query - key, op.Constant(value_int=WINDOW)),
                           op.Less(key, op.Constant(value_int=SINKS)))
            visible = op.And(op.LessOrEqual(key, query), op.Or(always, selected))
            mask = op.Where(visible, zero_f, op.Constant(value_float=_MASKED))
            keys = op.Slice(present_key, op.Constant(value_ints=[0]), op.Unsqueeze(end, [0]), axis)  # [B, Hkv, T, D]
            values = op.Slice(present_value, op.Constant(value_ints=[0]), op.Unsqueeze(end, [0]), axis)
            attended = op.Attention(q, keys, values, mask, scale=SCALE)  # [B, H, L, D]
        output = op.Reshape(op.Transpose(attended, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))
        return output, present_key, present_value, all_max, all_min

    return [BlockBounds.to_function_proto(), ChosenBlocks.to_function_proto(), HierarchicalRows.to_function_proto()]
