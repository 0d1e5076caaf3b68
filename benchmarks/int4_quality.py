"""What an int4 SmolLM2 costs in quality: edgeattn's int4 folder against onnxruntime-genai's int4 build.

Both models read the same WikiText-2 test tokens one at a time (each tool's own decode loop, its
own KV cache), and every next-token distribution is compared with the fp32 edgeattn folder's on
the same text: perplexity, top-1 agreement and mean KL divergence. onnxruntime-genai's builder
re-quantizes the dequantized GGUF floats (block 32, accuracy level 4); edgeattn's int4 carries
the GGUF's own Q4_1 blocks, with their minimums, and brings the 8-bit embedding/head to 4 bits.

    python benchmarks/int4_quality.py                       # 2048 tokens -> bench-out/int4_quality.json
    python benchmarks/int4_quality.py --tokens 512 --out /tmp/q.json

The folders come from benchmarks/speed.py (bench-out/variants/{fp32,int4}, bench-out/genai-int4):
run it first, or pass --fp32/--int4/--genai.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines  # noqa: E402  (benchmarks/baselines.py)

from edgeattn.evaluation.calibration import wikitext_path  # noqa: E402
from edgeattn.runtimes import EdgeLM  # noqa: E402

CACHE = ROOT / "bench-out"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fp32", default=str(CACHE / "variants" / "fp32"))
    parser.add_argument("--int4", default=str(CACHE / "variants" / "int4"))
    parser.add_argument("--genai", default=str(CACHE / "genai-int4"))
    parser.add_argument("--out", default=str(CACHE / "int4_quality.json"))
    args = parser.parse_args(argv)
    text = wikitext_path("test")
    if text is None:
        parser.error("WikiText-2 is not here (../shared/data/wikitext-2 or $EDGEATTN_WIKITEXT_DIR)")
    reference = EdgeLM.load(args.fp32, threads=args.threads)
    ids = reference.encode(text.read_text(encoding="utf-8"))[: args.tokens + 1]
    fp32 = _log_probs(reference, ids)
    rows = {"fp32": _scores(fp32, fp32, ids)}
    rows["edgeattn-int4"] = _scores(_log_probs(EdgeLM.load(args.int4, threads=args.threads), ids), fp32, ids)
    rows["genai-int4"] = _scores(_log_probs(baselines.GenaiSession(Path(args.genai), len(ids) + 1), ids), fp32, ids)
    report = {"text": "WikiText-2 test", "tokens": len(ids) - 1, "threads": args.threads, "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for name, row in rows.items():
        print(f"{name:14s} perplexity {row['perplexity']:.3f} ({row['vs_fp32']:+.2%})  top-1 {row['top1']:.3f}  "
              f"KL {row['kl']:.4f}")
    return 0


def _log_probs(lm, ids: list[int]) -> np.ndarray:
    """[len(ids) - 1, vocab] log-probabilities of each next token, fed one token at a time."""
    lm.reset(1)
    rows = []
    for token in ids[:-1]:
        logits = lm.forward(np.array([[token]], dtype=np.int64))[0].astype(np.float64)
        rows.append(logits - logits.max() - np.log(np.exp(logits - logits.max()).sum()))
    return np.stack(rows)


def _scores(log_probs: np.ndarray, reference: np.ndarray, ids: list[int]) -> dict:
    targets = np.asarray(ids[1:])
    nll = -log_probs[np.arange(len(targets)), targets].mean()
    reference_nll = -reference[np.arange(len(targets)), targets].mean()
    kl = (np.exp(reference) * (reference - log_probs)).sum(axis=1).mean()
    return {"perplexity": float(np.exp(nll)), "vs_fp32": float(np.exp(nll - reference_nll) - 1),
            "top1": float((log_probs.argmax(1) == reference.argmax(1)).mean()), "kl": float(kl)}


if __name__ == "__main__":
    sys.exit(main())
