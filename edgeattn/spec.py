"""AttentionSpec: the target attention form of a model, validated once.

One field is one CLI flag (``--kv-heads`` ...) and one JSON key of the manifest.
``None`` means "leave as in the source model". The spec alone decides what the
rewrites do; the order in which they are applied lives in ``edgeattn.rewrites``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from edgeattn.choices import (
    BLOCK_SELECTS,
    GQA_METHODS,
    KV_CACHE_PRECISIONS,
    KV_QUANT_MODES,
    BlockSelect,
    GqaMethod,
    KVCachePrecision,
    KVQuantMode,
)
from edgeattn.errors import EdgeattnError


class SpecError(EdgeattnError, ValueError):
    """An impossible or inconsistent AttentionSpec; the message names the fields."""


@dataclass(frozen=True)
class AttentionSpec:
    """The attention form to rewrite a model into.

    kv_heads: merge the key/value heads into this many groups (GQA; 1 is MQA).
    gqa_method: ``calibrated`` (activation-aware, RoPE-consistent fit) or ``mean``.
    uptrain_steps: optional distillation steps after a calibrated merge.
    uptrain_minutes: instead of ``uptrain_steps``, a distillation budget in minutes on this machine: the
        rewrite times one step and runs as many as fit (``rewrite``'s report records the steps run).
    uptrain_window: tokens per distillation sequence (None: edgeattn's default; the report records it).
    window / sinks: each query sees the first ``sinks`` tokens and the last
        ``window`` tokens (itself included); the cache is a ring of ``sinks + window``
        slots. With ``block_size`` set, ``window`` is instead the always-attended local
        window of hierarchical attention (default: ``block_size``) and the cache is full.
    block_size / top_blocks / block_mass: hierarchical block-sparse attention.
    block_select: ``query-head`` (each query head ranks the blocks itself) or ``kv-head`` (the query
        heads of a kv head share one choice, ranked by the largest of their bounds: fewer rows to read).
    kv_cache / kv_quant: storage of the KV cache (int8/int4 with scales per channel,
        static and calibrated, or per token, dynamic).
    kv_residual: with a per-token int8/int4 cache, each query reads its last ``kv_residual`` tokens at full
        precision (KIVI's residual window; a constant float32 buffer of that many tokens per layer).
    """

    kv_heads: int | None = None
    gqa_method: GqaMethod = "calibrated"
    uptrain_steps: int = 0
    uptrain_minutes: float | None = None
    uptrain_window: int | None = None
    window: int | None = None
    sinks: int = 0
    block_size: int | None = None
    top_blocks: int | None = None
    block_mass: float | None = None
    block_select: BlockSelect = "query-head"
    kv_cache: KVCachePrecision = "fp32"
    kv_quant: KVQuantMode = "per-channel"
    kv_residual: int = 0

    def __post_init__(self) -> None:
        _positive("kv_heads", self.kv_heads)
        _positive("window", self.window)
        _positive("block_size", self.block_size)
        _positive("top_blocks", self.top_blocks)
        _positive("uptrain_window", self.uptrain_window)
        _choice("gqa_method", self.gqa_method, GQA_METHODS)
        _choice("block_select", self.block_select, BLOCK_SELECTS)
        _choice("kv_cache", self.kv_cache, KV_CACHE_PRECISIONS)
        _choice("kv_quant", self.kv_quant, KV_QUANT_MODES)
        _not_negative("sinks", self.sinks)
        _not_negative("uptrain_steps", self.uptrain_steps)
        _not_negative("kv_residual", self.kv_residual)
        if self.kv_residual and not (self.kv_cache in ("int8", "int4") and self.kv_quant == "per-token"):
            raise SpecError("kv_residual needs kv_cache int8 or int4 with kv_quant per-token (it keeps the recent "
                            "tokens of a per-token quantized cache at full precision)")
        if self.kv_residual and (self.window is not None or self.block_size is not None):
            raise SpecError("kv_residual works with a full KV cache only, not with window or block_size")
        if self.block_mass is not None and not _number(self.block_mass):
            raise SpecError(f"block_mass must be a number in (0, 1], got {self.block_mass!r}")
        if self.uptrain_minutes is not None and not (
                _number(self.uptrain_minutes) and 0 < self.uptrain_minutes < float("inf")):
            raise SpecError(f"uptrain_minutes must be a finite number of minutes > 0, got {self.uptrain_minutes!r}")
        if self.uptrain_steps and self.uptrain_minutes is not None:
            raise SpecError("give uptrain_steps or uptrain_minutes, not both")
        if self.uptrain_window is not None and not (self.uptrain_steps or self.uptrain_minutes):
            raise SpecError("uptrain_window needs uptrain_steps or uptrain_minutes")
        for name in ("uptrain_steps", "uptrain_minutes"):
            if getattr(self, name) and self.gqa_method != "calibrated":
                raise SpecError(f"{name} needs gqa_method='calibrated'")
            if getattr(self, name) and self.kv_heads is None:
                raise SpecError(f"{name} needs kv_heads (it distils a merged-head model)")
        if self.sinks and self.window is None and self.block_size is None:
            raise SpecError("sinks needs window (or block_size): sinks only matter when old tokens are dropped")
        if (self.top_blocks is not None or self.block_mass is not None) and self.block_size is None:
            raise SpecError("top_blocks/block_mass need block_size")
        if self.block_select != "query-head" and self.block_size is None:
            raise SpecError("block_select needs block_size (it says how hierarchical attention selects blocks)")
        if self.block_size is not None and self.top_blocks is None:
            raise SpecError("block_size needs top_blocks (the most blocks each query may select)")
        if self.block_mass is not None and not 0.0 < self.block_mass <= 1.0:
            raise SpecError(f"block_mass must be in (0, 1], got {self.block_mass}")
        if self.block_size is not None and self.window is not None and self.window < self.block_size:
            raise SpecError(
                f"window ({self.window}) must be >= block_size ({self.block_size}) with hierarchical "
                "attention: the local window must cover the current, still incomplete block"
            )

    @property
    def hierarchical(self) -> bool:
        return self.block_size is not None

    @property
    def ring_buffer(self) -> bool:
        """True when the KV cache is a constant-size ring of ``sinks + window`` slots."""
        return self.window is not None and not self.hierarchical

    @property
    def local_window(self) -> int | None:
        """Always-attended recent tokens of hierarchical attention."""
        if not self.hierarchical:
            return None
        return self.window if self.window is not None else self.block_size

    @property
    def kv_bits(self) -> int:
        return {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}[self.kv_cache]

    @property
    def is_identity(self) -> bool:
        return self == AttentionSpec()

    def to_dict(self) -> dict[str, Any]:
        """The fields as a manifest's ``spec`` records them; fields added later only when not their default, so
        that folders which do not use them stay readable by an edgeattn from before they existed."""
        fields = dataclasses.asdict(self)
        for name, default in _LATER_FIELDS.items():
            if fields[name] == default:
                del fields[name]
        return fields

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttentionSpec:
        if not isinstance(data, dict):
            raise SpecError(f"an attention spec is a table of fields, got {data!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(data) - known))
        if unknown:
            raise SpecError(f"unknown attention spec keys: {', '.join(unknown)}")
        return cls(**data)


_LATER_FIELDS = {"block_select": "query-head", "uptrain_minutes": None, "uptrain_window": None, "kv_residual": 0}


def _number(value) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _whole(value) -> bool:
    """An int that is not a bool (True is an int to Python, never a count to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(name: str, value: int | None) -> None:
    if value is not None and (not _whole(value) or value < 1):
        raise SpecError(f"{name} must be a positive integer, got {value!r}")


def _not_negative(name: str, value: int) -> None:
    if not _whole(value) or value < 0:
        raise SpecError(f"{name} must be an integer >= 0, got {value!r}")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise SpecError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
