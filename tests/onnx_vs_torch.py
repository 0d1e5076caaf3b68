"""Feed the same token chunks to an exported folder (EdgeLM) and to the rewritten PyTorch decoder."""

from __future__ import annotations

import numpy as np
import torch

from edgeattn.runtimes import EdgeLM


def compare(folder, decoder, chunks: list, max_length: int, batch: int = 1) -> tuple[float, list, list]:
    """``chunks``: [B, n] tensors, or None for "the greedy token". Returns the worst max-abs logit
    difference and both greedy token streams."""
    lm = EdgeLM.load(folder, threads=1)
    lm.reset(batch)
    cache = decoder.new_cache(batch, max_length)
    worst, torch_tokens, ort_tokens = 0.0, [], []
    with torch.no_grad():
        for chunk in chunks:
            chunk = chunk if chunk is not None else torch.tensor(torch_tokens[-1])[:, None]
            expected = decoder(chunk, cache)[:, -1].numpy()
            actual = lm.forward(chunk.numpy())
            worst = max(worst, float(np.abs(actual - expected).max()))
            torch_tokens.append(expected.argmax(-1).tolist())
            ort_tokens.append(actual.argmax(-1).tolist())
    return worst, torch_tokens, ort_tokens


def random_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    """Token ids of the tiny models' 256-symbol vocabulary, reproducible by seed."""
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))
