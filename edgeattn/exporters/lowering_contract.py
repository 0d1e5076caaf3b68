"""What every attention lowering promises the exporter, so ``graph``, ``export``, ``checks`` and the manifest
can call any of them without asking which one it is.

Dimension legend: B batch, L new tokens, P cached tokens before this step, T = P + L, hidden the model width.

One lowering per layer (an ``nn.Module``: its buffers become the graph's initializers). ``ExportGraph`` calls
the first layer's ``prepare_step`` once per step and every layer's ``attend``; ``export_graph`` allocates the
sample cache from ``cache_layout``, takes the largest ``opset``, attaches ``functions`` (inlined when
``inline_functions``); ``check_graph`` expects one ``domain.op_type`` node per layer; the manifest records
``name`` per layer and ``cache_layout().manifest()`` under ``kv_cache``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import onnx
import torch
from torch import nn

from edgeattn.models.attention import EdgeAttention

CacheDtype = Literal["float32", "float16", "int8", "uint8"]


@dataclass(frozen=True)
class ExtraBuffer:
    """A per-layer buffer a lowering keeps beside past_key/past_value (past and present of the same name, bound
    to one memory like them): [B, *shape_tail] of ``dtype``, named by its ``kind`` in the cache names."""

    kind: str
    shape_tail: tuple[int, ...]
    dtype: CacheDtype

    def manifest(self) -> dict:
        return {"kind": self.kind, "dtype": self.dtype, "shape_tail": list(self.shape_tail)}


@dataclass(frozen=True)
class CacheLayout:
    """How the runtime allocates one layer's past_key and past_value: each [B, kv_heads, capacity, row_width]
    of ``dtype``, bound to the same memory as the present of the same name."""

    kv_heads: int
    capacity: int  # rows: tokens of a full cache (whole blocks for hierarchical attention), slots of a ring
    row_width: int  # elements of ``dtype`` per row per kv head: the head dim, packed int4 codes, codes + scales
    dtype: CacheDtype
    ring: bool  # tokens wrap around a constant-memory ring instead of filling a max-length cache
    max_positions: int | None  # positions the graph can number; None: a ring renumbers them, no limit
    # Hierarchical attention (all three or none; its block bounds are an extra buffer):
    tokens: int | None = None  # the rows that hold tokens
    keys_read: int | None = None  # the most cached rows a decode step reads (hierarchical: whole blocks)
    summary_rows: int | None = None  # block summaries a decode step scores
    extra: tuple[ExtraBuffer, ...] = ()  # buffers after key and value, in this order (a residual window's,
    # hierarchical attention's block summaries)

    @property
    def shape_tail(self) -> tuple[int, int, int]:
        """The buffer's shape after the batch axis."""
        return (self.kv_heads, self.capacity, self.row_width)

    def manifest(self) -> dict:
        """The manifest's ``kv_cache`` entries this layout fills (docs/output-folder.md)."""
        entry = {"capacity": self.capacity, "dtype": self.dtype, "shape_tail": list(self.shape_tail),
                 "ring": self.ring, "max_positions": self.max_positions}
        if self.tokens is not None:
            entry.update(tokens=self.tokens, keys_read=self.keys_read, summary_rows=self.summary_rows)
        if self.extra:
            entry["extra_buffers"] = [buffer.manifest() for buffer in self.extra]
        return entry

    @property
    def kinds(self) -> tuple[str, ...]:
        """The layer's buffers by kind, in graph order: key, value, then the extra ones."""
        return ("key", "value", *(buffer.kind for buffer in self.extra))


@runtime_checkable
class AttentionLowering(Protocol):
    """One layer's attention as the exported graph computes it."""

    name: str
    """The ``--attention-op`` it belongs to ("ort", "onnx", "edgeattn"): the manifest's ``per_layer``."""
    domain: str
    """Domain of the layer's fused node: "" for a standard ONNX op."""
    op_type: str
    """The fused node's op type: the graph must hold one ``domain.op_type`` node per layer."""
    opset: int
    """Default-domain opset the layer's nodes need; the model takes the largest of its layers'."""
    inline_functions: bool
    """True: ``functions()`` are inlined after export, the saved graph holds standard ops only. False: they stay
    model-local functions, the bodies of custom-domain nodes, and must import the model's opset."""

    def cache_layout(self) -> CacheLayout:
        """The layer's past/present buffers."""
        ...

    def functions(self) -> list[onnx.FunctionProto]:
        """The FunctionProtos the layer's nodes call (empty when it emits only built-in ops)."""
        ...

    def prepare_step(self, length: int, attention_mask: torch.Tensor) -> Any:
        """Tensors every layer shares for a step of ``length`` new tokens (``attention_mask`` int64 [B, T]):
        positions, masks, RoPE tables, computed once in the graph from the first layer (every layer of a model
        has the same lowering class) and handed to each ``attend`` as ``step``; None for lowerings without."""
        ...

    def attend(self, attn: EdgeAttention, h: torch.Tensor, attention_mask: torch.Tensor,
               past_key: torch.Tensor, past_value: torch.Tensor, step: Any, *past_extra: torch.Tensor
               ) -> tuple[torch.Tensor, ...]:
        """The layer's attention of the new tokens ``h`` [B, L, hidden] (normed), ``attention_mask`` int64
        [B, T] (ones over every token so far) over the buffers ``past_key``/``past_value`` [B, *shape_tail]
        holding P tokens (and ``cache_layout().extra``'s buffers, in order), ``step`` being what
        ``prepare_step`` returned. Returns (output [B, L, hidden] after ``attn.o_proj``, present_key,
        present_value, *present_extra): the buffers with the new tokens written in, of the past's shapes and
        dtypes."""
        ...


class LoweringBase(nn.Module):
    """The attention shapes every lowering reads, and the optional members' defaults: a standard-domain node,
    no functions, no per-step tensors."""

    domain = ""
    inline_functions = False
    keeps_residual = False  # represents a codec's full-precision residual window

    def __init__(self, attn) -> None:
        super().__init__()
        if attn.codec.residual and not self.keeps_residual:
            raise ValueError(f"{type(self).__name__} has no residual window; the onnx full-cache lowering has")
        self.num_heads, self.kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim

    def functions(self) -> list[onnx.FunctionProto]:
        return []

    def prepare_step(self, length: int, attention_mask: torch.Tensor) -> None:
        return None
