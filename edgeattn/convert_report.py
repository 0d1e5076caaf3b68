"""What ``edgeattn convert`` tells its user about the folder it wrote: a summary for ``--json`` and its lines."""

from __future__ import annotations

from pathlib import Path

from edgeattn.convert import DEFAULT_MAX_LENGTH
from edgeattn.exporters.gguf_weights import describe
from edgeattn.runtimes.manifest import Manifest


def summary(output: Path, manifest: Manifest, max_length_given: bool) -> dict:
    """What ``convert`` wrote to ``output``, as ``edgeattn convert --json`` prints it."""
    size = sum(path.stat().st_size for path in output.iterdir() if path.is_file())
    kv, lowering = manifest.kv_cache, manifest.lowering
    max_length = manifest.model.max_length
    source = ("--max-length" if max_length_given else "default" if max_length == DEFAULT_MAX_LENGTH
              else "the model's position limit")
    return {
        "output": str(output), "size_mb": round(size / 1e6, 1), "weights": manifest.weights.dtype,
        "max_length": max_length, "max_length_source": source,
        "lowering": f"{lowering.per_layer[0]} ({lowering.op}) x {len(lowering.per_layer)} layers",
        "kv_cache": f"{kv.codec} {'ring' if kv.ring else 'full'} buffer, capacity {kv.cache_tokens}"
                    + (f", last {kv.residual_tokens} tokens at full precision" if kv.residual_tokens else ""),
        "kv_bytes_per_token": kv.bytes_per_token, "kv_mb_at_capacity": round(kv.bytes_at_capacity / 1e6, 2),
        "numerics": manifest.numerics,
        **({"gguf_blocks": describe(manifest.weights.gguf)} if manifest.weights.gguf is not None else {}),
    }


def render_text(summary: dict) -> str:
    """The summary as aligned ``key value`` lines, the numerics checks in one line."""
    lines = dict(summary, numerics=_numerics_line(summary["numerics"]))
    if lines.pop("max_length_source") == "the model's position limit":
        lines["max_length"] = (f"{lines['max_length']} (the model's position limit; "
                               f"the default {DEFAULT_MAX_LENGTH} is beyond it)")
    return "\n".join(f"  {key:<22} {value}" for key, value in lines.items())


def _numerics_line(numerics: dict) -> str:
    """The two numerics checks of convert in one line."""
    export = numerics["export"]
    if "tolerance" in export:
        parts = [f"export max |logit error| {export['max_abs_logit_error']:.1e} (<= {export['tolerance']:g})"]
    else:
        parts = [f"export top-1 {export['top1_agreement']:.2f} (>= {export['min_top1_agreement']:g})"]
    weights = numerics.get("weights")
    if weights is not None:
        parts.append(f"weights KL {weights['kl_mean']:.3g} (<= {weights['max_kl']:g}), "
                     f"top-1 {weights['top1_agreement']:.2f} (>= {weights['min_top1_agreement']:g})")
    return "; ".join(parts) + (" - passed" if numerics["passed"] else " - FAILED")
