"""Every hook this project places on SGLang, in one table, each with its target and reason.

Hooks go through SGLang's ``HookRegistry`` (the plugin system); nothing here assigns to
attributes of SGLang's modules. :data:`HOOKS` is the complete list; :func:`register_hooks`
installs it. Installing is not enabling: every hook body first asks whether this server runs
with ``--enable-cacheblend`` and otherwise calls SGLang's original unchanged (the two flag hooks
are what find that out; the rotary fix also serves ``sglang-cacheblend serve`` on CPU).

SGLang's registry only logs a target it cannot patch, which would switch the feature off
silently after an SGLang rename. So :func:`verify_hooks_applied` runs when ``--enable-cacheblend``
is parsed (launcher process) and when the radix cache is built (each scheduler process), and a
hook that did not apply stops the server with a message naming it.
"""

from __future__ import annotations

import argparse
import pkgutil
from collections.abc import Callable
from typing import Any, NamedTuple

from sglang_cacheblend import options
from sglang_cacheblend.srt import chat_hooks, cpu_rotary, server_report, tokenizer_hooks

__all__ = ["HOOKS", "Hook", "missing_hooks", "register_hooks", "verify_hooks_applied"]


class Hook(NamedTuple):
    target: str
    kind: str  # a HookType member name
    fn: Callable[..., Any]
    reason: str


class _EnableCacheBlend(argparse.Action):
    """``--enable-cacheblend`` that refuses to start when a hook did not apply."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        missing = missing_hooks()
        if missing:
            parser.error(f"{options.ENABLE_FLAG}: {_missing_message(missing)}")
        setattr(namespace, self.dest, True)


def _add_flags(result: Any, parser: argparse.ArgumentParser) -> Any:
    options.add_cli_args(parser, enable_action=_EnableCacheBlend)
    return result


def _take_flags(original: Callable[..., Any], cls: Any, args: argparse.Namespace) -> Any:
    options.apply_to_server_args(args)
    return original(cls, args)


def _admit_request_chunks(result: Any, adder: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
    if options.current_options().enabled:
        admit = getattr(adder.tree_cache, "admit_chunks", None)
        if admit is not None:
            # Live: SGLang's budget reads the allocator and the evictable size, so it already
            # counts this request's reservation and sees every lock and slot admission takes.
            admit(req, remaining_tokens=lambda: int(adder.rem_total_tokens))
    return result


def _forget_old_weights(result: Any, manager: Any, recv_req: Any, *args: Any,
                        **kwargs: Any) -> Any:
    """After SGLang replaced the served weights: chunk KV of the old ones is never served."""
    if options.current_options().enabled:
        tree_cache = getattr(getattr(manager, "scheduler", None), "tree_cache", None)
        weights_changed = getattr(tree_cache, "weights_changed", None)
        if weights_changed is not None:
            weights_changed(getattr(recv_req, "model_path", None))
    return result


_OPENAI_CHAT = "sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat"
_TOKENIZER = "sglang.srt.managers.tokenizer_manager.TokenizerManager"

HOOKS: tuple[Hook, ...] = (
    Hook(
        "sglang.srt.layers.rotary_embedding.base.RotaryEmbedding.__init__",
        "AROUND",
        cpu_rotary.native_rotary_init,
        "on a device that is neither CUDA nor the CPU engine, __init__ imports a vLLM op that "
        "is not installed although forward then runs forward_native",
    ),
    Hook(
        "sglang.srt.server_args.ServerArgs.add_cli_args",
        "AFTER",
        _add_flags,
        "SGLang has no plugin API for CLI flags; this adds --enable-cacheblend and friends to "
        "SGLang's own parser (launch_server and `sglang serve` both use it)",
    ),
    Hook(
        "sglang.srt.server_args.ServerArgs.from_cli_args",
        "AROUND",
        _take_flags,
        "ServerArgs drops unknown attributes; the values travel to schedulers in the env",
    ),
    Hook(
        "sglang.srt.managers.scheduler_components.internal_state."
        "SchedulerInternalStateController.get_internal_state",
        "AFTER",
        server_report.report_cacheblend_state,
        "shows, in /server_info internal_states, the options the scheduler process runs with",
    ),
    Hook(
        f"{_TOKENIZER}._tokenize_one_request",
        "AROUND",
        tokenizer_hooks.tokenize_with_chunks,
        "chunks must be tokenized each on its own and their spans must reach Req.kv_hints; "
        "this is where SGLang turns a request's text into input_ids (ValueError -> HTTP 400)",
    ),
    Hook(
        f"{_TOKENIZER}._should_use_batch_tokenization",
        "AROUND",
        tokenizer_hooks.keep_sequential_tokenization,
        "--enable-tokenizer-batch-encode tokenizes batches without _tokenize_one_request; "
        "batches with chunks must take the per-request path",
    ),
    Hook(
        f"{_OPENAI_CHAT}._render_and_encode_chat_template",
        "AROUND",
        chat_hooks.render_chat_with_markers,
        "the chat path renders and tokenizes in one step, which would tokenize the chunk "
        "markers as text; with markers it returns the rendered text instead",
    ),
    Hook(
        f"{_OPENAI_CHAT}._convert_to_internal_request",
        "AROUND",
        chat_hooks.convert_chat_with_chunks,
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
    Hook(
        "sglang.srt.managers.scheduler_components.weight_updater."
        "SchedulerWeightUpdaterManager.flush_cache_after_weight_update",
        "AFTER",
        _forget_old_weights,
        "every update_weights_* path that replaced the served weights calls it (flushed or "
        "not); chunk KV in the index and the tiers was computed with the old weights",
    ),
)


def register_hooks() -> None:
    """Register every hook of :data:`HOOKS` (SGLang applies them right after the plugins)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    for hook in HOOKS:
        HookRegistry.register(hook.target, hook.fn, HookType[hook.kind])


def missing_hooks() -> list[str]:
    """Targets of :data:`HOOKS` that SGLang's registry did not patch in this process."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    patched = getattr(HookRegistry, "_patched", None)
    return [hook.target for hook in HOOKS if not _is_patched(hook.target, patched)]


def _is_patched(target: str, patched: set[str] | None) -> bool:
    if patched is not None:
        return target in patched
    # A registry without the record: a patched target is a wrapper around the original.
    owner, _, name = target.rpartition(".")
    try:
        return hasattr(getattr(pkgutil.resolve_name(owner), name), "__wrapped__")
    except (ImportError, AttributeError, ValueError):
        return False


def verify_hooks_applied() -> None:
    """``RuntimeError`` naming every hook that did not apply in this process."""
    missing = missing_hooks()
    if missing:
        raise RuntimeError(_missing_message(missing))


def _missing_message(missing: list[str]) -> str:
    return (f"CacheBlend cannot run: SGLang did not apply its hook(s) on {', '.join(missing)} "
            "(renamed in this SGLang version? see the server log for the registry's error)")
