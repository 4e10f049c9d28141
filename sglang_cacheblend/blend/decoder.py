"""What the blended forward needs from a decoder and from a request's KV: the interfaces only.

They live apart from :mod:`.forward` so that the parts the forward loop calls into (the suffix
lookahead, :mod:`.lookahead`) can name them without importing the loop back, and so that each
adapter (transformers in :mod:`.hf_llama`, SGLang's layers and KV pool in ``srt/``) implements
a small protocol rather than a loop.

Shapes: ``N`` rows (a request's new tokens, position order), ``L`` layers, ``H`` hidden size,
``Hq``/``Hkv`` query/KV heads, ``D`` head dim, ``V`` vocabulary size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

__all__ = ["DecoderDims", "DecoderOps", "RequestKV", "TensorRequestKV"]


@dataclass(frozen=True)
class DecoderDims:
    """Layer and head counts of a Llama-family config (HF-style attribute names)."""

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_hf_config(cls, config: Any) -> DecoderDims:
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        return cls(config.num_hidden_layers, config.num_attention_heads,
                   config.num_key_value_heads, head_dim)

    def assign_to(self, ops: Any) -> None:
        """Give a ``DecoderOps`` adapter these counts as its own attributes."""
        ops.num_layers, ops.num_q_heads = self.num_layers, self.num_q_heads
        ops.num_kv_heads, ops.head_dim = self.num_kv_heads, self.head_dim


class DecoderOps(Protocol):
    """The parts of a decoder-only model the blended forward needs (no fused residuals)."""

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(N,)`` int64 -> ``(N, H)``."""

    def qkv(
        self, layer: int, hidden: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input norm, projections and RoPE: ``(n, H)`` -> q ``(n, Hq, D)``, k/v ``(n, Hkv, D)``."""

    def attn_out(self, layer: int, attn: torch.Tensor) -> torch.Tensor:
        """Output projection: ``(n, Hq, D)`` -> ``(n, H)``."""

    def mlp(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Post-attention norm and MLP: ``(n, H)`` -> ``(n, H)`` (the residual is added outside)."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: ``(n, H)`` -> ``(n, V)``, float32."""


class RequestKV(Protocol):
    """Where one request's per-layer K/V live: keys for positions ``0..kv_len-1`` in order.

    Rows index the request's *new* tokens (the ones being prefilled); a cached prefix, if any,
    occupies the first ``kv_len - N`` positions and is only read.
    """

    kv_len: int

    def cached(self, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached (realigned) K/V of ``rows`` before they are overwritten at ``layer``."""

    def write(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store fresh K/V of ``rows`` at ``layer``."""

    def keys_values(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All ``(kv_len, Hkv, D)`` K/V of the request at ``layer``, position order."""


@dataclass
class TensorRequestKV:
    """``RequestKV`` over ``(L, N, Hkv, D)`` tensors (the whole request is new rows)."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def kv_len(self) -> int:
        return self.k.shape[1]

    def cached(self, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer, rows], self.v[layer, rows]

    def write(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer, rows] = k
        self.v[layer, rows] = v

    def keys_values(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer], self.v[layer]
