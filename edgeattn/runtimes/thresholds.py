"""Thresholds of ``edgeattn validate``: which metric each bound limits, defaults per precision, checks.

One threshold is one CLI flag (``--max-kl``), one ``[validate]`` recipe key (``max_kl``) and
one JSON key of the report. Standard library only: golden mode runs on the runtime install.

Which comparisons a bound gates:
* faithfulness comparisons (export: onnxruntime vs the rewritten PyTorch model; golden;
  provider vs provider): the defaults of the folder's precision, each overridable;
* the rewrite-cost comparison (onnxruntime vs the original model): only what the user
  sets, since how much quality a rewrite may cost is the user's decision.
A bound the user sets applies to every comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgeattn.errors import EdgeattnError, InvalidOptionError
from edgeattn.runtimes.manifest import Manifest


@dataclass(frozen=True)
class Threshold:
    key: str  # recipe key and flag (--max-kl), the report's "key"
    metric: str  # the metric it bounds
    upper: bool  # True: metric <= bound; False: metric >= bound
    meaning: str

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


THRESHOLDS = {t.key: t for t in (
    Threshold("max_abs_error", "max_abs_error", True, "largest |logit difference| over all rows"),
    Threshold("max_kl", "kl_mean", True, "mean KL divergence (nats) of the next-token distributions"),
    Threshold("max_kl_peak", "kl_max", True, "largest per-row KL divergence (nats)"),
    Threshold("min_cosine", "cosine_min", False, "smallest per-row cosine similarity of the logits"),
    Threshold("min_top1", "top1_agreement", False, "fraction of rows with the same most likely token"),
    Threshold("min_top5", "top5_overlap", False, "mean overlap of the 5 most likely tokens"),
    Threshold("max_ppl_delta", "ppl_delta_relative", True, "relative perplexity increase (0.02 = +2%)"),
    Threshold("min_greedy_match", "greedy_match", False,
              "greedy tokens generated before the first difference, as a fraction (worst prompt)"),
    Threshold("min_kv_sqnr", "kv_sqnr_db", False, "worst layer's SQNR (dB) of the quantized KV cache"),
)}

# Faithfulness defaults, a few times above what correct exports measured. SmolLM2-135M (30 layers,
# vocab 49152), ort lowering, 2 prompts x (prefill 32 + 64 steps) of the packaged text unless said:
#   fp32:          max-abs 6.2e-5 (1.0e-4 over 3 x 256 WikiText tokens), KL 1e-11, top-1 1.0; PyTorch
#                  alone moves logits by 5.7e-5 between 1 and 2 threads, so max-abs gets 1e-3, KL is strict
#   fp16 weights:  max-abs 0.028, KL 2.0e-6 (max 7.8e-6), top-1 1.0, top-5 0.997, ppl +0.005%
#   int8 weights:  KL 4.9e-3 (max 0.024), top-1 0.946, top-5 0.963, ppl +1.0%
#   int4 weights:  KL 0.36 (max 0.93), top-1 0.70, top-5 0.70, ppl +61% (int4 costs a 135M model a lot)
#   int8 KV cache: max-abs 0.21, KL 8.0e-5 (max 5.0e-4), top-1 1.0, top-5 0.997, ppl -0.2%
#   int4 KV cache: max-abs 1.5, KL 3.3e-3 (max 0.027), top-1 0.977, top-5 0.971, ppl +0.3%
#   window 64:     max-abs 3.7e-4 after 192 tokens, 3.4e-3 after 1024 (KL max 5e-8, top-1 1.0)
# golden.npz has 16 rows: one near-tie flipping its top-1 (int8 KV cache: KL 1.3e-4 yet top-1
# 15/16) must not fail a correct export, so below fp32 top-1/top-5 leave room for a flip or
# more; KL is the strict gate. A broken export is off by orders of magnitude: a wrong window
# (6 instead of 12) gave KL 0.11 and top-1 0.26 even on a tiny random model.
WEIGHT_BOUNDS: dict[str, dict[str, float]] = {
    "fp32": {"max_abs_error": 1e-3, "max_kl": 1e-6, "max_kl_peak": 1e-5, "min_top1": 0.99, "min_top5": 0.98,
             "max_ppl_delta": 1e-4},
    "fp16": {"max_abs_error": 0.1, "max_kl": 2e-5, "max_kl_peak": 1e-4, "min_top1": 0.9, "min_top5": 0.9,
             "max_ppl_delta": 1e-3},
    "int8": {"max_kl": 0.02, "max_kl_peak": 0.1, "min_top1": 0.75, "min_top5": 0.75, "max_ppl_delta": 0.05},
    "int4": {"max_kl": 1.0, "max_kl_peak": 3.0, "min_top1": 0.4, "min_top5": 0.4, "max_ppl_delta": 1.5},
}
# A quantized KV cache rounds keys/values computed in another float order than PyTorch's, so
# single codes flip: max-abs is no measure there, the distributions are. (fp16: not measured,
# the ort lowering cannot export it; set from fp16's 2^-11 rounding.)
KV_BOUNDS: dict[str, dict[str, float | None]] = {
    "fp32": {},
    "fp16": {"max_abs_error": None, "max_kl": 1e-4, "max_kl_peak": 1e-3, "min_top1": 0.9, "min_top5": 0.9,
             "max_ppl_delta": 2e-3},
    "int8": {"max_abs_error": None, "max_kl": 1e-3, "max_kl_peak": 5e-3, "min_top1": 0.9, "min_top5": 0.9,
             "max_ppl_delta": 0.01},
    "int4": {"max_abs_error": None, "max_kl": 0.01, "max_kl_peak": 0.1, "min_top1": 0.85, "min_top5": 0.85,
             "max_ppl_delta": 0.03},
}
# A ring buffer (--window) re-numbers positions inside the cache (StreamingLLM) where onnxruntime
# rotates by absolute position: the same relative angles from larger absolute ones, so max-abs
# grows with the position (3.4e-3 after 1024 tokens) while KL stays < 1e-7.
RING_BOUNDS: dict[str, float | None] = {"max_abs_error": None}


class ThresholdKeyError(EdgeattnError, ValueError):
    """Not a threshold key."""


def faithfulness_precision(manifest: Manifest) -> tuple[str, str, bool]:
    """(weights, KV cache, ring buffer) of a folder: what its faithfulness defaults depend on."""
    return manifest.weights.dtype, manifest.kv_cache.codec, manifest.kv_cache.ring


def default_bounds(weights: str, kv_cache: str, ring: bool, user: dict[str, float]) -> dict[str, tuple[float, str]]:
    """{key: (bound, source)} for a faithfulness comparison: per key the looser of the weights' and
    the KV cache's default (None drops the key), then the user's bounds on top."""
    bounds = {key: (value, f"default ({weights} weights)") for key, value in WEIGHT_BOUNDS[weights].items()}
    for table, source in ((KV_BOUNDS[kv_cache], f"default ({kv_cache} KV cache)"),
                          (RING_BOUNDS if ring else {}, "default (ring buffer)")):
        for key, value in table.items():
            if value is None:
                bounds.pop(key, None)
            elif key not in bounds or _looser(key, value, bounds[key][0]):
                bounds[key] = (value, source)
    return {**bounds, **user_bounds(user)}


def user_bounds(user: dict[str, float]) -> dict[str, tuple[float, str]]:
    """The user's bounds, refused unless each is a known key with a finite number >= 0 (NaN passes nothing)."""
    for key, value in user.items():
        if key not in THRESHOLDS:
            raise ThresholdKeyError(f"unknown threshold {key!r}; known: {', '.join(THRESHOLDS)}")
        if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and value >= 0):
            raise InvalidOptionError(f"{key} must be a finite number >= 0, got {value!r}")
    return {key: (float(value), "user") for key, value in user.items()}


@dataclass(frozen=True)
class Check:
    key: str
    metric: str
    op: str  # "<=" or ">="
    bound: float
    value: float
    source: str

    @property
    def passed(self) -> bool:
        if math.isnan(self.value):
            return False  # a NaN logit fails every bound
        return self.value <= self.bound if self.op == "<=" else self.value >= self.bound

    def describe(self) -> str:
        """One line naming the metric, its value and its bound."""
        return f"{self.metric} = {self.value:.6g}, bound {self.op} {self.bound:g} ({self.key}, {self.source})"


def check(metrics: dict, bounds: dict[str, tuple[float, str]]) -> list[Check]:
    """One Check per bound whose metric applies to this comparison."""
    checks = []
    for key, (bound, source) in bounds.items():
        threshold = THRESHOLDS[key]
        if threshold.metric in metrics:  # KV SQNR, for one, exists only where the cache is quantized
            checks.append(Check(key, threshold.metric, "<=" if threshold.upper else ">=", bound,
                                float(metrics[threshold.metric]), source))
    return checks


def _looser(key: str, candidate: float, current: float) -> bool:
    return candidate > current if THRESHOLDS[key].upper else candidate < current
