"""Numerics metrics between a reference's and a candidate's next-token logits (numpy only).

Dimension legend: R rows (positions at which both models predicted the next token),
V vocabulary, G greedily generated tokens.

numpy only: ``edgeattn validate --golden`` computes the same metrics on a phone or a
board where only the runtime (onnxruntime, numpy, tokenizers) is installed. Everything
is computed in float64 so that the metric itself adds no error to what it measures.
"""

from __future__ import annotations

import math

import numpy as np

TOP_K = 5


def log_softmax(logits_RV: np.ndarray) -> np.ndarray:
    x = np.asarray(logits_RV, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def max_abs_error(reference_RV: np.ndarray, candidate_RV: np.ndarray) -> float:
    return float(np.abs(_f64(candidate_RV) - _f64(reference_RV)).max())


def mean_abs_error(reference_RV: np.ndarray, candidate_RV: np.ndarray) -> float:
    return float(np.abs(_f64(candidate_RV) - _f64(reference_RV)).mean())


def cosine_similarity(reference_RV: np.ndarray, candidate_RV: np.ndarray) -> np.ndarray:
    """Cosine of the angle between the two logit vectors of each row -> [R]."""
    a, b = _f64(reference_RV), _f64(candidate_RV)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (a * b).sum(axis=-1) / np.where(norms > 0, norms, 1.0)


def top1_agreement(reference_RV: np.ndarray, candidate_RV: np.ndarray) -> float:
    """Fraction of rows whose most likely next token is the same in both."""
    return float((np.argmax(reference_RV, axis=-1) == np.argmax(candidate_RV, axis=-1)).mean())


def topk_overlap(reference_RV: np.ndarray, candidate_RV: np.ndarray, k: int = TOP_K) -> float:
    """Mean over rows of |top-k(reference) ∩ top-k(candidate)| / k (k at most the vocabulary)."""
    k = min(k, reference_RV.shape[-1])
    ref = np.argpartition(-_f64(reference_RV), k - 1, axis=-1)[:, :k]
    cand = np.argpartition(-_f64(candidate_RV), k - 1, axis=-1)[:, :k]
    return float(np.mean([len(set(r) & set(c)) / k for r, c in zip(ref.tolist(), cand.tolist())]))


def kl_divergence(reference_RV: np.ndarray, candidate_RV: np.ndarray) -> np.ndarray:
    """KL(P_reference || P_candidate) of each row's next-token distribution, in nats -> [R]."""
    log_p, log_q = log_softmax(reference_RV), log_softmax(candidate_RV)
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)


def perplexity(logits_RV: np.ndarray, targets_R: np.ndarray) -> float:
    """exp(mean negative log-likelihood of ``targets`` [R] under the rows' distributions)."""
    log_p = log_softmax(logits_RV)
    nll = -log_p[np.arange(log_p.shape[0]), np.asarray(targets_R)]
    return float(math.exp(nll.mean()))


def first_difference(reference_G, candidate_G) -> int | None:
    """Index of the first token where two greedy streams differ, None when they agree throughout."""
    for index, (a, b) in enumerate(zip(reference_G, candidate_G)):
        if int(a) != int(b):
            return index
    return None


def sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio 10·log10(Σx² / Σ(x - x̂)²) in dB (inf when exact)."""
    signal = float(np.square(_f64(reference)).sum())
    noise = float(np.square(_f64(approximation) - _f64(reference)).sum())
    return sqnr_from_energies(signal, noise)


def sqnr_from_energies(signal: float, noise: float) -> float:
    """SQNR in dB from accumulated energies (for streams too large to keep)."""
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def compare_logits(reference_RV: np.ndarray, candidate_RV: np.ndarray, targets_R: np.ndarray) -> dict[str, float]:
    """Every logit metric of one comparison; ``targets`` are the text's next tokens (perplexity)."""
    if reference_RV.shape != candidate_RV.shape:
        raise ValueError(f"logit shapes differ: reference {reference_RV.shape}, candidate {candidate_RV.shape}")
    cosine, kl = cosine_similarity(reference_RV, candidate_RV), kl_divergence(reference_RV, candidate_RV)
    ppl_reference, ppl_candidate = perplexity(reference_RV, targets_R), perplexity(candidate_RV, targets_R)
    return {
        "rows": int(reference_RV.shape[0]),
        "max_abs_error": max_abs_error(reference_RV, candidate_RV),
        "mean_abs_error": mean_abs_error(reference_RV, candidate_RV),
        "cosine_min": float(cosine.min()),
        "cosine_mean": float(cosine.mean()),
        "top1_agreement": top1_agreement(reference_RV, candidate_RV),
        "top5_overlap": topk_overlap(reference_RV, candidate_RV, TOP_K),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "ppl_reference": ppl_reference,
        "ppl_candidate": ppl_candidate,
        "ppl_delta": ppl_candidate - ppl_reference,
        "ppl_delta_relative": ppl_candidate / ppl_reference - 1.0,
    }


def compare_greedy(reference_PG: list[list[int]], candidate_PG: list[list[int]]) -> dict:
    """First differing greedy token per prompt, and ``greedy_match``: the worst prompt's matching
    prefix as a fraction of the tokens generated (1.0 = identical streams)."""
    firsts = [first_difference(r, c) for r, c in zip(reference_PG, candidate_PG)]
    lengths = [min(len(r), len(c)) for r, c in zip(reference_PG, candidate_PG)]
    matched = [length if first is None else first for first, length in zip(firsts, lengths)]
    return {"greedy_tokens": max(lengths), "first_difference": firsts,
            "greedy_match": min(m / n for m, n in zip(matched, lengths))}


def _f64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)
