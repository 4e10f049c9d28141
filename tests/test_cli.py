"""The ``sglang-cacheblend`` command line: each subcommand imports only its own module, and the
command as typed travels with the parsed arguments into every results file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sglang_cacheblend import cli

ROOT = Path(__file__).resolve().parents[1]


def test_serve_loads_no_eval_module_and_no_matplotlib():
    """Regression: cli imported eval.quality at module level, so even ``serve`` loaded
    matplotlib, numpy and the whole eval package."""
    code = ("import sys\n"
            "from sglang_cacheblend import cli\n"
            "args, rest = cli.parse_args(['serve', '--port', '31000', '--enable-cacheblend'])\n"
            "assert args.command == 'serve' and rest == ['--port', '31000', '--enable-cacheblend']\n"
            "print(sorted(m for m in sys.modules if m == 'matplotlib' or m.startswith("
            "('matplotlib.', 'sglang_cacheblend.eval'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("command, module", [
    ("bench", "sglang_cacheblend.eval.bench.run"),
    ("eval", "sglang_cacheblend.eval.quality.run"),
])
def test_a_subcommand_imports_its_own_module_only(command, module):
    code = ("import sys\n"
            "from sglang_cacheblend import cli\n"
            f"cli.parse_args([{command!r}])\n"
            "print(sorted(m for m in sys.modules if m.startswith('sglang_cacheblend.eval.')"
            " and m.count('.') == 3))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert module in out.stdout
    other = "sglang_cacheblend.eval.quality.run" if command == "bench" else \
        "sglang_cacheblend.eval.bench.run"
    assert other not in out.stdout


def test_the_parsed_arguments_carry_the_whole_command_line():
    argv = ["--cache-dir", "/tmp/c", "bench", "--item", "3", "--chunks", "6", "--no-load",
            "--cacheblend-chunk-context", "none"]
    args, rest = cli.parse_args(argv)
    assert (args.command, args.item, args.chunks, args.no_load) == ("bench", 3, [6], True)
    assert rest == ["--cacheblend-chunk-context", "none"]
    assert args.argv == argv
    assert args.command_line == "sglang-cacheblend " + " ".join(argv)


def test_the_full_parser_has_every_subcommands_flags():
    """What tests that build their own arguments use: ``build_parser()`` with no names."""
    parser = cli.build_parser()
    for argv, flag in ((["demo"], "keep_server"), (["eval"], "main_ratio"),
                       (["bench"], "dense_sdpa"), (["soak"], "pool_tokens"),
                       (["ingest", "corpus.txt"], "batch")):
        args, _ = parser.parse_known_args(argv)
        assert args.command == argv[0] and hasattr(args, flag)
