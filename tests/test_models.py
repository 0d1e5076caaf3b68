"""Loading checkpoints into the canonical decoder: parity with transformers, and bad input."""

from __future__ import annotations

import pytest
import torch

from edgeattn.models import ModelLoadError, UnsupportedModelError, load, load_hf, to_decoder
from tests.conftest import TINY_FAMILIES, wikitext_or_skip

PARITY_TOLERANCE = 1e-4  # max-abs logit difference vs transformers (issue contract)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_decoder_matches_transformers(family):
    source = load_hf(f"tiny-{family}")
    decoder = to_decoder(source.model)
    ids = torch.randint(0, 256, (2, 48))
    with torch.no_grad():
        expected = source.model(ids).logits
        actual = decoder(ids)
    assert expected.abs().max() > 0.5, "logits too small to tell models apart"
    assert (actual - expected).abs().max().item() < PARITY_TOLERANCE


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_decoder_matches_transformers_from_a_saved_folder(family, tmp_path):
    source = load_hf(f"tiny-{family}")
    source.model.save_pretrained(tmp_path)
    _save_byte_tokenizer(tmp_path)
    loaded = load(tmp_path)
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        assert (loaded.decoder(ids) - source.model(ids).logits).abs().max().item() < PARITY_TOLERANCE
    assert loaded.weights_sha256 and len(loaded.weights_sha256) == 64


@pytest.mark.real_model
def test_smollm2_decoder_matches_transformers(smollm2):
    source = load_hf("smollm2")
    text = wikitext_or_skip("valid").read_text()[:20000]
    ids = torch.tensor([source.tokenizer.encode(text).ids[:256]])
    assert ids.shape[1] == 256
    with torch.no_grad():
        expected = source.model(ids).logits
        actual = smollm2.decoder(ids)
    assert (actual - expected).abs().max().item() < PARITY_TOLERANCE
    config = smollm2.decoder.config
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (30, 9, 3, 64)


@pytest.mark.real_model
def test_smollm2_greedy_continuation_is_sensible(smollm2):
    ids = smollm2.encode("The capital of France is")
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(smollm2.decoder(torch.tensor([ids]))[0, -1].argmax()))
    assert "Paris" in smollm2.tokenizer.decode(ids)


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="no model named 'nope'"):
        load("nope")
    with pytest.raises(ModelLoadError, match="unknown tiny model"):
        load("tiny-bert")


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load(tmp_path)


def test_folder_with_pickled_weights_only_is_refused(tmp_path):
    load_hf("tiny-llama").model.config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not trusted")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load(tmp_path)


def test_corrupted_safetensors(tmp_path):
    load_hf("tiny-llama").model.save_pretrained(tmp_path)
    weights = next(tmp_path.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="weights cannot be loaded"):
        load(tmp_path)


def test_unsupported_architecture(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'bert'"):
        load(tmp_path)


def test_not_a_gguf_file(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 definitely not gguf")
    with pytest.raises(ModelLoadError, match="bad magic"):
        load(bogus)


def test_truncated_gguf(tmp_path):
    from edgeattn.models.sources import smollm2_path

    truncated = tmp_path / "truncated.gguf"
    with smollm2_path().open("rb") as handle:
        truncated.write_bytes(handle.read(4096))
    with pytest.raises(ModelLoadError, match="GGUF file cannot be loaded"):
        load(truncated)


def _save_byte_tokenizer(folder):
    from transformers import PreTrainedTokenizerFast

    from edgeattn.models.tiny import byte_tokenizer

    PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer()).save_pretrained(folder)
