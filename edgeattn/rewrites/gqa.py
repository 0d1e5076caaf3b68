"""MHA/GQA -> fewer KV heads (GQA/MQA): merge groups of adjacent KV heads into one.

Source kv heads ``g*r .. g*r+r-1`` (r = old/new kv heads) become new kv head ``g``;
the query heads that read them keep their order, so the query-to-kv mapping stays
``h // (H / Hkv)``.

* ``mean``: mean-pool the K and V projections of each group (Ainslie et al. 2023).
* ``calibrated``: fit the merged projections on calibration activations and fold the
  per-head residual maps into W_q and W_o (``edgeattn.rewrites.gqa_calibration``).
"""

from __future__ import annotations

import torch
from torch import nn

from edgeattn.rewrites._swap import LayerChange, RewriteError, for_each_attention
from edgeattn.rewrites.gqa_calibration import calibrated_merge
from edgeattn.rewrites.kv_projections import NAME, set_kv_projections
from edgeattn.spec import AttentionSpec


def applies(spec: AttentionSpec) -> bool:
    return spec.kv_heads is not None


def check_kv_heads(model, spec: AttentionSpec) -> None:
    """Refuse a head count that does not divide every layer's kv heads (before any fit or distillation)."""
    for attn in model.attentions():
        if attn.num_kv_heads % spec.kv_heads:
            raise RewriteError(
                f"kv_heads={spec.kv_heads} must divide the model's {attn.num_kv_heads} kv heads "
                f"(and so its {attn.num_heads} query heads)")


def merge_kv_heads(model, spec: AttentionSpec, calibration: torch.Tensor | None = None) -> list[LayerChange]:
    target = spec.kv_heads
    check_kv_heads(model, spec)
    if spec.gqa_method == "calibrated":
        return calibrated_merge(model, spec, calibration)

    def change(index, attn) -> str:
        source = attn.num_kv_heads
        k_weight, k_bias = _mean_groups(attn.k_proj, source, target, attn.head_dim)
        v_weight, v_bias = _mean_groups(attn.v_proj, source, target, attn.head_dim)
        set_kv_projections(attn, target, k_weight, k_bias, v_weight, v_bias)
        return f"kv heads {source} -> {target} (mean)"

    return for_each_attention(model, NAME, change)


def _mean_groups(proj: nn.Linear, source: int, target: int, head_dim: int):
    ratio = source // target
    weight = proj.weight.detach().view(target, ratio, head_dim, -1).mean(1).reshape(target * head_dim, -1)
    bias = None
    if proj.bias is not None:
        bias = proj.bias.detach().view(target, ratio, head_dim).mean(1).reshape(-1)
    return weight, bias
