"""Quantized KV cache: fp16, or int8/int4 codes with per-channel (static) or per-token (dynamic) scales.

Per-channel scales are calibrated on text: the stored keys/values of every layer are
recorded (in the stored form: rotated for full caches, unrotated for ring buffers, so
this rewrite runs after the others) and each (kv head, channel) gets the clipping
range that minimises its squared round-trip error, searched over fractions of its
absolute maximum, on the first ``KV_CALIBRATION_TOKENS`` tokens of the text (a calibrated
head merge reads many more; its whole text through a windowed model in one piece would
materialise a tokens x tokens score matrix per head). Per-token quantization needs no
calibration.
"""

from __future__ import annotations

import torch

from edgeattn.models.kv_codec import KVCodec
from edgeattn.rewrites._swap import LayerChange, for_each_attention
from edgeattn.spec import AttentionSpec

NAME = "kv_quant"
CLIP_FRACTIONS = torch.linspace(0.5, 1.0, 11)
KV_CALIBRATION_TOKENS = 2048


def applies(spec: AttentionSpec) -> bool:
    return spec.kv_cache != "fp32"


def quantize_kv_cache(model, spec: AttentionSpec, calibration: torch.Tensor | None = None) -> list[LayerChange]:
    static = spec.kv_cache in ("int8", "int4") and spec.kv_quant == "per-channel"
    recorded = _record_stored_kv(model, calibration) if static else None
    mode = spec.kv_quant if spec.kv_cache in ("int8", "int4") else "per-channel"

    def change(index, attn) -> str:
        codec = KVCodec(spec.kv_cache, mode, attn.num_kv_heads, attn.head_dim, spec.kv_residual)
        if recorded is not None:
            keys, values = recorded[index]
            codec.set_scales(_best_absmax(keys, codec.bits), _best_absmax(values, codec.bits))
        attn.codec = codec
        detail = f" {mode}" if codec.quantized else ""
        if codec.residual:
            detail += f", last {codec.residual} tokens at full precision ({codec.residual_bytes()} bytes)"
        return f"KV cache {spec.kv_cache}{detail}, {codec.bytes_per_token()} bytes/token"

    return for_each_attention(model, NAME, change)


class _Recorder(KVCodec):
    """An fp32 codec that remembers every key/value it stores."""

    def __init__(self, num_kv_heads: int, head_dim: int) -> None:
        super().__init__("fp32", num_kv_heads=num_kv_heads, head_dim=head_dim)
        self.seen: dict[str, list[torch.Tensor]] = {"key": [], "value": []}

    def roundtrip(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        self.seen[kind].append(x.detach().transpose(1, 2).reshape(-1, self.num_kv_heads, self.head_dim))
        return x


def _record_stored_kv(model, calibration: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: stored keys and values [tokens, Hkv, D] over the calibration text."""
    if calibration is None:
        raise ValueError("per-channel KV quantization needs calibration token ids")
    calibration = calibration[:, :KV_CALIBRATION_TOKENS]
    attentions = model.attentions()
    saved = [attn.codec for attn in attentions]
    recorders = [_Recorder(attn.num_kv_heads, attn.head_dim) for attn in attentions]
    try:
        for attn, recorder in zip(attentions, recorders):
            attn.codec = recorder
        # Learned position tables end (GPT-2: 1024): calibrate in chunks that fit in them.
        chunk = model.config.max_position_embeddings if model.pos_embed is not None else calibration.shape[1]
        with torch.no_grad():
            for start in range(0, calibration.shape[1], chunk):
                model(calibration[:, start:start + chunk])
    finally:
        for attn, codec in zip(attentions, saved):
            attn.codec = codec
    return [(torch.cat(r.seen["key"]), torch.cat(r.seen["value"])) for r in recorders]


def _best_absmax(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x [tokens, Hkv, D] -> clipping range [Hkv, D] with the least symmetric round-trip error."""
    qmax = 2 ** (bits - 1) - 1
    absmax = x.abs().amax(0).clamp_min(1e-8)
    best_error, best = None, absmax
    for fraction in CLIP_FRACTIONS:
        scale = absmax * fraction / qmax
        error = ((torch.clamp(torch.round(x / scale), -qmax - 1, qmax) * scale - x) ** 2).sum(0)
        if best_error is None:
            best_error, best = error, absmax * fraction
        else:
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best = torch.where(better, absmax * fraction, best)
    return best
