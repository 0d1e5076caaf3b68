"""Sliding window with attention sinks: constant-memory ring-buffer KV cache."""

from __future__ import annotations

from edgeattn.models.visibility import SinkWindowVisibility
from edgeattn.rewrites._swap import LayerChange, for_each_attention
from edgeattn.spec import AttentionSpec

NAME = "window"


def applies(spec: AttentionSpec) -> bool:
    return spec.ring_buffer


def enable_sink_window(model, spec: AttentionSpec, calibration=None) -> list[LayerChange]:
    def change(index, attn) -> str:
        attn.visibility = SinkWindowVisibility(spec.window, spec.sinks)
        return f"sliding window {spec.window} + {spec.sinks} sinks, ring of {spec.sinks + spec.window} slots"

    return for_each_attention(model, NAME, change)
