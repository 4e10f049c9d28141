"""Every CacheBlend setting, declared once in :data:`SETTINGS`, and everything derived from it.

A row names the field it sets (of ``BlendConfig``, the store's ``StoreConfig`` or
:class:`ServerOptions`), its server flag and help, and whether a request may override it. From
the rows come the ``--cacheblend-*`` flags (:func:`add_cli_args`) and their validated
:class:`ServerOptions` (:func:`pop_from_namespace`, :func:`parse_server_flags`); the settings a
``cacheblend.chunks`` action may carry (:data:`REQUEST_SETTINGS`, read by
:mod:`sglang_cacheblend.chunks.hints`) and their merge with the server's
(:mod:`sglang_cacheblend.serving.blend_settings`); and the transport to the scheduler
processes: SGLang has no plugin API for new flags and ``ServerArgs.from_cli_args`` copies only
its own fields, so the plugin adds ours to SGLang's parser and moves their values into one
environment variable of JSON (:func:`apply_to_server_args`), which the scheduler processes
inherit and read with :func:`current_options`.

Defaults are the fields' own (a flag's argparse default None means "not given"), so
``ServerOptions()`` is what the command line gives without flags. Values are checked only by
their dataclass (``BlendConfig.__post_init__`` for a server's flags and a request's overrides
alike). Adding a knob: a field and one row.

Imports neither torch nor SGLang (clients, the chunk hints and ``ingest`` read it), and nothing
above it: the store package imports torch, so its config is imported where it is used; the
chunk context's text comes from :mod:`sglang_cacheblend.context_text`.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from sglang_cacheblend.config import BlendConfig
from sglang_cacheblend.context_text import BUILTIN_CONTEXT, resolve_context
from sglang_cacheblend.supported_setups import refuse_unsupported_setups

if TYPE_CHECKING:
    from sglang_cacheblend.store.config import StoreConfig

__all__ = [
    "ENV_VAR", "RATIO_POLICIES", "REQUEST_SETTINGS", "SETTINGS", "ServerOptions", "Setting",
    "add_cli_args", "apply_to_server_args", "current_options", "parse_server_flags",
    "pop_from_namespace", "read_request_settings",
]

ENV_VAR = "SGLANG_CACHEBLEND_OPTIONS"
ENABLE_FLAG = "--enable-cacheblend"
RADIX_BACKEND_NAME = "cacheblend"
# SGLang's seam for out-of-tree model classes; schedulers inherit it from the launcher.
MODEL_PACKAGE_ENV_VAR = "SGLANG_EXTERNAL_MODEL_PACKAGE"
MODEL_PACKAGE = "sglang_cacheblend.srt.models"
# Set by ``sglang-cacheblend serve`` on CPU: the rotary fix is needed without CacheBlend too.
NATIVE_ROTARY_ENV_VAR = "SGLANG_CACHEBLEND_NATIVE_ROTARY"

RATIO_POLICIES = ("fixed", "controller")
"""``fixed``: the configured ratio; ``controller``: the Loading Controller's (it hides behind
loads)."""
DEFAULT_CHUNK_CONTEXT = BUILTIN_CONTEXT
"""The ``--cacheblend-chunk-context`` every server has unless told otherwise (issue 17)."""

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Setting:
    """One row of :data:`SETTINGS`.

    ``name`` is the field set in ``part`` ("blend": ``BlendConfig``, "store": ``StoreConfig``,
    "server": :class:`ServerOptions`), or, for "launch", a flag that only helps build another
    field (the gradual schedule's start ratio and end layer, named as ``BlendConfig.linear``
    names them, so its errors name their flags). ``flag`` is None for a setting
    only requests give. ``const`` makes the flag a switch that sets it. ``parse`` turns a flag's
    value into the field's (the chunk context's text); ``from_json`` a request's or the
    environment's JSON value (lists into tuples); ``choices`` is the vocabulary of a setting
    no dataclass checks on the request side. ``default`` is declared here only for "launch"
    rows; every other default is its field's.
    """

    name: str
    part: Literal["blend", "store", "server", "launch"]
    flag: str | None
    help: str
    type: Callable[[str], Any] | None = None
    const: Any = None
    choices: tuple[str, ...] | None = None
    per_request: bool = False
    parse: Callable[[Any], Any] | None = None
    from_json: Callable[[Any], Any] | None = None
    default: Any = None

    @property
    def dest(self) -> str:
        """The parsed namespace's attribute: ours alone, never a ``ServerArgs`` field."""
        return "cacheblend_" + self.name


def _gradual_steps(steps: Any) -> tuple[tuple[Any, Any], ...]:
    """``[[layer, ratio], ...]`` (JSON lists) as the tuples ``BlendConfig.gradual`` holds; the
    values are left as sent, for ``BlendConfig`` to check."""
    if not isinstance(steps, (list, tuple)):
        raise ValueError(f"gradual must be a list of [layer, ratio] pairs, got {steps!r}")  # noqa: TRY004
    if not all(isinstance(step, (list, tuple)) and len(step) == 2 for step in steps):
        raise ValueError(f"gradual steps must be [layer, ratio] pairs, got {steps!r}")
    return tuple(tuple(step) for step in steps)


SETTINGS: tuple[Setting, ...] = (
    Setting("enabled", "server", ENABLE_FLAG, "Blend cached RAG chunks at any position "
            "(CacheBlend).", const=True),
    Setting("recompute_ratio", "blend", "--cacheblend-recompute-ratio", "Share of reused chunk "
            "tokens whose KV is recomputed (0 = full reuse).", type=float, per_request=True),
    Setting("check_layer", "blend", "--cacheblend-check-layer", "Layer at which the tokens to "
            "recompute are selected (a request sets it with its gradual schedule).", type=int),
    Setting("selector", "blend", "--cacheblend-selector", "Rule that picks the tokens to "
            "recompute (e.g. question_lookahead, v_deviation, k_deviation).", type=str,
            per_request=True),
    Setting("gradual", "blend", None, "A request's gradual-filtering schedule [[layer, ratio], "
            "...] (the server builds one from the two gradual flags).", per_request=True,
            from_json=_gradual_steps),
    Setting("start_ratio", "launch", "--cacheblend-gradual-start-ratio", "Gradual "
            "filtering: ratio selected at the check layer, narrowed linearly to the recompute "
            "ratio by --cacheblend-gradual-end-layer (off when unset).", type=float),
    Setting("end_layer", "launch", "--cacheblend-gradual-end-layer", "Gradual "
            "filtering: layer where the target ratio is reached.", type=int, default=8),
    Setting("recompute_window", "blend", "--cacheblend-recompute-window", "Recompute reused "
            "rows in contiguous runs of this many rows (same budget; 1 = the top rows wherever "
            "they are).", type=int, per_request=True),
    Setting("min_reused_tokens", "blend", "--cacheblend-min-reused-tokens", "Below this many "
            "reusable tokens a request is prefilled in full.", type=int),
    Setting("min_selected_tokens", "blend", "--cacheblend-min-selected-tokens", "Fewest reused "
            "tokens a selection with a ratio above 0 recomputes.", type=int),
    Setting("max_chunks", "server", "--cacheblend-max-chunks", "Most chunks one request may "
            "mark (more: HTTP 400).", type=int),
    Setting("min_chunk_tokens", "server", "--cacheblend-min-chunk-tokens", "Fewest tokens a "
            "chunk may have (fewer: HTTP 400).", type=int),
    Setting("host_mb", "store", "--cacheblend-host-tier-mb", "Host-RAM tier for chunk KV the "
            "pool evicts, in MiB (0: off).", type=int),
    Setting("disk_dir", "store", "--cacheblend-disk-tier-dir", "Folder of the disk tier (one "
            "checked safetensors file per chunk; survives restarts). Off when unset.", type=str),
    Setting("disk_mb", "store", "--cacheblend-disk-tier-mb", "Size limit of the disk tier, in "
            "MiB.", type=int),
    Setting("policy", "store", "--cacheblend-store-policy", "write-through: computed chunks go "
            "to the disk/Mooncake tiers at once; spill: only what the host tier evicts does.",
            type=str, choices=("write-through", "spill")),
    Setting("mooncake_master", "store", "--cacheblend-mooncake-master", "Mooncake master "
            "127.0.0.1:PORT: share chunk KV with other servers.", type=str),
    Setting("mooncake_metadata", "store", "--cacheblend-mooncake-metadata", "Mooncake metadata "
            "server URL (http://127.0.0.1:PORT/metadata).", type=str),
    Setting("queue_mb", "store", "--cacheblend-store-queue-mb", "Most chunk KV queued for the "
            "disk/Mooncake tiers' writer, in MiB (each queued write is a CPU copy; a full queue "
            "skips the write).", type=int),
    Setting("pipeline_loads", "server", "--cacheblend-no-pipeline", "Load every chunk's KV "
            "before the first layer, not layer by layer.", const=False),
    Setting("ratio_policy", "server", "--cacheblend-ratio-policy", "controller: the Loading "
            "Controller picks the recompute ratio that hides behind loading, from measured "
            "speeds (within the min/max ratios).", type=str, choices=RATIO_POLICIES,
            per_request=True),
    Setting("controller_min_ratio", "server", "--cacheblend-controller-min-ratio", "Quality "
            "floor of the controller's ratio.", type=float),
    Setting("controller_max_ratio", "server", "--cacheblend-controller-max-ratio", "Ceiling of "
            "the controller's ratio.", type=float),
    Setting("chunk_context", "server", "--cacheblend-chunk-context", "Text every chunk's KV is "
            "computed after (then dropped), so reused rows are closer to their KV inside a "
            f"prompt: 'builtin[:N]' (N paragraphs of shipped prose; default "
            f"{DEFAULT_CHUNK_CONTEXT!r}), a UTF-8 file, or 'none' (after the sink only).",
            type=str, parse=resolve_context),
)

REQUEST_SETTINGS: tuple[Setting, ...] = tuple(s for s in SETTINGS if s.per_request)
"""The settings a ``cacheblend.chunks`` action may override, under their row names."""


def _store_config_class() -> type[StoreConfig]:
    from sglang_cacheblend.store.config import StoreConfig

    return StoreConfig


def _default_chunk_context() -> str:
    return resolve_context(DEFAULT_CHUNK_CONTEXT)


@dataclass(frozen=True)
class ServerOptions:
    """CacheBlend settings chosen at server launch: on/off, a validated ``BlendConfig``, the
    tiers below the pool, and the per-request chunk limits (each missed chunk costs a
    standalone forward in the scheduler, so a request may not mark thousands of tiny ones).

    ``chunk_context`` is the text chunk KV is computed after ("" = the sink only), resolved
    from the flag's ``builtin[:N]``/file/``none`` at launch.
    """

    enabled: bool = False
    blend: BlendConfig = field(default_factory=BlendConfig)
    max_chunks: int = 256
    min_chunk_tokens: int = 16
    store: StoreConfig = field(default_factory=lambda: _store_config_class()())
    pipeline_loads: bool = True
    ratio_policy: str = "fixed"
    controller_min_ratio: float = 0.15
    controller_max_ratio: float = 0.5
    chunk_context: str = field(default_factory=_default_chunk_context)

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
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServerOptions:
        """The options :meth:`to_env` wrote (the defaults when the variable is unset)."""
        raw = (os.environ if environ is None else environ).get(ENV_VAR)
        if not raw:
            return cls()
        try:
            values = json.loads(raw)
            blend = dict(values.pop("blend"))
            for row in SETTINGS:
                if row.part == "blend" and row.from_json is not None and row.name in blend:
                    blend[row.name] = row.from_json(blend[row.name])
            store = _store_config_class()(**values.pop("store"))
            return cls(blend=BlendConfig(**blend), store=store, **values)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
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


# ------------------------------------------------------------------------------ server flags


def add_cli_args(
    parser: argparse.ArgumentParser, *, enable_action: type[argparse.Action] | None = None
) -> None:
    """Add one flag per row of :data:`SETTINGS` to SGLang's parser; ``enable_action`` replaces
    the plain switch of ``--enable-cacheblend`` (the plugin passes one that checks its hooks)."""
    group = parser.add_argument_group("CacheBlend (sglang-cacheblend plugin)")
    for row in SETTINGS:
        if row.flag is None:
            continue
        kwargs: dict[str, Any] = {"default": None, "help": row.help}
        if row.flag == ENABLE_FLAG and enable_action is not None:
            kwargs.update(action=enable_action, nargs=0, default=False)
        elif row.const is not None:
            kwargs.update(action="store_const", const=row.const)
        else:
            kwargs.update(type=row.type, choices=row.choices)
        group.add_argument(row.flag, dest=row.dest, **kwargs)


def pop_from_namespace(args: argparse.Namespace) -> ServerOptions:
    """Remove our attributes from a parsed namespace and return them as validated options.

    Flags not given leave their field's default. An invalid value raises ``ValueError`` naming
    the flag, so the launcher stops with a message.
    """
    given = {row: vars(args).pop(row.dest) for row in SETTINGS
             if row.flag is not None and hasattr(args, row.dest)}
    parts: dict[str, dict[str, Any]] = {"blend": {}, "store": {}, "server": {}, "launch": {}}
    for row, value in given.items():
        if value is None:
            continue
        try:
            parts[row.part][row.name] = row.parse(value) if row.parse else value
        except (ValueError, OSError) as exc:
            raise ValueError(f"{row.flag}: {exc}") from exc
    try:
        return ServerOptions(blend=_blend_config(parts["blend"], parts["launch"]),
                             store=_store_config_class()(**parts["store"]), **parts["server"])
    except ValueError as exc:
        raise ValueError(f"{_flag_named_in(exc)}: {exc}") from exc


def parse_server_flags(argv: list[str]) -> ServerOptions:
    """The options a server started with ``argv`` runs with (SGLang's own flags in ``argv``
    are passed over); ``ValueError`` naming the flag for a bad value."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    add_cli_args(parser)
    try:
        args, _ = parser.parse_known_args(argv)
    except argparse.ArgumentError as exc:
        raise ValueError(str(exc)) from exc
    return pop_from_namespace(args)


def _blend_config(blend: dict[str, Any], launch: dict[str, Any]) -> BlendConfig:
    """The server's ``BlendConfig``: the blend flags, and a linear gradual schedule when
    ``--cacheblend-gradual-start-ratio`` is given."""
    config = BlendConfig(**blend)
    if "start_ratio" not in launch:
        return config
    rest = {k: v for k, v in blend.items() if k not in ("recompute_ratio", "check_layer")}
    return BlendConfig.linear(launch["start_ratio"], config.recompute_ratio, config.check_layer,
                              launch.get("end_layer", _row("end_layer").default), **rest)


def _row(name: str) -> Setting:
    return next(row for row in SETTINGS if row.name == name)


def _flag_named_in(exc: ValueError) -> str:
    """The flag whose setting an error message names (longest name first)."""
    text = str(exc)
    rows = sorted((row for row in SETTINGS if row.flag), key=lambda row: -len(row.name))
    return next((row.flag for row in rows if row.name in text), "--cacheblend-*")


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
    refuse_unsupported_setups(vars(args), opts.store)
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


# ------------------------------------------------------------------------- request overrides


def read_request_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """The per-request settings among ``values`` (a ``cacheblend.chunks`` payload, or
    keyword arguments), None meaning "the server's": JSON lists made tuples, a vocabulary
    checked where no dataclass checks it (the ratio policy). Ranges are ``BlendConfig``'s to
    check, when the settings are merged with the server's
    (:func:`sglang_cacheblend.serving.blend_settings.effective_config`)."""
    out: dict[str, Any] = {}
    for row in REQUEST_SETTINGS:
        value = values.get(row.name)
        if value is None:
            continue
        if row.from_json is not None:
            value = row.from_json(value)
        if row.choices is not None and value not in row.choices:
            raise ValueError(f"{row.name} must be one of {list(row.choices)}, got {value!r}")
        out[row.name] = value
    return out
