""":class:`~.decoder.DecoderOps` over a transformers ``LlamaForCausalLM`` (and Mistral/Qwen2).

The reference the SGLang path is checked against, and the engine of offline quality
measurements: transformers' own modules do every projection, norm and MLP; RoPE comes from
:func:`.realign.realign_keys` (rotating from position 0 is applying RoPE), so the rotary styles the
realignment supports are exactly the ones this adapter runs.
"""

from __future__ import annotations

from typing import Any

import torch

from sglang_cacheblend.blend.decoder import DecoderDims
from sglang_cacheblend.blend.realign import realign_keys
from sglang_cacheblend.blend.rotary_config import RotaryConfig

__all__ = ["HFLlamaOps"]


class HFLlamaOps:
    """Adapter from a transformers Llama-family causal LM (Llama, Mistral, Qwen2, Qwen3) to
    ``DecoderOps``."""

    def __init__(self, model: Any) -> None:
        config = model.config
        self._model, self._layers = model, model.model.layers
        DecoderDims.from_hf_config(config).assign_to(self)
        self.rotary = RotaryConfig.from_hf_config(config)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return realign_keys(x, torch.zeros_like(positions), positions, self.rotary)

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._model.model.embed_tokens(input_ids)

    @torch.no_grad()
    def qkv(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor):
        block = self._layers[layer]
        attn = block.self_attn
        x = block.input_layernorm(hidden)
        n = x.shape[0]
        q = attn.q_proj(x).view(n, self.num_q_heads, self.head_dim)
        k = attn.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
        v = attn.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm of q and k, before RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        return self._rope(q, positions), self._rope(k, positions), v

    @torch.no_grad()
    def attn_out(self, layer: int, attn: torch.Tensor) -> torch.Tensor:
        return self._layers[layer].self_attn.o_proj(attn.reshape(attn.shape[0], -1))

    @torch.no_grad()
    def mlp(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        block = self._layers[layer]
        return block.mlp(block.post_attention_layernorm(hidden))

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._model.lm_head(self._model.model.norm(hidden)).float()
