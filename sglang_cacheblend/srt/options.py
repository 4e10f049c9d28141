"""The ``--enable-cacheblend`` server flags, and how their values reach the scheduler.

SGLang has no plugin API for new CLI flags, and ``ServerArgs.from_cli_args`` copies only its own
dataclass fields, so an extra attribute would never reach the scheduler processes (they receive
a copy of ``ServerArgs``). The plugin therefore adds the flags to SGLang's own parser (hook on
``ServerArgs.add_cli_args``) and, when ``ServerArgs`` is built, moves their values into one
environment variable holding JSON. Scheduler processes are started after that and inherit the
environment, so every process reads the same options with ``ServerOptions.from_env()``.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, fields

ENV_VAR = "SGLANG_CACHEBLEND_OPTIONS"
RADIX_BACKEND_NAME = "cacheblend"


@dataclass(frozen=True)
class ServerOptions:
    """CacheBlend settings chosen at server launch; per-request overrides come later.

    ``recompute_ratio`` is the share of reused chunk tokens whose KV is recomputed; 1.0 gives
    SGLang's full prefill, 0.0 full reuse. ``check_layer`` is the layer whose K/V deviation
    picks the tokens. ``min_reused_tokens`` is the number of reusable tokens below which a
    request is simply prefilled in full, because blending would not pay.
    """

    enabled: bool = False
    recompute_ratio: float = 0.15
    check_layer: int = 1
    selector: str = "v_deviation"
    min_reused_tokens: int = 256

    def __post_init__(self) -> None:
        if not 0.0 <= self.recompute_ratio <= 1.0:
            raise ValueError(
                f"--cacheblend-recompute-ratio must be in [0, 1], got {self.recompute_ratio}"
            )
        if self.check_layer < 0:
            raise ValueError(f"--cacheblend-check-layer must be >= 0, got {self.check_layer}")
        if self.min_reused_tokens < 0:
            raise ValueError(
                f"--cacheblend-min-reused-tokens must be >= 0, got {self.min_reused_tokens}"
            )
        if not self.selector:
            raise ValueError("--cacheblend-selector must name a selector")

    def to_env(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "ServerOptions":
        raw = (os.environ if environ is None else environ).get(ENV_VAR)
        if not raw:
            return cls()
        try:
            values = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"{ENV_VAR} is not valid JSON: {exc}") from exc
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"{ENV_VAR} has unknown keys {sorted(unknown)}")
        return cls(**values)


_DEFAULTS = ServerOptions()

# (flag, namespace attribute, argparse kwargs); the attribute names are ours alone, prefixed so
# they can never collide with a ServerArgs field.
_FLAGS: tuple[tuple[str, str, dict], ...] = (
    ("--enable-cacheblend", "cacheblend_enabled",
     dict(action="store_true", help="Blend cached RAG chunks at any position (CacheBlend).")),
    ("--cacheblend-recompute-ratio", "cacheblend_recompute_ratio",
     dict(type=float, default=_DEFAULTS.recompute_ratio,
          help="Share of reused chunk tokens whose KV is recomputed (0 = full reuse).")),
    ("--cacheblend-check-layer", "cacheblend_check_layer",
     dict(type=int, default=_DEFAULTS.check_layer,
          help="Layer at which the tokens to recompute are selected.")),
    ("--cacheblend-selector", "cacheblend_selector",
     dict(type=str, default=_DEFAULTS.selector,
          help="Rule that picks the tokens to recompute (e.g. v_deviation, k_deviation).")),
    ("--cacheblend-min-reused-tokens", "cacheblend_min_reused_tokens",
     dict(type=int, default=_DEFAULTS.min_reused_tokens,
          help="Below this many reusable tokens a request is prefilled in full.")),
)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("CacheBlend (sglang-cacheblend plugin)")
    for flag, dest, kwargs in _FLAGS:
        group.add_argument(flag, dest=dest, **kwargs)


def pop_from_namespace(args: argparse.Namespace) -> ServerOptions:
    """Remove our attributes from a parsed namespace and return them as options."""
    values = {dest: vars(args).pop(dest) for _, dest, _ in _FLAGS if hasattr(args, dest)}
    return ServerOptions(
        enabled=values.get("cacheblend_enabled", _DEFAULTS.enabled),
        recompute_ratio=values.get("cacheblend_recompute_ratio", _DEFAULTS.recompute_ratio),
        check_layer=values.get("cacheblend_check_layer", _DEFAULTS.check_layer),
        selector=values.get("cacheblend_selector", _DEFAULTS.selector),
        min_reused_tokens=values.get("cacheblend_min_reused_tokens", _DEFAULTS.min_reused_tokens),
    )
