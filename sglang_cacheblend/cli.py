"""The ``sglang-cacheblend`` command: prepare-model, serve, demo, eval, bench, soak, ingest.

``serve`` passes every argument it does not know straight to SGLang's own launcher, so
``sglang-cacheblend serve --port 31000 --enable-cacheblend`` is ``python -m
sglang.launch_server`` with the embedded model and the CPU defaults filled in; ``demo``,
``bench``, ``soak`` and ``ingest`` pass theirs on to the server they start.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

from sglang_cacheblend import demo as demo_cmd
from sglang_cacheblend.eval import bench as bench_cmd
from sglang_cacheblend.eval import bench_tiers as bench_tiers_cmd
from sglang_cacheblend.eval import quality as quality_cmd
from sglang_cacheblend.eval import soak as soak_cmd
from sglang_cacheblend.ingest import runner as ingest_cmd
from sglang_cacheblend.embedded_model import ModelPreparationError


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
    from sglang_cacheblend.embedded_model import ensure_model

    model_path = args.model_path or ensure_model(args.cache_dir)
    log_path = Path(tempfile.gettempdir()) / "sglang-cacheblend-demo-server.log"
    demo_cmd.run_demo(model_path, port=args.port, extra_args=sglang_args,
                      passages_file=args.passages, question=args.question,
                      keep_server=args.keep_server, log_path=log_path)
    return 0


def _cmd_bench(args: argparse.Namespace, sglang_args: list[str]) -> int:
    try:
        if args.tiers:
            paths = bench_tiers_cmd.run(args, sglang_args)
        else:
            paths = bench_cmd.run(args, sglang_args)
    except ValueError as exc:
        print(f"sglang-cacheblend bench: {exc}", file=sys.stderr)
        return 2
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def _cmd_soak(args: argparse.Namespace, sglang_args: list[str]) -> int:
    report = soak_cmd.run(args, sglang_args)
    print(f"soak: sent {report.sent}, served {report.served} ({report.blended} blended, "
          f"{report.fallbacks} full-prefill fallbacks), aborted {report.aborted}, disconnected "
          f"{report.disconnected}, errors {len(report.errors)}; compared with the request "
          f"alone {report.compared} ({report.uncompared} not comparable), mismatches "
          f"{len(report.mismatches)}; chunk evictions {report.chunk_evictions}, server deaths "
          f"{report.server_deaths}, leaks {len(report.leaks)}; {report.wall_s} s -> {args.out}")
    return 0 if report.ok else 1


def _cmd_eval(args: argparse.Namespace, sglang_args: list[str]) -> int:
    command = "sglang-cacheblend " + " ".join(sys.argv[1:])
    try:
        return quality_cmd.run(args, sglang_args, command)
    except ValueError as exc:
        print(f"sglang-cacheblend eval: {exc}", file=sys.stderr)
        return 2


def _cmd_ingest(args: argparse.Namespace, sglang_args: list[str]) -> int:
    try:
        summary = ingest_cmd.run(args, sglang_args)
    except (ValueError, OSError) as exc:
        print(f"sglang-cacheblend ingest: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sglang-cacheblend ingest: interrupted", file=sys.stderr)
        return 130
    return ingest_cmd.summary_exit_code(summary)


def build_parser() -> argparse.ArgumentParser:
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
    demo = sub.add_parser(
        "demo", help="CacheBlend end to end: full prefill, prefix cache, CacheBlend side by side",
        description=demo_cmd.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--port", type=int, default=30123, help="port on 127.0.0.1")
    demo.add_argument("--passages", type=Path, default=None,
                      help="passages: a JSON list of strings, a musique_dev-format file, or text "
                           "with passages separated by blank lines (default: a bundled item)")
    demo.add_argument("--question", default=None, help="the question (default: the item's)")
    demo.add_argument("--model-path", type=Path, default=None,
                      help="a Hugging Face model directory (default: the embedded SmolLM2)")
    demo.add_argument("--keep-server", action="store_true",
                      help="leave the server serving afterwards and print how to call it")
    for name, module, help_text in (
        ("eval", quality_cmd,
         "quality and fidelity to full prefill per mode (MuSiQue F1, KL, answer agreement)"),
        ("bench", bench_cmd,
         "TTFT and throughput: full prefill, prefix cache, full KV reuse, CacheBlend"),
        ("soak", soak_cmd,
         "bounded soak on a small pool: no deaths, same answers as alone, nothing leaked"),
        ("ingest", ingest_cmd,
         "precompute a corpus's chunks into a CacheBlend server (resumable, batched)"),
    ):
        command = sub.add_parser(name, help=help_text, description=module.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(command)
        if module is bench_cmd:
            bench_tiers_cmd.add_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command == "prepare-model":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
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
