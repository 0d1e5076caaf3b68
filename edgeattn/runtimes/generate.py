"""Token generation on an EdgeLM: greedy or temperature/top-k/top-p sampling, streamed."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from edgeattn.errors import InvalidOptionError
from edgeattn.runtimes.session import ContextFullError, EdgeLM

STOPS = ("eos", "max_new_tokens", "cache_full", "interrupted")  # why a generation ended


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 is greedy; top_k 0 and top_p 1 disable those filters; top_k is checked against
    the vocabulary when generation starts (the config does not know the model)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not _number(self.temperature) or not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InvalidOptionError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _whole(self.top_k) or self.top_k < 0:
            raise InvalidOptionError(f"top_k must be a whole number >= 0, got {self.top_k!r}")
        if not _number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidOptionError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _whole(self.seed) or self.seed < 0):
            raise InvalidOptionError(f"seed must be a whole number >= 0, got {self.seed!r}")


@dataclass
class Generation:
    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    stop: str = "max_new_tokens"  # one of STOPS
    time_to_first_token_s: float = 0.0
    decode_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        steps = len(self.tokens) - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {"text": self.text, "prompt_tokens": len(self.prompt_tokens), "new_tokens": len(self.tokens),
                "token_ids": self.tokens, "stop": self.stop,
                "time_to_first_token_s": round(self.time_to_first_token_s, 4),
                "decode_tokens_per_s": round(self.decode_tokens_per_s, 2)}


def next_token(logits: np.ndarray, config: SamplingConfig, rng: np.random.Generator) -> int:
    """Pick the next token from logits [vocab]."""
    if config.temperature == 0.0:
        return int(np.argmax(logits))
    logits = logits.astype(np.float64)
    scaled = (logits - logits.max()) / config.temperature  # shifted first: a tiny temperature gives -inf, not NaN
    if config.top_k:
        kth = np.partition(scaled, -config.top_k)[-config.top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if config.top_p < 1.0:
        order = np.argsort(-probs)
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, config.top_p)) + 1]
        filtered = np.zeros_like(probs)
        filtered[keep] = probs[keep]
        probs = filtered / filtered.sum()
    return int(rng.choice(probs.size, p=probs))


def stream(lm: EdgeLM, prompt_ids: list[int], max_new_tokens: int, config: SamplingConfig = SamplingConfig(),
           stop_token_ids: list[int] | None = None, result: Generation | None = None) -> Iterator[int]:
    """Yield new token ids one by one (from an empty cache); fills ``result`` with timings."""
    if not prompt_ids:
        raise InvalidOptionError("the prompt is empty")
    if max_new_tokens < 1:
        raise InvalidOptionError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    vocab = lm.manifest.model.vocab_size
    if config.top_k > vocab:
        raise InvalidOptionError(f"top_k {config.top_k} is more than the vocabulary of {vocab} tokens")
    stops = set(lm.stop_token_ids if stop_token_ids is None else stop_token_ids)
    rng = np.random.default_rng(config.seed)
    result = result if result is not None else Generation(list(prompt_ids))
    lm.reset(1)
    started = time.perf_counter()
    logits = lm.forward(np.array([prompt_ids]))[0]  # a prompt beyond the cache is an error, not a stop
    result.time_to_first_token_s = time.perf_counter() - started
    decode_started = time.perf_counter()
    try:
        for step in range(max_new_tokens):
            token = next_token(logits, config, rng)
            if token in stops:
                result.stop = "eos"
                break
            result.tokens.append(token)
            yield token
            if step + 1 < max_new_tokens:
                try:
                    logits = lm.forward(np.array([[token]]))[0]
                except ContextFullError:
                    result.stop = "cache_full"
                    break
    finally:
        result.decode_s = time.perf_counter() - decode_started


def generate(lm: EdgeLM, prompt: str, max_new_tokens: int = 64, config: SamplingConfig = SamplingConfig(),
             chat: bool = False) -> Generation:
    """Generate text after ``prompt`` (as a user chat turn when ``chat``)."""
    text = lm.chat_prompt([{"role": "user", "content": prompt}]) if chat else prompt
    result = Generation(lm.encode(text))
    for _ in stream(lm, result.prompt_tokens, max_new_tokens, config, result=result):
        pass
    result.text = lm.decode(result.tokens)
    return result
