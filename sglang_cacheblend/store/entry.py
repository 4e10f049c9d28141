"""What a tier stores for one chunk, and the key it is stored under."""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["ChunkKV", "chunk_key"]


def chunk_key(namespace: Hashable, token_ids: Sequence[int] | torch.Tensor) -> str:
    """A stable hex key for a chunk: BLAKE2b-256 of its namespace and token ids.

    Stable across processes and restarts (the disk tier's file names), unlike ``hash()``;
    the namespace's ``repr`` carries every field that decides the KV (model, ``cache_salt``,
    ``extra_key``, RoPE, variant), so KV of one namespace never answers for another.
    """
    ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
    digest = hashlib.blake2b(digest_size=32)
    digest.update(repr(namespace).encode())
    digest.update(b"\0")
    digest.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True, eq=False)
class ChunkKV:
    """One chunk's KV as the pool held it: every layer, post-RoPE keys.

    ``k``/``v``: ``(num_layers, num_tokens, num_kv_heads, head_dim)``, CPU, any float dtype;
    ``positions``: ``(num_tokens,)`` int64, the positions the keys were rotated at (so a reader
    realigns them); ``token_ids``: ``(num_tokens,)`` int64, compared on every read, so a key
    collision can never serve another chunk's KV.
    """

    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    token_ids: torch.Tensor

    def __post_init__(self) -> None:
        if self.k.dim() != 4 or self.k.shape != self.v.shape or self.k.dtype != self.v.dtype:
            raise ValueError(f"k and v must be equal-shaped 4-D tensors, got "
                             f"{tuple(self.k.shape)} {self.k.dtype} and "
                             f"{tuple(self.v.shape)} {self.v.dtype}")
        n = self.k.shape[1]
        for name in ("positions", "token_ids"):
            t = getattr(self, name)
            if t.shape != (n,) or t.dtype != torch.int64:
                raise ValueError(f"{name} must be int64 of shape ({n},), got "
                                 f"{tuple(t.shape)} {t.dtype}")

    @property
    def nbytes(self) -> int:
        """Bytes the entry occupies (what tier capacities count)."""
        return sum(t.numel() * t.element_size()
                   for t in (self.k, self.v, self.positions, self.token_ids))
