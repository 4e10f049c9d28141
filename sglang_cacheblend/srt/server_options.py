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

from sglang_cacheblend.chunks.context import resolve_context
from sglang_cacheblend.config import BlendConfig
from sglang_cacheblend.store.config import StoreConfig
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
    store: StoreConfig = field(default_factory=StoreConfig)
    pipeline_loads: bool = True
    ratio_policy: str = "fixed"
    controller_min_ratio: float = 0.15
    controller_max_ratio: float = 0.5
    chunk_context: str = ""  # the text chunk KV is computed after ("" = the sink only)

    def __post_init__(self) -> None:
        for name in ("max_chunks", "min_chunk_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ServerOptions.{name} must be an int >= 1, got {value!r}")
        if self.ratio_policy not in RATIO_POLICIES:
            raise ValueError(f"ServerOptions.ratio_policy must be one of {RATIO_POLICIES}, got "
                             f"{self.ratio_policy!r}")
        lo, hi = self.controller_min_ratio, self.controller_max_ratio
        if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float))
                and 0.0 <= lo <= hi <= 1.0):
            raise ValueError(f"ServerOptions.controller_min_ratio/controller_max_ratio need "
                             f"0 <= min <= max <= 1, got {lo!r}, {hi!r}")

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
            store = StoreConfig(**values.pop("store", {}))
            return cls(blend=BlendConfig(**blend), store=store, **values)
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
_STORE = StoreConfig()
RATIO_POLICIES = ("fixed", "controller")
DEFAULT_CHUNK_CONTEXT = "builtin"

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
    ("--cacheblend-recompute-window", "cacheblend_recompute_window",
     dict(type=int, default=_DEFAULTS.recompute_window,
          help="Recompute reused rows in contiguous runs of this many rows (same budget; "
               "1 = the top rows wherever they are).")),
    ("--cacheblend-min-reused-tokens", "cacheblend_min_reused_tokens",
     dict(type=int, default=_DEFAULTS.min_reused_tokens,
          help="Below this many reusable tokens a request is prefilled in full.")),
    ("--cacheblend-max-chunks", "cacheblend_max_chunks",
     dict(type=int, default=ServerOptions.max_chunks,
          help="Most chunks one request may mark (more: HTTP 400).")),
    ("--cacheblend-min-chunk-tokens", "cacheblend_min_chunk_tokens",
     dict(type=int, default=ServerOptions.min_chunk_tokens,
          help="Fewest tokens a chunk may have (fewer: HTTP 400).")),
    ("--cacheblend-host-tier-mb", "cacheblend_host_mb",
     dict(type=int, default=_STORE.host_mb,
          help="Host-RAM tier for chunk KV the pool evicts, in MiB (0: off).")),
    ("--cacheblend-disk-tier-dir", "cacheblend_disk_dir",
     dict(type=str, default=None,
          help="Folder of the disk tier (one checked safetensors file per chunk; survives "
               "restarts). Off when unset.")),
    ("--cacheblend-disk-tier-mb", "cacheblend_disk_mb",
     dict(type=int, default=_STORE.disk_mb, help="Size limit of the disk tier, in MiB.")),
    ("--cacheblend-store-policy", "cacheblend_policy",
     dict(type=str, default=_STORE.policy, choices=("write-through", "spill"),
          help="write-through: computed chunks go to the disk/Mooncake tiers at once; spill: "
               "only what the host tier evicts does.")),
    ("--cacheblend-mooncake-master", "cacheblend_mooncake_master",
     dict(type=str, default=None,
          help="Mooncake master 127.0.0.1:PORT: share chunk KV with other servers.")),
    ("--cacheblend-mooncake-metadata", "cacheblend_mooncake_metadata",
     dict(type=str, default=None,
          help="Mooncake metadata server URL (http://127.0.0.1:PORT/metadata).")),
    ("--cacheblend-no-pipeline", "cacheblend_no_pipeline",
     dict(action="store_true",
          help="Load every chunk's KV before the first layer, not layer by layer.")),
    ("--cacheblend-ratio-policy", "cacheblend_ratio_policy",
     dict(type=str, default="fixed", choices=RATIO_POLICIES,
          help="controller: the Loading Controller picks the recompute ratio that hides "
               "behind loading, from measured speeds (within the min/max ratios).")),
    ("--cacheblend-controller-min-ratio", "cacheblend_controller_min_ratio",
     dict(type=float, default=0.15, help="Quality floor of the controller's ratio.")),
    ("--cacheblend-controller-max-ratio", "cacheblend_controller_max_ratio",
     dict(type=float, default=0.5, help="Ceiling of the controller's ratio.")),
    ("--cacheblend-chunk-context", "cacheblend_chunk_context",
     dict(type=str, default=DEFAULT_CHUNK_CONTEXT,
          help="Text every chunk's KV is computed after (then dropped), so reused rows are "
               "closer to their KV inside a prompt: 'builtin[:N]' (N paragraphs of shipped "
               "prose), a UTF-8 file, or 'none' (after the sink only).")),
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
        recompute_window=values.get("cacheblend_recompute_window", _DEFAULTS.recompute_window),
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
    store_values = {name: values[f"cacheblend_{name}"] for name in (
        "host_mb", "disk_dir", "disk_mb", "policy", "mooncake_master", "mooncake_metadata")
        if f"cacheblend_{name}" in values}
    try:
        store = StoreConfig(**store_values)
    except ValueError as exc:
        raise ValueError(f"{_flag_named_in(exc)}: {exc}") from exc
    try:
        chunk_context = resolve_context(values.get("cacheblend_chunk_context",
                                                   DEFAULT_CHUNK_CONTEXT))
    except (ValueError, OSError) as exc:
        raise ValueError(f"--cacheblend-chunk-context: {exc}") from exc
    try:
        return ServerOptions(
            enabled=values.get("cacheblend_enabled", False), blend=blend,
            max_chunks=values.get("cacheblend_max_chunks", ServerOptions.max_chunks),
            min_chunk_tokens=values.get("cacheblend_min_chunk_tokens",
                                        ServerOptions.min_chunk_tokens),
            store=store,
            pipeline_loads=not values.get("cacheblend_no_pipeline", False),
            ratio_policy=values.get("cacheblend_ratio_policy", "fixed"),
            controller_min_ratio=values.get("cacheblend_controller_min_ratio", 0.15),
            controller_max_ratio=values.get("cacheblend_controller_max_ratio", 0.5),
            chunk_context=chunk_context,
        )
    except ValueError as exc:
        raise ValueError(f"{_flag_named_in(exc)}: {exc}") from exc


def _flag_named_in(exc: ValueError) -> str:
    """The flag whose attribute an error message names (longest match first)."""
    text = str(exc)
    named = [(flag, dest.removeprefix("cacheblend_")) for flag, dest, _ in _FLAGS]
    for flag, attr in sorted(named, key=lambda fa: -len(fa[1])):
        if attr in text:
            return flag
    return "--cacheblend-*"


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
