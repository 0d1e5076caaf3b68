"""tokenizer_config.json: onnxruntime-genai's own API tokenizes, generates and detokenizes an output folder.

The reference for every token is the ``tokenizers`` library (what edgeattn's runtime uses),
a separate implementation from onnxruntime-extensions' tokenizer inside onnxruntime-genai.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from edgeattn.evaluation.calibration import default_evaluation_text
from edgeattn.exporters.tokenizer_config import (
    BYTE_LEVEL_BPE,
    SENTENCEPIECE_BPE,
    UNIGRAM,
    tokenizer_config,
    write_tokenizer_config,
)
from edgeattn.runtimes import EdgeLM
from edgeattn.runtimes.generate import stream

MAX_LENGTH = 96
GENERATED = 24
TEXTS = ["The lighthouse keeper climbed the stairs.", "  two leading spaces, a tab\tand\n\nnew lines ",
         "Ünïcödé ✓ 日本語", "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"]
# Every key tokenizer_config.json may hold: data only (no auto_map, nothing transformers would import).
CONFIG_KEYS = {"tokenizer_class", "bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token",
               "add_eos_token", "clean_up_tokenization_spaces", "model_max_length", "added_tokens_decoder",
               "chat_template"}


@pytest.fixture(scope="module")
def folder(converted):
    """tiny-llama converted with the ort lowering: a folder onnxruntime-genai runs (genai_config.json)."""
    out, manifest = converted("tiny-llama", max_length=MAX_LENGTH)
    assert manifest.lowering.chosen == "ort"
    return out


def _byte_level_bpe() -> Tokenizer:
    """A byte-level BPE with merges and three special tokens, trained on the packaged text."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([default_evaluation_text()], trainer)
    return tokenizer


def _with_tokenizer(folder, destination, tokenizer: Tokenizer, chat_template: str | None = None):
    """A copy of ``folder`` whose tokenizer files are ``tokenizer``'s (the model is only there to be loaded)."""
    shutil.copytree(folder, destination)
    tokenizer.save(str(destination / "tokenizer.json"))
    write_tokenizer_config(destination, tokenizer, 1, [2], MAX_LENGTH, chat_template)
    return destination


def _one_per_run(text: str) -> str:
    return re.sub("\ufffd+", "\ufffd", text)


def _assert_same_tokens(og, folder, reference: Tokenizer, texts: list[str]) -> None:
    genai = og.Tokenizer(og.Model(str(folder)))
    for text in texts:
        expected = reference.encode(text, add_special_tokens=False).ids
        assert [int(token) for token in genai.encode(text)] == expected, text
        assert genai.decode(np.array(expected, dtype=np.int32)) == reference.decode(expected), text
        pieces = genai.create_stream()  # token by token, as an app shows a generation
        assert "".join(pieces.decode(token) for token in expected) == reference.decode(expected), text


def test_every_folder_carries_a_tokenizer_config_of_data_only(folder):
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    manifest = json.loads((folder / "edgeattn.json").read_text(encoding="utf-8"))
    assert manifest["files"]["tokenizer_config"] == "tokenizer_config.json"
    assert "tokenizer_config.json" in manifest["sha256"]
    assert set(config) <= CONFIG_KEYS
    assert config["tokenizer_class"] == BYTE_LEVEL_BPE
    assert config["model_max_length"] == MAX_LENGTH


def test_onnxruntime_genai_tokenizes_generates_and_detokenizes_as_edgeattn_runtime(folder):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    prompt_text = default_evaluation_text()[:40]
    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    prompt = tokenizer.encode(prompt_text)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + GENERATED, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    genai_tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        genai_tokens.append(int(generator.get_next_tokens()[0]))
    genai_text = tokenizer.decode(np.array(genai_tokens, dtype=np.int32))

    lm = EdgeLM.load(folder)
    ours = list(stream(lm, lm.encode(prompt_text), len(genai_tokens), stop_token_ids=[]))
    assert [int(token) for token in prompt] == lm.encode(prompt_text)
    assert genai_tokens  # the random model may end early on the token genai_config names as eos
    assert genai_tokens == ours
    # A random model emits bytes that are not UTF-8: tokenizers shows one replacement character per
    # byte, onnxruntime-genai one per run of them.
    assert _one_per_run(genai_text) == _one_per_run(lm.decode(ours))


def test_onnxruntime_genai_reads_merges_and_special_tokens(folder, tmp_path):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    tokenizer = _byte_level_bpe()
    copy = _with_tokenizer(folder, tmp_path / "bpe", tokenizer)
    _assert_same_tokens(og, copy, tokenizer, [*TEXTS, default_evaluation_text()])


@pytest.mark.real_model
def test_onnxruntime_genai_tokenizes_smollm2_and_applies_its_chat_template(folder, tmp_path, smollm2):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    copy = _with_tokenizer(folder, tmp_path / "smollm2", smollm2.tokenizer, smollm2.chat_template)
    config = json.loads((copy / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert (config["tokenizer_class"], config["bos_token"], config["eos_token"]) == (
        BYTE_LEVEL_BPE, "<|im_start|>", "<|im_end|>")
    _assert_same_tokens(og, copy, smollm2.tokenizer, [*TEXTS, default_evaluation_text()])
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
        smollm2.chat_template).render(messages=messages, add_generation_prompt=True, bos_token="", eos_token="")
    genai = og.Tokenizer(og.Model(str(copy)))
    assert genai.apply_chat_template(json.dumps(messages), add_generation_prompt=True) == expected


def test_tokenizer_class_follows_how_the_tokenizer_splits_words():
    spm = Tokenizer(models.BPE(vocab={"<unk>": 0, "<s>": 1, "</s>": 2, "▁a": 3}, merges=[], unk_token="<unk>",
                               byte_fallback=True))
    spm.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    spm.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    unigram = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0)], unk_id=0))
    assert tokenizer_config(_byte_level_bpe(), None, [], 8, None)["tokenizer_class"] == BYTE_LEVEL_BPE
    assert tokenizer_config(spm, 1, [2], 8, None)["tokenizer_class"] == SENTENCEPIECE_BPE
    assert tokenizer_config(unigram, None, [], 8, None)["tokenizer_class"] == UNIGRAM


def test_bos_and_eos_are_added_exactly_when_the_post_processor_adds_them():
    tokenizer = _byte_level_bpe()
    plain = tokenizer_config(tokenizer, 1, [2], 8, None)
    assert (plain["add_bos_token"], plain["add_eos_token"]) == (False, False)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A <|im_end|>", special_tokens=[("<|im_start|>", 1), ("<|im_end|>", 2)])
    wrapped = tokenizer_config(tokenizer, 1, [2], 8, None)
    assert (wrapped["add_bos_token"], wrapped["add_eos_token"]) == (True, True)
    assert wrapped["added_tokens_decoder"]["1"] == {"content": "<|im_start|>", "lstrip": False, "normalized": False,
                                                   "rstrip": False, "single_word": False, "special": True}
    assert "chat_template" not in wrapped
