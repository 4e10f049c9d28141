"""The settings table (``sglang_cacheblend.options``): the launch flags parse into validated
options equal to the defaults built in code, survive the trip through the env, and a request's
overrides merge with them."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from sglang_cacheblend import options
from sglang_cacheblend.chunks import ClientAction
from sglang_cacheblend.config import BlendConfig
from sglang_cacheblend.serving.blend_settings import effective_config, effective_ratio_policy


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    options.add_cli_args(parser)
    return parser.parse_args(argv)


def test_defaults_are_off_and_blendconfig_defaults():
    from sglang_cacheblend.context_text import builtin_context

    opts = options.pop_from_namespace(_parse([]))
    # Chunk KV is computed after the shipped context by default (measured best, issue 17).
    assert opts == options.ServerOptions(enabled=False, blend=BlendConfig(),
                                         chunk_context=builtin_context())


def test_options_built_in_code_are_the_command_line_defaults():
    """Regression: ``ServerOptions()`` had chunk context "" (the sink only) while the flag's
    default was the builtin text, so code and tests that built options directly ran another
    product than ``serve``."""
    assert options.ServerOptions() == options.pop_from_namespace(_parse([]))
    assert options.ServerOptions() == options.parse_server_flags([])
    assert options.ServerOptions().chunk_context != ""


def test_every_field_is_one_row_of_the_table():
    """Adding a knob is a field and one row: every BlendConfig, StoreConfig and ServerOptions
    field has exactly one row, each flag is one argparse option, each dest is ours alone."""
    from sglang_cacheblend.store.config import StoreConfig

    parts = {"blend": BlendConfig, "store": StoreConfig, "server": options.ServerOptions}
    for part, cls in parts.items():
        names = [row.name for row in options.SETTINGS if row.part == part]
        fields = {f.name for f in dataclasses.fields(cls)} - {"blend", "store"}
        assert sorted(names) == sorted(fields), part
    flags = [row.flag for row in options.SETTINGS if row.flag]
    assert len(flags) == len(set(flags)) and all(f.startswith("--") for f in flags)
    parser = argparse.ArgumentParser()
    options.add_cli_args(parser)
    assert {a.dest for a in parser._actions} - {"help"} == {
        row.dest for row in options.SETTINGS if row.flag}
    assert all(dest.startswith("cacheblend_") for dest in vars(parser.parse_args([])))


def test_the_table_loads_without_torch_or_sglang():
    code = ("import sys, sglang_cacheblend.options as o; o.SETTINGS; "
            "print(sorted(m for m in ('torch', 'sglang') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_server_flags_parse_among_sglang_flags_with_the_table_parser(tmp_path):
    opts = options.parse_server_flags([
        "--max-total-tokens", "9000", f"--cacheblend-disk-tier-dir={tmp_path}",
        "--cacheblend-min-chunk-tokens", "4", "--cacheblend-chunk-context", "none",
        "--cacheblend-no-pipeline", "--enable-cacheblend"])
    assert (opts.store.disk_dir, opts.min_chunk_tokens, opts.chunk_context) == (
        str(tmp_path), 4, "")
    assert opts.enabled and not opts.pipeline_loads
    with pytest.raises(ValueError, match="--cacheblend-min-chunk-tokens"):
        options.parse_server_flags(["--cacheblend-min-chunk-tokens", "x"])


def test_the_chunk_context_flag_takes_none_builtin_or_a_file_and_names_itself(tmp_path):
    from sglang_cacheblend.context_text import builtin_context

    assert options.pop_from_namespace(_parse(["--cacheblend-chunk-context", "none"])
                                      ).chunk_context == ""
    assert options.pop_from_namespace(_parse(["--cacheblend-chunk-context", "builtin:2"])
                                      ).chunk_context == builtin_context(2)
    path = tmp_path / "context.txt"
    path.write_text("Preceding text.\n\n")
    opts = options.pop_from_namespace(_parse(["--enable-cacheblend",
                                              "--cacheblend-chunk-context", str(path)]))
    assert opts.chunk_context == "Preceding text.\n\n"
    assert options.ServerOptions.from_env({options.ENV_VAR: opts.to_env()}) == opts
    with pytest.raises(ValueError, match="--cacheblend-chunk-context"):
        options.pop_from_namespace(_parse(["--cacheblend-chunk-context", "nowhere.txt"]))
    window = options.pop_from_namespace(_parse(["--cacheblend-recompute-window", "4"]))
    assert window.blend.recompute_window == 4
    with pytest.raises(ValueError, match="--cacheblend-recompute-window"):
        options.pop_from_namespace(_parse(["--cacheblend-recompute-window", "0"]))


def test_flags_round_trip_through_env_and_leave_no_attributes():
    args = _parse(["--enable-cacheblend", "--cacheblend-recompute-ratio", "0.2",
                   "--cacheblend-selector", "k_deviation", "--cacheblend-gradual-start-ratio",
                   "0.4", "--cacheblend-gradual-end-layer", "5"])
    opts = options.pop_from_namespace(args)
    assert vars(args) == {}  # nothing left for ServerArgs to trip over
    assert opts.enabled and opts.blend.selector == "k_deviation"
    assert opts.blend.gradual[0] == (1, 0.4) and opts.blend.gradual[-1] == (5, 0.2)
    env = {options.ENV_VAR: opts.to_env()}
    assert options.ServerOptions.from_env(env) == opts


@pytest.mark.parametrize(
    "argv, flag",
    [(["--cacheblend-recompute-ratio", "-0.1"], "--cacheblend-recompute-ratio"),
     (["--cacheblend-check-layer", "-1"], "--cacheblend-check-layer"),
     (["--cacheblend-selector", "nope"], "--cacheblend-selector")],
)
def test_bad_values_name_the_flag(argv, flag):
    with pytest.raises(ValueError, match=flag):
        options.pop_from_namespace(_parse(argv))


def test_a_gradual_schedule_from_the_flags_names_the_flag_when_bad():
    opts = options.pop_from_namespace(_parse(["--cacheblend-gradual-start-ratio", "0.3"]))
    assert opts.blend.gradual[0] == (1, 0.3) and opts.blend.gradual[-1][0] == 8  # the end layer
    with pytest.raises(ValueError, match="--cacheblend-gradual-end-layer"):
        options.pop_from_namespace(_parse(["--cacheblend-gradual-start-ratio", "0.3",
                                           "--cacheblend-gradual-end-layer", "0"]))
    with pytest.raises(ValueError, match="--cacheblend-gradual-start-ratio"):
        options.pop_from_namespace(_parse(["--cacheblend-gradual-start-ratio", "2"]))


def test_malformed_env_is_an_error():
    with pytest.raises(ValueError, match=options.ENV_VAR):
        options.ServerOptions.from_env({options.ENV_VAR: "{not json"})


def _sglang_parse(argv: list[str]) -> argparse.Namespace:
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    options.add_cli_args(parser)
    return parser.parse_args(["--model-path", "m", *argv])


@pytest.mark.parametrize("argv, flag", [
    (["--speculative-algorithm", "EAGLE"], "--speculative-algorithm"),
    (["--tp-size", "2"], "--tp-size"),
    (["--pp-size", "2"], "--pp-size"),
    (["--enable-dp-attention", "--dp-size", "2"], "--enable-dp-attention"),
    (["--kv-cache-dtype", "fp8_e4m3"], "--kv-cache-dtype"),
    (["--enable-lora"], "--enable-lora"),
    (["--page-size", "16"], "--page-size"),
    (["--disable-radix-cache"], "--disable-radix-cache"),
])
def test_unsupported_setups_are_refused_at_launch_naming_the_flag(argv, flag, monkeypatch):
    """Review F3-F5, F14: these ran and failed later, in the scheduler."""
    pytest.importorskip("sglang")
    monkeypatch.delenv(options.ENV_VAR, raising=False)
    args = _sglang_parse(["--enable-cacheblend", *argv])
    with pytest.raises(ValueError, match=f"cannot be combined with: .*{flag}"):
        options.apply_to_server_args(args)
    plain = _sglang_parse(argv)  # without --enable-cacheblend nothing is refused
    assert options.apply_to_server_args(plain).enabled is False


def test_chunk_limits_are_flags_and_validated():
    opts = options.pop_from_namespace(_parse(["--cacheblend-max-chunks", "8",
                                              "--cacheblend-min-chunk-tokens", "4"]))
    assert (opts.max_chunks, opts.min_chunk_tokens) == (8, 4)
    assert options.ServerOptions.from_env({options.ENV_VAR: opts.to_env()}) == opts
    with pytest.raises(ValueError, match="--cacheblend-min-chunk-tokens"):
        options.pop_from_namespace(_parse(["--cacheblend-min-chunk-tokens", "0"]))


# ------------------------------------------------------------------ a request's overrides


def test_a_request_overrides_only_what_it_gives():
    server = BlendConfig.linear(0.3, 0.15, 1, 8, recompute_window=4)
    assert effective_config(server, None) is server
    assert effective_config(server, ClientAction(False)) is server
    ratio = effective_config(server, ClientAction(False, settings={
        "recompute_ratio": 0.25}))
    # A ratio alone drops the server's schedule (which ends at another ratio).
    assert (ratio.recompute_ratio, ratio.gradual, ratio.recompute_window) == (0.25, (), 4)
    steps = effective_config(server, ClientAction(False, settings={
        "gradual": [[2, 0.4], [5, 0.2]], "selector": "k_deviation"}))
    assert (steps.check_layer, steps.recompute_ratio, steps.selector) == (2, 0.2, "k_deviation")
    with pytest.raises(ValueError, match="gradual must end at recompute_ratio=0.1"):
        effective_config(BlendConfig(), ClientAction(False, settings={
            "recompute_ratio": 0.1, "gradual": [[1, 0.3], [8, 0.15]]}))


def test_a_request_ratio_policy_and_an_explicit_ratio_win_over_the_server():
    def policy(**settings):
        return effective_ratio_policy("controller", ClientAction(False,
                                                                         settings=settings))

    assert effective_ratio_policy("controller", None) == "controller"
    assert policy() == "controller"
    assert policy(ratio_policy="fixed") == "fixed"
    assert policy(recompute_ratio=0.2) == policy(gradual=[[1, 0.2]]) == "fixed"
    assert effective_ratio_policy("fixed", ClientAction(False, settings={
        "ratio_policy": "controller"})) == "controller"
    with pytest.raises(ValueError, match="ratio_policy must be one of"):
        ClientAction(False, settings={"ratio_policy": "auto"})
