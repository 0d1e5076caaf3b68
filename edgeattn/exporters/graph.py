"""The exportable view of a Decoder: explicit KV-cache tensors in and out, one fused attention node per layer.

I/O contract (recorded in the manifest; the runtime relies on it):

    inputs   input_ids                  int64 [batch, sequence]   new tokens (prefill: the prompt, decode: one)
             attention_mask             int64 [batch, total]      ones over every token so far, new ones included
             past_key_values.{i}.key    cache dtype [batch, kv_heads, capacity, cache_dim]
             past_key_values.{i}.value
             past_key_values.{i}.{kind} a lowering's extra buffers (a residual window: key_residual,
                                        value_residual float32 [batch, kv_heads, residual, head_dim])
    outputs  logits                     float32 [batch, 1, vocab] logits of the last new token only
             present.{i}.key, present.{i}.value, present.{i}.{kind}   same shape as past: the buffers with the new
                                                                  tokens written in (bind them to the past buffers)

The names and the attention mask follow onnxruntime-genai's decoder contract, so the
same folder runs there too.

Only the attention goes through the lowering (``attend``); embeddings, norms and MLPs
are exported as ordinary PyTorch code, RMSNorm through ``F.rms_norm`` so that it
becomes one ``RMSNormalization`` node at every opset >= 23 (onnxscript's pattern
fusion of the written-out formula runs at opset 23 only), or, with the ``skip`` norm
fusion (``edgeattn.exporters.norms``), residual add + RMSNorm as one
``SkipSimplifiedLayerNormalization``.
"""

from __future__ import annotations

import torch
from torch import nn

from edgeattn.exporters.lowering_contract import AttentionLowering
from edgeattn.exporters.norms import SKIP, STANDARD, norm, skip_rms_norm
from edgeattn.models.decoder import Decoder


class ExportGraph(nn.Module):
    def __init__(self, decoder: Decoder, lowerings: list[AttentionLowering], norm_fusion: str = STANDARD) -> None:
        super().__init__()
        self.decoder = decoder
        self.lowerings = lowerings
        self.norm_fusion = norm_fusion

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        decoder = self.decoder
        x = decoder.embed(input_ids)  # [B, L, hidden]
        if decoder.pos_embed is not None:
            past_length = attention_mask.shape[1] - input_ids.shape[1]
            positions = past_length + torch.arange(input_ids.shape[1], device=input_ids.device)
            x = x + decoder.pos_embed(positions)[None]
        blocks = self.fused_blocks if self.norm_fusion == SKIP else self.plain_blocks
        # The per-step tensors every layer shares (positions, masks, RoPE tables), computed once.
        step = self.lowerings[0].prepare_step(input_ids.shape[1], attention_mask)
        last, presents = blocks(x, attention_mask, past, step)
        return (decoder.lm_head(last), *presents)

    def _layer_past(self, past) -> list[tuple]:
        """The flat past inputs grouped per layer: key, value, then the layer's extra buffers."""
        grouped, start = [], 0
        for lowering in self.lowerings:
            count = len(lowering.cache_layout().kinds)
            grouped.append(tuple(past[start:start + count]))
            start += count
        return grouped

    def plain_blocks(self, x, attention_mask, past, step):
        """Residual adds and norms as separate nodes; returns (final-normed last token, presents)."""
        presents = []
        for index, (block, layer_past) in enumerate(zip(self.decoder.blocks, self._layer_past(past))):
            key, value, *extra = layer_past
            attended, *layer_presents = self.lowerings[index].attend(
                block.attn, norm(block.attn_norm, x), attention_mask, key, value, step, *extra)
            presents += layer_presents
            x = x + attended
            x = x + block.mlp(norm(block.mlp_norm, x))
        return norm(self.decoder.final_norm, x[:, -1:]), presents  # logits of the last new token only

    def fused_blocks(self, x, attention_mask, past, step):
        """Each residual add fused with the norm after it; the final one on the last token only."""
        blocks = self.decoder.blocks
        presents = []
        residual, normed = x, norm(blocks[0].attn_norm, x)
        for index, (block, layer_past) in enumerate(zip(blocks, self._layer_past(past))):
            key, value, *extra = layer_past
            attended, *layer_presents = self.lowerings[index].attend(
                block.attn, normed, attention_mask, key, value, step, *extra)
            presents += layer_presents
            normed, residual = skip_rms_norm(block.mlp_norm, attended, residual)
            update = block.mlp(normed)
            if index + 1 < len(blocks):
                normed, residual = skip_rms_norm(blocks[index + 1].attn_norm, update, residual)
        last, _ = skip_rms_norm(self.decoder.final_norm, update[:, -1:], residual[:, -1:])
        return last, presents
