"""The Loading Controller's ratio rule: recompute as much as loading the KV hides.

CacheBlend (§5) pipelines loading a layer's chunk KV with recomputing the previous layer's
selected rows, so recomputing costs nothing extra while it takes no longer than loading. The
controller therefore picks the largest recompute ratio whose per-layer recompute time fits in
the per-layer load time, never below a quality floor and never above a ceiling:

    ratio = clamp(load_s_per_layer / (reused_tokens * compute_s_per_row), floor, ceiling)

Both speeds are measured on this server (exponentially weighted): the load speed per tier (a
pool hit costs only its copy and realignment, a host/disk/Mooncake hit also its read), from
admission's reads and the layer pipeline; the compute speed per row and layer, from blended
forwards. Until a speed has been measured the controller answers the floor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["POOL", "LoadingController", "RatioChoice", "choose_recompute_ratio"]

POOL = "pool"
SEED = "seed"


def choose_recompute_ratio(load_s_per_layer: float, compute_s_per_row: float,
                           reused_tokens: int, *, floor: float, ceiling: float) -> float:
    """The paper's rule (see the module docstring); ``floor <= result <= ceiling``."""
    if not 0.0 <= floor <= ceiling <= 1.0:
        raise ValueError(f"need 0 <= floor <= ceiling <= 1, got {floor}, {ceiling}")
    if reused_tokens <= 0 or compute_s_per_row <= 0.0 or load_s_per_layer <= 0.0:
        return floor
    hidden_rows = load_s_per_layer / compute_s_per_row
    return min(max(hidden_rows / reused_tokens, floor), ceiling)


class _Ewma:
    def __init__(self, alpha: float) -> None:
        self.alpha, self.value = alpha, None

    def add(self, sample: float) -> None:
        self.value = sample if self.value is None else (
            self.alpha * sample + (1.0 - self.alpha) * self.value)


@dataclass(frozen=True)
class RatioChoice:
    """A chosen ratio and the figures it came from (reported in ``meta_info``)."""

    ratio: float
    load_s_per_layer: float | None
    compute_s_per_row: float | None
    why: str

    def report(self) -> dict[str, object]:
        def rounded(x: float | None) -> float | None:
            return None if x is None else float(f"{x:.3g}")
        return {"recompute_ratio": round(self.ratio, 4), "ratio_policy": "controller",
                "controller_load_s_per_layer": rounded(self.load_s_per_layer),
                "controller_compute_s_per_row": rounded(self.compute_s_per_row),
                "controller_why": self.why}


class LoadingController:
    """Measured load and compute speeds, and the ratio they call for."""

    def __init__(self, *, floor: float, ceiling: float, alpha: float = 0.3) -> None:
        choose_recompute_ratio(0.0, 0.0, 0, floor=floor, ceiling=ceiling)  # validates
        self.floor, self.ceiling, self._alpha = floor, ceiling, alpha
        self._load: dict[str, _Ewma] = {}  # tier -> seconds per token and layer
        self._compute = _Ewma(alpha)  # seconds per row and layer

    def observe_seed(self, *, tokens: int, layers: int, seconds: float) -> None:
        """The layer pipeline spent ``seconds`` copying and realigning ``tokens`` tokens of
        chunk KV over ``layers`` layers (every chunk pays this, a pool hit only this)."""
        self._observe(SEED, tokens, layers, seconds)

    def observe_read(self, tier: str, *, tokens: int, layers: int, seconds: float) -> None:
        """Admission spent ``seconds`` reading ``tokens`` tokens of chunk KV from ``tier``."""
        self._observe(tier, tokens, layers, seconds)

    def _observe(self, what: str, tokens: int, layers: int, seconds: float) -> None:
        if tokens > 0 and layers > 0 and seconds >= 0.0:
            self._load.setdefault(what, _Ewma(self._alpha)).add(seconds / (tokens * layers))

    def observe_compute(self, *, rows: int, seconds: float) -> None:
        """``seconds`` of blended compute for ``rows`` rows summed over layers."""
        if rows > 0 and seconds > 0.0:
            self._compute.add(seconds / rows)

    def load_s_per_token_layer(self, tier: str) -> float | None:
        """Seconds per token and layer to bring a chunk in from ``tier`` ("pool": seeding)."""
        seed = self._load.get(SEED)
        if seed is None or seed.value is None:
            return None
        if tier == POOL:
            return seed.value
        read = self._load.get(tier)
        return None if read is None else seed.value + read.value

    def choose(self, tier_tokens: Mapping[str, int]) -> RatioChoice:
        """The ratio for a request whose reused tokens come from these tiers (tokens each)."""
        tier_tokens = {tier: n for tier, n in tier_tokens.items() if n > 0}
        reused = sum(tier_tokens.values())
        compute = self._compute.value
        per_tier = {tier: self.load_s_per_token_layer(tier) for tier in tier_tokens}
        if compute is None or any(v is None for v in per_tier.values()) or reused <= 0:
            missing = [t for t, v in per_tier.items() if v is None] + (
                ["compute"] if compute is None else [])
            return RatioChoice(self.floor, None, compute,
                               f"not measured yet ({', '.join(missing) or 'no reuse'}): floor")
        load = sum(tokens * per_tier[tier] for tier, tokens in tier_tokens.items())
        ratio = choose_recompute_ratio(load, compute, reused, floor=self.floor,
                                       ceiling=self.ceiling)
        why = ("loading hides this much recompute" if self.floor < ratio < self.ceiling
               else "clamped to the floor" if ratio == self.floor else "clamped to the ceiling")
        return RatioChoice(ratio, load, compute, why)

    def snapshot(self) -> dict[str, object]:
        """Current speeds (``/server_info``)."""
        return {"floor": self.floor, "ceiling": self.ceiling,
                "load_s_per_token_layer": {t: m.value for t, m in self._load.items()},
                "compute_s_per_row": self._compute.value}
