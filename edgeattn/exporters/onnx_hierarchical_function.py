"""The per-layer body of the ``onnx`` lowering's hierarchical attention (``onnx_hierarchical``), as an ONNX
function that the exporter inlines: standard ops only, one ``If`` per layer.

Dimension legend: B batch, H query heads, Hkv kv heads, R = H / Hkv, L new tokens, D head dim, S sinks,
W local window, bs block size, NB blocks, C = NB * bs token rows, K blocks selected per query head (or per kv head),
P cached tokens before this step, T = P + L.

Decode reads only what it selects: the block bounds (NB rows), then whole blocks, one ``Gather`` per
buffer: those holding the sinks and the local window, and the K selected blocks; a mask keeps each row
counted once (sinks, window, selected). With blocks selected per kv head (``shared``) a kv head's query
heads share one choice, so the blocks are gathered once per kv head ([B, Hkv, N, D]) and ``Attention``
reads them for the whole group; per query head they are gathered R times.
A chunk (a prompt) attends densely with the selection as a mask: its queries each select their own blocks,
and a dense pass over T keys is what a prefill costs anyway.
Everything that depends on the step only (write positions, the blocks and masks of sinks and window) comes
in from ``HierarchicalStep``, computed once for all layers: a layer's decode step runs few, small ops.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxscript
from onnxscript import BOOL, FLOAT, INT64  # noqa: F401 - onnxscript reads the type names
from onnxscript import opset23 as op

from edgeattn.exporters.onnx_ring_function import INLINED

OPSET = op.version
_MASKED = -1e30
_SELECTABLE = -1e29  # a TopK value above this is a complete block's bound, below it the mask's
_LAST = [-1]


def hierarchical_function(heads: int, kv_heads: int, head_dim: int, block_size: int, blocks: int, top_blocks: int,
                          block_mass: float | None, rotary: bool, shared: bool = False):
    """``HierarchicalRows`` for one shape and the two helpers it calls; see ``onnx_hierarchical`` for the buffer
    layout."""
    BLOCK = block_size  # noqa: N806 - onnxscript reads these as constants
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
    # [x, -x] as one MatMul: x @ [I | -I], exact (each output sums one product by +-1 and zeros).
    identity = np.eye(head_dim, dtype=np.float32)
    SIGNED = onnx.numpy_helper.from_array(np.concatenate((identity, -identity), axis=1), "signed")  # noqa: N806

    @onnxscript.script(INLINED, default_opset=op)
    def BlockBounds(q_grouped, bounds):
        """q_grouped [B, Hkv, n, D] (rotated queries), bounds [B, Hkv, NB, 2D] (each block's per-channel key max,
        then minus its min) -> [B, Hkv, n, NB]: an upper bound of q.k over each block's keys (Quest),
        sum_d max(q_d*max_d, q_d*min_d) = relu(q).max + relu(-q).(-min), in one MatMul."""
        signed = op.Relu(op.MatMul(q_grouped, op.Constant(value=SIGNED)))
        return op.MatMul(signed, op.Transpose(bounds, perm=[0, 1, 3, 2]))

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
    def HierarchicalRows(qkv, past_key, past_value, past_bounds, fast, cos, sin, rows, write_from, write_to,
                         summary_pads, row_index, block_index, scored_blocks, block_mask, local_blocks, block_offset,
                         local_mask, row_mask, total, prompt_block_mask, key_block, causal, always):
        """qkv [B, L, (H + 2*Hkv)*D] (the packed projections); past_key/value [B, Hkv, C, D]; past_bounds
        [B, Hkv, NB, 2D]: each block's per-channel key maximum, then minus its minimum. The step's tensors
        (``onnx_hierarchical.HierarchicalStep``) are computed once for all layers. Returns [B, L, H*D] and the
        presents."""
        axis = op.Constant(value_ints=[2])
        zero_f = op.Constant(value_float=0.0)
        masked = op.Constant(value_float=_MASKED)
        all_heads = op.Reshape(qkv, op.Constant(value_ints=[0, 0, ALL_HEADS, HEAD_DIM]))
        q, k, v = op.Split(op.Transpose(all_heads, perm=[0, 2, 1, 3]), op.Constant(value_ints=SPLIT), axis=1)
        if ROTARY:
            q = op.RotaryEmbedding(q, cos, sin, rows)
            k = op.RotaryEmbedding(k, cos, sin, rows)
        # One write per buffer, outside the If (whose outputs onnxruntime would copy, the whole buffer): the new
        # rows, and the bounds of the blocks they touch from those blocks' earlier rows and the new ones.
        block_rows = op.Concat(op.Slice(past_key, write_from, write_to, axis), k, axis=2)  # rows of the touched blocks
        signed_rows = op.Pad(op.MatMul(block_rows, op.Constant(value=SIGNED)), summary_pads,
                             op.Constant(value_float=-3.0e38))  # [x, -x], padded to whole blocks
        per_block = op.Constant(value_ints=[0, KV_HEADS, -1, BLOCK, 2 * HEAD_DIM])
        block_bounds = op.ReduceMax(op.Reshape(signed_rows, per_block), op.Constant(value_ints=[3]), keepdims=0)
        present_key = op.ScatterElements(past_key, row_index, k, axis=2)
        present_value = op.ScatterElements(past_value, row_index, v, axis=2)
        present_bounds = op.ScatterElements(past_bounds, block_index, block_bounds, axis=2)  # [B, Hkv, NB, 2D]
        if fast:
            # Level 1: each query head bounds each block's best score by its keys' per-channel min/max, over the
            # blocks written so far (at least K): [B, Hkv, R, nb].
            q_grouped = op.Reshape(q, op.Constant(value_ints=[0, KV_HEADS, GROUP, HEAD_DIM]))  # [B, Hkv, R, D]
            scored = op.Slice(present_bounds, op.Constant(value_ints=[0]), scored_blocks, axis)
            bound = BlockBounds(q_grouped, scored) + block_mask
            if SHARED:
                bound = op.ReduceMax(bound, axis, keepdims=1)  # [B, Hkv, 1, nb]: a block as its best query head sees it
            # Level 2: whole blocks, one Gather per buffer and chooser: the sinks', the window's, the chosen.
            if MASS:
                chosen, keep = ChosenBlocks(bound)  # [B, Hkv, c, K]; c: R choosers, or 1 shared
            else:
                top, chosen = op.TopK(bound, op.Constant(value_ints=[TOP]), axis=-1, largest=1, sorted=0)
            # The buffers as [B*Hkv*NB, bs*D] blocks; block_offset moves each (batch, kv head)'s ids to its own.
            blocks_read = op.Concat(local_blocks, chosen, axis=-1) + block_offset  # [B, Hkv, c, n]
            as_blocks = op.Constant(value_ints=[-1, BLOCK * HEAD_DIM])
            per_head = op.Constant(value_ints=[0, GATHERED_HEADS, -1, HEAD_DIM])
            keys = op.Reshape(op.Gather(op.Reshape(present_key, as_blocks), blocks_read, axis=0),
                              per_head)  # [B, Hkv*c, n*bs, D]
            values = op.Reshape(op.Gather(op.Reshape(present_value, as_blocks), blocks_read, axis=0), per_head)
            # A chosen block's rows count unless they are sinks or in the window (read there), or it was not kept.
            chosen_mask = op.Gather(row_mask, chosen, axis=0)  # [B, Hkv, c, K, bs]
            if MASS:
                chosen_mask = op.Where(op.Unsqueeze(keep, _LAST), chosen_mask, masked)
            chosen_mask = op.Reshape(chosen_mask, op.Constant(value_ints=[0, KV_HEADS, CHOOSERS, -1]))
            mask = op.Concat(local_mask, chosen_mask, axis=-1)  # [B, Hkv, c, n*bs]
            if SHARED:
                # A kv head's R query heads share its rows and mask: they attend as R queries of one head
                # (onnxruntime wants the mask's query axis spelled out).
                mask = op.Expand(mask, op.Constant(value_ints=[1, 1, GROUP, 1]))
                attended = op.Attention(q_grouped, keys, values, mask, scale=SCALE)  # [B, Hkv, R, D]
            else:
                mask = op.Reshape(mask, op.Constant(value_ints=[0, HEADS, 1, -1]))
                attended = op.Attention(q, keys, values, mask, scale=SCALE)  # [B, H, 1, D]
            output = op.Reshape(attended, op.Constant(value_ints=[0, 1, -1]))  # one token: heads in order
        else:
            # Every query scores every complete block (dense: a chunk pays O(L*T) anyway).
            length = op.Shape(q, start=2, end=3)
            q_grouped = op.Reshape(q, op.Constant(value_ints=[0, KV_HEADS, -1, HEAD_DIM]))  # [B, Hkv, R*L, D]
            bound = BlockBounds(q_grouped, present_bounds)
            heads_length = op.Concat(op.Constant(value_ints=[0, HEADS]), length, op.Constant(value_ints=[-1]), axis=0)
            if SHARED:  # the largest bound of a kv head's query heads, for each of them
                grouped = op.Reshape(bound, op.Concat(op.Constant(value_ints=[0, KV_HEADS, GROUP]), length,
                                                      op.Constant(value_ints=[-1]), axis=0))  # [B, Hkv, R, L, NB]
                bound = op.Expand(op.ReduceMax(grouped, axis, keepdims=1), op.Shape(grouped))
            bound = op.Reshape(bound, heads_length) + prompt_block_mask  # [B, H, L, NB]
            chosen, keep = ChosenBlocks(bound)  # [B, H, L, K]
            none_kept = op.Expand(op.Constant(value=onnx.helper.make_tensor("no", onnx.TensorProto.BOOL, [], [False])),
                                  op.Shape(bound))
            kept_blocks = op.ScatterElements(none_kept, chosen, keep, axis=-1)  # [B, H, L, NB]
            selected = op.Gather(kept_blocks, key_block, axis=3)  # [B, H, L, T], bool
            mask = op.Where(op.Or(always, op.And(causal, selected)), zero_f, masked)
            keys = op.Slice(present_key, op.Constant(value_ints=[0]), total, axis)  # [B, Hkv, T, D]
            values = op.Slice(present_value, op.Constant(value_ints=[0]), total, axis)
            attended = op.Attention(q, keys, values, mask, scale=SCALE)  # [B, H, L, D]
            output = op.Reshape(op.Transpose(attended, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))
        return output, present_key, present_value, present_bounds

    return [BlockBounds.to_function_proto(), ChosenBlocks.to_function_proto(), HierarchicalRows.to_function_proto()]
