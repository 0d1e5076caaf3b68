"""Ground truth spelled out by hand, not derived from the code.

Masks, ring slots, in-cache rotary positions, hierarchical block choices, codec levels
and cache sizes are written as literal tables (the working is in the comments), so a
wrong modulus, sink boundary or byte count cannot agree with itself.
"""

from __future__ import annotations

import pytest
import torch

from edgeattn.models.kv_codec import KVCodec
from edgeattn.models.kvcache import LayerKVCache
from edgeattn.models.visibility import FullVisibility, HierarchicalVisibility, SinkWindowVisibility
from tests.reference import reference_attention

# --- sliding window + sinks -----------------------------------------------------------------

# T=8, window=3, sinks=2: query i sees j <= i with j < 2 (sinks) or i - j < 3 (itself + 2 before).
WINDOW3_SINKS2_MASK = [
    # keys: 0  1  2  3  4  5  6  7
    [1, 0, 0, 0, 0, 0, 0, 0],  # q0
    [1, 1, 0, 0, 0, 0, 0, 0],  # q1
    [1, 1, 1, 0, 0, 0, 0, 0],  # q2
    [1, 1, 1, 1, 0, 0, 0, 0],  # q3: window 1..3
    [1, 1, 1, 1, 1, 0, 0, 0],  # q4: window 2..4 (last query that sees everything: 4 = sinks+window-1)
    [1, 1, 0, 1, 1, 1, 0, 0],  # q5: window 3..5, key 2 evicted
    [1, 1, 0, 0, 1, 1, 1, 0],  # q6: window 4..6
    [1, 1, 0, 0, 0, 1, 1, 1],  # q7: window 5..7
]


def test_sink_window_mask_table():
    positions = torch.arange(8)
    mask = SinkWindowVisibility(3, 2).mask(positions, positions)
    assert mask.shape == (1, 1, 8, 8)
    assert mask[0, 0].int().tolist() == WINDOW3_SINKS2_MASK


def test_full_mask_is_lower_triangular():
    positions = torch.arange(4)
    assert FullVisibility().mask(positions, positions)[0, 0].int().tolist() == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 0],
        [1, 1, 1, 1],
    ]


def test_sink_window_mask_for_a_decode_step():
    # Query 9 against what a sinks=2, window=3 ring holds (0, 1, 6, 7, 8) plus itself:
    # sinks 0, 1 and window 7..9 are visible; 6 is in the ring but 9 - 6 = 3 is not < 3.
    mask = SinkWindowVisibility(3, 2).mask(torch.tensor([9]), torch.tensor([0, 1, 6, 7, 8, 9]))
    assert mask[0, 0].int().tolist() == [[1, 1, 0, 1, 1, 1]]


# sinks=2, window=3: sinks keep slots 0, 1; token t >= 2 lives in slot 2 + (t - 2) % 3.
SLOTS_SINKS2_WINDOW3 = {
    0: 0, 1: 1,  # sinks
    2: 2, 3: 3, 4: 4,  # first pass over the window slots
    5: 2, 6: 3, 7: 4,  # 5 evicts 2, 6 evicts 3, 7 evicts 4
    8: 2, 9: 3, 10: 4,
}


def test_ring_slot_table():
    slots = SinkWindowVisibility(3, 2).slot_of(torch.arange(11))
    assert dict(enumerate(slots.tolist())) == SLOTS_SINKS2_WINDOW3
    # No sinks, window 4: slot = t % 4.
    assert SinkWindowVisibility(4, 0).slot_of(torch.arange(9)).tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0]


def test_ring_cache_reads_back_in_chronological_order():
    # sinks=2, window=3, tokens 0..6 written one by one into slots 0, 1, 2, 3, 4, 2, 3:
    # slots hold positions [0, 1, 5, 6, 4]; visible() must return them as 0, 1, 4, 5, 6.
    visibility = SinkWindowVisibility(3, 2)
    cache = LayerKVCache.empty(1, 1, visibility.capacity(100), 1)
    for t in range(7):
        position = torch.tensor([t])
        cache.write(visibility.slot_of(position), position, torch.full((1, 1, 1, 1), float(t)),
                    torch.full((1, 1, 1, 1), -float(t)))
    assert cache.positions.tolist() == [0, 1, 5, 6, 4]
    keys, values, positions = cache.visible()
    assert positions.tolist() == [0, 1, 4, 5, 6]
    assert keys.flatten().tolist() == [0.0, 1.0, 4.0, 5.0, 6.0]
    assert values.flatten().tolist() == [-0.0, -1.0, -4.0, -5.0, -6.0]


def test_rotary_positions_after_eviction():
    # sinks=2, window=3, decoding token 7: the ring holds 0, 1, 4, 5, 6, plus the new 7.
    # The oldest non-sink key (4) moves to in-cache position 2 (right after the sinks):
    # shift = 4 - 2 = 2, so keys 4, 5, 6, 7 -> 2, 3, 4, 5 and the query 7 -> 5.
    # Against the sinks the query sits at min(5, sinks + window - 1 = 4) = 4.
    keys, query, query_vs_sinks = SinkWindowVisibility(3, 2).rotary_positions(
        torch.tensor([7]), torch.tensor([0, 1, 4, 5, 6, 7]))
    assert keys.tolist() == [0, 1, 2, 3, 4, 5]
    assert query.tolist() == [5]
    assert query_vs_sinks.tolist() == [4]
    # Distances the scores see: window keys keep their true distance (7-6 = 5-4 = 1),
    # sink 0 is seen at 4 - 0 = min(7, 4) - 0.


def test_rotary_positions_before_eviction_are_original():
    # sinks=2, window=3, decoding token 4: ring holds 0..3, nothing evicted -> no shift,
    # and 4 = sinks + window - 1 is not clamped: identical to full attention.
    keys, query, query_vs_sinks = SinkWindowVisibility(3, 2).rotary_positions(
        torch.tensor([4]), torch.tensor([0, 1, 2, 3, 4]))
    assert keys.tolist() == [0, 1, 2, 3, 4]
    assert query.tolist() == [4]
    assert query_vs_sinks.tolist() == [4]


def test_sink_inside_window_distances_agree():
    # window=3, sinks=2: the (query i, sink j) pairs where the sink is also inside the window
    # (i - j < 3); there i <= 4 = sinks + window - 1, so min(i, 4) - j == i - j.
    sinks, window = 2, 3
    inside = [(i, j) for i in range(12) for j in range(sinks) if j <= i and i - j < window]
    assert inside == [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (3, 1)]
    for i, j in inside:
        assert min(i, sinks + window - 1) - j == i - j
    # And the module agrees: for every query up to 4 the ring gives the full-attention positions.
    for i in range(5):
        _, query, query_vs_sinks = SinkWindowVisibility(window, sinks).rotary_positions(
            torch.tensor([i]), torch.arange(i + 1))
        assert query.tolist() == query_vs_sinks.tolist() == [i]


# --- hierarchical -------------------------------------------------------------------------

# block_size=2: block b = positions {2b, 2b+1}; a candidate for query i once 2b+1 <= i.
CANDIDATE_BLOCKS_BS2 = {0: [], 1: [0], 2: [0], 3: [0, 1], 4: [0, 1], 5: [0, 1, 2], 6: [0, 1, 2]}


def _blocks_to_keys(blocks, length=7):
    return [1 if j // 2 in blocks else 0 for j in range(length)]


def test_hierarchical_candidate_blocks():
    # local_window=0, sinks=0 and top_blocks larger than any count: the mask is exactly the
    # union of candidate blocks (local_window=0 is not a legal spec; it isolates level 1 here).
    positions = torch.arange(7)
    q = torch.randn(1, 1, 7, 4)
    k = torch.randn(1, 1, 7, 4)
    mask = HierarchicalVisibility(2, top_blocks=99, local_window=0).mask(positions, positions, q, k)
    expected = [_blocks_to_keys(CANDIDATE_BLOCKS_BS2[i]) for i in range(7)]
    assert mask[0, 0].int().tolist() == expected


# D=2, six keys in three blocks of 2, one query direction q = (1, -1):
#   block 0: (1, 0), (0, 1)   min (0, 0)  max (1, 1)  bound max(0,1) + max(-0,-1) = 1 + 0 = 1
#   block 1: (2, -1), (-1, 0) min (-1,-1) max (2, 0)  bound max(-1,2) + max(1, 0)  = 2 + 1 = 3
#   block 2: (0, 3), (0, 2)   min (0, 2)  max (0, 3)  bound max(0, 0) + max(-2,-3) = 0 - 2 = -2
# Ranking: block 1 > block 0 > block 2.
HAND_KEYS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, -1.0], [-1.0, 0.0], [0.0, 3.0], [0.0, 2.0]])
HAND_QUERY = torch.tensor([1.0, -1.0])


def _hand_mask(top_blocks, block_mass=None, local_window=0, sinks=0):
    positions = torch.arange(6)
    q = HAND_QUERY.expand(6, 2)[None, None]
    k = HAND_KEYS[None, None]
    visibility = HierarchicalVisibility(2, top_blocks, local_window, sinks, block_mass)
    return visibility.mask(positions, positions, q, k)[0, 0].int().tolist()


@pytest.mark.parametrize("top_blocks, rows", [
    # query:  0 (no block)  1-2 (block 0 only)   3-4 (blocks 0, 1)      5 (blocks 0, 1, 2)
    (1, {0: [], 1: [0], 2: [0], 3: [1], 4: [1], 5: [1]}),
    (2, {0: [], 1: [0], 2: [0], 3: [0, 1], 4: [0, 1], 5: [0, 1]}),
    (3, {0: [], 1: [0], 2: [0], 3: [0, 1], 4: [0, 1], 5: [0, 1, 2]}),
])
def test_hierarchical_top_blocks_by_hand(top_blocks, rows):
    assert _hand_mask(top_blocks) == [_blocks_to_keys(rows[i], 6) for i in range(6)]


# Query 5, block_mass: logits = bound / sqrt(2) (+ log 2, the same for every block):
#   block 1: 3/1.4142 = 2.1213, block 0: 0.7071, block 2: -1.4142
#   exp: 8.342, 2.028, 0.2431 (sum 10.613) -> mass 0.786, 0.191, 0.023
#   cumulative in bound order: 0.786, 0.977, 1.0
@pytest.mark.parametrize("block_mass, kept", [(0.5, [1]), (0.78, [1]), (0.8, [0, 1]), (0.97, [0, 1]),
                                              (0.99, [0, 1, 2])])
def test_hierarchical_block_mass_by_hand(block_mass, kept):
    assert _hand_mask(3, block_mass)[5] == _blocks_to_keys(kept, 6)
    # top_blocks still caps it
    assert _hand_mask(1, block_mass)[5] == _blocks_to_keys([1], 6)


def test_hierarchical_local_window_and_sinks_by_hand():
    # Query 5, top 1 (block 1 = keys 2, 3), local window 2 (keys 4, 5), sink 0.
    assert _hand_mask(1, local_window=2, sinks=1)[5] == [1, 0, 1, 1, 1, 1]
    # Query 3, top 1 (block 1 = keys 2, 3), local window 2 (keys 2, 3), no sinks.
    assert _hand_mask(1, local_window=2)[3] == [0, 0, 1, 1, 0, 0]


def test_reference_hierarchical_by_hand():
    """The oracle picks the same blocks from the same hand-made keys (values = one-hot positions)."""
    q = HAND_QUERY.expand(6, 2)[None]  # [1, 6, 2]
    k = HAND_KEYS[None]
    v = torch.zeros(1, 6, 2)
    # Values: attention weight on keys 0/1 (block 0) is read off channel 0, on keys 4/5 (block 2) off channel 1.
    v[0, 0, 0] = v[0, 1, 0] = 1.0
    v[0, 4, 1] = v[0, 5, 1] = 1.0
    out = reference_attention(q, k, v, block_size=2, top_blocks=1, local_window=0)  # [1, 6, 2]
    # Query 5 keeps block 1 only: no weight on blocks 0 or 2.
    assert out[0, 5].tolist() == [0.0, 0.0]
    # Query 1 and 2 only have block 0: all weight on keys 0, 1.
    assert out[0, 1, 0].item() == pytest.approx(1.0) and out[0, 2, 0].item() == pytest.approx(1.0)
    out = reference_attention(q, k, v, block_size=2, top_blocks=3, local_window=0)
    assert out[0, 5, 1].item() > 0.0  # block 2 kept when top_blocks covers it


# A second query head reading the same kv head, q = (-1, 2):
#   block 0: max(-0,-1) + max(0, 2) = 0 + 2 = 2
#   block 1: max(1,-2)  + max(-2, 0) = 1 + 0 = 1
#   block 2: max(0, 0)  + max(4, 6)  = 0 + 6 = 6
# Ranking per query head: A (HAND_QUERY) block 1 > 0 > 2, B block 2 > 0 > 1. Shared by their kv head
# (the larger bound of the two): block 0: 2, block 1: 3, block 2: 6 -> block 2 > 1 > 0.
HAND_QUERY_B = torch.tensor([-1.0, 2.0])


@pytest.mark.parametrize("select, top_blocks, query, kept_a, kept_b", [
    ("query-head", 1, 5, [1], [2]), ("kv-head", 1, 5, [2], [2]),
    ("query-head", 1, 3, [1], [0]), ("kv-head", 1, 3, [1], [1]),
    ("query-head", 2, 5, [0, 1], [0, 2]), ("kv-head", 2, 5, [1, 2], [1, 2]),
])
def test_hierarchical_kv_head_selection_by_hand(select, top_blocks, query, kept_a, kept_b):
    positions = torch.arange(6)
    q = torch.stack([HAND_QUERY.expand(6, 2), HAND_QUERY_B.expand(6, 2)])[None]  # [1, 2 heads, 6, 2]
    k = HAND_KEYS[None, None]  # one kv head
    mask = HierarchicalVisibility(2, top_blocks, 0, select=select).mask(positions, positions, q, k)
    assert mask[0, 0, query].int().tolist() == _blocks_to_keys(kept_a, 6)
    assert mask[0, 1, query].int().tolist() == _blocks_to_keys(kept_b, 6)
    # The oracle keeps the same blocks. Values: block 0 reads (1, 0), block 2 (0, 1), block 1 (0, 0), so
    # head B's output shows which blocks it attended: channel 0 > 0, channel 1 > 0, their sum < 1.
    v = torch.tensor([[1.0, 0.0]] * 2 + [[0.0, 0.0]] * 2 + [[0.0, 1.0]] * 2)[None]
    out = reference_attention(q[0], HAND_KEYS[None], v, block_size=2, top_blocks=top_blocks, local_window=0,
                              block_select=select)[1, query]
    seen = {0: out[0] > 0, 1: out.sum() < 1 - 1e-6, 2: out[1] > 0}
    assert sorted(block for block, attended in seen.items() if attended) == kept_b


# --- KV codecs ----------------------------------------------------------------------------

# int4 per-channel: absmax 3.5 -> scale 3.5 / 7 = 0.5 (exact); codes clamp to [-8, 7].
INT4_SCALE_HALF = [
    # x       x/0.5   code   read back
    (0.2, 0.0),  # 0.4   ->  0  -> 0.0
    (0.3, 0.5),  # 0.6   ->  1  -> 0.5
    (1.3, 1.5),  # 2.6   ->  3  -> 1.5
    (-1.1, -1.0),  # -2.2  -> -2  -> -1.0
    (3.6, 3.5),  # 7.2   ->  7  -> 3.5 (top code)
    (10.0, 3.5),  # 20    -> clamp 7
    (-3.9, -4.0),  # -7.8  -> -8  -> -4.0 (the extra negative level of two's complement)
    (-10.0, -4.0),  # -20   -> clamp -8
]


def test_int4_per_channel_codes_by_hand():
    codec = KVCodec("int4", "per-channel", num_kv_heads=1, head_dim=len(INT4_SCALE_HALF))
    codec.set_scales(torch.full((1, 8), 3.5), torch.full((1, 8), 3.5))
    assert codec.k_scale.tolist() == [[0.5] * 8]
    x = torch.tensor([x for x, _ in INT4_SCALE_HALF]).view(1, 1, 1, 8)
    expected = [y for _, y in INT4_SCALE_HALF]
    assert codec.roundtrip(x, "key").flatten().tolist() == expected
    assert codec.roundtrip(x, "value").flatten().tolist() == expected
    ref = reference_attention(torch.zeros(1, 1, 8), x[0].clone(), x[0].clone(), kv_dtype="int4",
                              k_scale=codec.k_scale, v_scale=codec.v_scale)
    assert ref.flatten().tolist() == expected  # one token attends only to itself: out == its value


def test_int8_per_channel_codes_by_hand():
    # absmax 127 -> scale 1.0; codes clamp to [-128, 127].
    codec = KVCodec("int8", "per-channel", num_kv_heads=1, head_dim=4)
    codec.set_scales(torch.full((1, 4), 127.0), torch.full((1, 4), 127.0))
    x = torch.tensor([3.4, -127.6, 200.0, -200.0]).view(1, 1, 1, 4)
    assert codec.roundtrip(x, "key").flatten().tolist() == [3.0, -128.0, 127.0, -128.0]


def test_int4_per_token_by_hand():
    # Value of one token, head_dim 4 (one group): min -1, max 2.75, scale 3.75 / 15 = 0.25
    # (exact in fp16). codes: 0 -> -1.0; 15 -> 2.75; (0.3 + 1) / 0.25 = 5.2 -> 5 -> 0.25.
    codec = KVCodec("int4", "per-token", num_kv_heads=1, head_dim=4)
    x = torch.tensor([-1.0, 2.75, 0.3, 2.75]).view(1, 1, 1, 4)
    assert codec.roundtrip(x, "value").flatten().tolist() == [-1.0, 2.75, 0.25, 2.75]
    # A constant token: range 0 -> scale floored at 2**-14; the minimum is stored in fp16,
    # and fp16(0.3) = (1 + 205/1024) / 4 = 0.300048828125 is what reads back.
    const = torch.full((1, 1, 1, 4), 0.3)
    assert codec.roundtrip(const, "key").flatten().tolist() == [0.300048828125] * 4


def test_per_token_keys_use_groups_of_32_channels():
    # head_dim 64: channels 0..31 span [0, 15] (scale 1), channels 32..63 span [0, 0.9375] (scale 1/16).
    # One group per token would quantize the small half with scale 1 and flatten it to 0/1.
    codec = KVCodec("int4", "per-token", num_kv_heads=1, head_dim=64)
    x = torch.zeros(1, 1, 1, 64)
    x[..., :32] = torch.arange(32) % 16  # integers 0..15: exact with scale 1
    x[..., 32:] = (torch.arange(32) % 16) * 0.0625  # 0 .. 0.9375: scale 0.0625 (exact in fp16)
    assert torch.equal(codec.roundtrip(x, "key"), x)
    # Values use one group over the whole head: the small half collapses onto multiples of 1.
    assert codec.roundtrip(x, "value")[..., 32:].abs().max() <= 1.0
    assert not torch.equal(codec.roundtrip(x, "value"), x)


def test_fp16_roundtrip_by_hand():
    codec = KVCodec("fp16", num_kv_heads=1, head_dim=3)
    x = torch.tensor([0.3, 1.0, 65520.0]).view(1, 1, 1, 3)
    # fp16(0.3) = 0.300048828125; 1.0 exact; 65520 rounds past the largest fp16 (65504) to inf.
    assert codec.roundtrip(x, "key").flatten().tolist() == [0.300048828125, 1.0, float("inf")]


# bytes per cached token (keys + values, every kv head), worked out by hand:
BYTES_PER_TOKEN = [
    # (dtype, mode, kv_heads, head_dim, bytes)
    ("fp32", "per-channel", 2, 64, 1024),  # 2 (k, v) x 2 heads x 64 x 4 B
    ("fp16", "per-channel", 2, 64, 512),  # 2 x 2 x 64 x 2 B
    ("int8", "per-channel", 2, 64, 256),  # 2 x 2 x 64 x 1 B (scales are static, not per token)
    ("int4", "per-channel", 2, 64, 128),  # 2 x 2 x 64 / 2 B
    # per-token: + per head (64/32 = 2 key groups + 1 value group) x (fp16 scale + fp16 min = 4 B)
    ("int8", "per-token", 2, 64, 280),  # 256 + 2 heads x 3 x 4 = 256 + 24
    ("int4", "per-token", 2, 64, 152),  # 128 + 24
    ("int4", "per-token", 1, 16, 24),  # codes 2 x 16 / 2 = 16; head_dim 16 < 32: 1 key group + 1 value -> 8
    ("int8", "per-token", 4, 128, 1024 + 80),  # codes 2 x 4 x 128; 4 heads x (4 + 1) x 4 = 80
    ("fp16", "per-token", 2, 64, 512),  # fp16 has no scales whatever the mode
    ("fp32", "per-channel", 1, 16, 128),  # 2 x 16 x 4
]


@pytest.mark.parametrize("dtype, mode, kv_heads, head_dim, expected", BYTES_PER_TOKEN)
def test_bytes_per_token_by_hand(dtype, mode, kv_heads, head_dim, expected):
    assert KVCodec(dtype, mode, kv_heads, head_dim).bytes_per_token() == expected
