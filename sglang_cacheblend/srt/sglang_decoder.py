"""``DecoderOps`` over SGLang's own Llama-family modules.

The blended forward (:func:`sglang_cacheblend.blend.forward.blend_layers`) runs SGLang's
modules (norms, fused QKV projection, SGLang's rotary embedding, MLP), so a blended prefill
computes each row exactly as SGLang's own prefill would.
"""

from __future__ import annotations

from typing import Any

import torch

from sglang_cacheblend.blend.decoder import DecoderDims

__all__ = ["SGLangDecoderOps"]


class SGLangDecoderOps:
    """``DecoderOps`` over SGLang's Llama-family models (Llama/SmolLM2, Mistral, Qwen2, Qwen3).

    They share one layout: ``model.model.{embed_tokens,layers,norm}``, each layer with
    ``input_layernorm``, ``self_attn.{qkv_proj,rotary_emb,o_proj,attn}``, ``post_attention_layernorm``
    and ``mlp``. Q/K/V come from the attention module's own ``forward_prepare_native`` where it
    has one (Llama, Qwen3: the latter applies its per-head q/k norms there), else from the fused
    projection and its rotary embedding, as its ``forward`` does (Qwen2).
    """

    def __init__(self, model: Any) -> None:
        config = model.config
        self._model, self._layers = model, model.model.layers
        DecoderDims.from_hf_config(config).assign_to(self)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._model.model.embed_tokens(input_ids)

    def qkv(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor):
        block = self._layers[layer]
        n = hidden.shape[0]
        attn = block.self_attn
        x = block.input_layernorm(hidden)
        prepare = getattr(attn, "forward_prepare_native", None)
        if prepare is not None:
            q, k, v = prepare(positions, x)
        else:
            qkv, _ = attn.qkv_proj(x)
            q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
            q, k = attn.rotary_emb(positions, q, k)
        return (q.reshape(n, self.num_q_heads, self.head_dim),
                k.reshape(n, self.num_kv_heads, self.head_dim),
                v.reshape(n, self.num_kv_heads, self.head_dim))

    def attn_out(self, layer: int, attn: torch.Tensor) -> torch.Tensor:
        return self._layers[layer].self_attn.o_proj(attn.reshape(attn.shape[0], -1))[0]

    def mlp(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        block = self._layers[layer]
        return block.mlp(block.post_attention_layernorm(hidden))

    def attention_layer(self, layer: int) -> Any:
        return self._layers[layer].self_attn.attn
