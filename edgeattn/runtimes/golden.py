"""Golden checks: this device's onnxruntime against logits the rewritten PyTorch model produced.

``convert`` stores ``golden.npz`` in the folder; ``edgeattn validate OUT --golden`` then needs
only the runtime install (onnxruntime, numpy, tokenizers), so a phone or a board can prove
that its execution provider computes what the PyTorch model computes.

Dimension legend: P prompts, T = prefill + steps + 1 text tokens per prompt, S steps,
V vocabulary, G greedy tokens.

``golden.npz`` (``numpy.savez``, never unpickled; every array's dtype, shape and ids are checked on reading):

    format_version  []            int64   GOLDEN_VERSION
    input_ids       [P, T]        int64   text tokens; the last one is only a target
    prefill         []            int64   tokens given at once before the single-token steps
    logits          [P, S + 1, V] float32 next-token logits after input_ids[:, :prefill + s]
    greedy_tokens   [P, G]        int64   greedy continuation of input_ids[:, :prefill]

The runtime is driven as in generation: a prefill, then teacher-forced single-token decode
steps (so the decode path is exercised too), then a separate greedy run.
"""

from __future__ import annotations

import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeattn.errors import EdgeattnError, InvalidOptionError
from edgeattn.runtimes.manifest import Manifest, read_manifest, verify_files
from edgeattn.runtimes.metrics import compare_greedy, compare_logits
from edgeattn.runtimes.session import PROVIDERS, EdgeLM
from edgeattn.runtimes.thresholds import default_bounds, faithfulness_precision
from edgeattn.runtimes.validation_report import build_report, comparison

GOLDEN_FILE = "golden.npz"
GOLDEN_VERSION = 1
GOLDEN_ARRAYS = {"format_version": ("int64", 0), "input_ids": ("int64", 2), "prefill": ("int64", 0),
                 "logits": ("float32", 3), "greedy_tokens": ("int64", 2)}  # name: (dtype, dimensions)


class GoldenError(EdgeattnError, ValueError):
    """The folder's golden file is missing, unreadable or inconsistent with its manifest."""


@dataclass(frozen=True)
class Golden:
    input_ids: np.ndarray  # [P, T] int64
    prefill: int
    logits: np.ndarray  # [P, S + 1, V] float32
    greedy_tokens: np.ndarray  # [P, G] int64

    @property
    def targets(self) -> np.ndarray:
        """[P, S + 1]: the token each logits row predicts."""
        return self.input_ids[:, self.prefill:]


def write_golden(folder: Path, golden: Golden) -> str:
    """Write ``golden`` into ``folder`` (temporary name, then renamed); returns the file name."""
    path = Path(folder) / GOLDEN_FILE
    temporary = path.with_name(path.name + ".tmp.npz")
    np.savez(temporary, format_version=np.int64(GOLDEN_VERSION), input_ids=golden.input_ids.astype(np.int64),
             prefill=np.int64(golden.prefill), logits=golden.logits.astype(np.float32),
             greedy_tokens=golden.greedy_tokens.astype(np.int64))
    os.replace(temporary, path)
    return GOLDEN_FILE


def read_golden(folder: str | Path, manifest: Manifest) -> Golden:
    """The folder's golden file, checked against the manifest (shapes, vocabulary, version)."""
    name = manifest.files.golden
    if not name:
        raise GoldenError(f"{folder}: no golden file in the manifest (convert it again with this edgeattn "
                          "to get golden.npz, or validate against PyTorch without --golden)")
    path = Path(folder) / name
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an .npz archive")
        with data:
            arrays = {key: data[key] for key in GOLDEN_ARRAYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise GoldenError(f"{path}: unreadable golden file ({reason})") from error
    for key, (dtype, dimensions) in GOLDEN_ARRAYS.items():
        if arrays[key].dtype != np.dtype(dtype) or arrays[key].ndim != dimensions:
            raise GoldenError(f"{path}: {key} must be {dtype} with {dimensions} dimensions, "
                              f"got {arrays[key].dtype} with {arrays[key].ndim}")
    version = int(arrays["format_version"])
    if version > GOLDEN_VERSION:
        raise GoldenError(f"{path}: golden format {version} is newer than this edgeattn "
                          f"understands ({GOLDEN_VERSION}); upgrade edgeattn")
    if version < 1:
        raise GoldenError(f"{path}: golden format {version} is not a version edgeattn wrote")
    golden = Golden(arrays["input_ids"], int(arrays["prefill"]), arrays["logits"], arrays["greedy_tokens"])
    prompts, length = golden.input_ids.shape
    expected = (prompts, length - golden.prefill, manifest.model.vocab_size)
    if (prompts < 1 or golden.logits.shape != expected or golden.greedy_tokens.shape[0] != prompts
            or golden.greedy_tokens.shape[1] < 1 or not 0 < golden.prefill < length):
        raise GoldenError(f"{path}: inconsistent golden arrays (input_ids {golden.input_ids.shape}, prefill "
                          f"{golden.prefill}, logits {golden.logits.shape}, expected {expected}, greedy_tokens "
                          f"{golden.greedy_tokens.shape})")
    vocabulary = manifest.model.vocab_size
    for key in ("input_ids", "greedy_tokens"):
        if arrays[key].min() < 0 or arrays[key].max() >= vocabulary:
            raise GoldenError(f"{path}: {key} holds token ids outside the vocabulary (0 to {vocabulary - 1})")
    if not np.isfinite(golden.logits).all():
        raise GoldenError(f"{path}: logits hold NaN or infinity")
    return golden


def token_room(manifest: Manifest) -> int:
    """How many tokens one sequence may feed this folder's graph (cache capacity, position table)."""
    kv = manifest.kv_cache
    limits = [kv.max_positions] if kv.max_positions is not None else []
    if not kv.ring:
        limits.append(kv.cache_tokens)
    return min(limits) if limits else 2**62


def check_room(manifest: Manifest, prefill: int, steps: int, greedy: int) -> None:
    """Refuse lengths the folder cannot run, naming the options to change."""
    room, needed = token_room(manifest), prefill + max(steps, greedy - 1)
    if needed > room:
        raise InvalidOptionError(f"{needed} tokens per prompt (prefill {prefill} + {needed - prefill} single-token "
                                 f"steps) is more than this folder runs ({room}: its KV-cache capacity or position "
                                 "table); lower --prefill/--steps/--greedy-tokens")


def teacher_forced_logits(lm: EdgeLM, ids_T: np.ndarray, prefill: int) -> np.ndarray:
    """Prefill ``ids[:prefill]``, then feed ``ids[prefill:-1]`` one token per step -> logits [T - prefill, V].

    Row s is the next-token prediction after ``prefill + s`` tokens (its target is ``ids[prefill + s]``).
    """
    lm.reset(1)
    rows = [lm.forward(np.asarray([ids_T[:prefill]]))[0]]
    for token in ids_T[prefill:-1]:
        rows.append(lm.forward(np.asarray([[token]]))[0])
    return np.stack(rows)


def greedy_tokens(lm: EdgeLM, prompt: np.ndarray, count: int) -> list[int]:
    """``count`` greedy tokens after ``prompt`` (stop tokens do not stop it: streams are compared)."""
    lm.reset(1)
    logits = lm.forward(np.asarray([prompt]))[0]
    tokens = [int(np.argmax(logits))]
    while len(tokens) < count:
        tokens.append(int(np.argmax(lm.forward(np.asarray([[tokens[-1]]]))[0])))
    return tokens


def load_providers(folder: str | Path, providers: tuple[str, ...], threads: int | None) -> dict[str, EdgeLM]:
    """One EdgeLM per requested provider; an unavailable provider is an input error, not a fallback."""
    import onnxruntime

    if not providers:
        raise InvalidOptionError("give at least one --provider")
    verify_files(folder, read_manifest(folder))  # the files convert wrote, when it recorded their sha256
    available = onnxruntime.get_available_providers()
    for provider in providers:
        if provider not in PROVIDERS:
            raise InvalidOptionError(f"provider must be one of {', '.join(PROVIDERS)}; got {provider!r}")
        if PROVIDERS[provider] not in available:
            raise InvalidOptionError(f"provider {provider} ({PROVIDERS[provider]}) is not available in this "
                                     f"onnxruntime build ({', '.join(available)})")
    return {provider: EdgeLM.load(folder, provider=provider, threads=threads) for provider in dict.fromkeys(providers)}


def run_runtime(lm: EdgeLM, ids_PT: np.ndarray, prefill: int, greedy: int) -> tuple[np.ndarray, list[list[int]]]:
    """Teacher-forced logits [P, S + 1, V] and greedy streams [P][G] of one provider."""
    logits = np.stack([teacher_forced_logits(lm, ids, prefill) for ids in ids_PT])
    streams = [greedy_tokens(lm, ids[:prefill], greedy) for ids in ids_PT]
    return logits, streams


def provider_comparisons(runs: dict, targets_PR: np.ndarray, bounds: dict) -> list[dict]:
    """Every pair of providers against each other (the first named provider is the reference)."""
    names = list(runs)
    result = []
    for index, first in enumerate(names):
        for second in names[index + 1:]:
            (ref_logits, ref_streams), (cand_logits, cand_streams) = runs[first], runs[second]
            metrics = {**compare_logits(_rows(ref_logits), _rows(cand_logits), targets_PR.reshape(-1)),
                       **compare_greedy(ref_streams, cand_streams)}
            result.append(comparison(f"providers:{first}-vs-{second}", f"onnxruntime:{first}",
                                     f"onnxruntime:{second}", metrics, bounds))
    return result


def validate_golden(folder: str | Path, providers: tuple[str, ...] = ("cpu",), user_bounds: dict | None = None,
                    threads: int | None = None) -> dict:
    """Check each provider against the folder's golden logits; returns the validate report."""
    started = time.perf_counter()
    folder = Path(folder)
    manifest = read_manifest(folder)
    golden = read_golden(folder, manifest)
    lms = load_providers(folder, providers, threads)
    greedy = golden.greedy_tokens.shape[1]
    check_room(manifest, golden.prefill, golden.input_ids.shape[1] - golden.prefill - 1, greedy)
    precision = faithfulness_precision(manifest)
    bounds = default_bounds(*precision, user_bounds or {})
    runs = {name: run_runtime(lm, golden.input_ids, golden.prefill, greedy) for name, lm in lms.items()}
    reference_streams = golden.greedy_tokens.tolist()
    comparisons = []
    for name, (logits, streams) in runs.items():
        metrics = {**compare_logits(_rows(golden.logits), _rows(logits), golden.targets.reshape(-1)),
                   **compare_greedy(reference_streams, streams)}
        comparisons.append(comparison(f"golden:{name}", "golden.npz (rewritten PyTorch model at convert)",
                                      f"onnxruntime:{name}", metrics, bounds))
    comparisons += provider_comparisons(runs, golden.targets, bounds)
    settings = {"text": "golden.npz", "prompts": int(golden.input_ids.shape[0]), "prefill": golden.prefill,
                "steps": int(golden.logits.shape[1] - 1), "greedy_tokens": greedy, "providers": list(lms)}
    return build_report("golden", folder, manifest, settings, comparisons, started)


def _rows(logits_PSV: np.ndarray) -> np.ndarray:
    """[P, S, V] -> [P * S, V]: every prompt's rows together."""
    return logits_PSV.reshape(-1, logits_PSV.shape[-1])
