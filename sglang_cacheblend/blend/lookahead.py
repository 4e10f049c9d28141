"""Suffix lookahead: where the question will read in the deep layers if the cache is reused.

A selection made after the check layer has to guess which reused rows matter in layers it has
not computed yet. On SmolLM2 the guess is what decides quality. Ranking rows by a first-order
estimate of their effect on the continuation's KL (the gradient of the KL with respect to the
row's KV, dotted with the row's real deviation;
:func:`sglang_cacheblend.eval.offline.selection_ceiling.gradient_ranking`) and recomputing the top
ones closes far more of the KL gap than V deviation's ranking at the same budget
(``docs/results/selection_ceiling.md``). On an item inspected by hand, the rows that ranking puts
first are mostly the passage words the question is about, and their effect sits mostly in the
second half of the layers, where layer-1 statistics (V/K deviation, question attention at
layer 1) do not see it.

The suffix (the question and the chat template's tail) is short and has no cached KV, so it can
be run *alone* through every later layer right after the check layer, attending to the request's
KV as it stands: exact KV of the prefix, cached (realigned) KV of every reused row, its own fresh
KV. That costs ``num_suffix`` rows per later layer (about 1% of a prefill's rows for a
30-token question over a 2.4k-token prompt) and, in the layers whose masses the rule reads, one
explicit softmax per layer (:mod:`.explicit_attention`), whose probabilities give both the masses
and the suffix's attention output (the other layers use the fused kernel). It yields, for every
later layer, the attention mass the question puts on each row, which
:mod:`.rules.question_lookahead` turns into a score.

The suffix's K/V written during the lookahead are provisional: the suffix is recomputed at every
layer of the blended pass, which writes its final K/V before any row reads them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sglang_cacheblend.blend.attention import ScatteredAttention
from sglang_cacheblend.blend.explicit_attention import explicit_attention_blocks

if TYPE_CHECKING:
    from sglang_cacheblend.blend.decoder import DecoderOps, RequestKV

__all__ = ["attention_mass", "suffix_lookahead"]


def attention_mass(
    q: torch.Tensor, keys: torch.Tensor, q_positions: torch.Tensor
) -> torch.Tensor:
    """Attention mass each key position receives from the queries, with an exact causal mask.

    Parameters
    ----------
    q : torch.Tensor
        ``(num_q, num_q_heads, head_dim)``, queries after RoPE at ``q_positions``.
    keys : torch.Tensor
        ``(kv_len, num_kv_heads, head_dim)``, the keys of positions ``0..kv_len-1``.
    q_positions : torch.Tensor
        ``(num_q,)`` int, absolute positions (a query sees keys at positions ``<=`` its own).

    Returns
    -------
    torch.Tensor
        ``(kv_len,)`` float32: ``sum over queries and query heads of softmax(q . k * scale)``,
        ``scale = head_dim ** -0.5`` (the Llama-family scaling).
    """
    return _attend(q, keys, None, q_positions)[0]


def _attend(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor | None, q_positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`attention_mass` and, with ``values``, the attention output ``(num_q, num_q_heads,
    head_dim)`` in ``q``'s dtype from the same probabilities (one softmax serves both)."""
    _, q_heads, dim = q.shape
    kv_len = keys.shape[0]
    key_positions = torch.arange(kv_len, device=keys.device)
    v_h = None if values is None else values.float().permute(1, 0, 2)  # (kv_heads, kv_len, dim)
    total = torch.zeros(kv_len, dtype=torch.float32, device=keys.device)
    outputs = []
    for probs in explicit_attention_blocks(q, keys, q_positions, key_positions):
        total += probs.sum(dim=(0, 1, 2))
        if v_h is not None:
            kv_heads, group, rows, _ = probs.shape
            out = torch.bmm(probs.view(kv_heads, group * rows, kv_len), v_h)
            outputs.append(out.view(kv_heads, group, rows, dim).permute(2, 0, 1, 3)
                           .reshape(rows, q_heads, dim))
    if v_h is None:
        return total, None
    return total, torch.cat(outputs).to(q.dtype)


def suffix_lookahead(
    model: DecoderOps,
    suffix_hidden: torch.Tensor,
    suffix_rows: torch.Tensor,
    suffix_positions: torch.Tensor,
    kv: RequestKV,
    first_layer: int,
    mass_from_layer: int = 0,
) -> torch.Tensor:
    """Run the suffix alone through layers ``first_layer..num_layers-1`` on the stored KV.

    Parameters
    ----------
    model : DecoderOps
        The decoder.
    suffix_hidden : torch.Tensor
        ``(num_suffix, H)``, the suffix's hidden states after layer ``first_layer - 1``. Not
        modified.
    suffix_rows : torch.Tensor
        ``(num_suffix,)`` int64, the suffix's row indices in ``kv`` (where its K/V are written).
    suffix_positions : torch.Tensor
        ``(num_suffix,)`` int64, their absolute positions.
    kv : RequestKV
        The request's KV; every row other than the suffix's holds its final or cached K/V for
        these layers.
    first_layer : int
        First layer to run (the selection layer + 1).
    mass_from_layer : int
        First layer whose masses are computed; the layers before it attend with the fused
        kernel (:class:`.attention.ScatteredAttention`), their masses left zero.

    Returns
    -------
    torch.Tensor
        ``(num_layers, kv_len)`` float32: row ``l >= max(first_layer, mass_from_layer)`` is the
        attention mass the suffix puts on each position at layer ``l`` (:func:`attention_mass`);
        other rows are 0.
    """
    device = suffix_hidden.device
    masses = torch.zeros(model.num_layers, kv.kv_len, dtype=torch.float32, device=device)
    fused = None if mass_from_layer <= first_layer else ScatteredAttention.for_request(
        suffix_positions, kv.kv_len, model, dtype=suffix_hidden.dtype, device=device
    )
    x = suffix_hidden.clone()
    for layer in range(first_layer, model.num_layers):
        q, k, v = model.qkv(layer, x, suffix_positions)
        kv.write(layer, suffix_rows, k, v)
        keys, values = kv.keys_values(layer)
        last = layer + 1 == model.num_layers  # the last layer's output is never read
        if fused is not None and layer < mass_from_layer:
            out = fused.run(q, keys, values)
        else:
            masses[layer], out = _attend(q, keys, None if last else values, suffix_positions)
        if not last:
            x = x + model.attn_out(layer, out)
            x = x + model.mlp(layer, x)
    return masses
