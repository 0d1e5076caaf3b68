"""An output folder from an exported graph, with the smallest manifest EdgeLM runs (convert's checks are not
under test where this is used)."""

from __future__ import annotations

from pathlib import Path

from edgeattn.exporters.export import PAST_NAME, PRESENT_NAME, export_graph
from edgeattn.runtimes.manifest import (
    CacheNames,
    FilesInfo,
    IOInfo,
    KVCacheInfo,
    Manifest,
    ModelInfo,
    SourceInfo,
    WeightsInfo,
    write_manifest,
)


def exported_folder(folder: Path, decoder, lowerings: list, tokenizer, max_length: int) -> Path:
    """Export ``decoder`` with ``lowerings`` into ``folder`` and describe it; returns the folder."""
    export_graph(decoder, lowerings, folder / "model.onnx")
    tokenizer.save(str(folder / "tokenizer.json"))
    layout = lowerings[0].cache_layout().manifest()
    write_manifest(folder, Manifest(
        source=SourceInfo(model="test"), spec={}, weights=WeightsInfo(dtype="fp32"),
        files=FilesInfo(model="model.onnx", tokenizer="tokenizer.json"),
        model=ModelInfo(num_layers=len(lowerings), vocab_size=decoder.config.vocab_size, max_length=max_length),
        kv_cache=KVCacheInfo.from_dict({**layout, "bytes_per_token": decoder.kv_bytes_per_token(),
                                        "codec": decoder.attentions()[0].codec.dtype}),
        io=IOInfo(cache_names=CacheNames(past=PAST_NAME, present=PRESENT_NAME))))
    return folder
