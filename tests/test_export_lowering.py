"""What ``--attention-op auto`` picks for each spec, spelled out by hand (not derived from the code), and what
the manifest records about the choice."""

from __future__ import annotations

import onnx
import pytest

from edgeattn.convert import ConvertOptions, convert
from edgeattn.evaluation.calibration import calibration_ids, calibration_tokens
from edgeattn.exporters.edgeattn_ops import HierarchicalLowering, QuantKVLowering, SinkWindowLowering
from edgeattn.exporters.lowering import LoweringError, choose_lowerings
from edgeattn.exporters.lowering_contract import AttentionLowering, CacheLayout
from edgeattn.exporters.onnx_attention import FullCacheLowering
from edgeattn.exporters.onnx_hierarchical import HierarchicalAttentionLowering
from edgeattn.exporters.onnx_quant_cache import QuantCacheLowering
from edgeattn.exporters.onnx_ring import CodecRingLowering, RingAttentionLowering
from edgeattn.exporters.ort_gqa import GroupQueryAttentionLowering
from edgeattn.models import load
from edgeattn.rewrites import rewrite
from edgeattn.spec import AttentionSpec

MAX_LENGTH = 64

# (family, spec, provider) -> the lowering auto must choose. Order of preference: ort > onnx > edgeattn.
AUTO_TABLE = [
    ("llama", AttentionSpec(), "cpu", "ort"),
    ("llama", AttentionSpec(kv_heads=1), "cpu", "ort"),
    ("llama", AttentionSpec(window=16), "cpu", "ort"),  # GQA's local_window_size + window-sized cache
    ("llama", AttentionSpec(kv_cache="int8"), "cpu", "ort"),  # per-channel: GQA's quantized cache
    ("llama", AttentionSpec(kv_cache="int4"), "cpu", "ort"),
    ("llama", AttentionSpec(kv_cache="int4"), "cuda", "onnx"),  # CUDA GQA int4 is prompt-only; onnx: decoded codes
    ("llama", AttentionSpec(kv_cache="fp16"), "cpu", "onnx"),  # GQA has no fp16 cache beside fp32
    ("llama", AttentionSpec(kv_heads=1, kv_cache="fp16"), "cpu", "onnx"),
    ("llama", AttentionSpec(window=16, sinks=4), "cpu", "onnx"),  # sinks: the ring on standard ops
    ("llama", AttentionSpec(window=16, kv_cache="int8"), "cpu", "onnx"),  # GQA quantizes rotated keys
    ("llama", AttentionSpec(window=16, kv_cache="fp16"), "cpu", "onnx"),
    ("llama", AttentionSpec(kv_cache="int8", kv_quant="per-token"), "cpu", "onnx"),  # GQA: per channel only
    ("llama", AttentionSpec(block_size=8, top_blocks=2), "cpu", "onnx"),  # block summaries in the cache
    ("llama", AttentionSpec(block_size=8, top_blocks=2, kv_cache="fp16"), "cpu", "edgeattn"),
    ("llama", AttentionSpec(block_size=8, top_blocks=2, sinks=2, kv_cache="int4", kv_quant="per-token"), "cpu",
     "edgeattn"),
    ("qwen2", AttentionSpec(kv_heads=1, window=16, sinks=4, kv_cache="int8"), "cpu", "onnx"),
    ("gpt2", AttentionSpec(), "cpu", "onnx"),  # learned positions: no GQA rotary
    ("gpt2", AttentionSpec(kv_cache="fp16"), "cpu", "onnx"),
    ("gpt2", AttentionSpec(window=16), "cpu", "onnx"),
    ("gpt2", AttentionSpec(kv_cache="int8"), "cpu", "onnx"),
]


def _rewritten(family: str, spec: AttentionSpec):
    model = load(f"tiny-{family}")
    rewrite(model.decoder, spec, calibration_ids(model.tokenizer, None, calibration_tokens(spec)))
    return model.decoder


@pytest.mark.parametrize(("family", "spec", "provider", "expected"), AUTO_TABLE)
def test_auto_picks_the_fastest_exact_lowering(family, spec, provider, expected):
    choice = choose_lowerings(_rewritten(family, spec), spec, "auto", provider, MAX_LENGTH)
    assert choice.name == expected
    assert [layer.name for layer in choice.layers] == [expected, expected]
    assert set(choice.not_chosen) == {"ort", "onnx", "edgeattn"} - {expected}


@pytest.mark.parametrize(("spec", "op", "expected_op"), [
    (AttentionSpec(window=8, sinks=2), "auto", "Attention"),
    (AttentionSpec(window=8, sinks=2), "edgeattn", "edgeattn.SinkWindowAttention"),
    (AttentionSpec(block_size=4, top_blocks=2), "auto", "Attention"),
    (AttentionSpec(block_size=4, top_blocks=2), "edgeattn", "edgeattn.HierarchicalAttention"),
    (AttentionSpec(kv_cache="int8", kv_quant="per-token"), "auto", "Attention"),
    (AttentionSpec(kv_cache="int8", kv_quant="per-token"), "edgeattn", "edgeattn.QuantKVAttention"),
    (AttentionSpec(), "edgeattn", "edgeattn.QuantKVAttention"),
    (AttentionSpec(window=8), "onnx", "Attention"),
    (AttentionSpec(), "auto", "com.microsoft.GroupQueryAttention"),
])
def test_each_layer_gets_the_op_of_its_form(spec, op, expected_op):
    choice = choose_lowerings(_rewritten("llama", spec), spec, op, "cpu", MAX_LENGTH)
    assert choice.to_dict()["op_per_layer"] == [expected_op, expected_op]


@pytest.mark.parametrize(("spec", "op", "expected_class"), [
    (AttentionSpec(), "ort", GroupQueryAttentionLowering),
    (AttentionSpec(), "onnx", FullCacheLowering),
    (AttentionSpec(kv_cache="int8", kv_quant="per-token"), "onnx", QuantCacheLowering),
    (AttentionSpec(window=8, sinks=2), "onnx", RingAttentionLowering),
    (AttentionSpec(window=8, kv_cache="fp16"), "onnx", CodecRingLowering),
    (AttentionSpec(block_size=4, top_blocks=2), "onnx", HierarchicalAttentionLowering),
    (AttentionSpec(window=8, sinks=2), "edgeattn", SinkWindowLowering),
    (AttentionSpec(), "edgeattn", QuantKVLowering),
    (AttentionSpec(block_size=4, top_blocks=2), "edgeattn", HierarchicalLowering),
])
def test_every_lowering_class_meets_the_contract(spec, op, expected_class):
    layer = choose_lowerings(_rewritten("llama", spec), spec, op, "cpu", MAX_LENGTH).layers[0]
    assert type(layer) is expected_class and isinstance(layer, AttentionLowering)
    assert isinstance(layer.name, str) and isinstance(layer.domain, str) and isinstance(layer.op_type, str)
    assert isinstance(layer.opset, int) and isinstance(layer.inline_functions, bool)
    assert isinstance(layer.cache_layout(), CacheLayout)
    assert all(isinstance(function, onnx.FunctionProto) for function in layer.functions())


def test_cache_layout_fills_the_manifest_entries():
    ring = CacheLayout(kv_heads=2, capacity=12, row_width=16, dtype="float32", ring=True, max_positions=None)
    expected = {"capacity": 12, "dtype": "float32", "shape_tail": [2, 12, 16], "ring": True, "max_positions": None}
    assert ring.manifest() == expected and list(ring.manifest()) == list(expected)  # same keys, same order
    full = CacheLayout(kv_heads=3, capacity=64, row_width=36, dtype="uint8", ring=False, max_positions=64)
    assert full.manifest() == {"capacity": 64, "dtype": "uint8", "shape_tail": [3, 64, 36], "ring": False,
                               "max_positions": 64}
    hierarchical = CacheLayout(kv_heads=1, capacity=80, row_width=16, dtype="float32", ring=False, max_positions=64,
                               tokens=64, keys_read=42, summary_rows=16)
    assert hierarchical.manifest() == {"capacity": 80, "dtype": "float32", "shape_tail": [1, 80, 16], "ring": False,
                                       "max_positions": 64, "tokens": 64, "keys_read": 42, "summary_rows": 16}


def test_an_explicit_lowering_that_cannot_represent_the_spec_says_why():
    spec = AttentionSpec(block_size=4, top_blocks=2, kv_cache="int8", kv_quant="per-token")
    with pytest.raises(LoweringError, match=r"^no attention lowering represents this spec exactly: onnx: .*hierarch"):
        choose_lowerings(_rewritten("llama", spec), spec, "onnx", "cpu", MAX_LENGTH)
    with pytest.raises(LoweringError, match="attention op must be one of"):
        choose_lowerings(_rewritten("llama", spec), spec, "fastest", "cpu", MAX_LENGTH)


def test_manifest_records_the_choice_and_why_the_others_were_not_used(tmp_path):
    manifest = convert(ConvertOptions("tiny-gpt2", tmp_path / "out", max_length=MAX_LENGTH))
    lowering = manifest.lowering
    assert lowering.requested == "auto" and lowering.chosen == "onnx"
    assert lowering.per_layer == ["onnx", "onnx"] and lowering.op_per_layer == ["Attention", "Attention"]
    assert "rotary" in lowering.not_chosen["ort"]
    assert lowering.not_chosen["edgeattn"].startswith("slower than onnx")
    assert manifest.opset == 24 and manifest.numerics["passed"]


@pytest.mark.parametrize(("spec", "expected"), [
    (AttentionSpec(), "ort"), (AttentionSpec(kv_cache="fp16"), "onnx"), (AttentionSpec(window=8, sinks=2), "onnx")])
def test_cuda_provider_runs_the_folder_on_device_buffers(tmp_path, spec, expected):
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        pytest.skip(f"CUDAExecutionProvider is not in this onnxruntime build ({', '.join(available)})")
    import torch

    from edgeattn.runtimes import EdgeLM

    manifest = convert(ConvertOptions("tiny-llama", tmp_path / "out", spec, provider="cuda", max_length=MAX_LENGTH))
    assert manifest.lowering.chosen == expected and manifest.numerics["passed"]
    lm = EdgeLM.load(tmp_path / "out", provider="cuda")
    lm.reset(1)
    assert lm.provider == "cuda" and lm._caches[0]["key"].device_name() == "cuda"
    decoder = _rewritten("llama", spec)
    cache = decoder.new_cache(1, MAX_LENGTH)
    chunk = list(range(40, 60))
    with torch.no_grad():
        for _ in range(16):
            expected_logits = decoder(torch.tensor([chunk]), cache)[0, -1].numpy()
            actual = lm.forward(torch.tensor([chunk]).numpy())[0]
            assert actual.argmax() == expected_logits.argmax()
            chunk = [int(expected_logits.argmax())]
