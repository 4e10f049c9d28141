"""The blended prefill of one request, top to bottom, over any Llama-family decoder.

This is CacheBlend's forward pass written once against a small interface
(:class:`.decoder.DecoderOps`, with the request's KV behind :class:`.decoder.RequestKV`), so the
same loop runs over transformers' Llama modules (:mod:`.hf_llama`, the exactness and quality
reference) and, through an adapter, over SGLang's layers. Per layer::

    rows = plan.rows(layer)                      all rows through the check layer, then HKVD rows
    x = norm_in(hidden[rows]); q, k, v = qkv(x, positions[rows])      k after RoPE
    if selection layer: plan.update(layer, fresh vs cached k/v of rows, the suffix's q,
                                    the keys outside rows)
    k_store[layer][rows], v_store[layer][rows] = k, v              other rows keep cached KV
    hidden[rows] += o_proj(attention(q, k_store[layer], v_store[layer]))   exact causal mask
    hidden[rows] += mlp(norm_post(hidden[rows]))

Rows that were not recomputed keep their cached (RoPE-realigned) KV and never change again;
their hidden states are stale after the check layer, which is CacheBlend's approximation. The
last row (the end of the question) never has cached KV, so it is computed at every layer and its
logits are exact given the blended KV. With ``recompute_ratio == 1`` every row is computed at
every layer and the result equals a full prefill; with cached KV equal to the true prompt KV any
ratio gives a full prefill too.

Shapes: ``N`` rows (the request's tokens, position order), ``L`` layers, ``H`` hidden size,
``Hq``/``Hkv`` query/KV heads, ``D`` head dim. Cached K/V are ``(L, N, Hkv, D)`` already realigned
to the rows' positions (:func:`.realign.realign_keys`); rows with ``reuse_mask`` False hold
anything.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch

from sglang_cacheblend.blend.attention import ScatteredAttention
from sglang_cacheblend.blend.decoder import DecoderOps, RequestKV, TensorRequestKV
from sglang_cacheblend.blend.lookahead import suffix_lookahead
from sglang_cacheblend.blend.plan import BlendPlan
from sglang_cacheblend.blend.selection import SelectionInputs, Selector
from sglang_cacheblend.config import BlendConfig

__all__ = [
    "BlendResult", "Extension", "blend_layers", "blended_prefill", "extend", "extend_with_kv",
    "full_prefill", "suffix_length",
]


@dataclass(frozen=True)
class BlendResult:
    """Output of one blended prefill.

    ``logits`` are the last row's ``(V,)`` float32 logits; ``k``/``v`` are the request's KV after
    blending, ``(L, N, Hkv, D)`` (what decode would attend to); ``recomputed_rows`` is the cost,
    rows computed summed over layers; ``full_rows`` is ``N * L``.
    """

    logits: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    recomputed_rows: int
    full_rows: int


def suffix_length(reuse_mask: torch.Tensor) -> int:
    """Length of the suffix: the rows after the last reused row (all rows if none is reused).

    The suffix is the question (and the chat template's tail): never cached, computed at every
    layer, and the rows whose queries the question-attention selectors read.
    """
    reused = torch.nonzero(reuse_mask).flatten()
    n = reuse_mask.shape[0]
    return n if reused.numel() == 0 else n - 1 - int(reused[-1])


def blend_layers(
    model: DecoderOps,
    hidden: torch.Tensor,
    positions: torch.Tensor,
    reuse_mask: torch.Tensor,
    kv: RequestKV,
    config: BlendConfig,
    selector: Selector | None = None,
) -> BlendPlan:
    """Run every decoder layer of one request, recomputing only the plan's rows after the check.

    ``hidden`` ``(N, H)`` holds the embeddings of the request's new rows and is updated in place
    (rows never recomputed keep their last value); ``positions`` ``(N,)`` are their absolute
    positions, the last ``N`` of ``0..kv.kv_len-1``; ``kv`` holds cached K/V for reused rows and
    receives the fresh K/V of recomputed rows. Returns the finished plan (its cost counters).

    For rules that read them, every selection step hands the selector the suffix's queries
    (:func:`suffix_length`) and the keys outside the step's rows (``context_k``), so
    question-attention rules see the suffix's real softmax; lookahead rules also get the
    suffix's attention in every later layer (:mod:`.lookahead`). A selection step scores the
    layer's fresh K/V against the cached ones read before the write, and is applied after the
    layer has run (it only decides the rows of later layers).
    """
    n = hidden.shape[0]
    if positions.shape != (n,) or reuse_mask.shape != (n,):
        raise ValueError(
            f"positions and reuse_mask must be ({n},), got {tuple(positions.shape)}, "
            f"{tuple(reuse_mask.shape)}"
        )
    if bool(reuse_mask[-1]):
        raise ValueError("the last row must not be reused: its logits feed sampling")
    plan = BlendPlan(config, reuse_mask, model.num_layers, selector)
    num_suffix = suffix_length(reuse_mask)
    attention: ScatteredAttention | None = None
    planned_rows: torch.Tensor | None = None
    for layer in range(model.num_layers):
        rows = plan.rows(layer)
        if rows is not planned_rows:  # plan the attention once per row set, not per layer
            planned_rows = rows
            attention = ScatteredAttention.for_request(
                positions[rows], kv.kv_len, model, dtype=hidden.dtype, device=hidden.device
            )
        x = hidden[rows]
        q, k, v = model.qkv(layer, x, positions[rows])
        inputs = None
        if plan.is_selection_layer(layer):  # read the cached K/V before they are overwritten
            inputs = _selection_inputs(layer, rows, q, k, v, positions, reuse_mask, kv,
                                       num_suffix if plan.reads_suffix else None)
        kv.write(layer, rows, k, v)
        x = x + model.attn_out(layer, attention.run(q, *kv.keys_values(layer)))
        hidden[rows] = x + model.mlp(layer, x)
        if inputs is not None:  # the selection only shapes later layers
            if plan.reads_lookahead and plan.step_has_choice(layer):
                inputs = _with_lookahead(model, inputs, hidden, rows, positions, kv, layer,
                                         num_suffix, plan)
            plan.update(layer, inputs)
    return plan


def _with_lookahead(model: DecoderOps, inputs: SelectionInputs, hidden: torch.Tensor,
                    rows: torch.Tensor, positions: torch.Tensor, kv: RequestKV, layer: int,
                    num_suffix: int, plan: BlendPlan) -> SelectionInputs:
    """``inputs`` with ``lookahead_mass``: the suffix run alone through the later layers on the
    KV as it stands (:func:`.lookahead.suffix_lookahead`); its rows are paid for in the plan."""
    n = hidden.shape[0]  # the last row is never reused, so the suffix has >= 1 row
    suffix = torch.arange(n - num_suffix, n, device=rows.device)
    masses = suffix_lookahead(model, hidden[suffix], suffix, positions[suffix], kv, layer + 1,
                              plan.lookahead_first_layer())
    plan.add_lookahead_rows(num_suffix * (model.num_layers - layer - 1))
    row_positions = positions[rows].to(masses.device)
    return dataclasses.replace(inputs, lookahead_mass=masses[:, row_positions])


def _selection_inputs(
    layer: int,
    rows: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    reuse_mask: torch.Tensor,
    kv: RequestKV,
    num_suffix: int | None,
) -> SelectionInputs:
    """What the selector sees at a selection layer, read before the fresh K/V are written.

    With ``num_suffix`` (only for rules that read it, :attr:`.selection.Selector.reads_suffix`): the
    suffix rows are the last ``num_suffix`` of ``rows`` (never-reused rows are in every row set),
    and ``context_k`` is every stored key whose position is not one of ``rows``: a cached prefix
    and the reused rows this layer does not compute (their cached, realigned K); all of them
    precede the suffix.
    """
    cached_k, cached_v = kv.cached(layer, rows)
    suffix_q = context_k = None
    if num_suffix is not None:
        all_k = kv.keys_values(layer)[0]
        outside = torch.ones(all_k.shape[0], dtype=torch.bool, device=all_k.device)
        outside[positions[rows].to(all_k.device)] = False
        suffix_q, context_k = q[q.shape[0] - num_suffix:], all_k[outside]
    return SelectionInputs(
        fresh_k=k, fresh_v=v, cached_k=cached_k, cached_v=cached_v,
        reuse_mask=reuse_mask[rows], suffix_q=suffix_q, positions=positions[rows],
        context_k=context_k,
    )


def blended_prefill(
    model: DecoderOps,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    reuse_mask: torch.Tensor,
    cached_k: torch.Tensor,
    cached_v: torch.Tensor,
    config: BlendConfig,
    selector: Selector | None = None,
) -> BlendResult:
    """Prefill one whole request, reusing ``cached_k``/``cached_v`` where ``reuse_mask`` is True.

    Parameters
    ----------
    input_ids, positions : torch.Tensor
        ``(N,)`` int64; ``positions`` are ``0..N-1``.
    reuse_mask : torch.Tensor
        ``(N,)`` bool; the last row must be False (the question is always computed).
    cached_k, cached_v : torch.Tensor
        ``(L, N, Hkv, D)``, the model's dtype; K realigned to ``positions``. Not modified.
    config : BlendConfig
        Ratio schedule and selector.
    selector : Selector, optional
        A rule object used instead of ``config.selector`` (see :class:`.plan.BlendPlan`).
    """
    n = input_ids.numel()
    shape = (model.num_layers, n, model.num_kv_heads, model.head_dim)
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be (N,), got {tuple(input_ids.shape)}")
    if cached_k.shape != shape or cached_v.shape != shape:
        raise ValueError(f"cached_k/v must be {shape}, got {tuple(cached_k.shape)}")
    kv = TensorRequestKV(cached_k.clone(), cached_v.clone())
    hidden = model.embed(input_ids)
    plan = blend_layers(model, hidden, positions, reuse_mask, kv, config, selector)
    return BlendResult(
        logits=model.logits(hidden[-1:])[0],
        k=kv.k,
        v=kv.v,
        recomputed_rows=plan.recomputed_rows,
        full_rows=plan.full_rows,
    )


def full_prefill(model: DecoderOps, input_ids: torch.Tensor, positions: torch.Tensor,
                 dtype: torch.dtype) -> BlendResult:
    """A plain prefill through the same loop (nothing reused): the reference and chunk KV."""
    n = input_ids.numel()
    empty = torch.zeros(model.num_layers, n, model.num_kv_heads, model.head_dim, dtype=dtype)
    return blended_prefill(
        model, input_ids, positions, torch.zeros(n, dtype=torch.bool), empty, empty,
        BlendConfig(recompute_ratio=1.0),
    )


class Extension(NamedTuple):
    """Output of :func:`extend_with_kv`: ``(M, V)`` float32 logits and the new tokens' K/V,
    ``(L, M, Hkv, D)`` (append them to the prefix to go on decoding)."""

    logits: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


def extend(model: DecoderOps, k_prefix: torch.Tensor, v_prefix: torch.Tensor,
           input_ids: torch.Tensor) -> torch.Tensor:
    """Run new tokens after a fixed KV prefix (decode, or teacher forcing) and return logits.

    ``k_prefix``/``v_prefix`` are ``(L, P, Hkv, D)`` for positions ``0..P-1`` (e.g. a
    ``BlendResult``'s KV); the ``M`` new tokens take positions ``P..P+M-1``, attend to the prefix
    and to each other causally, and leave the prefix untouched. Returns ``(M, V)`` float32 logits.
    Scoring a continuation this way keeps it out of the blend's view: the selection was made on
    the prompt alone, exactly as at generation time.
    """
    return extend_with_kv(model, k_prefix, v_prefix, input_ids).logits


def extend_with_kv(model: DecoderOps, k_prefix: torch.Tensor, v_prefix: torch.Tensor,
                   input_ids: torch.Tensor) -> Extension:
    """:func:`extend` that also returns the new tokens' K/V, so greedy decoding can append them
    and run one token per step instead of the whole continuation again."""
    prefix_len, m = k_prefix.shape[1], input_ids.numel()
    positions = torch.arange(prefix_len, prefix_len + m)
    attention = ScatteredAttention.for_request(
        positions, prefix_len + m, model, dtype=k_prefix.dtype, device=k_prefix.device
    )
    hidden = model.embed(input_ids)
    new_k, new_v = [], []
    for layer in range(model.num_layers):
        q, k, v = model.qkv(layer, hidden, positions)
        new_k.append(k)
        new_v.append(v)
        keys = torch.cat([k_prefix[layer], k])
        values = torch.cat([v_prefix[layer], v])
        x = hidden + model.attn_out(layer, attention.run(q, keys, values))
        hidden = x + model.mlp(layer, x)
    return Extension(model.logits(hidden), torch.stack(new_k), torch.stack(new_v))
