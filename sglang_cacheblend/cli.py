"""The ``sglang-cacheblend`` command: prepare-model, serve, demo, eval, bench, soak, ingest.

``serve`` passes every argument it does not know straight to SGLang's own launcher, so
``sglang-cacheblend serve --port 31000 --enable-cacheblend`` is ``python -m
sglang.launch_server`` with the embedded model and the CPU defaults filled in; ``demo``,
``bench``, ``soak`` and ``ingest`` pass theirs on to the server they start.

A subcommand's module (its flags, its description and its code) is imported only when that
subcommand is parsed, inside the function that runs it: ``serve`` loads no evaluation code and
neither numpy's nor matplotlib's weight, and no product module imports
:mod:`sglang_cacheblend.eval`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shlex
import sys
import tempfile
from collections.abc import Collection
from pathlib import Path
from typing import NamedTuple

from sglang_cacheblend.embedded_model import ModelPreparationError


class Subcommand(NamedTuple):
    """A subcommand whose flags live in ``module``: its ``add_arguments(parser)`` adds them and
    its docstring is the subcommand's description."""

    help: str
    module: str


SUBCOMMANDS = {
    "demo": Subcommand(
        "CacheBlend end to end: full prefill, prefix cache, CacheBlend side by side",
        "sglang_cacheblend.demo"),
    "eval": Subcommand(
        "quality and fidelity to full prefill per mode (MuSiQue F1, KL, answer agreement)",
        "sglang_cacheblend.eval.quality.run"),
    "bench": Subcommand(
        "TTFT and throughput: full prefill, prefix cache, full KV reuse, CacheBlend "
        "(--tiers: by chunk tier)",
        "sglang_cacheblend.eval.bench.run"),
    "soak": Subcommand(
        "bounded soak on a small pool: no deaths, same answers as alone, nothing leaked",
        "sglang_cacheblend.eval.soak"),
    "ingest": Subcommand(
        "precompute a corpus's chunks into a CacheBlend server (resumable, batched)",
        "sglang_cacheblend.ingest.runner"),
}
"""The subcommands with flags of their own, by name (``prepare-model`` and ``serve`` have
theirs here)."""


def _cmd_prepare_model(args: argparse.Namespace) -> int:
    from sglang_cacheblend.embedded_model import prepare_model

    prepared = prepare_model(args.cache_dir, force=args.force)
    state = "built" if prepared.built else "already prepared"
    print(f"{prepared.path} ({state})")
    return 0


def _cmd_serve(args: argparse.Namespace, sglang_args: list[str]) -> int:
    from sglang_cacheblend.embedded_model import ensure_model
    from sglang_cacheblend.launch import launch_command, server_env

    model_path = None if "--model-path" in sglang_args else ensure_model(args.cache_dir)
    cmd = launch_command(sglang_args, model_path=model_path)
    print("+ " + " ".join(cmd), flush=True)
    os.execve(cmd[0], cmd, {**os.environ, **server_env()})
    return 0  # not reached


def _cmd_demo(args: argparse.Namespace, sglang_args: list[str]) -> int:
    from sglang_cacheblend.demo import run_demo
    from sglang_cacheblend.embedded_model import ensure_model

    model_path = args.model_path or ensure_model(args.cache_dir)
    log_path = Path(tempfile.gettempdir()) / "sglang-cacheblend-demo-server.log"
    run_demo(model_path, port=args.port, extra_args=sglang_args, passages_file=args.passages,
             question=args.question, keep_server=args.keep_server, log_path=log_path)
    return 0


def _refused(command: str, exc: Exception) -> int:
    """A subcommand's input refused: the reason on stderr, exit status 2."""
    print(f"sglang-cacheblend {command}: {exc}", file=sys.stderr)
    return 2


def _cmd_bench(args: argparse.Namespace, sglang_args: list[str]) -> int:
    from sglang_cacheblend.eval.bench.run import run

    try:
        paths = run(args, sglang_args)
    except (ValueError, RuntimeError) as exc:
        return _refused("bench", exc)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def _cmd_soak(args: argparse.Namespace, sglang_args: list[str]) -> int:
    from sglang_cacheblend.eval.soak import run

    report = run(args, sglang_args)
    print(f"soak: sent {report.sent}, served {report.served} ({report.blended} blended, "
          f"{report.fallbacks} full-prefill fallbacks), aborted {report.aborted}, disconnected "
          f"{report.disconnected}, errors {len(report.errors)}; compared with the request "
          f"alone {report.compared} ({report.uncompared} not comparable), mismatches "
          f"{len(report.mismatches)}; chunk evictions {report.chunk_evictions}, server deaths "
          f"{report.server_deaths}, leaks {len(report.leaks)}; {report.wall_s} s -> {args.out}")
    return 0 if report.ok else 1


def _cmd_eval(args: argparse.Namespace, sglang_args: list[str]) -> int:
    from sglang_cacheblend.eval.quality.run import run

    try:
        return run(args, sglang_args, args.command_line)
    except ValueError as exc:
        return _refused("eval", exc)


def _cmd_ingest(args: argparse.Namespace, sglang_args: list[str]) -> int:
    from sglang_cacheblend.ingest.runner import run, summary_exit_code

    try:
        summary = run(args, sglang_args)
    except (ValueError, OSError) as exc:
        return _refused("ingest", exc)
    except KeyboardInterrupt:
        print("sglang-cacheblend ingest: interrupted", file=sys.stderr)
        return 130
    return summary_exit_code(summary)


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with the flags of the subcommands in ``commands`` (None: all of them).

    A subcommand's flags come from its module, so only the modules of ``commands`` are
    imported; the others are listed with their help line only.
    """
    parser = argparse.ArgumentParser(prog="sglang-cacheblend", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="model cache root (default: $SGLANG_CACHEBLEND_HOME or $XDG_CACHE_HOME/sglang-cacheblend)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare-model", help="build the embedded SmolLM2 model directory")
    prep.add_argument("--force", action="store_true", help="rebuild even if a cache exists")
    sub.add_parser(
        "serve",
        help="start an SGLang server (embedded model and CPU defaults unless overridden)",
        description="All further arguments are SGLang server flags.",
    )
    for name, subcommand in SUBCOMMANDS.items():
        if commands is not None and name not in commands:
            sub.add_parser(name, help=subcommand.help)
            continue
        module = importlib.import_module(subcommand.module)
        command = sub.add_parser(name, help=subcommand.help, description=module.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(command)
    return parser


def _command_named(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names (None: none), read past the global flags."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--cache-dir")
    first.add_argument("command", nargs="?")
    return first.parse_known_args(argv)[0].command


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """``argv`` parsed with only its subcommand's module imported; the flags nobody knows are
    returned for the server. ``args.argv`` and ``args.command_line`` hold the command as typed,
    which every results file records."""
    command = _command_named(argv)
    parser = build_parser([] if command is None else [command])
    args, rest = parser.parse_known_args(argv)
    if rest and args.command == "prepare-model":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.argv = list(argv)
    args.command_line = shlex.join(["sglang-cacheblend", *argv])
    return args, rest


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args, rest = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "prepare-model":
            return _cmd_prepare_model(args)
        if args.command == "serve":
            return _cmd_serve(args, rest)
        if args.command == "bench":
            return _cmd_bench(args, rest)
        if args.command == "eval":
            return _cmd_eval(args, rest)
        if args.command == "soak":
            return _cmd_soak(args, rest)
        if args.command == "ingest":
            return _cmd_ingest(args, rest)
        return _cmd_demo(args, rest)
    except ModelPreparationError as exc:
        print(f"sglang-cacheblend: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
