"""Lowering to onnxruntime's ``com.microsoft.GroupQueryAttention`` contrib op.

Dimension legend: B batch, L new tokens, H query heads, Hkv kv heads, D head dim, C cache capacity.

What the op covers (onnxruntime >= 1.32, CPU and CUDA):
* full causal attention over a max-length cache buffer shared by past and present;
* a sliding window without sinks (``local_window_size``; the window is "the current
  token plus W-1 previous keys", i.e. edgeattn's ``window``) with a window-sized cache
  (``sliding_window_cache=1``: constant memory, the op evicts internally);
* RoPE inside the op (``do_rotary`` with cos/sin caches, rotate-half layout);
* a per-channel static int8/int4 KV cache (``k_quant_type=PER_CHANNEL``, scales
  [1, Hkv, 1, D], int4 packed two codes per byte);
* packed QKV: the op takes one [B, L, (H + 2*Hkv)*D] query input when key and value are
  omitted, so the three projections leave as one MatMul (as onnxruntime-genai emits them):
  at batch-1 decode every MatMul node costs a thread-pool dispatch, and SmolLM2 went from
  7 to 5 per layer.

Not covered (use the ``edgeattn`` lowering): attention sinks, hierarchical selection,
per-token KV quantization, an fp16 cache beside fp32 activations, learned positions, and a
window with a quantized cache (the op quantizes rotated keys; the ring buffer stores them
unrotated). RoPE angles are absolute positions, so a model exported with
this lowering generates at most ``max_length`` tokens even with a window.
"""

from __future__ import annotations

import torch

from edgeattn.exporters.lowering_contract import CacheLayout, LoweringBase
from edgeattn.exporters.packed_qkv import packed_qkv
from edgeattn.models.attention import EdgeAttention
from edgeattn.spec import AttentionSpec

NAME = "ort"


def unsupported_reason(spec: AttentionSpec, provider: str, has_rotary: bool) -> str | None:
    """Why this lowering cannot represent ``spec`` exactly, or None when it can."""
    if spec.hierarchical:
        return "hierarchical attention has no onnxruntime op"
    if spec.sinks:
        return "attention sinks have no onnxruntime op"
    if spec.kv_cache == "fp16":
        return "GroupQueryAttention keeps an fp32 cache beside fp32 activations"
    if spec.kv_cache in ("int8", "int4") and spec.kv_quant != "per-channel":
        return "GroupQueryAttention quantizes the cache per channel only"
    if spec.window is not None and spec.kv_cache in ("int8", "int4"):
        return ("GroupQueryAttention quantizes rotated keys, edgeattn's ring buffer stores them unrotated "
                "(so that positions can be reassigned in the cache)")
    if spec.kv_cache == "int4" and provider == "cuda":
        return "the CUDA GroupQueryAttention int4 cache is prompt-only"
    if not has_rotary:
        return "GroupQueryAttention needs rotary positions (learned-position models use the onnx lowering)"
    return None


class GroupQueryAttentionLowering(LoweringBase):
    """Emits one GroupQueryAttention node for one EdgeAttention layer."""

    name = NAME
    domain = "com.microsoft"
    op_type = "GroupQueryAttention"
    opset = 23

    def __init__(self, attn: EdgeAttention, spec: AttentionSpec, max_length: int) -> None:
        super().__init__(attn)
        self.window = spec.window
        self.codec_bits = attn.codec.bits if attn.codec.quantized else None
        self.capacity = spec.window if spec.window is not None else max_length
        cos, sin = attn.rotary.cos_sin(torch.arange(max_length))
        half = self.head_dim // 2
        self.register_buffer("cos_cache", cos[:, :half].contiguous())
        self.register_buffer("sin_cache", sin[:, :half].contiguous())
        if self.codec_bits is not None:
            self.register_buffer("k_scale", attn.codec.k_scale.reshape(1, self.kv_heads, 1, self.head_dim).clone())
            self.register_buffer("v_scale", attn.codec.v_scale.reshape(1, self.kv_heads, 1, self.head_dim).clone())
        weight, bias = packed_qkv(attn)
        self.register_buffer("qkv_weight_T", weight)
        self.register_buffer("qkv_bias", bias)

    def cache_layout(self) -> CacheLayout:
        """How the runtime allocates past_key/past_value for this layer."""
        dtype = {None: "float32", 8: "int8", 4: "uint8"}[self.codec_bits]
        width = self.head_dim // 2 if self.codec_bits == 4 else self.head_dim
        return CacheLayout(self.kv_heads, self.capacity, width, dtype, ring=self.window is not None,
                           max_positions=int(self.cos_cache.shape[0]))

    def attributes(self) -> dict:
        attrs = {"num_heads": self.num_heads, "kv_num_heads": self.kv_heads, "do_rotary": 1,
                 "rotary_interleaved": 0, "scale": self.head_dim**-0.5}
        if self.window is not None:
            attrs.update(local_window_size=self.window, sliding_window_cache=1)
        if self.codec_bits is not None:
            attrs.update(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=self.codec_bits)
        return attrs

    def attend(self, attn: EdgeAttention, h: torch.Tensor, attention_mask: torch.Tensor,
               past_key: torch.Tensor, past_value: torch.Tensor, step: None):
        batch, length, _ = h.shape
        qkv = h @ self.qkv_weight_T  # [B, L, (H + 2*Hkv)*D]: query, key, value side by side
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias
        seqlens_k = (attention_mask.sum(1) - 1).to(torch.int32)  # [B]: index of each row's last token
        total_sequence_length = torch.tensor(attention_mask.shape[1], dtype=torch.int32)
        # Every row's chunk is all valid tokens; giving it lets batch > 1 prefill on top of a cache.
        query_seqlens = torch.full((batch,), length, dtype=torch.int32)
        scales = (self.k_scale, self.v_scale) if self.codec_bits is not None else (None, None)
        inputs = (qkv, None, None, past_key, past_value, seqlens_k, total_sequence_length,
                  self.cos_cache, self.sin_cache, None, None, None, *scales, None, None, query_seqlens)
        output, present_key, present_value = torch.onnx.ops.symbolic_multi_out(
            f"{self.domain}::{self.op_type}", inputs, self.attributes(),
            dtypes=(qkv.dtype, past_key.dtype, past_value.dtype),
            shapes=((batch, length, self.num_heads * self.head_dim), past_key.shape, past_value.shape),
            version=1,
        )
        return attn.o_proj(output), present_key, present_value
