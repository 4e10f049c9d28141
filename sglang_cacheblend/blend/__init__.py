"""The CacheBlend algorithm in plain torch: no SGLang imports (a test enforces it).

Data each part expects and returns (one request = one prompt; ``rows`` are a request's new
tokens in position order; ``positions`` are absolute positions in the new prompt, 0-based):

RoPE realignment (:mod:`.realign`, :mod:`.rotary_config`)
    ``realign_keys(keys, old_positions, new_positions, rotary) -> keys'``
    keys ``(num_tokens, num_kv_heads, head_dim)`` fp32/fp16/bf16 post-RoPE at ``old_positions``
    ``(num_tokens,)`` int; returns keys post-RoPE at ``new_positions`` (any delta, negative
    too). ``realign_keys_inplace`` does it in place. ``RotaryConfig.from_hf_config(hf_config)``
    describes the model's RoPE and refuses scalings that cannot be realigned (yarn, dynamic, ...).

HKVD selection (:mod:`.selection`, :mod:`.budget`, ``rules/``, :mod:`.registry`)
    ``SelectionInputs(fresh_k, fresh_v, cached_k, cached_v, reuse_mask, suffix_q=None,
    positions=None, context_k=None)``: K/V ``(num_rows, num_kv_heads, head_dim)`` of one request
    at one layer, cached K realigned, ``reuse_mask (num_rows,)`` bool; ``suffix_q`` the queries
    of the suffix (the rows after the last reused row: the question), which are the last rows;
    ``context_k`` the keys the suffix sees outside the rows. A ``Selector.score(inputs)`` returns
    ``(num_rows,)`` float32; ``select_top_rows`` keeps ``selection_budget(ratio, n, min)``
    reused rows (round half up, see :mod:`.budget`) plus every non-reused row, ties to the earlier
    position, returned as sorted int64 row indices. Rules: ``v_deviation`` (the paper's),
    ``k_deviation`` (LMCache), ``question_attention[_cached]``, ``attention_x_v_deviation``,
    ``attention_plus_k_deviation``, ``question_output_error``, and ``question_lookahead`` (the
    default), which reads ``lookahead_mass``: the suffix run ahead through the later layers on
    the cached KV (:mod:`.lookahead`); measured against each other in
    ``docs/results/selector_sweep*.md``.

Per-request plan (:mod:`.plan`)
    ``BlendPlan(config, reuse_mask, num_layers)``: ``rows(layer)`` are the int64 row indices to
    compute at a layer (all rows through ``check_layer``, then a shrinking subset, gradual
    filtering included); ``update(layer, inputs)`` at each selection layer;
    ``recomputed_rows`` is the cost (rows computed summed over layers).

Scattered-row attention (:mod:`.attention`)
    ``ScatteredAttention(q_positions, cu_q, cu_k, num_q_heads=, num_kv_heads=, head_dim=,
    dtype=, device=)`` plans once per batch; ``run(q, k, v)`` per layer with packed
    ``q (total_q, num_q_heads, head_dim)`` and ``k, v (total_k, num_kv_heads, head_dim)``
    (request ``b``'s keys are all its positions ``0..kv_len_b-1``); a query at position ``p``
    sees keys ``<= p`` exactly. Returns ``(total_q, num_q_heads, head_dim)``.
    ``ScatteredAttention.for_request(q_positions, kv_len, dims, dtype=, device=)`` plans a batch
    of one request (``dims``: anything with ``num_q_heads``, ``num_kv_heads``, ``head_dim``).

Blended forward (:mod:`.forward`, over the interfaces of :mod:`.decoder`)
    ``blended_prefill(model, input_ids, positions, reuse_mask, cached_k, cached_v, config)``
    runs one request through a ``DecoderOps`` (:mod:`.hf_llama` adapts transformers; ``srt/``
    adapts SGLang), its KV behind a ``RequestKV``; ``DecoderDims.from_hf_config`` reads the head
    counts of an HF config.

Configuration lives in :class:`sglang_cacheblend.config.BlendConfig`.
"""

from __future__ import annotations

from sglang_cacheblend.blend.attention import ScatteredAttention
from sglang_cacheblend.blend.budget import select_top_rows, selection_budget
from sglang_cacheblend.blend.plan import BlendPlan
from sglang_cacheblend.blend.realign import realign_keys, realign_keys_inplace
from sglang_cacheblend.blend.registry import SELECTORS, build_selector
from sglang_cacheblend.blend.rotary_config import RotaryConfig
from sglang_cacheblend.blend.selection import SelectionInputs, Selector

__all__ = [
    "SELECTORS",
    "BlendPlan",
    "RotaryConfig",
    "ScatteredAttention",
    "SelectionInputs",
    "Selector",
    "build_selector",
    "realign_keys",
    "realign_keys_inplace",
    "select_top_rows",
    "selection_budget",
]
