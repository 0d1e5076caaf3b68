"""Tiny random-weight models of every family, for tests: ``tiny-llama``, ``tiny-gpt2`` ...

2 layers, hidden 64, a 256-symbol byte-level vocabulary; weights drawn from a fixed
seed, so the same name always gives the same model.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

VOCAB = 256
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=512, bos_token_id=None, eos_token_id=None)

TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON, num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**_COMMON, num_key_value_heads=2, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**_COMMON, num_key_value_heads=2, use_sliding_window=False),
    "phi3": lambda: Phi3Config(**_COMMON, num_key_value_heads=4, pad_token_id=0),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                               bos_token_id=None, eos_token_id=None),
}


def tiny_families() -> list[str]:
    return sorted(TINY_CONFIGS)


def tiny_hf_model(family: str, seed: int = 0):
    """A transformers model of ``family`` with small random weights (eager attention, float32)."""
    config = TINY_CONFIGS[family]()
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        # Larger-than-default weights make attention patterns non-trivial, so tests can tell forms apart.
        for name, param in model.named_parameters():
            if param.dim() == 2 and "norm" not in name and "ln_" not in name:
                param.normal_(0.0, 0.08)
            elif "bias" in name:
                param.normal_(0.0, 0.02)
    return model.eval()


def byte_tokenizer() -> Tokenizer:
    """A byte-level tokenizer with exactly 256 tokens (one per byte, no merges)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer
