"""Speed benchmark: SmolLM2 variants and baselines measured in ONE interleaved run (measured, never asserted).

Every edgeattn variant is converted (``edgeattn convert``, timed, cached in bench-out/ under its
flags and a hash of the code that builds it: the edgeattn package's files and the exporter's
library versions, so a change to the exporter converts again),
every baseline built from the same weights (benchmarks/baselines.py), then all of them
are profiled together by ``edgeattn.runtimes.profile`` with the same thread count:
each load, prefill and decode token goes round-robin over the models, so the ratios
hold on a noisy machine. Writes JSON, a markdown report with the targets of issue 5
(met or missed, with the numbers) and a plot.

    python benchmarks/speed.py                  # everything -> docs/benchmarks.{md,json,png}
    python benchmarks/speed.py --quick          # fp32 + int4, context 128, 3 repeats -> bench-out/quick/
    python benchmarks/speed.py --variants fp32,int4 --baselines genai-fp32 --contexts 128,512 --out bench-out/try
    python benchmarks/speed.py --render docs/benchmarks.json   # rewrite the report (and plot) from a run's JSON

A variant that fails to convert (or a baseline that fails to build) is recorded with
its error and left out of the run, never a crash.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines  # noqa: E402  (benchmarks/baselines.py)

from edgeattn.evaluation.calibration import wikitext_path  # noqa: E402
from edgeattn.runtimes import profile_report, roofline  # noqa: E402
from edgeattn.runtimes.decode_steps import decode_step, fill_cache  # noqa: E402
from edgeattn.runtimes.peak_memory import process_peak_bytes  # noqa: E402
from edgeattn.runtimes.profile import Candidate, ProfileOptions, folder_candidate, profile_candidates  # noqa: E402
from edgeattn.spec import AttentionSpec  # noqa: E402

CACHE = ROOT / "bench-out"
# Hand-written reading of the last full run (what limits each missed target), included in the report.
FINDINGS = ROOT / "benchmarks" / "speed_findings.md"
THREADS = 2
CONTEXTS = (128, 512, 2048, 4096, 8192, 16384)  # 16384 only reachable by ring caches (constant memory)
PROMPT_LENGTHS = (128, 512)
FULL_MAX_LENGTH = 8192
RING_MAX_LENGTH = 16384
GENAI_MAX_LENGTH = 4096


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    spec: AttentionSpec = field(default_factory=AttentionSpec)
    weights: str = "fp32"
    attention_op: str = "auto"
    max_length: int = FULL_MAX_LENGTH

    def flags(self) -> list[str]:
        flags = ["--weights", self.weights, "--attention-op", self.attention_op, "--max-length", str(self.max_length)]
        for key, value in self.spec.to_dict().items():
            if value is not None:
                flags += [f"--{key.replace('_', '-')}", str(value)]
        return flags


VARIANTS = {variant.name: variant for variant in (
    Variant("fp32", "fp32 original, --attention-op auto"),
    Variant("fp32-onnx", "fp32, standard ONNX Attention lowering", attention_op="onnx"),
    Variant("fp32-edgeattn", "fp32, edgeattn custom-op lowering", attention_op="edgeattn"),
    Variant("mqa", "calibrated MQA (1 KV head)", AttentionSpec(kv_heads=1)),
    Variant("window512-sinks4", "window 512 + 4 sinks (ring cache)", AttentionSpec(window=512, sinks=4),
            max_length=RING_MAX_LENGTH),
    Variant("hierarchical-kv-head", "hierarchical: blocks of 8 chosen per kv head, top 60, window 32, 4 sinks (516 keys)",
            AttentionSpec(block_size=8, top_blocks=60, window=32, sinks=4, block_select="kv-head")),
    Variant("kv-int8", "int8 KV cache (per-channel)", AttentionSpec(kv_cache="int8")),
    Variant("kv-int4", "int4 KV cache (per-channel)", AttentionSpec(kv_cache="int4")),
    Variant("kv-int8-token", "int8 KV cache (per-token)", AttentionSpec(kv_cache="int8", kv_quant="per-token")),
    Variant("kv-int4-token", "int4 KV cache (per-token)", AttentionSpec(kv_cache="int4", kv_quant="per-token")),
    Variant("int4", "int4 weights (MatMulNBits, block 32), cache of 2048 tokens", weights="int4", max_length=2048),
    Variant("int4-kv-int8", "int4 weights + int8 KV cache (per-channel), cache of 4096 tokens as onnxruntime-genai's",
            AttentionSpec(kv_cache="int8"), weights="int4", max_length=GENAI_MAX_LENGTH),
    Variant("board-2gb", "2 GB board: MQA + window 512 + 4 sinks + int8 KV + int4 weights",
            AttentionSpec(kv_heads=1, window=512, sinks=4, kv_cache="int8"), weights="int4", max_length=RING_MAX_LENGTH),
)}
BASELINES = ("pytorch-eager", "transformers-onnx", "genai-fp32", "genai-int4")
QUICK_VARIANTS = ("fp32", "int4")
# Issue 5's anchors, measured earlier on this machine (2 threads, batch 1, decode ms/token medians at past
# 128 / 512 / 2048): printed beside the run so a reader can tell a noisy run from a real change.
ANCHORS = (
    ("PyTorch eager fp32", "36.5 / 38.6 / 52.2"),
    ("transformers' exporter (fused GQA, fp32)", "25.3 / 30.3 / 53.3"),
    ("onnxruntime-genai fp32", "21.9 / 23.6 / 30.9"),
    ("onnxruntime-genai int4 (MatMulNBits block 32, accuracy 4)", "7.1 / 9.1 / 17.5"),
    ("llama.cpp Q4_1", "11.7 / 13.6 / 19.0"),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated edgeattn variants")
    parser.add_argument("--baselines", default=",".join(BASELINES), help="comma-separated baselines ('' for none)")
    parser.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    parser.add_argument("--prompt-lengths", default=",".join(map(str, PROMPT_LENGTHS)))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--no-ops", action="store_true", help="skip onnxruntime's operator profile")
    parser.add_argument("--quick", action="store_true", help="fp32 + int4, no baselines, context 128, 3 repeats")
    parser.add_argument("--reconvert", action="store_true", help="convert again even if bench-out/ has the folder")
    parser.add_argument("--out", help="folder for benchmarks.{md,json,png} (default docs/, or bench-out/quick)")
    parser.add_argument("--render", metavar="JSON", help="only rewrite benchmarks.{md,png} beside a run's JSON")
    parser.add_argument("--peak-child", nargs=3, metavar=("BASELINE", "TOKENS", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peak_child:
        return _peak_child(*args.peak_child, threads=args.threads)
    if args.render:
        path = Path(args.render)
        _write(path.parent, json.loads(path.read_text(encoding="utf-8")))
        print(f"wrote {path.parent / 'benchmarks.md'}", file=sys.stderr)
        return 0
    if args.quick:
        args.variants, args.baselines, args.contexts, args.prompt_lengths, args.repeats = (
            ",".join(QUICK_VARIANTS), "", "128", "128", 3)
    out = Path(args.out) if args.out else (CACHE / "quick" if args.quick else ROOT / "docs")
    variants = [name for name in args.variants.split(",") if name]
    chosen_baselines = [name for name in args.baselines.split(",") if name]
    unknown = sorted(set(variants) - set(VARIANTS)) + sorted(set(chosen_baselines) - set(BASELINES))
    if unknown:
        parser.error(f"unknown variants or baselines: {', '.join(unknown)}")

    CACHE.mkdir(exist_ok=True)
    candidates, failures, conversions = [], {}, {}
    for name in variants:
        print(f"converting {name}", file=sys.stderr, flush=True)
        folder, record = _convert(VARIANTS[name], args.reconvert)
        conversions[name] = record
        if folder is None:
            failures[name] = record["error"]
        else:
            candidates.append(folder_candidate(folder, name, "cpu", args.threads))
    for name in chosen_baselines:
        print(f"building baseline {name}", file=sys.stderr, flush=True)
        try:
            candidates.append(_baseline(name, args.threads))
        except Exception as error:  # noqa: BLE001 - any failure of a third-party tool is recorded, not fatal
            failures[name] = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    if not candidates:
        print(f"nothing to measure: {json.dumps(failures, indent=2)}", file=sys.stderr)
        return 1

    load_before = _load_average()
    options = ProfileOptions(threads=args.threads, contexts=_ints(args.contexts), prompt_lengths=_ints(args.prompt_lengths),
                             repeats=args.repeats, ops=not args.no_ops)
    report = profile_candidates(candidates, options, progress=lambda line: print(line, file=sys.stderr, flush=True))
    report["benchmark"] = {"command": "python benchmarks/speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                           "conversions": conversions, "failures": failures,
                           "load_average": {"before": load_before, "after": _load_average()},
                           "descriptions": {name: VARIANTS[name].description for name in variants}}
    report["benchmark"]["targets"] = evaluate_targets(report)
    _write(out, report)
    print(f"wrote {out / 'benchmarks.md'}", file=sys.stderr)
    return 0 if report["complete"] else 130


# -- building what is measured ---------------------------------------------------------------


def _convert(variant: Variant, reconvert: bool) -> tuple[Path | None, dict]:
    """``edgeattn convert`` in a subprocess (timed wall clock, as a user runs it); cached by its flags and by
    the code that builds it (``code_key``)."""
    folder = CACHE / "variants" / variant.name
    record_path = CACHE / "variants" / f"{variant.name}.convert.json"
    flags = variant.flags()
    calibration = wikitext_path("valid")
    if calibration is not None:
        flags += ["--calibration-text", str(calibration)]
    code = code_key()
    if not reconvert and folder.is_dir() and record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("flags") == flags and record.get("code") == code:
            return folder, {**record, "cached": True}
    folder.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "edgeattn.cli", "convert", "smollm2", "-o", str(folder), "--force", *flags]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    record = {"flags": flags, "code": code, "seconds": round(time.perf_counter() - started, 1),
              "exit_code": result.returncode}
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        return None, {**record, "error": lines[-1]}
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return folder, {**record, "cached": False}


EXPORT_LIBRARIES = ("torch", "onnx", "onnxscript", "onnx-ir", "onnxruntime", "transformers")


def code_key() -> str:
    """What a converted folder depends on besides its flags: sha256 over every file of the edgeattn package
    (relative path and bytes; caches of compiled bytecode left out) and the versions of the libraries the
    exporter runs on. Any edit to the package converts again; a run that only re-renders never does."""
    digest = hashlib.sha256()
    package = ROOT / "edgeattn"
    for path in sorted(package.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    for library in EXPORT_LIBRARIES:
        try:
            version = importlib.metadata.version(library)
        except importlib.metadata.PackageNotFoundError:
            version = "absent"
        digest.update(f"{library}=={version}\0".encode())
    return digest.hexdigest()


def _baseline(name: str, threads: int) -> Candidate:
    hf = baselines.hf_folder(CACHE)
    kv_fp32 = {"codec": "fp32", "bytes_per_token": baselines.kv_bytes_per_token(hf), "ring": False,
               "max_positions": baselines.SMOLLM2_MAX_POSITIONS}
    common = {"source": "smollm2", "spec": {}, "vocab_size": json.loads((hf / "config.json").read_text())["vocab_size"]}

    def child(tokens: int, steps: int) -> dict:
        command = [sys.executable, __file__, "--threads", str(threads), "--peak-child", name, str(tokens), str(steps)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            return {"bytes": None, "tokens": tokens, "error": (result.stderr or "failed").strip().splitlines()[-1]}
        return {"bytes": json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_bytes"], "tokens": tokens}

    load, folder, weights_files, info = _baseline_parts(name, hf, threads)
    info = {**common, **info, "folder": str(folder), "disk_bytes": roofline.folder_bytes(folder),
            "weights_bytes": sum(path.stat().st_size for path in weights_files)}
    info["kv_cache"] = {**kv_fp32, **info["kv_cache"]}
    return Candidate(name, load, info, child)


def _baseline_parts(name: str, hf: Path, threads: int):
    """(load, folder, weight files, info) of one baseline."""
    if name == "pytorch-eager":
        return (lambda: baselines.TorchSession(hf, threads), hf, list(hf.glob("*.safetensors")),
                {"weights": "fp32", "lowering": ["pytorch-sdpa"], "max_length": baselines.SMOLLM2_MAX_POSITIONS,
                 "kv_cache": {"capacity": baselines.SMOLLM2_MAX_POSITIONS, "growing": True}})
    if name == "transformers-onnx":
        folder = baselines.transformers_onnx_folder(CACHE, hf)
        model = _decode_graph(folder)
        return (lambda: baselines.GrowingOrtSession(model, threads), folder, list(folder.glob("decode.onnx*")),
                {"weights": "fp32", "lowering": ["transformers-exporter"], "max_length": baselines.SMOLLM2_MAX_POSITIONS,
                 "kv_cache": {"capacity": baselines.SMOLLM2_MAX_POSITIONS, "growing": True}})
    precision = name.removeprefix("genai-")
    folder = baselines.genai_folder(CACHE, hf, precision, threads, GENAI_MAX_LENGTH)
    return (lambda: baselines.GenaiSession(folder, GENAI_MAX_LENGTH), folder, list(folder.glob("model.onnx*")),
            {"weights": precision, "lowering": ["onnxruntime-genai"], "max_length": GENAI_MAX_LENGTH,
             "kv_cache": {"capacity": GENAI_MAX_LENGTH, "growing": False}})


def _decode_graph(folder: Path) -> Path:
    """The exporter's multi-token decode graph (it also prefills on an empty cache)."""
    path = folder / "decode.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"no decode.onnx in {folder}")
    return path


def _peak_child(name: str, tokens: str, steps: str, threads: int) -> int:
    """Run in a fresh process: load one baseline, fill its cache, decode; print the peak RSS."""
    import numpy as np

    candidate = _baseline(name, threads)
    lm = candidate.load()
    token = fill_cache(lm, int(tokens), candidate.info["vocab_size"], np.random.default_rng(0))
    for _ in range(int(steps)):
        token, _ = decode_step(lm, token)
    print(json.dumps({"peak_rss_bytes": process_peak_bytes()}))
    return 0


# -- the targets ----------------------------------------------------------------------------


def evaluate_targets(report: dict) -> list[dict]:
    """Each target with the measured ratio and whether it was met (None: not measured in this run)."""
    by_name = {entry["name"]: entry for entry in report["models"]}

    def decode(name: str, context: int) -> float | None:
        for row in by_name.get(name, {}).get("decode", []):
            if row["context"] == context and "ms_per_token" in row:
                return row["ms_per_token"]["median"]
        return None

    def ttft(name: str, length: int) -> float | None:
        for row in by_name.get(name, {}).get("prefill", []):
            if row["prompt_tokens"] == length and "ttft_ms" in row:
                return row["ttft_ms"]["median"]
        return None

    def ratio(numerator, denominator):
        return None if numerator is None or denominator is None else numerator / denominator

    targets = []
    for context in (128, 512, 2048, 4096):
        value = ratio(decode("fp32", context), decode("genai-fp32", context))
        targets.append(_target(f"fp32 decode <= onnxruntime-genai fp32 at {context}", value, 1.0))
    for context in (128, 512):
        value = ratio(decode("int4", context), decode("genai-int4", context))
        targets.append(_target(f"int4 decode <= 0.9x onnxruntime-genai int4 at {context}", value, 0.9))
    for context in (2048, 4096):
        value = ratio(decode("int4-kv-int8", context), decode("genai-int4", context))
        targets.append(_target(f"int4-kv-int8 decode <= 0.8x onnxruntime-genai int4 at {context}", value, 0.8))
    for name in ("window512-sinks4", "kv-int8"):
        value = ratio(decode(name, 2048), decode(name, 128))
        targets.append(_target(f"{name}: decode at 2048 <= 1.2x its decode at 128", value, 1.2))
    for context, limit in ((2048, 1.0), (8192, 0.7)):
        value = ratio(decode("hierarchical-kv-head", context), decode("fp32", context))
        targets.append(_target(f"hierarchical-kv-head decode at {context} <= {limit:g}x fp32's", value, limit))
    for context in CONTEXTS:
        value = ratio(decode("window512-sinks4", context), decode("fp32", 512))
        targets.append(_target(f"window512-sinks4 decode at {context} <= 1.1x fp32's at 512", value, 1.1))
    for context in CONTEXTS:
        value = ratio(decode("board-2gb", context), decode("int4", 512))
        targets.append(_target(f"board-2gb decode at {context} <= 1.25x int4's at 512", value, 1.25))
    for name in ("kv-int8", "kv-int4", "kv-int8-token", "kv-int4-token"):
        for context in (2048, 4096):
            value = ratio(decode(name, context), decode("fp32", context))
            targets.append(_target(f"{name} decode <= fp32 cache at {context}", value, 1.0))
    value = ratio(ttft("pytorch-eager", 512), ttft("fp32", 512))
    targets.append(_target("prefill of 512 tokens >= 1.3x faster than PyTorch eager", value, 1.3, at_least=True))
    int4 = by_name.get("int4", {})
    peak = (int4.get("peak_rss") or {}).get("bytes")
    targets.append(_target("peak RSS of int4 (cache of 2048 tokens) <= 300 MB", None if peak is None else peak / 1e6, 300,
                           unit=" MB"))
    seconds = (report.get("benchmark", {}).get("conversions", {}).get("fp32") or {}).get("seconds")
    targets.append(_target("convert of SmolLM2 (fp32) < 60 s", seconds, 60, unit=" s"))
    return targets


def _target(name: str, value: float | None, limit: float, at_least: bool = False, unit: str = "x") -> dict:
    met = None if value is None else (value >= limit if at_least else value <= limit)
    return {"target": name, "value": None if value is None else round(value, 3), "limit": limit, "unit": unit,
            "met": met}


# -- output ----------------------------------------------------------------------------------


def _write(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    profile_report.write_json(report, out / "benchmarks.json")
    profile_report.write_plot(report, out / "benchmarks.png")
    profile_report.write_atomic(out / "benchmarks.md", _markdown(report) + "\n")


def _markdown(report: dict) -> str:
    bench = report["benchmark"]
    settings, machine = report["settings"], report["machine"]
    lines = [
        "# Speed: SmolLM2-135M-Instruct, edgeattn variants and baselines",
        "",
        f"Measured by `{bench['command']}` on {machine['platform']} ({machine['cpu_count']} cores), "
        f"{settings['threads']} threads, batch 1, onnxruntime {machine['onnxruntime']}, "
        f"{settings['repeats']} timed repeats after {settings['warmup']} warm-up steps, all models in one "
        "interleaved run (every load, prefill and decode token round-robin over the models, each timed "
        "step once the previous model's thread pool stopped spinning), so the ratios hold even where the "
        "absolute numbers are noisy. Decode at context C times the steps that end at C, "
        "the cache filled with random tokens first. Medians; p10-p90 in brackets. "
        f"Load average (1 min) before / after the run: {bench['load_average']['before']} / "
        f"{bench['load_average']['after']} on {machine['cpu_count']} cores{_load_verdict(bench, machine)}.",
        "",
        "![decode ms/token vs context](benchmarks.png)",
        "",
        "## Targets",
        "",
        "| target | measured | limit | met |",
        "|---|---|---|---|",
    ]
    for target in bench["targets"]:
        value = "not measured" if target["value"] is None else f"{target['value']}{target['unit']}"
        met = {True: "yes", False: "**no**", None: "-"}[target["met"]]
        lines.append(f"| {target['target']} | {value} | {target['limit']}{target['unit']} | {met} |")
    lines += ["", "Where a target is missed, the operator profiles at the end (onnxruntime's profiler, decode at the "
              "longest context each model reaches) show where the time goes."]
    if FINDINGS.exists():
        lines += ["", FINDINGS.read_text(encoding="utf-8").strip()]
    lines += [
              "", "## Decode ms/token by context (median)", "", *_pivot(report), "",
              "Reference anchors from issue 5 (measured before, same machine and threads; decode ms/token at "
              "128 / 512 / 2048): " + "; ".join(f"{name} {values}" for name, values in ANCHORS) + ".", ""]
    if bench["failures"]:
        lines += ["## Not measured", ""] + [f"- `{name}`: {error}" for name, error in bench["failures"].items()] + [""]
    lines += ["## Variants", ""] + [f"- `{name}`: {text}" for name, text in bench["descriptions"].items()]
    lines += [f"- `{name}`: baseline (benchmarks/baselines.py)" for name in BASELINES
              if any(entry["name"] == name for entry in report["models"])]
    conversions = {name: record for name, record in bench["conversions"].items() if "seconds" in record}
    if conversions:
        lines += ["", "Conversion time (`edgeattn convert`, wall clock): "
                  + ", ".join(f"{name} {record['seconds']} s" for name, record in conversions.items())]
    full = profile_report.render_markdown(report).replace("\n## ", "\n### ").replace("# edgeattn profile", "## Full profile", 1)
    lines += ["", full, "",
              "## Reproduce", "", "```bash", "make install", bench["command"], "```"]
    return "\n".join(lines)


def _pivot(report: dict) -> list[str]:
    contexts = report["settings"]["contexts"]
    lines = ["| model | " + " | ".join(str(context) for context in contexts) + " | peak RSS MB | disk MB |",
             "|---" * (len(contexts) + 3) + "|"]
    for entry in report["models"]:
        cells = []
        for context in contexts:
            row = next((row for row in entry["decode"] if row["context"] == context), None)
            cells.append("-" if row is None or "skipped" in row else f"{row['ms_per_token']['median']:.1f}")
        peak = (entry.get("peak_rss") or {}).get("bytes")
        lines.append(f"| {entry['name']} | " + " | ".join(cells)
                     + f" | {'-' if peak is None else f'{peak / 1e6:.0f}'} | {entry['disk_bytes'] / 1e6:.0f} |")
    return lines


def _load_verdict(bench: dict, machine: dict) -> str:
    """Whether other processes competed for the CPU during the run (the run itself keeps ~threads busy)."""
    loads = [load for load in bench["load_average"].values() if load is not None]
    if not loads:
        return ""
    if max(loads) > machine["cpu_count"]:
        return (": above the core count, other processes competed for the CPU and the absolute numbers "
                "(PyTorch's spinning OpenMP threads above all) are not trustworthy")
    return ": at most the core count, which the run itself keeps busy, so nothing else competed for the CPU"


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


if __name__ == "__main__":
    sys.exit(main())
