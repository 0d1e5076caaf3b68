"""Hierarchical block-sparse attention: block summaries select the blocks to attend."""

from __future__ import annotations

from edgeattn.models.visibility import HierarchicalVisibility
from edgeattn.rewrites._swap import LayerChange, for_each_attention
from edgeattn.spec import AttentionSpec

NAME = "hierarchical"


def applies(spec: AttentionSpec) -> bool:
    return spec.hierarchical


def enable_hierarchical(model, spec: AttentionSpec, calibration=None) -> list[LayerChange]:
    def change(index, attn) -> str:
        attn.visibility = HierarchicalVisibility(
            spec.block_size, spec.top_blocks, spec.local_window, spec.sinks, spec.block_mass, spec.block_select)
        mass = f", mass {spec.block_mass}" if spec.block_mass is not None else ""
        shared = " shared per kv head" if spec.block_select == "kv-head" else ""
        return (f"blocks of {spec.block_size}, top {spec.top_blocks}{shared}{mass}, "
                f"local window {spec.local_window}, {spec.sinks} sinks")

    return for_each_attention(model, NAME, change)
