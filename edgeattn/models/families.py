"""Family adapters: a Hugging Face model -> the canonical Decoder, one registered class per family.

Each adapter states its weight-name map explicitly and the conversion checks that
every source tensor is consumed and every canonical tensor is filled, with the
expected shape. Common config fields come from optimum's NormalizedConfig; the
rest (norm, activation, biases, RoPE) are read here per family.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from optimum.utils import NormalizedConfigManager
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from edgeattn.errors import EdgeattnError
from edgeattn.models.decoder import Decoder, DecoderConfig


class UnsupportedModelError(EdgeattnError, ValueError):
    """The checkpoint's architecture has no registered adapter."""


_ADAPTERS: dict[str, type[FamilyAdapter]] = {}


def register(model_type: str) -> Callable[[type[FamilyAdapter]], type[FamilyAdapter]]:
    def decorate(cls: type[FamilyAdapter]) -> type[FamilyAdapter]:
        cls.model_type = model_type
        _ADAPTERS[model_type] = cls
        return cls
    return decorate


def supported_families() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_for(hf_config) -> FamilyAdapter:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in _ADAPTERS:
        raise UnsupportedModelError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(supported_families())}"
        )
    return _ADAPTERS[model_type]()


def to_decoder(hf_model) -> Decoder:
    """Convert a transformers causal LM into the canonical Decoder (float32, eval mode)."""
    return adapter_for(hf_model.config).convert(hf_model)


class FamilyAdapter:
    model_type = ""

    def decoder_config(self, hf_config) -> DecoderConfig:
        raise NotImplementedError

    def layer_weights(self, hf_state: dict, i: int, config: DecoderConfig) -> dict[str, torch.Tensor]:
        """Canonical block weights (names relative to ``blocks.{i}.``) taken out of ``hf_state``."""
        raise NotImplementedError

    def global_weights(self, hf_state: dict, config: DecoderConfig) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def convert(self, hf_model) -> Decoder:
        hf_config = hf_model.config
        config = self.decoder_config(hf_config)
        inv_freq, scaling = _rope(hf_config, config)
        decoder = Decoder(config, rope_inv_freq=inv_freq, rope_attention_scaling=scaling)
        hf_state = {name: tensor.detach().float() for name, tensor in hf_model.state_dict().items()}
        if config.tie_word_embeddings:
            hf_state.pop("lm_head.weight", None)
        state = self.global_weights(hf_state, config)
        for i in range(config.num_layers):
            state.update({f"blocks.{i}.{k}": v for k, v in self.layer_weights(hf_state, i, config).items()})
        leftover = [name for name in hf_state if not _ignorable(name)]
        if leftover:
            raise UnsupportedModelError(f"{self.model_type}: checkpoint tensors not mapped: {', '.join(leftover[:5])}")
        _load_exact(decoder, state)
        return decoder.eval()

    def common_fields(self, hf_config) -> dict:
        n = NormalizedConfigManager.get_normalized_config_class(self.model_type)(hf_config)
        heads = n.num_attention_heads
        kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
        head_dim = getattr(hf_config, "head_dim", None) or n.hidden_size // heads
        eos = hf_config.eos_token_id
        return dict(
            family=self.model_type, vocab_size=n.vocab_size, hidden_size=n.hidden_size,
            num_layers=n.num_layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
            bos_token_id=hf_config.bos_token_id,
            eos_token_ids=tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ()),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        )


class _LlamaLike(FamilyAdapter):
    """Llama / Mistral / Qwen2: RMSNorm, SwiGLU, RoPE, separate q/k/v projections."""

    def decoder_config(self, c) -> DecoderConfig:
        rope = dict(getattr(c, "rope_parameters", None) or {})
        return DecoderConfig(
            **self.common_fields(c), intermediate_size=c.intermediate_size,
            max_position_embeddings=c.max_position_embeddings, norm_eps=c.rms_norm_eps,
            activation=c.hidden_act, rope_theta=float(rope.get("rope_theta", 10000.0)), rope_parameters=rope,
            qkv_bias=self.qkv_bias(c), o_bias=bool(getattr(c, "attention_bias", False)),
            mlp_bias=bool(getattr(c, "mlp_bias", False)),
        )

    def qkv_bias(self, c) -> bool:
        return bool(getattr(c, "attention_bias", False))

    def global_weights(self, s, config):
        out = {"embed.weight": s.pop("model.embed_tokens.weight"), "final_norm.weight": s.pop("model.norm.weight")}
        if not config.tie_word_embeddings:
            out["lm_head.weight"] = s.pop("lm_head.weight")
        return out

    def layer_weights(self, s, i, config):
        src = f"model.layers.{i}."
        names = {
            "attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
            "attn.o_proj.weight": "self_attn.o_proj.weight",
            "mlp.gate_proj.weight": "mlp.gate_proj.weight", "mlp.up_proj.weight": "mlp.up_proj.weight",
            "mlp.down_proj.weight": "mlp.down_proj.weight",
        }
        out = {dst: s.pop(src + name) for dst, name in names.items()}
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out.update(_take_bias(s, src + f"self_attn.{proj}", f"attn.{proj}"))
            if proj != "o_proj":
                out[f"attn.{proj}.weight"] = s.pop(src + f"self_attn.{proj}.weight")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out.update(_take_bias(s, src + f"mlp.{proj}", f"mlp.{proj}"))
        return out


@register("llama")
class LlamaAdapter(_LlamaLike):
    pass


@register("mistral")
class MistralAdapter(_LlamaLike):
    def decoder_config(self, c) -> DecoderConfig:
        if getattr(c, "sliding_window", None) and c.sliding_window < c.max_position_embeddings:
            raise UnsupportedModelError(
                f"mistral checkpoint with a native sliding window ({c.sliding_window}) is not supported yet; "
                "convert a full-attention checkpoint and apply --window instead"
            )
        return super().decoder_config(c)


@register("qwen2")
class Qwen2Adapter(_LlamaLike):
    def qkv_bias(self, c) -> bool:
        return True  # Qwen2 always has q/k/v biases and no o_proj bias


@register("phi3")
class Phi3Adapter(_LlamaLike):
    """Phi-3: fused qkv_proj ([q; k; v] rows) and gate_up_proj ([gate; up] rows)."""

    def layer_weights(self, s, i, config):
        src = f"model.layers.{i}."
        q_rows = config.num_heads * config.head_dim
        kv_rows = config.num_kv_heads * config.head_dim
        q, k, v = s.pop(src + "self_attn.qkv_proj.weight").split([q_rows, kv_rows, kv_rows])
        gate, up = s.pop(src + "mlp.gate_up_proj.weight").chunk(2)
        return {
            "attn_norm.weight": s.pop(src + "input_layernorm.weight"),
            "mlp_norm.weight": s.pop(src + "post_attention_layernorm.weight"),
            "attn.q_proj.weight": q, "attn.k_proj.weight": k, "attn.v_proj.weight": v,
            "attn.o_proj.weight": s.pop(src + "self_attn.o_proj.weight"),
            "mlp.gate_proj.weight": gate, "mlp.up_proj.weight": up,
            "mlp.down_proj.weight": s.pop(src + "mlp.down_proj.weight"),
        }

    def qkv_bias(self, c) -> bool:
        return False


@register("gpt2")
class GPT2Adapter(FamilyAdapter):
    """GPT-2: LayerNorm, GELU (tanh), learned positions, Conv1D weights stored [in, out]."""

    def decoder_config(self, c) -> DecoderConfig:
        if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
            raise UnsupportedModelError(f"gpt2 activation {c.activation_function!r} is not supported")
        if getattr(c, "scale_attn_by_inverse_layer_idx", False) or not getattr(c, "scale_attn_weights", True):
            raise UnsupportedModelError("gpt2 attention scaling variants are not supported")
        return DecoderConfig(
            **self.common_fields(c), intermediate_size=c.n_inner or 4 * c.n_embd,
            max_position_embeddings=c.n_positions, norm_eps=c.layer_norm_epsilon, norm="layer",
            activation="gelu" if c.activation_function == "gelu" else "gelu_tanh", gated_mlp=False,
            positions="learned", qkv_bias=True, o_bias=True, mlp_bias=True,
        )

    def global_weights(self, s, config):
        out = {
            "embed.weight": s.pop("transformer.wte.weight"), "pos_embed.weight": s.pop("transformer.wpe.weight"),
            "final_norm.weight": s.pop("transformer.ln_f.weight"), "final_norm.bias": s.pop("transformer.ln_f.bias"),
        }
        if not config.tie_word_embeddings:
            out["lm_head.weight"] = s.pop("lm_head.weight")
        return out

    def layer_weights(self, s, i, config):
        src = f"transformer.h.{i}."
        hidden = config.hidden_size
        q, k, v = s.pop(src + "attn.c_attn.weight").t().split(hidden)
        qb, kb, vb = s.pop(src + "attn.c_attn.bias").split(hidden)
        return {
            "attn_norm.weight": s.pop(src + "ln_1.weight"), "attn_norm.bias": s.pop(src + "ln_1.bias"),
            "mlp_norm.weight": s.pop(src + "ln_2.weight"), "mlp_norm.bias": s.pop(src + "ln_2.bias"),
            "attn.q_proj.weight": q, "attn.k_proj.weight": k, "attn.v_proj.weight": v,
            "attn.q_proj.bias": qb, "attn.k_proj.bias": kb, "attn.v_proj.bias": vb,
            "attn.o_proj.weight": s.pop(src + "attn.c_proj.weight").t(), "attn.o_proj.bias": s.pop(src + "attn.c_proj.bias"),
            "mlp.up_proj.weight": s.pop(src + "mlp.c_fc.weight").t(), "mlp.up_proj.bias": s.pop(src + "mlp.c_fc.bias"),
            "mlp.down_proj.weight": s.pop(src + "mlp.c_proj.weight").t(), "mlp.down_proj.bias": s.pop(src + "mlp.c_proj.bias"),
        }


def _take_bias(s: dict, src: str, dst: str) -> dict:
    bias = s.pop(src + ".bias", None)
    return {} if bias is None else {dst + ".bias": bias}


def _ignorable(name: str) -> bool:
    """Buffers some checkpoints carry that hold no weights (masks, rotary caches)."""
    return name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq"))


def _rope(hf_config, config: DecoderConfig) -> tuple[torch.Tensor | None, float]:
    """RoPE inverse frequencies through transformers' own init functions (covers llama3, longrope...)."""
    if config.positions != "rope":
        return None, 1.0
    rope_type = config.rope_parameters.get("rope_type", "default")
    if rope_type == "default":
        return None, 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise UnsupportedModelError(f"RoPE type {rope_type!r} is not supported")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    return inv_freq.float(), float(scaling)


def _load_exact(decoder: Decoder, state: dict[str, torch.Tensor]) -> None:
    if decoder.config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    expected = decoder.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UnsupportedModelError(f"weight map mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise UnsupportedModelError(
                f"{name}: checkpoint shape {tuple(tensor.shape)} != expected {tuple(expected[name].shape)}")
    decoder.load_state_dict(state)
