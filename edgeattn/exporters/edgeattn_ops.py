"""Lowering to edgeattn's own fused ops (domain ``edgeattn``): attention forms no standard op covers.

Dimension legend: B batch, L new tokens, H query heads, Hkv kv heads, D head dim,
C cache capacity, W width of one cached row (see ``edgeattn_functions``).

One node per layer, chosen by the layer's visibility policy:

* ``SinkWindowAttention``: sliding window + sinks over a ring of ``sinks + window``
  slots holding *unrotated* keys, rotated at read time by their position in the cache
  (StreamingLLM), so memory is constant and generation is unlimited (``max_positions``
  None with RoPE).
* ``QuantKVAttention``: full causal attention over a max-length cache of rotated keys.
* ``HierarchicalAttention``: full cache, block summaries, top blocks (and block mass),
  sinks and a local window.

Every op takes any KV codec: fp32, fp16, int8/int4 per-channel (static scales as
initializers) or per-token (codes and fp16 scales/minimums stored together in uint8
rows). The buffers hold the real codes: their bytes are ``KVCodec.bytes_per_token``
per token. Learned-position models pass ``inv_freq`` = zeros (no rotation).

The op bodies (``edgeattn_functions``) travel in the model (``export_graph`` calls
``attach_functions``); onnxruntime inlines them into plain ops, so this lowering is
exact and portable but not fast. A backend can implement the ops natively by domain,
name and attributes.
"""

from __future__ import annotations

import onnx
import torch

from edgeattn.exporters import edgeattn_functions
from edgeattn.exporters.lowering_contract import AttentionLowering, CacheLayout, LoweringBase
from edgeattn.models.attention import EdgeAttention
from edgeattn.models.visibility import FullVisibility, HierarchicalVisibility, SinkWindowVisibility
from edgeattn.spec import AttentionSpec

NAME = "edgeattn"
DOMAIN = edgeattn_functions.DOMAIN
_FP16_PARAM_BYTES = 2


def unsupported_reason(spec: AttentionSpec, provider: str, has_rotary: bool) -> str | None:
    """Why this lowering cannot represent ``spec`` exactly, or None when it can."""
    if spec.kv_residual:
        return "a residual window of full-precision tokens (the onnx lowering keeps it)"
    return None


def lowering_for(attn: EdgeAttention, spec: AttentionSpec, max_length: int) -> EdgeattnLowering:
    """The lowering of one layer, by its visibility policy (the rewritten model is the source of truth)."""
    for visibility_type, lowering in _BY_VISIBILITY:
        if isinstance(attn.visibility, visibility_type):
            return lowering(attn, spec, max_length)
    raise TypeError(f"no edgeattn op for visibility {type(attn.visibility).__name__}")


class EdgeattnLowering(LoweringBase):
    """Shared by the three ops: projections, codec, RoPE frequencies, the node itself."""

    name = NAME
    domain = DOMAIN
    op_type = ""
    opset = edgeattn_functions.OPSET  # the bodies' default opset, which must be the model's

    def __init__(self, attn: EdgeAttention, spec: AttentionSpec, max_length: int) -> None:
        super().__init__(attn)
        codec = attn.codec
        self.kv_cache = codec.dtype
        self.kv_quant = codec.mode if codec.quantized else "none"
        self.key_groups = self.head_dim // codec.key_group()
        if codec.dtype == "int4" and self.head_dim % 2:
            raise ValueError(f"an int4 KV cache packs two codes per byte: head_dim {self.head_dim} is odd")
        rotary = attn.rotary
        # Learned positions: zero frequencies rotate by angle 0, i.e. not at all.
        inv_freq = rotary.inv_freq if rotary is not None else torch.zeros(self.head_dim // 2)
        self.register_buffer("inv_freq", inv_freq.detach().clone().float())
        self.rotary_scaling = rotary.attention_scaling if rotary is not None else 1.0
        self.has_rotary = rotary is not None
        self.max_length = max_length
        self.scales = codec.quantized and codec.mode == "per-channel"
        if self.scales:
            shape = (1, self.kv_heads, 1, self.head_dim)
            self.register_buffer("k_scale", codec.k_scale.reshape(shape).detach().clone())
            self.register_buffer("v_scale", codec.v_scale.reshape(shape).detach().clone())

    # -- what the runtime and the manifest need -------------------------------------------

    @property
    def capacity(self) -> int:
        return self.max_length

    @property
    def ring(self) -> bool:
        return False

    def row_width(self) -> int:
        """Elements of the cache dtype per token per kv head (the last buffer axis)."""
        codes = self.head_dim // 2 if self.kv_cache == "int4" else self.head_dim
        if self.kv_quant == "per-token":
            codes += (self.key_groups + 1) * _FP16_PARAM_BYTES  # key row: scales, value row: minimums
        return codes

    def cache_dtype(self) -> str:
        if self.kv_cache in ("fp32", "fp16"):
            return {"fp32": "float32", "fp16": "float16"}[self.kv_cache]
        return "int8" if self.kv_cache == "int8" and self.kv_quant == "per-channel" else "uint8"

    def cache_layout(self) -> CacheLayout:
        """How the runtime allocates past_key/past_value for this layer."""
        unlimited = self.ring and self.has_rotary  # positions are reassigned inside the ring
        return CacheLayout(self.kv_heads, self.capacity, self.row_width(), self.cache_dtype(), ring=self.ring,
                           max_positions=None if unlimited else self.max_length)

    def functions(self) -> list[onnx.FunctionProto]:
        """The FunctionProtos this layer's node needs (same for every layer of a model)."""
        return edgeattn_functions.function_protos(self.op_type, self.kv_cache, self.kv_quant)

    # -- export ---------------------------------------------------------------------------

    def attributes(self) -> dict:
        return {"num_heads": self.num_heads, "kv_num_heads": self.kv_heads, "scale": self.head_dim**-0.5,
                "rotary_scaling": float(self.rotary_scaling), "kv_cache": self.kv_cache, "kv_quant": self.kv_quant}

    def attend(self, attn: EdgeAttention, h: torch.Tensor, attention_mask: torch.Tensor,
               past_key: torch.Tensor, past_value: torch.Tensor, step: None):
        batch, length, _ = h.shape
        query, key, value = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)  # [B, L, H*D], [B, L, Hkv*D] x2
        scales = (self.k_scale, self.v_scale) if self.scales else ()
        output, present_key, present_value = torch.onnx.ops.symbolic_multi_out(
            f"{DOMAIN}::{self.op_type}",
            (query, key, value, past_key, past_value, attention_mask, self.inv_freq, *scales),
            self.attributes(),
            dtypes=(query.dtype, past_key.dtype, past_value.dtype),
            shapes=((batch, length, self.num_heads * self.head_dim), past_key.shape, past_value.shape),
            version=edgeattn_functions.VERSION,
        )
        return attn.o_proj(output), present_key, present_value


class SinkWindowLowering(EdgeattnLowering):
    """Ring of sinks + window unrotated keys; constant memory, unlimited generation with RoPE."""

    op_type = "SinkWindowAttention"

    def __init__(self, attn: EdgeAttention, spec: AttentionSpec, max_length: int) -> None:
        super().__init__(attn, spec, max_length)
        self.window, self.sinks = attn.visibility.window, attn.visibility.sinks

    @property
    def capacity(self) -> int:
        return self.sinks + self.window

    @property
    def ring(self) -> bool:
        return True

    def attributes(self) -> dict:
        return {**super().attributes(), "window": self.window, "sinks": self.sinks}


class QuantKVLowering(EdgeattnLowering):
    """Full causal attention over a max-length cache in any codec."""

    op_type = "QuantKVAttention"


class HierarchicalLowering(EdgeattnLowering):
    """Block-sparse attention over a full cache (Quest-style block summaries)."""

    op_type = "HierarchicalAttention"

    def __init__(self, attn: EdgeAttention, spec: AttentionSpec, max_length: int) -> None:
        super().__init__(attn, spec, max_length)
        visibility = attn.visibility
        self.block_size, self.top_blocks = visibility.block_size, visibility.top_blocks
        self.local_window, self.sinks, self.block_mass = visibility.local_window, visibility.sinks, visibility.block_mass
        self.shared_blocks = int(visibility.select == "kv-head")

    def attributes(self) -> dict:
        return {**super().attributes(), "block_size": self.block_size, "top_blocks": self.top_blocks,
                "local_window": self.local_window, "sinks": self.sinks,
                "block_mass": float(self.block_mass) if self.block_mass is not None else 0.0,  # 0: off
                "shared_blocks": self.shared_blocks}


_BY_VISIBILITY = (
    (SinkWindowVisibility, SinkWindowLowering),
    (HierarchicalVisibility, HierarchicalLowering),
    (FullVisibility, QuantKVLowering),
)


def attach_functions(model: onnx.ModelProto, lowerings: list[AttentionLowering]) -> int:
    """Append the FunctionProtos the lowerings' nodes need to ``model``; returns how many were added.

    Idempotent (a function already in the model is kept). The bodies use the model's
    default opset, which the ONNX checker requires of model-local functions.
    """
    present = {(function.domain, function.name) for function in model.functions}
    model_opset = {entry.domain: entry.version for entry in model.opset_import}
    added = 0
    for lowering in lowerings:
        for function in lowering.functions():
            if (function.domain, function.name) in present:
                continue
            function_opset = {entry.domain: entry.version for entry in function.opset_import}
            # An inlined body's nodes join the model's opset; a kept one must import it.
            if not lowering.inline_functions and function_opset.get("", model_opset.get("")) != model_opset.get(""):
                raise ValueError(f"function {function.name} imports opset {function_opset['']}, "
                                 f"the model {model_opset.get('')}")
            model.functions.append(function)
            present.add((function.domain, function.name))
            added += 1
            if function.domain not in model_opset:  # the domain of the nodes that call it
                model.opset_import.append(onnx.helper.make_opsetid(function.domain, edgeattn_functions.VERSION))
                model_opset[function.domain] = edgeattn_functions.VERSION
    return added
