"""ONNX function bodies of the ``edgeattn``-domain attention ops: their reference semantics.

Dimension legend: B batch, H query heads, Hkv kv heads, R = H / Hkv, L new tokens,
P cached tokens before this step, T = P + L, C cache capacity (slots), W bytes/values
of one cached row (one token of one kv head), D head dim, G key groups, NB blocks,
N keys scored this step (C + L for the ring, T for full caches).

Each attention op is one node per layer in the exported graph; its body below is a
FunctionProto that the model carries (onnxruntime inlines it, a backend may match the
op by domain and name instead). The bodies are written once for every KV codec: they
call ``edgeattn::EncodeKV`` (new keys/values -> cache rows) and ``edgeattn::DecodeKV``
(cache rows -> float), and a model carries the one codec variant it was exported with.

Cache rows, the last axis W of the past/present buffers:

* fp32 / fp16: the D values.
* int8 per-channel: D int8 codes; value = code * scale[kv head, channel].
* int4 per-channel: D/2 bytes, two two's-complement 4-bit codes each, low nibble first.
* per-token (int8: D uint8 codes; int4: D/2 bytes of 4-bit codes, low nibble first),
  followed by fp16 parameters as little-endian bytes: the key row carries the G key
  scales and the value scale, the value row the G key minimums and the value minimum;
  value = code * scale + minimum. Splitting the parameters this way keeps both rows
  the same width and the buffers exactly ``KVCodec.bytes_per_token`` per token.

Invariant that lets a runtime bind present and past to the same memory (onnxruntime's
``ScatterElements`` then skips its copy and writes only the new rows): the past buffers
are read only through one ``Concat``/``Slice`` copy, and no write can land on a row
before that copy is made. The ring takes the rows it writes from the copy itself (a
chunk overwrites slots that its earlier queries still read); full caches write slots
P..T-1, which the copy (slots 0..P-1) does not read.

These are reference bodies: scores are dense and masked (hierarchical attention too);
a native kernel would read only the visible rows.
"""

from __future__ import annotations

import onnx
import onnxscript
from onnxscript import BOOL, FLOAT, FLOAT16, INT8, INT64, UINT8
from onnxscript import opset23 as op

from edgeattn.models.kv_codec import _FP16_TINY, KEY_GROUP

DOMAIN = "edgeattn"
VERSION = 1
OPSET = op.version  # the bodies' default opset
EDGEATTN = onnxscript.values.Opset(DOMAIN, VERSION)

_NEG_INF = float("-inf")
_KEY_GROUP = [KEY_GROUP]
_LAST = [-1]
_TO_END = [1 << 62]
# fp16 <-> bytes by exact float arithmetic (opset 23 has no bit cast). Exponent field e
# (0..30) of |x|: how many of 2^-14 .. 2^15 it reaches; unit[e] = 2^(max(e, 1) - 25) is
# the value of one mantissa step, so |x| = (mantissa + 1024 * (e > 0)) * unit[e].
_FP16_EXPONENT_THRESHOLDS = [2.0**k for k in range(-14, 16)]
_FP16_UNITS = [2.0 ** (max(e, 1) - 25) for e in range(31)]


# ---------------------------------------------------------------------------- shared pieces


@onnxscript.script(EDGEATTN, default_opset=op)
def SplitHeads(x, heads: int):
    """[B, L, heads*D] -> [B, heads, L, D]."""
    count = op.Reshape(op.Constant(value_int=heads), _LAST)
    shape = op.Concat(op.Constant(value_ints=[0, 0]), count, _LAST, axis=0)
    return op.Transpose(op.Reshape(x, shape), perm=[0, 2, 1, 3])


@onnxscript.script(EDGEATTN, default_opset=op)
def Rope(x, positions, inv_freq, rotary_scaling: float):
    """x [B, heads, N, D] rotated by positions [N] (rotate-half layout, as edgeattn.models.rotary).

    Learned-position models pass inv_freq = zeros: rotation by angle 0 is exactly x.
    """
    angles = op.Unsqueeze(op.Cast(positions, to=FLOAT.dtype), _LAST) * inv_freq  # [N, D/2]
    angles = op.Concat(angles, angles, axis=-1)  # [N, D]
    scaling = op.Constant(value_float=rotary_scaling)
    cos = op.Cos(angles) * scaling
    sin = op.Sin(angles) * scaling
    half = op.Shape(inv_freq)
    first = op.Slice(x, op.Constant(value_ints=[0]), half, _LAST)
    second = op.Slice(x, half, _TO_END, _LAST)
    return x * cos + op.Concat(op.Neg(second), first, axis=-1) * sin


@onnxscript.script(EDGEATTN, default_opset=op)
def GroupedScores(q, keys):
    """q [B, H, L, D], keys [B, Hkv, N, D] -> q.k [B, Hkv, R, L, N] (query head h reads kv head h // R)."""
    grouped = op.Concat(op.Shape(keys, start=0, end=2), _LAST, op.Shape(q, start=2, end=4), axis=0)
    q5 = op.Reshape(q, grouped)  # [B, Hkv, R, L, D]
    keys5 = op.Unsqueeze(op.Transpose(keys, perm=[0, 1, 3, 2]), [2])  # [B, Hkv, 1, D, N]
    return op.MatMul(q5, keys5)


@onnxscript.script(EDGEATTN, default_opset=op)
def Attend(scores, mask, values):
    """Softmax over the allowed keys. scores [B, Hkv, R, L, N] (scaled), mask broadcastable to it,
    values [B, Hkv, N, D] -> [B, L, H*D]."""
    probs = op.Softmax(op.Where(mask, scores, op.Constant(value_float=_NEG_INF)), axis=-1)
    out5 = op.MatMul(probs, op.Unsqueeze(values, [2]))  # [B, Hkv, R, L, D]
    heads = op.Concat(op.Shape(out5, start=0, end=1), _LAST, op.Shape(out5, start=3, end=5), axis=0)
    out = op.Transpose(op.Reshape(out5, heads), perm=[0, 2, 1, 3])  # [B, L, H, D]
    return op.Reshape(out, op.Constant(value_ints=[0, 0, -1]))


@onnxscript.script(EDGEATTN, default_opset=op)
def WriteRows(buffer, rows, slots):
    """buffer [B, Hkv, C, W] with rows [B, Hkv, n, W] written at slots [n] (unique)."""
    index = op.Expand(op.Reshape(slots, op.Constant(value_ints=[1, 1, -1, 1])), op.Shape(rows))
    return op.ScatterElements(buffer, index, rows, axis=2)


# ---------------------------------------------------------------------------- codec helpers


@onnxscript.script(EDGEATTN, default_opset=op)
def QuantizeAsymmetric(x, group, levels: float):
    """x [..., D] -> codes [..., D] (floats holding 0..levels), scale and minimum [..., D/group].

    As kv_codec._asymmetric_groups: fp16 minimum, scale measured from it, then rounded to fp16.
    """
    groups = op.Reshape(x, op.Concat(op.Shape(x, end=-1), _LAST, group, axis=0))  # [..., G, group]
    low = op.Cast(op.Cast(op.ReduceMin(groups, _LAST, keepdims=1), to=FLOAT16.dtype), to=FLOAT.dtype)
    high = op.ReduceMax(groups, _LAST, keepdims=1)
    top = op.Constant(value_float=levels)
    spread = op.Max((high - low) / top, op.Constant(value_float=_FP16_TINY))
    scale = op.Cast(op.Cast(spread, to=FLOAT16.dtype), to=FLOAT.dtype)
    codes = op.Clip(op.Round((groups - low) / scale), op.Constant(value_float=0.0), top)
    return op.Reshape(codes, op.Shape(x)), op.Squeeze(scale, _LAST), op.Squeeze(low, _LAST)


@onnxscript.script(EDGEATTN, default_opset=op)
def DequantizeAsymmetric(codes, scale, low):
    """codes [..., D], scale and minimum [..., G] -> codes * scale + minimum per group, [..., D]."""
    grouped = op.Reshape(codes, op.Concat(op.Shape(scale), _LAST, axis=0))  # [..., G, D/G]
    values = grouped * op.Unsqueeze(scale, _LAST) + op.Unsqueeze(low, _LAST)
    return op.Reshape(values, op.Shape(codes))


@onnxscript.script(EDGEATTN, default_opset=op)
def KeyGroup(head_dim):
    """Channels per key group [1]: KEY_GROUP, or the whole head when it does not divide head_dim."""
    group = op.Constant(value_ints=_KEY_GROUP)
    return op.Where(op.Equal(op.Mod(head_dim, group), op.Constant(value_ints=[0])), group, head_dim)


@onnxscript.script(EDGEATTN, default_opset=op)
def PackNibbles(nibbles):
    """[..., D] floats holding 0..15 -> [..., D/2] floats holding bytes, element 2i in the low nibble."""
    pairs = op.Reshape(nibbles, op.Concat(op.Shape(nibbles, end=-1), op.Constant(value_ints=[-1, 2]), axis=0))
    low = op.Squeeze(op.Slice(pairs, [0], [1], _LAST), _LAST)
    high = op.Squeeze(op.Slice(pairs, [1], [2], _LAST), _LAST)
    return low + high * op.Constant(value_float=16.0)


@onnxscript.script(EDGEATTN, default_opset=op)
def UnpackNibbles(packed):
    """[..., D/2] floats holding bytes -> [..., D] floats holding 0..15 (inverse of PackNibbles)."""
    sixteen = op.Constant(value_float=16.0)
    high = op.Floor(packed / sixteen)
    low = packed - high * sixteen
    pairs = op.Concat(op.Unsqueeze(low, _LAST), op.Unsqueeze(high, _LAST), axis=-1)
    return op.Reshape(pairs, op.Concat(op.Shape(packed, end=-1), _LAST, axis=0))


@onnxscript.script(EDGEATTN, default_opset=op)
def Fp16Bytes(x):
    """[..., n] float32 holding fp16-exact values -> [..., 2n] uint8, the fp16 bits little-endian."""
    magnitude = op.Abs(x)
    reached = op.GreaterOrEqual(op.Unsqueeze(magnitude, _LAST), op.Constant(value_floats=_FP16_EXPONENT_THRESHOLDS))
    exponent = op.ReduceSum(op.Cast(reached, to=INT64.dtype), _LAST, keepdims=0)  # [..., n] in 0..30
    unit = op.Gather(op.Constant(value_floats=_FP16_UNITS), exponent)
    normal = op.Cast(op.Greater(exponent, op.Constant(value_int=0)), to=FLOAT.dtype)
    mantissa = magnitude / unit - normal * op.Constant(value_float=1024.0)
    sign = op.Cast(op.Less(x, op.Constant(value_float=0.0)), to=FLOAT.dtype)
    bits = sign * op.Constant(value_float=32768.0) + op.Cast(exponent, to=FLOAT.dtype) * op.Constant(
        value_float=1024.0) + mantissa
    byte = op.Constant(value_float=256.0)
    high = op.Floor(bits / byte)
    low = bits - high * byte
    pairs = op.Concat(op.Unsqueeze(low, _LAST), op.Unsqueeze(high, _LAST), axis=-1)
    return op.Cast(op.Reshape(pairs, op.Concat(op.Shape(x, end=-1), _LAST, axis=0)), to=UINT8.dtype)


@onnxscript.script(EDGEATTN, default_opset=op)
def Fp16FromBytes(data):
    """[..., 2n] uint8 (fp16 bits, little-endian) -> [..., n] float32 (inverse of Fp16Bytes)."""
    pairs = op.Reshape(op.Cast(data, to=FLOAT.dtype), op.Concat(op.Shape(data, end=-1),
                                                               op.Constant(value_ints=[-1, 2]), axis=0))
    low = op.Squeeze(op.Slice(pairs, [0], [1], _LAST), _LAST)
    high = op.Squeeze(op.Slice(pairs, [1], [2], _LAST), _LAST)
    negative = op.GreaterOrEqual(high, op.Constant(value_float=128.0))
    high = high - op.Cast(negative, to=FLOAT.dtype) * op.Constant(value_float=128.0)
    bits = high * op.Constant(value_float=256.0) + low  # 15 bits: exponent and mantissa
    step = op.Constant(value_float=1024.0)
    exponent = op.Floor(bits / step)
    mantissa = bits - exponent * step
    unit = op.Gather(op.Constant(value_floats=_FP16_UNITS), op.Cast(exponent, to=INT64.dtype))
    normal = op.Cast(op.Greater(exponent, op.Constant(value_float=0.0)), to=FLOAT.dtype)
    magnitude = (mantissa + normal * step) * unit
    return op.Where(negative, op.Neg(magnitude), magnitude)


# ---------------------------------------------------------------------------- codecs
# Each factory returns (EncodeKV, DecodeKV) with one signature for every codec:
#   EncodeKV(key, value, k_scale, v_scale) -> key rows, value rows  [B, Hkv, n, W]
#   DecodeKV(key_rows, value_rows, k_scale, v_scale, head_dim [1]) -> key, value  [B, Hkv, n, D] float32
# k_scale / v_scale [1, Hkv, 1, D] are the static per-channel scales (absent otherwise).


def _fp32_codec():
    @onnxscript.script(EDGEATTN, default_opset=op)
    def EncodeKV(key, value, k_scale, v_scale):
        return op.Identity(key), op.Identity(value)

    @onnxscript.script(EDGEATTN, default_opset=op)
    def DecodeKV(key_rows, value_rows, k_scale, v_scale, head_dim):
        return op.Identity(key_rows), op.Identity(value_rows)

    return EncodeKV, DecodeKV


def _fp16_codec():
    @onnxscript.script(EDGEATTN, default_opset=op)
    def EncodeKV(key, value, k_scale, v_scale):
        return op.Cast(key, to=FLOAT16.dtype), op.Cast(value, to=FLOAT16.dtype)

    @onnxscript.script(EDGEATTN, default_opset=op)
    def DecodeKV(key_rows, value_rows, k_scale, v_scale, head_dim):
        return op.Cast(key_rows, to=FLOAT.dtype), op.Cast(value_rows, to=FLOAT.dtype)

    return EncodeKV, DecodeKV


def _per_channel_codec(bits: int):
    """Static symmetric codes: round(x / scale) clipped to [-2^(bits-1), 2^(bits-1) - 1]."""
    PACKED = bits == 4  # noqa: N806 - onnxscript reads it as a static condition
    LOW = float(-(2 ** (bits - 1)))  # noqa: N806
    HIGH = float(2 ** (bits - 1) - 1)  # noqa: N806

    @onnxscript.script(EDGEATTN, default_opset=op)
    def EncodeKV(key, value, k_scale, v_scale):
        low = op.Constant(value_float=LOW)
        high = op.Constant(value_float=HIGH)
        key_codes = op.Clip(op.Round(key / k_scale), low, high)
        value_codes = op.Clip(op.Round(value / v_scale), low, high)
        if PACKED:
            sixteen = op.Constant(value_float=16.0)
            zero = op.Constant(value_float=0.0)
            key_nibbles = op.Where(op.Less(key_codes, zero), key_codes + sixteen, key_codes)
            value_nibbles = op.Where(op.Less(value_codes, zero), value_codes + sixteen, value_codes)
            key_rows = op.Cast(PackNibbles(key_nibbles), to=UINT8.dtype)
            value_rows = op.Cast(PackNibbles(value_nibbles), to=UINT8.dtype)
        else:
            key_rows = op.Cast(key_codes, to=INT8.dtype)
            value_rows = op.Cast(value_codes, to=INT8.dtype)
        return key_rows, value_rows

    @onnxscript.script(EDGEATTN, default_opset=op)
    def DecodeKV(key_rows, value_rows, k_scale, v_scale, head_dim):
        if PACKED:
            sixteen = op.Constant(value_float=16.0)
            eight = op.Constant(value_float=8.0)
            key_nibbles = UnpackNibbles(op.Cast(key_rows, to=FLOAT.dtype))
            value_nibbles = UnpackNibbles(op.Cast(value_rows, to=FLOAT.dtype))
            key_codes = op.Where(op.GreaterOrEqual(key_nibbles, eight), key_nibbles - sixteen, key_nibbles)
            value_codes = op.Where(op.GreaterOrEqual(value_nibbles, eight), value_nibbles - sixteen, value_nibbles)
        else:
            key_codes = op.Cast(key_rows, to=FLOAT.dtype)
            value_codes = op.Cast(value_rows, to=FLOAT.dtype)
        return key_codes * k_scale, value_codes * v_scale

    return EncodeKV, DecodeKV


def _per_token_codec(bits: int):
    """Dynamic asymmetric codes 0..2^bits-1 with fp16 scale/minimum per key group and per value row."""
    PACKED = bits == 4  # noqa: N806 - onnxscript reads it as a static condition
    LEVELS = float(2**bits - 1)  # noqa: N806

    @onnxscript.script(EDGEATTN, default_opset=op)
    def EncodeKV(key, value, k_scale, v_scale):
        head_dim = op.Shape(key, start=3)
        key_codes, key_scale, key_low = QuantizeAsymmetric(key, KeyGroup(head_dim), levels=LEVELS)
        value_codes, value_scale, value_low = QuantizeAsymmetric(value, head_dim, levels=LEVELS)
        if PACKED:
            key_codes = PackNibbles(key_codes)
            value_codes = PackNibbles(value_codes)
        scales = Fp16Bytes(op.Concat(key_scale, value_scale, axis=-1))  # [..., 2(G+1)]
        lows = Fp16Bytes(op.Concat(key_low, value_low, axis=-1))
        key_rows = op.Concat(op.Cast(key_codes, to=UINT8.dtype), scales, axis=-1)
        value_rows = op.Concat(op.Cast(value_codes, to=UINT8.dtype), lows, axis=-1)
        return key_rows, value_rows

    @onnxscript.script(EDGEATTN, default_opset=op)
    def DecodeKV(key_rows, value_rows, k_scale, v_scale, head_dim):
        code_bytes = head_dim
        if PACKED:
            code_bytes = op.Div(head_dim, op.Constant(value_ints=[2]))
        zero = op.Constant(value_ints=[0])
        key_codes = op.Cast(op.Slice(key_rows, zero, code_bytes, _LAST), to=FLOAT.dtype)
        value_codes = op.Cast(op.Slice(value_rows, zero, code_bytes, _LAST), to=FLOAT.dtype)
        if PACKED:
            key_codes = UnpackNibbles(key_codes)
            value_codes = UnpackNibbles(value_codes)
        scales = Fp16FromBytes(op.Slice(key_rows, code_bytes, _TO_END, _LAST))  # [..., G+1]
        lows = Fp16FromBytes(op.Slice(value_rows, code_bytes, _TO_END, _LAST))
        groups = op.Div(head_dim, KeyGroup(head_dim))
        key = DequantizeAsymmetric(key_codes, op.Slice(scales, zero, groups, _LAST),
                                   op.Slice(lows, zero, groups, _LAST))
        value = DequantizeAsymmetric(value_codes, op.Slice(scales, groups, _TO_END, _LAST),
                                     op.Slice(lows, groups, _TO_END, _LAST))
        return key, value

    return EncodeKV, DecodeKV


_CODECS = {
    ("fp32", None): _fp32_codec,
    ("fp16", None): _fp16_codec,
    ("int8", "per-channel"): lambda: _per_channel_codec(8),
    ("int4", "per-channel"): lambda: _per_channel_codec(4),
    ("int8", "per-token"): lambda: _per_token_codec(8),
    ("int4", "per-token"): lambda: _per_token_codec(4),
}
# The attention bodies are written against this variant's signature; every variant has the same one.
EncodeKV, DecodeKV = _fp32_codec()


# ---------------------------------------------------------------------------- ring buffer


@onnxscript.script(EDGEATTN, default_opset=op)
def RingSlot(positions, window: int, sinks: int):
    """Slot of each absolute position: sinks stay put, later tokens cycle through ``window`` slots."""
    sink_count = op.Constant(value_int=sinks)
    cycled = sink_count + op.Mod(positions - sink_count, op.Constant(value_int=window))
    return op.Where(op.Less(positions, sink_count), positions, cycled)


@onnxscript.script(EDGEATTN, default_opset=op)
def RingContents(past, capacity, window: int, sinks: int):
    """Absolute position held by each slot [C] after ``past`` tokens, and whether it holds one.

    Slot s holds a token iff s < past (token s is the first to land there); a window slot
    then holds the latest position p < past with p = s (mod window).
    """
    slot = op.Range(op.Constant(value_int=0), capacity, op.Constant(value_int=1))
    behind = op.Max(past - op.Constant(value_int=1) - slot, op.Constant(value_int=0))
    win = op.Constant(value_int=window)
    latest = slot + op.Div(behind, win) * win
    return op.Where(op.Less(slot, op.Constant(value_int=sinks)), slot, latest), op.Less(slot, past)


@onnxscript.script(EDGEATTN, default_opset=op)
def SinkWindowAttention(query, key, value, past_key, past_value, attention_mask, inv_freq, k_scale, v_scale,
                        num_heads: int, kv_num_heads: int, scale: float, rotary_scaling: float,
                        window: int, sinks: int, kv_cache: str, kv_quant: str):
    """Sliding window + sinks over a ring of sinks + window slots of unrotated keys (StreamingLLM RoPE).

    query [B, L, H*D], key/value [B, L, Hkv*D] (projected, unrotated); past/present
    [B, Hkv, C, W]; attention_mask [B, T] (only its length is read: every row has T tokens).
    Keys are rotated at read time by their position in the cache (window keys shifted down
    by max(0, P - sinks - window)); a sink is scored with the query rotated at its in-cache
    position clamped to sinks + window - 1. Of the new tokens only the sinks and the last
    ``window`` are written.
    """
    q = SplitHeads(query, heads=num_heads)  # [B, H, L, D]
    k = SplitHeads(key, heads=kv_num_heads)  # [B, Hkv, L, D]
    v = SplitHeads(value, heads=kv_num_heads)
    head_dim = op.Shape(q, start=3)
    length = op.Squeeze(op.Shape(q, start=2, end=3))
    past = op.Squeeze(op.Shape(attention_mask, start=1, end=2)) - length
    capacity = op.Squeeze(op.Shape(past_key, start=2, end=3))
    key_rows, value_rows = EncodeKV(k, v, k_scale, v_scale)  # [B, Hkv, L, W]
    all_key_rows = op.Concat(past_key, key_rows, axis=2)  # [B, Hkv, C+L, W]: the only read of past_key
    all_value_rows = op.Concat(past_value, value_rows, axis=2)
    keys, values = DecodeKV(all_key_rows, all_value_rows, k_scale, v_scale, head_dim)  # [B, Hkv, N, D]

    step = op.Range(op.Constant(value_int=0), length, op.Constant(value_int=1))  # [L]
    q_pos = past + step
    slot_pos, occupied = RingContents(past, capacity, window=window, sinks=sinks)
    k_pos = op.Concat(slot_pos, q_pos, axis=0)  # [N] absolute positions
    new_valid = op.Cast(op.Expand(op.Constant(value_ints=[1]), op.Shape(q_pos)), to=BOOL.dtype)
    k_valid = op.Concat(occupied, new_valid, axis=0)
    sink_count = op.Constant(value_int=sinks)
    win = op.Constant(value_int=window)
    is_sink = op.Less(k_pos, sink_count)
    shift = op.Max(past - sink_count - win, op.Constant(value_int=0))
    k_in_cache = op.Where(is_sink, k_pos, k_pos - shift)
    q_in_cache = q_pos - shift
    q_vs_sinks = op.Min(q_in_cache, sink_count + win - op.Constant(value_int=1))
    k_rot = Rope(keys, k_in_cache, inv_freq, rotary_scaling=rotary_scaling)
    vs_window = GroupedScores(Rope(q, q_in_cache, inv_freq, rotary_scaling=rotary_scaling), k_rot)
    vs_sinks = GroupedScores(Rope(q, q_vs_sinks, inv_freq, rotary_scaling=rotary_scaling), k_rot)
    scores = op.Where(is_sink, vs_sinks, vs_window) * op.Constant(value_float=scale)  # [B, Hkv, R, L, N]
    query_col = op.Unsqueeze(q_pos, [1])  # [L, 1]
    key_row = op.Unsqueeze(k_pos, [0])  # [1, N]
    recent = op.Less(query_col - key_row, win)
    mask = op.And(op.And(op.Unsqueeze(k_valid, [0]), op.LessOrEqual(key_row, query_col)),
                  op.Or(recent, op.Unsqueeze(is_sink, [0])))
    output = Attend(scores, mask, values)

    keep = op.Or(op.Less(q_pos, sink_count), op.GreaterOrEqual(step, length - win))
    kept = op.Compress(step, keep)  # new tokens that stay in the ring (unique slots)
    slots = RingSlot(past + kept, window=window, sinks=sinks)
    present_key = WriteRows(past_key, op.Gather(all_key_rows, capacity + kept, axis=2), slots)
    present_value = WriteRows(past_value, op.Gather(all_value_rows, capacity + kept, axis=2), slots)
    return output, present_key, present_value


# ---------------------------------------------------------------------------- full caches


@onnxscript.script(EDGEATTN, default_opset=op)
def FullCacheStep(query, key, value, past_key, past_value, attention_mask, inv_freq, k_scale, v_scale,
                  num_heads: int, kv_num_heads: int, rotary_scaling: float):
    """Rotate the new tokens, store them at slots P..T-1 of a full cache of rotated keys, read back slots 0..T-1.

    Returns q_rot [B, H, L, D], keys/values [B, Hkv, T, D], q_pos [L], k_pos [T], present_key, present_value.
    """
    q = SplitHeads(query, heads=num_heads)
    k = SplitHeads(key, heads=kv_num_heads)
    v = SplitHeads(value, heads=kv_num_heads)
    head_dim = op.Shape(q, start=3)
    length = op.Squeeze(op.Shape(q, start=2, end=3))
    total = op.Squeeze(op.Shape(attention_mask, start=1, end=2))
    past = total - length
    q_pos = op.Range(past, total, op.Constant(value_int=1))
    k_pos = op.Range(op.Constant(value_int=0), total, op.Constant(value_int=1))
    q_rot = Rope(q, q_pos, inv_freq, rotary_scaling=rotary_scaling)
    key_rows, value_rows = EncodeKV(Rope(k, q_pos, inv_freq, rotary_scaling=rotary_scaling), v, k_scale, v_scale)
    zero = op.Constant(value_ints=[0])
    cached = op.Reshape(past, _LAST)
    all_key_rows = op.Concat(op.Slice(past_key, zero, cached, [2]), key_rows, axis=2)  # [B, Hkv, T, W]
    all_value_rows = op.Concat(op.Slice(past_value, zero, cached, [2]), value_rows, axis=2)
    keys, values = DecodeKV(all_key_rows, all_value_rows, k_scale, v_scale, head_dim)
    present_key = WriteRows(past_key, key_rows, q_pos)
    present_value = WriteRows(past_value, value_rows, q_pos)
    return q_rot, keys, values, q_pos, k_pos, present_key, present_value


@onnxscript.script(EDGEATTN, default_opset=op)
def QuantKVAttention(query, key, value, past_key, past_value, attention_mask, inv_freq, k_scale, v_scale,
                     num_heads: int, kv_num_heads: int, scale: float, rotary_scaling: float,
                     kv_cache: str, kv_quant: str):
    """Causal attention over a max-length cache of rotated keys in any codec (fp16, per-token int8/int4 ...)."""
    q_rot, keys, values, q_pos, k_pos, present_key, present_value = FullCacheStep(
        query, key, value, past_key, past_value, attention_mask, inv_freq, k_scale, v_scale,
        num_heads=num_heads, kv_num_heads=kv_num_heads, rotary_scaling=rotary_scaling)
    scores = GroupedScores(q_rot, keys) * op.Constant(value_float=scale)
    causal = op.LessOrEqual(op.Unsqueeze(k_pos, [0]), op.Unsqueeze(q_pos, [1]))  # [L, T]
    return Attend(scores, causal, values), present_key, present_value


@onnxscript.script(EDGEATTN, default_opset=op)
def SelectedBlocks(q_rot, keys, q_pos, block_size: int, top_blocks: int, block_mass: float, shared: int):
    """Level 1 of hierarchical attention: the blocks each query head keeps, bool [B, Hkv, R, L, NB].

    Block summaries are per-channel min/max of each aligned block of ``block_size`` keys;
    a block's score is the upper bound sum_d max(q_d min_d, q_d max_d); only complete
    blocks (block end <= query position) compete. Keeps the best ``top_blocks``, or with
    block_mass > 0 the fewest whose softmax(bound / sqrt(D)) mass reaches it (capped too). ``shared`` = 1:
    a kv head's query heads rank the blocks together, each block by the largest of their bounds.
    """
    size = op.Constant(value_int=block_size)
    total = op.Shape(keys, start=2, end=3)  # [1]
    blocks = op.Div(total - op.Constant(value_ints=[1]), size) + op.Constant(value_ints=[1])  # [1]: ceil(T / bs)
    pad = blocks * size - total
    pads = op.Concat(op.Constant(value_ints=[0, 0, 0, 0, 0, 0]), pad, op.Constant(value_ints=[0]), axis=0)
    padded = op.Pad(keys, pads)  # padding only ever lands in the incomplete last block
    per_block = op.Concat(op.Shape(keys, start=0, end=2), blocks, op.Reshape(size, _LAST),
                          op.Shape(keys, start=3, end=4), axis=0)
    grouped = op.Reshape(padded, per_block)  # [B, Hkv, NB, bs, D]
    key_min = op.Unsqueeze(op.Transpose(op.ReduceMin(grouped, [3], keepdims=0), perm=[0, 1, 3, 2]), [2])
    key_max = op.Unsqueeze(op.Transpose(op.ReduceMax(grouped, [3], keepdims=0), perm=[0, 1, 3, 2]), [2])
    q5 = op.Reshape(q_rot, op.Concat(op.Shape(keys, start=0, end=2), _LAST, op.Shape(q_rot, start=2, end=4),
                                     axis=0))  # [B, Hkv, R, L, D]
    zero = op.Constant(value_float=0.0)
    bound = op.MatMul(op.Max(q5, zero), key_max) + op.MatMul(op.Min(q5, zero), key_min)  # [B, Hkv, R, L, NB]
    share = op.Cast(op.Constant(value_int=shared), to=BOOL.dtype)
    bound = op.Where(share, op.ReduceMax(bound, [2], keepdims=1), bound)  # broadcast back over R
    count = op.Squeeze(blocks)
    block_end = (op.Range(op.Constant(value_int=0), count, op.Constant(value_int=1)) + op.Constant(value_int=1)) \
        * size - op.Constant(value_int=1)
    complete = op.LessOrEqual(op.Unsqueeze(block_end, [0]), op.Unsqueeze(q_pos, [1]))  # [L, NB]
    bound = op.Where(complete, bound, op.Constant(value_float=_NEG_INF))
    ranked, order = op.TopK(bound, blocks, axis=-1, largest=1, sorted=1)
    budget = op.Min(op.Constant(value_int=top_blocks), blocks)
    head_dim = op.Cast(op.Shape(keys, start=3, end=4), to=FLOAT.dtype)
    mass = op.Softmax(ranked / op.Sqrt(head_dim), axis=-1)
    mass = op.Where(op.IsNaN(mass), zero, mass)  # no complete block: all -inf
    target = op.Constant(value_float=block_mass)
    needed = op.ReduceSum(op.Cast(op.Less(op.CumSum(mass, op.Constant(value_int=-1)), target), to=INT64.dtype),
                          _LAST, keepdims=1) + op.Constant(value_int=1)
    budget = op.Where(op.Greater(target, zero), op.Min(budget, needed), budget)  # [..., 1]
    rank = op.Range(op.Constant(value_int=0), count, op.Constant(value_int=1))
    kept_ranked = op.Cast(op.Less(rank, budget), to=INT64.dtype)
    kept = op.ScatterElements(op.Mul(order, op.Constant(value_int=0)), order, kept_ranked, axis=-1)
    return op.And(op.Cast(kept, to=BOOL.dtype), complete)


@onnxscript.script(EDGEATTN, default_opset=op)
def HierarchicalAttention(query, key, value, past_key, past_value, attention_mask, inv_freq, k_scale, v_scale,
                          num_heads: int, kv_num_heads: int, scale: float, rotary_scaling: float,
                          block_size: int, top_blocks: int, local_window: int, sinks: int, block_mass: float,
                          shared_blocks: int, kv_cache: str, kv_quant: str):
    """Two-level block-sparse attention over a full cache: selected blocks + sinks + local window.

    block_mass = 0 means "top_blocks only" (the spec's block_mass is in (0, 1]); shared_blocks = 1: blocks are
    chosen per kv head (``block_select`` kv-head), 0: per query head.
    """
    q_rot, keys, values, q_pos, k_pos, present_key, present_value = FullCacheStep(
        query, key, value, past_key, past_value, attention_mask, inv_freq, k_scale, v_scale,
        num_heads=num_heads, kv_num_heads=kv_num_heads, rotary_scaling=rotary_scaling)
    blocks = SelectedBlocks(q_rot, keys, q_pos, block_size=block_size, top_blocks=top_blocks,
                            block_mass=block_mass, shared=shared_blocks)  # [B, Hkv, R, L, NB]
    selected = op.Gather(blocks, op.Div(k_pos, op.Constant(value_int=block_size)), axis=-1)  # [B, Hkv, R, L, T]
    query_col = op.Unsqueeze(q_pos, [1])
    key_row = op.Unsqueeze(k_pos, [0])
    local = op.Less(query_col - key_row, op.Constant(value_int=local_window))
    always = op.Or(local, op.Less(key_row, op.Constant(value_int=sinks)))  # [L, T]
    mask = op.And(op.LessOrEqual(key_row, query_col), op.Or(always, selected))
    scores = GroupedScores(q_rot, keys) * op.Constant(value_float=scale)
    return Attend(scores, mask, values), present_key, present_value


# ---------------------------------------------------------------------------- protos

ATTENTION_FUNCTIONS = {fn.name: fn for fn in (SinkWindowAttention, QuantKVAttention, HierarchicalAttention)}
_HELPERS = {fn.name: fn for fn in (
    SplitHeads, Rope, GroupedScores, Attend, WriteRows, QuantizeAsymmetric, DequantizeAsymmetric, KeyGroup,
    PackNibbles, UnpackNibbles, Fp16Bytes, Fp16FromBytes, RingSlot, RingContents, FullCacheStep, SelectedBlocks)}


def codec_key(kv_cache: str, kv_quant: str) -> tuple[str, str | None]:
    """The codec variant of a spec's (kv_cache, kv_quant); the mode only matters for int8/int4."""
    return (kv_cache, kv_quant if kv_cache in ("int8", "int4") else None)


def function_protos(op_type: str, kv_cache: str, kv_quant: str) -> list[onnx.FunctionProto]:
    """Every FunctionProto a model with ``op_type`` nodes and this KV codec needs, callees first."""
    encode, decode = _CODECS[codec_key(kv_cache, kv_quant)]()
    available = {**_HELPERS, **ATTENTION_FUNCTIONS, "EncodeKV": encode, "DecodeKV": decode}
    ordered: list[onnx.FunctionProto] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        proto = available[name].to_function_proto()
        for node in proto.node:
            if node.domain == DOMAIN:
                visit(node.op_type)
        ordered.append(proto)

    visit(op_type)
    ordered[-1].doc_string = f"{ordered[-1].doc_string}\nKV cache codec of this model: {codec_key(kv_cache, kv_quant)}"
    return ordered
