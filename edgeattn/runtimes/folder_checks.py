"""Does a folder's manifest describe its own graph and tokenizer? Checked once, when a folder loads.

A manifest edited or copied from another folder would otherwise fail in the middle of a
decode step (a wrong layer count, cache dtype or shape) or produce token ids beyond the
vocabulary (a foreign tokenizer); here it is refused in one line before anything runs.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
from tokenizers import Tokenizer

from edgeattn.runtimes.manifest import Manifest, ManifestError

GRAPH_INPUTS = ("input_ids", "attention_mask")
GRAPH_LOGITS = "logits"
ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int8": "tensor(int8)", "uint8": "tensor(uint8)"}


def check_graph(folder: Path, manifest: Manifest, session: ort.InferenceSession) -> None:
    """The graph's inputs and outputs are the ones the manifest tells the runtime to bind."""
    layers, names, kv = manifest.model.num_layers, manifest.io.cache_names, manifest.kv_cache
    inputs = {arg.name: arg for arg in session.get_inputs()}
    outputs = {arg.name: arg for arg in session.get_outputs()}
    if kv.capacity != kv.shape_tail[1]:
        raise ManifestError(f"{folder}: the manifest's KV-cache capacity {kv.capacity} does not match its "
                            f"shape_tail {kv.shape_tail}")
    missing = [name for name in GRAPH_INPUTS if name not in inputs] + [GRAPH_LOGITS] * (GRAPH_LOGITS not in outputs)
    if missing:
        raise ManifestError(f"{folder}: the graph has no {', '.join(missing)}; it is not an edgeattn model")
    for role, pattern, graph_names, others in (("past", names.past, inputs, GRAPH_INPUTS),
                                               ("present", names.present, outputs, (GRAPH_LOGITS,))):
        expected = [pattern.format(layer=layer, kind=kind) for layer in range(layers) for kind in kv.kinds]
        cache = set(graph_names) - set(others)
        if set(expected) != cache:
            raise ManifestError(f"{folder}: the manifest describes {layers} layer{'s' * (layers != 1)} "
                                f"({len(expected)} {role} cache tensors named like {expected[0]!r}) but the graph "
                                f"has {len(cache)}; the manifest does not belong to this model")
        for layer in range(layers):
            for kind, (dtype, shape_tail) in kv.buffers.items():
                _check_cache_tensor(folder, dtype, shape_tail, graph_names[pattern.format(layer=layer, kind=kind)])
    vocabulary = outputs[GRAPH_LOGITS].shape[-1] if outputs[GRAPH_LOGITS].shape else None
    if isinstance(vocabulary, int) and vocabulary != manifest.model.vocab_size:
        raise ManifestError(f"{folder}: the manifest's vocab_size {manifest.model.vocab_size} does not match "
                            f"the graph's logits ({vocabulary})")


def load_tokenizer(folder: Path, manifest: Manifest) -> Tokenizer:
    """The folder's tokenizer, refused when unreadable or when it has ids the model has no logits for."""
    name = manifest.files.tokenizer
    try:
        tokenizer = Tokenizer.from_file(str(folder / name))
    except Exception as error:  # tokenizers raises a bare Exception for a bad file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ManifestError(f"{folder}: tokenizer {name} cannot be read ({reason})") from error
    size, vocabulary = tokenizer.get_vocab_size(with_added_tokens=True), manifest.model.vocab_size
    if size > vocabulary:
        raise ManifestError(f"{folder}: tokenizer {name} has {size} tokens but the model only {vocabulary}; "
                            "it belongs to another model")
    return tokenizer


def _check_cache_tensor(folder: Path, dtype: str, shape_tail: list, arg) -> None:
    """One past/present tensor: [batch, *shape_tail] of the manifest's dtype (symbolic dims pass)."""
    if arg.type != ORT_TYPES.get(dtype):
        raise ManifestError(f"{folder}: the manifest's KV-cache dtype {dtype} does not match the graph's "
                            f"{arg.type} ({arg.name})")
    tail = list(arg.shape[1:]) if arg.shape else []
    if len(tail) != len(shape_tail) or any(isinstance(dim, int) and dim != want
                                           for dim, want in zip(tail, shape_tail)):
        raise ManifestError(f"{folder}: the manifest's KV-cache shape [batch, {', '.join(map(str, shape_tail))}] "
                            f"does not match the graph's {arg.shape} ({arg.name})")
