"""Hierarchical attention on standard ONNX ops (``onnx_hierarchical``): exported, run in onnxruntime and compared
with the rewritten PyTorch model (whose block choices ``test_reference_tables`` spells out by hand); every block
kept is full attention; chunked prefill is token-by-token decode; the block summaries in the cache are the
per-channel max/min of each block's keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeattn.convert import ConvertOptions, convert
from edgeattn.evaluation.calibration import calibration_ids, calibration_tokens
from edgeattn.exporters.onnx_attention import lowering_for
from edgeattn.exporters.onnx_hierarchical import HierarchicalAttentionLowering
from edgeattn.models import load
from edgeattn.rewrites import rewrite
from edgeattn.runtimes import EdgeLM
from edgeattn.runtimes.session import ContextFullError
from edgeattn.spec import AttentionSpec
from tests.minimal_folder import exported_folder
from tests.onnx_vs_torch import compare, random_ids

ONNX_VS_TORCH = 1e-4  # fp32 max-abs logit difference, prefill + every decode step
SPARSE_VS_FULL = 1e-2  # the selection must change the logits by more than this, or the cases test nothing
MAX_LENGTH = 96
DECODE_STEPS = 32

CASES = {
    "llama": ("llama", AttentionSpec(block_size=4, top_blocks=2)),
    "llama-sinks-window": ("llama", AttentionSpec(block_size=4, top_blocks=3, sinks=2, window=6)),
    "llama-mass": ("llama", AttentionSpec(block_size=8, top_blocks=4, block_mass=0.6, window=12, sinks=1)),
    "mistral-uneven-blocks": ("mistral", AttentionSpec(block_size=5, top_blocks=2, sinks=1)),  # 96 = 19 blocks + 1
    "phi3-gqa": ("phi3", AttentionSpec(kv_heads=2, block_size=4, top_blocks=3)),
    "qwen2-mqa": ("qwen2", AttentionSpec(kv_heads=1, block_size=4, top_blocks=2, sinks=3)),  # q/k/v biases
    "gpt2": ("gpt2", AttentionSpec(block_size=4, top_blocks=2, sinks=2)),  # learned positions: nothing rotates
    # Blocks chosen per kv head: 2 query heads share each choice (llama), all 4 (qwen2 as MQA).
    "llama-kv-head": ("llama", AttentionSpec(block_size=4, top_blocks=2, sinks=1, window=6, block_select="kv-head")),
    "qwen2-mqa-kv-head-mass": ("qwen2", AttentionSpec(kv_heads=1, block_size=8, top_blocks=4, block_mass=0.6, window=12,
                                                      block_select="kv-head")),
}


def _rewritten(family: str, spec: AttentionSpec):
    model = load(f"tiny-{family}")
    rewrite(model.decoder, spec, calibration_ids(model.tokenizer, None, calibration_tokens(spec)))
    return model


@pytest.fixture
def hierarchical(exported):
    """The folder, decoder and lowerings of tiny-``family`` with ``spec`` and the onnx lowering (exported once per
    session)."""
    def get(family: str, spec: AttentionSpec):
        folder, decoder, lowerings = exported(family, spec, lowering_for, MAX_LENGTH)
        assert all(isinstance(lowering, HierarchicalAttentionLowering) for lowering in lowerings)
        return folder, decoder, lowerings

    return get


@pytest.mark.parametrize("name", sorted(CASES))
def test_hierarchical_matches_pytorch(hierarchical, name):
    """Prefill 40, 32 greedy decode steps, a 13-token chunk, one more step: every logit within 1e-4 of PyTorch's,
    and far from full attention's on the same tokens (the selection is not a no-op)."""
    family, spec = CASES[name]
    folder, decoder, _ = hierarchical(family, spec)
    chunks = [random_ids(1, 40, 0)] + [None] * DECODE_STEPS + [random_ids(1, 13, 1), None]
    worst, torch_tokens, ort_tokens = compare(folder, decoder, chunks, MAX_LENGTH)
    assert worst < ONNX_VS_TORCH
    assert torch_tokens == ort_tokens
    fixed = [random_ids(1, 40, 0)] + [random_ids(1, 1, seed) for seed in range(2, 2 + DECODE_STEPS)]
    full = load(f"tiny-{family}").decoder if spec.kv_heads is None else _rewritten(family, AttentionSpec(
        kv_heads=spec.kv_heads)).decoder
    vs_full, _, _ = compare(folder, full, fixed, MAX_LENGTH)
    assert vs_full > SPARSE_VS_FULL


@pytest.mark.parametrize("name", ["llama-sinks-window", "llama-kv-head"])
def test_hierarchical_batch_of_two_matches_pytorch(hierarchical, name):
    family, spec = CASES[name]
    folder, decoder, _ = hierarchical(family, spec)
    chunks = [random_ids(2, 30, 3)] + [None] * 12 + [random_ids(2, 9, 4)]
    worst, torch_tokens, ort_tokens = compare(folder, decoder, chunks, MAX_LENGTH, batch=2)
    assert worst < ONNX_VS_TORCH
    assert torch_tokens == ort_tokens


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_keeping_every_block_is_full_attention(hierarchical, family):
    """top_blocks >= the blocks of the cache: the exported model equals the unrewritten one within 1e-4."""
    folder, _, _ = hierarchical(family, AttentionSpec(block_size=4, top_blocks=MAX_LENGTH // 4))
    chunks = [random_ids(1, 37, 5)] + [None] * 24 + [random_ids(1, 11, 6)] + [None] * 4
    worst, torch_tokens, ort_tokens = compare(folder, load(f"tiny-{family}").decoder, chunks, MAX_LENGTH)
    assert worst < ONNX_VS_TORCH
    assert torch_tokens == ort_tokens


def test_kv_head_selection_is_not_query_head_selection(hierarchical):
    """The kv-head case's folder against the PyTorch model that selects per query head: far apart, so the
    kv-head cases above test the shared choice, not a relabelled per-head one."""
    family, spec = CASES["llama-kv-head"]
    folder, _, _ = hierarchical(family, spec)
    per_query_head = _rewritten(family, AttentionSpec(**{**spec.to_dict(), "block_select": "query-head"})).decoder
    chunks = [random_ids(1, 40, 0)] + [random_ids(1, 1, seed) for seed in range(2, 2 + DECODE_STEPS)]
    worst, _, _ = compare(folder, per_query_head, chunks, MAX_LENGTH)
    assert worst > SPARSE_VS_FULL


@pytest.mark.parametrize("name", ["llama-sinks-window", "llama-mass", "llama-kv-head"])
def test_chunked_prefill_equals_token_by_token_decode(hierarchical, name):
    """The same 70 tokens fed whole, token by token, and in uneven chunks: the logits after each shared prefix
    agree within 1e-4 (the dense chunk branch selects what the sparse decode branch does)."""
    folder, _, _ = hierarchical(*CASES[name])
    tokens = random_ids(1, 70, 7).numpy()
    lm = EdgeLM.load(folder, threads=1)

    def run(sizes: list[int]) -> dict[int, np.ndarray]:
        lm.reset(1)
        logits, start = {}, 0
        for size in sizes:
            logits[start + size] = lm.forward(tokens[:, start:start + size])
            start += size
        return logits

    one_by_one = run([1] * 70)
    for sizes in ([70], [17, 1, 1, 25, 3, 23], [9, 9, 9, 9, 9, 9, 9, 7]):
        for end, logits in run(sizes).items():
            np.testing.assert_allclose(logits, one_by_one[end], atol=ONNX_VS_TORCH, rtol=0)


def test_block_summaries_are_the_max_and_min_of_each_blocks_keys(hierarchical):
    """After a 21-token prompt and 30 decode steps (T = 51, block 5): row b of the block_bounds buffer holds the
    per-channel max of block b's key rows, then minus their min, the open block included."""
    family, spec = CASES["mistral-uneven-blocks"]
    folder, _, lowerings = hierarchical(family, spec)
    layer = lowerings[0]
    lm = EdgeLM.load(folder, threads=1)
    lm.reset(1)
    lm.forward(random_ids(1, 21, 8).numpy())
    for seed in range(30):
        lm.forward(random_ids(1, 1, 100 + seed).numpy())
    total, block, rows = 51, layer.block_size, layer.rows
    assert (layer.blocks, rows) == (20, 100)  # 19.2 blocks of tokens -> 20 blocks of rows
    for cache in lm._caches:
        keys = cache["key"].numpy()[0]  # [Hkv, C, D]
        bounds = cache["block_bounds"].numpy()[0]  # [Hkv, NB, 2D]
        dim = keys.shape[2]
        block_max, block_min = bounds[..., :dim], -bounds[..., dim:]
        assert keys.shape[1] == rows and bounds.shape[1:] == (layer.blocks, 2 * dim)
        for b in range(-(-total // block)):
            written = keys[:, b * block:min((b + 1) * block, total)]
            np.testing.assert_array_equal(block_max[:, b], written.max(axis=1))
            np.testing.assert_array_equal(block_min[:, b], written.min(axis=1))


def test_convert_records_the_budget_and_refuses_a_full_cache(tmp_path):
    """auto picks the onnx lowering; the manifest says how many keys a decode step reads and how many tokens the
    cache holds, and the block bounds beside key and value; the runtime stops at that many tokens."""
    spec = AttentionSpec(block_size=8, top_blocks=3, sinks=2, window=16)
    manifest = convert(ConvertOptions("tiny-llama", tmp_path / "out", spec, max_length=MAX_LENGTH))
    assert manifest.lowering.chosen == "onnx"
    assert not any(op.startswith("edgeattn") for op in manifest.op_histogram)
    assert {"TopK", "Gather", "Attention"} <= set(manifest.op_histogram)
    kv = manifest.kv_cache
    assert kv.keys_read == (1 + 3 + 3) * 8  # whole blocks: the sinks' one, the window's 3 (unaligned), 3 chosen
    assert kv.tokens == kv.cache_tokens == kv.capacity == MAX_LENGTH  # 12 blocks of 8 rows
    assert kv.kinds == ("key", "value", "block_bounds") and kv.summary_rows == 12
    assert kv.buffers["block_bounds"] == ("float32", [2, 12, 32])
    assert kv.bytes_at_capacity == kv.bytes_per_token * (MAX_LENGTH + 12)  # a summary row costs a token row
    assert manifest.spec["block_size"] == 8 and manifest.spec["top_blocks"] == 3
    lm = EdgeLM.load(tmp_path / "out", threads=1)
    lm.reset(1)
    lm.forward(random_ids(1, MAX_LENGTH, 9).numpy())
    with pytest.raises(ContextFullError, match=f"KV cache full: {MAX_LENGTH} tokens cached .* capacity {MAX_LENGTH}"):
        lm.forward(random_ids(1, 1, 10).numpy())


@pytest.mark.real_model
def test_smollm2_hierarchical_generates_the_pytorch_greedy_tokens(tmp_path, smollm2, smollm2_decoder):
    """SmolLM2, blocks of 64, top 4, 4 sinks, window 64: after a 700-token prompt the 24 greedy tokens equal
    PyTorch's. Most steps agree to 1e-4 (30 layers of float32 rounding); a step where two blocks' bounds
    nearly tie may pick the other one in one head of one layer under onnxruntime's rounding (measured: one step
    in twelve at 2e-3), so the worst step is held to 1e-2, well under what a wrong selection moves."""
    spec = AttentionSpec(block_size=64, top_blocks=4, sinks=4)
    decoder = smollm2_decoder
    rewrite(decoder, spec)
    lowerings = [lowering_for(attn, spec, 1024) for attn in decoder.attentions()]
    folder = exported_folder(tmp_path, decoder, lowerings, smollm2.tokenizer, 1024)
    lm = EdgeLM.load(folder, threads=1)
    lm.reset(1)
    cache = decoder.new_cache(1, 1024)
    chunk = calibration_ids(smollm2.tokenizer)[:, :700]
    errors, torch_tokens, ort_tokens = [], [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one-token steps gain nothing from threads; on a busy machine they lose 10x
    try:
        with torch.no_grad():
            for _ in range(24):
                expected, actual = decoder(chunk, cache)[0, -1].numpy(), lm.forward(chunk.numpy())[0]
                errors.append(float(np.abs(expected - actual).max()))
                torch_tokens.append(int(expected.argmax()))
                ort_tokens.append(int(actual.argmax()))
                chunk = torch.tensor([[torch_tokens[-1]]])
    finally:
        torch.set_num_threads(threads)
    assert torch_tokens == ort_tokens
    assert float(np.median(errors)) < 1e-4
    assert max(errors) < 1e-2
