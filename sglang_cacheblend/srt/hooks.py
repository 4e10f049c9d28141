"""Every hook this project places on SGLang, in one place, each with its target and reason.

Hooks go through SGLang's ``HookRegistry`` (the plugin system, PR #21388); nothing here assigns
to attributes of SGLang's modules. ``HOOKS`` is the complete list; ``register_hooks`` installs it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import types
from dataclasses import asdict
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from sglang_cacheblend.srt import options, request_chunks

logger = logging.getLogger(__name__)


class Hook(NamedTuple):
    target: str
    kind: str  # a HookType member name
    fn: Callable[..., Any]
    reason: str


# --------------------------------------------------------------------------------------------
# Rotary embedding on a device that is neither CUDA nor SGLang's CPU engine.
# --------------------------------------------------------------------------------------------

_VLLM_OPS = "vllm._custom_ops"


def _missing_vllm_rotary(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("vllm rotary kernel is not installed; RotaryEmbedding must stay native")


@contextlib.contextmanager
def _vllm_rotary_stand_in() -> Iterator[bool]:
    """Make ``from vllm._custom_ops import rotary_embedding`` succeed for one call.

    Yields whether a stand-in was installed. The stand-in is removed again afterwards, and an
    installed vLLM is never shadowed.
    """
    try:
        import vllm._custom_ops  # noqa: F401

        yield False
        return
    except ImportError:
        pass
    added = {}
    for name in ("vllm", _VLLM_OPS):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = []  # a package, so the submodule import resolves
            added[name] = module
    added[_VLLM_OPS].rotary_embedding = _missing_vllm_rotary
    sys.modules.update(added)
    try:
        yield True
    finally:
        for name in added:
            sys.modules.pop(name, None)


def _native_rotary_init(original_init: Callable[..., None], self: Any, *args: Any, **kw: Any):
    with _vllm_rotary_stand_in() as stood_in:
        original_init(self, *args, **kw)
    if stood_in:
        # Off CUDA, SGLang dispatches RotaryEmbedding.forward to forward_native; keep the
        # module consistent with that instead of pointing at a kernel that does not exist.
        self.use_fallback_kernel = False
        self.fallback_rotary_embedding = None


# --------------------------------------------------------------------------------------------
# Server flags.
# --------------------------------------------------------------------------------------------


def _add_cacheblend_cli_args(result: Any, parser: argparse.ArgumentParser) -> None:
    options.add_cli_args(parser)
    return result


def _take_cacheblend_args(original: Callable[..., Any], cls: Any, args: argparse.Namespace):
    opts = options.pop_from_namespace(args)
    if opts.enabled:
        backend = getattr(args, "radix_cache_backend", None)
        if backend not in (None, options.RADIX_BACKEND_NAME):
            raise ValueError(
                f"--enable-cacheblend needs --radix-cache-backend {options.RADIX_BACKEND_NAME}, "
                f"got {backend!r}"
            )
        args.radix_cache_backend = options.RADIX_BACKEND_NAME
        model_package = os.environ.get(options.MODEL_PACKAGE_ENV_VAR)
        if model_package not in (None, options.MODEL_PACKAGE):
            raise ValueError(
                f"--enable-cacheblend loads its models from {options.MODEL_PACKAGE}, but "
                f"{options.MODEL_PACKAGE_ENV_VAR}={model_package} is set"
            )
        os.environ[options.MODEL_PACKAGE_ENV_VAR] = options.MODEL_PACKAGE
        os.environ[options.ENV_VAR] = opts.to_env()
        logger.info("CacheBlend enabled: %s", opts)
    else:
        os.environ.pop(options.ENV_VAR, None)
    return original(cls, args)


# --------------------------------------------------------------------------------------------
# Observability: the scheduler process reports what it runs with.
# --------------------------------------------------------------------------------------------


def _report_cacheblend_state(result: Any, controller: Any, *args: Any, **kwargs: Any) -> Any:
    state = result.internal_state
    opts = options.ServerOptions.from_env()
    scheduler = controller.scheduler
    tree_cache = scheduler.tree_cache
    report: dict[str, Any] = {
        "plugin_loaded": True,
        "pid": os.getpid(),
        **asdict(opts),
        "tree_cache": type(tree_cache).__name__,
        "model_class": _qualified_name(scheduler.tp_worker.model_runner.model),
        # The scheduler's own leak check holds when available + evictable + protected == total.
        "token_pool": {
            "total": scheduler.max_total_num_tokens,
            "available": scheduler.token_to_kv_pool_allocator.available_size(),
            "evictable": tree_cache.evictable_size(),
            "protected": tree_cache.protected_size(),
        },
    }
    # Per-request accounting of the last blended extend batch (reused tokens, rows recomputed
    # summed over layers, time in the blended forward).
    report["last_blend"] = getattr(scheduler.tp_worker.model_runner.model, "last_blend_stats", {})
    chunk_stats = getattr(tree_cache, "chunk_stats", None)
    if callable(chunk_stats):
        stats = chunk_stats()
        report["chunk_index"] = stats._asdict() if hasattr(stats, "_asdict") else asdict(stats)
    state["cacheblend"] = report
    return result


# --------------------------------------------------------------------------------------------
# Chunks: admission locks a request's chunk hits (the bodies of the request hooks are in
# request_chunks.py).
# --------------------------------------------------------------------------------------------


def _admit_request_chunks(result: Any, adder: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
    admit = getattr(adder.tree_cache, "admit_chunks", None)
    if admit is not None:
        admit(req, spare_tokens=int(adder.rem_total_tokens))
    return result


def _qualified_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


HOOKS: tuple[Hook, ...] = (
    Hook(
        "sglang.srt.layers.rotary_embedding.base.RotaryEmbedding.__init__",
        "AROUND",
        _native_rotary_init,
        "on a device that is neither CUDA nor the CPU engine, __init__ imports a vLLM op that "
        "is not installed although forward then runs forward_native",
    ),
    Hook(
        "sglang.srt.server_args.ServerArgs.add_cli_args",
        "AFTER",
        _add_cacheblend_cli_args,
        "SGLang has no plugin API for CLI flags; this adds --enable-cacheblend and friends to "
        "SGLang's own parser (launch_server and `sglang serve` both use it)",
    ),
    Hook(
        "sglang.srt.server_args.ServerArgs.from_cli_args",
        "AROUND",
        _take_cacheblend_args,
        "ServerArgs drops unknown attributes; the values travel to schedulers in the env",
    ),
    Hook(
        "sglang.srt.managers.scheduler_components.internal_state."
        "SchedulerInternalStateController.get_internal_state",
        "AFTER",
        _report_cacheblend_state,
        "shows, in /server_info internal_states, the options the scheduler process runs with",
    ),
    Hook(
        "sglang.srt.managers.tokenizer_manager.TokenizerManager._tokenize_one_request",
        "AROUND",
        request_chunks.tokenize_with_chunks,
        "chunks must be tokenized each on its own and their spans must reach Req.kv_hints; "
        "this is where SGLang turns a request's text into input_ids (ValueError -> HTTP 400)",
    ),
    Hook(
        "sglang.srt.managers.tokenizer_manager.TokenizerManager._should_use_batch_tokenization",
        "AROUND",
        request_chunks.keep_sequential_tokenization,
        "--enable-tokenizer-batch-encode tokenizes batches without _tokenize_one_request; "
        "batches with chunks must take the per-request path",
    ),
    Hook(
        "sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat."
        "_render_and_encode_chat_template",
        "AROUND",
        request_chunks.render_chat_with_markers,
        "the chat path renders and tokenizes in one step, which would tokenize the chunk "
        "markers as text; with markers it returns the rendered text instead",
    ),
    Hook(
        "sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat."
        "_convert_to_internal_request",
        "AROUND",
        request_chunks.convert_chat_with_chunks,
        "the OpenAI protocol has no kv_hints; marked chat text becomes input_ids plus an "
        "explicit cacheblend.chunks action (no special tokens added: the template has them)",
    ),
    Hook(
        "sglang.srt.managers.schedule_policy.PrefillAdder._commit_prefill_admission",
        "AFTER",
        _admit_request_chunks,
        "admission is where SGLang locks a request's prefix; the request's chunk hits are "
        "locked there too (the tree cache's lock() does not see the request)",
    ),
)


def register_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    for hook in HOOKS:
        HookRegistry.register(hook.target, hook.fn, HookType[hook.kind])
