"""Choosing how each layer's attention leaves the exporter (``--attention-op``).

Three lowerings, fastest first; ``auto`` takes the first that represents the spec
exactly on the provider:

* ``ort``: onnxruntime's fused ``com.microsoft.GroupQueryAttention`` (``ort_gqa``);
* ``onnx``: standard ONNX ops, ``Attention`` over a max-length cache (``onnx_attention``,
  int8/int4 codes decoded per step by ``onnx_quant_cache``), over a constant-memory ring
  for a window, sinks and any cache precision included (``onnx_ring``), or over the rows
  hierarchical attention selects, with block summaries kept in the cache (``onnx_hierarchical``);
* ``edgeattn``: edgeattn's own ops with ONNX function bodies (``edgeattn_ops``): the
  reference semantics; it represents every spec but a residual window (which ``onnx``
  represents), and hierarchical attention over an fp16/int8/int4 cache only it, so ``auto``
  always finds one.

``auto`` also skips a lowering that would keep a windowed spec in a max-length cache: a
window is asked for to get constant memory (every lowering here keeps a ring today).

Measured decode ms/token (SmolLM2-135M, identity spec, fp32 weights, max_length 2048,
onnxruntime 1.32 CPU, 1 thread, median of interleaved runs on a shared, loaded 2-core
machine; two sessions half an hour apart):

    prompt + greedy steps (runs)    ort    onnx   edgeattn
    32 + 64 (3)                     122    120    134
    32 + 64 (3)                      81     87    101
    1000 + 24 (2)                   131    151    174
    1000 + 32 (3)                   103    113    123

The weights dominate at short context (ort and onnx tie within noise there); the gap
grows with the context, hence the order. For the forms ``ort`` cannot take (sinks, a
window with a quantized or fp16 cache, per-token caches) ``onnx`` is faster than the
``edgeattn`` bodies, which rotate every cached key in ~30 small ops per step: see
``benchmarks/speed_findings.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from edgeattn.choices import ATTENTION_OPS
from edgeattn.errors import EdgeattnError
from edgeattn.exporters import edgeattn_ops, onnx_attention, ort_gqa
from edgeattn.exporters.checks import fused_op_name
from edgeattn.exporters.lowering_contract import AttentionLowering
from edgeattn.models.attention import EdgeAttention
from edgeattn.spec import AttentionSpec


@dataclass(frozen=True)
class _Lowering:
    name: str
    unsupported_reason: Callable[[AttentionSpec, str, bool], str | None]
    for_layer: Callable[[EdgeAttention, AttentionSpec, int], AttentionLowering]  # (attn, spec, max_length)
    ring: bool  # keeps a windowed spec in a constant-memory ring


# Fastest first (see the module docstring for the measurement).
_PREFERENCE = (
    _Lowering(ort_gqa.NAME, ort_gqa.unsupported_reason, ort_gqa.GroupQueryAttentionLowering, ring=True),
    _Lowering(onnx_attention.NAME, onnx_attention.unsupported_reason, onnx_attention.lowering_for, ring=True),
    _Lowering(edgeattn_ops.NAME, edgeattn_ops.unsupported_reason, edgeattn_ops.lowering_for, ring=True),
)


class LoweringError(EdgeattnError, ValueError):
    """The requested lowering cannot represent the attention spec exactly."""


@dataclass(frozen=True)
class LoweringChoice:
    """The lowering picked for a model: one module per layer, and why each other lowering was not used."""

    name: str
    layers: list[AttentionLowering] = field(repr=False)
    not_chosen: dict[str, str]

    def to_dict(self) -> dict:
        return {"chosen": self.name, "per_layer": [layer.name for layer in self.layers],
                "op_per_layer": [fused_op_name(layer) for layer in self.layers], "not_chosen": self.not_chosen}


def choose_lowerings(decoder, spec: AttentionSpec, attention_op: str, provider: str, max_length: int) -> LoweringChoice:
    """The lowering of every layer (in layer order) for ``attention_op`` ("auto" or a lowering name)."""
    if attention_op not in ATTENTION_OPS:
        raise LoweringError(f"attention op must be one of {', '.join(ATTENTION_OPS)}; got {attention_op!r}")
    auto = attention_op == "auto"
    has_rotary = decoder.rotary is not None
    reasons = {entry.name: _reason(entry, spec, provider, has_rotary, auto) for entry in _PREFERENCE}
    candidates = [entry for entry in _PREFERENCE if auto or entry.name == attention_op]
    chosen = next((entry for entry in candidates if reasons[entry.name] is None), None)
    if chosen is None:
        raise LoweringError("no attention lowering represents this spec exactly: "
                            + "; ".join(f"{entry.name}: {reasons[entry.name]}" for entry in candidates))
    not_chosen = {}
    for entry in _PREFERENCE:
        if entry is not chosen:
            not_chosen[entry.name] = reasons[entry.name] or (
                f"slower than {chosen.name} (auto takes the fastest exact lowering)" if auto
                else f"--attention-op {attention_op} was requested")
    layers = [chosen.for_layer(attn, spec, max_length) for attn in decoder.attentions()]
    return LoweringChoice(chosen.name, layers, not_chosen)


def check_lowering_request(spec: AttentionSpec, attention_op: str, provider: str) -> None:
    """Refuse, before any model loads, a requested lowering that cannot represent ``spec`` whatever the model
    (reasons that depend on the model, such as rotary positions, are left to ``choose_lowerings``)."""
    if attention_op == "auto":
        return
    entry = next(entry for entry in _PREFERENCE if entry.name == attention_op)
    reason = entry.unsupported_reason(spec, provider, True)  # a model without rotary positions only adds reasons
    if reason is not None:
        raise LoweringError(f"no attention lowering represents this spec exactly: {entry.name}: {reason}")


def _reason(entry: _Lowering, spec: AttentionSpec, provider: str, has_rotary: bool, auto: bool) -> str | None:
    reason = entry.unsupported_reason(spec, provider, has_rotary)
    if reason is None and auto and spec.ring_buffer and not entry.ring:
        reason = "keeps a window in a max-length cache, not a constant-memory ring (auto wants the ring)"
    return reason
