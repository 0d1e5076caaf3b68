"""The report of ``edgeattn validate``: its JSON schema, the JUnit XML view, the exit code.

Standard library only (golden mode runs on the runtime install). The schema is documented
in docs/validate.md; ``SCHEMA_VERSION`` changes whenever a key changes meaning or goes away
(new keys may appear without a version change).
"""

from __future__ import annotations

import json
import math
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from edgeattn import __version__
from edgeattn.runtimes.manifest import Manifest
from edgeattn.runtimes.output_folder import write_text_atomically
from edgeattn.runtimes.thresholds import check

SCHEMA = "edgeattn.validate"
SCHEMA_VERSION = 1
EXIT_PASSED, EXIT_FAILED = 0, 1


def comparison(name: str, reference: str, candidate: str, metrics: dict, bounds: dict) -> dict:
    """One comparison: its metrics and the checks of the bounds that apply to them."""
    checks = check(metrics, bounds)
    return {
        "name": name, "reference": reference, "candidate": candidate,
        "metrics": metrics,
        "checks": [{"key": c.key, "metric": c.metric, "op": c.op, "bound": c.bound, "value": c.value,
                    "source": c.source, "passed": c.passed, "message": c.describe()} for c in checks],
        "passed": all(c.passed for c in checks),
    }


def build_report(mode: str, folder: Path, manifest: Manifest, settings: dict, comparisons: list[dict],
                 started: float, extra: dict | None = None) -> dict:
    failures = [f"{c['name']}: {check['message']}" for c in comparisons for check in c["checks"] if not check["passed"]]
    return _json_safe({
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "edgeattn_version": __version__,
        "mode": mode, "folder": str(folder),
        "model": {"source": manifest.source.model, "weights": manifest.weights.dtype,
                  "kv_cache": manifest.kv_cache.codec, "spec": manifest.spec},
        "settings": settings,
        **(extra or {}),
        "comparisons": comparisons,
        "passed": not failures,
        "failures": failures,
        "exit_code": EXIT_FAILED if failures else EXIT_PASSED,
        "elapsed_s": round(time.perf_counter() - started, 2),
    })


def write_json(report: dict, path: str | Path) -> None:
    write_text_atomically(path, json.dumps(report, indent=2, allow_nan=False) + "\n")


def junit_xml(report: dict) -> str:
    """One <testsuite> per comparison, one <testcase> per scalar metric; a failed bound is a <failure>."""
    suites = ET.Element("testsuites", name="edgeattn validate")
    total = failed = 0
    for item in report["comparisons"]:
        suite = ET.SubElement(suites, "testsuite", name=item["name"])
        properties = ET.SubElement(suite, "properties")
        for name in ("reference", "candidate"):
            ET.SubElement(properties, "property", name=name, value=item[name])
        cases = suite_failures = 0
        for metric, value in item["metrics"].items():
            if isinstance(value, list):
                continue  # per-prompt detail (first_difference); its summary is greedy_match
            case = ET.SubElement(suite, "testcase", classname=f"edgeattn.validate.{item['name']}", name=metric,
                                 time="0")
            checks = [c for c in item["checks"] if c["metric"] == metric]
            for failure in (c for c in checks if not c["passed"]):
                ET.SubElement(case, "failure", type="threshold", message=failure["message"])
                suite_failures += 1
            bounds = "; ".join(f"bound {c['op']} {c['bound']:g} ({c['key']})" for c in checks) or "not gated"
            ET.SubElement(case, "system-out").text = f"{metric} = {value} ({bounds})"
            cases += 1
        suite.set("tests", str(cases))
        suite.set("failures", str(suite_failures))
        total, failed = total + cases, failed + suite_failures
    suites.set("tests", str(total))
    suites.set("failures", str(failed))
    ET.indent(suites)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def write_junit(report: dict, path: str | Path) -> None:
    write_text_atomically(path, junit_xml(report))


def render_text(report: dict) -> str:
    """The report as ``validate`` prints it: a plain table (no rich: golden mode runs where only the runtime
    is installed), first differing tokens, failures and the verdict."""
    lines = []
    settings, model = report["settings"], report["model"]
    lines.append(f"{report['folder']}: {model['source']}, {model['weights']} weights, {model['kv_cache']} KV cache; "
                 f"{settings['prompts']} prompts x (prefill {settings['prefill']} + {settings['steps']} steps), "
                 f"{settings['greedy_tokens']} greedy tokens")
    comparisons = report["comparisons"]
    metrics = [name for name, value in comparisons[0]["metrics"].items() if not isinstance(value, list)]
    metrics += [name for c in comparisons for name in c["metrics"] if name not in metrics and name != "first_difference"]
    rows = [["metric", *(c["name"] for c in comparisons)]]
    for metric in metrics:
        row = [metric]
        for c in comparisons:
            value = c["metrics"].get(metric)
            cell = "" if value is None and metric not in c["metrics"] else "nan/inf" if value is None else f"{value:.4g}"
            for result in (k for k in c["checks"] if k["metric"] == metric):
                cell += f" {'ok' if result['passed'] else 'FAIL'}({result['op']}{result['bound']:g})"
            row.append(cell)
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    for c in comparisons:
        firsts = c["metrics"].get("first_difference")
        if firsts and any(first is not None for first in firsts):
            lines.append(f"{c['name']}: first differing greedy token per prompt: "
                         + ", ".join("none" if first is None else str(first) for first in firsts))
    rebuilt = report.get("reference_check")
    if rebuilt:
        lines.append(f"reference: the rebuilt rewritten model matches golden.npz (max-abs "
                     f"{rebuilt['metrics']['max_abs_error']:.3g}, KL {rebuilt['metrics']['kl_mean']:.3g})")
    for failure in report["failures"]:
        lines.append(f"FAIL {failure}")
    verdict = "passed" if report["passed"] else f"{len(report['failures'])} threshold(s) failed"
    lines.append(f"validate: {verdict} (exit {report['exit_code']}, {report['elapsed_s']} s)")
    return "\n".join(lines)


def _json_safe(value):
    """NaN and infinities become null (JSON has no such numbers); docs/validate.md says so."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value
