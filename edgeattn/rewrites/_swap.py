"""The one helper every rewrite uses to visit and change EdgeAttention modules."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from edgeattn.errors import EdgeattnError
from edgeattn.models.attention import EdgeAttention


class RewriteError(EdgeattnError, ValueError):
    """A rewrite could not be applied (nothing to rewrite, or the model does not allow it)."""


@dataclass(frozen=True)
class LayerChange:
    rewrite: str
    layer: int
    change: str


def for_each_attention(model: nn.Module, rewrite: str, change: Callable[[int, EdgeAttention], str]) -> list[LayerChange]:
    """Apply ``change`` to every EdgeAttention (in layer order); it returns what it did.

    A rewrite that finds no EdgeAttention is an error, never a silent no-op.
    """
    layers = [module for module in model.modules() if isinstance(module, EdgeAttention)]
    if not layers:
        raise RewriteError(f"{rewrite}: the model has no EdgeAttention module to rewrite")
    return [LayerChange(rewrite, index, change(index, attn)) for index, attn in enumerate(layers)]
