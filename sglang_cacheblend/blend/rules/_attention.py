"""The suffix's attention probabilities over the rows, the arithmetic of the question rules.

For every suffix query row ``s`` and query head ``h``, ``p[h, s, j]`` is the share of
``(s, h)``'s real attention that row ``j`` receives: the softmax runs over the rows at or before
``s``'s position and over ``context_k`` (keys the suffix sees outside the rows), so a rule scores
against the attention the question actually pays, not a renormalised subset. The probabilities
are written out explicitly (:mod:`sglang_cacheblend.blend.explicit_attention`; the attention
kernel returns outputs, not probabilities), in float32, a block of suffix rows at a time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sglang_cacheblend.blend.explicit_attention import explicit_attention_blocks

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sglang_cacheblend.blend.selection import SelectionInputs

__all__ = ["require_suffix", "row_keys", "suffix_attention_blocks", "suffix_attention_mass"]


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
    num_rows = keys.shape[0]
    positions = (
        inputs.positions.to(torch.int64)
        if inputs.positions is not None
        else torch.arange(num_rows, device=keys.device)
    )
    suffix_positions = positions[num_rows - suffix_q.shape[0]:]
    return explicit_attention_blocks(suffix_q, keys, suffix_positions, positions, inputs.context_k)


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
