"""A profile report as a plain-text table, markdown, JSON or a plot of decode ms/token vs context.

Text, markdown and JSON need nothing beyond the runtime install (they run on the
device); the plot needs matplotlib (``pip install "edgeattn[plot]"``), imported only
when a plot is asked for. Files are written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgeattn.errors import EdgeattnError
from edgeattn.runtimes.output_folder import atomic_file, write_text_atomically
from edgeattn.runtimes.roofline import cache_tokens, human_bytes

SCHEMA_PATH = Path(__file__).with_name("profile.schema.json")  # the JSON Schema of write_json's output
PROJECTION_NOTE = ("target columns are a PROJECTION, not a measurement: the bytes each token reads "
                   "(weights + KV) over the target's peak memory bandwidth (bound), and that bound times "
                   "this machine's measured/bound ratio (projected)")
EMULATION_NOTE = ("EMULATED: {reason}. Load, first-token and decode times, the bandwidth and the roofline "
                  "ratios are the emulator's, not this CPU's: they are not timings, and none is projected onto a "
                  "target. Disk size, KV bytes and the target's memory check hold; peak RSS includes the "
                  "emulator's own memory")
_NOT_TIMINGS = " (EMULATED: not timings)"


class PlotUnavailableError(EdgeattnError, ImportError):
    """--plot was asked for without matplotlib installed."""


def render_text(report: dict) -> str:
    return "\n".join(_render(report, _text_table, lambda title: f"\n{title}", lambda line: line))


def render_markdown(report: dict) -> str:
    return "\n".join(["# edgeattn profile", "",
                      *_render(report, _markdown_table, lambda title: f"\n## {title}\n", lambda line: f"- {line}")])


def write_json(report: dict, path: str | Path) -> Path:
    return write_atomic(path, json.dumps(report, indent=2) + "\n")


def write_atomic(path: str | Path, text: str) -> Path:
    return write_text_atomically(path, text)


def require_matplotlib() -> None:
    """Fail before a long measurement, not after it, when a plot cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise PlotUnavailableError('--plot needs matplotlib: pip install "edgeattn[plot]"') from error


def write_plot(report: dict, path: str | Path) -> Path:
    """Decode ms/token (median, p10-p90 band) against context, one line per model."""
    require_matplotlib()
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    path = Path(path)
    figure = Figure(figsize=(8, 5), layout="constrained")
    axes = figure.subplots()
    count = len(report["models"])
    palette = colormaps["tab10" if count <= 10 else "tab20"]
    axes.set_prop_cycle(color=[palette(index % palette.N) for index in range(count)])
    for entry in report["models"]:
        rows = [row for row in entry["decode"] if "ms_per_token" in row]
        if not rows:
            continue
        contexts = [row["context"] for row in rows]
        line, = axes.plot(contexts, [row["ms_per_token"]["median"] for row in rows], marker="o", label=entry["name"])
        axes.fill_between(contexts, [row["ms_per_token"]["p10"] for row in rows],
                          [row["ms_per_token"]["p90"] for row in rows], color=line.get_color(), alpha=0.2)
    contexts = sorted({row["context"] for entry in report["models"] for row in entry["decode"] if "ms_per_token" in row})
    axes.set_xscale("log", base=2)
    axes.set_xticks(contexts, [str(context) for context in contexts])
    axes.minorticks_off()
    axes.set_ylim(bottom=0)
    axes.set_xlabel("context (tokens in the KV cache)")
    axes.set_ylabel("decode ms/token (median, p10-p90)")
    settings = report["settings"]
    axes.set_title(f"decode on {report['machine']['machine']}, {settings['threads']} threads, {settings['provider']}")
    axes.grid(True, which="both", alpha=0.3)
    if axes.has_data():
        axes.legend(fontsize="small", ncols=1 if count <= 8 else 2)
    with atomic_file(path) as staging:
        figure.savefig(staging, dpi=120, format=path.suffix.lstrip(".") or "png")
    return path


# -- the tables --------------------------------------------------------------------------------


def _render(report: dict, table, heading, note) -> list[str]:
    """The report's lines; ``table``, ``heading`` and ``note`` format for text or markdown."""
    machine, settings, target = report["machine"], report["settings"], report["target"]
    bandwidth = machine.get("bandwidth")
    lines = [f"machine: {machine['platform']}, {machine['cpu_count']} cores; {settings['threads']} threads "
             f"({settings['threads_from']}), provider {settings['provider']}",
             "memory read bandwidth: " + (f"{bandwidth['gb_per_s']} GB/s with {bandwidth['threads']} threads"
                                          if bandwidth else "not measured")]
    if target:
        lines.append(f"target: {target['name']} ({target['description']}): {target['cores']}, "
                     f"{human_bytes(target['memory_bytes'])} memory (budget {human_bytes(target['budget_bytes'])}), "
                     f"{target['bandwidth_gb_per_s']} GB/s peak bandwidth")
    emulation = machine.get("emulation")
    if emulation:
        lines.append(EMULATION_NOTE.format(reason=emulation))
    if not report["complete"]:
        lines.append(f"INTERRUPTED during: {report.get('interrupted_during', '?')} (partial results)")
    lines = [note(line) for line in lines]
    several = len(report["models"]) > 1
    lines += [heading("Models"), table(*_model_rows(report, several))]
    prefill = _prefill_rows(report, several)
    if prefill[1]:
        lines += [heading("Time to first token" + _NOT_TIMINGS * bool(emulation)), table(*prefill)]
    lines += [note(line) for line in _skipped(report, "prefill", "prompt_tokens", "prompt of {} tokens")]
    decode = _decode_rows(report, several)
    if decode[1]:
        lines += [heading("Decode" + _NOT_TIMINGS * bool(emulation)), table(*decode)]
        if target and not emulation:
            lines += ["", note(PROJECTION_NOTE)]
    lines += [note(line) for line in _skipped(report, "decode", "context", "decode at {} tokens")]
    for entry in report["models"]:
        if entry.get("ops") and entry["ops"]["top"]:
            ops = entry["ops"]
            lines += [heading(f"Top operators: {entry['name']}, decode at {ops['context']} tokens "
                              f"(onnxruntime profiler, {ops['runs']} steps)"),
                      table(["op", "ms/token", "share", "nodes"],
                            [[row["op"], f"{row['ms_per_run']:.3f}", f"{row['share']:.1%}", str(row["calls_per_run"])]
                             for row in ops["top"]])]
    return lines


def _skipped(report: dict, key: str, by: str, what: str) -> list[str]:
    return [f"skipped {what.format(row[by])} for {entry['name']}: {row['skipped']}"
            for entry in report["models"] for row in entry[key] if "skipped" in row]


def _model_rows(report: dict, several: bool) -> tuple[list[str], list[list[str]]]:
    headers = ["model", "weights", "lowering", "disk MB", "load ms", "peak RSS MB", "KV B/token", "KV capacity"]
    if report["target"]:
        headers.append(f"fits {report['target']['name']}")
    rows = []
    for entry in report["models"]:
        kv = entry["kv_cache"]
        load = entry.get("load_ms")
        peak = entry.get("peak_rss") or {}
        row = [entry["name"], str(entry["weights"]), ",".join(entry["lowering"]), f"{entry['disk_bytes'] / 1e6:.1f}",
               " ".join(filter(None, [_stat(load), _ratio(entry.get("load_vs_first")) if several else ""])) if load else "-",
               f"{peak['bytes'] / 1e6:.0f}" if peak.get("bytes") else ("failed" if peak.get("error") else "-"),
               str(kv["bytes_per_token"]),
               f"{cache_tokens(kv)} ({'ring' if kv['ring'] else 'growing' if kv['growing'] else 'full'})"]
        if report["target"]:
            fit = entry["target_fit"]
            row.append(f"{'yes' if fit['fits'] else 'NO'}: {human_bytes(fit['required_bytes'])} at {fit['max_length']} tokens")
        rows.append(row)
    return headers, rows


def _prefill_rows(report: dict, several: bool) -> tuple[list[str], list[list[str]]]:
    headers = ["prompt", "model", "TTFT ms (p10-p90)", "prefill tok/s"] + (["vs first"] if several else [])
    rows = []
    for length in report["settings"]["prompt_lengths"]:
        for entry in report["models"]:
            for row in entry["prefill"]:
                if row["prompt_tokens"] != length:
                    continue
                if "skipped" in row:
                    continue
                rows.append([str(length), entry["name"], _stat(row["ttft_ms"]), f"{row['prefill_tokens_per_s']:.0f}"]
                            + ([_ratio(row.get("vs_first"))] if several else []))
    return headers, rows


def _decode_rows(report: dict, several: bool) -> tuple[list[str], list[list[str]]]:
    target = report["target"]
    headers = ["context", "model", "ms/token (p10-p90)", "tok/s", "keys read", "KV MB", "roofline ms",
               "measured/roofline"]
    if target:
        headers += [f"{target['name']} bound ms", f"{target['name']} projected ms"]
    if several:
        headers.append("vs first")
    rows = []
    for context in report["settings"]["contexts"]:
        for entry in report["models"]:
            for row in entry["decode"]:
                if row["context"] != context:
                    continue
                if "skipped" in row:
                    continue
                cells = [str(context), entry["name"], _stat(row["ms_per_token"]), f"{row['tokens_per_s']:.1f}",
                         str(row.get("keys_read", "-")), f"{row['kv_bytes'] / 1e6:.2f}", _number(row.get("roofline_ms")),
                         _number(row.get("roofline_ratio"), "x")]
                if target:
                    cells += [_number(row.get("target_roofline_ms")), _number(row.get("target_projected_ms"))]
                if several:
                    cells.append(_ratio(row.get("vs_first")))
                rows.append(cells)
    return headers, rows


def _text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [headers, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _stat(stats: dict) -> str:
    return f"{_short(stats['median'])} ({_short(stats['p10'])}-{_short(stats['p90'])})"


def _short(value: float) -> str:
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _number(value: float | None, suffix: str = "") -> str:
    return "-" if value is None else f"{_short(value)}{suffix}"


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"
