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
from dataclasses import asdict, dataclass, field

from sglang_cacheblend.config import BlendConfig

ENV_VAR = "SGLANG_CACHEBLEND_OPTIONS"
RADIX_BACKEND_NAME = "cacheblend"
# SGLang's seam for out-of-tree model classes; schedulers inherit it from the launcher.
MODEL_PACKAGE_ENV_VAR = "SGLANG_EXTERNAL_MODEL_PACKAGE"
MODEL_PACKAGE = "sglang_cacheblend.srt.models"


@dataclass(frozen=True)
class ServerOptions:
    """CacheBlend settings chosen at server launch: on/off plus a validated ``BlendConfig``."""

    enabled: bool = False
    blend: BlendConfig = field(default_factory=BlendConfig)

    def to_env(self) -> str:
        return json.dumps({"enabled": self.enabled, "blend": asdict(self.blend)}, sort_keys=True)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "ServerOptions":
        raw = (os.environ if environ is None else environ).get(ENV_VAR)
        if not raw:
            return cls()
        try:
            values = json.loads(raw)
            blend = dict(values["blend"])
            blend["gradual"] = tuple(tuple(step) for step in blend.get("gradual", ()))
            return cls(enabled=bool(values["enabled"]), blend=BlendConfig(**blend))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{ENV_VAR} is malformed: {exc}") from exc


_DEFAULTS = BlendConfig()

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
          help="Rule that picks the tokens to recompute (e.g. question_lookahead, "
                "v_deviation, k_deviation).")),
    ("--cacheblend-gradual-start-ratio", "cacheblend_gradual_start_ratio",
     dict(type=float, default=None,
          help="Gradual filtering: ratio selected at the check layer, narrowed linearly to the "
               "recompute ratio by --cacheblend-gradual-end-layer (off when unset).")),
    ("--cacheblend-gradual-end-layer", "cacheblend_gradual_end_layer",
     dict(type=int, default=8, help="Gradual filtering: layer where the target ratio is reached.")),
    ("--cacheblend-min-reused-tokens", "cacheblend_min_reused_tokens",
     dict(type=int, default=_DEFAULTS.min_reused_tokens,
          help="Below this many reusable tokens a request is prefilled in full.")),
)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("CacheBlend (sglang-cacheblend plugin)")
    for flag, dest, kwargs in _FLAGS:
        group.add_argument(flag, dest=dest, **kwargs)


def pop_from_namespace(args: argparse.Namespace) -> ServerOptions:
    """Remove our attributes from a parsed namespace and return them as validated options.

    An invalid value raises ``ValueError`` naming the flag, so the launcher stops with a message.
    """
    values = {dest: vars(args).pop(dest) for _, dest, _ in _FLAGS if hasattr(args, dest)}
    ratio = values.get("cacheblend_recompute_ratio", _DEFAULTS.recompute_ratio)
    check_layer = values.get("cacheblend_check_layer", _DEFAULTS.check_layer)
    start_ratio = values.get("cacheblend_gradual_start_ratio")
    common = dict(
        selector=values.get("cacheblend_selector", _DEFAULTS.selector),
        min_reused_tokens=values.get("cacheblend_min_reused_tokens", _DEFAULTS.min_reused_tokens),
    )
    try:
        if start_ratio is None:
            blend = BlendConfig(recompute_ratio=ratio, check_layer=check_layer, **common)
        else:
            blend = BlendConfig.linear(
                start_ratio, ratio, check_layer,
                values.get("cacheblend_gradual_end_layer", 8), **common,
            )
    except ValueError as exc:
        flag = next((f for f, dest, _ in _FLAGS if dest.removeprefix("cacheblend_") in str(exc)),
                    "--cacheblend-*")
        raise ValueError(f"{flag}: {exc}") from exc
    return ServerOptions(enabled=values.get("cacheblend_enabled", False), blend=blend)
