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


def build_report(mode: str, folder: Path, manifest: dict, settings: dict, comparisons: list[dict],
                 started: float, extra: dict | None = None) -> dict:
    failures = [f"{c['name']}: {check['message']}" for c in comparisons for check in c["checks"] if not check["passed"]]
    return _json_safe({
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "edgeattn_version": __version__,
        "mode": mode, "folder": str(folder),
        "model": {"source": manifest["source"]["model"], "weights": manifest["weights"]["dtype"],
                  "kv_cache": manifest["kv_cache"]["codec"], "spec": manifest["spec"]},
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


def _json_safe(value):
    """NaN and infinities become null (JSON has no such numbers); docs/validate.md says so."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value
