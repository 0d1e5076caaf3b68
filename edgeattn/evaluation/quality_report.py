"""Load a model, measure its perplexity, rewrite it, measure again: the ``quality`` command."""

from __future__ import annotations

import copy

from edgeattn.evaluation.calibration import calibration_ids, calibration_tokens, default_evaluation_text, read_text
from edgeattn.evaluation.perplexity import check_windows, choose_windows, perplexity, text_ids
from edgeattn.models import load
from edgeattn.progress import Progress, report, reports_progress
from edgeattn.rewrites import rewrite
from edgeattn.spec import AttentionSpec


@reports_progress
def quality_report(model_name: str, spec: AttentionSpec, *, text_path=None, calibration_text=None,
                   context: int = 512, max_windows: int | None = 4, progress: Progress | None = None) -> dict:
    """Perplexity of ``model_name`` before and after ``spec`` on ``text_path`` (default: the packaged
    evaluation text), over ``max_windows`` windows of ``context`` tokens, or what the text holds
    (``notes`` says so)."""
    check_windows(context, max_windows)
    text = read_text(text_path) if text_path is not None else default_evaluation_text()
    read_text(calibration_text)  # a missing or non-UTF-8 calibration text fails now, not after scoring
    report(f"loading {model_name}")
    model = load(model_name)
    ids = text_ids(model.tokenizer, text)
    windows = choose_windows(ids.numel(), context, max_windows)
    notes = [windows.note] if windows.note else []
    if spec.window is not None and windows.context <= spec.window + spec.sinks:
        notes.append(f"context {windows.context} <= window {spec.window} + {spec.sinks} sinks: the window never "
                     "drops a token here, so its cost is not measured (score a longer context)")
    original = perplexity(model.decoder, ids, windows.context, windows.count,
                          progress=lambda done, total: report("scoring the original model", done, total))
    original_kv = model.decoder.kv_bytes_per_token()
    rewritten_model = copy.deepcopy(model.decoder)
    changes = rewrite(rewritten_model, spec, calibration_ids(model.tokenizer, calibration_text, calibration_tokens(spec)))
    after = perplexity(rewritten_model, ids, windows.context, windows.count,
                       progress=lambda done, total: report("scoring the rewritten model", done, total))
    return {
        "model": model.name,
        "spec": changes.spec.to_dict(),  # a distillation budget as the steps it ran
        "text": str(text_path) if text_path is not None else "packaged evaluation text",
        "context": windows.context,
        "windows": windows.count,
        "tokens": original.tokens,
        "notes": notes,
        "original": {"ppl": original.ppl, "kv_bytes_per_token": original_kv},
        "rewritten": {"ppl": after.ppl, "kv_bytes_per_token": rewritten_model.kv_bytes_per_token()},
        "ppl_delta_relative": after.ppl / original.ppl - 1.0,
        "rewrites": changes.summary(),
    }


def render_text(report: dict) -> str:
    """The report as the ``quality`` command prints it: what was scored, a table, the rewrites applied."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    with console.capture() as captured:
        windows = f"{report['windows']} window{'s' * (report['windows'] > 1)}"
        console.print(f"{report['model']}: {windows} of {report['context']} tokens of the {report['text']} "
                      f"({report['tokens']} scored)", soft_wrap=True)
        for note in report["notes"]:
            console.print(f"note: {note}")
        table = Table()
        for column in ("model", "ppl", "delta", "KV bytes/token"):
            table.add_column(column, justify="right" if column != "model" else "left")
        original, rewritten = report["original"], report["rewritten"]
        table.add_row("original", f"{original['ppl']:.3f}", "", str(original["kv_bytes_per_token"]))
        table.add_row("rewritten", f"{rewritten['ppl']:.3f}", f"{100 * report['ppl_delta_relative']:+.2f}%",
                      str(rewritten["kv_bytes_per_token"]))
        console.print(table)
        for line in report["rewrites"]:
            console.print(f"  {line}")
    return captured.get()
