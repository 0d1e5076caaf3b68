"""The sliding window + sinks ring on standard ONNX ops: ``Attention`` over the ring buffer itself.

Dimension legend: B batch, L new tokens, H query heads, Hkv kv heads, D head dim,
S sinks, W window, C = S + W ring slots, P cached tokens before this step, T = P + L.

Attention does not depend on the order of the keys in its buffer, and with RoPE a score
depends only on the distance between query and key. The PyTorch model (``SinkWindowVisibility``,
StreamingLLM) gives a window key its true distance to the query and sees a sink j from the
query's in-cache position clamped to C - 1; in absolute positions that is: the query at its
position, a window key at its position, a sink at ``e + j`` with e = max(0, T - C) (decode).
Angles are formed in float64 (``rope_angles``), so positions far past the model's position
table stay exact.

Two layouts, one per cache precision, each one ``If`` per layer (the body is an ONNX
function, ``onnx_ring_function``, inlined at export):

* ``RingAttentionLowering`` (fp32 cache): keys are rotated once, when written, at their
  absolute position. Only the sinks' offset moves with the steps, so they are kept twice:
  rotated at their own position j in S extra slots (written once) and, in slots 0..S-1,
  rotated on by e (rewritten every decode step, S rows). Buffer of C + S slots::

      slots   0..S-1        S..C-1                      C..C+S-1
      keys    sinks at e+j  window, rotated at position  sinks at j (kept)
      values  sinks         window                       (unused)

* ``CodecRingLowering`` (fp16, int8/int4 per channel or per token): the PyTorch model rounds
  or quantizes *unrotated* keys, so the buffer holds their codes (``edgeattn_functions``'
  codecs, the rows the edgeattn lowering stores) and every slot is decoded and rotated on
  read, at the position it has this step. C slots.

The ``If``'s branches:

* ``then`` (decode, one new token; the fp32 ring once the sinks are cached):
  ``ScatterElements`` writes the new rows (and the re-rotated sinks) in place, then
  ``Attention`` reads the buffer it wrote, no copy, with an additive mask of the slots'
  positions computed once per step for every layer. One token needs no head Transpose:
  [B, 1, (H + 2*Hkv)*D] is [B, H + 2*Hkv, 1, D] in memory;
* ``else`` (a chunk: a prompt, or more tokens on a wrapped ring): its later tokens
  overwrite slots its earlier queries still read, and each query sees the sinks at its own
  offset, so the keys are copied first (``Concat`` of the ring and the chunk, sink rows
  zeroed) and each sink's score enters through the mask (``q_s . k_j * scale`` with q
  rotated at its clamped position); the writes take their rows from that copy, so they run
  after the read.

Where a token is written: a sink j in slot j (values; keys of the fp32 ring: C + j), a later
token t in slot S + (t - S) mod W. Learned-position models (no RoPE) skip every rotation.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import torch
from torch import nn

from edgeattn.exporters import edgeattn_functions, onnx_ring_function, rope_angles
from edgeattn.exporters.lowering_contract import CacheLayout, LoweringBase
from edgeattn.exporters.packed_qkv import packed_qkv
from edgeattn.models.attention import EdgeAttention
from edgeattn.spec import AttentionSpec

NAME = "onnx"
# Masked scores: a large finite value, as onnxruntime's CPU softmax expects finite inputs.
MASKED = -1e30


@dataclass(frozen=True)
class RingStep:
    """Per-step tensors shared by every layer (computed once in the graph)."""

    fast: torch.Tensor  # bool []: decode with every sink cached (L = 1, P >= S): the in-place branch
    mask: torch.Tensor  # [L, C+S] additive mask over the buffer after this step's writes (in-place branch)
    key_index: torch.Tensor  # [B, Hkv, S+L, D] ScatterElements index: the S re-rotated sinks, then the new keys
    value_index: torch.Tensor  # [B, Hkv, L, D] the new values
    cos_shift: torch.Tensor  # [S, D/2] rotation by e = max(0, T - C), the sinks' offset this step (unscaled)
    sin_shift: torch.Tensor
    sink_rows: torch.Tensor  # [B, S] zeros: every sink row reads row 0 of cos/sin_shift
    q_pos: torch.Tensor  # [L] absolute positions of the new tokens
    key_slot: torch.Tensor  # [L] where each new token's key goes
    value_slot: torch.Tensor  # [L] where each new token's value goes
    rows: torch.Tensor  # [B, L] row n of the new tokens reads row n of cos/sin
    cos: torch.Tensor  # [L, D/2] rotation of the new tokens at their absolute positions
    sin: torch.Tensor

    def function_inputs(self) -> tuple[torch.Tensor, ...]:
        """The step's inputs of the ring function, after the layer's own."""
        return (self.fast, self.mask, self.key_index, self.value_index, self.cos_shift, self.sin_shift,
                self.sink_rows, self.q_pos, self.key_slot, self.value_slot, self.cos, self.sin, self.rows)


class RingAttentionLowering(LoweringBase):
    """Sliding window + sinks over a constant-memory ring, on ``Attention``/``ScatterElements``/``RotaryEmbedding``."""

    name = NAME
    op_type = "Attention"
    opset = onnx_ring_function.OPSET
    inline_functions = True

    def __init__(self, attn: EdgeAttention, spec: AttentionSpec, max_length: int) -> None:
        super().__init__(attn)
        if attn.codec.dtype != "fp32":
            raise ValueError(f"the in-place ring keeps fp32 keys, not {attn.codec.dtype}")
        self.window, self.sinks = attn.visibility.window, attn.visibility.sinks
        self.ring_slots = self.sinks + self.window
        self.slots = self.ring_slots + self.sinks
        self.max_length = max_length
        register_rotary(self, attn)
        register_packed_qkv(self, attn)

    def cache_layout(self) -> CacheLayout:
        """How the runtime allocates past_key/past_value for this layer."""
        return CacheLayout(self.kv_heads, self.slots, self.head_dim, "float32", ring=True,
                           max_positions=None if self.has_rotary else self.max_length)

    def functions(self) -> list[onnx.FunctionProto]:
        """The layer's body (inlined by the exporter, so the saved graph holds standard ops only)."""
        return [*onnx_ring_function.helper_functions(), onnx_ring_function.ring_function(
            self.num_heads, self.kv_heads, self.head_dim, self.sinks, self.window, self.has_rotary,
            self.rotary_scaling)]

    def prepare_step(self, length: int, attention_mask: torch.Tensor) -> RingStep:
        """The tensors every layer shares for a step of ``length`` new tokens (``attention_mask`` [B, T])."""
        sinks, window, ring = self.sinks, self.window, self.ring_slots
        batch, total = attention_mask.shape
        q_pos = torch.arange(length) + (total - length)  # [L]
        first, end = q_pos[0], q_pos[-1] + 1  # P, T as tensors
        fast = (end - first == 1) & (first >= sinks)
        in_window = sinks + (q_pos - sinks).clamp_min(0) % window
        is_sink = q_pos < sinks
        key_slot = torch.where(is_sink, ring + q_pos, in_window)
        value_slot = torch.where(is_sink, q_pos, in_window)
        width = (batch, self.kv_heads, -1, self.head_dim)
        key_index = torch.cat((torch.arange(sinks), key_slot))[None, None, :, None].expand(width)
        value_index = value_slot[None, None, :, None].expand(width)
        # One row per sink (onnxruntime's RotaryEmbedding wants a table as long as its input), all at e.
        cos_shift, sin_shift = rope_angles.cos_sin((end - ring).clamp_min(0).reshape(1).expand(sinks), self.inv_freq64)
        cos, sin = rope_angles.cos_sin(q_pos, self.inv_freq64, self.rotary_scaling)
        return RingStep(fast, self._mask_after(q_pos, end), key_index, value_index, cos_shift, sin_shift,
                        torch.zeros(batch, sinks, dtype=torch.long), q_pos, key_slot, value_slot,
                        torch.arange(length).expand(batch, length), cos, sin)

    def _mask_after(self, q_pos: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        """[L, C+S] additive mask of the buffer once this step's tokens are written (positions < T)."""
        sinks, window, ring = self.sinks, self.window, self.ring_slots
        slot = torch.arange(ring)
        latest = slot + ((end - 1 - slot).clamp_min(0) // window) * window  # window slot: latest position held
        held = torch.where(slot < sinks, slot, latest)  # [C]
        query, key = q_pos[:, None], held[None, :]
        visible = (slot < end)[None, :] & (key <= query) & (((query - key) < window) | (key < sinks))
        visible = torch.cat((visible, torch.zeros(q_pos.shape[0], sinks, dtype=torch.bool)), 1)  # kept sinks: never read
        return torch.where(visible, 0.0, MASKED)

    def attend(self, attn: EdgeAttention, h: torch.Tensor, attention_mask: torch.Tensor,
               past_key: torch.Tensor, past_value: torch.Tensor, step: RingStep):
        batch, length, _ = h.shape
        qkv = h @ self.qkv_weight_T + (self.qkv_bias if self.qkv_bias is not None else 0)  # one MatMul
        output, present_key, present_value = torch.onnx.ops.symbolic_multi_out(
            f"{onnx_ring_function.DOMAIN}::SinkWindowRing",
            (qkv, past_key, past_value, *step.function_inputs(), self.inv_freq64), {},
            dtypes=(qkv.dtype, past_key.dtype, past_value.dtype),
            shapes=((batch, length, self.num_heads * self.head_dim), past_key.shape, past_value.shape),
            version=onnx_ring_function.VERSION)
        return attn.o_proj(output), present_key, present_value


@dataclass(frozen=True)
class CodecRingStep:
    """Per-step tensors shared by every layer of a codec ring (computed once in the graph)."""

    fast: torch.Tensor  # bool []: decode (L = 1), the in-place branch
    mask: torch.Tensor  # [L, C] additive mask over the ring after this step's writes
    cos_slots: torch.Tensor  # [C, D/2] each slot's rotation this step: window slots at their position, sinks at e + j
    sin_slots: torch.Tensor
    slot_rows: torch.Tensor  # [B, C] row s of the ring reads row s of cos/sin_slots
    write_index: torch.Tensor  # [B, Hkv, L, W] ScatterElements index of the new rows
    q_pos: torch.Tensor  # [L] absolute positions of the new tokens
    slot: torch.Tensor  # [L] the slot of each new token
    cos: torch.Tensor  # [L, D/2] rotation of the new queries at their absolute positions
    sin: torch.Tensor
    rows: torch.Tensor  # [B, L] row n of the new tokens reads row n of cos/sin
    batch_zeros: torch.Tensor  # [B, Hkv, 1, D]: per-channel scales repeated over the batch by adding it

    def function_inputs(self) -> tuple[torch.Tensor, ...]:
        """The step's inputs of the ring function, after the layer's own (``batch_zeros`` last)."""
        return (self.fast, self.mask, self.cos_slots, self.sin_slots, self.slot_rows, self.write_index, self.q_pos,
                self.slot, self.cos, self.sin, self.rows, self.batch_zeros)


class CodecRingLowering(LoweringBase):
    """The ring of an fp16, int8 or int4 cache: codes of unrotated keys (as the PyTorch model stores them), so
    every slot is decoded and rotated on read, each at the position it has this step (window slots at their
    absolute position, sinks at e + j); the codecs are ``edgeattn_functions``'."""

    name = NAME
    op_type = "Attention"
    opset = onnx_ring_function.OPSET
    inline_functions = True

    def __init__(self, attn: EdgeAttention, spec: AttentionSpec, max_length: int) -> None:
        super().__init__(attn)
        self.window, self.sinks = attn.visibility.window, attn.visibility.sinks
        self.ring_slots = self.sinks + self.window
        self.max_length = max_length
        codec = attn.codec
        self.kv_cache = codec.dtype
        self.kv_quant = codec.mode if codec.quantized else "none"
        if codec.dtype == "int4" and self.head_dim % 2:
            raise ValueError(f"an int4 KV cache packs two codes per byte: head_dim {self.head_dim} is odd")
        self.row_width = codec.bytes_per_token() // (2 * self.kv_heads * _BYTES[self.cache_dtype()])
        register_rotary(self, attn)
        self.scales = codec.quantized and codec.mode == "per-channel"
        if self.scales:
            shape = (1, self.kv_heads, 1, self.head_dim)
            self.register_buffer("k_scale", codec.k_scale.reshape(shape).detach().clone())
            self.register_buffer("v_scale", codec.v_scale.reshape(shape).detach().clone())
        register_packed_qkv(self, attn)

    def cache_dtype(self) -> str:
        if self.kv_cache == "fp16":
            return "float16"
        return "int8" if self.kv_cache == "int8" and self.kv_quant == "per-channel" else "uint8"

    def cache_layout(self) -> CacheLayout:
        """How the runtime allocates past_key/past_value for this layer: the codec's rows, as edgeattn's ring."""
        return CacheLayout(self.kv_heads, self.ring_slots, self.row_width, self.cache_dtype(), ring=True,
                           max_positions=None if self.has_rotary else self.max_length)

    def functions(self) -> list[onnx.FunctionProto]:
        """The layer's body and its codec (inlined by the exporter: the saved graph holds standard ops only)."""
        codec = []
        for op_type in ("EncodeKV", "DecodeKV"):
            codec += edgeattn_functions.function_protos(op_type, self.kv_cache, self.kv_quant)
        unique = list({(function.domain, function.name): function for function in codec}.values())
        return [*unique, *onnx_ring_function.helper_functions(), onnx_ring_function.codec_ring_function(
            self.num_heads, self.kv_heads, self.head_dim, self.sinks, self.window, self.has_rotary,
            int8_channel=self.kv_cache == "int8" and self.kv_quant == "per-channel")]

    def prepare_step(self, length: int, attention_mask: torch.Tensor) -> CodecRingStep:
        """The tensors every layer shares for a step of ``length`` new tokens (``attention_mask`` [B, T])."""
        sinks, window, ring = self.sinks, self.window, self.ring_slots
        batch, total = attention_mask.shape
        q_pos = torch.arange(length) + (total - length)  # [L]
        first, end = q_pos[0], q_pos[-1] + 1  # P, T as tensors
        slot_index = torch.arange(ring)
        latest = slot_index + ((end - 1 - slot_index).clamp_min(0) // window) * window
        true_position = torch.where(slot_index < sinks, slot_index, latest)  # [C] once this step is written
        rotated_at = torch.where(slot_index < sinks, slot_index + (end - ring).clamp_min(0), latest)  # sinks at e + j
        query, key = q_pos[:, None], true_position[None, :]
        visible = (slot_index < end)[None, :] & (key <= query) & (((query - key) < window) | (key < sinks))
        slot = torch.where(q_pos < sinks, q_pos, sinks + (q_pos - sinks).clamp_min(0) % window)
        cos_slots, sin_slots = rope_angles.cos_sin(rotated_at, self.inv_freq64, self.rotary_scaling)
        cos, sin = rope_angles.cos_sin(q_pos, self.inv_freq64, self.rotary_scaling)
        return CodecRingStep(
            end - first == 1, torch.where(visible, 0.0, MASKED), cos_slots, sin_slots, slot_index.expand(batch, ring),
            slot[None, None, :, None].expand(batch, self.kv_heads, length, self.row_width), q_pos, slot, cos, sin,
            torch.arange(length).expand(batch, length), torch.zeros(batch, self.kv_heads, 1, self.head_dim))

    def attend(self, attn: EdgeAttention, h: torch.Tensor, attention_mask: torch.Tensor,
               past_key: torch.Tensor, past_value: torch.Tensor, step: CodecRingStep):
        batch, length, _ = h.shape
        qkv = h @ self.qkv_weight_T + (self.qkv_bias if self.qkv_bias is not None else 0)  # one MatMul
        scales = (self.k_scale, self.v_scale) if self.scales else ()
        inputs = (qkv, past_key, past_value, *step.function_inputs()[:-1], self.inv_freq64, step.batch_zeros,
                  *scales)
        output, present_key, present_value = torch.onnx.ops.symbolic_multi_out(
            f"{onnx_ring_function.DOMAIN}::CodecRing", inputs, {"rotary_scaling": float(self.rotary_scaling)},
            dtypes=(qkv.dtype, past_key.dtype, past_value.dtype),
            shapes=((batch, length, self.num_heads * self.head_dim), past_key.shape, past_value.shape),
            version=onnx_ring_function.VERSION)
        return attn.o_proj(output), present_key, present_value


_BYTES = {"float16": 2, "int8": 1, "uint8": 1}


def register_rotary(lowering: nn.Module, attn: EdgeAttention) -> None:
    """``has_rotary``, ``rotary_scaling`` and the float64 ``inv_freq64`` buffer the ring's angles are computed from."""
    rotary = attn.rotary
    lowering.has_rotary = rotary is not None
    lowering.rotary_scaling = rotary.attention_scaling if rotary is not None else 1.0
    inv_freq = rotary.inv_freq if rotary is not None else torch.zeros(attn.head_dim // 2)
    lowering.register_buffer("inv_freq64", inv_freq.detach().to(torch.float64).clone())


def register_packed_qkv(lowering: nn.Module, attn: EdgeAttention) -> None:
    """The layer's q/k/v projections as one MatMul (``qkv_weight_T``, optional ``qkv_bias``)."""
    weight, bias = packed_qkv(attn)
    lowering.register_buffer("qkv_weight_T", weight)
    lowering.register_buffer("qkv_bias", bias)
