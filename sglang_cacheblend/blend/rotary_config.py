"""RotaryConfig: the rotary embedding of a Llama-family model, as far as realignment needs it.

Realignment rotates a cached key from the position it was computed at to a new one. That is
exact only when RoPE is a pure rotation by ``position * inv_freq`` with fixed frequencies:

* supported: plain RoPE, ``linear`` scaling (positions divided by ``factor``), ``llama3``
  frequency scaling (Llama 3.1/3.2), partial rotary (``rotary_dim < head_dim``), neox (half
  split) and GPT-J (interleaved) layouts;
* refused with ValueError: ``dynamic`` NTK (frequencies depend on the sequence length),
  ``yarn``/``deepseek_yarn`` (an mscale factor is folded into the cos/sin tables and the
  frequencies are blended), ``longrope``/``su`` (short/long factor switch by length), ``mrope``
  and anything else unknown.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

__all__ = ["RotaryConfig"]

_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _scaling_type(scaling: Mapping[str, Any]) -> str:
    kind = scaling.get("rope_type", scaling.get("type"))
    return "default" if kind is None else str(kind)


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


@dataclass(frozen=True)
class RotaryConfig:
    """Rotary embedding parameters of one attention layer.

    Attributes
    ----------
    head_dim : int
        Per-head feature dimension of the keys.
    rotary_dim : int
        Leading dims of each head that are rotated (``[..., :rotary_dim]``); even,
        ``2 <= rotary_dim <= head_dim``.
    base : float
        ``rope_theta``.
    is_neox_style : bool
        True: half-split layout (pairs ``(i, i + rotary_dim // 2)``), SGLang's default for
        Llama. False: GPT-J interleaved layout (pairs ``(2i, 2i + 1)``).
    scaling : Mapping or None
        The HF ``rope_scaling`` dict; ``None``/``default``, ``linear`` or ``llama3`` (see the
        module docstring). Stored as a read-only copy.
    """

    head_dim: int
    rotary_dim: int
    base: float = 10000.0
    is_neox_style: bool = True
    scaling: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        for name in ("head_dim", "rotary_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"RotaryConfig.{name} must be a positive int, got {value!r}")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ValueError(
                f"RotaryConfig.rotary_dim must be even and <= head_dim={self.head_dim}, "
                f"got {self.rotary_dim}"
            )
        if not (isinstance(self.base, (int, float)) and math.isfinite(self.base) and self.base > 1):
            raise ValueError(f"RotaryConfig.base must be a finite number > 1, got {self.base!r}")
        if self.scaling is not None:
            if not isinstance(self.scaling, Mapping):
                raise ValueError(f"RotaryConfig.scaling must be a mapping, got {self.scaling!r}")
            object.__setattr__(self, "scaling", MappingProxyType(dict(self.scaling)))
            self._check_scaling(self.scaling)

    def __hash__(self) -> int:
        scaling = None if self.scaling is None else tuple(sorted(map(repr, self.scaling.items())))
        return hash((self.head_dim, self.rotary_dim, self.base, self.is_neox_style, scaling))

    @staticmethod
    def _check_scaling(scaling: Mapping[str, Any]) -> None:
        kind = _scaling_type(scaling)
        if kind == "default":
            return
        if kind == "linear":
            factor = scaling.get("factor")
            if not isinstance(factor, (int, float)) or not factor > 0:
                raise ValueError(f"linear rope_scaling needs factor > 0, got {factor!r}")
            return
        if kind == "llama3":
            missing = [k for k in _LLAMA3_KEYS if not isinstance(scaling.get(k), (int, float))]
            if missing:
                raise ValueError(f"llama3 rope_scaling lacks numeric {missing}")
            if not (scaling["factor"] > 0 and 0 < scaling["low_freq_factor"]):
                raise ValueError("llama3 rope_scaling needs factor > 0 and low_freq_factor > 0")
            if scaling["high_freq_factor"] < scaling["low_freq_factor"]:
                raise ValueError("llama3 rope_scaling needs high_freq_factor >= low_freq_factor")
            return
        raise ValueError(
            f"rope_scaling type {kind!r} cannot be realigned exactly: a delta rotation is exact "
            "only for fixed frequencies without magnitude scaling (supported: default, linear, "
            "llama3). dynamic NTK and longrope change frequencies with the sequence length; "
            "yarn folds an mscale into cos/sin. Disable blending for this model."
        )

    @classmethod
    def from_hf_config(cls, config: Any, *, is_neox_style: bool = True) -> RotaryConfig:
        """Build from a HF config object or dict.

        Reads ``rope_theta`` (default 10000), ``rope_scaling`` (or transformers v5's
        ``rope_parameters``, which may also carry ``rope_theta``), ``partial_rotary_factor``
        (default 1), ``head_dim`` (default ``hidden_size // num_attention_heads``).
        ``is_neox_style`` is not in HF configs; SGLang's Llama uses True.
        """
        head_dim = _get(config, "head_dim")
        if head_dim is None:
            hidden, heads = _get(config, "hidden_size"), _get(config, "num_attention_heads")
            if not hidden or not heads:
                raise ValueError("config needs head_dim or hidden_size and num_attention_heads")
            head_dim = hidden // heads
        params = _get(config, "rope_parameters")
        scaling = _get(config, "rope_scaling")
        theta = _get(config, "rope_theta")
        if isinstance(params, Mapping):
            # transformers v5 keeps theta in rope_parameters and may alias rope_scaling to it.
            if theta is None:
                theta = params.get("rope_theta")
            if scaling is None:
                scaling = params
        if isinstance(scaling, Mapping):
            scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        if scaling is not None and _scaling_type(scaling) == "default":
            scaling = None
        factor = _get(config, "partial_rotary_factor", 1.0) or 1.0
        rotary_dim = int(head_dim * factor)
        return cls(
            head_dim=int(head_dim),
            rotary_dim=rotary_dim,
            base=float(theta if theta is not None else 10000.0),
            is_neox_style=is_neox_style,
            scaling=scaling,
        )

    def inv_freq(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Angular frequency per rotated pair, in radians per position.

        Computed in float32 the way SGLang's rotary modules compute theirs, so a realigned key
        matches the model's own RoPE as closely as float32 allows. Linear scaling is included
        (frequencies divided by ``factor``, the same as dividing positions).

        Returns
        -------
        torch.Tensor
            Shape ``(rotary_dim // 2,)``, float32.
        """
        exponent = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32) / self.rotary_dim
        inv = 1.0 / (self.base**exponent)
        kind = "default" if self.scaling is None else _scaling_type(self.scaling)
        if kind == "linear":
            inv = inv / float(self.scaling["factor"])
        elif kind == "llama3":
            inv = self._llama3(inv)
        return inv.to(device) if device is not None else inv

    def _llama3(self, inv: torch.Tensor) -> torch.Tensor:
        s = self.scaling
        factor, low, high = (
            float(s["factor"]),
            float(s["low_freq_factor"]),
            float(s["high_freq_factor"]),
        )
        context = float(s["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = inv / factor
        if high > low:
            smooth = (context / wavelen - low) / (high - low)
            blended = (1 - smooth) * scaled + smooth * inv
        else:
            blended = scaled
        out = torch.where(wavelen > context / low, scaled, blended)
        return torch.where(wavelen < context / high, inv, out)
