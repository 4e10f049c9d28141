"""Attention probabilities written out, for the places that read them rather than the output.

The fused kernels (:mod:`.attention`) return attention outputs, never probabilities. The
question rules (:mod:`.rules._attention`) and the suffix lookahead (:mod:`.lookahead`) need the
probabilities themselves (how much attention each key receives), so they compute them here,
once, with the same causal rule as the kernels: a query at position ``p`` sees the keys at
positions ``<= p``. For query row ``s``, query head ``h`` and a key ``j`` it sees::

    p[h, s, j] = exp(q_sh . k_j * scale) / Z_sh
    Z_sh       = sum over the keys s sees and over extra_keys of exp(q_sh . k * scale)

``extra_keys`` (keys outside ``keys`` that every query sees, such as a cached prefix) join only
the denominator, so ``p`` is each key's share of the queries' real attention, not of a
renormalised subset. ``scale`` is ``head_dim ** -0.5``, the Llama-family scaling the kernels use.
GQA without expanding K: query head ``kv_head * group + g`` reads KV head ``kv_head``. Float32
throughout; query rows go in blocks so memory stays ``O(block * num_q_heads * num_keys)`` on long
prompts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["BLOCK_QUERY_ROWS", "explicit_attention_blocks"]

BLOCK_QUERY_ROWS = 64


def explicit_attention_blocks(
    q: torch.Tensor,
    keys: torch.Tensor,
    q_positions: torch.Tensor,
    key_positions: torch.Tensor,
    extra_keys: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """The queries' attention probabilities over ``keys``, one block of query rows at a time.

    Parameters
    ----------
    q : torch.Tensor
        ``(num_q, num_q_heads, head_dim)``, any float dtype: queries after RoPE at
        ``q_positions``. ``num_q_heads`` is a multiple of ``num_kv_heads``.
    keys : torch.Tensor
        ``(num_keys, num_kv_heads, head_dim)``, any float dtype, on the device of the result.
    q_positions : torch.Tensor
        ``(num_q,)`` int, absolute positions of the query rows.
    key_positions : torch.Tensor
        ``(num_keys,)`` int, absolute positions of ``keys``, in any order.
    extra_keys : torch.Tensor, optional
        ``(num_extra, num_kv_heads, head_dim)``: keys every query sees that only join the
        softmax denominator (no mask, no column in the result). Default: none.

    Returns
    -------
    Iterator[torch.Tensor]
        One ``(num_kv_heads, group, b, num_keys)`` float32 tensor on ``keys``' device per block
        of ``b`` (at most :data:`BLOCK_QUERY_ROWS`) query rows, in query order, computed as it
        is read; ``group = num_q_heads // num_kv_heads``; zero where a key's position is after
        the query's.

    Raises
    ------
    ValueError
        On the call (not at the first block) when the shapes do not fit together.
    """
    _check_inputs(q, keys, q_positions, key_positions, extra_keys)
    return _blocks(q, keys, q_positions, key_positions, extra_keys)


def _blocks(q: torch.Tensor, keys: torch.Tensor, q_positions: torch.Tensor,
            key_positions: torch.Tensor, extra_keys: torch.Tensor | None) -> Iterator[torch.Tensor]:
    """The blocks of :func:`explicit_attention_blocks`, whose inputs are already checked."""
    num_q, q_heads, dim = q.shape
    num_keys, kv_heads, _ = keys.shape
    group = q_heads // kv_heads
    scale = dim**-0.5
    device = keys.device
    q_positions, key_positions = q_positions.to(device), key_positions.to(device)
    k_t = keys.float().permute(1, 2, 0)  # (kv_heads, dim, num_keys)
    extra_t = None
    if extra_keys is not None and extra_keys.shape[0]:
        extra_t = extra_keys.float().permute(1, 2, 0)  # (kv_heads, dim, num_extra)
    for start in range(0, num_q, BLOCK_QUERY_ROWS):
        end = min(num_q, start + BLOCK_QUERY_ROWS)
        rows = end - start
        block = q[start:end].float().view(rows, kv_heads, group, dim)
        block = block.permute(1, 2, 0, 3).reshape(kv_heads, group * rows, dim) * scale
        logits = torch.bmm(block, k_t).view(kv_heads, group, rows, num_keys)
        future = key_positions[None, :] > q_positions[start:end, None]  # (rows, num_keys)
        logits = logits.masked_fill(future, float("-inf"))
        if extra_t is None:  # the keys are the whole denominator: a plain softmax
            yield logits.softmax(dim=-1)
            continue
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        extra = torch.bmm(block, extra_t).view(kv_heads, group, rows, -1)
        lse = torch.logaddexp(lse, torch.logsumexp(extra, dim=-1, keepdim=True))
        yield torch.exp(logits - lse)


def _check_inputs(q: torch.Tensor, keys: torch.Tensor, q_positions: torch.Tensor,
                  key_positions: torch.Tensor, extra_keys: torch.Tensor | None) -> None:
    if q.dim() != 3 or keys.dim() != 3 or q.shape[2] != keys.shape[2]:
        raise ValueError(
            "q must be (num_q, num_q_heads, head_dim) and keys (num_keys, num_kv_heads, "
            f"head_dim) with the same head_dim, got {tuple(q.shape)} and {tuple(keys.shape)}"
        )
    if keys.shape[1] == 0 or q.shape[1] % keys.shape[1]:
        raise ValueError(
            f"num_q_heads {q.shape[1]} must be a multiple of num_kv_heads {keys.shape[1]}"
        )
    if q_positions.shape != q.shape[:1] or key_positions.shape != keys.shape[:1]:
        raise ValueError(
            f"q_positions must be ({q.shape[0]},) and key_positions ({keys.shape[0]},), got "
            f"{tuple(q_positions.shape)} and {tuple(key_positions.shape)}"
        )
    if extra_keys is not None and (extra_keys.dim() != 3 or extra_keys.shape[1:] != keys.shape[1:]):
        raise ValueError(
            f"extra_keys must be (num_extra, {keys.shape[1]}, {keys.shape[2]}), got "
            f"{tuple(extra_keys.shape)}"
        )
