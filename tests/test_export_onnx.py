"""Export with the standard-ONNX lowering (Attention + RotaryEmbedding + TensorScatter), run in onnxruntime,
compare with the rewritten PyTorch model; check the shared cache buffer against hand-computed keys. (The ring
a window leaves as is tested in test_export_onnx_ring.py.)"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from edgeattn.convert import ConvertOptions, convert
from edgeattn.evaluation.calibration import calibration_ids, calibration_tokens
from edgeattn.exporters.checks import op_histogram
from edgeattn.exporters.lowering import LoweringError, choose_lowerings
from edgeattn.models import load
from edgeattn.rewrites import rewrite
from edgeattn.runtimes import ContextFullError, EdgeLM
from edgeattn.spec import AttentionSpec
from tests.onnx_vs_torch import compare, random_ids

ONNX_VS_TORCH = 1e-4  # fp32 max-abs logit difference, prefill + every decode step (issue contract)
DECODE_STEPS = 32
MAX_LENGTH = 96

ONNX_SPECS = {
    "identity": AttentionSpec(),
    "window": AttentionSpec(window=12),
    "mqa-fp16": AttentionSpec(kv_heads=1, kv_cache="fp16"),
    "mqa-window": AttentionSpec(kv_heads=1, window=12),
    "mqa-window-fp16": AttentionSpec(kv_heads=1, window=12, kv_cache="fp16"),
    "kv-int8-token": AttentionSpec(kv_cache="int8", kv_quant="per-token"),
    "kv-int4-token": AttentionSpec(kv_cache="int4", kv_quant="per-token"),
    "mqa-kv-int4": AttentionSpec(kv_heads=1, kv_cache="int4"),
    "kv-int4-token-r8": AttentionSpec(kv_cache="int4", kv_quant="per-token", kv_residual=8),
    "kv-int8-token-r50": AttentionSpec(kv_cache="int8", kv_quant="per-token", kv_residual=50),
}
# Every form on llama; the identity and a combination on every other family (GPT-2: learned positions).
CASES = [("llama", name) for name in sorted(ONNX_SPECS)] + [
    (family, name) for family in ("mistral", "phi3", "qwen2") for name in ("identity", "mqa-window")] + [
    ("gpt2", "identity"), ("gpt2", "mqa-window-fp16"), ("gpt2", "kv-int8-token"), ("qwen2", "kv-int4-token"),
    ("gpt2", "kv-int4-token-r8"), ("qwen2", "kv-int4-token-r8")]


def _spec(family: str, name: str) -> AttentionSpec:
    spec = ONNX_SPECS[name]
    if spec.kv_heads is not None and family == "phi3":  # tiny phi3 has 4 kv heads: merge to 2
        spec = AttentionSpec(**{**spec.to_dict(), "kv_heads": 2})
    return spec


@pytest.fixture
def case(converted):
    """(folder, manifest, spec) of tiny-``family`` with ONNX_SPECS[name] through convert --attention-op onnx
    (converted once per session)."""
    def get(family: str, name: str):
        spec = _spec(family, name)
        return *converted(f"tiny-{family}", spec, attention_op="onnx", max_length=MAX_LENGTH), spec

    return get


def _rewritten_decoder(family: str, spec: AttentionSpec):
    model = load(f"tiny-{family}")
    rewrite(model.decoder, spec, calibration_ids(model.tokenizer, None, calibration_tokens(spec)))
    return model.decoder


@pytest.mark.parametrize(("family", "name"), CASES)
def test_onnx_lowering_matches_pytorch(case, family, name):
    """Prefill 40, 32 greedy decode steps (the 12-token windows slide far), a 7-token chunk, one more step.
    int8/int4 caches hold the codes edgeattn's codecs write, equal to PyTorch's fake-quantized cache."""
    folder, manifest, spec = case(family, name)
    decoder = _rewritten_decoder(family, spec)
    chunks = [random_ids(1, 40, 0)] + [None] * DECODE_STEPS + [random_ids(1, 7, 1), None]
    worst, torch_tokens, ort_tokens = compare(folder, decoder, chunks, MAX_LENGTH)
    assert worst < ONNX_VS_TORCH
    assert torch_tokens == ort_tokens
    assert manifest.lowering.per_layer == ["onnx", "onnx"]
    assert manifest.opset == (23 if spec.window else 24)  # the ring needs no opset-24 op
    assert manifest.kv_cache.ring == (spec.window is not None)


def test_batched_prefill_and_decode(case):
    folder, _, spec = case("llama", "mqa-fp16")
    decoder = _rewritten_decoder("llama", spec)
    chunks = [random_ids(3, 9, 2), None, random_ids(3, 4, 3), None, None]
    worst, torch_tokens, ort_tokens = compare(folder, decoder, chunks, MAX_LENGTH, batch=3)
    assert worst < ONNX_VS_TORCH and torch_tokens == ort_tokens


@pytest.mark.parametrize("name", ["identity", "kv-int4-token"])
def test_graph_is_standard_onnx_with_one_attention_per_layer(case, name):
    folder, manifest, _ = case("llama", name)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    histogram = op_histogram(model)
    assert {entry.domain: entry.version for entry in model.opset_import} == {"": 24}
    assert not model.functions  # the codec functions are inlined: standard ops only
    assert histogram["Attention"] == 2
    assert histogram["RotaryEmbedding"] == 4  # q and k of each layer
    assert histogram["TensorScatter"] == 4  # key and value cache of each layer
    assert histogram["RMSNormalization"] == 5
    assert "Softmax" not in histogram
    assert manifest.lowering.norm_fusion == "standard"  # no onnxruntime-only fusions in a portable graph
    assert manifest.op_histogram == histogram


def test_cache_buffer_holds_the_rotated_keys_at_their_positions(case):
    """Prefill 5 + decode 1 through the shared buffers: slots 0..5 hold layer-0 keys rotated by RoPE
    (written out below with numpy), every later slot is still zero."""
    folder, manifest, spec = case("llama", "identity")
    decoder = _rewritten_decoder("llama", spec)
    ids = random_ids(1, 6, 4)
    lm = EdgeLM.load(folder, threads=1)
    lm.reset(1)
    lm.forward(ids[:, :5].numpy())
    lm.forward(ids[:, 5:].numpy())
    buffer = lm._caches[0]["key"].numpy()[0]  # [Hkv, C, D]
    attn = decoder.attentions()[0]
    with torch.no_grad():
        keys = attn.k_proj(decoder.blocks[0].attn_norm(decoder.embed(ids)))[0].numpy()  # [6, Hkv*D]
    keys = keys.reshape(6, attn.num_kv_heads, attn.head_dim).transpose(1, 0, 2)  # [Hkv, 6, D]
    half = attn.head_dim // 2
    inv_freq = 10000.0 ** (-np.arange(half) * 2 / attn.head_dim)  # tiny llama: rope_theta 10000
    angles = np.arange(6)[:, None] * inv_freq  # [6, D/2]
    cos, sin = np.cos(angles), np.sin(angles)
    first, second = keys[..., :half], keys[..., half:]
    rotated = np.concatenate([first * cos - second * sin, second * cos + first * sin], -1)
    np.testing.assert_allclose(buffer[:, :6], rotated, atol=1e-5)
    assert not buffer[:, 6:].any()
    assert buffer.shape == (2, MAX_LENGTH, 16) and manifest.kv_cache.capacity == MAX_LENGTH


def test_fp16_cache_buffers_cost_two_bytes_per_value(case):
    folder, manifest, _ = case("llama", "mqa-fp16")
    kv = manifest.kv_cache
    assert kv.dtype == "float16" and kv.shape_tail == [1, MAX_LENGTH, 16]
    assert kv.bytes_per_token == 2 * 2 * 1 * 16 * 2  # layers x (k, v) x kv heads x head dim x 2 bytes
    lm = EdgeLM.load(folder)
    lm.reset(1)
    assert lm._caches[0]["key"].data_type() == "tensor(float16)"


def test_full_cache_stops_with_a_clear_error(case):
    folder, _, _ = case("llama", "kv-int8-token")
    lm = EdgeLM.load(folder)
    lm.reset(1)
    lm.forward(np.zeros((1, MAX_LENGTH - 1), dtype=np.int64))
    with pytest.raises(ContextFullError, match=f"capacity {MAX_LENGTH}"):
        lm.forward(np.zeros((1, 2), dtype=np.int64))


def test_quantized_cache_buffers_hold_the_codec_rows(case):
    """int4 per token, head_dim 16: 8 bytes of codes + 2 fp16 parameters per row, the bytes the manifest counts."""
    folder, manifest, _ = case("llama", "kv-int4-token")
    kv = manifest.kv_cache
    assert kv.dtype == "uint8" and kv.shape_tail == [2, MAX_LENGTH, 8 + 2 * 2]
    assert kv.bytes_per_token == 2 * 2 * 2 * 12  # layers x (k, v) x kv heads x row bytes


def test_residual_window_holds_the_last_tokens_at_full_precision(case):
    """After a 13-token prefill and 2 decode steps, each layer's residual buffers hold the rotated keys and the
    values of positions 7..14 as PyTorch computes them, unquantized; the manifest counts them apart."""
    folder, manifest, spec = case("llama", "kv-int4-token-r8")
    decoder = _rewritten_decoder("llama", spec)
    ids = random_ids(1, 15, 5)
    lm = EdgeLM.load(folder, threads=1)
    lm.reset(1)
    cache = decoder.new_cache(1, MAX_LENGTH)
    with torch.no_grad():
        for chunk in (ids[:, :13], ids[:, 13:14], ids[:, 14:]):
            lm.forward(chunk.numpy())
            decoder(chunk, cache)
    for layer, layer_cache in enumerate(cache.layers):  # the model's cache keeps full-precision rows
        np.testing.assert_allclose(lm._caches[layer]["key_residual"].numpy(), layer_cache.keys[:, :, 7:15].numpy(),
                                   rtol=0, atol=1e-5)
        np.testing.assert_allclose(lm._caches[layer]["value_residual"].numpy(),
                                   layer_cache.values[:, :, 7:15].numpy(), rtol=0, atol=1e-5)
    kv = manifest.kv_cache
    assert kv.residual_tokens == 8 and kv.kinds == ("key", "value", "key_residual", "value_residual")
    assert kv.extra_buffers == [{"kind": "key_residual", "dtype": "float32", "shape_tail": [2, 8, 16]},
                                {"kind": "value_residual", "dtype": "float32", "shape_tail": [2, 8, 16]}]
    assert kv.residual_bytes == 2 * 2 * 2 * 8 * 16 * 4  # layers x (k, v) x kv heads x tokens x head dim x 4
    assert kv.bytes_per_token == 2 * 2 * 2 * 12  # the codes, as without the window
    assert kv.bytes_at_capacity == kv.bytes_per_token * MAX_LENGTH + kv.residual_bytes


def test_a_residual_window_is_refused_by_the_edgeattn_ops_and_chosen_onnx_by_auto(tmp_path):
    spec = AttentionSpec(kv_cache="int4", kv_quant="per-token", kv_residual=4)
    with pytest.raises(LoweringError, match="edgeattn: a residual window"):
        convert(ConvertOptions("tiny-llama", tmp_path / "out", spec, attention_op="edgeattn", max_length=32))
    decoder = _rewritten_decoder("llama", spec)
    choice = choose_lowerings(decoder, spec, "auto", "cpu", 32)
    assert choice.name == "onnx" and "residual" in choice.not_chosen["edgeattn"]


def test_hierarchical_attention_with_a_quantized_cache_is_refused(tmp_path):
    with pytest.raises(LoweringError, match="onnx: hierarchical attention with an int8 KV cache"):
        convert(ConvertOptions("tiny-llama", tmp_path / "out", AttentionSpec(block_size=8, top_blocks=2, kv_cache="int8"),
                               attention_op="onnx", max_length=MAX_LENGTH))
    assert not (tmp_path / "out").exists()
