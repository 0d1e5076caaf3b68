"""AttentionSpec validation: impossible combinations name the conflicting fields."""

from __future__ import annotations

import pytest

from edgeattn.spec import AttentionSpec, SpecError


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"sinks": 4}, "sinks needs window"),
        ({"top_blocks": 2}, "top_blocks/block_mass need block_size"),
        ({"block_size": 16}, "block_size needs top_blocks"),
        ({"block_size": 16, "top_blocks": 2, "window": 8}, r"window \(8\) must be >= block_size \(16\)"),
        ({"block_size": 16, "top_blocks": 2, "block_mass": 1.5}, "block_mass must be in"),
        ({"kv_heads": 0}, "kv_heads must be a positive integer"),
        ({"window": -1}, "window must be a positive integer"),
        ({"kv_cache": "int3"}, "kv_cache must be one of"),
        ({"kv_quant": "per-row"}, "kv_quant must be one of"),
        ({"gqa_method": "svd"}, "gqa_method must be one of"),
        ({"uptrain_steps": 10, "kv_heads": 1, "gqa_method": "mean"}, "uptrain_steps needs gqa_method='calibrated'"),
        ({"uptrain_steps": 10}, "uptrain_steps needs kv_heads"),
        ({"uptrain_minutes": 5}, "uptrain_minutes needs kv_heads"),
        ({"kv_residual": 8}, "kv_residual needs kv_cache int8 or int4 with kv_quant per-token"),
        ({"kv_residual": 8, "kv_cache": "int4"}, "kv_residual needs kv_cache int8 or int4 with kv_quant per-token"),
        ({"kv_residual": -1}, "kv_residual must be an integer >= 0"),
        ({"kv_residual": 8, "kv_cache": "int4", "kv_quant": "per-token", "window": 64}, "full KV cache only"),
        ({"uptrain_minutes": 5, "kv_heads": 1, "gqa_method": "mean"}, "uptrain_minutes needs gqa_method='calibrated'"),
        ({"uptrain_minutes": 5, "uptrain_steps": 3, "kv_heads": 1}, "not both"),
        ({"uptrain_minutes": 0, "kv_heads": 1}, "uptrain_minutes must be a finite number of minutes > 0"),
        ({"uptrain_minutes": float("inf"), "kv_heads": 1}, "uptrain_minutes must be a finite"),
        ({"uptrain_minutes": True, "kv_heads": 1}, "uptrain_minutes must be a finite"),
        ({"uptrain_minutes": "5", "kv_heads": 1}, "uptrain_minutes must be a finite"),
    ],
)
def test_impossible_specs_are_rejected(fields, message):
    with pytest.raises(SpecError, match=message):
        AttentionSpec(**fields)


def test_derived_properties():
    assert AttentionSpec().is_identity
    ring = AttentionSpec(window=512, sinks=4)
    assert ring.ring_buffer and not ring.hierarchical and ring.local_window is None
    hier = AttentionSpec(block_size=64, top_blocks=8, sinks=4)
    assert hier.hierarchical and not hier.ring_buffer and hier.local_window == 64
    assert AttentionSpec(kv_cache="int4").kv_bits == 4


def test_round_trip_through_dict():
    spec = AttentionSpec(kv_heads=1, window=256, sinks=4, kv_cache="int8")
    assert AttentionSpec.from_dict(spec.to_dict()) == spec
    assert "uptrain_minutes" not in spec.to_dict()  # fields added later stay out at their default
    budget = AttentionSpec(kv_heads=1, uptrain_minutes=2.5)
    assert budget.to_dict()["uptrain_minutes"] == 2.5 and AttentionSpec.from_dict(budget.to_dict()) == budget
    with pytest.raises(SpecError, match="unknown attention spec keys: colour"):
        AttentionSpec.from_dict({"colour": "blue"})
