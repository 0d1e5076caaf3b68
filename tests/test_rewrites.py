"""Rewrites on every family's tiny model: exact cases, decode == full pass, lossy bounds, order."""

from __future__ import annotations

import copy

import pytest
import torch

from edgeattn.evaluation.calibration import calibration_ids
from edgeattn.models import load
from edgeattn.models.kvcache import KVCacheFullError
from edgeattn.rewrites import ORDER, RewriteError, rewrite
from edgeattn.rewrites._swap import for_each_attention
from edgeattn.rewrites.kv_quant import KV_CALIBRATION_TOKENS, _record_stored_kv
from edgeattn.spec import AttentionSpec
from tests.conftest import TINY_FAMILIES

EXACT = 1e-5  # float32 reorderings only
INCREMENTAL = 1e-4  # chunked/step-by-step decode vs one full pass (float32)
INCREMENTAL_FLOAT64 = 1e-9
SEQ = 72

# Every rewrite alone and combined; sizes chosen so that windows and blocks really drop tokens at SEQ.
SPECS = {
    "identity": AttentionSpec(),
    "mqa-mean": AttentionSpec(kv_heads=1, gqa_method="mean"),
    "mqa-calibrated": AttentionSpec(kv_heads=1),
    "window": AttentionSpec(window=16),
    "window-sinks": AttentionSpec(window=16, sinks=3),
    "hierarchical": AttentionSpec(block_size=8, top_blocks=2, sinks=2),
    "hierarchical-mass": AttentionSpec(block_size=8, top_blocks=4, block_mass=0.6, window=12),
    "kv-fp16": AttentionSpec(kv_cache="fp16"),
    "kv-int8-channel": AttentionSpec(kv_cache="int8"),
    "kv-int4-channel": AttentionSpec(kv_cache="int4"),
    "kv-int8-token": AttentionSpec(kv_cache="int8", kv_quant="per-token"),
    "kv-int4-token": AttentionSpec(kv_cache="int4", kv_quant="per-token"),
    "combo": AttentionSpec(kv_heads=1, window=16, sinks=2, kv_cache="int8"),
    "combo-hierarchical": AttentionSpec(kv_heads=1, block_size=8, top_blocks=2, kv_cache="int4", kv_quant="per-token"),
}


def _tiny(family):
    model = load(f"tiny-{family}")
    return model.decoder, calibration_ids(model.tokenizer, None, max_tokens=256)


def _rewritten(family, spec):
    decoder, calibration = _tiny(family)
    rewrite(decoder, spec, calibration)
    return decoder


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("name", sorted(SPECS))
def test_decode_step_by_step_equals_full_pass(family, name):
    spec = SPECS[name]
    if spec.kv_heads is not None and family in ("phi3", "gpt2"):
        spec = AttentionSpec(**{**spec.to_dict(), "kv_heads": 2})  # 4 -> 2 (these families are MHA)
    decoder = _rewritten(family, spec)
    tolerance = INCREMENTAL
    if spec.kv_cache != "fp32":
        # A chunk and a single token give keys that differ by float32 noise, which can flip a
        # rounding decision of the codec; in float64 such flips do not happen.
        decoder, tolerance = decoder.double(), INCREMENTAL_FLOAT64
    ids = torch.randint(0, 256, (2, SEQ))
    with torch.no_grad():
        full = decoder(ids)
        cache = decoder.new_cache(batch=2, max_length=128)
        steps = [decoder(ids[:, :20], cache)]
        steps += [decoder(ids[:, i:i + 1], cache) for i in range(20, 60)]
        steps.append(decoder(ids[:, 60:], cache))
    assert (torch.cat(steps, 1) - full).abs().max().item() < tolerance


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_no_op_specs_equal_the_source_model(family):
    reference, calibration = _tiny(family)
    ids = torch.randint(0, 256, (1, SEQ))
    with torch.no_grad():
        expected = reference(ids)
    kv = reference.config.num_kv_heads
    exact_specs = [
        AttentionSpec(),
        AttentionSpec(kv_heads=kv, gqa_method="mean"),
        AttentionSpec(window=SEQ),  # window covers the whole sequence
        AttentionSpec(window=SEQ - 8, sinks=8),  # sinks + window cover it
        AttentionSpec(block_size=8, top_blocks=SEQ // 8),  # every block kept
    ]
    for spec in exact_specs:
        decoder = copy.deepcopy(reference)
        rewrite(decoder, spec, calibration)
        with torch.no_grad():
            assert (decoder(ids) - expected).abs().max().item() < EXACT, spec


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sparse_forms_really_change_the_output(family):
    """Guards the exact-case tests above: a real window or block budget must differ from full attention."""
    reference, calibration = _tiny(family)
    ids = torch.randint(0, 256, (1, SEQ))
    for spec in (AttentionSpec(window=8), AttentionSpec(block_size=8, top_blocks=1)):
        decoder = copy.deepcopy(reference)
        rewrite(decoder, spec, calibration)
        with torch.no_grad():
            assert (decoder(ids) - reference(ids)).abs().max().item() > 1e-2


def _sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    return (10 * torch.log10(reference.pow(2).mean() / (reference - approximation).pow(2).mean())).item()


# Measured on tiny-llama (seed 0) logits over 72 tokens: int8 ~40-45 dB, int4 ~20-25 dB, fp16 > 60 dB.
KV_SQNR_BOUNDS_DB = {"kv-fp16": 55.0, "kv-int8-channel": 30.0, "kv-int8-token": 30.0,
                     "kv-int4-channel": 12.0, "kv-int4-token": 12.0}


@pytest.mark.parametrize("name", sorted(KV_SQNR_BOUNDS_DB))
def test_kv_quantization_logit_sqnr(name):
    reference, calibration = _tiny("llama")
    decoder = copy.deepcopy(reference)
    rewrite(decoder, SPECS[name], calibration)
    ids = calibration[:, :SEQ]
    with torch.no_grad():
        sqnr = _sqnr_db(reference(ids), decoder(ids))
    assert sqnr > KV_SQNR_BOUNDS_DB[name], f"{name}: SQNR {sqnr:.1f} dB"


def test_per_channel_scales_are_fitted_on_the_first_calibration_tokens_only():
    """A calibrated head merge hands over 16384 tokens; the scales read the first 2048 of them."""
    decoder, _ = _tiny("llama")
    long_text = torch.randint(0, 256, (1, KV_CALIBRATION_TOKENS + 500))
    recorded = _record_stored_kv(decoder, long_text)
    assert [keys.shape[0] for keys, _ in recorded] == [KV_CALIBRATION_TOKENS] * len(recorded)
    short = _record_stored_kv(decoder, long_text[:, :KV_CALIBRATION_TOKENS])
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(recorded, short))


def test_kv_bytes_per_token_are_exact():
    decoder, calibration = _tiny("llama")  # 2 layers, 2 kv heads, head_dim 16
    assert decoder.kv_bytes_per_token() == 2 * 2 * 2 * 16 * 4
    rewrite(decoder, AttentionSpec(kv_cache="int4", kv_quant="per-token"), calibration)
    # per layer: codes 2*2*16/2 = 32 bytes; scales: keys 2 heads x 1 group, values 2 heads, x (scale+min) fp16
    assert decoder.kv_bytes_per_token() == 2 * (32 + (2 * 1 + 2) * 4)


def test_ring_buffer_keeps_constant_memory_past_the_trained_context():
    decoder, calibration = _tiny("llama")  # trained context 512
    rewrite(decoder, AttentionSpec(window=16, sinks=2), calibration)
    cache = decoder.new_cache(batch=1, max_length=64)
    assert cache.capacity == 18
    token = torch.tensor([[5]])
    with torch.no_grad():
        decoder(torch.randint(0, 256, (1, 10)), cache)
        for _ in range(600):
            logits = decoder(token, cache)
    assert cache.length == 610 and cache.capacity == 18
    assert torch.isfinite(logits).all()


def test_full_cache_overflow_is_a_clear_error():
    decoder, _ = _tiny("llama")
    cache = decoder.new_cache(batch=1, max_length=8)
    with torch.no_grad():
        decoder(torch.randint(0, 256, (1, 8)), cache)
        with pytest.raises(KVCacheFullError, match="capacity 8 tokens"):
            decoder(torch.tensor([[1]]), cache)


def test_kv_heads_must_divide():
    decoder, calibration = _tiny("llama")
    with pytest.raises(RewriteError, match="must divide"):
        rewrite(decoder, AttentionSpec(kv_heads=3), calibration)


def test_a_rewrite_that_matches_nothing_is_an_error():
    with pytest.raises(RewriteError, match="no EdgeAttention"):
        for_each_attention(torch.nn.Linear(2, 2), "window", lambda i, attn: "")


def test_rewrite_order_and_report():
    assert [name for name, _, _ in ORDER] == ["gqa", "window", "hierarchical", "kv_quant"]
    decoder, calibration = _tiny("llama")
    report = rewrite(decoder, SPECS["combo"], calibration)
    assert report.applied() == ["gqa", "window", "kv_quant"]
    assert sorted(report.by_layer()) == [0, 1] and len(report.by_layer()[0]) == 3


def test_per_channel_scales_are_calibrated_on_stored_keys():
    """Ring buffers store unrotated keys, full caches rotated ones: scales must follow."""
    decoder, calibration = _tiny("llama")
    full = copy.deepcopy(decoder)
    rewrite(full, AttentionSpec(kv_cache="int8"), calibration)
    ring = copy.deepcopy(decoder)
    rewrite(ring, AttentionSpec(window=16, kv_cache="int8"), calibration)
    k_full = full.attentions()[0].codec.k_scale
    k_ring = ring.attentions()[0].codec.k_scale
    assert not torch.allclose(k_full, k_ring)
    assert torch.allclose(full.attentions()[0].codec.v_scale, ring.attentions()[0].codec.v_scale)
