"""EdgeAttention against the independent oracle (tests.reference), policy x codec x kv heads.

Every case is checked twice: one pass without a cache, and incremental decode through
the cache (a prefill chunk, single tokens, a final chunk longer than the windows), so
the ring-buffer slots, the in-cache rotary positions and the stored (quantized) keys
are all exercised. The oracle never calls the code under test; q, k, v come from plain
matmuls with the module's weights.
"""

from __future__ import annotations

import pytest
import torch

from edgeattn.models.attention import EdgeAttention
from edgeattn.models.kv_codec import KVCodec
from edgeattn.models.kvcache import KVCacheFullError
from edgeattn.models.rotary import RotaryEmbedding, default_inv_freq
from edgeattn.models.visibility import FullVisibility, HierarchicalVisibility, SinkWindowVisibility
from tests.reference import reference_attention

# float32 module vs an oracle that accumulates in float64: only summation order differs
# (observed max-abs ~2e-7 on outputs of magnitude ~1). The smallest effect under test, the
# fp16 round trip of the cache, moves outputs by ~2e-4; a wrong mask or position by > 0.1.
MATCH = 1e-5
# Same masks and same stored keys on both sides. A whole sequence under full visibility runs PyTorch's fused
# attention kernel, every other policy the written-out softmax: float32 summation order only (observed 1.5e-7).
SAME_KEYS = 1e-6
# Dropping keys (eviction, block selection) must change outputs by at least this much,
# or the comparison above would not be testing the policy at all.
DIFFERENT = 1e-3

HIDDEN, HEADS, HEAD_DIM, SEQ = 64, 4, 16, 37
# Prefill 5, 22 single-token steps, then a 10-token chunk (longer than every ring window below).
CHUNKS = (5,) + (1,) * 22 + (10,)
assert sum(CHUNKS) == SEQ
INV_FREQ = default_inv_freq(HEAD_DIM, 10000.0)

# name -> (visibility factory, the same policy in reference_attention's keywords)
POLICIES = {
    "full": (FullVisibility, {}),
    "window3-sinks2": (lambda: SinkWindowVisibility(3, 2), dict(window=3, sinks=2)),
    "window6": (lambda: SinkWindowVisibility(6), dict(window=6)),
    "window1-sinks1": (lambda: SinkWindowVisibility(1, 1), dict(window=1, sinks=1)),
    "window2-sinks5": (lambda: SinkWindowVisibility(2, 5), dict(window=2, sinks=5)),
    "hier-b4-top2-sinks1": (lambda: HierarchicalVisibility(4, 2, 4, sinks=1),
                            dict(block_size=4, top_blocks=2, local_window=4, sinks=1)),
    "hier-b2-top3-local3": (lambda: HierarchicalVisibility(2, 3, 3),
                            dict(block_size=2, top_blocks=3, local_window=3)),
    "hier-b4-mass": (lambda: HierarchicalVisibility(4, 4, 6, sinks=2, block_mass=0.6),
                     dict(block_size=4, top_blocks=4, local_window=6, sinks=2, block_mass=0.6)),
    "hier-b4-top2-kvhead": (lambda: HierarchicalVisibility(4, 2, 4, sinks=1, select="kv-head"),
                            dict(block_size=4, top_blocks=2, local_window=4, sinks=1, block_select="kv-head")),
    "hier-b4-mass-kvhead": (lambda: HierarchicalVisibility(4, 4, 6, block_mass=0.6, select="kv-head"),
                            dict(block_size=4, top_blocks=4, local_window=6, block_mass=0.6, block_select="kv-head")),
}
CODECS = [("fp32", "per-channel"), ("fp16", "per-channel"), ("int8", "per-channel"),
          ("int4", "per-channel"), ("int8", "per-token"), ("int4", "per-token")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: a second intra-op thread only adds contention (50x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _make(kv_heads: int, rotary: bool, head_dim: int = HEAD_DIM, heads: int = HEADS, seed: int = 0,
          bias: bool = False, batch: int = 1):
    torch.manual_seed(seed)
    rope = RotaryEmbedding(default_inv_freq(head_dim, 10000.0)) if rotary else None
    attn = EdgeAttention(HIDDEN, heads, kv_heads, head_dim, qkv_bias=bias, o_bias=bias, rotary=rope)
    if bias:  # nn.Linear biases are small; make them matter
        with torch.no_grad():
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                proj.bias.normal_()
    x = torch.randn(batch, SEQ, HIDDEN)
    return attn, x


def _set_codec(attn: EdgeAttention, dtype: str, mode: str) -> dict:
    """Install a codec; returns its settings as reference_attention keywords."""
    codec = KVCodec(dtype, mode, attn.num_kv_heads, attn.head_dim)
    settings = dict(kv_dtype=dtype, kv_mode=mode)
    if codec.quantized and mode == "per-channel":
        # Absolute maxima of unrelated random data, scaled so that some stored values clip.
        k_absmax = torch.randn(64, attn.num_kv_heads, attn.head_dim).abs().amax(0) * 0.5
        v_absmax = torch.randn(64, attn.num_kv_heads, attn.head_dim).abs().amax(0) * 0.5
        codec.set_scales(k_absmax, v_absmax)
        qmax = {"int8": 127, "int4": 7}[dtype]
        settings.update(k_scale=k_absmax / qmax, v_scale=v_absmax / qmax)
        torch.testing.assert_close(codec.k_scale, settings["k_scale"], rtol=1e-6, atol=0)
        torch.testing.assert_close(codec.v_scale, settings["v_scale"], rtol=1e-6, atol=0)
    attn.codec = codec
    return settings


def _linear(x: torch.Tensor, proj: torch.nn.Linear) -> torch.Tensor:
    return x @ proj.weight.T + (proj.bias if proj.bias is not None else 0.0)


def _oracle(attn: EdgeAttention, x: torch.Tensor, **settings) -> torch.Tensor:
    """x [B, T, hidden] -> [B, T, hidden] through plain projections and reference_attention, row by row."""
    length = x.shape[1]
    h, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim

    def heads(row, proj, count):  # [T, hidden] -> [count, T, D]
        return _linear(row, proj).view(length, count, d).transpose(0, 1)

    outputs = []
    with torch.no_grad():
        for row in x:
            q, k, v = heads(row, attn.q_proj, h), heads(row, attn.k_proj, hkv), heads(row, attn.v_proj, hkv)
            inv_freq = attn.rotary.inv_freq if attn.rotary is not None else None
            out = reference_attention(q, k, v, inv_freq=inv_freq, **settings)  # [H, T, D]
            outputs.append(_linear(out.transpose(0, 1).reshape(length, h * d), attn.o_proj))
    return torch.stack(outputs)


def _decode(attn: EdgeAttention, x: torch.Tensor, chunks=CHUNKS, max_length: int = SEQ):
    cache = attn.new_cache(x.shape[0], max_length)
    outputs, start = [], 0
    with torch.no_grad():
        for n in chunks:
            outputs.append(attn(x[:, start:start + n], start, cache))
            start += n
    return torch.cat(outputs, 1), cache


def _check(attn, x, settings) -> torch.Tensor:
    expected = _oracle(attn, x, **settings)
    with torch.no_grad():
        whole = attn(x, 0, None)
    torch.testing.assert_close(whole, expected, rtol=0, atol=MATCH, msg=lambda m: f"no cache: {m}")
    stepped, _ = _decode(attn, x)
    torch.testing.assert_close(stepped, expected, rtol=0, atol=MATCH, msg=lambda m: f"decode: {m}")
    return expected


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.parametrize("policy", POLICIES)
def test_policy_and_codec_match_reference(policy, codec):
    attn, x = _make(kv_heads=2, rotary=True)
    make_visibility, policy_kwargs = POLICIES[policy]
    attn.visibility = make_visibility()
    _check(attn, x, {**policy_kwargs, **_set_codec(attn, *codec)})


# (kv heads, rotary, biases, batch, codec): MQA, MHA, no-RoPE, biased (Qwen2-style) and
# batched variants, each with a different codec.
VARIANTS = [
    (1, True, False, 1, ("fp32", "per-channel")),
    (4, True, False, 1, ("int4", "per-channel")),
    (1, False, False, 1, ("int8", "per-token")),
    (4, False, False, 1, ("fp32", "per-channel")),
    (2, False, False, 1, ("int4", "per-channel")),
    (2, True, True, 1, ("int8", "per-channel")),
    (1, True, False, 2, ("int4", "per-token")),
]


@pytest.mark.parametrize(
    "kv_heads, rotary, bias, batch, codec", VARIANTS,
    ids=[f"kv{k}-{'rope' if r else 'norope'}{'-bias' if b else ''}-batch{n}-{c[0]}-{c[1]}"
         for k, r, b, n, c in VARIANTS])
@pytest.mark.parametrize("policy", POLICIES)
def test_variants_match_reference(policy, kv_heads, rotary, bias, batch, codec):
    attn, x = _make(kv_heads=kv_heads, rotary=rotary, seed=1, bias=bias, batch=batch)
    make_visibility, policy_kwargs = POLICIES[policy]
    attn.visibility = make_visibility()
    _check(attn, x, {**policy_kwargs, **_set_codec(attn, *codec)})


@pytest.mark.parametrize("codec", [("int4", "per-token"), ("int8", "per-token"), ("int8", "per-channel")],
                         ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.parametrize("policy", ["full", "window3-sinks2", "hier-b4-top2-sinks1"])
def test_head_dim_64_key_groups_match_reference(policy, codec):
    """head_dim 64: per-token keys get two groups of 32 channels (head_dim 16 has only one)."""
    attn, x = _make(kv_heads=1, rotary=True, head_dim=64, heads=2, seed=2)
    make_visibility, policy_kwargs = POLICIES[policy]
    attn.visibility = make_visibility()
    _check(attn, x, {**policy_kwargs, **_set_codec(attn, *codec)})


# --- exact equivalences -------------------------------------------------------------------


def _both_paths(attn, x, max_length=SEQ):
    with torch.no_grad():
        whole = attn(x, 0, None)
    stepped, _ = _decode(attn, x, max_length=max_length)
    return whole, stepped


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_window_covering_the_sequence_equals_full(kv_heads):
    attn, x = _make(kv_heads, rotary=True)
    full = _both_paths(attn, x)
    attn.visibility = SinkWindowVisibility(SEQ, sinks=2)
    ring = _both_paths(attn, x)
    for a, b in zip(ring, full):
        torch.testing.assert_close(a, b, rtol=0, atol=SAME_KEYS)


@pytest.mark.parametrize("window, sinks", [(30, 7), (36, 1), (SEQ - 4, 4)])
def test_nothing_evicted_equals_full(window, sinks):
    """SEQ <= sinks + window: every query sees everything, sinks at their true distance."""
    assert SEQ <= sinks + window
    attn, x = _make(2, rotary=True)
    full = _both_paths(attn, x)
    attn.visibility = SinkWindowVisibility(window, sinks)
    ring = _both_paths(attn, x)
    for a, b in zip(ring, full):
        torch.testing.assert_close(a, b, rtol=0, atol=MATCH)


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.parametrize("block_size, mass", [(2, None), (4, None), (4, 1.0)])
def test_hierarchical_keeping_every_block_equals_full(block_size, mass, codec):
    attn, x = _make(2, rotary=True)
    _set_codec(attn, *codec)
    full = _both_paths(attn, x)
    every_block = SEQ // block_size + 1
    attn.visibility = HierarchicalVisibility(block_size, every_block, block_size, block_mass=mass)
    hierarchical = _both_paths(attn, x)
    for a, b in zip(hierarchical, full):
        torch.testing.assert_close(a, b, rtol=0, atol=SAME_KEYS)


@pytest.mark.parametrize("policy", ["window3-sinks2", "window6", "hier-b4-top2-sinks1", "hier-b4-mass"])
def test_dropping_keys_changes_the_output(policy):
    """Guard against a vacuous comparison: these policies really drop keys at SEQ."""
    attn, x = _make(2, rotary=True)
    full = _oracle(attn, x)
    make_visibility, policy_kwargs = POLICIES[policy]
    sparse = _oracle(attn, x, **policy_kwargs)
    assert (sparse - full).abs().max() > DIFFERENT


def _rotate_by(x: torch.Tensor, distance: int) -> torch.Tensor:
    """RoPE as complex multiplication: pair (x[d], x[d + D/2]) times exp(i * distance * inv_freq[d])."""
    half = x.shape[-1] // 2
    z = torch.complex(x[:half].double(), x[half:].double())
    z = z * torch.polar(torch.ones(half, dtype=torch.float64), distance * INV_FREQ.double())
    return torch.cat((z.real, z.imag)).float()


def test_sink_distance_is_clamped_query_position():
    """Query 9 (window 3, sinks 2) sees sink j at distance min(9, 4) - j and window key j at 9 - j.

    Written out key by key; keeping the original positions (sink 0 at distance 9) must differ.
    """
    attn, x = _make(1, rotary=True, heads=1)
    attn.visibility = SinkWindowVisibility(3, 2)
    with torch.no_grad():
        got = attn(x[:, :10], 0, None)[0, 9]
        q = _linear(x[0, 9], attn.q_proj)  # [D]
        k, v = _linear(x[0, :10], attn.k_proj), _linear(x[0, :10], attn.v_proj)  # [10, D]

        def attend(distance_of_key: dict[int, int]) -> torch.Tensor:
            keys = list(distance_of_key)
            scores = torch.stack([_rotate_by(q, distance_of_key[j]) @ k[j] for j in keys]) * HEAD_DIM**-0.5
            return _linear(torch.softmax(scores, 0) @ v[keys], attn.o_proj)

        streaming = attend({0: 4 - 0, 1: 4 - 1, 7: 2, 8: 1, 9: 0})
        original = attend({0: 9, 1: 8, 7: 2, 8: 1, 9: 0})
    torch.testing.assert_close(got, streaming, rtol=0, atol=MATCH)
    assert (got - original).abs().max() > DIFFERENT


# --- cache capacity ------------------------------------------------------------------------


@pytest.mark.parametrize("visibility", [FullVisibility, lambda: HierarchicalVisibility(2, 2, 2)],
                         ids=["full", "hierarchical"])
def test_full_cache_raises_when_exceeded(visibility):
    attn, x = _make(2, rotary=True)
    attn.visibility = visibility()
    cache = attn.new_cache(1, 8)
    assert cache.capacity == 8
    with torch.no_grad():
        attn(x[:, :5], 0, cache)
        attn(x[:, 5:8], 5, cache)  # exactly full: fine
        with pytest.raises(KVCacheFullError):
            attn(x[:, 8:9], 8, cache)
        with pytest.raises(KVCacheFullError):
            attn(x[:, :10], 0, attn.new_cache(1, 8))  # a prefill longer than the cache


@pytest.mark.parametrize("window, sinks", [(4, 2), (3, 0), (1, 1)])
@pytest.mark.parametrize("codec", [("fp32", "per-channel"), ("int4", "per-token")], ids=lambda c: c[0])
def test_ring_cache_keeps_constant_capacity(window, sinks, codec):
    """Generate 3x the ring's capacity one token at a time; memory never grows, outputs stay exact."""
    capacity = sinks + window
    steps = 3 * capacity
    attn, x = _make(2, rotary=True)
    attn.visibility = SinkWindowVisibility(window, sinks)
    settings = _set_codec(attn, *codec)
    cache = attn.new_cache(1, 10_000)  # max_length is irrelevant to a ring
    assert cache.capacity == capacity
    shape = cache.keys.shape
    outputs = []
    with torch.no_grad():
        for t in range(steps):
            outputs.append(attn(x[:, t:t + 1], t, cache))
            assert cache.capacity == capacity and cache.keys.shape == shape == cache.values.shape
            held = set(cache.positions.tolist()) - {-1}
            expected = set(range(min(sinks, t + 1))) | set(range(max(0, t - window + 1), t + 1))
            assert held == expected, f"after token {t}: cache holds {sorted(held)}"
    expected_out = _oracle(attn, x[:, :steps], window=window, sinks=sinks, **settings)
    torch.testing.assert_close(torch.cat(outputs, 1), expected_out, rtol=0, atol=MATCH)


@pytest.mark.parametrize("residual", [1, 4, 11, SEQ + 3])
@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_residual_window_matches_reference(residual, dtype, kv_heads):
    attn, x = _make(kv_heads, rotary=True, batch=2)
    settings = _set_codec(attn, dtype, "per-token")
    attn.codec = KVCodec(dtype, "per-token", attn.num_kv_heads, attn.head_dim, residual=residual)
    _check(attn, x, {**settings, "kv_residual": residual})


def test_residual_window_holds_full_precision():
    """A window covering the sequence is the fp32 cache exactly; a window of one still quantizes the rest."""
    attn, x = _make(2, rotary=True)
    with torch.no_grad():
        attn.codec = KVCodec("int4", "per-token", 2, HEAD_DIM, residual=SEQ)
        covering, cache = _decode(attn, x)
        attn.codec = KVCodec("fp32", num_kv_heads=2, head_dim=HEAD_DIM)
        exact, _ = _decode(attn, x)
        attn.codec = KVCodec("int4", "per-token", 2, HEAD_DIM, residual=1)
        narrow, _ = _decode(attn, x)
    torch.testing.assert_close(covering, exact, rtol=0, atol=MATCH)
    assert (narrow - exact).abs().max() > DIFFERENT
    stored_keys, _, _ = cache.visible()  # the cache keeps full-precision rows; reads round-trip the old ones
    assert len(torch.unique(stored_keys)) > 16 * SEQ


def test_residual_window_needs_a_per_token_codec():
    with pytest.raises(ValueError, match="per-token"):
        KVCodec("int4", "per-channel", 2, HEAD_DIM, residual=4)
