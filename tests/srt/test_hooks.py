"""The hooks on SGLang: targets exist, they are inert without --enable-cacheblend, and a hook
that did not apply stops the server with a message naming it."""

from __future__ import annotations

import argparse
import pkgutil
import sys
from types import SimpleNamespace

import pytest

pytest.importorskip("sglang")
from sglang.srt.plugins.hook_registry import HookRegistry  # noqa: E402

from sglang_cacheblend.options import (  # noqa: E402
    ENV_VAR,
    NATIVE_ROTARY_ENV_VAR,
    ServerOptions,
)
from sglang_cacheblend.srt import hooks  # noqa: E402
from sglang_cacheblend.srt.cpu_rotary import native_rotary_init  # noqa: E402

ALL_TARGETS = {hook.target for hook in hooks.HOOKS}


def test_every_hook_target_exists_in_this_sglang():
    """SGLang's HookRegistry only logs a target it cannot resolve; fail here instead."""
    for hook in hooks.HOOKS:
        owner, _, name = hook.target.rpartition(".")
        assert callable(getattr(pkgutil.resolve_name(owner), name)), hook.target
        assert hook.reason
    assert len(ALL_TARGETS) == len(hooks.HOOKS)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch_server")
    hooks._add_flags(None, parser)
    return parser


def test_enable_flag_stops_the_launcher_naming_a_hook_that_did_not_apply(monkeypatch, capsys):
    target = hooks.HOOKS[4].target  # _tokenize_one_request
    monkeypatch.setattr(HookRegistry, "_patched", ALL_TARGETS - {target})
    assert _parser().parse_args([]).cacheblend_enabled is False  # not asked for: no check
    with pytest.raises(SystemExit):
        _parser().parse_args(["--enable-cacheblend"])
    assert target in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="_tokenize_one_request"):
        hooks.verify_hooks_applied()
    monkeypatch.setattr(HookRegistry, "_patched", set(ALL_TARGETS))
    assert _parser().parse_args(["--enable-cacheblend"]).cacheblend_enabled is True
    hooks.verify_hooks_applied()


def test_request_hooks_do_nothing_without_enable_cacheblend(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    admitted = []
    cache = SimpleNamespace(admit_chunks=lambda *a, **k: admitted.append(a))
    adder = SimpleNamespace(tree_cache=cache, rem_total_tokens=10)
    assert hooks._admit_request_chunks("result", adder, SimpleNamespace(rid="r")) == "result"
    assert admitted == []
    monkeypatch.setenv(ENV_VAR, ServerOptions(enabled=True).to_env())
    hooks._admit_request_chunks("result", adder, SimpleNamespace(rid="r"))
    assert len(admitted) == 1

    monkeypatch.delenv(ENV_VAR, raising=False)
    from sglang_cacheblend.srt.chat_hooks import render_chat_with_markers
    from sglang_cacheblend.srt.server_report import report_cacheblend_state

    marked = [{"role": "user", "content": "<|cacheblend_chunk|>x<|/cacheblend_chunk|>"}]
    assert render_chat_with_markers(lambda s, m, **k: ("ids", None), None, marked) == ("ids", None)
    state = SimpleNamespace(internal_state={})
    report_cacheblend_state(state, None)
    assert state.internal_state == {}


def test_server_report_never_raises_into_the_scheduler(monkeypatch):
    from sglang_cacheblend.srt.server_report import report_cacheblend_state

    monkeypatch.setenv(ENV_VAR, ServerOptions(enabled=True).to_env())
    state = SimpleNamespace(internal_state={})
    report_cacheblend_state(state, SimpleNamespace(scheduler=None))  # internals renamed/missing
    assert state.internal_state["cacheblend"]["plugin_loaded"] is True
    assert "error" in state.internal_state["cacheblend"]


def _rotary_init_that_needs_vllm(module):
    from vllm._custom_ops import rotary_embedding  # noqa: PLC0415 - what SGLang does off CUDA

    module.use_fallback_kernel = True
    module.fallback_rotary_embedding = rotary_embedding


def test_rotary_fix_only_where_asked_for(monkeypatch):
    if "vllm" in sys.modules or pkgutil.find_loader("vllm") is not None:
        pytest.skip("an installed vLLM is used as is")
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv(NATIVE_ROTARY_ENV_VAR, raising=False)
    module = SimpleNamespace()
    with pytest.raises(ImportError):
        native_rotary_init(_rotary_init_that_needs_vllm, module)
    monkeypatch.setenv(NATIVE_ROTARY_ENV_VAR, "1")
    native_rotary_init(_rotary_init_that_needs_vllm, module)
    assert module.use_fallback_kernel is False and module.fallback_rotary_embedding is None
    assert "vllm" not in sys.modules  # the stand-in is gone again
