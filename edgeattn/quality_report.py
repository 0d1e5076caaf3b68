"""Load a model, measure its perplexity, rewrite it, measure again: the ``quality`` command."""

from __future__ import annotations

import copy

from edgeattn.calibration import calibration_ids, read_text
from edgeattn.models import load
from edgeattn.quality import perplexity, text_ids
from edgeattn.rewrites import RewriteReport, rewrite
from edgeattn.spec import AttentionSpec


def summarize(report: RewriteReport) -> list[str]:
    """One line per distinct change, with how many layers it touched."""
    counts: dict[str, int] = {}
    for change in report.changes:
        key = f"{change.rewrite}: {change.change}"
        counts[key] = counts.get(key, 0) + 1
    return [f"{line} [{count} layers]" for line, count in counts.items()]


def quality_report(model_name: str, spec: AttentionSpec, *, text_path=None, calibration_text=None,
                   context: int = 512, max_windows: int | None = 4) -> dict:
    model = load(model_name)
    ids = text_ids(model.tokenizer, read_text(text_path))
    original = perplexity(model.decoder, ids, context, max_windows)
    original_kv = model.decoder.kv_bytes_per_token()
    rewritten_model = copy.deepcopy(model.decoder)
    changes = rewrite(rewritten_model, spec, calibration_ids(model.tokenizer, calibration_text))
    after = perplexity(rewritten_model, ids, context, max_windows)
    return {
        "model": model.name,
        "spec": spec.to_dict(),
        "context": context,
        "tokens": original.tokens,
        "original": {"ppl": original.ppl, "kv_bytes_per_token": original_kv},
        "rewritten": {"ppl": after.ppl, "kv_bytes_per_token": rewritten_model.kv_bytes_per_token()},
        "ppl_delta_relative": after.ppl / original.ppl - 1.0,
        "rewrites": summarize(changes),
    }
