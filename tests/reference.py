"""The naive attention oracle: what EdgeAttention should compute, written the slow, plain way.

Dimension legend: H query heads, Hkv kv heads, T tokens (positions 0..T-1), D head dim.

This file deliberately imports nothing from edgeattn: masks are built key by key,
RoPE is an explicit rotation of the channel pairs (d, d + D/2), the KV heads are
repeated by index (query head h reads kv head h // (H / Hkv)), and the KV-cache
codecs are re-derived from their docstrings. Tests compare EdgeAttention (with and
without a cache) against it, so a wrong modulus, sink boundary, rotary position or
quantization range shows up as a numeric difference instead of being compared with
itself.

Storage forms (what the cache holds, so what the codec sees):

* full causal and hierarchical: keys rotated at their absolute positions, then
  fake-quantized;
* sliding window + sinks (a ring buffer): keys fake-quantized *unrotated*; a score
  uses the relative distance the StreamingLLM scheme assigns (see ``_ring_distance``).

Keys that the codec stores are rotated in float32 (the cache's dtype) so that the
codec sees the same numbers the model stores; scores, softmax and the weighted sum
are then computed in float64.
"""

from __future__ import annotations

import math

import torch

_FP16_TINY = 2.0**-14  # smallest normal fp16: floor of a per-token scale
_KEY_GROUP = 32  # per-token keys: channels per (scale, minimum) group


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    inv_freq: torch.Tensor | None = None,
    window: int | None = None,
    sinks: int = 0,
    block_size: int | None = None,
    top_blocks: int | None = None,
    local_window: int | None = None,
    block_mass: float | None = None,
    block_select: str = "query-head",
    kv_dtype: str = "fp32",
    kv_mode: str = "per-channel",
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    kv_residual: int = 0,
) -> torch.Tensor:
    """q [H, T, D], k, v [Hkv, T, D] (projected, not rotated; positions 0..T-1) -> out [H, T, D].

    Policy: ``block_size`` set -> hierarchical (``top_blocks`` required, ``local_window``
    defaults to ``block_size``, ``sinks`` always seen); else ``window`` set -> sliding
    window with ``sinks``; else full causal. ``block_select`` ``kv-head``: a block's bound for a
    query is the largest over the query heads of its kv head at that position, so the group keeps
    the same blocks. ``inv_freq`` [D/2]: apply RoPE (None: no positional rotation). ``kv_dtype``
    fp32/fp16/int8/int4, ``kv_mode`` per-channel (needs ``k_scale``/``v_scale`` [Hkv, D]) or per-token.
    ``kv_residual`` (full causal only): query i reads keys/values j with i - j < kv_residual unquantized.
    """
    heads, length, dim = q.shape
    kv_heads = k.shape[0]
    assert heads % kv_heads == 0, "query heads must be a multiple of kv heads"
    assert k.shape == v.shape == (kv_heads, length, dim)
    group = heads // kv_heads
    ring = window is not None and block_size is None
    hierarchical = block_size is not None
    if hierarchical:
        assert top_blocks is not None, "hierarchical attention needs top_blocks"
        local_window = block_size if local_window is None else local_window

    # What the cache stores: [Hkv, T, D], float32.
    q32, k32, v32 = q.detach().float(), k.detach().float(), v.detach().float()
    if inv_freq is not None and not ring:
        stored_k = torch.stack([
            torch.stack([_rotate(k32[g, j], float(j), inv_freq) for j in range(length)])
            for g in range(kv_heads)
        ])
    else:
        stored_k = k32
    assert not kv_residual or not (ring or hierarchical), "a residual window is modelled for full caches only"
    exact_keys, exact_values = stored_k.double(), v32.double()
    stored_k = _fake_quantize(stored_k, "key", kv_dtype, kv_mode, k_scale)
    stored_v = _fake_quantize(v32, "value", kv_dtype, kv_mode, v_scale)
    keys = stored_k.double()
    values = stored_v.double()

    out = torch.zeros(heads, length, dim, dtype=torch.float64)
    scale = dim**-0.5
    for h in range(heads):
        g = h // group  # the kv head this query head reads
        for i in range(length):
            if ring:
                visible = [j for j in range(i + 1) if j < sinks or i - j < window]
                scores = []
                for j in visible:
                    query = q32[h, i].double()
                    if inv_freq is not None:
                        # R(a) q . R(b) k == R(a - b) q . k: rotate the query by the distance.
                        query = _rotate(query, float(_ring_distance(i, j, window, sinks)), inv_freq)
                    scores.append(float(query @ keys[g, j]))
            else:
                query = q32[h, i]
                if inv_freq is not None:
                    query = _rotate(query, float(i), inv_freq)
                query = query.double()
                if hierarchical:
                    ranking = [h] if block_select == "query-head" else range(g * group, (g + 1) * group)
                    queries = [_rotate(q32[r, i], float(i), inv_freq) if inv_freq is not None else q32[r, i]
                               for r in ranking]
                    kept = _kept_blocks([r.double() for r in queries], keys[g, : i + 1], i, block_size, top_blocks,
                                        block_mass)
                    visible = [j for j in range(i + 1)
                               if j // block_size in kept or j < sinks or i - j < local_window]
                else:
                    visible = list(range(i + 1))
                scores = [float(query @ (exact_keys if i - j < kv_residual else keys)[g, j]) for j in visible]
            weights = torch.softmax(torch.tensor(scores, dtype=torch.float64) * scale, dim=0)
            for weight, j in zip(weights, visible):
                out[h, i] += weight * (exact_values if i - j < kv_residual else values)[g, j]
    return out.to(q.dtype)


def _ring_distance(i: int, j: int, window: int, sinks: int) -> int:
    """RoPE distance between query i and visible key j under the StreamingLLM scheme.

    A key inside the window keeps its true distance i - j. A sink seen only as a sink
    is seen from the query position clamped to sinks + window - 1 (as if the sinks sat
    right before the window). A sink that is also inside the window gets the same
    distance either way: i - j < window with j < sinks means i <= sinks + window - 1.
    """
    as_sink = min(i, sinks + window - 1) - j
    if i - j < window:
        if j < sinks:
            assert as_sink == i - j, "a sink inside the window must keep its true distance"
        return i - j
    assert j < sinks, "only sinks are visible outside the window"
    return as_sink


def _rotate(x: torch.Tensor, position: float, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE on one vector x [D]: rotate each pair (x[d], x[d + D/2]) by position * inv_freq[d]."""
    half = x.shape[-1] // 2
    assert inv_freq.numel() == half, "inv_freq must have head_dim / 2 entries"
    angle = torch.tensor(position, dtype=x.dtype) * inv_freq.to(x.dtype)  # [D/2]
    cos, sin = angle.cos(), angle.sin()
    first, second = x[:half], x[half:]
    return torch.cat((first * cos - second * sin, second * cos + first * sin))


def _kept_blocks(queries, keys_upto_i, i, block_size, top_blocks, block_mass) -> set[int]:
    """Blocks query i keeps: best upper bounds among blocks whose positions are all <= i.

    queries: the rotated queries [D] (float64) that rank together (one, or a kv head's group), a block's
    bound being the largest of theirs; keys_upto_i [i + 1, D] stored (rotated, quantized) keys.
    """
    dim = queries[0].shape[0]
    candidates = [b for b in range(i // block_size + 1) if (b + 1) * block_size - 1 <= i]
    bounds = {}
    for b in candidates:
        block = keys_upto_i[b * block_size:(b + 1) * block_size]  # [block_size, D]
        low, high = block.min(dim=0).values.tolist(), block.max(dim=0).values.tolist()
        bounds[b] = max(sum(max(q[d] * low[d], q[d] * high[d]) for d in range(dim))
                        for q in (query.tolist() for query in queries))
    ranked = sorted(candidates, key=lambda b: bounds[b], reverse=True)
    count = min(top_blocks, len(ranked))
    if block_mass is not None and ranked:
        logits = [bounds[b] / math.sqrt(dim) for b in ranked]
        top = max(logits)
        weights = [math.exp(logit - top) for logit in logits]
        total = sum(weights)
        needed, mass = len(ranked), 0.0
        for n, w in enumerate(weights, start=1):
            mass += w / total
            if mass >= block_mass:
                needed = n
                break
        count = min(count, needed)
    return set(ranked[:count])


def _fake_quantize(x: torch.Tensor, kind: str, kv_dtype: str, kv_mode: str,
                   scale: torch.Tensor | None) -> torch.Tensor:
    """x [Hkv, T, D] float32 -> what reads back from a cache storing it as kv_dtype."""
    if kv_dtype == "fp32":
        return x.clone()
    if kv_dtype == "fp16":
        return x.to(torch.float16).to(torch.float32)
    bits = {"int8": 8, "int4": 4}[kv_dtype]
    if kv_mode == "per-channel":
        assert scale is not None, "per-channel quantization needs a scale [Hkv, D]"
        return _per_channel(x, scale.float(), bits)
    if kv_mode == "per-token":
        dim = x.shape[-1]
        group = (_KEY_GROUP if dim % _KEY_GROUP == 0 else dim) if kind == "key" else dim
        return _per_token(x, group, bits)
    raise ValueError(f"unknown kv_mode {kv_mode!r}")


def _per_channel(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric: code = clamp(round(x / scale), -2^(b-1), 2^(b-1) - 1), one scale per (head, channel)."""
    lowest, highest = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    out = torch.empty_like(x)
    for g in range(x.shape[0]):
        for t in range(x.shape[1]):
            codes = torch.clamp(torch.round(x[g, t] / scale[g]), lowest, highest)
            out[g, t] = codes * scale[g]
    return out


def _per_token(x: torch.Tensor, group: int, bits: int) -> torch.Tensor:
    """Asymmetric, per token, per head, per run of ``group`` channels; min and scale kept in fp16.

    The scale is measured from the stored (fp16) minimum, since that is the offset the
    codes are decoded against: the group's maximum then lands on the top code.
    """
    levels = 2**bits - 1
    out = torch.empty_like(x)
    for g in range(x.shape[0]):
        for t in range(x.shape[1]):
            for start in range(0, x.shape[2], group):
                run = x[g, t, start:start + group]
                low = run.min().to(torch.float16).to(torch.float32)
                step = ((run.max() - low) / levels).clamp_min(_FP16_TINY).to(torch.float16).to(torch.float32)
                codes = torch.clamp(torch.round((run - low) / step), 0, levels)
                out[g, t, start:start + group] = codes * step + low
    return out
