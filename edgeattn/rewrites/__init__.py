"""``rewrite(model, spec)``: apply an AttentionSpec to a canonical decoder, in one fixed order.

The order (``ORDER``) matters and is tested:
1. gqa — merges heads first, so every later step sees the final kv heads;
2. window, 3. hierarchical — choose which keys are visible and how the cache is laid
   out (ring of unrotated keys, or full of rotated keys);
4. kv_quant — last, because its per-channel scales are calibrated on keys in the
   stored form the previous steps decided.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from edgeattn import progress
from edgeattn.rewrites import gqa, gqa_calibration, hierarchical, kv_quant, window
from edgeattn.rewrites._swap import LayerChange, RewriteError
from edgeattn.spec import AttentionSpec

ORDER = (
    (gqa.NAME, gqa.applies, gqa.merge_kv_heads),
    (window.NAME, window.applies, window.enable_sink_window),
    (hierarchical.NAME, hierarchical.applies, hierarchical.enable_hierarchical),
    (kv_quant.NAME, kv_quant.applies, kv_quant.quantize_kv_cache),
)
STEPS = {gqa.NAME: "merging KV heads", window.NAME: "sliding window + sinks",
         hierarchical.NAME: "hierarchical attention", kv_quant.NAME: "quantizing the KV cache"}  # progress lines

__all__ = ["ORDER", "RewriteError", "RewriteReport", "rewrite"]


@dataclass
class RewriteReport:
    spec: AttentionSpec
    changes: list[LayerChange] = field(default_factory=list)

    def applied(self) -> list[str]:
        return list(dict.fromkeys(change.rewrite for change in self.changes))

    def summary(self) -> list[str]:
        """One line per distinct change, with how many layers it touched."""
        counts: dict[str, int] = {}
        for change in self.changes:
            key = f"{change.rewrite}: {change.change}"
            counts[key] = counts.get(key, 0) + 1
        return [f"{line} [{count} layers]" for line, count in counts.items()]

    def by_layer(self) -> dict[int, list[str]]:
        layers: dict[int, list[str]] = {}
        for change in self.changes:
            layers.setdefault(change.layer, []).append(f"{change.rewrite}: {change.change}")
        return layers


def rewrite(model, spec: AttentionSpec, calibration: torch.Tensor | None = None) -> RewriteReport:
    """Rewrite ``model`` (an ``edgeattn.models.Decoder``) in place into ``spec``'s attention form.

    ``calibration``: token ids [1, T] for the calibrated steps (calibrated GQA, per-channel
    KV scales); see ``edgeattn.evaluation.calibration.calibration_ids``. A distillation budget in minutes
    becomes the steps that fit on this machine: the report's ``spec`` records them, so the rewrite can be
    rebuilt exactly (``validate``).
    """
    if gqa.applies(spec):
        gqa.check_kv_heads(model, spec)
    if calibration is not None:
        if spec.uptrain_minutes is not None:
            progress.report("rewriting attention: timing a distillation step")
        spec = gqa_calibration.resolve_uptrain(model, spec, calibration)
    report = RewriteReport(spec)
    for name, applies, apply in ORDER:
        if applies(spec):
            progress.report(f"rewriting attention: {STEPS[name]}")
            report.changes.extend(apply(model, spec, calibration))
    return report
