"""Shared fixtures: the real SmolLM2 model (loaded once) and WikiText-2 when present."""

from __future__ import annotations

import copy

import pytest
import torch

from edgeattn.calibration import wikitext_path

TINY_FAMILIES = ["gpt2", "llama", "mistral", "phi3", "qwen2"]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2():
    """The packaged SmolLM2-135M (loaded once per run; tests must deepcopy before rewriting)."""
    from edgeattn.models import load

    return load("smollm2")


@pytest.fixture
def smollm2_decoder(smollm2):
    return copy.deepcopy(smollm2.decoder)


def wikitext_or_skip(split: str):
    path = wikitext_path(split)
    if path is None:
        pytest.skip(f"WikiText-2 {split}.txt not found (expected in ../shared/data/wikitext-2 or $EDGEATTN_WIKITEXT_DIR)")
    return path
