"""GGUF blocks carried into MatMulNBits / GatherBlockQuantized: exact against gguf's own dequantization.

The oracle is ``gguf.quants.dequantize`` (what transformers reads a GGUF with), never the code
under test; onnxruntime runs the written nodes on an identity input, so its output *is* the
weight it dequantizes.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize
from onnx import TensorProto, helper, numpy_helper

from edgeattn.convert import ConvertOptions, convert
from edgeattn.exporters import gguf_blocks
from edgeattn.exporters.gguf_weights import carry_gguf_blocks
from edgeattn.models import load
from edgeattn.models.tiny import tiny_hf_model
from edgeattn.runtimes import EdgeLM
from edgeattn.spec import AttentionSpec

# fp32 logits of the carried graph at accuracy_level 0 (float activations) vs PyTorch on the dequantized
# weights: summation order only (measured ~1e-6 on tiny-llama).
FP32_ROUNDING = 1e-4


def _random_blocks(type_name: str, rows: int, length: int, seed: int = 0) -> np.ndarray:
    """Raw GGUF rows [rows, bytes] of ``type_name``: random codes, realistic fp16 scales and minimums."""
    rng = np.random.default_rng(seed)
    elements, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    count = rows * length // elements
    raw = rng.integers(0, 256, size=(count, size), dtype=np.uint8)

    def put(offset, values):
        raw[:, offset:offset + 2] = values.astype(np.float16).reshape(-1, 1).view(np.uint8)

    scale = rng.uniform(1e-3, 0.05, count)
    if type_name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K"):
        put(0, scale)
    if type_name in ("Q4_1", "Q5_1"):
        put(2, -scale * rng.uniform(0, 16, count))
    if type_name in ("Q4_K", "Q5_K"):
        put(2, scale * rng.uniform(0.1, 2, count))
    if type_name == "Q6_K":
        put(208, scale)
    return raw.reshape(rows, -1)


def _write_gguf(path, tensors: dict[str, tuple[np.ndarray, str]]) -> None:
    """A GGUF holding ``{name: (raw rows or float32 array, type name)}`` and nothing else."""
    writer = GGUFWriter(str(path), "llama")
    for name, (data, type_name) in tensors.items():
        if type_name == "F32":
            writer.add_tensor(name, data.astype(np.float32))
        else:
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=GGMLQuantizationType[type_name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _weight_model(weight_RK: np.ndarray, op: str) -> ir.Model:
    """y = x @ weight^T (MatMul on the [K, R] layout the exporter writes) or y = weight[ids] (Gather)."""
    rows, length = weight_RK.shape
    if op == "MatMul":
        node = helper.make_node("MatMul", ["x", "W"], ["y"], name="matmul")
        init = numpy_helper.from_array(np.ascontiguousarray(weight_RK.T), "W")
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, length])]
    else:
        node = helper.make_node("Gather", ["W", "x"], ["y"], name="gather")
        init = numpy_helper.from_array(weight_RK, "W")
        inputs = [helper.make_tensor_value_info("x", TensorProto.INT64, [None])]
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [init])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                                  helper.make_opsetid("com.microsoft", 1)]))


def _run_dequantized(model: ir.Model, rows: int, length: int, op: str, accuracy_level: int | None = None):
    """The weight [R, K] the graph computes with: identity input (MatMul) or every row id (Gather)."""
    model = ir.to_proto(model)
    if accuracy_level is not None:
        for node in model.graph.node:
            if node.op_type == "MatMulNBits":
                next(a for a in node.attribute if a.name == "accuracy_level").i = accuracy_level
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    if op == "MatMul":
        return session.run(None, {"x": np.eye(length, dtype=np.float32)})[0].T
    return session.run(None, {"x": np.arange(rows, dtype=np.int64)})[0]


@pytest.mark.parametrize("type_name", sorted(gguf_blocks.SUPPORTED))
def test_decoded_blocks_reconstruct_gguf_dequantization_bit_for_bit(type_name):
    raw = _random_blocks(type_name, rows=6, length=512)
    expected = dequantize(raw, GGMLQuantizationType[type_name]).reshape(6, 512)
    rows = gguf_blocks.decode(raw, type_name, 512)
    assert rows.bits == gguf_blocks.SUPPORTED[type_name][0]
    assert rows.codes.min() >= -(1 << (rows.bits - 1)) and rows.codes.max() < (1 << (rows.bits - 1))
    np.testing.assert_array_equal(gguf_blocks.reconstruct(rows), expected)


def test_packed_codes_are_low_nibble_first_with_the_default_zero_point():
    rows = gguf_blocks.BlockRows(np.array([[-8, 7] * 16], np.int16), np.ones((1, 1), np.float32), None, 32, 4)
    assert gguf_blocks.pack(rows, 4)[0, 0, 0] == 0x0F << 4 | 0x00  # -8 + 8 = 0 low, 7 + 8 = 15 high
    assert gguf_blocks.pack(rows, 8)[0, 0, :2].tolist() == [120, 135]
    with pytest.raises(gguf_blocks.NotExact, match="do not fit"):
        gguf_blocks.pack(gguf_blocks.BlockRows(rows.codes, rows.scales, None, 32, 8), 4)


def test_an_inexact_shifted_minimum_is_refused():
    raw = _random_blocks("Q4_1", rows=1, length=32)
    raw[0, 0:2] = np.array([2.0 ** -24], np.float16).view(np.uint8)  # d: smallest subnormal
    raw[0, 2:4] = np.array([1000.0], np.float16).view(np.uint8)  # m: 2^34 times larger
    with pytest.raises(gguf_blocks.NotExact, match="not exact in float32"):
        gguf_blocks.decode(raw, "Q4_1", 32)


# Each type at each width it maps to exactly.
EXACT = [("Q4_0", "int4"), ("Q4_1", "int4"), ("Q8_0", "int8"), ("Q4_0", "int8"), ("Q4_1", "int8"), ("Q5_0", "source"),
         ("Q5_1", "source"), ("Q4_K", "int4"), ("Q5_K", "int8"), ("Q6_K", "source"), ("Q8_0", "source")]


@pytest.mark.parametrize("op", ["MatMul", "Gather"])
@pytest.mark.parametrize(("type_name", "weights"), EXACT)
def test_a_gguf_tensor_written_into_onnxruntime_dequantizes_to_gguf_floats(tmp_path, type_name, weights, op):
    rows, length = 48, 512
    raw = _random_blocks(type_name, rows, length)
    _write_gguf(tmp_path / "t.gguf", {"blk.0.ffn_up.weight": (raw, type_name)})
    expected = dequantize(raw, GGMLQuantizationType[type_name]).reshape(rows, length)
    model = _weight_model(expected, op)
    report = carry_gguf_blocks(model, tmp_path / "t.gguf", weights)
    (record,) = report.records
    bits = 4 if weights == "int4" or (weights == "source" and gguf_blocks.SUPPORTED[type_name][0] == 4) else 8
    assert record["path"] == "carried" and record["bits"] == bits and record["kind"] == "ffn_up"
    assert {node.op_type for node in model.graph} >= {"MatMulNBits" if op == "MatMul" else "GatherBlockQuantized"}
    assert "W" not in model.graph.initializers  # the float copy left the model
    exact = _run_dequantized(model, rows, length, op, accuracy_level=0)
    np.testing.assert_array_equal(exact, expected)
    if op == "MatMul":  # the shipped accuracy level 4 rounds the (identity) activations to int8 per block
        scale = np.abs(expected).max()  # measured: within 1.2e-6 of the largest weight, every type
        np.testing.assert_allclose(_run_dequantized(model, rows, length, op), expected, rtol=0, atol=2e-6 * scale)


def test_rows_permuted_and_packed_from_several_tensors_are_carried(tmp_path):
    """As llama's q/k (rows permuted by transformers) packed with v into one MatMul."""
    q_raw, v_raw = _random_blocks("Q4_1", 32, 64, seed=1), _random_blocks("Q8_0", 16, 64, seed=2)
    _write_gguf(tmp_path / "t.gguf", {"blk.0.attn_q.weight": (q_raw, "Q4_1"), "blk.0.attn_v.weight": (v_raw, "Q8_0")})
    q = dequantize(q_raw, GGMLQuantizationType.Q4_1).reshape(32, 64)
    v = dequantize(v_raw, GGMLQuantizationType.Q8_0).reshape(16, 64)
    permutation = np.random.default_rng(0).permutation(32)
    packed = np.concatenate([q[permutation], v])
    model = _weight_model(packed, "MatMul")
    (record,) = carry_gguf_blocks(model, tmp_path / "t.gguf", "source").records
    assert record["path"] == "carried" and record["bits"] == 8 and record["offsets"]  # Q4_1 minimums, 8-bit Q8_0
    assert record["kind"] == "attn_q+attn_v"
    np.testing.assert_array_equal(_run_dequantized(model, 48, 64, "MatMul", accuracy_level=0), packed)


@pytest.mark.parametrize(("weights", "reason"), [("int4", "8-bit codes have no exact 4-bit form")])
def test_a_wider_type_than_requested_is_left_to_the_quantizer(tmp_path, weights, reason):
    raw = _random_blocks("Q8_0", 16, 64)
    _write_gguf(tmp_path / "t.gguf", {"token_embd.weight": (raw, "Q8_0")})
    model = _weight_model(dequantize(raw, GGMLQuantizationType.Q8_0).reshape(16, 64), "MatMul")
    (record,) = carry_gguf_blocks(model, tmp_path / "t.gguf", weights).records
    assert record["path"] == "fallback" and record["reason"] == reason
    assert [node.op_type for node in model.graph] == ["MatMul"]


def test_a_rewritten_weight_is_not_carried(tmp_path):
    raw = _random_blocks("Q4_0", 16, 64)
    _write_gguf(tmp_path / "t.gguf", {"blk.0.attn_k.weight": (raw, "Q4_0")})
    weight = dequantize(raw, GGMLQuantizationType.Q4_0).reshape(16, 64)
    weight[3] = weight[3] * 0.5  # e.g. merged key heads: no longer the file's rows
    model = _weight_model(weight, "MatMul")
    (record,) = carry_gguf_blocks(model, tmp_path / "t.gguf", "int4").records
    assert record["path"] == "fallback" and record["reason"] == "1 of 16 rows are no GGUF tensor's rows (rewritten)"
    assert [node.op_type for node in model.graph] == ["MatMul"]


# -- a whole model: tiny-llama written to a GGUF, converted -------------------------------------

def _llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k row order (transformers undoes it when it reads the file)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_llama_gguf(path, layer_type: str = "Q4_1", embedding_type: str = "Q8_0") -> None:
    """tiny-llama (tied embedding) as llama.cpp would write it, with a byte-level GPT-2 tokenizer."""
    from tokenizers import pre_tokenizers

    hf = tiny_hf_model("llama")
    config = hf.config
    state = {name: tensor.detach().float().numpy() for name, tensor in hf.state_dict().items()}
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())[:255] + ["<|endoftext|>"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges([])
    writer.add_bos_token_id(255)
    writer.add_eos_token_id(255)

    def add(name, array, type_name):
        if type_name == "F32":
            writer.add_tensor(name, array.astype(np.float32))
        else:
            raw = quantize(array.astype(np.float32), GGMLQuantizationType[type_name])
            writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=GGMLQuantizationType[type_name])

    add("token_embd.weight", state["model.embed_tokens.weight"], embedding_type)
    add("output_norm.weight", state["model.norm.weight"], "F32")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for i in range(config.num_hidden_layers):
        hf_layer = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", state[hf_layer + "input_layernorm.weight"], "F32")
        add(f"blk.{i}.ffn_norm.weight", state[hf_layer + "post_attention_layernorm.weight"], "F32")
        add(f"blk.{i}.attn_q.weight", _llama_cpp_permute(state[hf_layer + "self_attn.q_proj.weight"], heads), layer_type)
        add(f"blk.{i}.attn_k.weight", _llama_cpp_permute(state[hf_layer + "self_attn.k_proj.weight"], kv_heads),
            layer_type)
        for gguf_name, hf_name in (("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                                   ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                                   ("ffn_down", "mlp.down_proj")):
            add(f"blk.{i}.{gguf_name}.weight", state[hf_layer + hf_name + ".weight"], layer_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama-q4_1.gguf"
    write_tiny_llama_gguf(path)
    return path


def _fp32_activations(folder, tmp_path):
    """A copy of ``folder`` whose MatMulNBits use float activations (accuracy_level 0)."""
    copy = tmp_path / "acc0"
    shutil.copytree(folder, copy)
    model = onnx.load(str(copy / "model.onnx"))
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            next(a for a in node.attribute if a.name == "accuracy_level").i = 0
    onnx.save(model, str(copy / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return copy


def _max_logit_error(folder, decoder, steps: int = 6) -> float:
    """Prefill + greedy decode in onnxruntime vs the PyTorch decoder, on the same tokens."""
    lm = EdgeLM.load(folder)
    lm.reset(1)
    ids = list(range(40, 72))
    errors = []
    chunk = ids
    with torch.no_grad():
        for _ in range(steps):
            expected = decoder(torch.tensor([ids]))[0, -1].numpy()
            actual = lm.forward(np.array([chunk]))[0]
            errors.append(float(np.abs(expected - actual).max()))
            chunk = [int(expected.argmax())]
            ids = ids + chunk
    return max(errors)


@pytest.mark.parametrize(("attention_op", "weights"), [("ort", "source"), ("edgeattn", "int8")])
def test_tiny_llama_from_a_gguf_matches_pytorch_on_the_dequantized_weights(tiny_gguf, tmp_path, attention_op, weights):
    folder = tmp_path / "out"
    manifest = convert(ConvertOptions(str(tiny_gguf), folder, weights=weights, attention_op=attention_op,
                                      max_length=64))
    gguf = manifest.weights.gguf
    assert gguf["paths"] == {"carried": len(gguf["weights"])}  # every weight, the tied head/embedding included
    assert manifest.weights.dtype == ("int4" if weights == "source" else "int8")
    histogram = manifest.op_histogram
    assert histogram["com.microsoft.GatherBlockQuantized"] == 1 and "Gather" not in histogram
    decoder = load(str(tiny_gguf)).decoder  # what transformers dequantized
    assert _max_logit_error(_fp32_activations(folder, tmp_path), decoder) <= FP32_ROUNDING
    assert manifest.numerics["weights"]["kl_mean"] < 1e-3  # int8 activations (accuracy level 4) only


@pytest.mark.parametrize(("gqa_method", "rewritten"), [("mean", 4), ("calibrated", 8)])
def test_tiny_llama_mqa_carries_what_the_rewrite_left_unchanged(tiny_gguf, tmp_path, gqa_method, rewritten):
    """Mean-merged MQA rewrites k and v; the calibrated fit also refits q and o (RoPE-consistent keys, W_o)."""
    manifest = convert(ConvertOptions(str(tiny_gguf), tmp_path / "out", AttentionSpec(kv_heads=1, gqa_method=gqa_method),
                                      weights="int4", attention_op="edgeattn", max_length=64))
    kinds = manifest.weights.gguf["kinds"]
    kept = ("attn_q", "attn_output", "ffn_gate", "ffn_up", "ffn_down") if gqa_method == "mean" else ("ffn_gate", "ffn_up",
                                                                                                    "ffn_down")
    for kind in kept:
        assert kinds[kind]["paths"] == {"carried": 2}, kind
    assert kinds["not in the GGUF"]["paths"] == {"requantized": rewritten}  # both layers
    assert kinds["token_embd"]["paths"] == {"requantized": 2}  # Q8_0 at 4 bits: the quantizer's codes, shared
    assert manifest.numerics["passed"]


def test_weights_source_needs_a_gguf(tmp_path):
    from click.testing import CliRunner

    from edgeattn.cli import main

    result = CliRunner().invoke(main, ["convert", "tiny-llama", "-o", str(tmp_path / "out"), "--weights", "source"])
    assert result.exit_code == 2
    assert "--weights source keeps a GGUF's own quantization" in result.output
    assert not (tmp_path / "out").exists()


# -- the real model --------------------------------------------------------------------------------

# SmolLM2-135M's GGUF: 210 Q4_1 layer weights, a Q8_0 tied embedding, all carried by --weights source.
# Against PyTorch on the dequantized weights, validate --prefill 1 --prompts 2 on WikiText-2 test measured
#   --steps 511 (1024 tokens, this test): ppl +0.44%, top-1 0.968, KL 0.0030 (the int8 activations of
#   MatMulNBits' accuracy level 4 are all that differ);
#   --steps 2047 (4094 tokens, docs/convert.md): ppl +0.40%, top-1 0.968, KL 0.0028.
MIN_TOP1, MAX_PPL_DELTA, MAX_KL = 0.95, 0.01, 0.01


@pytest.mark.real_model
@pytest.mark.wikitext
def test_smollm2_from_its_gguf_stays_close_to_the_dequantized_model(tmp_path):
    from edgeattn.evaluation.validate import ValidateOptions, validate
    from tests.conftest import wikitext_or_skip

    text = wikitext_or_skip("test")
    folder = tmp_path / "out"
    manifest = convert(ConvertOptions("smollm2", folder, weights="source"))
    assert manifest.weights.gguf["paths"] == {"carried": 152}, json.dumps(manifest.weights.gguf["kinds"])
    report = validate(ValidateOptions(folder, text=text, prompts=2, prefill=1, steps=511, greedy_tokens=8))
    (export,) = [c for c in report["comparisons"] if c["name"] == "export:cpu"]
    metrics = export["metrics"]
    assert metrics["top1_agreement"] >= MIN_TOP1, metrics
    assert metrics["ppl_delta_relative"] <= MAX_PPL_DELTA, metrics
    assert metrics["kl_mean"] <= MAX_KL, metrics
