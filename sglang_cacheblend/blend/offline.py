"""Blending a prompt from standalone chunk KV, without a server.

What the SGLang path does with KV slots, done here with tensors, so the algorithm can be checked
and measured against a full prefill of the same weights: each chunk's KV is computed once,
standalone, after a fixed attention-sink prefix that is then dropped (its quality then does not
depend on the first context the chunk appeared in); for a prompt ``prefix + chunks + suffix`` the
chunk KV is realigned to the chunk's new positions and handed to :func:`.forward.blended_prefill`.
The prefix is reused only when its KV is exact (it is the same tokens at the same positions);
the suffix (the question) is always computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_cacheblend.blend.decoder import DecoderOps
from sglang_cacheblend.blend.forward import BlendResult, blended_prefill, full_prefill
from sglang_cacheblend.blend.realign import realign_keys
from sglang_cacheblend.blend.rotary_config import RotaryConfig
from sglang_cacheblend.config import BlendConfig

__all__ = ["BlendedPrompt", "ChunkKV", "blend_prompt", "chunk_kv", "run_blend"]


@dataclass(frozen=True)
class ChunkKV:
    """One chunk's standalone KV: ``k``/``v`` ``(L, n, Hkv, D)`` computed at ``positions``."""

    token_ids: torch.Tensor
    positions: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


@dataclass(frozen=True)
class BlendedPrompt:
    """A prompt laid out as ``prefix + chunks + suffix``, with the rows that may reuse KV."""

    input_ids: torch.Tensor
    reuse_mask: torch.Tensor
    cached_k: torch.Tensor
    cached_v: torch.Tensor


def chunk_kv(model: DecoderOps, sink_ids: torch.Tensor, chunk_ids: torch.Tensor,
             dtype: torch.dtype) -> ChunkKV:
    """Compute a chunk's KV standalone, after ``sink_ids``, and keep only the chunk's rows."""
    ids = torch.cat([sink_ids, chunk_ids])
    result = full_prefill(model, ids, torch.arange(ids.numel()), dtype)
    start = sink_ids.numel()
    return ChunkKV(chunk_ids, torch.arange(start, ids.numel()), result.k[:, start:],
                   result.v[:, start:])


def blend_prompt(
    model: DecoderOps,
    rotary: RotaryConfig,
    prefix_kv: BlendResult | None,
    prefix_ids: torch.Tensor,
    chunks: list[ChunkKV],
    suffix_ids: torch.Tensor,
    dtype: torch.dtype,
) -> BlendedPrompt:
    """Lay out the prompt and its cached KV (chunk K realigned to the chunk's new positions).

    ``prefix_kv`` is an exact prefill of ``prefix_ids`` (or None to compute the prefix too).
    """
    layers, heads, dim = model.num_layers, model.num_kv_heads, model.head_dim
    input_ids = torch.cat([prefix_ids, *[c.token_ids for c in chunks], suffix_ids])
    n = input_ids.numel()
    cached_k = torch.zeros(layers, n, heads, dim, dtype=dtype)
    cached_v = torch.zeros_like(cached_k)
    reuse_mask = torch.zeros(n, dtype=torch.bool)
    start = prefix_ids.numel()
    if prefix_kv is not None and start:
        cached_k[:, :start], cached_v[:, :start] = prefix_kv.k, prefix_kv.v
        reuse_mask[:start] = True
    for chunk in chunks:
        end = start + chunk.token_ids.numel()
        new_positions = torch.arange(start, end)
        flat = chunk.k.reshape(-1, heads, dim)  # all layers in one call: (L * n, Hkv, D)
        cached_k[:, start:end] = realign_keys(
            flat, chunk.positions.repeat(layers), new_positions.repeat(layers), rotary
        ).view_as(chunk.k)
        cached_v[:, start:end] = chunk.v
        reuse_mask[start:end] = True
        start = end
    return BlendedPrompt(input_ids, reuse_mask, cached_k, cached_v)


def run_blend(model: DecoderOps, prompt: BlendedPrompt, config: BlendConfig) -> BlendResult:
    """``blended_prefill`` of a laid-out prompt at its natural positions ``0..N-1``."""
    positions = torch.arange(prompt.input_ids.numel())
    return blended_prefill(model, prompt.input_ids, positions, prompt.reuse_mask,
                           prompt.cached_k, prompt.cached_v, config)
