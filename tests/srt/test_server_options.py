"""The launch flags parse into a validated BlendConfig and survive the trip through the env."""

from __future__ import annotations

import argparse

import pytest

from sglang_cacheblend.config import BlendConfig
from sglang_cacheblend.srt import server_options as options


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    options.add_cli_args(parser)
    return parser.parse_args(argv)


def test_defaults_are_off_and_blendconfig_defaults():
    from sglang_cacheblend.chunks import builtin_context

    opts = options.pop_from_namespace(_parse([]))
    # Chunk KV is computed after the shipped context by default (measured best, issue 17).
    assert opts == options.ServerOptions(enabled=False, blend=BlendConfig(),
                                         chunk_context=builtin_context())


def test_the_chunk_context_flag_takes_none_builtin_or_a_file_and_names_itself(tmp_path):
    from sglang_cacheblend.chunks import builtin_context

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
