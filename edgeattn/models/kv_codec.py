"""How the KV cache stores keys and values: fp32, fp16, or int8/int4 codes with scales.

The PyTorch model keeps cache entries already round-tripped through the codec
(``roundtrip``), which is numerically identical to storing the codes and
dequantizing on read; the exported graph stores the codes themselves.

* per-channel (static, symmetric): one scale per (kv head, channel), calibrated on
  text; the contract of onnxruntime's GroupQueryAttention quantized cache
  (scale shape [1, kv_heads, 1, head_dim], int4 packed two per byte, low nibble first).
* per-token (dynamic, asymmetric, KIVI-style): every new token is quantized on arrival.
  Keys get a scale and minimum per group of ``KEY_GROUP`` channels (keys have outlier
  channels, so a per-token scale alone would waste their range); values get one scale
  and minimum per token and head. Scales and minimums are stored in fp16; the scale is
  measured from the fp16-rounded minimum (what decoding adds back). A head_dim that is
  not a multiple of ``KEY_GROUP`` uses one key group over the whole head.
  With a ``residual`` of R tokens (KIVI), a query reads the keys and values of its own R most
  recent tokens at full precision and older ones through the codec: the cache keeps the codes of
  every token plus the last R tokens in float32 (a constant ``residual_bytes``). Per-token codes
  do not depend on when they are made, so the model stores full-precision rows and round-trips
  the older ones as it reads them.
"""

from __future__ import annotations

import torch
from torch import nn

KEY_GROUP = 32
_FP16_TINY = 2.0**-14


def _symmetric_max(bits: int) -> int:
    return 2 ** (bits - 1) - 1


class KVCodec(nn.Module):
    """Storage format of one layer's KV cache."""

    def __init__(self, dtype: str = "fp32", mode: str = "per-channel", num_kv_heads: int = 1, head_dim: int = 1,
                 residual: int = 0):
        super().__init__()
        self.dtype = dtype
        self.mode = mode
        self.residual = residual
        if residual and not (self.quantized and mode == "per-token"):
            raise ValueError("a full-precision residual window needs a per-token int8/int4 codec")
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        if self.quantized and mode == "per-channel":
            # Filled by calibration (edgeattn.rewrites.kv_quant); ones until then.
            self.register_buffer("k_scale", torch.ones(num_kv_heads, head_dim))
            self.register_buffer("v_scale", torch.ones(num_kv_heads, head_dim))

    @property
    def bits(self) -> int:
        return {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}[self.dtype]

    @property
    def quantized(self) -> bool:
        return self.dtype in ("int8", "int4")

    def key_group(self) -> int:
        return KEY_GROUP if self.head_dim % KEY_GROUP == 0 else self.head_dim

    def bytes_per_token(self) -> int:
        """Exact bytes one cached token costs in this layer (keys + values, all kv heads)."""
        codes = 2 * self.num_kv_heads * self.head_dim * self.bits // 8
        if self.quantized and self.mode == "per-token":
            key_groups = self.head_dim // self.key_group()
            fp16_pair = 2 * 2  # scale + minimum
            codes += self.num_kv_heads * (key_groups + 1) * fp16_pair
        return codes

    def residual_bytes(self) -> int:
        """Bytes of the full-precision recent window of one sequence in this layer (constant: float32 rows)."""
        return 2 * self.residual * self.num_kv_heads * self.head_dim * 4

    def set_scales(self, k_absmax: torch.Tensor, v_absmax: torch.Tensor) -> None:
        """Static per-channel scales from calibrated absolute maxima [kv_heads, head_dim]."""
        qmax = _symmetric_max(self.bits)
        self.k_scale.copy_(k_absmax.clamp_min(1e-8) / qmax)
        self.v_scale.copy_(v_absmax.clamp_min(1e-8) / qmax)

    def roundtrip(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """x [B, Hkv, T, D] as it reads back from the cache; kind is 'key' or 'value'."""
        if self.dtype == "fp32":
            return x
        if self.dtype == "fp16":
            return x.half().to(x.dtype)
        if self.mode == "per-channel":
            scale = (self.k_scale if kind == "key" else self.v_scale)[None, :, None, :]
            qmax = _symmetric_max(self.bits)
            return torch.clamp(torch.round(x / scale), -qmax - 1, qmax) * scale
        group = self.key_group() if kind == "key" else self.head_dim
        return _asymmetric_groups(x, group, self.bits)

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, mode={self.mode}" + (f", residual={self.residual}" if self.residual else "")


def _asymmetric_groups(x: torch.Tensor, group: int, bits: int) -> torch.Tensor:
    """Quantize each run of ``group`` channels of each token with its own fp16 scale/min."""
    shape = x.shape
    g = x.reshape(*shape[:-1], shape[-1] // group, group)
    low = g.amin(dim=-1, keepdim=True).half().to(x.dtype)
    high = g.amax(dim=-1, keepdim=True)
    levels = 2**bits - 1
    scale = ((high - low) / levels).clamp_min(_FP16_TINY).half().to(x.dtype)
    codes = torch.clamp(torch.round((g - low) / scale), 0, levels)
    return (codes * scale + low).reshape(shape)
