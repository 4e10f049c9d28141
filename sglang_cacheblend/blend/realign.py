"""RoPE realignment: rotate cached post-RoPE keys from old positions to new ones.

SGLang stores keys after RoPE. A chunk cached at positions ``old`` and reused at ``new`` needs
its keys rotated by ``delta = new - old`` per token (any sign). For a pure rotation
``R(new) = R(delta) R(old)``, so this is exact up to rounding (see :mod:`.rotary_config` for the
scaling schemes where it is not, which :class:`~.rotary_config.RotaryConfig` refuses).

Two paths, same result:

* CUDA tensors in float16/bfloat16 with FlashInfer importable: FlashInfer's
  ``apply_rope_with_cos_sin_cache_inplace`` with a per-token cos/sin table (row ``i`` holds the
  angles of token ``i``'s delta; positions are ``0..num_tokens-1``), so negative deltas need no
  special case and no ``max_position``-sized table is built;
* elsewhere, torch: the delta angle per token is computed from the float32 frequencies in
  float64 (``delta * inv_freq``; float32 angles lose ~1e-3 rad at positions ~3e4), then cos/sin
  in float32, and the rotation in float32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sglang_cacheblend.blend.rotary_config import RotaryConfig

__all__ = ["realign_keys", "realign_keys_inplace"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def realign_keys(
    keys: torch.Tensor,
    old_positions: torch.Tensor,
    new_positions: torch.Tensor,
    rotary: RotaryConfig,
) -> torch.Tensor:
    """Return a copy of ``keys`` rotated from ``old_positions`` to ``new_positions``.

    Same parameters as :func:`realign_keys_inplace`; ``keys`` is not modified.

    Returns
    -------
    torch.Tensor
        Shape ``(num_tokens, num_kv_heads, head_dim)``, dtype and device of ``keys``, contiguous.
    """
    out = keys.clone(memory_format=torch.contiguous_format)
    realign_keys_inplace(out, old_positions, new_positions, rotary)
    return out


def realign_keys_inplace(
    keys: torch.Tensor,
    old_positions: torch.Tensor,
    new_positions: torch.Tensor,
    rotary: RotaryConfig,
) -> None:
    """Rotate post-RoPE keys in place from the positions they were computed at to new ones.

    Parameters
    ----------
    keys : torch.Tensor
        Shape ``(num_tokens, num_kv_heads, head_dim)``; float32, float16 or bfloat16; CPU or
        CUDA; keys after RoPE at ``old_positions`` (e.g. rows of SGLang's ``k_buffer[layer]``).
        Only ``[..., :rotary.rotary_dim]`` changes. Modified in place.
    old_positions : torch.Tensor
        Shape ``(num_tokens,)``, int32/int64, same device: absolute positions the keys were
        computed at (chunk-local for a chunk cached standalone).
    new_positions : torch.Tensor
        Shape ``(num_tokens,)``, int32/int64, same device: absolute positions in the new prompt.
        ``new - old`` may be negative, zero or positive, and differ per token.
    rotary : RotaryConfig
        The model's rotary embedding; ``rotary.head_dim`` must equal ``head_dim``.

    Returns
    -------
    None
    """
    _check_inputs(keys, old_positions, new_positions, rotary)
    if keys.shape[0] == 0:
        return
    if _use_flashinfer(keys):
        _realign_flashinfer(keys, old_positions, new_positions, rotary)
    else:
        _realign_torch(keys, old_positions, new_positions, rotary)


def _check_inputs(
    keys: torch.Tensor, old: torch.Tensor, new: torch.Tensor, rotary: RotaryConfig
) -> None:
    if keys.dim() != 3 or keys.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            "keys must be float32/float16/bfloat16 of shape (num_tokens, num_kv_heads, head_dim), "
            f"got {tuple(keys.shape)} {keys.dtype}"
        )
    if keys.shape[2] != rotary.head_dim:
        raise ValueError(f"keys head_dim {keys.shape[2]} != rotary.head_dim {rotary.head_dim}")
    for name, pos in (("old_positions", old), ("new_positions", new)):
        if pos.shape != keys.shape[:1] or pos.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"{name} must be int32/int64 of shape ({keys.shape[0]},), "
                f"got {tuple(pos.shape)} {pos.dtype}"
            )
        if pos.device != keys.device:
            raise ValueError(f"{name} is on {pos.device}, keys on {keys.device}")


def _delta_cos_sin(
    old: torch.Tensor, new: torch.Tensor, rotary: RotaryConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the per-token delta angles, each ``(num_tokens, rotary_dim // 2)`` fp32."""
    inv_freq = rotary.inv_freq(old.device).to(torch.float64)
    delta = new.to(torch.float64) - old.to(torch.float64)
    angle = delta[:, None] * inv_freq[None, :]
    return angle.cos().to(torch.float32), angle.sin().to(torch.float32)


def _realign_torch(
    keys: torch.Tensor, old: torch.Tensor, new: torch.Tensor, rotary: RotaryConfig
) -> None:
    cos, sin = _delta_cos_sin(old, new, rotary)
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    rd, half = rotary.rotary_dim, rotary.rotary_dim // 2
    if rotary.is_neox_style:
        first, second = keys[..., :half], keys[..., half:rd]
    else:
        first, second = keys[..., 0:rd:2], keys[..., 1:rd:2]
    x1, x2 = first.float(), second.float()
    out1 = x1 * cos - x2 * sin
    out2 = x2 * cos + x1 * sin
    first.copy_(out1)
    second.copy_(out2)


def _use_flashinfer(keys: torch.Tensor) -> bool:
    if not keys.is_cuda or keys.dtype not in (torch.float16, torch.bfloat16):
        return False
    if keys.stride(2) != 1 or keys.stride(1) != keys.shape[2]:
        return False  # FlashInfer wants (nnz, heads * head_dim) views of the rows
    try:
        import flashinfer.rope  # noqa: F401
    except ImportError:
        return False
    return True


def _realign_flashinfer(
    keys: torch.Tensor, old: torch.Tensor, new: torch.Tensor, rotary: RotaryConfig
) -> None:
    from flashinfer.rope import apply_rope_with_cos_sin_cache_inplace

    cos, sin = _delta_cos_sin(old, new, rotary)
    cos_sin_cache = torch.cat([cos, sin], dim=1).contiguous()  # (num_tokens, rotary_dim)
    rows = torch.arange(keys.shape[0], device=keys.device, dtype=torch.int64)
    # The kernel rotates a query too; give it a one-head scratch query and drop it.
    scratch_q = torch.empty((keys.shape[0], rotary.head_dim), dtype=keys.dtype, device=keys.device)
    key_2d = keys.as_strided((keys.shape[0], keys.shape[1] * keys.shape[2]), (keys.stride(0), 1))
    apply_rope_with_cos_sin_cache_inplace(
        rows, scratch_q, key_2d, rotary.head_dim, cos_sin_cache, rotary.is_neox_style
    )
