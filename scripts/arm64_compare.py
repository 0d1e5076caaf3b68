"""Compare runtimes on the same folders: this machine (x86_64) and an emulated arm64 board.

``dump`` runs on each machine with only the runtime install (onnxruntime, numpy): it drives
every folder over its golden.npz inputs as ``validate --golden`` does (a prefill, single-token
teacher-forced steps, then greedy runs) and saves the runtime's logits and greedy tokens under
``reports/logits-LABEL/NAME.npz``. ``compare`` runs here: each runtime against golden.npz (from
the ``validate --golden`` reports ``reports/validate-NAME.LABEL.json``) and against x86_64,
gated by the default bounds validate uses between two providers of the folder's precision.

Labels: ``x86_64``, ``aarch64`` (the board's CPU with onnxruntime's default kernels), and
variants ``aarch64-VARIANT`` run on some folders to attribute a difference to a kernel: for
example ``aarch64-kleidiai-off`` (``dump --disable-kleidiai``) or ``aarch64-cortex-a72``
(another emulated CPU). Where two greedy streams part at the first token, the table gives how
close the golden's two candidates were: a near-tie flipped by rounding, or a real difference.

    python arm64_compare.py dump -o reports/logits-aarch64 folders/ort folders/int4-weights
    python arm64_compare.py compare reports/ ort int4-weights --variants kleidiai-off --variant-folders int4-weights
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

from edgeattn.runtimes.golden import read_golden, run_runtime
from edgeattn.runtimes.manifest import read_manifest
from edgeattn.runtimes.metrics import compare_greedy, compare_logits
from edgeattn.runtimes.session import EdgeLM
from edgeattn.runtimes.thresholds import default_bounds, faithfulness_precision
from edgeattn.runtimes.validation_report import comparison

HOST, BOARD = "x86_64", "aarch64"


def dump(folders: list[Path], output: Path, threads: int | None, disable_kleidiai: bool = False) -> None:
    output.mkdir(parents=True, exist_ok=True)
    if disable_kleidiai:
        _disable_kleidiai()
    for folder in folders:
        manifest = read_manifest(folder)
        golden = read_golden(folder, manifest)
        lm = EdgeLM.load(folder, provider="cpu", threads=threads)
        logits, streams = run_runtime(lm, golden.input_ids, golden.prefill, golden.greedy_tokens.shape[1])
        np.savez(output / f"{folder.name}.npz", logits=logits.astype(np.float32), greedy=np.asarray(streams))
        print(f"{platform.machine()}: {folder.name}: logits of {logits.shape[0]} prompts x {logits.shape[1]} steps",
              flush=True)


def _disable_kleidiai() -> None:
    """Every session this process opens runs MLAS's own kernels instead of Arm's KleidiAI ones.

    On aarch64 with dot-product instructions onnxruntime runs int4 MatMulNBits (accuracy level 4)
    through KleidiAI, which quantizes activations per row and rounds the weight scales to bf16;
    MLAS's own kernels, as on x86_64, quantize activations per 32-block with fp32 scales. EdgeLM
    takes no session options, so the switch goes in where sessions are made.
    """
    import onnxruntime

    make_session = onnxruntime.InferenceSession

    def session(path, options=None, *args, **kwargs):
        options = options or onnxruntime.SessionOptions()
        options.add_session_config_entry("mlas.disable_kleidiai", "1")
        return make_session(path, options, *args, **kwargs)

    onnxruntime.InferenceSession = session


def compare(reports: Path, names: list[str], variants: list[str], variant_folders: list[str]) -> bool:
    """Print the tables; True when every golden check passed and every runtime is within bounds of x86_64."""
    passed, summary = True, {}
    rows = []
    for name in names:
        entry, ok = _compare_folder(reports, name, BOARD)
        passed &= ok
        summary[name] = {BOARD: entry}
        rows.append(_row(name, entry, BOARD))
    print(_table(_HEADERS, rows))
    rows = []
    for name in variant_folders:
        for variant in variants:
            label = f"{BOARD}-{variant}"
            entry, ok = _compare_folder(reports, name, label)
            passed &= ok
            summary[name][label] = entry
            rows.append(_row(name, entry, label))
    if rows:
        print(f"\nthe same folders on other {BOARD} kernels:")
        print(_table(_HEADERS, rows))
    for name, entries in summary.items():
        for label, entry in entries.items():
            for flip in entry["greedy_flips"]:
                print(f"{name} ({label}): prompt {flip['prompt']} parts from x86_64 at greedy token {flip['step']}: "
                      f"x86_64 {flip['x86_64']}, {label} {flip['candidate']}, golden {flip['golden']}"
                      + (f"; in the golden logits these two are {flip['golden_margin']:.3g} apart "
                         f"(top-1 to top-2 gap {flip['golden_top2_gap']:.3g})" if flip["step"] == 0 else ""))
    (reports / "x86_64-vs-aarch64.json").write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
    return passed


_HEADERS = ["folder", "weights/KV", "runtime", "golden vs x86_64 (KL, top-1, 1st diff)",
            "golden vs this runtime (KL, top-1, 1st diff)", "vs x86_64 (max-abs, KL, top-1)", "1st diff", "bounds"]


def _compare_folder(reports: Path, name: str, label: str) -> tuple[dict, bool]:
    folder = reports.parent / "folders" / name
    manifest = read_manifest(folder)
    golden = read_golden(folder, manifest)
    host, board = (np.load(reports / f"logits-{key}" / f"{name}.npz") for key in (HOST, label))
    metrics = {**compare_logits(_rows(host["logits"]), _rows(board["logits"]), golden.targets.reshape(-1)),
               **compare_greedy(host["greedy"].tolist(), board["greedy"].tolist())}
    bounds = default_bounds(*faithfulness_precision(manifest), {})
    between = comparison(f"x86_64-vs-{label}", "onnxruntime on x86_64", f"onnxruntime on {label}", metrics, bounds)
    validates = {key: _validate_report(reports, name, key) for key in (HOST, label)}
    entry = {"precision": _precision(manifest), "vs_x86_64": between,
             "greedy_flips": _greedy_flips(golden, host["greedy"], board["greedy"]),
             **{f"golden_vs_{key}": _golden_metrics(report) for key, report in validates.items() if report}}
    return entry, between["passed"] and all(report["passed"] for report in validates.values() if report)


def _row(name: str, entry: dict, label: str) -> list[str]:
    metrics = entry["vs_x86_64"]["metrics"]
    return [name, entry["precision"], label, _golden_cell(entry[f"golden_vs_{HOST}"]),
            _golden_cell(entry[f"golden_vs_{label}"]) if f"golden_vs_{label}" in entry else "not run",
            f"{metrics['max_abs_error']:.2g}, {metrics['kl_mean']:.2g}, {metrics['top1_agreement']:.2f}",
            _firsts(metrics["first_difference"]), "ok" if entry["vs_x86_64"]["passed"] else "FAIL"]


def _greedy_flips(golden, host: np.ndarray, board: np.ndarray) -> list[dict]:
    """Where the two greedy streams part, and at the first token how close the golden logits were.

    Only a stream's first token follows the same prefix on both sides (golden row 0); later
    tokens follow each runtime's own earlier tokens.
    """
    flips = []
    for prompt in range(host.shape[0]):
        differ = np.flatnonzero(host[prompt] != board[prompt])
        if not differ.size:
            continue
        step = int(differ[0])
        flip = {"prompt": prompt, "step": step, "x86_64": int(host[prompt, step]),
                "candidate": int(board[prompt, step]), "golden": int(golden.greedy_tokens[prompt, step])}
        if step == 0:
            row = golden.logits[prompt, 0].astype(np.float64)
            top = np.sort(row)[::-1]
            flip["golden_margin"] = float(abs(row[flip["x86_64"]] - row[flip["candidate"]]))
            flip["golden_top2_gap"] = float(top[0] - top[1])
        flips.append(flip)
    return flips


def _validate_report(reports: Path, name: str, label: str) -> dict | None:
    """The validate --golden report of ``name`` on ``label``; None where that run did not validate."""
    path = reports / f"validate-{name}.{label}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _golden_metrics(report: dict) -> dict:
    metrics = report["comparisons"][0]["metrics"]
    keys = ("max_abs_error", "kl_mean", "kl_max", "top1_agreement", "first_difference", "greedy_match")
    return {"passed": report["passed"], **{key: metrics.get(key) for key in keys}}


def _golden_cell(metrics: dict) -> str:
    return (f"{'ok' if metrics['passed'] else 'FAIL'} {metrics['kl_mean']:.2g}, {metrics['top1_agreement']:.2f}, "
            f"{_firsts(metrics['first_difference'])}")


def _precision(manifest: dict) -> str:
    weights, kv, ring = faithfulness_precision(manifest)
    return f"{weights}/{kv}{' ring' if ring else ''}"


def _firsts(firsts: list[int | None]) -> str:
    return ",".join("-" if first is None else str(first) for first in firsts)


def _rows(logits_PSV: np.ndarray) -> np.ndarray:
    return logits_PSV.reshape(-1, logits_PSV.shape[-1])


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [headers, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _json_default(value):
    return value.item() if isinstance(value, np.generic) else str(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    dumping = commands.add_parser("dump", help="save this machine's runtime logits and greedy tokens per folder")
    dumping.add_argument("folders", nargs="+", type=Path)
    dumping.add_argument("-o", "--output", type=Path, required=True)
    dumping.add_argument("--threads", type=int)
    dumping.add_argument("--disable-kleidiai", action="store_true",
                         help="run MLAS's own int4 kernels, not KleidiAI's (session option mlas.disable_kleidiai)")
    comparing = commands.add_parser("compare", help="each runtime against golden.npz and against x86_64")
    comparing.add_argument("reports", type=Path, help="the run's reports folder (its parent holds folders/)")
    comparing.add_argument("names", nargs="+")
    comparing.add_argument("--variants", nargs="*", default=[],
                           help="aarch64 variants dumped as logits-aarch64-VARIANT")
    comparing.add_argument("--variant-folders", nargs="*", default=[], help="the folders the variants ran on")
    arguments = parser.parse_args()
    if arguments.command == "dump":
        dump(arguments.folders, arguments.output, arguments.threads, arguments.disable_kleidiai)
        return 0
    return 0 if compare(arguments.reports, arguments.names, arguments.variants, arguments.variant_folders) else 1


if __name__ == "__main__":
    sys.exit(main())
