"""The texts edgeattn reads: the package's own defaults, or a file the user gives.

Two short texts ship in ``edgeattn/data`` (prose written for edgeattn, under its license):
``calibration.txt`` calibrates rewrites (and gives golden.npz and validate their prompts);
``evaluation.txt`` (about 2,500 SmolLM2 tokens) is what ``quality`` scores by default,
never used to calibrate. WikiText-2 (``../shared/data``) is used by tests and benchmarks
where it exists; it is never shipped. ``wikitext_path`` finds it, or returns None so
callers can skip; ``EDGEATTN_WIKITEXT_DIR`` names the only folder to look in, so a
missing folder hides it (a user's machine).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import torch

from edgeattn.errors import InvalidOptionError
from edgeattn.rewrites.gqa_calibration import FIT_TOKENS
from edgeattn.spec import AttentionSpec

DEFAULT_CALIBRATION_TOKENS = 2048
# A calibrated head merge fits on its first FIT_TOKENS; distillation reads a whole text's worth.
GQA_DISTILLATION_TOKENS = 1 << 18
WIKITEXT_ENV = "EDGEATTN_WIKITEXT_DIR"


def default_calibration_text() -> str:
    return resources.files("edgeattn").joinpath("data/calibration.txt").read_text(encoding="utf-8")


def default_evaluation_text() -> str:
    """Held-out prose to score perplexity on: long enough for 2 windows of 1024 SmolLM2 tokens."""
    return resources.files("edgeattn").joinpath("data/evaluation.txt").read_text(encoding="utf-8")


def read_text(path: str | Path | None) -> str:
    """The text of ``path``, or the packaged default calibration text when None."""
    if path is None:
        return default_calibration_text()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration text {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise InvalidOptionError(f"{path} is not UTF-8 text (byte {error.start}: {error.reason})") from None


def calibration_tokens(spec: AttentionSpec) -> int:
    """How many tokens of the calibration text ``spec``'s rewrite reads."""
    if spec.kv_heads is None or spec.gqa_method != "calibrated":
        return DEFAULT_CALIBRATION_TOKENS
    return GQA_DISTILLATION_TOKENS if spec.uptrain_steps or spec.uptrain_minutes else FIT_TOKENS


def calibration_ids(tokenizer, text_path: str | Path | None = None,
                    max_tokens: int = DEFAULT_CALIBRATION_TOKENS) -> torch.Tensor:
    """Token ids [1, T] of the calibration text (T <= max_tokens)."""
    ids = tokenizer.encode(read_text(text_path)).ids[:max_tokens]
    if len(ids) < 16:
        raise InvalidOptionError(f"calibration text too short: {len(ids)} tokens (need at least 16)")
    return torch.tensor([ids])


def wikitext_path(split: str) -> Path | None:
    """``valid`` or ``test`` split of WikiText-2, or None when absent.

    Looked for in $EDGEATTN_WIKITEXT_DIR only when it is set (``/nonexistent`` hides it),
    else in ../shared/data/wikitext-2 beside the repository or the working directory.
    """
    if WIKITEXT_ENV in os.environ:
        roots = [Path(os.environ[WIKITEXT_ENV])]
    else:
        here = Path(__file__).resolve().parents[2]  # the repository, in a development checkout
        roots = [here.parent / "shared/data/wikitext-2", Path.cwd().parent / "shared/data/wikitext-2"]
    for root in roots:
        path = root / f"{split}.txt"
        if path.is_file():
            return path
    return None
