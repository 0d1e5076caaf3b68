"""Loading models: any supported checkpoint -> edgeattn's canonical Decoder, and the attention core it runs.

``decoder`` is the canonical model; ``attention`` (one layer: projections, rotary, cache, visibility),
``visibility`` (which keys a query sees), ``kvcache`` and ``kv_codec`` (how keys and values are stored) and
``rotary`` are what rewrites change and exporters lower.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from edgeattn.models.decoder import Decoder, DecoderConfig
from edgeattn.models.families import UnsupportedModelError, supported_families, to_decoder
from edgeattn.models.sources import HFSource, ModelLoadError, builtin_names, load_hf

__all__ = [
    "Decoder", "DecoderConfig", "LoadedModel", "ModelLoadError", "UnsupportedModelError",
    "builtin_names", "load", "load_hf", "supported_families", "to_decoder",
]


@dataclass
class LoadedModel:
    """The canonical decoder of a checkpoint, its tokenizer, and its provenance."""

    decoder: Decoder
    tokenizer: Tokenizer
    chat_template: str | None
    name: str
    weights_sha256: str | None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids


def load(name_or_path: str | Path) -> LoadedModel:
    """Load ``smollm2``, ``tiny-<family>``, a Hugging Face folder or a ``.gguf`` file.

    Example::

        model = edgeattn.models.load("smollm2")
        logits = model.decoder(torch.tensor([model.encode("The capital of France is")]))
    """
    source: HFSource = load_hf(name_or_path)
    decoder = to_decoder(source.model)
    return LoadedModel(decoder, source.tokenizer, source.chat_template, source.name, source.weights_sha256)
