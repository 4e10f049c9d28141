"""The suffix's attention probabilities over the rows, the arithmetic of the question rules.

Written out explicitly (not read back from the attention kernel, which returns outputs, not
probabilities): for every suffix query row ``s`` and query head ``h``::

    p[h, s, j] = exp(q_sh . k_j * scale) / Z_sh      j a row at or before s's position
    Z_sh       = sum over those rows and over context_k of exp(q_sh . k * scale)

so ``p[h, s, :]`` is the share of ``(s, h)``'s real attention each row receives, ``context_k``
(keys the suffix sees outside the rows) included in the denominator. ``scale`` is
``head_dim ** -0.5``, the Llama-family scaling that :class:`..attention.ScatteredAttention` uses.
Float32 throughout. Suffix rows are processed in blocks so memory stays
``O(block * num_q_heads * num_rows)`` on long prompts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sglang_cacheblend.blend.base import SelectionInputs

__all__ = ["require_suffix", "row_keys", "suffix_attention_blocks", "suffix_attention_mass"]

_BLOCK_SUFFIX_ROWS = 64


def require_suffix(inputs: SelectionInputs, rule: str) -> torch.Tensor:
    """``inputs.suffix_q``, or ``ValueError`` naming ``rule`` when the caller did not pass it."""
    if inputs.suffix_q is None or inputs.suffix_q.shape[0] == 0:
        raise ValueError(
            f"selector {rule!r} scores by the suffix's attention and needs "
            "SelectionInputs.suffix_q (the question's queries); none was given"
        )
    return inputs.suffix_q


def row_keys(inputs: SelectionInputs, cached: bool) -> torch.Tensor:
    """Keys of the rows as the suffix would see them: cached K of reused rows (``cached``) or
    fresh K; rows without cached KV always take their fresh K (their cached K is undefined).

    Returns ``(num_rows, num_kv_heads, head_dim)`` float32.
    """
    if not cached:
        return inputs.fresh_k.float()
    mask = inputs.reuse_mask[:, None, None]
    return torch.where(mask, inputs.cached_k.float(), inputs.fresh_k.float())


def suffix_attention_blocks(
    inputs: SelectionInputs, keys: torch.Tensor, rule: str
) -> Iterator[torch.Tensor]:
    """Yield the suffix's attention probabilities over the rows, a block of suffix rows at a time.

    Each block is ``(num_kv_heads, group, b, num_rows)`` float32 for ``b`` consecutive suffix
    rows (query head ``kv_head * group + g``), zero where causality hides a row.

    Parameters
    ----------
    inputs : SelectionInputs
        Must carry ``suffix_q``; ``positions`` (else the row index) orders rows for the causal
        mask; ``context_k`` joins the denominator.
    keys : torch.Tensor
        ``(num_rows, num_kv_heads, head_dim)`` float32, the rows' keys (:func:`row_keys`).
    rule : str
        Selector name, for the error message.
    """
    suffix_q = require_suffix(inputs, rule)
    num_rows, kv_heads, dim = keys.shape
    num_suffix, q_heads = suffix_q.shape[0], suffix_q.shape[1]
    group = q_heads // kv_heads
    scale = dim**-0.5
    pos = (
        inputs.positions.to(torch.int64)
        if inputs.positions is not None
        else torch.arange(num_rows, device=keys.device)
    )
    suffix_pos = pos[num_rows - num_suffix :]
    k_t = keys.permute(1, 2, 0)  # (kv_heads, dim, num_rows)
    ctx_t = None
    if inputs.context_k is not None and inputs.context_k.shape[0]:
        ctx_t = inputs.context_k.float().permute(1, 2, 0)  # (kv_heads, dim, num_context)
    for start in range(0, num_suffix, _BLOCK_SUFFIX_ROWS):
        end = min(num_suffix, start + _BLOCK_SUFFIX_ROWS)
        q = suffix_q[start:end].float().view(end - start, kv_heads, group, dim)
        q = q.permute(1, 2, 0, 3).reshape(kv_heads, group * (end - start), dim) * scale
        logits = torch.bmm(q, k_t).view(kv_heads, group, end - start, num_rows)
        hidden = pos[None, :] > suffix_pos[start:end, None]  # (b, num_rows): future rows
        logits = logits.masked_fill(hidden, float("-inf"))
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        if ctx_t is not None:
            ctx = torch.bmm(q, ctx_t).view(kv_heads, group, end - start, -1)
            lse = torch.logaddexp(lse, torch.logsumexp(ctx, dim=-1, keepdim=True))
        yield torch.exp(logits - lse)


def suffix_attention_mass(inputs: SelectionInputs, cached: bool, rule: str) -> torch.Tensor:
    """Attention mass each row receives from the suffix: ``sum over (h, s) of p[h, s, j]``.

    Returns ``(num_rows,)`` float32 on the inputs' device; suffix rows get their (ignored)
    mass from later suffix rows too.
    """
    keys = row_keys(inputs, cached)
    total = torch.zeros(keys.shape[0], dtype=torch.float32, device=keys.device)
    for probs in suffix_attention_blocks(inputs, keys, rule):
        total += probs.sum(dim=(0, 1, 2))
    return total
