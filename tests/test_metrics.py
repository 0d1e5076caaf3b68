"""Every validate metric against a value computed by hand on tiny arrays; thresholds and their checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeattn.runtimes import metrics
from edgeattn.runtimes.thresholds import THRESHOLDS, ThresholdKeyError, check, default_bounds

EXACT = 1e-12  # float64 arithmetic on a handful of numbers


def test_max_and_mean_abs_error():
    ref = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    cand = np.array([[1.0, 2.5, 3.0], [0.0, 0.0, -1.0]])
    # |differences| = [0, .5, 0, 0, 0, 1]
    assert metrics.max_abs_error(ref, cand) == pytest.approx(1.0, abs=EXACT)
    assert metrics.mean_abs_error(ref, cand) == pytest.approx(1.5 / 6, abs=EXACT)


def test_cosine_similarity_per_row():
    ref = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    cand = np.array([[0.0, 1.0], [2.0, 2.0], [-3.0, 0.0]])
    # orthogonal, parallel, opposite
    np.testing.assert_allclose(metrics.cosine_similarity(ref, cand), [0.0, 1.0, -1.0], atol=EXACT)


def test_top1_agreement_and_top_k_overlap():
    ref = np.array([[3.0, 1.0, 0.0, -1.0], [0.0, 5.0, 1.0, 2.0]])
    cand = np.array([[2.0, 1.0, 0.0, -1.0], [6.0, 5.0, 1.0, 2.0]])
    assert metrics.top1_agreement(ref, cand) == 0.5  # row 0 agrees (token 0), row 1 does not (1 vs 0)
    # top-2: row 0 {0,1} vs {0,1} -> 2/2; row 1 {1,3} vs {0,1} -> 1/2
    assert metrics.topk_overlap(ref, cand, k=2) == pytest.approx(0.75, abs=EXACT)


def test_kl_divergence_of_two_token_distributions():
    ref = np.array([[0.0, 0.0]])  # p = (1/2, 1/2)
    cand = np.array([[math.log(3.0), 0.0]])  # q = (3/4, 1/4)
    # KL(p||q) = 1/2 ln((1/2)/(3/4)) + 1/2 ln((1/2)/(1/4)) = 1/2 ln(4/3)
    assert metrics.kl_divergence(ref, cand)[0] == pytest.approx(0.5 * math.log(4.0 / 3.0), abs=EXACT)
    assert metrics.kl_divergence(cand, cand)[0] == pytest.approx(0.0, abs=EXACT)


def test_perplexity():
    logits = np.array([[0.0, 0.0], [math.log(3.0), 0.0]])  # rows (1/2, 1/2) and (3/4, 1/4)
    # targets 0 then 1: probabilities 1/2 and 1/4 -> exp((ln 2 + ln 4) / 2) = 2^1.5
    assert metrics.perplexity(logits, np.array([0, 1])) == pytest.approx(2.0**1.5, rel=EXACT)


def test_first_difference_and_greedy_match():
    assert metrics.first_difference([1, 2, 3], [1, 2, 4]) == 2
    assert metrics.first_difference([5], [6]) == 0
    assert metrics.first_difference([1, 2], [1, 2]) is None
    result = metrics.compare_greedy([[1, 2, 3, 4], [1, 1, 1, 1]], [[1, 2, 9, 9], [1, 1, 1, 1]])
    assert result == {"greedy_tokens": 4, "first_difference": [2, None], "greedy_match": 0.5}  # worst prompt: 2 of 4


def test_sqnr_db():
    # signal 3^2 + 4^2 = 25, noise 0.5^2 = 0.25 -> 10 log10(100) = 20 dB
    assert metrics.sqnr_db(np.array([3.0, 4.0]), np.array([3.0, 4.5])) == pytest.approx(20.0, abs=EXACT)
    assert metrics.sqnr_db(np.array([3.0, 4.0]), np.array([3.0, 4.0])) == math.inf


def test_compare_logits_keys_and_shape_check():
    ref = np.array([[0.0, 0.0], [math.log(3.0), 0.0]])
    result = metrics.compare_logits(ref, ref, np.array([0, 1]))
    assert result["rows"] == 2 and result["kl_max"] == pytest.approx(0.0, abs=EXACT)
    assert result["ppl_delta"] == 0.0 and result["top1_agreement"] == 1.0
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.compare_logits(ref, ref[:1], np.array([0]))


def test_default_bounds_by_precision():
    fp32 = default_bounds("fp32", "fp32", False, {})
    assert fp32["max_abs_error"] == (1e-3, "default (fp32 weights)") and fp32["max_kl"][0] == 1e-6
    # a quantized KV cache drops max-abs (codes flip with the float order) and loosens KL
    kv8 = default_bounds("fp32", "int8", False, {})
    assert "max_abs_error" not in kv8 and kv8["max_kl"] == (1e-3, "default (int8 KV cache)")
    assert "max_abs_error" not in default_bounds("fp32", "fp32", True, {})  # ring buffers: positions differ
    # per key the looser default wins: int4 weights' top-1 (0.4) over the int8 KV cache's (0.9)
    assert default_bounds("int4", "int8", False, {})["min_top1"] == (0.4, "default (int4 weights)")
    # the user's bound replaces the default and says so
    assert default_bounds("fp32", "fp32", False, {"min_top1": 0.5})["min_top1"] == (0.5, "user")
    with pytest.raises(ThresholdKeyError, match="unknown threshold 'colour'"):
        default_bounds("fp32", "fp32", False, {"colour": 1.0})


def test_checks_pass_fail_nan_and_absent_metrics():
    bounds = {"max_kl": (0.1, "user"), "min_top1": (0.9, "user"), "min_kv_sqnr": (20.0, "user")}
    checks = {c.key: c for c in check({"kl_mean": 0.2, "top1_agreement": 0.9}, bounds)}
    assert set(checks) == {"max_kl", "min_top1"}  # no KV SQNR in this comparison: not checked
    assert not checks["max_kl"].passed and checks["min_top1"].passed  # bounds are inclusive
    assert checks["max_kl"].describe() == "kl_mean = 0.2, bound <= 0.1 (max_kl, user)"
    assert not check({"kl_mean": float("nan")}, bounds)[0].passed
    assert all(t.flag.startswith(("--max-", "--min-")) for t in THRESHOLDS.values())
