"""``sglang-cacheblend bench``: TTFT and throughput of every mode, measured in one run, one server.

One ``--enable-cacheblend`` server (started here on 127.0.0.1, or ``--url``) serves every mode,
so ratios compare like with like on a noisy machine. A request is a RAG prompt (instruction +
k chunks + musique question, :mod:`sglang_cacheblend.dataset`) sent as ``input_ids`` with
``max_new_tokens=1``, so its latency is the time to first token. Modes:

* ``full``: SGLang's normal prefill, nothing cached (the cache is flushed before each TTFT
  request; under load every request has its own ``cache_salt``);
* ``prefix``: SGLang's prefix cache, the passages in the order of a warmed request;
* ``prefix_reordered``: the prefix cache with the passages reordered (only the instruction is a
  cached prefix), what prefix caching gives a RAG prompt whose retrieval order changes;
* ``reuse``: chunks precomputed, reordered, blended at recompute ratio 0 (full KV reuse);
* ``blend@r``: the same, blended at ratio r (default 0.15) with the server's selector;
  ``blend@r <rule>`` with each rule of ``--selectors`` (chosen per request);
* ``dense_sdpa`` (``--dense-sdpa``, TTFT only): no server, transformers' forward of the
  reordered prompt in this process (:mod:`.dense`), the floor any server's TTFT sits above.

Chunks are cut to ``--chunk-sizes`` tokens from consecutive musique passages, or with
``--whole-passages`` are the item's passages as they are (:mod:`.workload`). Prompts longer than
the model's context are skipped and listed. Every reuse/blend request is checked against the
server's ``/server_info`` blend report (``reused_tokens``).

Throughput, per mode, on one (chunks, size): a closed loop at ``--concurrency`` and an open loop
per Poisson arrival rate in ``--rates``; every loop stops issuing after ``--load-requests``
requests or ``--load-seconds`` seconds, whichever comes first, and waits for those in flight.

Arguments the command does not know are SGLang flags for the server it starts. Writes
``<out>/<name>.{json,csv,md}`` (:mod:`sglang_cacheblend.eval.results`; the command line is in
``config.command_line``) and ``<out>/<name>_ttft.png``. The defaults should take about 10
minutes on an idle 2-core CPU (an estimate; ``docs/results/bench.md`` records the wall time of a
measured run); the full-size run takes hours::

    sglang-cacheblend bench --chunks 2 6 12 --chunk-sizes 256 512 1024 --reps 3 \\
        --concurrency 4 --rates 0.1 0.2 0.5 --load-requests 16 --load-seconds 300

The headline TTFT table (the item's own 6 passages, per-request selectors, the dense floor)::

    sglang-cacheblend bench --whole-passages --chunks 6 --reps 3 --selectors v_deviation \\
        --dense-sdpa --no-load --name server_ttft

``sglang-cacheblend bench --tiers pool host disk [mooncake]`` runs the chunk-tier benchmark
instead (:mod:`.tiers`): TTFT with every chunk in the pool, host RAM, disk or Mooncake, with and
without layer pipelining.

This module runs the modes; :mod:`.workload` builds the prompts, :mod:`.load` holds the HTTP
client and the load loops, :mod:`.report` the summaries, ratios and written outputs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sglang_cacheblend.chunks import Encode
from sglang_cacheblend.config import SELECTOR_NAMES
from sglang_cacheblend.dataset import DEFAULT_DATA_PATH, encoder, load_items, tokenize_prompt
from sglang_cacheblend.eval.bench import tiers
from sglang_cacheblend.eval.bench.dense import DensePrefill
from sglang_cacheblend.eval.bench.load import (
    Client,
    Completed,
    Reply,
    Send,
    closed_loop,
    open_loop,
    poisson_schedule,
)
from sglang_cacheblend.eval.bench.report import BASELINES, DENSE, write_outputs
from sglang_cacheblend.eval.bench.workload import Workload, make_workload, reorderings
from sglang_cacheblend.eval.results import REPO_ROOT


@dataclass(frozen=True)
class BlendMode:
    """A mode whose request marks the chunks: its name, recompute ratio and rule (None: the
    server's)."""

    name: str
    ratio: float
    selector: str | None = None


def blend_modes(ratios: Sequence[float], selectors: Sequence[str] = ()) -> list[BlendMode]:
    """``reuse``, ``blend@r`` per ratio, then ``blend@r <rule>`` per ratio and rule."""
    return [BlendMode("reuse", 0.0), *(BlendMode(f"blend@{r:g}", r) for r in ratios),
            *(BlendMode(f"blend@{r:g} {s}", r, s) for r in ratios for s in selectors)]


def mode_names(ratios: Sequence[float], selectors: Sequence[str] = ()) -> list[str]:
    """Every server mode one run measures, baselines first, in the order TTFT sends them."""
    return [*BASELINES, *(mode.name for mode in blend_modes(ratios, selectors))]


# ------------------------------------------------------------------------------ modes


def run_ttft(client: Client, work: Workload, modes: Sequence[BlendMode], rep: int,
             bar: tqdm | None = None, dense: DensePrefill | None = None) -> list[dict[str, Any]]:
    """One repetition of every mode on ``work``: a fresh cache, fresh salts (module docstring);
    ``dense_sdpa`` last, while the server is idle."""
    base = {"phase": "ttft", "chunks": work.chunks, "chunk_size": work.chunk_size,
            "prompt_tokens": work.prompt_tokens, "rep": rep}
    rows: list[dict[str, Any]] = []

    def record(mode: str, seconds: float, cached: int | None, reused: int | None = None) -> None:
        rows.append({**base, "mode": mode, "ttft_s": seconds, "cached_tokens": cached,
                     "reused_tokens": reused})
        if bar is not None:
            bar.update()

    def send(mode: str, reply: Reply, reused: int | None = None) -> None:
        record(mode, reply.latency_s, reply.cached_tokens, reused)

    client.flush()
    salt = uuid.uuid4().hex
    send("full", client.generate(work.ordered, salt))
    send("prefix", client.generate(work.ordered, salt))
    send("prefix_reordered", client.generate(work.reordered, salt))
    blend_salt = uuid.uuid4().hex
    precompute_s = client.precompute(work.prompt.passages, blend_salt)
    rows.append({**base, "phase": "precompute", "mode": "precompute",
                 "precompute_s": precompute_s})
    for mode in modes:
        reply = client.generate(work.reordered, blend_salt, mode.ratio, mode.selector)
        send(mode.name, reply, (reply.blend_report or {}).get("reused_tokens"))
    if dense is not None:
        record(DENSE, dense.seconds(work.reordered), None)
    return rows


def run_load(client: Client, work: Workload, encode: Encode, modes: Sequence[BlendMode],
             args: argparse.Namespace, bar: tqdm | None = None) -> list[dict[str, Any]]:
    """Every mode under the closed loop, then under each Poisson rate (module docstring)."""
    client.flush()
    salt, blend_salt = uuid.uuid4().hex, uuid.uuid4().hex
    client.generate(work.ordered, salt)  # warms the prefix cache for prefix/prefix_reordered
    client.precompute(work.prompt.passages, blend_salt)
    orders = reorderings(work.chunks, args.load_requests, args.seed)
    shuffled = [tokenize_prompt(work.prompt.reordered(o), encode) for o in orders]
    senders: dict[str, Send] = {
        "full": lambda i: client.generate(work.ordered, uuid.uuid4().hex),
        "prefix": lambda i: client.generate(work.ordered, salt),
        "prefix_reordered": lambda i: client.generate(shuffled[i], salt),
        **{mode.name: (lambda i, m=mode: client.generate(shuffled[i], blend_salt, m.ratio,
                                                         m.selector))
           for mode in modes},
    }
    loops: list[tuple[str, Callable[[Send], list[Completed]]]] = [
        (f"concurrency={args.concurrency}",
         lambda send: closed_loop(send, concurrency=args.concurrency,
                                  max_requests=args.load_requests, max_seconds=args.load_seconds))]
    for rate in args.rates:
        schedule = poisson_schedule(rate, max_requests=args.load_requests,
                                    max_seconds=args.load_seconds, seed=args.seed)
        loops.append((f"poisson={rate:g}/s", lambda send, s=schedule: open_loop(send, s)))
    rows: list[dict[str, Any]] = []
    for loop, run in loops:
        for mode, send in senders.items():
            def counted(i: int, send: Send = send) -> Reply:
                reply = send(i)
                if bar is not None:
                    bar.update()
                return reply

            for index, start, reply in run(counted):
                rows.append({"phase": "load", "loop": loop, "mode": mode, "chunks": work.chunks,
                             "chunk_size": work.chunk_size, "prompt_tokens": work.prompt_tokens,
                             "request": index, "start_s": start, "latency_s": reply.latency_s,
                             "end_s": start + reply.latency_s,
                             "cached_tokens": reply.cached_tokens})
    return rows


# ------------------------------------------------------------------------------ command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` flags (and ``--tiers``'); defaults keep a run near 10 minutes on 2 CPUs."""
    add = parser.add_argument
    add("--url", default=None, help="a running --enable-cacheblend server (else one is started)")
    add("--port", type=int, default=30941, help="port of the server started here")
    add("--model-path", type=Path, default=None, help="tokenizer/model (default: embedded)")
    add("--data", type=Path, default=DEFAULT_DATA_PATH, help="musique_dev-format JSON")
    add("--item", type=int, default=0, help="first dataset item the prompts are built from")
    add("--chunks", type=int, nargs="+", default=[2, 6], help="chunk counts (TTFT)")
    add("--chunk-sizes", type=int, nargs="+", default=[512], help="tokens per chunk (TTFT)")
    add("--whole-passages", action="store_true",
        help="chunks are the item's own passages, uncut (--chunk-sizes and --load-chunk-size "
             "are not used): the prompt eval and the demo send")
    add("--ratios", type=float, nargs="+", default=[0.15], help="CacheBlend recompute ratios")
    add("--selectors", nargs="*", default=[], metavar="RULE",
        help="also measure blend@ratio with each of these rules, chosen per request "
             "('blend@0.15 v_deviation'); default: only the server's own selector")
    add("--dense-sdpa", action="store_true",
        help="also time dense_sdpa: transformers' prefill of the reordered prompt in this "
             "process, without a server (TTFT only; loads the model of --model-path)")
    add("--reps", type=int, default=2, help="TTFT repetitions per mode and shape")
    add("--load-chunks", type=int, default=6, help="chunk count of the throughput prompt")
    add("--load-chunk-size", type=int, default=512, help="tokens per chunk, throughput prompt")
    add("--concurrency", type=int, default=2, help="closed-loop concurrency")
    add("--rates", type=float, nargs="*", default=[0.2, 1.0], help="Poisson rates (req/s)")
    add("--load-requests", type=int, default=4, help="request bound of every load loop")
    add("--load-seconds", type=float, default=45.0, help="wall-time bound (s) of every load loop")
    add("--no-load", action="store_true", help="TTFT only")
    add("--seed", type=int, default=0)
    add("--out", type=Path, default=REPO_ROOT / "docs" / "results")
    add("--name", default="bench", help="file stem of the outputs")
    tiers.add_arguments(parser)


def check_arguments(args: argparse.Namespace) -> None:
    """``ValueError`` naming the flag for values the benchmark cannot run with."""
    if any(k < 2 for k in [*args.chunks, args.load_chunks]):
        raise ValueError("--chunks/--load-chunks: at least 2 chunks (reordering needs two)")
    if any(s < 1 for s in [*args.chunk_sizes, args.load_chunk_size]):
        raise ValueError("--chunk-sizes/--load-chunk-size must be >= 1")
    if any(not 0 < r <= 1 for r in args.ratios):
        raise ValueError("--ratios must be in (0, 1]; ratio 0 is the 'reuse' mode")
    unknown = [s for s in args.selectors if s not in SELECTOR_NAMES]
    if unknown:
        raise ValueError(f"--selectors: unknown {unknown}; choose from {', '.join(SELECTOR_NAMES)}")
    for flag in ("reps", "concurrency", "load_requests"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.load_seconds <= 0 or any(r <= 0 for r in args.rates):
        raise ValueError("--load-seconds and --rates must be > 0")


def run(args: argparse.Namespace, server_args: Sequence[str] = ()) -> dict[str, Path]:
    """Run the benchmark (or ``--tiers``'), self-started server unless ``--url``, and write its
    outputs; ``args.command_line`` is recorded with them."""
    check_arguments(args)
    if args.tiers:
        return tiers.run(args, server_args)
    return _run_modes(args, server_args)


def _run_modes(args: argparse.Namespace, server_args: Sequence[str]) -> dict[str, Path]:
    """TTFT of every mode on every shape, then throughput on the load shape (module docstring)."""
    from transformers import AutoTokenizer

    from sglang_cacheblend.embedded_model import ensure_model
    from sglang_cacheblend.launch import ServerProcess

    if args.url and server_args:
        raise ValueError(f"server flags {list(server_args)} need a server started here, not --url")
    model_path = args.model_path or ensure_model(getattr(args, "cache_dir", None))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encode = encoder(tokenizer)
    context_len = json.loads((Path(model_path) / "config.json").read_text())[
        "max_position_embeddings"]
    items = load_items(args.data)
    sizes = [None] if args.whole_passages else args.chunk_sizes
    works: list[Workload] = []
    skipped: list[Workload] = []
    for size in sizes:
        for k in args.chunks:
            work = make_workload(items, args.item, k, size, tokenizer)
            (works if work.prompt_tokens < context_len else skipped).append(work)
    skipped_rows = [{"chunks": w.chunks, "chunk_size": w.chunk_size,
                     "prompt_tokens": w.prompt_tokens, "context_len": context_len} for w in skipped]
    if not works:
        raise ValueError(f"every prompt shape exceeds the model's context of {context_len} tokens")
    load_size = None if args.whole_passages else args.load_chunk_size
    load_work = None if args.no_load else make_workload(items, args.item, args.load_chunks,
                                                        load_size, tokenizer)
    if load_work is not None and load_work.prompt_tokens >= context_len:
        raise ValueError(f"--load-chunks x --load-chunk-size gives {load_work.prompt_tokens} "
                         f"tokens, over the model's context of {context_len}")
    modes = blend_modes(args.ratios, args.selectors)
    dense = DensePrefill(Path(model_path)) if args.dense_sdpa else None

    def measure(url: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        client = Client(url)
        state = client.cacheblend_state()
        rows: list[dict[str, Any]] = []
        smallest = min(works, key=lambda w: w.prompt_tokens)
        run_ttft(client, smallest, modes, rep=-1, dense=dense)  # warm-up, not recorded
        per_shape = len(mode_names(args.ratios, args.selectors)) + (dense is not None)
        with tqdm(total=len(works) * args.reps * per_shape, desc="TTFT", unit="req") as bar:
            for rep in range(args.reps):  # shapes interleaved per repetition
                for work in works:
                    rows += run_ttft(client, work, modes, rep, bar, dense)
        if load_work is not None:
            total = (1 + len(args.rates)) * len(mode_names(args.ratios, args.selectors)) * \
                args.load_requests
            with tqdm(total=total, desc="load", unit="req") as bar:
                rows += run_load(client, load_work, encode, modes, args, bar)
        server = {k: v for k, v in state.items() if k not in ("blend_totals", "token_pool", "pid")}
        return rows, server

    started = time.monotonic()
    if args.url:
        rows, server = measure(args.url)
    else:
        log_path = Path(tempfile.gettempdir()) / f"sglang-cacheblend-{args.name}-server.log"
        print(f"starting SGLang on 127.0.0.1:{args.port} (log: {log_path})", flush=True)
        with ServerProcess(args=["--enable-cacheblend", *server_args], port=args.port,
                           model_path=Path(model_path), log_path=log_path) as proc:
            rows, server = measure(proc.base_url)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if not callable(v)}
    config.update(server_args=list(server_args), model_path=str(model_path),
                  context_len=context_len, server_cacheblend=server,
                  dense_dtype=None if dense is None else dense.dtype,
                  wall_s=time.monotonic() - started)
    return write_outputs(args.out, args.name, config, rows, skipped_rows)
