"""Lowering to standard ONNX ops only: ``Attention`` (opset 24), RoPE by ``RotaryEmbedding``.

A window (with or without sinks) leaves as the constant-memory ring of ``onnx_ring``,
hierarchical attention as ``onnx_hierarchical`` (block summaries in the cache, only the
selected blocks read); this module covers full caches.

Dimension legend: B batch, L new tokens, H query heads, Hkv kv heads, D head dim,
C cache capacity (max_length), P cached tokens before this step, T = P + L.

Cache contract: the same as the ``ort`` lowering, a max-length buffer [B, Hkv, C, D]
per past/present that the runtime binds to the same memory. Attention-23 alone could
only *grow* its cache (present = concat(past, new): a new, longer buffer each step, fed
back as the next past, the whole cache copied every token). Opset 24 adds what a
shared buffer needs: ``TensorScatter`` writes the new rows at P (in place: onnxruntime
skips its copy when past and present are the same buffer) and Attention's
``nonpad_kv_seqlen`` makes ``is_causal`` bottom-right aligned on a cache that is read
from outside the op. One layer, one step::

    q_rot, k_rot = RotaryEmbedding(q | k, positions P..T-1)     # [B, H|Hkv, L, D]
    present_k = TensorScatter(past_k, k_rot, write_indices=P)  # [B, Hkv, C, D], in place
    keys = Slice(present_k, 0..T)                               # [B, Hkv, T, D]
    y = Attention(q_rot, keys, values, nonpad_kv_seqlen=T, is_causal=1)  # query i sees keys <= P + i

Measured with onnxruntime 1.32 (CPU EP, checked against a numpy reference):

* Attention-24 and -25 run; -25's ``left_window_size`` is exact (with ``nonpad_kv_seqlen``
  too), but it would keep a window in a max-length cache, so windows go to the ring.
* The CPU kernel scores all C rows when given ``nonpad_kv_seqlen`` (decode at T ~ 100
  of one SmolLM2-sized layer, 9 heads / 3 kv heads / D 64: 0.35 ms at C = 2048 vs
  0.06 ms at C = 256), hence the ``Slice`` to T rows first (0.05 ms at either C): a
  step costs O(T), not O(max_length).
* Attention-25 with a 3D query beside a 4D cache gives wrong results (Attention-24
  refuses the mix), so every input is 4D; GQA/MQA is then carried by the head counts
  of Q and K (``q_num_heads``/``kv_num_heads`` are attributes of the 3D form only).

Represented exactly: full causal attention, any number of kv heads, RoPE or learned
positions, an fp32 or fp16 cache (Q and K must share a type, so fp16 rows are cast to
fp32 after the slice; the PyTorch model rounds them to fp16 likewise).
"""

from __future__ import annotations

import torch

from edgeattn.exporters.lowering_contract import AttentionLowering, CacheLayout, LoweringBase
from edgeattn.exporters.onnx_hierarchical import HierarchicalAttentionLowering
from edgeattn.exporters.onnx_quant_cache import QuantCacheLowering
from edgeattn.exporters.onnx_ring import CodecRingLowering, RingAttentionLowering
from edgeattn.models.attention import EdgeAttention
from edgeattn.models.visibility import HierarchicalVisibility, SinkWindowVisibility
from edgeattn.spec import AttentionSpec

NAME = "onnx"
OPSET = 24  # TensorScatter, Attention's nonpad_kv_seqlen
_CACHE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def unsupported_reason(spec: AttentionSpec, provider: str, has_rotary: bool) -> str | None:
    """Why this lowering cannot represent ``spec`` exactly, or None when it can."""
    if spec.hierarchical and spec.kv_cache != "fp32":
        return f"hierarchical attention with an {spec.kv_cache} KV cache (its onnx form keeps fp32 keys)"
    return None


def lowering_for(attn: EdgeAttention, spec: AttentionSpec, max_length: int) -> AttentionLowering:
    """The layer's lowering: the ring (``onnx_ring``) for a window, else Attention over a max-length cache
    of floats (below) or of int8/int4 codes (``onnx_quant_cache``)."""
    if isinstance(attn.visibility, SinkWindowVisibility):
        ring = RingAttentionLowering if attn.codec.dtype == "fp32" else CodecRingLowering
        return ring(attn, spec, max_length)
    if isinstance(attn.visibility, HierarchicalVisibility):
        return HierarchicalAttentionLowering(attn, spec, max_length)
    if attn.codec.quantized:
        return QuantCacheLowering(attn, spec, max_length)
    return FullCacheLowering(attn, spec, max_length)


class FullCacheLowering(LoweringBase):
    """Emits RotaryEmbedding x2, TensorScatter x2 and one Attention node for one EdgeAttention layer."""

    name = NAME
    op_type = "Attention"
    opset = OPSET

    def __init__(self, attn: EdgeAttention, spec: AttentionSpec, max_length: int) -> None:
        super().__init__(attn)
        self.capacity = max_length
        self.cache_dtype = _CACHE_DTYPES[attn.codec.dtype]
        self.has_rotary = attn.rotary is not None
        if self.has_rotary:
            cos, sin = attn.rotary.cos_sin(torch.arange(max_length))  # attention scaling folded in
            half = self.head_dim // 2
            self.register_buffer("cos_cache", cos[:, :half].contiguous())  # [C, D/2]
            self.register_buffer("sin_cache", sin[:, :half].contiguous())

    def cache_layout(self) -> CacheLayout:
        """How the runtime allocates past_key/past_value for this layer."""
        dtype = {torch.float32: "float32", torch.float16: "float16"}[self.cache_dtype]
        return CacheLayout(self.kv_heads, self.capacity, self.head_dim, dtype, ring=False, max_positions=self.capacity)

    def attributes(self) -> dict:
        return {"is_causal": 1, "scale": self.head_dim**-0.5}

    def attend(self, attn: EdgeAttention, h: torch.Tensor, attention_mask: torch.Tensor,
               past_key: torch.Tensor, past_value: torch.Tensor, step: None):
        batch, length, _ = h.shape
        total = attention_mask.shape[1]  # T: every row holds T tokens (the mask's values are not read)
        past = total - length
        q = attn.split_heads(attn.q_proj(h), self.num_heads)  # [B, H, L, D]
        k = attn.split_heads(attn.k_proj(h), self.kv_heads)  # [B, Hkv, L, D]
        v = attn.split_heads(attn.v_proj(h), self.kv_heads)
        if self.has_rotary:
            positions = (torch.arange(length) + past).expand(batch, length)  # [B, L]
            q = torch.onnx.ops.rotary_embedding(q, self.cos_cache, self.sin_cache, positions)
            k = torch.onnx.ops.rotary_embedding(k, self.cos_cache, self.sin_cache, positions)
        write_at = torch.zeros(batch, dtype=torch.long) + past  # [B]
        present_key = self._scatter(past_key, k.to(self.cache_dtype), write_at)
        present_value = self._scatter(past_value, v.to(self.cache_dtype), write_at)
        keys = present_key[:, :, :total].to(q.dtype)  # [B, Hkv, T, D]
        values = present_value[:, :, :total].to(q.dtype)
        nonpad = torch.zeros(batch, dtype=torch.long) + total  # [B]
        output = torch.onnx.ops.symbolic(
            "Attention", (q, keys, values, None, None, None, nonpad), self.attributes(),
            dtype=q.dtype, shape=q.shape, version=self.opset)  # [B, H, L, D]
        output = output.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return attn.o_proj(output), present_key, present_value

    def _scatter(self, cache: torch.Tensor, rows: torch.Tensor, write_at: torch.Tensor) -> torch.Tensor:
        """cache [B, Hkv, C, D] with rows [B, Hkv, L, D] written at slots write_at..write_at+L-1."""
        return torch.onnx.ops.symbolic("TensorScatter", (cache, rows, write_at), {"axis": 2},
                                       dtype=cache.dtype, shape=cache.shape, version=OPSET)
