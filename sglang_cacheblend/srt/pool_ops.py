"""``DecoderOps`` and ``KVStore`` over SGLang's own Llama modules and KV pool.

The blended forward (:func:`sglang_cacheblend.blend.forward.blend_layers`) runs SGLang's
modules (norms, fused QKV projection, SGLang's rotary embedding, MLP) and keeps the request's KV
in SGLang's token pool, in the request's own slots, so decode and the radix cache see exactly
what a normal prefill would have left there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sglang_cacheblend.blend.forward import DecoderDims
from sglang_cacheblend.blend.rope import realign_keys_inplace
from sglang_cacheblend.blend.rotary import RotaryConfig
from sglang_cacheblend.srt.blend_requests import ChunkHit


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
        self._model = model
        self._layers = model.model.layers
        dims = DecoderDims.from_hf_config(config)
        self.num_layers, self.num_q_heads = dims.num_layers, dims.num_q_heads
        self.num_kv_heads, self.head_dim = dims.num_kv_heads, dims.head_dim

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


@dataclass
class PoolKVStore:
    """One request's KV in SGLang's token pool: ``slots`` ``(kv_len,)`` by position.

    Positions ``0..prefix_len-1`` are the radix-cached prefix (read only); the request's new rows
    are ``slots[prefix_len:]``.
    """

    pool: Any
    ops: SGLangDecoderOps
    slots: torch.Tensor
    prefix_len: int

    @property
    def kv_len(self) -> int:
        return self.slots.numel()

    def _loc(self, rows: torch.Tensor) -> torch.Tensor:
        return self.slots[self.prefix_len + rows]

    def cached(self, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc = self._loc(rows)
        return self.pool.get_key_buffer(layer)[loc], self.pool.get_value_buffer(layer)[loc]

    def write(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.pool.set_kv_buffer(self.ops.attention_layer(layer), self._loc(rows), k, v)

    def keys_values(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool.get_key_buffer(layer)[self.slots], self.pool.get_value_buffer(layer)[
            self.slots]

    def seed_chunks(self, hits: list[ChunkHit], rotary: RotaryConfig) -> torch.Tensor:
        """Copy the chunks' KV into this request's slots, K realigned to their new positions.

        Returns the reuse mask over the new rows (True where a chunk's KV now sits). A span the
        radix prefix already holds is skipped (exact KV beats reused KV). All chunks move
        together, one gather, rotation and scatter per layer: per chunk and layer, the small
        copies and rotations took a fifth of a blended prefill's time in the server. The
        chunks' own slots are only read: cached chunk KV is never modified in place.
        """
        mask = torch.zeros(self.kv_len - self.prefix_len, dtype=torch.bool)
        src, dst, old, new = [], [], [], []
        for hit in hits:
            start = max(hit.start, self.prefix_len)
            if start >= hit.end:
                continue
            skip = start - hit.start
            src.append(hit.kv_loc[skip:].to(self.slots.device))
            dst.append(self.slots[start:hit.end])
            old.append(hit.positions[skip:].to(torch.int64))
            new.append(torch.arange(start, hit.end))
            mask[start - self.prefix_len: hit.end - self.prefix_len] = True
        if not src:
            return mask
        src_loc, dst_loc = torch.cat(src), torch.cat(dst)
        old_pos, new_pos = torch.cat(old), torch.cat(new)
        device = self.pool.get_key_buffer(0).device
        old_pos, new_pos = old_pos.to(device), new_pos.to(device)
        for layer in range(self.ops.num_layers):
            k_buf = self.pool.get_key_buffer(layer)
            v_buf = self.pool.get_value_buffer(layer)
            keys = k_buf[src_loc]  # a gathered copy: rotate it in place
            realign_keys_inplace(keys, old_pos, new_pos, rotary)
            k_buf[dst_loc] = keys
            v_buf[dst_loc] = v_buf[src_loc]
        return mask
