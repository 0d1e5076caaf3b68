"""Choosing how each layer's attention leaves the exporter (``--attention-op``)."""

from __future__ import annotations

from edgeattn.errors import EdgeattnError
from edgeattn.exporters import ort_gqa
from edgeattn.spec import AttentionSpec

ATTENTION_OPS = ("auto", "ort", "onnx", "edgeattn")
# (name, why-not, lowering class), fastest first: auto takes the first that represents the spec exactly.
_PREFERENCE = (
    (ort_gqa.NAME, ort_gqa.unsupported_reason, ort_gqa.GroupQueryAttentionLowering),
)


class LoweringError(EdgeattnError, ValueError):
    """The requested lowering cannot represent the attention spec exactly."""


def choose_lowerings(decoder, spec: AttentionSpec, attention_op: str, provider: str, max_length: int) -> list:
    """One lowering module per layer, in layer order."""
    if attention_op not in ATTENTION_OPS:
        raise LoweringError(f"attention op must be one of {', '.join(ATTENTION_OPS)}; got {attention_op!r}")
    has_rotary = decoder.rotary is not None
    candidates = [entry for entry in _PREFERENCE if attention_op in ("auto", entry[0])]
    reasons = []
    for name, unsupported_reason, lowering in candidates:
        reason = unsupported_reason(spec, provider, has_rotary)
        if reason is None:
            return [lowering(attn, spec, max_length) for attn in decoder.attentions()]
        reasons.append(f"{name}: {reason}")
    if not candidates:
        reasons.append(f"the {attention_op} lowering is not implemented yet")
    raise LoweringError("no attention lowering represents this spec exactly: " + "; ".join(reasons))
