"""Chunk keys: token ids packed to bytes, and the default chunk hash."""

from __future__ import annotations

import hashlib
from array import array
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from radix_ext.chunk_types import TokenIds

TOKEN_BYTES = 8
"""Bytes per packed token id (int64)."""


def pack_token_ids(token_ids: TokenIds) -> bytes:
    """Pack token ids to native-endian int64 bytes, ``TOKEN_BYTES`` per token.

    Parameters
    ----------
    token_ids : sequence of int or torch.Tensor
        Shape ``(num_tokens,)``; a tensor may have any integer dtype and live on any device
        (it is copied to CPU).

    Returns
    -------
    bytes
        ``num_tokens * TOKEN_BYTES`` bytes; a span ``[start, end)`` of the tokens is the byte
        slice ``[start * TOKEN_BYTES, end * TOKEN_BYTES)``.
    """
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() != 1 or token_ids.is_floating_point() or token_ids.is_complex():
            raise ValueError(
                f"token_ids must be a 1-D integer tensor, got {token_ids.dtype} "
                f"of shape {tuple(token_ids.shape)}"
            )
        return token_ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()
    return array("q", token_ids).tobytes()


def default_chunk_hash(token_bytes: bytes) -> bytes:
    """BLAKE2b-128 of packed token ids: stable across processes and TP ranks."""
    return hashlib.blake2b(token_bytes, digest_size=16).digest()
