"""Plain float64 references for the blend tests, written independently of the package."""

from __future__ import annotations

import math

import torch


def ref_inv_freq(head_rot_dim: int, base: float, scaling: dict | None) -> list[float]:
    """Frequencies per rotated pair, element by element in Python floats."""
    freqs = [base ** (-(2 * i) / head_rot_dim) for i in range(head_rot_dim // 2)]
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        freqs = [f / scaling["factor"] for f in freqs]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        ctx = scaling["original_max_position_embeddings"]
        out = []
        for f in freqs:
            wavelen = 2 * math.pi / f
            if wavelen < ctx / high:
                out.append(f)
            elif wavelen > ctx / low:
                out.append(f / factor)
            else:
                s = (ctx / wavelen - low) / (high - low)
                out.append((1 - s) * f / factor + s * f)
        freqs = out
    return freqs


def ref_rope(
    x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, rotary_dim: int, neox: bool
) -> torch.Tensor:
    """RoPE at ``positions`` in float64 via complex multiplication.

    x: (tokens, heads, head_dim); positions: (tokens,); freqs: (rotary_dim // 2,).
    Pairs are (i, i + rotary_dim // 2) for neox, (2i, 2i + 1) otherwise.
    """
    x = x.to(torch.float64).clone()
    half = rotary_dim // 2
    idx = torch.arange(half)
    a_idx, b_idx = (idx, idx + half) if neox else (2 * idx, 2 * idx + 1)
    z = torch.complex(x[..., a_idx], x[..., b_idx])
    angle = positions.to(torch.float64)[:, None] * freqs.to(torch.float64)[None, :]
    z = z * torch.polar(torch.ones_like(angle), angle)[:, None, :]
    x[..., a_idx] = z.real
    x[..., b_idx] = z.imag
    return x


def ref_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Dense causal attention of one request in float64.

    q: (L, Hq, D), k/v: (L, Hkv, D); query i sees keys 0..i. Returns (L, Hq, D) float64.
    """
    length, hq, _ = q.shape
    group = hq // k.shape[1]
    kk = k.to(torch.float64).repeat_interleave(group, dim=1)
    vv = v.to(torch.float64).repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.to(torch.float64), kk) * scale
    future = torch.ones(length, length, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), vv)
