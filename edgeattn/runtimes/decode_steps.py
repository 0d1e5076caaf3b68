"""The steps every timing of a folder is made of: fill its cache to a context, then decode one token."""

from __future__ import annotations

import time

import numpy as np

from edgeattn.runtimes.session import PREFILL_CHUNK, EdgeLM

FILL_CHUNK = PREFILL_CHUNK  # tokens per prefill call when filling the cache to a context


def fill_cache(lm: EdgeLM, tokens: int, vocab: int, rng: np.random.Generator) -> int:
    """Empty the cache, prefill ``tokens`` random ids in chunks; return the greedy next token."""
    lm.reset(1)
    logits = None
    while lm.length < tokens:
        logits = lm.forward(rng.integers(0, vocab, size=(1, min(FILL_CHUNK, tokens - lm.length))))
    return int(np.argmax(logits[0]))


def decode_step(lm: EdgeLM, token: int) -> tuple[int, float]:
    """One decode step: (greedy next token, milliseconds of the forward pass)."""
    started = time.perf_counter()
    logits = lm.forward(np.array([[token]], dtype=np.int64))
    elapsed = ms_since(started)
    return int(np.argmax(logits[0])), elapsed


def ms_since(started: float) -> float:
    """Milliseconds since a time.perf_counter() reading."""
    return (time.perf_counter() - started) * 1e3
