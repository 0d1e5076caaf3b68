"""The names a user chooses precisions, methods and ops by, as ``Literal`` types.

The spec, convert, the lowerings and the CLI's ``click.Choice`` lists all read them from here,
so a new precision is added in one place. Standard library only: the CLI loads this module on
a runtime-only install.
"""

from __future__ import annotations

from typing import Literal, get_args

GqaMethod = Literal["calibrated", "mean"]
KVCachePrecision = Literal["fp32", "fp16", "int8", "int4"]
KVQuantMode = Literal["per-channel", "per-token"]
# Hierarchical attention: each query head picks its own blocks, or a kv head's query heads share the blocks
# their bounds rank highest together (a third of the rows to read with 3 query heads per kv head).
BlockSelect = Literal["query-head", "kv-head"]
# "source": each tensor at its own precision in a GGUF source.
WeightsPrecision = Literal["fp32", "fp16", "int8", "int4", "source"]
# Fastest first: "auto" takes the first that represents the spec exactly (edgeattn.exporters.lowering).
AttentionOp = Literal["auto", "ort", "onnx", "edgeattn"]
# onnxruntime execution providers edgeattn runs on (edgeattn.runtimes.session maps them to onnxruntime's names).
Provider = Literal["cpu", "cuda"]

GQA_METHODS: tuple[str, ...] = get_args(GqaMethod)
KV_CACHE_PRECISIONS: tuple[str, ...] = get_args(KVCachePrecision)
KV_QUANT_MODES: tuple[str, ...] = get_args(KVQuantMode)
BLOCK_SELECTS: tuple[str, ...] = get_args(BlockSelect)
WEIGHTS_PRECISIONS: tuple[str, ...] = get_args(WeightsPrecision)
ATTENTION_OPS: tuple[str, ...] = get_args(AttentionOp)
PROVIDERS: tuple[str, ...] = get_args(Provider)
