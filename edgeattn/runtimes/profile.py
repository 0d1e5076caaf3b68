"""Profile exported folders on this machine. Needs only onnxruntime and numpy, so it runs on the device.

Measured, after warm-up and with repeats (median, p10, p90 of wall-clock times):
model load time; time to first token at each prompt length; decode ms/token at each
context, the cache really filled to that length first (random token ids, prefilled in
chunks of ``FILL_CHUNK``); the peak RSS of the process; size on disk; KV-cache bytes;
optionally the top operators of decode from onnxruntime's profiler. Derived: the
current machine's read bandwidth and the roofline of each decode step (bytes it must
read / bandwidth), and with a target preset the same floor on that device, labelled
as a projection.

Several folders are measured in one run *interleaved*: every load, every prefill and
every decode token goes round-robin over the models, so a noisy machine slows all of
them alike and their ratios hold. Before each timed step the engine waits until the
previous model's thread pool has stopped spinning (``_settle``). Decode at context C
times the ``repeats`` steps that end there (the cache holds C - repeats .. C - 1 tokens
when they run).

Ctrl-C stops measuring; the report keeps everything finished so far and says where it
stopped (``complete: false``).

The engine measures ``Candidate``s: anything with ``reset``/``forward``/``length`` like
``EdgeLM`` plus a description of its weights and KV cache. ``profile`` makes them from
output folders; the benchmark adds baselines (PyTorch, other exporters) the same way,
so they are measured in the same interleaved run.
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from edgeattn import __version__
from edgeattn.errors import InvalidOptionError
from edgeattn.progress import Progress
from edgeattn.runtimes import roofline
from edgeattn.runtimes.bandwidth import measure_read_bandwidth
from edgeattn.runtimes.decode_steps import FILL_CHUNK, decode_step, fill_cache, ms_since
from edgeattn.runtimes.emulation import detect_emulation
from edgeattn.runtimes.manifest import read_manifest
from edgeattn.runtimes.ops_profile import ProfilingSession, top_ops
from edgeattn.runtimes.peak_memory import METHOD as MEMORY_METHOD
from edgeattn.runtimes.peak_memory import measure_peak_rss
from edgeattn.runtimes.session import PROVIDERS, EdgeLM
from edgeattn.runtimes.targets import Target

SCHEMA = "edgeattn-profile"
SCHEMA_VERSION = 1
DEFAULT_CONTEXTS = (128, 512, 2048, 4096)
DEFAULT_PROMPT_LENGTHS = (128, 512)
MAX_LOAD_REPEATS = 5  # loading is slow and steady; more samples add little
OPS_TOP = 10
SEED = 0
_log = logging.getLogger(__name__)
SETTLE_WINDOW_S = 0.005  # interleaved runs: a window in which the process must use
SETTLE_IDLE_CPU_S = 0.0005  # less CPU than this (10% of a core) to count as idle,
SETTLE_MAX_S = 0.25  # waiting at most this long


@dataclass(frozen=True)
class ProfileOptions:
    provider: str = "cpu"
    threads: int | None = None  # None: the target's thread count, else this machine's core count
    prompt_lengths: tuple[int, ...] = DEFAULT_PROMPT_LENGTHS
    contexts: tuple[int, ...] = DEFAULT_CONTEXTS
    repeats: int = 10
    warmup: int = 2
    target: Target | None = None
    max_length: int | None = None  # for the target's memory check; None: each folder's own
    ops: bool = False

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise InvalidOptionError(f"provider must be one of {', '.join(PROVIDERS)}; got {self.provider!r}")
        if self.threads is not None and self.threads < 1:
            raise InvalidOptionError(f"threads must be >= 1, got {self.threads}")
        if self.repeats < 1 or self.warmup < 0:
            raise InvalidOptionError(f"repeats must be >= 1 and warmup >= 0, got {self.repeats} and {self.warmup}")
        for label, values in (("prompt length", self.prompt_lengths), ("context", self.contexts)):
            bad = [value for value in values if value < 1]
            if bad:
                raise InvalidOptionError(f"every {label} must be a positive number of tokens, got {bad[0]}")
        shortest = self.warmup + self.repeats + 1
        if self.contexts and min(self.contexts) < shortest:
            raise InvalidOptionError(f"context {min(self.contexts)} is too short: decode times {self.repeats} steps after "
                                     f"{self.warmup} warm-up steps and at least 1 prompt token (>= {shortest})")
        if self.max_length is not None and self.max_length < 1:
            raise InvalidOptionError(f"max_length must be >= 1, got {self.max_length}")

    def resolved_threads(self) -> tuple[int, str]:
        cores = os.cpu_count() or 1
        if self.threads is not None:
            return self.threads, "--threads"
        if self.target is not None:
            if self.target.threads > cores:
                return cores, f"target {self.target.name} wants {self.target.threads}; capped to this machine's {cores} cores"
            return self.target.threads, f"target {self.target.name}"
        return cores, "this machine's core count"


class Session(Protocol):
    """What the engine drives: EdgeLM, or a baseline wrapped to look like it."""

    length: int  # tokens in the cache

    def reset(self, batch: int = 1) -> None: ...

    def forward(self, input_ids: np.ndarray) -> np.ndarray: ...  # [1, n] -> next-token logits [1, vocab]


@dataclass
class Candidate:
    """One model to profile: how to load a fresh session of it, and what it is.

    ``info`` holds the report fields that describe the model: source, spec, weights,
    lowering, folder, disk_bytes, weights_bytes, vocab_size, max_length and kv_cache
    (codec, bytes_per_token, capacity, ring, growing, max_positions).
    ``peak_rss(tokens, decode_steps)`` measures it in a fresh process.
    """

    name: str
    load: Callable[[], Session]
    info: dict
    peak_rss: Callable[[int, int], dict] | None = None


def folder_candidate(folder: str | Path, name: str, provider: str, threads: int) -> Candidate:
    """An edgeattn output folder, described by its manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    kv = manifest.kv_cache
    info = {
        "folder": str(folder), "source": manifest.source.model, "spec": manifest.spec,
        "weights": manifest.weights.dtype,
        "lowering": sorted(set(manifest.lowering.per_layer or [])) if manifest.lowering else [],
        "disk_bytes": roofline.folder_bytes(folder), "weights_bytes": roofline.weights_bytes(folder, manifest),
        "vocab_size": manifest.model.vocab_size, "max_length": manifest.model.max_length,
        "kv_cache": {"codec": kv.codec, "bytes_per_token": kv.bytes_per_token, "capacity": kv.capacity,
                     "ring": kv.ring, "growing": bool(kv.growing), "max_positions": kv.max_positions,
                     **{key: getattr(kv, key) for key in ("tokens", "keys_read", "summary_rows", "residual_bytes")
                        if getattr(kv, key) is not None}},
    }
    return Candidate(name, lambda: EdgeLM.load(folder, provider=provider, threads=threads), info,
                     lambda tokens, steps: measure_peak_rss(folder, provider, threads, tokens, steps))


@dataclass
class _Model:
    candidate: Candidate
    entry: dict  # this model's part of the report, filled as it is measured
    lm: Session | None = None

    @property
    def name(self) -> str:
        return self.candidate.name

    @property
    def kv(self) -> dict:
        return self.candidate.info["kv_cache"]

    def fits(self, tokens: int) -> tuple[bool, str]:
        limit, reason = roofline.context_limit(self.kv)
        return (limit is None or tokens <= limit), reason


class _Progress:
    """Numbered steps for a progress callback; remembers the step a Ctrl-C interrupted."""

    def __init__(self, callback: Progress | None, total: int) -> None:
        self.callback, self.total, self.done, self.label = callback, total, 0, "starting"

    def step(self, label: str) -> None:
        self.done += 1
        self.label = label
        if self.callback is not None:
            self.callback(f"[{self.done}/{self.total}] {label}")


def profile(folders: list[str | Path], options: ProfileOptions, progress: Progress | None = None,
            names: list[str] | None = None) -> dict:
    """Measure edgeattn output ``folders``; returns the report (see docs/profile.md for its schema)."""
    if not folders:
        raise InvalidOptionError("give at least one output folder to profile")
    names = names or _display_names(folders)
    if len(names) != len(folders):
        raise InvalidOptionError("give one name per folder")
    threads, _ = options.resolved_threads()
    provider = _available_provider(options.provider)
    candidates = [folder_candidate(folder, name, provider, threads) for name, folder in zip(names, folders)]
    return profile_candidates(candidates, options, progress)


def profile_candidates(candidates: list[Candidate], options: ProfileOptions,
                       progress: Progress | None = None) -> dict:
    """Measure ``candidates`` interleaved in one run (see the module docstring)."""
    if not candidates:
        raise InvalidOptionError("nothing to profile")
    models = [_Model(candidate, {}) for candidate in candidates]
    threads, threads_from = options.resolved_threads()
    provider = _available_provider(options.provider)
    fits = {}
    if options.target is not None:
        fits = {model.name: roofline.check_fit(model.name, model.candidate.info, options.target, options.max_length)
                for model in models}
        roofline.raise_unless_fits(fits, options.target)
    report = _new_report(options, provider, threads, threads_from)
    for model in models:
        model.entry.update(_describe(model, fits.get(model.name)))
        report["models"].append(model.entry)
    total = 2 * len(models) + 2 + len(options.prompt_lengths) + len(options.contexts) + (len(models) if options.ops else 0)
    steps = _Progress(progress, total)
    try:
        _measure(models, options, threads, report, steps)
        report["complete"] = True
    except KeyboardInterrupt:
        report["complete"] = False
        report["interrupted_during"] = steps.label
    _derive(report, options.target)
    return report


def _measure(models: list[_Model], options: ProfileOptions, threads: int, report: dict, progress: _Progress) -> None:
    rng = np.random.default_rng(SEED)
    vocab = min(model.candidate.info["vocab_size"] for model in models)
    deepest = max((*options.contexts, *options.prompt_lengths), default=1)
    for model in models:
        progress.step(f"peak memory of {model.name} (a fresh process)")
        limit, _ = roofline.context_limit(model.kv)
        reach = deepest if limit is None else min(deepest, limit)
        if model.candidate.peak_rss is not None:
            model.entry["peak_rss"] = model.candidate.peak_rss(max(1, reach - options.warmup), options.warmup)
    for model in models:  # the warm-up load; these sessions are the ones measured
        progress.step(f"loading {model.name}")
        model.lm = model.candidate.load()

    progress.step(f"memory read bandwidth with {threads} threads")
    report["machine"]["bandwidth"] = measure_read_bandwidth(threads).to_dict()

    progress.step("load time")
    load_ms: dict[str, list[float]] = {model.name: [] for model in models}
    for _ in range(min(options.repeats, MAX_LOAD_REPEATS)):
        for model in models:
            _settle(len(models))
            started = time.perf_counter()
            model.candidate.load()
            load_ms[model.name].append(ms_since(started))
    for model in models:
        model.entry["load_ms"] = _stats(load_ms[model.name])

    for length in options.prompt_lengths:
        progress.step(f"time to first token, {length}-token prompt")
        _measure_prefill(models, length, options, vocab, rng)

    for context in options.contexts:
        progress.step(f"decode at {context} tokens of context")
        _measure_decode(models, context, options, vocab, rng)

    if options.ops:
        for model in models:
            progress.step(f"operator profile of {model.name}")
            model.entry["ops"] = _measure_ops(model, options, vocab, rng)


def _measure_prefill(models: list[_Model], length: int, options: ProfileOptions, vocab: int,
                     rng: np.random.Generator) -> None:
    active = _active(models, length, "prefill", {"prompt_tokens": length})
    prompt = rng.integers(0, vocab, size=(1, length))
    for model in active:  # warm-up: the first prefill of a new length plans its buffers
        model.lm.reset(1)
        model.lm.forward(prompt)
    samples: dict[str, list[float]] = {model.name: [] for model in active}
    for _ in range(options.repeats):
        for model in active:
            model.lm.reset(1)
            _settle(len(active))
            started = time.perf_counter()
            int(np.argmax(model.lm.forward(prompt)[0]))
            samples[model.name].append(ms_since(started))
    for model in active:
        stats = _stats(samples[model.name])
        model.entry["prefill"].append({"prompt_tokens": length, "ttft_ms": stats,
                                       "prefill_tokens_per_s": _sig(length / stats["median"] * 1e3)})


def _measure_decode(models: list[_Model], context: int, options: ProfileOptions, vocab: int,
                    rng: np.random.Generator) -> None:
    active = _active(models, context, "decode", {"context": context})
    tokens = {model.name: fill_cache(model.lm, context - options.warmup - options.repeats, vocab, rng) for model in active}
    for _ in range(options.warmup):
        for model in active:
            tokens[model.name], _ = decode_step(model.lm, tokens[model.name])
    samples: dict[str, list[float]] = {model.name: [] for model in active}
    for _ in range(options.repeats):
        for model in active:
            _settle(len(active))
            tokens[model.name], ms = decode_step(model.lm, tokens[model.name])
            samples[model.name].append(ms)
    for model in active:
        stats = _stats(samples[model.name])
        model.entry["decode"].append({"context": context, "ms_per_token": stats,
                                      "tokens_per_s": _sig(1e3 / stats["median"]),
                                      "kv_bytes": roofline.kv_bytes_held(model.kv, context),
                                      "keys_read": roofline.keys_read(model.kv, context),
                                      "kv_bytes_read": roofline.kv_bytes_read(model.kv, context)})


def _measure_ops(model: _Model, options: ProfileOptions, vocab: int, rng: np.random.Generator) -> dict | None:
    """Decode at the longest context this model reaches, under onnxruntime's profiler."""
    reachable = [context for context in options.contexts if model.fits(context)[0]]
    if not reachable or not isinstance(model.lm, EdgeLM):
        return None
    context = max(reachable)
    with ProfilingSession(model.lm) as profiling:
        token = fill_cache(model.lm, context - options.warmup - options.repeats, vocab, rng)
        for _ in range(options.warmup + options.repeats):
            token, _ = decode_step(model.lm, token)
    return {"context": context, "runs": options.repeats, "top": top_ops(profiling.events, options.repeats, OPS_TOP)}


def _active(models: list[_Model], tokens: int, key: str, label: dict) -> list[_Model]:
    """The models that can hold ``tokens``; the others get a skipped entry saying why."""
    active = []
    for model in models:
        ok, reason = model.fits(tokens)
        if ok:
            active.append(model)
        else:
            model.entry[key].append({**label, "skipped": reason})
    return active


def _settle(models: int) -> None:
    """Before timing one of several models: wait until this process's threads are idle.

    After a run, onnxruntime's pool workers spin (2^20 pause instructions: ~25 ms of a core
    on x86, measured) and OpenMP's do too; a different model timed right then would share
    its cores with them. One model timed step after step keeps its own pool busy, as in
    real generation, so it needs no wait.
    """
    if models < 2:
        return
    deadline = time.perf_counter() + SETTLE_MAX_S
    while time.perf_counter() < deadline:
        before = time.process_time()  # CPU time of every thread of the process
        time.sleep(SETTLE_WINDOW_S)
        if time.process_time() - before < SETTLE_IDLE_CPU_S:
            return


def _stats(samples_ms: list[float]) -> dict:
    p10, median, p90 = np.percentile(samples_ms, [10, 50, 90])
    return {"median": _sig(float(median)), "p10": _sig(float(p10)), "p90": _sig(float(p90)),
            "n": len(samples_ms)}


def _sig(value: float) -> float:
    """Six significant digits: enough for any ratio or timing, short in JSON."""
    return float(f"{value:.6g}")


def _derive(report: dict, target: Target | None) -> None:
    """Roofline bounds, target projections and ratios against the first model, from what was measured."""
    bandwidth = (report["machine"].get("bandwidth") or {}).get("gb_per_s")
    first = report["models"][0]
    for entry in report["models"]:
        for row in entry["decode"]:
            if "skipped" in row:
                continue
            bytes_read = entry["weights_bytes"] + row["kv_bytes_read"]
            row["bytes_read_per_token"] = bytes_read
            median = row["ms_per_token"]["median"]
            if bandwidth:
                row["roofline_ms"] = _sig(roofline.bound_ms(bytes_read, bandwidth))
                row["roofline_ratio"] = _sig(median / row["roofline_ms"])
            if target is not None:
                row["target_roofline_ms"] = _sig(roofline.bound_ms(bytes_read, target.bandwidth_gb_per_s))
                if "roofline_ratio" in row and not report["machine"]["emulation"]:
                    row["target_projected_ms"] = _sig(row["target_roofline_ms"] * row["roofline_ratio"])
        if entry is not first:
            _ratios(entry, first)


def _ratios(entry: dict, first: dict) -> None:
    if "load_ms" in entry and "load_ms" in first:
        entry["load_vs_first"] = _sig(entry["load_ms"]["median"] / first["load_ms"]["median"])
    for key, by, metric in (("prefill", "prompt_tokens", "ttft_ms"), ("decode", "context", "ms_per_token")):
        reference = {row[by]: row[metric]["median"] for row in first[key] if metric in row}
        for row in entry[key]:
            if metric in row and row[by] in reference:
                row["vs_first"] = _sig(row[metric]["median"] / reference[row[by]])


def _describe(model: _Model, fit: dict | None) -> dict:
    info = model.candidate.info
    fields = ("folder", "source", "spec", "weights", "lowering", "disk_bytes", "weights_bytes", "kv_cache")
    return {"name": model.name, **{key: info.get(key) for key in fields}, "target_fit": fit,
            "peak_rss": None, "prefill": [], "decode": [], "ops": None}


def _new_report(options: ProfileOptions, provider: str, threads: int, threads_from: str) -> dict:
    return {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "edgeattn_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "complete": False,
        "machine": {"platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
                    "memory_bytes": _physical_memory(), "onnxruntime": ort.__version__,
                    "bandwidth": None, "memory_method": MEMORY_METHOD, "emulation": detect_emulation()},
        "settings": {"provider": provider, "provider_requested": options.provider, "threads": threads,
                     "threads_from": threads_from, "repeats": options.repeats,
                     "load_repeats": min(options.repeats, MAX_LOAD_REPEATS), "warmup": options.warmup,
                     "prompt_lengths": list(options.prompt_lengths), "contexts": list(options.contexts),
                     "fill_chunk": FILL_CHUNK, "max_length": options.max_length, "ops": options.ops, "seed": SEED,
                     "settle": "interleaved runs wait, before each timed step, until the process's threads are idle "
                               "(the previous model's thread pool stops spinning)"},
        "target": options.target.to_dict() if options.target is not None else None,
        "models": [],
    }


@functools.cache
def _available_provider(provider: str) -> str:
    """"cuda" without a CUDA build of onnxruntime runs on CPU (said once here, not at every load)."""
    if PROVIDERS[provider] in ort.get_available_providers():
        return provider
    _log.warning("%s is not available in this onnxruntime build; profiling on CPU", PROVIDERS[provider])
    return "cpu"


def _display_names(folders: list[str | Path]) -> list[str]:
    names = [Path(folder).name or str(folder) for folder in folders]
    if len(set(names)) < len(names):
        names = [str(folder) for folder in folders]
    return names


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
