"""genai_config.json: lets onnxruntime-genai (and its Android/iOS/C# APIs) run an ``ort``-lowered folder."""

from __future__ import annotations

from edgeattn.runtimes.manifest import Manifest

GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "phi3": "phi3"}


def genai_config(manifest: Manifest) -> dict:
    model, names = manifest.model, manifest.io.cache_names
    # onnxruntime-genai requires token ids in the vocabulary here; a model without special
    # tokens (the tiny test models) gets its last token id.
    eos = model.eos_token_ids or [model.vocab_size - 1]
    return {
        "model": {
            "bos_token_id": model.bos_token_id if model.bos_token_id is not None else eos[0],
            "context_length": model.max_length,
            "eos_token_id": eos if len(eos) != 1 else eos[0],
            "pad_token_id": eos[0],
            "type": GENAI_TYPES.get(manifest.source.family, manifest.source.family),
            "vocab_size": model.vocab_size,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": manifest.files.model,
                "head_size": model.head_dim,
                "hidden_size": model.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": names.past.format(layer="%d", kind="key"),
                    "past_value_names": names.past.format(layer="%d", kind="value"),
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": names.present.format(layer="%d", kind="key"),
                    "present_value_names": names.present.format(layer="%d", kind="value"),
                },
                "num_attention_heads": model.num_heads,
                "num_hidden_layers": model.num_layers,
                "num_key_value_heads": model.num_kv_heads,
            },
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": model.max_length, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }
