"""The sliding window + sinks ring on standard ONNX ops (``onnx_ring``): exported, run in onnxruntime, compared
with the rewritten PyTorch model (which keeps StreamingLLM's in-cache positions); the buffer layout checked
against keys rotated by hand; positions far past the model's position table."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgeattn.convert import ConvertOptions, convert
from edgeattn.exporters.checks import op_histogram
from edgeattn.exporters.export import cache_names
from edgeattn.exporters.onnx_attention import lowering_for
from edgeattn.runtimes import EdgeLM
from edgeattn.spec import AttentionSpec
from tests.onnx_vs_torch import compare, random_ids

ONNX_VS_TORCH = 1e-4  # fp32 max-abs logit difference, prefill + every decode step
DECODE_STEPS = 32
MAX_LENGTH = 96
RING = dict(window=8, sinks=2)  # 10 ring slots (+ 2 for the kept sinks)

CASES = {
    "ring": ("llama", AttentionSpec(**RING)),
    "window": ("llama", AttentionSpec(window=8)),  # no sinks: a plain ring of W slots
    "mistral-ring": ("mistral", AttentionSpec(window=7, sinks=3)),
    "phi3-gqa-ring": ("phi3", AttentionSpec(kv_heads=2, **RING)),
    "qwen2-mqa-ring": ("qwen2", AttentionSpec(kv_heads=1, window=7, sinks=1)),  # q/k/v biases, packed
    "gpt2-ring": ("gpt2", AttentionSpec(**RING)),  # learned positions: nothing rotates
    # Codec rings: codes of unrotated keys, decoded and rotated on read (the PyTorch model's fake-quantized cache).
    "ring-fp16": ("llama", AttentionSpec(**RING, kv_cache="fp16")),
    "ring-int8-channel": ("llama", AttentionSpec(**RING, kv_cache="int8")),
    "ring-int4-channel": ("llama", AttentionSpec(**RING, kv_cache="int4")),
    "ring-int8-token": ("llama", AttentionSpec(**RING, kv_cache="int8", kv_quant="per-token")),
    "qwen2-mqa-ring-int4-token": ("qwen2", AttentionSpec(kv_heads=1, **RING, kv_cache="int4", kv_quant="per-token")),
    "mistral-window-int8-channel": ("mistral", AttentionSpec(window=8, kv_cache="int8")),
    "gpt2-ring-fp16": ("gpt2", AttentionSpec(**RING, kv_cache="fp16")),
}
# Quantized caches hold the same codes as PyTorch's fake-quantized cache given the same inputs, but
# onnxruntime's matmuls differ from PyTorch's by a few float32 ulps: a value within ulps of a rounding boundary
# would round the other way and move the logits by ~1e-3. The sequences below were checked not to sit on one;
# test_codec_ring_rows_decode_to_the_pytorch_cache checks the stored codes themselves.


@pytest.fixture
def case(exported):
    """The folder, decoder and lowerings of CASES[name] with the onnx lowering (exported once per session)."""
    return lambda name: exported(*CASES[name], lowering_for, MAX_LENGTH)


@pytest.mark.parametrize("name", sorted(CASES))
def test_ring_matches_pytorch(case, name):
    """Prefill 40, 32 greedy decode steps (the rings wrap several times), a 13-token chunk on the wrapped ring,
    one more step."""
    folder, decoder, _ = case(name)
    chunks = [random_ids(1, 40, 0)] + [None] * DECODE_STEPS + [random_ids(1, 13, 1), None]
    worst, torch_tokens, ort_tokens = compare(folder, decoder, chunks, MAX_LENGTH)
    assert worst < ONNX_VS_TORCH
    assert torch_tokens == ort_tokens


def test_short_prompts_fill_the_sinks_step_by_step(case):
    """A 1-token prompt: the sinks arrive one decode step at a time, then a chunk that reaches past the ring."""
    folder, decoder, _ = case("mistral-ring")
    chunks = [random_ids(1, 1, 2)] + [None] * 12 + [random_ids(1, 3, 3), None, random_ids(1, 30, 4), None]
    worst, torch_tokens, ort_tokens = compare(folder, decoder, chunks, MAX_LENGTH)
    assert worst < ONNX_VS_TORCH and torch_tokens == ort_tokens


def test_batched_chunks_on_a_wrapped_ring(case):
    folder, decoder, _ = case("ring")
    chunks = [random_ids(3, 9, 2), None, random_ids(3, 6, 3), None, None, random_ids(3, 11, 4), None, random_ids(3, 3, 5)]
    worst, torch_tokens, ort_tokens = compare(folder, decoder, chunks, MAX_LENGTH, batch=3)
    assert worst < ONNX_VS_TORCH and torch_tokens == ort_tokens


# An fp16 cache rounds ~10^6 values here: a few sit within float32 ulps of an fp16 rounding boundary and round
# the other way in one of the two runtimes, which moves a logit by ~1e-4. Wrong angles would move it by ~1e-2.
FP16_ROUNDING = 1e-3


@pytest.mark.parametrize(("name", "tolerance"), [("ring", ONNX_VS_TORCH), ("ring-fp16", FP16_ROUNDING)])
def test_positions_past_1e5_stay_exact(case, name, tolerance):
    """~100k tokens in 2048-token chunks (the 10-slot ring wraps ~10^4 times, the model's table has 512
    positions), then 32 decode steps at positions around 1.0e5: still PyTorch's logits, whose ring scores
    use small in-cache positions, so float32 angles of absolute positions would be off by ~1e-2 here."""
    folder, decoder, lowerings = case(name)
    assert lowerings[0].cache_layout().max_positions is None
    chunks = [random_ids(1, 2048, 100 + seed) for seed in range(49)] + [None] * DECODE_STEPS
    worst, torch_tokens, ort_tokens = compare(folder, decoder, chunks, MAX_LENGTH)
    assert 49 * 2048 > 1e5
    assert worst < tolerance
    assert torch_tokens == ort_tokens


@pytest.mark.parametrize("name", ["ring", "window", "gpt2-ring", "ring-int4-channel", "ring-int8-token"])
def test_chunked_prefill_equals_token_by_token_decode(case, name):
    """The same 70 tokens as chunks (25, 1, 13, 31: the in-place branch, then copies of a wrapped ring) and one
    by one (the in-place branch only): the same logits after every chunk."""
    folder, _, _ = case(name)
    ids = random_ids(1, 70, 9).numpy()
    chunked, stepwise = EdgeLM.load(folder, threads=1), EdgeLM.load(folder, threads=1)
    chunked.reset(1)
    stepwise.reset(1)
    start = 0
    for length in (25, 1, 13, 31):
        expected = chunked.forward(ids[:, start:start + length])
        for position in range(start, start + length):
            actual = stepwise.forward(ids[:, position:position + 1])
        start += length
        np.testing.assert_allclose(actual, expected, atol=ONNX_VS_TORCH)


def _presents(folder, ids: torch.Tensor, chunk_lengths: list[int]) -> list[np.ndarray]:
    """Plain session.run (present is a fresh buffer, not the past one); the last presents."""
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    past_names, _ = cache_names(len(session.get_inputs()) // 2 - 1)
    shapes = {i.name: i for i in session.get_inputs()}
    caches = [np.zeros([1, *shapes[name].shape[1:]], np.float32) for name in past_names]
    start = 0
    for length in chunk_lengths:
        feeds = {"input_ids": ids[:, start:start + length].numpy(),
                 "attention_mask": np.ones((1, start + length), np.int64), **dict(zip(past_names, caches))}
        caches = session.run(None, feeds)[1:]
        start += length
    return caches


def test_slots_hold_keys_rotated_as_the_layout_says(case):
    """window 8, sinks 2, 15 tokens ending with a decode step: window slot s holds token 2 + ... at its
    absolute position (slot 2 + (t - 2) % 8 <- t for t = 7..14), slots 10-11 the sinks rotated at their own
    positions 0-1, slots 0-1 the sinks rotated on by e = 15 - 10 = 5; the values sit in slots 0..9."""
    folder, decoder, _ = case("ring")
    ids = random_ids(1, 15, 7)
    key_buffer, value_buffer = (buffer[0] for buffer in _presents(folder, ids, [5, 1, 1, 6, 1, 1])[:2])
    attn = decoder.attentions()[0]
    with torch.no_grad():  # layer-0 keys and values before RoPE: k_proj/v_proj(norm(embedding))
        hidden = decoder.blocks[0].attn_norm(decoder.embed(ids))
        keys = attn.split_heads(attn.k_proj(hidden), attn.num_kv_heads)  # [1, Hkv, 15, D]
        values = attn.split_heads(attn.v_proj(hidden), attn.num_kv_heads)[0]

    def rotated(position: int, at: int) -> np.ndarray:
        return attn.rotary.rotate(keys[:, :, position:position + 1], torch.tensor([at]))[0, :, 0].numpy()

    slot_of = {2: 10, 3: 11, 4: 12, 5: 13, 6: 14, 7: 7, 8: 8, 9: 9}
    for slot, position in slot_of.items():
        np.testing.assert_allclose(key_buffer[:, slot], rotated(position, position), atol=1e-5)
        np.testing.assert_allclose(value_buffer[:, slot], values[:, position].numpy(), atol=1e-6)
    for sink in (0, 1):
        np.testing.assert_allclose(key_buffer[:, 10 + sink], rotated(sink, sink), atol=1e-5)
        np.testing.assert_allclose(key_buffer[:, sink], rotated(sink, 5 + sink), atol=1e-5)
        np.testing.assert_allclose(value_buffer[:, sink], values[:, sink].numpy(), atol=1e-6)
    assert not value_buffer[:, 10:].any()


def test_codec_ring_rows_decode_to_the_pytorch_cache(case):
    """int8 per channel: the key buffer holds round(k / scale) of the unrotated keys in the slots the ring
    assigns (the rows edgeattn's own ring stores); codes x scale are PyTorch's cached (fake-quantized) keys."""
    folder, decoder, lowerings = case("ring-int8-channel")
    ids = random_ids(1, 23, 8)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    past_names, _ = cache_names(len(lowerings))
    caches = [np.zeros((1, 2, 10, 16), np.int8) for _ in past_names]
    start = 0
    for length in (20, 1, 1, 1):
        feeds = {"input_ids": ids[:, start:start + length].numpy(),
                 "attention_mask": np.ones((1, start + length), np.int64), **dict(zip(past_names, caches))}
        caches = session.run(None, feeds)[1:]
        start += length
    cache = decoder.new_cache(1, MAX_LENGTH)
    with torch.no_grad():
        decoder(ids[:, :20], cache)
        for t in range(20, 23):
            decoder(ids[:, t:t + 1], cache)
    layer, codec = cache.layers[0], decoder.attentions()[0].codec
    assert caches[0].dtype == np.int8 and (layer.positions >= 0).all()
    np.testing.assert_allclose(caches[0][0] * codec.k_scale[:, None, :].numpy(), layer.keys[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(caches[1][0] * codec.v_scale[:, None, :].numpy(), layer.values[0].numpy(), atol=1e-6)


def test_graph_is_standard_onnx_with_one_if_and_one_attention_per_layer(case):
    folder, _, lowerings = case("ring")
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    histogram = op_histogram(model)
    assert {entry.domain for entry in model.opset_import} == {""} and not model.functions
    assert histogram["If"] == 2 and histogram["Attention"] == 2  # one per branch, counted once per layer
    assert "Softmax" not in histogram
    decode = next(a.g for a in next(n for n in model.graph.node if n.op_type == "If").attribute
                  if a.name == "then_branch")
    # decode: split the heads (no Transpose for one token), rotate q and k, re-rotate the kept sinks, write
    # them and the new rows in place, attend over the buffer
    assert [node.op_type for node in decode.node if node.op_type != "Constant"] == [
        "Reshape", "Split", "RotaryEmbedding", "RotaryEmbedding", "Slice", "RotaryEmbedding", "Concat",
        "ScatterElements", "ScatterElements", "Attention", "Reshape"]
    layout = lowerings[0].cache_layout().manifest()
    assert layout == {"capacity": 12, "dtype": "float32", "shape_tail": [2, 12, 16], "ring": True,
                      "max_positions": None}


@pytest.mark.parametrize(("spec", "expected"), [
    (AttentionSpec(window=8, sinks=2), "onnx"), (AttentionSpec(kv_heads=1, window=8, sinks=4), "onnx")])
def test_auto_converts_sinks_to_the_ring_and_records_why(tmp_path, spec, expected):
    manifest = convert(ConvertOptions("tiny-llama", tmp_path / "out", spec, max_length=MAX_LENGTH))
    lowering = manifest.lowering
    assert lowering.chosen == expected and lowering.op_per_layer == ["Attention", "Attention"]
    assert "sinks" in lowering.not_chosen["ort"]
    assert lowering.not_chosen["edgeattn"].startswith("slower than onnx")
    assert manifest.kv_cache.ring and manifest.kv_cache.capacity == spec.window + 2 * spec.sinks
    assert manifest.numerics["passed"]


def test_int4_weights_keep_the_scales_only_the_branches_read(tmp_path):
    """The demo's spec on a tiny model: the per-channel scales of an int8 ring are read only inside the If's
    branches, and quantizing the weights must not prune them as unused."""
    folder = tmp_path / "out"
    manifest = convert(ConvertOptions("tiny-llama", folder, AttentionSpec(**RING, kv_cache="int8"), weights="int4",
                                      max_length=MAX_LENGTH))
    model = onnx.load(folder / "model.onnx")
    branch_inputs = {name for node in model.graph.node if node.op_type == "If"
                     for attribute in node.attribute for inner in attribute.g.node for name in inner.input}
    scales = {init.name for init in model.graph.initializer if init.name.endswith("k_scale")}
    assert scales and scales <= branch_inputs
    assert manifest.numerics["passed"]
    assert op_histogram(model).get("com.microsoft.MatMulNBits", 0) > 0
