"""edgeattn: rewrite a causal LM's attention for edge devices, export it, run it.

The public API is imported lazily so that ``import edgeattn`` (and the on-device
runtime) never pulls in torch::

    import edgeattn
    model = edgeattn.load("smollm2")
    report = edgeattn.rewrite(model.decoder, edgeattn.AttentionSpec(kv_heads=1, window=512, sinks=4))
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "AttentionSpec": ("edgeattn.spec", "AttentionSpec"),
    "SpecError": ("edgeattn.spec", "SpecError"),
    "load": ("edgeattn.models", "load"),
    "rewrite": ("edgeattn.rewrites", "rewrite"),
    "perplexity": ("edgeattn.evaluation.perplexity", "perplexity"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'edgeattn' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    return getattr(importlib.import_module(module), attribute)
