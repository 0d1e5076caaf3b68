"""The per-layer body of the ``onnx`` lowering's ring (``onnx_ring``), as an ONNX function that the exporter
inlines: standard ops only, one ``If`` per layer.

Dimension legend: B batch, H query heads, Hkv kv heads, L new tokens, D head dim, S sinks,
W window, C = S + W ring slots, P cached tokens before this step, T = P + L.

Written with onnxscript rather than traced from PyTorch: ``torch.cond`` re-traces both
branches for every layer (minutes for a 30-layer model), while a function is written once
and inlined into every layer's call site after export (``inline_ring_functions``).
What does not depend on the layer and the decode branch reads (its mask, scatter indices,
RoPE tables) is computed once per step in the main graph and comes in as inputs; what only
the wrapped-chunk branch reads is computed there, so decode never pays for it.
"""

from __future__ import annotations

import onnx
import onnx.inliner
import onnxscript
from onnxscript import BOOL, DOUBLE, FLOAT, INT64  # noqa: F401 - onnxscript reads the type names
from onnxscript import opset23 as op

from edgeattn.exporters import edgeattn_functions

DOMAIN = "edgeattn.inlined"  # never in a saved model: inlined at export
VERSION = 1
OPSET = op.version
INLINED = onnxscript.values.Opset(DOMAIN, VERSION)
_MASKED = -1e30
_LAST = [-1]
_END = [1 << 62]
EncodeKV, DecodeKV = edgeattn_functions.EncodeKV, edgeattn_functions.DecodeKV  # the signature; a model
# carries the codec variant of its cache (``edgeattn_functions.function_protos``)


@onnxscript.script(INLINED, default_opset=op)
def WriteSlots(buffer, rows, slots):
    """buffer [B, Hkv, C+S, D] with rows [B, Hkv, n, D] written at slots [n]."""
    index = op.Expand(op.Reshape(slots, op.Constant(value_ints=[1, 1, -1, 1])), op.Shape(rows))
    return op.ScatterElements(buffer, index, rows, axis=2)


@onnxscript.script(INLINED, default_opset=op)
def PositionsRotated(x, positions, inv_freq, scaling: float):
    """x [B, heads, n, D] with row i rotated at positions[i] [n] (angles in float64, as ``rope_angles``)."""
    angles = op.Unsqueeze(op.Cast(positions, to=DOUBLE.dtype), _LAST) * inv_freq  # [n, D/2]
    scale = op.Constant(value_float=scaling)
    cos = op.Cast(op.Cos(angles), to=FLOAT.dtype) * scale
    sin = op.Cast(op.Sin(angles), to=FLOAT.dtype) * scale
    rows = op.Range(op.Constant(value_int=0), op.Squeeze(op.Shape(x, start=2, end=3)), op.Constant(value_int=1))
    ids = op.Expand(op.Unsqueeze(rows, [0]), op.Concat(op.Shape(x, start=0, end=1), op.Shape(rows), axis=0))
    return op.RotaryEmbedding(x, cos, sin, ids)


def ring_function(heads: int, kv_heads: int, head_dim: int, sinks: int, window: int, rotary: bool,
                  rotary_scaling: float):
    """``SinkWindowRing`` for one ring shape; see ``onnx_ring`` for the buffer layout and the two branches."""
    RING = sinks + window  # noqa: N806 - onnxscript reads these as constants
    SINKS = sinks  # noqa: N806
    WINDOW = window  # noqa: N806
    HAS_SINKS = sinks > 0  # noqa: N806
    ROTARY = rotary  # noqa: N806
    SCALE = head_dim**-0.5  # noqa: N806
    ROTARY_SCALING = rotary_scaling  # noqa: N806
    ALL_HEADS = heads + 2 * kv_heads  # noqa: N806
    SPLIT = [heads, kv_heads, kv_heads]  # noqa: N806
    HEAD_DIM = head_dim  # noqa: N806

    @onnxscript.script(INLINED, default_opset=op)
    def SinkWindowRing(qkv, past_key, past_value, fast, mask, key_index, value_index, cos_shift, sin_shift,
                       sink_rows, q_pos, key_slot, value_slot, cos, sin, rows, inv_freq):
        """qkv [B, L, (H + 2*Hkv)*D] (the packed projections); past [B, Hkv, C+S, D]; fast bool []; then-branch
        inputs (L = 1): mask [1, C+S], key_index [B, Hkv, S+1, D], value_index [B, Hkv, 1, D], cos/sin_shift
        [S, D/2], sink_rows [B, S] (zeros); both: cos/sin [L, D/2] and rows [B, L] (the new tokens' rotation);
        else-branch inputs: q_pos, key_slot, value_slot [L], inv_freq [D/2]. Returns [B, L, H*D] and the presents."""
        ring = op.Constant(value_ints=[RING])
        sink_count = op.Constant(value_ints=[SINKS])
        axis = op.Constant(value_ints=[2])
        if fast:
            # One new token: [B, 1, (H + 2*Hkv)*D] is already [B, H + 2*Hkv, 1, D] in memory (no Transpose).
            q, k, v = op.Split(op.Reshape(qkv, op.Constant(value_ints=[0, ALL_HEADS, 1, HEAD_DIM])),
                               op.Constant(value_ints=SPLIT), axis=1)
            if ROTARY:
                q = op.RotaryEmbedding(q, cos, sin, rows)
                k = op.RotaryEmbedding(k, cos, sin, rows)
            if HAS_SINKS:
                kept = op.Slice(past_key, ring, op.Constant(value_ints=[RING + SINKS]), axis)  # rotated at j
                if ROTARY:
                    kept = op.RotaryEmbedding(kept, cos_shift, sin_shift, sink_rows)  # on by e
                present_key = op.ScatterElements(past_key, key_index, op.Concat(kept, k, axis=2), axis=2)
            else:
                present_key = op.ScatterElements(past_key, key_index, k, axis=2)
            present_value = op.ScatterElements(past_value, value_index, v, axis=2)
            attended = op.Attention(q, present_key, present_value, mask, scale=SCALE)  # [B, H, 1, D]
            output = op.Reshape(attended, op.Constant(value_ints=[0, 1, -1]))
        else:
            batch_length = op.Shape(qkv, start=0, end=2)
            all_heads = op.Reshape(qkv, op.Concat(batch_length, op.Constant(value_ints=[ALL_HEADS, HEAD_DIM]), axis=0))
            q, k_rot, v = op.Split(op.Transpose(all_heads, perm=[0, 2, 1, 3]), op.Constant(value_ints=SPLIT), axis=1)
            if ROTARY:
                q_rot = op.RotaryEmbedding(q, cos, sin, rows)
                k_rot = op.RotaryEmbedding(k_rot, cos, sin, rows)
            else:
                q_rot = op.Identity(q)
            zero = op.Constant(value_int=0)
            one = op.Constant(value_int=1)
            first = op.Gather(q_pos, zero)
            end = op.Gather(q_pos, op.Constant(value_int=-1)) + one
            length = op.Shape(q_pos)
            query = op.Unsqueeze(q_pos, [1])  # [L, 1]
            win = op.Constant(value_int=WINDOW)
            # Window slots as they were (the copy below), then the new tokens: [L, W+L].
            slot = op.Range(op.Constant(value_int=SINKS), op.Constant(value_int=RING), one)
            latest = slot + op.Div(op.Max(first - one - slot, zero), win) * win
            old = op.And(op.Unsqueeze(op.Less(slot, first), [0]), op.Less(query - op.Unsqueeze(latest, [0]), win))
            token = op.Unsqueeze(q_pos, [0])
            new = op.And(op.And(op.GreaterOrEqual(token, op.Constant(value_int=SINKS)), op.LessOrEqual(token, query)),
                         op.Less(query - token, win))
            rest = op.Where(op.Concat(old, new, axis=1), op.Constant(value_float=0.0),
                            op.Constant(value_float=_MASKED))
            batch_heads = op.Shape(q, start=0, end=2)
            rest = op.Expand(rest, op.Concat(batch_heads, length, op.Shape(rest, start=1, end=2), axis=0))
            keys = op.Concat(op.Slice(past_key, sink_count, ring, axis), k_rot, axis=2)
            values = op.Concat(op.Slice(past_value, sink_count, ring, axis), v, axis=2)
            if HAS_SINKS:
                j = op.Range(zero, op.Constant(value_int=SINKS), one)
                source = op.Min(op.Where(op.Less(j, first), j, op.Constant(value_int=SINKS) + j - first),
                                op.Constant(value_int=SINKS) - one + op.Squeeze(length))
                sink_keys = op.Gather(op.Concat(op.Slice(past_key, ring, op.Constant(value_ints=[RING + SINKS]), axis),
                                                k_rot, axis=2), source, axis=2)  # [B, Hkv, S, D], rotated at j
                sink_values = op.Gather(op.Concat(op.Slice(past_value, op.Constant(value_ints=[0]), sink_count, axis),
                                                  v, axis=2), source, axis=2)
                if ROTARY:
                    # Each query at its in-cache position clamped to C - 1 (StreamingLLM's view of the sinks).
                    shift = op.Max(first - op.Constant(value_int=RING), zero)
                    clamped = op.Min(q_pos - shift, op.Constant(value_int=RING - 1))
                    q_vs_sinks = PositionsRotated(q, clamped, inv_freq, scaling=ROTARY_SCALING)
                else:
                    q_vs_sinks = op.Identity(q)
                grouped = op.Concat(op.Shape(sink_keys, start=0, end=2), op.Constant(value_ints=[-1]),
                                    op.Shape(q, start=3, end=4), axis=0)
                scores = op.MatMul(op.Reshape(q_vs_sinks, grouped), op.Transpose(sink_keys, perm=[0, 1, 3, 2]))
                scores = op.Reshape(scores, op.Concat(batch_heads, length, sink_count, axis=0))  # [B, H, L, S]
                seen = op.And(op.Less(op.Unsqueeze(j, [0]), end), op.LessOrEqual(op.Unsqueeze(j, [0]), query))
                sink_bias = op.Where(seen, scores * op.Constant(value_float=SCALE), op.Constant(value_float=_MASKED))
                rest = op.Concat(sink_bias, rest, axis=-1)
                keys = op.Concat(op.ConstantOfShape(op.Shape(sink_keys)), keys, axis=2)  # sink scores: the mask's
                values = op.Concat(sink_values, values, axis=2)
            attended = op.Attention(q_rot, keys, values, rest, scale=SCALE)  # [B, H, L, D]
            output = op.Reshape(op.Transpose(attended, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))
            # Each new token's slot takes its row from the copy; tokens that share a slot write the last one's.
            column = op.Range(zero, op.Squeeze(length), one)
            last_same_slot = column + op.Div(op.Squeeze(length) - one - column, win) * win
            source_column = op.Constant(value_int=RING) + op.Where(
                op.Less(q_pos, op.Constant(value_int=SINKS)), column, last_same_slot)
            present_key = WriteSlots(past_key, op.Gather(keys, source_column, axis=2), key_slot)
            present_value = WriteSlots(past_value, op.Gather(values, source_column, axis=2), value_slot)
        return output, present_key, present_value

    return SinkWindowRing.to_function_proto()


def codec_ring_function(heads: int, kv_heads: int, head_dim: int, sinks: int, window: int, rotary: bool,
                        int8_channel: bool):
    """``CodecRing``: the ring of a cache that stores codes of unrotated keys (fp16, int8/int4 per channel or
    per token, ``edgeattn_functions``' codecs), rotated on read; see ``onnx_ring.CodecRingLowering``."""
    RING = sinks + window  # noqa: N806 - onnxscript reads these as constants
    SINKS = sinks  # noqa: N806
    WINDOW = window  # noqa: N806
    HAS_SINKS = sinks > 0  # noqa: N806
    SCALE = head_dim**-0.5  # noqa: N806
    ROTARY = rotary  # noqa: N806
    ALL_HEADS = heads + 2 * kv_heads  # noqa: N806
    SPLIT = [heads, kv_heads, kv_heads]  # noqa: N806
    HEAD_DIM = head_dim  # noqa: N806
    INT8_CHANNEL = int8_channel  # noqa: N806

    @onnxscript.script(INLINED, default_opset=op)
    def CodecRing(qkv, past_key, past_value, fast, mask, cos_slots, sin_slots, slot_rows, write_index, q_pos, slot,
                  cos, sin, rows, inv_freq, batch_zeros, k_scale, v_scale, rotary_scaling: float):
        """qkv [B, L, (H + 2*Hkv)*D] (the packed projections); past [B, Hkv, C, W] codes; then-branch inputs
        (decode, L = 1): mask [1, C], cos/sin_slots [C, D/2] (the slots' rotation once written), slot_rows [B, C],
        write_index [B, Hkv, 1, W]; both: cos/sin [L, D/2] and rows [B, L] (the new tokens' rotation);
        else-branch inputs: q_pos, slot [L], inv_freq [D/2]; batch_zeros [B, Hkv, 1, D]; k/v_scale:
        per-channel scales [1, Hkv, 1, D] (absent for other codecs). Returns [B, L, H*D] and the presents."""
        head_dim = op.Constant(value_ints=[HEAD_DIM])
        if fast:
            # One new token: [B, 1, (H + 2*Hkv)*D] is already [B, H + 2*Hkv, 1, D] in memory (no Transpose).
            q, k, v = op.Split(op.Reshape(qkv, op.Constant(value_ints=[0, ALL_HEADS, 1, HEAD_DIM])),
                               op.Constant(value_ints=SPLIT), axis=1)
            if ROTARY:
                q = op.RotaryEmbedding(q, cos, sin, rows)
            key_rows, value_rows = EncodeKV(k, v, k_scale, v_scale)  # [B, Hkv, 1, W], unrotated keys
            present_key = op.ScatterElements(past_key, write_index, key_rows, axis=2)
            present_value = op.ScatterElements(past_value, write_index, value_rows, axis=2)
            if INT8_CHANNEL:
                # One blocked DequantizeLinear per buffer (block = the whole ring, scales repeated over the
                # batch: x + 0 is x): codes x scale, as DecodeKV.
                keys = op.DequantizeLinear(present_key, op.Add(k_scale, batch_zeros), axis=2, block_size=RING)
                values = op.DequantizeLinear(present_value, op.Add(v_scale, batch_zeros), axis=2, block_size=RING)
            else:
                keys, values = DecodeKV(present_key, present_value, k_scale, v_scale, head_dim)
            if ROTARY:
                keys = op.RotaryEmbedding(keys, cos_slots, sin_slots, slot_rows)
            attended = op.Attention(q, keys, values, mask, scale=SCALE)  # [B, H, 1, D]
            output = op.Reshape(attended, op.Constant(value_ints=[0, 1, -1]))
        else:
            batch_length = op.Shape(qkv, start=0, end=2)
            all_heads = op.Reshape(qkv, op.Concat(batch_length, op.Constant(value_ints=[ALL_HEADS, HEAD_DIM]), axis=0))
            q, k, v = op.Split(op.Transpose(all_heads, perm=[0, 2, 1, 3]), op.Constant(value_ints=SPLIT), axis=1)
            if ROTARY:
                q_rot = op.RotaryEmbedding(q, cos, sin, rows)
            else:
                q_rot = op.Identity(q)
            key_rows, value_rows = EncodeKV(k, v, k_scale, v_scale)  # [B, Hkv, L, W], unrotated keys
            zero = op.Constant(value_int=0)
            one = op.Constant(value_int=1)
            ring = op.Constant(value_int=RING)
            first = op.Gather(q_pos, zero)
            end = op.Gather(q_pos, op.Constant(value_int=-1)) + one
            length = op.Shape(q_pos)
            query = op.Unsqueeze(q_pos, [1])  # [L, 1]
            win = op.Constant(value_int=WINDOW)
            all_key_rows = op.Concat(past_key, key_rows, axis=2)  # [B, Hkv, C+L, W]: the only read of past_key
            all_value_rows = op.Concat(past_value, value_rows, axis=2)
            keys, values = DecodeKV(all_key_rows, all_value_rows, k_scale, v_scale, head_dim)  # [B, Hkv, C+L, D]
            # Absolute position of every column: ring slots as they were, then the new tokens.
            column_slot = op.Range(zero, ring, one)
            latest = column_slot + op.Div(op.Max(first - one - column_slot, zero), win) * win
            if ROTARY:
                held = op.Where(op.Less(column_slot, op.Constant(value_int=SINKS)), column_slot, latest)
                keys = PositionsRotated(keys, op.Concat(held, q_pos, axis=0), inv_freq, scaling=rotary_scaling)
            window_slot = op.Range(op.Constant(value_int=SINKS), ring, one)
            window_held = op.Slice(latest, op.Constant(value_ints=[SINKS]), op.Constant(value_ints=[RING]))
            old = op.And(op.Unsqueeze(op.Less(window_slot, first), [0]),
                         op.Less(query - op.Unsqueeze(window_held, [0]), win))
            token = op.Unsqueeze(q_pos, [0])
            new = op.And(op.And(op.GreaterOrEqual(token, op.Constant(value_int=SINKS)), op.LessOrEqual(token, query)),
                         op.Less(query - token, win))
            rest = op.Where(op.Concat(old, new, axis=1), op.Constant(value_float=0.0),
                            op.Constant(value_float=_MASKED))
            batch_heads = op.Shape(q, start=0, end=2)
            rest = op.Expand(rest, op.Concat(batch_heads, length, op.Shape(rest, start=1, end=2), axis=0))
            sink_count = op.Constant(value_ints=[SINKS])
            axis = op.Constant(value_ints=[2])
            if HAS_SINKS:
                j = op.Range(zero, op.Constant(value_int=SINKS), one)
                source = op.Min(op.Where(op.Less(j, first), j, ring + j - first), ring - one + op.Squeeze(length))
                sink_keys = op.Gather(keys, source, axis=2)  # [B, Hkv, S, D], rotated at j
                sink_values = op.Gather(values, source, axis=2)
                if ROTARY:
                    shift = op.Max(first - ring, zero)
                    clamped = op.Min(q_pos - shift, ring - one)  # in-cache query position clamped to C - 1
                    q_vs_sinks = PositionsRotated(q, clamped, inv_freq, scaling=rotary_scaling)
                else:
                    q_vs_sinks = op.Identity(q)
                grouped = op.Concat(op.Shape(sink_keys, start=0, end=2), op.Constant(value_ints=[-1]),
                                    op.Shape(q, start=3, end=4), axis=0)
                scores = op.MatMul(op.Reshape(q_vs_sinks, grouped), op.Transpose(sink_keys, perm=[0, 1, 3, 2]))
                scores = op.Reshape(scores, op.Concat(batch_heads, length, sink_count, axis=0))  # [B, H, L, S]
                seen = op.And(op.Less(op.Unsqueeze(j, [0]), end), op.LessOrEqual(op.Unsqueeze(j, [0]), query))
                sink_bias = op.Where(seen, scores * op.Constant(value_float=SCALE), op.Constant(value_float=_MASKED))
                rest = op.Concat(sink_bias, rest, axis=-1)
                keys = op.Concat(op.ConstantOfShape(op.Shape(sink_keys)), op.Slice(keys, sink_count, _END, axis),
                                 axis=2)  # sink scores: the mask's
                values = op.Concat(sink_values, op.Slice(values, sink_count, _END, axis), axis=2)
            attended = op.Attention(q_rot, keys, values, rest, scale=SCALE)  # [B, H, L, D]
            output = op.Reshape(op.Transpose(attended, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))
            column = op.Range(zero, op.Squeeze(length), one)
            last_same_slot = column + op.Div(op.Squeeze(length) - one - column, win) * win
            source_column = ring + op.Where(op.Less(q_pos, op.Constant(value_int=SINKS)), column, last_same_slot)
            present_key = WriteSlots(past_key, op.Gather(all_key_rows, source_column, axis=2), slot)
            present_value = WriteSlots(past_value, op.Gather(all_value_rows, source_column, axis=2), slot)
        return output, present_key, present_value

    return CodecRing.to_function_proto()


def helper_functions() -> list[onnx.FunctionProto]:
    return [WriteSlots.to_function_proto(), PositionsRotated.to_function_proto()]


def inline_all_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Inline every model-local function (the lowering's bodies and the codecs they call) and drop their
    domains: the saved model holds standard ops only."""
    domains = {function.domain for function in model.functions}
    if not domains:
        return model
    model_opset = {entry.domain: entry.version for entry in model.opset_import}[""]
    for function in model.functions:  # bodies written at opset 23 use no op whose meaning changed since
        for entry in function.opset_import:
            if entry.domain == "":
                entry.version = model_opset
    inlined = onnx.inliner.inline_local_functions(model)
    del inlined.functions[:]
    imports = [entry for entry in inlined.opset_import if entry.domain not in domains]
    del inlined.opset_import[:]
    inlined.opset_import.extend(imports)
    return inlined
