"""Where decode time goes, by operator type, from onnxruntime's own profiler (``--ops``).

The profiler records one event per kernel (``<node>_kernel_time``, with its op type)
and one ``model_run`` event per session run. Only the kernels inside the last
``runs`` model runs are summed, so the fill and warm-up steps before them do not count.
Profiling slows a run down a little, so these are shares of time, not timings to quote.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path

import onnxruntime as ort

from edgeattn.runtimes.session import EdgeLM


class ProfilingSession:
    """Swap ``lm``'s session for a profiling copy (same options and providers) for the ``with`` block."""

    def __init__(self, lm: EdgeLM) -> None:
        self.lm = lm
        self._original = lm.session
        self._folder = tempfile.TemporaryDirectory(prefix="edgeattn-ops-")
        self.events: list[dict] = []

    def __enter__(self) -> ProfilingSession:
        options = self._original.get_session_options()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(self._folder.name) / "ort")
        path = self.lm.folder / self.lm.manifest.files.model
        self.lm.session = ort.InferenceSession(str(path), options, providers=self._original.get_providers())
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            trace = Path(self.lm.session.end_profiling())
            self.events = json.loads(trace.read_text(encoding="utf-8"))
        finally:
            self.lm.session = self._original
            self._folder.cleanup()


def top_ops(events: list[dict], runs: int, top: int = 10) -> list[dict]:
    """The ``top`` op types by kernel time over the last ``runs`` model runs: ms per run and share."""
    windows = [(event["ts"], event["ts"] + event["dur"]) for event in events if event.get("name") == "model_run"][-runs:]
    if not windows:
        return []
    total_us: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        if any(start <= event["ts"] <= end for start, end in windows):
            op = event.get("args", {}).get("op_name", "?")
            total_us[op] += event["dur"]
            calls[op] += 1
    everything = sum(total_us.values()) or 1.0
    ranked = sorted(total_us.items(), key=lambda item: -item[1])[:top]
    return [{"op": op, "ms_per_run": round(us / len(windows) / 1e3, 4), "share": round(us / everything, 4),
             "calls_per_run": calls[op] // len(windows)} for op, us in ranked]
