"""Export with the edgeattn lowering (custom-domain ops + their function bodies), run in onnxruntime, compare
with the rewritten PyTorch model; check the cache layouts against hand-written ground truth."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgeattn.evaluation.calibration import calibration_ids, calibration_tokens
from edgeattn.exporters.checks import GraphCheckError, check_graph, fused_op_name, op_histogram
from edgeattn.exporters.edgeattn_ops import attach_functions, lowering_for, unsupported_reason
from edgeattn.exporters.export import cache_names
from edgeattn.exporters.lowering import choose_lowerings
from edgeattn.models import load
from edgeattn.rewrites import rewrite
from edgeattn.runtimes import EdgeLM
from edgeattn.runtimes.generate import stream
from edgeattn.spec import AttentionSpec
from tests.minimal_folder import exported_folder
from tests.onnx_vs_torch import compare, random_ids

ONNX_VS_TORCH = 1e-4  # fp32 max-abs logit difference, prefill + every decode step
# Quantized caches are bit-exact (codes, fp16 scales) given the same inputs, but onnxruntime's matmuls
# differ from PyTorch's by a few float32 ulps: a value within ulps of a rounding boundary (a code at
# x.5, a minimum at an fp16 midpoint) then rounds the other way and moves the logits by ~1e-3..1e-2.
# The sequences below were checked not to sit on such a boundary; a failure on a quantized case only
# is that (test_per_token_rows_hold_codes_and_fp16_scales checks the storage itself).
DECODE_STEPS = 32
MAX_LENGTH = 96
RING = dict(window=8, sinks=2)  # 10 slots

CASES = {
    "ring": ("llama", AttentionSpec(**RING)),
    "ring-fp16": ("llama", AttentionSpec(**RING, kv_cache="fp16")),
    "ring-int8-channel": ("llama", AttentionSpec(**RING, kv_cache="int8")),
    "ring-int4-token": ("llama", AttentionSpec(**RING, kv_cache="int4", kv_quant="per-token")),
    "full-int8-token": ("llama", AttentionSpec(kv_cache="int8", kv_quant="per-token")),
    "full-fp16": ("llama", AttentionSpec(kv_cache="fp16")),
    "hierarchical": ("llama", AttentionSpec(block_size=4, top_blocks=2)),
    "hierarchical-mass-int4-token": ("llama", AttentionSpec(
        block_size=4, top_blocks=3, block_mass=0.6, window=6, sinks=1, kv_cache="int4", kv_quant="per-token")),
    "qwen2-mqa-ring-int4-token": ("qwen2", AttentionSpec(kv_heads=1, **RING, kv_cache="int4", kv_quant="per-token")),
    "gpt2-ring": ("gpt2", AttentionSpec(**RING)),  # learned positions: no rotation in the op
    "mistral-ring-int8-channel": ("mistral", AttentionSpec(**RING, kv_cache="int8")),
    "phi3-gqa-hierarchical-fp16": ("phi3", AttentionSpec(kv_heads=2, block_size=4, top_blocks=2, kv_cache="fp16")),
    # (top 2 here meets a block pair whose bounds differ by 9e-6, within float rounding of ORT vs torch)
    "hierarchical-kv-head-int8": ("llama", AttentionSpec(block_size=4, top_blocks=3, sinks=1, kv_cache="int8",
                                                         block_select="kv-head")),
}
OP_OF = {"ring": "SinkWindowAttention", "full": "QuantKVAttention", "hierarchical": "HierarchicalAttention"}


@pytest.fixture
def case(exported):
    """The folder, decoder and lowerings of CASES[name] with the edgeattn lowering (exported once per session; the
    exporter attaches the function bodies)."""
    return lambda name: exported(*CASES[name], lowering_for, MAX_LENGTH)


def _folder(folder, decoder, lowerings, tokenizer):
    """Export into ``folder`` with the smallest manifest EdgeLM runs (convert's checks are not under test)."""
    return exported_folder(folder, decoder, lowerings, tokenizer, MAX_LENGTH)


@pytest.mark.parametrize("name", sorted(CASES))
def test_edgeattn_lowering_matches_pytorch(case, name):
    """Prefill 40, 32 greedy decode steps (the rings wrap several times), a 13-token chunk, one more step."""
    folder, decoder, _ = case(name)
    chunks = [random_ids(1, 40, 0)] + [None] * DECODE_STEPS + [random_ids(1, 13, 1), None]
    worst, torch_tokens, ort_tokens = compare(folder, decoder, chunks, MAX_LENGTH)
    assert worst < ONNX_VS_TORCH
    assert torch_tokens == ort_tokens


def test_batched_chunks_on_a_wrapped_ring(case):
    folder, decoder, _ = case("ring-int4-token")
    chunks = [random_ids(3, 9, 2), None, random_ids(3, 6, 3), None, None, random_ids(3, 11, 4), None, random_ids(3, 3, 5)]
    worst, torch_tokens, ort_tokens = compare(folder, decoder, chunks, MAX_LENGTH, batch=3)
    assert worst < ONNX_VS_TORCH and torch_tokens == ort_tokens


def test_batched_chunks_with_blocks_chosen_per_kv_head(case):
    folder, decoder, _ = case("hierarchical-kv-head-int8")
    chunks = [random_ids(2, 30, 3)] + [None] * 12 + [random_ids(2, 9, 4)]
    worst, torch_tokens, ort_tokens = compare(folder, decoder, chunks, MAX_LENGTH, batch=2)
    assert worst < ONNX_VS_TORCH and torch_tokens == ort_tokens


def test_ring_generates_past_max_length(case):
    folder, decoder, lowerings = case("ring")
    assert lowerings[0].cache_layout().max_positions is None  # RoPE positions are reassigned in the ring
    chunks = [random_ids(1, 80, 6)] + [None] * DECODE_STEPS  # 112 tokens > MAX_LENGTH
    worst, torch_tokens, ort_tokens = compare(folder, decoder, chunks, MAX_LENGTH)
    assert worst < ONNX_VS_TORCH and torch_tokens == ort_tokens


@pytest.mark.parametrize("name", ["ring", "full-int8-token", "hierarchical"])
def test_one_edgeattn_node_per_layer_and_no_softmax_outside(case, name):
    folder, _, lowerings = case(name)
    path = folder / "model.onnx"
    histogram = check_graph(path, [fused_op_name(lowering) for lowering in lowerings])  # one node per layer
    assert histogram == op_histogram(onnx.load(str(path), load_external_data=False))
    edgeattn_nodes = {op: count for op, count in histogram.items() if op.startswith("edgeattn.")}
    assert edgeattn_nodes == {f"edgeattn.{OP_OF[name.split('-')[0]]}": len(lowerings)}
    assert "Softmax" not in histogram
    model = onnx.load(str(path), load_external_data=False)
    assert all(f.opset_import[0] == model.opset_import[0] for f in model.functions if f.opset_import[0].domain == "")
    assert attach_functions(model, lowerings) == 0  # idempotent


def _presents(folder, ids: torch.Tensor, chunk_lengths: list[int]) -> list[np.ndarray]:
    """Plain session.run (present is a fresh buffer, not the past one); the last presents."""
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    past_names, _ = cache_names(len(session.get_inputs()) // 2 - 1)
    shapes = {i.name: i for i in session.get_inputs()}
    dtype = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8,
             "tensor(float16)": np.float16}
    caches = [np.zeros([1, *shapes[n].shape[1:]], dtype[shapes[n].type]) for n in past_names]
    start = 0
    for length in chunk_lengths:
        feeds = {"input_ids": ids[:, start:start + length].numpy(),
                 "attention_mask": np.ones((1, start + length), np.int64), **dict(zip(past_names, caches))}
        caches = session.run(None, feeds)[1:]
        start += length
    return caches


def test_ring_slots_hold_the_positions_written_out_by_hand(case):
    """window 8, sinks 2, 15 tokens: sinks stay in slots 0-1, token t >= 2 in slot 2 + (t - 2) % 8."""
    folder, decoder, _ = case("ring")
    ids = random_ids(1, 15, 7)
    key_buffer = _presents(folder, ids, [5, 1, 1, 6, 1, 1])[0][0]  # layer 0 keys [Hkv, C, D]
    position_of_slot = {0: 0, 1: 1, 2: 10, 3: 11, 4: 12, 5: 13, 6: 14, 7: 7, 8: 8, 9: 9}
    attn = decoder.attentions()[0]
    with torch.no_grad():  # layer-0 keys are stored unrotated: k_proj(norm(embedding)), position-free
        keys = attn.split_heads(attn.k_proj(decoder.blocks[0].attn_norm(decoder.embed(ids))), attn.num_kv_heads)[0]
    for slot, position in position_of_slot.items():
        np.testing.assert_allclose(key_buffer[:, slot], keys[:, position].numpy(), atol=1e-5)


def test_per_token_rows_hold_codes_and_fp16_scales(case):
    """int4 per-token, head_dim 16 (one key group): 8 bytes of nibbles (low first), then fp16 little-endian
    [key scale, value scale] in the key row and [key min, value min] in the value row; decoded with numpy
    it is the PyTorch cache (which keeps codec-round-tripped keys)."""
    folder, decoder, _ = case("ring-int4-token")
    ids = random_ids(1, 23, 8)
    key_rows, value_rows = (buffer[0] for buffer in _presents(folder, ids, [20, 1, 1, 1])[:2])  # [Hkv, C, 12]
    cache = decoder.new_cache(1, MAX_LENGTH)
    with torch.no_grad():
        decoder(ids[:, :20], cache)
        for t in range(20, 23):
            decoder(ids[:, t:t + 1], cache)

    def codes(rows):
        low, high = rows[..., :8] & 15, rows[..., :8] >> 4
        return np.stack([low, high], -1).reshape(*rows.shape[:-1], 16).astype(np.float32)

    scales = key_rows[..., 8:].copy().view(np.float16).astype(np.float32)  # [Hkv, C, 2]
    minimums = value_rows[..., 8:].copy().view(np.float16).astype(np.float32)
    keys = codes(key_rows) * scales[..., :1] + minimums[..., :1]
    values = codes(value_rows) * scales[..., 1:] + minimums[..., 1:]
    layer = cache.layers[0]
    assert (layer.positions >= 0).all()
    np.testing.assert_allclose(keys, layer.keys[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(values, layer.values[0].numpy(), atol=1e-6)


@pytest.mark.parametrize(("name", "dtype"), [
    ("ring", "float32"), ("ring-fp16", "float16"), ("ring-int8-channel", "int8"), ("ring-int4-token", "uint8"),
    ("full-int8-token", "uint8")])
def test_cache_buffers_cost_exactly_the_codec_bytes(case, name, dtype):
    _, decoder, lowerings = case(name)
    layout = lowerings[0].cache_layout()
    kv_heads, capacity, width = layout.shape_tail
    assert layout.dtype == dtype
    buffer_bytes_per_token = 2 * kv_heads * width * np.dtype(dtype).itemsize * len(lowerings)
    assert buffer_bytes_per_token == decoder.kv_bytes_per_token()
    assert capacity == (10 if name.startswith("ring") else MAX_LENGTH)


def test_learned_positions_keep_their_table_limit(case):
    _, _, lowerings = case("gpt2-ring")
    assert lowerings[0].cache_layout().max_positions == MAX_LENGTH
    assert not lowerings[0].inv_freq.any()  # rotation by angle zero


@pytest.mark.parametrize("spec", [spec for _, spec in CASES.values()])
def test_every_spec_is_representable(spec):
    assert unsupported_reason(spec, "cpu", has_rotary=True) is None


def test_check_graph_refuses_a_custom_node_without_its_body(case, tmp_path):
    folder, _, lowerings = case("ring")
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    del model.functions[:]
    onnx.save(model, str(tmp_path / "model.onnx"))
    shutil.copy(folder / "model.onnx.data", tmp_path / "model.onnx.data")
    with pytest.raises(GraphCheckError, match="without a function body in the model: edgeattn.SinkWindowAttention"):
        check_graph(tmp_path / "model.onnx", [fused_op_name(lowering) for lowering in lowerings])


# -- through convert: weights, the CLI, the real model ---------------------------------------------------------

WEIGHTS_SPEC = AttentionSpec(**RING)
# int4 weights (MatMulNBits, block 32) vs the fp32 PyTorch model on tiny-llama with the ring, 3 prompts x
# (prefill + 32 greedy steps of the fp32 model): measured top-1 agreement 0.86 and mean logit SQNR 13.5 dB
# (the random tiny models have flat logits; a broken model scores ~0.004 and ~0 dB).
INT4_MIN_TOP1, INT4_MIN_MEAN_SQNR_DB = 0.75, 10.0


@pytest.fixture
def converted_weights(converted):
    """tiny-llama with the ring and ``weights`` through convert with the edgeattn lowering (once per session)."""
    return lambda weights: converted("tiny-llama", WEIGHTS_SPEC, weights=weights, attention_op="edgeattn",
                                     max_length=MAX_LENGTH)


@pytest.mark.parametrize("weights", ["fp16", "int8", "int4"])
def test_weight_quantization_keeps_the_function_bodies(converted_weights, weights):
    folder, manifest = converted_weights(weights)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    assert {entry.domain: entry.version for entry in model.opset_import}["edgeattn"] == 1
    assert {f.name for f in model.functions} >= {"SinkWindowAttention", "EncodeKV", "DecodeKV", "Rope"}
    histogram = manifest.op_histogram
    assert histogram["edgeattn.SinkWindowAttention"] == 2 and "Softmax" not in histogram
    if weights != "fp16":
        assert histogram["com.microsoft.MatMulNBits"] == 2 * 7 + 1 and "MatMul" not in histogram
    assert manifest.lowering.chosen == "edgeattn" and manifest.numerics["passed"]


def test_int4_weights_agree_with_the_fp32_model(converted_weights):
    folder, _ = converted_weights("int4")
    decoder = _rewritten("llama", WEIGHTS_SPEC)
    lm = EdgeLM.load(folder, threads=1)
    agree, sqnr = [], []
    with torch.no_grad():
        for seed in range(3):
            lm.reset(1)
            cache = decoder.new_cache(1, MAX_LENGTH)
            chunk = random_ids(1, 40, seed)
            for _ in range(DECODE_STEPS + 1):
                expected = decoder(chunk, cache)[0, -1].numpy()
                actual = lm.forward(chunk.numpy())[0]
                agree.append(int(actual.argmax() == expected.argmax()))
                sqnr.append(10 * np.log10((expected**2).sum() / ((actual - expected) ** 2).sum()))
                chunk = torch.tensor([[int(expected.argmax())]])
    assert np.mean(agree) >= INT4_MIN_TOP1
    assert np.mean(sqnr) >= INT4_MIN_MEAN_SQNR_DB


def _rewritten(family: str, spec: AttentionSpec):
    model = load(f"tiny-{family}")
    rewrite(model.decoder, spec, calibration_ids(model.tokenizer, None, calibration_tokens(spec)))
    return model.decoder


@pytest.mark.parametrize(("flags", "spec", "op"), [
    (["--window", "8", "--sinks", "2", "--kv-cache", "int4", "--kv-quant", "per-token", "--attention-op", "edgeattn"],
     AttentionSpec(**RING, kv_cache="int4", kv_quant="per-token"), "SinkWindowAttention"),
    (["--block-size", "4", "--top-blocks", "2", "--sinks", "1", "--attention-op", "edgeattn"],
     AttentionSpec(block_size=4, top_blocks=2, sinks=1), "HierarchicalAttention"),
    (["--kv-cache", "int8", "--kv-quant", "per-token", "--attention-op", "edgeattn"],
     AttentionSpec(kv_cache="int8", kv_quant="per-token"), "QuantKVAttention"),
])
def test_cli_converts_forms_with_the_edgeattn_lowering(tmp_path, flags, spec, op):
    """`edgeattn convert --attention-op edgeattn` -> a folder EdgeLM generates from: its greedy tokens are
    PyTorch's."""
    from click.testing import CliRunner

    from edgeattn.cli import main

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["convert", "tiny-llama", "-o", str(out), *flags, "--max-length", "64", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["lowering"] == f"edgeattn (edgeattn.{op}) x 2 layers"
    prompt = list(range(60, 80))
    tokens = list(stream(EdgeLM.load(out), prompt, 24, stop_token_ids=[]))
    decoder = _rewritten("llama", spec)
    cache = decoder.new_cache(1, 64)
    expected, chunk = [], prompt
    with torch.no_grad():
        for _ in range(24):
            expected.append(int(decoder(torch.tensor([chunk]), cache)[0, -1].argmax()))
            chunk = [expected[-1]]
    assert tokens == expected


@pytest.mark.real_model
def test_smollm2_sink_window_generates_the_pytorch_greedy_tokens(tmp_path, smollm2_decoder, smollm2):
    """SmolLM2 with window 512 + 4 sinks through the edgeattn lowering: after a 600-token prompt (the ring of
    516 slots has wrapped) the 32 greedy tokens equal PyTorch's."""
    spec = AttentionSpec(window=512, sinks=4)
    rewrite(smollm2_decoder, spec)
    lowerings = choose_lowerings(smollm2_decoder, spec, "edgeattn", "cpu", 2048).layers
    assert {lowering.op_type for lowering in lowerings} == {"SinkWindowAttention"}
    folder = _folder(tmp_path, smollm2_decoder, lowerings, smollm2.tokenizer)
    prompt = calibration_ids(smollm2.tokenizer)[0, :600].tolist()
    assert len(prompt) == 600
    tokens = list(stream(EdgeLM.load(folder, threads=1), prompt, 32, stop_token_ids=[]))
    cache = smollm2_decoder.new_cache(1, 2048)
    expected, chunk = [], prompt
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one-token steps gain nothing from threads; on a busy machine they lose 10x
    try:
        with torch.no_grad():
            for _ in range(32):
                expected.append(int(smollm2_decoder(torch.tensor([chunk]), cache)[0, -1].argmax()))
                chunk = [expected[-1]]
    finally:
        torch.set_num_threads(threads)
    assert tokens == expected
