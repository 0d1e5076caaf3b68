"""Perplexity under the project's convention (see ../shared/data/README.md).

Concatenate the text, tokenize it with the model's tokenizer, evaluate
non-overlapping windows of ``context`` tokens (each from an empty cache), and report
exp(mean token negative log-likelihood). Every report states the context and the
number of scored tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

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


def check_windows(context: int, max_windows: int | None) -> None:
    """A window scores ``context - 1`` tokens, so it needs two; at least one window must be scored."""
    if isinstance(context, bool) or not isinstance(context, int) or context < 2:
        raise InvalidOptionError(f"context must be a whole number of tokens >= 2, got {context!r}")
    if max_windows is not None and (isinstance(max_windows, bool) or not isinstance(max_windows, int)
                                    or max_windows < 1):
        raise InvalidOptionError(f"max_windows must be a whole number >= 1, got {max_windows!r}")


@dataclass(frozen=True)
class Windows:
    """What is scored: ``count`` windows of ``context`` tokens; ``note`` says why when it differs from the request."""

    context: int
    count: int
    note: str | None = None


def choose_windows(tokens: int, context: int, max_windows: int | None) -> Windows:
    """The windows a text of ``tokens`` tokens allows: the ones asked for when it is long enough, else as
    many whole windows as it holds, or one window of the whole text when it is shorter than one."""
    check_windows(context, max_windows)
    if tokens < 2:
        raise InvalidOptionError(f"text has {tokens} tokens; scoring needs at least 2")
    whole = tokens // context
    if whole == 0:
        return Windows(tokens, 1, f"the text has {tokens} tokens, fewer than one window of {context}: "
                                  f"scored one window of {tokens}")
    if max_windows is not None and whole < max_windows:
        return Windows(context, whole, f"the text has {tokens} tokens: scored {whole} window{'s' * (whole > 1)} "
                                       f"of {context}, not {max_windows}")
    return Windows(context, whole if max_windows is None else max_windows)


def perplexity(model, ids: torch.Tensor, context: int, max_windows: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> Perplexity:
    """Perplexity of ``model`` (a Decoder) over non-overlapping ``context``-token windows of ``ids``."""
    check_windows(context, max_windows)
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
