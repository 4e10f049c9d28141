"""CUDA path of scattered-row attention: FlashInfer ragged prefill with a custom mask.

Imported only by :class:`~sglang_cacheblend.blend.attention.ScatteredAttention` for CUDA tensors
in float16/bfloat16 when ``flashinfer`` imports. The mask of request ``b`` is the exact causal
mask by position, ``mask[i, j] = (j <= q_positions[i])`` over its ``(q_len_b, kv_len_b)``
rectangle, flattened request after request as FlashInfer's ``custom_mask`` expects (FlashInfer
packs it to bits in ``plan``). ``causal=False``: FlashInfer's own causal mask is bottom-right
aligned, which is exact only for contiguous trailing rows.

Not run on this project's CPU-only machines; ``tests/blend/test_attention.py`` compares it with
the torch path when a GPU is present.
"""

from __future__ import annotations

import torch

__all__ = ["FlashInferScatteredPlan"]

_WORKSPACE_BYTES = 128 * 1024 * 1024


class FlashInferScatteredPlan:
    """FlashInfer ``BatchPrefillWithRaggedKVCacheWrapper`` planned for scattered query rows.

    Parameters
    ----------
    positions : torch.Tensor
        Shape ``(total_q,)``, int64, CPU: absolute position of each packed query row, validated
        by the caller.
    q_offsets, k_offsets : list of int
        ``cu_q`` and ``cu_k`` as Python lists (``batch_size + 1`` entries).
    num_q_heads, num_kv_heads, head_dim : int
        Head layout; GQA when ``num_q_heads > num_kv_heads``.
    dtype : torch.dtype
        float16 or bfloat16.
    device : torch.device
        A CUDA device.
    scale : float
        Softmax scale.
    workspace : torch.Tensor, optional
        uint8 workspace on ``device``; 128 MiB is allocated when omitted. Owned by this plan.
    """

    def __init__(
        self,
        positions: torch.Tensor,
        q_offsets: list[int],
        k_offsets: list[int],
        *,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        scale: float,
        workspace: torch.Tensor | None = None,
    ) -> None:
        import flashinfer.prefill

        if workspace is None:
            workspace = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._workspace = workspace
        masks = []
        pos = positions.to(device)
        for b in range(len(q_offsets) - 1):
            kv_len = k_offsets[b + 1] - k_offsets[b]
            rows = pos[q_offsets[b] : q_offsets[b + 1]]
            keys = torch.arange(kv_len, device=device)
            masks.append((keys[None, :] <= rows[:, None]).flatten())
        custom_mask = torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool, device=device)
        self._wrapper = flashinfer.prefill.BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD")
        self._wrapper.plan(
            torch.tensor(q_offsets, dtype=torch.int32, device=device),
            torch.tensor(k_offsets, dtype=torch.int32, device=device),
            num_q_heads,
            num_kv_heads,
            head_dim,
            custom_mask=custom_mask,
            causal=False,
            sm_scale=scale,
            q_data_type=dtype,
            kv_data_type=dtype,
        )

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Output ``(total_q, num_q_heads, head_dim)`` for packed q and ragged k/v (NHD)."""
        return self._wrapper.run(q.contiguous(), k.contiguous(), v.contiguous())
