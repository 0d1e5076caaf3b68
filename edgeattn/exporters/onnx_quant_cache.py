"""A max-length int8/int4 KV cache (per channel or per token) on standard ONNX ops.

Dimension legend: B batch, L new tokens, H query heads, Hkv kv heads, D head dim,
C capacity (max_length), W bytes of one cached row, P cached tokens, T = P + L.

No standard op reads quantized keys, so each step encodes the new rotated keys and values
into the codec's rows (``edgeattn_functions``' ``EncodeKV``: the rows the edgeattn lowering
stores, bit for bit), writes them at P in place (``TensorScatter``), decodes rows 0..T-1
(``DecodeKV``) and hands floats to ``Attention``. The codec functions are inlined at export,
so the graph holds standard ops only. With a residual window of R tokens (KIVI) the layer also
keeps its last R rotated keys and values in float32 buffers (``key_residual``/``value_residual``,
a shift register: row r holds position P - R + r); ``Attention`` reads the decoded rows and those
R + L full-precision rows, and a boolean mask lets each query see every position once: through
the codec when it is R or more tokens old, at full precision otherwise.
Decoding every cached row every step costs O(T) work per layer: onnxruntime's
``GroupQueryAttention`` reads a per-channel int8/int4 cache inside its kernel, so ``auto`` keeps
those on ``ort``; this lowering is what per-token caches run on.
"""

from __future__ import annotations

import onnx
import torch

from edgeattn.exporters import edgeattn_functions
from edgeattn.exporters.lowering_contract import CacheLayout, ExtraBuffer, LoweringBase
from edgeattn.exporters.packed_qkv import packed_qkv, split_heads
from edgeattn.models.attention import EdgeAttention
from edgeattn.spec import AttentionSpec

NAME = "onnx"
OPSET = 24  # TensorScatter, Attention's nonpad_kv_seqlen
_CODEC_DOMAIN = edgeattn_functions.DOMAIN


class QuantCacheLowering(LoweringBase):
    """Emits RotaryEmbedding x2, EncodeKV, TensorScatter x2, Slice x2, DecodeKV (inlined) and Attention; with a
    residual window also Concat x4 and Slice x2 (the shift registers) and the step's boolean mask."""

    name = NAME
    op_type = "Attention"
    opset = OPSET
    inline_functions = True
    keeps_residual = True

    def __init__(self, attn: EdgeAttention, spec: AttentionSpec, max_length: int) -> None:
        super().__init__(attn)
        codec = attn.codec
        if not codec.quantized:
            raise ValueError(f"a {codec.dtype} cache needs no codec functions (FullCacheLowering)")
        if codec.dtype == "int4" and attn.head_dim % 2:
            raise ValueError(f"an int4 KV cache packs two codes per byte: head_dim {attn.head_dim} is odd")
        self.capacity = max_length
        self.kv_cache, self.kv_quant = codec.dtype, codec.mode
        self.residual = codec.residual
        self.dtype = torch.int8 if codec.dtype == "int8" and codec.mode == "per-channel" else torch.uint8
        self.row_width = codec.bytes_per_token() // (2 * self.kv_heads)
        self.has_rotary = attn.rotary is not None
        if self.has_rotary:
            cos, sin = attn.rotary.cos_sin(torch.arange(max_length))  # attention scaling folded in
            half = self.head_dim // 2
            self.register_buffer("cos_cache", cos[:, :half].contiguous())  # [C, D/2]
            self.register_buffer("sin_cache", sin[:, :half].contiguous())
        self.scales = codec.mode == "per-channel"
        if self.scales:
            shape = (1, self.kv_heads, 1, self.head_dim)
            self.register_buffer("k_scale", codec.k_scale.reshape(shape).detach().clone())
            self.register_buffer("v_scale", codec.v_scale.reshape(shape).detach().clone())
        self.register_buffer("head_dim_tensor", torch.tensor([self.head_dim]))
        weight, bias = packed_qkv(attn)
        self.register_buffer("qkv_weight_T", weight)
        self.register_buffer("qkv_bias", bias)

    def cache_layout(self) -> CacheLayout:
        """How the runtime allocates past_key/past_value for this layer: the codec's rows."""
        dtype = "int8" if self.dtype == torch.int8 else "uint8"
        extra = ()
        if self.residual:
            shape = (self.kv_heads, self.residual, self.head_dim)
            extra = (ExtraBuffer("key_residual", shape, "float32"), ExtraBuffer("value_residual", shape, "float32"))
        return CacheLayout(self.kv_heads, self.capacity, self.row_width, dtype, ring=False, max_positions=self.capacity,
                           extra=extra)

    def prepare_step(self, length: int, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """With a residual window: which keys each new token sees, bool [L, T + R + L] over the decoded rows
        0..T-1 then the full-precision positions P - R .. T - 1 (each position once, by its age)."""
        if not self.residual:
            return None
        total = attention_mask.shape[1]
        past = total - length
        query = (torch.arange(length) + past)[:, None]  # [L, 1]
        decoded = torch.arange(total)[None, :]  # [1, T]
        recent = (torch.arange(self.residual + length) + (past - self.residual))[None, :]  # [1, R + L]
        old_enough = decoded + self.residual <= query
        young = (recent >= 0) & (recent <= query) & (recent + self.residual > query)
        return torch.cat((old_enough, young), 1)

    def functions(self) -> list[onnx.FunctionProto]:
        """The codec (inlined by the exporter: the saved graph holds standard ops only)."""
        codec = []
        for op_type in ("EncodeKV", "DecodeKV"):
            codec += edgeattn_functions.function_protos(op_type, self.kv_cache, self.kv_quant)
        return list({(function.domain, function.name): function for function in codec}.values())

    def attend(self, attn: EdgeAttention, h: torch.Tensor, attention_mask: torch.Tensor,
               past_key: torch.Tensor, past_value: torch.Tensor, step: torch.Tensor | None, *past_residual: torch.Tensor):
        batch, length, _ = h.shape
        total = attention_mask.shape[1]  # T: every row holds T tokens (the mask's values are not read)
        past = total - length
        q, k, v = split_heads(h @ self.qkv_weight_T + (self.qkv_bias if self.qkv_bias is not None else 0),
                              self.num_heads, self.kv_heads, self.head_dim)
        if self.has_rotary:
            positions = (torch.arange(length) + past).expand(batch, length)  # [B, L]
            q = torch.onnx.ops.rotary_embedding(q, self.cos_cache, self.sin_cache, positions)
            k = torch.onnx.ops.rotary_embedding(k, self.cos_cache, self.sin_cache, positions)
        scales = (self.k_scale, self.v_scale) if self.scales else (None, None)
        rows_shape = (batch, self.kv_heads, length, self.row_width)
        key_rows, value_rows = torch.onnx.ops.symbolic_multi_out(
            f"{_CODEC_DOMAIN}::EncodeKV", (k, v, *scales), {}, dtypes=(self.dtype, self.dtype),
            shapes=(rows_shape, rows_shape), version=edgeattn_functions.VERSION)
        write_at = torch.zeros(batch, dtype=torch.long) + past  # [B]
        present_key = _scatter(past_key, key_rows, write_at)
        present_value = _scatter(past_value, value_rows, write_at)
        held = (batch, self.kv_heads, total, self.head_dim)
        keys, values = torch.onnx.ops.symbolic_multi_out(
            f"{_CODEC_DOMAIN}::DecodeKV",
            (present_key[:, :, :total], present_value[:, :, :total], *scales, self.head_dim_tensor), {},
            dtypes=(q.dtype, q.dtype), shapes=(held, held), version=edgeattn_functions.VERSION)
        presents: tuple[torch.Tensor, ...] = (present_key, present_value)
        if self.residual:
            recent_keys = torch.cat((past_residual[0], k), 2)  # [B, Hkv, R + L, D]: positions P - R .. T - 1
            recent_values = torch.cat((past_residual[1], v), 2)
            keys, values = torch.cat((keys, recent_keys), 2), torch.cat((values, recent_values), 2)
            presents += (recent_keys[:, :, length:], recent_values[:, :, length:])
            output = torch.onnx.ops.symbolic(
                "Attention", (q, keys, values, step), {"is_causal": 0, "scale": self.head_dim**-0.5},
                dtype=q.dtype, shape=q.shape, version=OPSET)  # [B, H, L, D]
        else:
            nonpad = torch.zeros(batch, dtype=torch.long) + total  # [B]
            output = torch.onnx.ops.symbolic(
                "Attention", (q, keys, values, None, None, None, nonpad), {"is_causal": 1, "scale": self.head_dim**-0.5},
                dtype=q.dtype, shape=q.shape, version=OPSET)  # [B, H, L, D]
        output = output.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return (attn.o_proj(output), *presents)


def _scatter(cache: torch.Tensor, rows: torch.Tensor, write_at: torch.Tensor) -> torch.Tensor:
    """cache [B, Hkv, C, W] with rows [B, Hkv, L, W] written at slots write_at..write_at+L-1, in place."""
    return torch.onnx.ops.symbolic("TensorScatter", (cache, rows, write_at), {"axis": 2},
                                   dtype=cache.dtype, shape=cache.shape, version=OPSET)
