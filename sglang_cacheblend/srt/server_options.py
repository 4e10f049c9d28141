"""The ``--enable-cacheblend`` server flags, and how their values reach the scheduler.

SGLang has no plugin API for new CLI flags, and ``ServerArgs.from_cli_args`` copies only its own
dataclass fields, so an extra attribute would never reach the scheduler processes (they receive
a copy of ``ServerArgs``). The plugin therefore adds the flags to SGLang's own parser (hook on
``ServerArgs.add_cli_args``) and, when ``ServerArgs`` is built, moves their values into one
environment variable holding JSON. Scheduler processes are started after that and inherit the
environment, so every process reads the same options with ``current_options()``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
from dataclasses import asdict, dataclass, field

from sglang_cacheblend.config import BlendConfig
from sglang_cacheblend.srt.supported_setups import refuse_unsupported_setups

ENV_VAR = "SGLANG_CACHEBLEND_OPTIONS"
ENABLE_FLAG = "--enable-cacheblend"
RADIX_BACKEND_NAME = "cacheblend"
# SGLang's seam for out-of-tree model classes; schedulers inherit it from the launcher.
MODEL_PACKAGE_ENV_VAR = "SGLANG_EXTERNAL_MODEL_PACKAGE"
MODEL_PACKAGE = "sglang_cacheblend.srt.models"
# Set by ``sglang-cacheblend serve`` on CPU: the rotary fix is needed without CacheBlend too.
NATIVE_ROTARY_ENV_VAR = "SGLANG_CACHEBLEND_NATIVE_ROTARY"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerOptions:
    """CacheBlend settings chosen at server launch: on/off, a validated ``BlendConfig``, and
    the per-request chunk limits (each missed chunk costs a standalone forward in the
    scheduler, so a request may not mark thousands of tiny ones)."""

    enabled: bool = False
    blend: BlendConfig = field(default_factory=BlendConfig)
    max_chunks: int = 256
    min_chunk_tokens: int = 16

    def __post_init__(self) -> None:
        for name in ("max_chunks", "min_chunk_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ServerOptions.{name} must be an int >= 1, got {value!r}")

    def to_env(self) -> str:
        values = asdict(self)
        return json.dumps(values, sort_keys=True)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "ServerOptions":
        raw = (os.environ if environ is None else environ).get(ENV_VAR)
        if not raw:
            return cls()
        try:
            values = json.loads(raw)
            blend = dict(values.pop("blend"))
            blend["gradual"] = tuple(tuple(step) for step in blend.get("gradual", ()))
            return cls(blend=BlendConfig(**blend), **values)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{ENV_VAR} is malformed: {exc}") from exc


def current_options() -> ServerOptions:
    """The options this process runs with (every hook body asks this first).

    Read from the environment each time, parsed once per distinct value: the launcher sets the
    variable only after the plugin was loaded, and tests start servers with other options.
    """
    return _parse_options(os.environ.get(ENV_VAR, ""))


@functools.lru_cache(maxsize=8)
def _parse_options(raw: str) -> ServerOptions:
    return ServerOptions.from_env({ENV_VAR: raw})


_DEFAULTS = BlendConfig()

# (flag, namespace attribute, argparse kwargs); the attribute names are ours alone, prefixed so
# they can never collide with a ServerArgs field.
_FLAGS: tuple[tuple[str, str, dict], ...] = (
    (ENABLE_FLAG, "cacheblend_enabled",
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
    ("--cacheblend-max-chunks", "cacheblend_max_chunks",
     dict(type=int, default=ServerOptions.max_chunks,
          help="Most chunks one request may mark (more: HTTP 400).")),
    ("--cacheblend-min-chunk-tokens", "cacheblend_min_chunk_tokens",
     dict(type=int, default=ServerOptions.min_chunk_tokens,
          help="Fewest tokens a chunk may have (fewer: HTTP 400).")),
)


def add_cli_args(
    parser: argparse.ArgumentParser, *, enable_action: type[argparse.Action] | None = None
) -> None:
    """Add the CacheBlend flags to SGLang's parser; ``enable_action`` replaces the plain
    ``store_true`` of ``--enable-cacheblend`` (the plugin passes one that checks its hooks)."""
    group = parser.add_argument_group("CacheBlend (sglang-cacheblend plugin)")
    for flag, dest, kwargs in _FLAGS:
        if flag == ENABLE_FLAG and enable_action is not None:
            kwargs = {**kwargs, "action": enable_action, "nargs": 0, "default": False}
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
    try:
        return ServerOptions(
            enabled=values.get("cacheblend_enabled", False), blend=blend,
            max_chunks=values.get("cacheblend_max_chunks", ServerOptions.max_chunks),
            min_chunk_tokens=values.get("cacheblend_min_chunk_tokens",
                                        ServerOptions.min_chunk_tokens),
        )
    except ValueError as exc:
        flag = "--cacheblend-max-chunks" if "max_chunks" in str(exc) else (
            "--cacheblend-min-chunk-tokens")
        raise ValueError(f"{flag}: {exc}") from exc


def apply_to_server_args(args: argparse.Namespace) -> ServerOptions:
    """Take our flags off the parsed namespace and publish them to the scheduler processes.

    With ``--enable-cacheblend``: selects the ``cacheblend`` radix-cache backend and our model
    package (refusing a conflicting choice), and writes the options to :data:`ENV_VAR`, which
    the scheduler processes inherit. Without it, clears the variable, so every hook stays
    inert. Raises ``ValueError`` naming the flag for an invalid value.
    """
    opts = pop_from_namespace(args)
    if not opts.enabled:
        os.environ.pop(ENV_VAR, None)
        return opts
    refuse_unsupported_setups(vars(args))
    backend = getattr(args, "radix_cache_backend", None)
    if backend not in (None, RADIX_BACKEND_NAME):
        raise ValueError(
            f"--enable-cacheblend needs --radix-cache-backend {RADIX_BACKEND_NAME}, got {backend!r}"
        )
    args.radix_cache_backend = RADIX_BACKEND_NAME
    model_package = os.environ.get(MODEL_PACKAGE_ENV_VAR)
    if model_package not in (None, MODEL_PACKAGE):
        raise ValueError(
            f"--enable-cacheblend loads its models from {MODEL_PACKAGE}, but "
            f"{MODEL_PACKAGE_ENV_VAR}={model_package} is set"
        )
    os.environ[MODEL_PACKAGE_ENV_VAR] = MODEL_PACKAGE
    os.environ[ENV_VAR] = opts.to_env()
    logger.info("CacheBlend enabled: %s", opts)
    return opts
