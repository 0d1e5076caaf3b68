"""``edgeattn validate``: an exported folder in onnxruntime against the PyTorch models it came from.

Per onnxruntime provider, two comparisons over the same text:
* ``export:<provider>`` — against the rewritten PyTorch model, rebuilt from the manifest (source
  model + spec + the calibration text convert recorded): is the export faithful? Gated by the
  defaults of the folder's precision (``edgeattn.runtimes.thresholds``), each overridable.
* ``rewrite:<provider>`` — against the original model: what did the rewrite and the weight
  precision cost? Gated only by the user's bounds; it also reports the KV-cache SQNR.
With several providers they are also compared with each other.

Dimension legend: P prompts, T = prefill + steps + 1 text tokens per prompt, S steps,
G greedy tokens, V vocabulary.

The runtime is driven as in generation (a prefill, then single-token decode steps); the
PyTorch side computes the same rows with one causal pass per prompt (decode equals a
full pass for every rewrite, a tested invariant of the decoder). The first differing greedy
token is found without a PyTorch decode loop: the PyTorch model scores the prompt followed
by the runtime's greedy stream in one pass, and the first position whose argmax is not the
runtime's token is where the two greedy streams part (before it, both saw the same prefix).

A rebuilt calibrated rewrite must match the one convert exported: the manifest records the
calibration text (and its sha256), and the rebuilt model is checked against the folder's
``golden.npz`` before it is used as the reference.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeattn.errors import EdgeattnError, InvalidOptionError
from edgeattn.evaluation.calibration import calibration_ids, calibration_tokens, default_calibration_text, read_text
from edgeattn.models import load
from edgeattn.progress import Progress, report, reports_progress
from edgeattn.rewrites import rewrite
from edgeattn.runtimes.golden import (
    Golden,
    check_room,
    load_providers,
    provider_comparisons,
    read_golden,
    run_runtime,
    write_golden,
)
from edgeattn.runtimes.manifest import CalibrationInfo, Manifest, read_manifest
from edgeattn.runtimes.metrics import compare_greedy, compare_logits, sqnr_from_energies
from edgeattn.runtimes.thresholds import default_bounds, faithfulness_precision, user_bounds
from edgeattn.runtimes.validation_report import build_report, comparison
from edgeattn.spec import AttentionSpec

DEFAULT_PROMPTS, DEFAULT_PREFILL, DEFAULT_STEPS, DEFAULT_GREEDY_TOKENS = 2, 32, 64, 32
# golden.npz: small enough to ship in every folder (SmolLM2: 2 x 8 rows x 49152 logits = 3 MB).
GOLDEN_PROMPTS, GOLDEN_PREFILL, GOLDEN_STEPS, GOLDEN_GREEDY_TOKENS = 2, 16, 7, 16
PACKAGED = "packaged"
LEGACY_UPTRAIN_WINDOW = 512  # distillation sequences of folders whose spec does not record them
GOLDEN_STEP = "writing golden logits for on-device checks"


class ValidateError(EdgeattnError, ValueError):
    """The folder cannot be validated against PyTorch (reference or calibration text unavailable)."""


@dataclass(frozen=True)
class ValidateOptions:
    folder: Path
    providers: tuple[str, ...] = ("cpu",)
    reference: str | None = None  # the original model; default: the manifest's source.model
    text: Path | None = None  # default: the packaged calibration text
    calibration_text: Path | None = None  # default: the text convert recorded
    prompts: int = DEFAULT_PROMPTS
    prefill: int = DEFAULT_PREFILL
    steps: int = DEFAULT_STEPS
    greedy_tokens: int = DEFAULT_GREEDY_TOKENS
    bounds: dict[str, float] = field(default_factory=dict)  # the user's thresholds (flags, recipe)
    threads: int | None = None

    def __post_init__(self) -> None:
        for name, least in (("prompts", 1), ("prefill", 1), ("steps", 0), ("greedy_tokens", 1)):
            if getattr(self, name) < least:
                raise InvalidOptionError(f"{name} must be >= {least}, got {getattr(self, name)}")
        user_bounds(self.bounds)  # unknown keys fail here, before anything is loaded


@reports_progress
def validate(options: ValidateOptions, progress: Progress = lambda step, done=None, total=None: None) -> dict:
    """Run ``options.folder`` in onnxruntime and compare it with the PyTorch models; returns the report."""
    started = time.perf_counter()
    manifest = read_manifest(options.folder)
    check_room(manifest, options.prefill, options.steps, options.greedy_tokens)
    spec = _recorded_spec(manifest)
    calibration = _calibration_text(manifest, spec, options.calibration_text)
    lms = load_providers(options.folder, options.providers, options.threads)
    progress(f"loading {options.reference or manifest.source.model}")
    original = _load_reference(manifest, options.reference)
    ids_PT = _text_ids(original.tokenizer, options)
    progress("rebuilding the rewritten model")
    rewritten = copy.deepcopy(original.decoder)
    tokens = (manifest.calibration.max_tokens if manifest.calibration is not None else None) or calibration_tokens(spec)
    rewrite(rewritten, spec, calibration_ids(original.tokenizer, calibration, tokens) if _needs_calibration(spec) else None)
    progress("checking the rebuilt model against golden.npz")
    reference_check = _check_rebuild(options.folder, manifest, rewritten)

    with torch.no_grad(), _SqnrProbes(rewritten) as probes:
        rewritten_rows = _teacher_forced(rewritten, ids_PT, options.prefill, "running the rewritten PyTorch model")
    kv_sqnr = probes.metrics() if manifest.kv_cache.codec != "fp32" else {}
    with torch.no_grad():
        original_rows = _teacher_forced(original.decoder, ids_PT, options.prefill, "running the original PyTorch model")

    targets_R = ids_PT[:, options.prefill:].reshape(-1)
    faithful = default_bounds(*faithfulness_precision(manifest), options.bounds)
    user_only = user_bounds(options.bounds)
    comparisons, runs = [], {}
    for name, lm in lms.items():
        progress(f"running onnxruntime ({name})")
        runs[name] = logits, streams = run_runtime(lm, ids_PT, options.prefill, options.greedy_tokens)
        progress(f"scoring onnxruntime's ({name}) greedy tokens with the PyTorch models")
        with torch.no_grad():
            rewritten_greedy = _greedy_argmax(rewritten, ids_PT, options.prefill, streams)
            original_greedy = _greedy_argmax(original.decoder, ids_PT, options.prefill, streams)
        comparisons.append(comparison(
            f"export:{name}", "pytorch:rewritten", f"onnxruntime:{name}",
            {**compare_logits(_rows(rewritten_rows), _rows(logits), targets_R),
             **compare_greedy(rewritten_greedy, streams)}, faithful))
        comparisons.append(comparison(
            f"rewrite:{name}", "pytorch:original", f"onnxruntime:{name}",
            {**compare_logits(_rows(original_rows), _rows(logits), targets_R),
             **compare_greedy(original_greedy, streams), **kv_sqnr}, user_only))
    comparisons += provider_comparisons(runs, ids_PT[:, options.prefill:], faithful)
    settings = {"text": str(options.text) if options.text else PACKAGED, "prompts": options.prompts,
                "prefill": options.prefill, "steps": options.steps, "greedy_tokens": options.greedy_tokens,
                "providers": list(lms)}
    return build_report("pytorch", options.folder, manifest, settings, comparisons, started,
                        {"reference_check": reference_check})


# -- what convert records ------------------------------------------------------------------

def calibration_record(path: Path | None, max_tokens: int) -> CalibrationInfo:
    """The manifest's ``calibration``: which text calibrated the rewrite, so validate can rebuild it.

    A user's text is recorded by file name and sha256, never by its path: a shipped folder must not
    reveal where it was built, and validate asks for the text again (``--calibration-text``).
    """
    text = read_text(path)
    return CalibrationInfo(text=PACKAGED if path is None else Path(path).name, sha256=_sha256(text),
                           max_tokens=max_tokens)


def write_convert_golden(folder: Path, decoder, tokenizer, max_length: int) -> str:
    """Write ``golden.npz`` from the rewritten ``decoder`` on the packaged text; returns its file name."""
    prefill = max(1, min(GOLDEN_PREFILL, max_length // 2))
    steps = min(GOLDEN_STEPS, max_length - prefill)
    greedy = min(GOLDEN_GREEDY_TOKENS, max_length - prefill + 1)
    length = prefill + steps + 1
    ids = tokenizer.encode(default_calibration_text()).ids
    ids_PT = np.array([ids[k * length:(k + 1) * length] for k in range(GOLDEN_PROMPTS)], dtype=np.int64)
    with torch.no_grad():
        logits = _teacher_forced(decoder, ids_PT, prefill)
        streams = [_greedy_pytorch(decoder, list(ids[:prefill]), greedy, (k * greedy, len(ids_PT) * greedy))
                   for k, ids in enumerate(ids_PT)]
    return write_golden(folder, Golden(ids_PT, prefill, logits, np.array(streams, dtype=np.int64)))


# -- PyTorch side ---------------------------------------------------------------------------

def _teacher_forced(decoder, ids_PT: np.ndarray, prefill: int, step: str | None = None) -> np.ndarray:
    """Next-token logits [P, S + 1, V] after ``prefill + s`` tokens, one causal pass per prompt
    (reported as ``step``, counting prompts, when given)."""
    rows = []
    for ids in ids_PT:
        rows.append(decoder(torch.from_numpy(ids[None, :-1]))[0, prefill - 1:].float().numpy())
        if step is not None:
            report(step, len(rows), len(ids_PT))
    return np.stack(rows)


def _greedy_argmax(decoder, ids_PT: np.ndarray, prefill: int, streams: list[list[int]]) -> list[list[int]]:
    """The decoder's argmax after the prompt followed by each runtime stream [P][G] (see the module doc)."""
    result = []
    for ids, stream in zip(ids_PT, streams):
        sequence = torch.tensor([list(ids[:prefill]) + stream[:-1]])
        result.append(decoder(sequence)[0, prefill - 1:].argmax(-1).tolist())
    return result


def _greedy_pytorch(decoder, prompt: list[int], count: int, tokens: tuple[int, int]) -> list[int]:
    """``count`` greedy tokens after ``prompt``; ``tokens`` (done before, total) counts them for progress."""
    sequence = list(prompt)
    for index in range(count):
        sequence.append(int(decoder(torch.tensor([sequence]))[0, -1].argmax()))
        report(GOLDEN_STEP, tokens[0] + index + 1, tokens[1])
    return sequence[len(prompt):]


class _SqnrProbes:
    """Within ``with``: every layer's codec records signal and round-trip noise energy of what it stores."""

    def __init__(self, decoder) -> None:
        self.attentions = decoder.attentions()
        self.probes = [_SqnrProbe(attn.codec) for attn in self.attentions]

    def __enter__(self) -> _SqnrProbes:
        for attn, probe in zip(self.attentions, self.probes):
            attn.codec = probe
        return self

    def __exit__(self, *exc) -> None:
        for attn, probe in zip(self.attentions, self.probes):
            attn.codec = probe.codec

    def metrics(self) -> dict[str, float]:
        """Worst layer's SQNR (dB) for keys, values, and both."""
        keys = min(probe.sqnr("key") for probe in self.probes)
        values = min(probe.sqnr("value") for probe in self.probes)
        return {"kv_sqnr_db": min(keys, values), "kv_sqnr_db_keys": keys, "kv_sqnr_db_values": values}


class _SqnrProbe(nn.Module):
    def __init__(self, codec) -> None:
        super().__init__()
        self.codec = codec
        self.residual = codec.residual  # a residual window reads the codec's round trip of its older tokens
        self.energy = {kind: [0.0, 0.0] for kind in ("key", "value")}  # [signal, noise]

    def roundtrip(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        stored = self.codec.roundtrip(x, kind)
        self.energy[kind][0] += float(x.double().square().sum())
        self.energy[kind][1] += float((stored.double() - x.double()).square().sum())
        return stored

    def sqnr(self, kind: str) -> float:
        return sqnr_from_energies(*self.energy[kind])


# -- inputs ---------------------------------------------------------------------------------

def _load_reference(manifest: Manifest, reference: str | None):
    """The original model; its weights must be the ones convert read (when the manifest has their hash)."""
    name = reference or manifest.source.model
    model = load(name)
    recorded = manifest.source.weights_sha256
    if recorded and model.weights_sha256 != recorded:
        raise ValidateError(f"reference {name} is not the model this folder was converted from "
                            f"(weights sha256 {str(model.weights_sha256)[:12]}, manifest {recorded[:12]})")
    return model


def _recorded_spec(manifest: Manifest) -> AttentionSpec:
    """The spec convert rewrote with. Folders from before distillation sequences were recorded distilled on
    sequences of ``LEGACY_UPTRAIN_WINDOW`` tokens."""
    spec = AttentionSpec.from_dict(manifest.spec)
    if spec.uptrain_steps and spec.uptrain_window is None:
        spec = dataclasses.replace(spec, uptrain_window=LEGACY_UPTRAIN_WINDOW)
    return spec


def _needs_calibration(spec: AttentionSpec) -> bool:
    gqa = spec.kv_heads is not None and spec.gqa_method == "calibrated"
    kv_scales = spec.kv_cache in ("int8", "int4") and spec.kv_quant == "per-channel"
    return gqa or kv_scales


def _calibration_text(manifest: Manifest, spec: AttentionSpec, override: Path | None) -> Path | None:
    """The calibration text convert used (None: the packaged one), refused when missing or not the same text.

    The manifest names a user's text by file name and sha256 only, so that text must be given again.
    """
    if not _needs_calibration(spec):
        return override
    record = manifest.calibration
    if record is None or record.text is None or record.sha256 is None:
        if override is not None:
            return override
        raise ValidateError("the manifest does not record which calibration text convert used "
                            "(converted by an older edgeattn); pass --calibration-text FILE")
    used = "the packaged text" if record.text == PACKAGED else f"{record.text} (sha256 {record.sha256[:12]})"
    if override is None and record.text != PACKAGED:
        raise ValidateError(f"convert calibrated on {used}, which is not available here: "
                            "pass that file with --calibration-text FILE")
    if _sha256(read_text(override)) != record.sha256:
        if override is None:
            raise ValidateError("the packaged calibration text changed since convert (sha256 differs from the "
                                "manifest's); pass --calibration-text FILE with the text convert used")
        raise ValidateError(f"calibration text {override} differs from the one convert exported with ({used}): "
                            "pass that text with --calibration-text FILE")
    return override


def _check_rebuild(folder: Path, manifest: Manifest, rewritten) -> dict | None:
    """The rebuilt model against golden.npz (written from the exported one): it must be as close as a
    faithful fp32 export would be. None when the folder has no golden file."""
    if not manifest.files.golden:
        return None
    golden = read_golden(folder, manifest)
    with torch.no_grad():
        rows = _teacher_forced(rewritten, golden.input_ids, golden.prefill)
    metrics = compare_logits(_rows(golden.logits), _rows(rows), golden.targets.reshape(-1))
    result = comparison("reference_check", "golden.npz", "pytorch:rewritten (rebuilt)", metrics,
                        default_bounds("fp32", *faithfulness_precision(manifest)[1:], {}))
    if not result["passed"]:
        failed = "; ".join(c["message"] for c in result["checks"] if not c["passed"])
        raise ValidateError(f"the rebuilt rewritten model differs from the one convert exported ({failed}); "
                            "the rewrite is not reproducible here: validate with --golden instead")
    return result


def _text_ids(tokenizer, options: ValidateOptions) -> np.ndarray:
    """P consecutive chunks of T tokens of the text -> [P, T]."""
    length = options.prefill + options.steps + 1
    ids = tokenizer.encode(read_text(options.text)).ids
    needed = options.prompts * length
    if len(ids) < needed:
        raise InvalidOptionError(f"text has {len(ids)} tokens; {options.prompts} prompts x (prefill {options.prefill} "
                                 f"+ steps {options.steps} + 1) need {needed}: give a longer --text or fewer tokens")
    return np.array([ids[k * length:(k + 1) * length] for k in range(options.prompts)], dtype=np.int64)


def _rows(logits_PSV: np.ndarray) -> np.ndarray:
    return logits_PSV.reshape(-1, logits_PSV.shape[-1])


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
