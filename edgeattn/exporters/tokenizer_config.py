"""tokenizer_config.json: what onnxruntime-genai's tokenizer needs beside tokenizer.json.

onnxruntime-genai (through onnxruntime-extensions) refuses a folder without it, and reads
from it the tokenizer class, the bos/eos/unk/pad tokens, whether to add bos/eos, the
added tokens and the chat template; transformers' ``AutoTokenizer`` reads the same file.
Everything is derived from the source's ``tokenizers.Tokenizer`` (its model, pre-tokenizer,
post-processor and added tokens), its chat template and the model's bos/eos ids. Only
data is written: plain strings, numbers and booleans, never a class to import
(``auto_map``) or anything else that would run.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# The tokenizer.json model and how it splits words -> the class name onnxruntime-extensions and
# transformers know for that kind of tokenizer: byte-level BPE (GPT-2, SmolLM2, Qwen2, Llama 3),
# sentencepiece-style BPE ("▁" for spaces: Llama 2, Mistral, Phi-3), unigram.
BYTE_LEVEL_BPE, SENTENCEPIECE_BPE, UNIGRAM = "GPT2Tokenizer", "LlamaTokenizer", "T5Tokenizer"
GENERIC = "PreTrainedTokenizerFast"
ADDED_TOKEN_FLAGS = ("lstrip", "normalized", "rstrip", "single_word", "special")


def write_tokenizer_config(folder: Path, tokenizer: Tokenizer, bos_id: int | None, eos_ids: list[int],
                           max_length: int, chat_template: str | None) -> str:
    """Write ``folder``/tokenizer_config.json; returns its file name."""
    config = tokenizer_config(tokenizer, bos_id, eos_ids, max_length, chat_template)
    (Path(folder) / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                      encoding="utf-8")
    return TOKENIZER_CONFIG_FILE


def tokenizer_config(tokenizer: Tokenizer, bos_id: int | None, eos_ids: list[int], max_length: int,
                     chat_template: str | None) -> dict:
    """The tokenizer_config.json of ``tokenizer`` for a model with these bos/eos ids and KV capacity."""
    described = json.loads(tokenizer.to_str())
    bos, eos = _token(tokenizer, bos_id), _token(tokenizer, eos_ids[0] if eos_ids else None)
    config = {
        "tokenizer_class": tokenizer_class(described),
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": described["model"].get("unk_token"),
        "pad_token": eos,
        "add_bos_token": bos_id is not None and _adds(described.get("post_processor"), bos_id, first=True),
        "add_eos_token": bool(eos_ids) and _adds(described.get("post_processor"), eos_ids[0], first=False),
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "added_tokens_decoder": {
            str(token["id"]): {"content": token["content"], **{flag: bool(token.get(flag)) for flag in ADDED_TOKEN_FLAGS}}
            for token in described.get("added_tokens", [])},
    }
    if chat_template:
        config["chat_template"] = chat_template
    return config


def tokenizer_class(described: dict) -> str:
    """The class name for a tokenizer.json (``described``): from its model type and word splitting."""
    kind = described["model"]["type"]
    if kind == "Unigram":
        return UNIGRAM
    if kind != "BPE":
        return GENERIC
    parts = _components(described.get("pre_tokenizer")) + _components(described.get("decoder"))
    if "ByteLevel" in parts:
        return BYTE_LEVEL_BPE
    if "Metaspace" in parts or described["model"].get("byte_fallback") or "ByteFallback" in parts:
        return SENTENCEPIECE_BPE
    return GENERIC


def _components(part: dict | None) -> list[str]:
    """Type names of a pre-tokenizer or decoder, sequences flattened."""
    if not part:
        return []
    children = part.get("pretokenizers") or part.get("decoders") or []
    return [part["type"]] + [name for child in children for name in _components(child)]


def _adds(post_processor: dict | None, token_id: int, first: bool) -> bool:
    """Whether the post-processor puts ``token_id`` first (or last) in a single sequence."""
    if not post_processor:
        return False
    if post_processor.get("type") == "Sequence":
        return any(_adds(part, token_id, first) for part in post_processor.get("processors", []))
    if post_processor.get("type") != "TemplateProcessing" or not post_processor.get("single"):
        return False
    piece = post_processor["single"][0 if first else -1].get("SpecialToken")
    if piece is None:
        return False
    return token_id in post_processor.get("special_tokens", {}).get(piece["id"], {}).get("ids", [])


def _token(tokenizer: Tokenizer, token_id: int | None) -> str | None:
    return tokenizer.id_to_token(token_id) if token_id is not None else None
