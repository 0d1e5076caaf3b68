"""Quality benchmark: SmolLM2 perplexity on WikiText-2 test for every rewrite (measured, never asserted).

Calibrates on WikiText-2 valid, scores non-overlapping windows of test.txt at each
context, and writes docs/quality.md (a markdown table) and docs/quality.json (rows
with variant, context, tokens, ppl, kv_bytes_per_token, ...).

    python benchmarks/quality.py                      # all variants, contexts 512 and 2048
    python benchmarks/quality.py --variants original,combo --tokens 4096
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from edgeattn.calibration import calibration_ids, wikitext_path
from edgeattn.models import load
from edgeattn.quality import perplexity, text_ids
from edgeattn.rewrites import rewrite
from edgeattn.spec import AttentionSpec

HIERARCHICAL_BLOCK = 64
HIERARCHICAL_SINKS = 4


def hierarchical_spec(context: int) -> AttentionSpec:
    """About 25% of the context kept: sinks + a one-block local window + top blocks."""
    top = max(1, context // (4 * HIERARCHICAL_BLOCK) - 1)
    return AttentionSpec(block_size=HIERARCHICAL_BLOCK, top_blocks=top, sinks=HIERARCHICAL_SINKS)


def kept_fraction(spec: AttentionSpec, context: int) -> float:
    """Largest share of the context one query attends to (the last query of a window)."""
    if spec.hierarchical:
        kept = spec.sinks + spec.local_window + spec.top_blocks * spec.block_size
    elif spec.window is not None:
        kept = spec.sinks + spec.window
    else:
        kept = context
    return min(1.0, kept / context)


VARIANTS = {
    "original": lambda context: AttentionSpec(),
    "mqa-mean": lambda context: AttentionSpec(kv_heads=1, gqa_method="mean"),
    "mqa-calibrated": lambda context: AttentionSpec(kv_heads=1),
    "window512": lambda context: AttentionSpec(window=512),
    "window512-sinks4": lambda context: AttentionSpec(window=512, sinks=4),
    "hierarchical": hierarchical_spec,
    "kv-int8-channel": lambda context: AttentionSpec(kv_cache="int8"),
    "kv-int4-channel": lambda context: AttentionSpec(kv_cache="int4"),
    "kv-int8-token": lambda context: AttentionSpec(kv_cache="int8", kv_quant="per-token"),
    "kv-int4-token": lambda context: AttentionSpec(kv_cache="int4", kv_quant="per-token"),
    "combo": lambda context: AttentionSpec(kv_heads=1, window=512, sinks=4, kv_cache="int8"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variant names")
    parser.add_argument("--contexts", default="512,2048")
    parser.add_argument("--tokens", type=int, default=16384, help="test tokens scored per context (rounded down to windows)")
    parser.add_argument("--calibration-tokens", type=int, default=2048)
    parser.add_argument("--out", default="docs", help="folder for quality.md and quality.json")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    valid, test = wikitext_path("valid"), wikitext_path("test")
    if valid is None or test is None:
        print("skipped: WikiText-2 not found in ../shared/data/wikitext-2 (or $EDGEATTN_WIKITEXT_DIR)")
        return 0
    torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants: {', '.join(unknown)}")
    contexts = [int(c) for c in args.contexts.split(",")]

    model = load("smollm2")
    ids = text_ids(model.tokenizer, test.read_text(encoding="utf-8"))
    calibration = calibration_ids(model.tokenizer, valid, max_tokens=args.calibration_tokens)
    rows = []
    for variant in variants:
        for context in contexts:
            spec = VARIANTS[variant](context)
            decoder = copy.deepcopy(model.decoder)
            started = time.perf_counter()
            rewrite(decoder, spec, calibration)
            rewrite_s = time.perf_counter() - started
            windows = args.tokens // context
            with tqdm(total=windows, desc=f"{variant} @ {context}", file=sys.stderr) as bar:
                result = perplexity(decoder, ids, context, windows, progress=lambda done, total: bar.update(1))
            rows.append({
                "variant": variant, "context": context, "tokens": result.tokens, "windows": result.windows,
                "ppl": round(result.ppl, 4), "kv_bytes_per_token": decoder.kv_bytes_per_token(),
                "kept_fraction": round(kept_fraction(spec, context), 4), "spec": spec.to_dict(),
                "rewrite_seconds": round(rewrite_s, 1),
            })
            print(json.dumps(rows[-1]), flush=True)
    _write(Path(args.out), rows, args)
    return 0


def _write(out: Path, rows: list[dict], args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(rows, indent=2) + "\n")
    original = {row["context"]: row["ppl"] for row in rows if row["variant"] == "original"}
    lines = [
        "# Quality: SmolLM2-135M-Instruct perplexity on WikiText-2 test",
        "",
        f"Measured by `python benchmarks/quality.py` on {platform.machine()} with {args.threads} threads.",
        f"Non-overlapping windows from the start of `test.txt`, {args.tokens} tokens per context "
        f"(the `tokens` column is the number of scored tokens); calibration on the first "
        f"{args.calibration_tokens} tokens of `valid.txt`. KV bytes/token sum all 30 layers.",
        "",
        "| variant | context | tokens | ppl | vs original | kept | KV bytes/token |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        base = original.get(row["context"])
        delta = f"{100 * (row['ppl'] / base - 1):+.2f}%" if base else ""
        lines.append(f"| {row['variant']} | {row['context']} | {row['tokens']} | {row['ppl']:.3f} | {delta} | "
                     f"{100 * row['kept_fraction']:.0f}% | {row['kv_bytes_per_token']} |")
    (out / "quality.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
