"""Perplexity under the project's convention (see ../shared/data/README.md).

Concatenate the text, tokenize it with the model's tokenizer, evaluate
non-overlapping windows of ``context`` tokens (each from an empty cache), and report
exp(mean token negative log-likelihood). Every report states the context and the
number of scored tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from edgeattn.errors import InvalidOptionError


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    context: int
    tokens: int  # scored tokens (each window scores context - 1)
    windows: int


def text_ids(tokenizer, text: str) -> torch.Tensor:
    """All token ids of ``text`` (lines joined as in the file) as a 1-D tensor."""
    return torch.tensor(tokenizer.encode(text).ids)


def perplexity(model, ids: torch.Tensor, context: int, max_windows: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> Perplexity:
    """Perplexity of ``model`` (a Decoder) over non-overlapping ``context``-token windows of ``ids``."""
    windows = ids.numel() // context
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise InvalidOptionError(f"text has {ids.numel()} tokens, fewer than one window of {context}")
    nll, count = 0.0, 0
    with torch.no_grad():
        for index in range(windows):
            window = ids[index * context:(index + 1) * context][None]
            logits = model(window)[0, :-1]
            nll += F.cross_entropy(logits.float(), window[0, 1:], reduction="sum").item()
            count += context - 1
            if progress is not None:
                progress(index + 1, windows)
    return Perplexity(math.exp(nll / count), context, count, windows)
