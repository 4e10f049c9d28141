"""``sglang-cacheblend bench``: TTFT and throughput of five modes, measured in one run, one server.

One ``--enable-cacheblend`` server (started here on 127.0.0.1, or ``--url``) serves every mode,
so ratios compare like with like on a noisy machine. A request is a RAG prompt (instruction +
k chunks + musique question, :mod:`sglang_cacheblend.eval.dataset`) sent as ``input_ids`` with
``max_new_tokens=1``, so its latency is the time to first token. Modes:

* ``full``: SGLang's normal prefill, nothing cached (the cache is flushed before each TTFT
  request; under load every request has its own ``cache_salt``);
* ``prefix``: SGLang's prefix cache, the passages in the order of a warmed request;
* ``prefix_reordered``: the prefix cache with the passages reordered (only the instruction is a
  cached prefix), what prefix caching gives a RAG prompt whose retrieval order changes;
* ``reuse``: chunks precomputed, reordered, blended at recompute ratio 0 (full KV reuse);
* ``blend@r``: the same, blended at ratio r (default 0.15).

A chunk of ``size`` tokens is cut from consecutive musique passages (the item's, then the next
items'), joined by a space when one passage is shorter than ``size``. Prompts longer than the
model's context are skipped and listed. Every reuse/blend request is checked against the
server's ``/server_info`` blend report (``reused_tokens``).

Throughput, per mode, on one (chunks, size): a closed loop at ``--concurrency`` and an open loop
per Poisson arrival rate in ``--rates``; every loop stops issuing after ``--load-requests``
requests or ``--load-seconds`` seconds, whichever comes first, and waits for those in flight.

Arguments the command does not know are SGLang flags for the server it starts. Writes
``<out>/<name>.{json,csv,md}`` (:mod:`sglang_cacheblend.eval.results`) and
``<out>/<name>_ttft.png``. The defaults should take about 10 minutes on an idle 2-core CPU
(estimated from the timings in DESIGN.md); the full-size run takes hours::

    sglang-cacheblend bench --chunks 2 6 12 --chunk-sizes 256 512 1024 --reps 3 \\
        --concurrency 4 --rates 0.1 0.2 0.5 --load-requests 16 --load-seconds 300
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from tqdm import tqdm

from sglang_cacheblend.chunks import ChunkedPrompt, chunk_hints, precompute_chunks
from sglang_cacheblend.eval.dataset import (
    DEFAULT_DATA_PATH,
    QAItem,
    RagPrompt,
    load_items,
    rag_prompt,
    tokenize_prompt,
)
from sglang_cacheblend.eval.metrics import summarize
from sglang_cacheblend.eval.results import REPO_ROOT

BASELINES = ("full", "prefix", "prefix_reordered")
Encode = Callable[[str], Sequence[int]]
Decode = Callable[[Sequence[int]], str]


def mode_names(ratios: Sequence[float]) -> list[str]:
    return [*BASELINES, "reuse", *(f"blend@{r:g}" for r in ratios)]


# ------------------------------------------------------------------------------ pure parts


def sized_passages(
    items: Sequence[QAItem], start: int, count: int, size: int, encode: Encode, decode: Decode
) -> list[str]:
    """``count`` chunk texts of ``size`` tokens each, cut from consecutive passages.

    Passages are taken from ``items[start]``, then the following items (wrapping around); a
    passage shorter than ``size`` is joined with the next by a space. Each chunk text is the
    decoded first ``size`` tokens, so it re-tokenizes to about ``size`` tokens.
    """
    if count < 1 or size < 1:
        raise ValueError(f"count and size must be >= 1, got {count} and {size}")
    stream = (p for i in range(len(items)) for p in items[(start + i) % len(items)].passages)
    chunks: list[str] = []
    for _ in range(count):
        ids: list[int] = []
        while len(ids) < size:
            passage = next(stream, None)
            if passage is None:
                raise ValueError(f"the data holds too few passages for {count} x {size} tokens")
            ids += encode(passage if not ids else " " + passage)
        chunks.append(decode(ids[:size]))
    return chunks


def poisson_schedule(
    rate: float, *, max_requests: int, max_seconds: float, seed: int
) -> list[float]:
    """Arrival offsets (s) of a Poisson process at ``rate``/s: first at 0, exponential gaps.

    Bounded in count (``max_requests``) and time (every offset < ``max_seconds``); the same seed
    gives the same schedule.
    """
    if rate <= 0 or max_requests < 1 or max_seconds <= 0:
        raise ValueError("rate, max_requests and max_seconds must be positive")
    rng = random.Random(seed)
    offsets, t = [], 0.0
    while len(offsets) < max_requests and t < max_seconds:
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


def reorderings(n: int, count: int, seed: int) -> list[list[int]]:
    """``count`` seeded random orders of ``n`` chunks, none the original order (n >= 2)."""
    if n < 2:
        raise ValueError("reordering needs at least 2 chunks")
    rng = random.Random(seed)
    orders = []
    while len(orders) < count:
        order = rng.sample(range(n), n)
        if order != list(range(n)):
            orders.append(order)
    return orders


def ratios_against(
    values: Mapping[str, float], baselines: Sequence[str], *, higher_is_better: bool
) -> dict[str, dict[str, float | None]]:
    """Per mode, how many times better than each baseline (``vs_<baseline>``; >1 is better).

    TTFT (lower is better): ``baseline / mode``; throughput: ``mode / baseline``. None where a
    baseline was not measured or a value is 0.
    """
    out: dict[str, dict[str, float | None]] = {}
    for mode, value in values.items():
        row: dict[str, float | None] = {}
        for base in baselines:
            ref = values.get(base)
            ok = ref is not None and ref > 0 and value > 0
            if not ok:
                row[f"vs_{base}"] = None
            else:
                row[f"vs_{base}"] = value / ref if higher_is_better else ref / value
        out[mode] = row
    return out


def ttft_summary(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Min/median/mean/max TTFT per (chunks, size, mode), with ratios against the baselines.

    ``min_reused_tokens``: the fewest chunk tokens the server reported reusing for a request of
    that mode (None: not a blended mode, or never reported); 0 or None for ``reuse``/``blend``
    means those requests were not blended and their times are not CacheBlend's.
    """
    groups: dict[tuple[int, int], dict[str, list[float]]] = {}
    tokens: dict[tuple[int, int], int] = {}
    reused: dict[tuple[int, int, str], list[int]] = {}
    for row in rows:
        key = (row["chunks"], row["chunk_size"])
        groups.setdefault(key, {}).setdefault(row["mode"], []).append(row["ttft_s"])
        tokens[key] = row["prompt_tokens"]
        if row.get("reused_tokens") is not None:
            reused.setdefault((*key, row["mode"]), []).append(row["reused_tokens"])
    out = []
    for key, modes in groups.items():
        stats = {mode: summarize(times) for mode, times in modes.items()}
        ratios = ratios_against({m: s.median for m, s in stats.items()}, BASELINES,
                                higher_is_better=False)
        for mode, s in stats.items():
            out.append({"chunks": key[0], "chunk_size": key[1], "prompt_tokens": tokens[key],
                        "mode": mode, "n": s.n, "min_s": s.min, "median_s": s.median,
                        "mean_s": s.mean, "max_s": s.max, **ratios[mode],
                        "min_reused_tokens": min(reused.get((*key, mode), [None]), key=_none_low)})
    return out


def unblended_warnings(ttft: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per reuse/blend summary row whose requests the server did not blend."""
    return [f"WARNING: {r['mode']} at {r['chunks']} x {r['chunk_size']} was not blended (the "
            "server reported no reused chunk tokens); its times are not CacheBlend's"
            for r in ttft if r["mode"] not in BASELINES and not r["min_reused_tokens"]]


def _none_low(value: int | None) -> float:
    return -1 if value is None else value


def load_summary(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Requests/s and latency per (loop, mode), with throughput ratios against the baselines.

    A loop's throughput is completed requests over the time from its start to its last
    completion.
    """
    groups: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for row in rows:
        groups.setdefault(row["loop"], {}).setdefault(row["mode"], []).append(row)
    out = []
    for loop, modes in groups.items():
        rps = {mode: len(rs) / max(r["end_s"] for r in rs) for mode, rs in modes.items()}
        ratios = ratios_against(rps, BASELINES, higher_is_better=True)
        for mode, rs in modes.items():
            lat = summarize(r["latency_s"] for r in rs)
            out.append({"loop": loop, "mode": mode, "completed": len(rs),
                        "requests_per_s": rps[mode], "median_latency_s": lat.median,
                        "max_latency_s": lat.max, **ratios[mode]})
    return out


# ------------------------------------------------------------------------------ server client


@dataclass(frozen=True)
class Reply:
    latency_s: float
    rid: str
    cached_tokens: int | None


class Client:
    """The server calls the benchmark makes: ``/generate``, ``/flush_cache``, ``/server_info``."""

    def __init__(self, base_url: str, timeout_s: float = 900.0) -> None:
        self.url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def generate(self, prompt: ChunkedPrompt, salt: str, ratio: float | None = None) -> Reply:
        """One request with ``max_new_tokens=1``; chunks marked only when ``ratio`` is given."""
        body: dict[str, Any] = {"input_ids": list(prompt.input_ids), "cache_salt": salt,
                                "sampling_params": {"temperature": 0, "max_new_tokens": 1}}
        if ratio is not None:
            hints = chunk_hints(prompt.spans)
            hints["actions"][0]["payload"]["recompute_ratio"] = ratio
            body["kv_hints"] = hints
        start = time.perf_counter()
        response = requests.post(self.url + "/generate", json=body, timeout=self.timeout_s)
        latency = time.perf_counter() - start
        if response.status_code != 200:
            raise RuntimeError(f"/generate failed ({response.status_code}): {response.text}")
        meta = response.json()["meta_info"]
        return Reply(latency, meta["id"], meta.get("cached_tokens"))

    def flush(self) -> None:
        for _ in range(20):  # the scheduler refuses while it still holds a finishing request
            if requests.post(self.url + "/flush_cache", timeout=60).status_code == 200:
                return
            time.sleep(0.5)
        raise RuntimeError("the server refused /flush_cache 20 times")

    def precompute(self, texts: Sequence[str], salt: str) -> float:
        start = time.perf_counter()
        precompute_chunks(self.url, texts, cache_salt=salt, timeout=self.timeout_s)
        return time.perf_counter() - start

    def cacheblend_state(self) -> dict[str, Any]:
        info = requests.get(self.url + "/server_info", timeout=60).json()
        state = (info.get("internal_states") or [{}])[0].get("cacheblend")
        if not state:
            raise RuntimeError(f"{self.url} runs without CacheBlend (--enable-cacheblend)")
        return state

    def reused_tokens(self, rid: str) -> int | None:
        return self.cacheblend_state().get("last_blend", {}).get(rid, {}).get("reused_tokens")


# ------------------------------------------------------------------------------ workloads


@dataclass(frozen=True)
class Workload:
    """One (chunks, size) prompt shape: its pieces and the two fixed orders TTFT sends."""

    chunks: int
    chunk_size: int
    prompt: RagPrompt
    ordered: ChunkedPrompt
    reordered: ChunkedPrompt  # passages reversed

    @property
    def prompt_tokens(self) -> int:
        return len(self.ordered.input_ids)


def make_workload(
    items: Sequence[QAItem], item: int, chunks: int, size: int, tokenizer: Any
) -> Workload:
    """The prompt of ``chunks`` chunks of ``size`` tokens and the question of ``items[item]``."""

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(ids, clean_up_tokenization_spaces=False)

    prompt = rag_prompt(sized_passages(items, item, chunks, size, encode, decode),
                        items[item].question)
    reverse = prompt.reordered(list(range(chunks))[::-1])
    return Workload(chunks, size, prompt, tokenize_prompt(prompt, encode),
                    tokenize_prompt(reverse, encode))


def run_ttft(client: Client, work: Workload, ratios: Sequence[float], rep: int,
             bar: tqdm | None = None) -> list[dict[str, Any]]:
    """One repetition of every mode on ``work``: a fresh cache, fresh salts (module docstring)."""
    base = {"phase": "ttft", "chunks": work.chunks, "chunk_size": work.chunk_size,
            "prompt_tokens": work.prompt_tokens, "rep": rep}
    rows = []

    def record(mode: str, reply: Reply, reused: int | None = None) -> None:
        rows.append({**base, "mode": mode, "ttft_s": reply.latency_s,
                     "cached_tokens": reply.cached_tokens, "reused_tokens": reused})
        if bar is not None:
            bar.update()

    client.flush()
    salt = uuid.uuid4().hex
    record("full", client.generate(work.ordered, salt))
    record("prefix", client.generate(work.ordered, salt))
    record("prefix_reordered", client.generate(work.reordered, salt))
    blend_salt = uuid.uuid4().hex
    precompute_s = client.precompute(work.prompt.passages, blend_salt)
    rows.append({**base, "phase": "precompute", "mode": "precompute",
                 "precompute_s": precompute_s})
    for mode, ratio in (("reuse", 0.0), *((f"blend@{r:g}", r) for r in ratios)):
        reply = client.generate(work.reordered, blend_salt, ratio)
        record(mode, reply, client.reused_tokens(reply.rid))
    return rows


# ------------------------------------------------------------------------------ load loops


def closed_loop(send: Callable[[int], Reply], *, concurrency: int, max_requests: int,
                max_seconds: float) -> list[tuple[int, float, Reply]]:
    """``concurrency`` workers send requests back to back until either bound is reached.

    Returns ``(request index, start offset s, reply)`` per completed request.
    """
    lock = threading.Lock()
    issued = [0]
    t0 = time.perf_counter()
    done: list[tuple[int, float, Reply]] = []

    def worker() -> None:
        while True:
            with lock:
                if issued[0] >= max_requests or time.perf_counter() - t0 >= max_seconds:
                    return
                index = issued[0]
                issued[0] += 1
            start = time.perf_counter() - t0
            reply = send(index)
            with lock:
                done.append((index, start, reply))

    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    return done


def open_loop(
    send: Callable[[int], Reply], schedule: Sequence[float]
) -> list[tuple[int, float, Reply]]:
    """Send request i at ``schedule[i]`` seconds (Poisson arrivals), whatever is in flight."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(1, len(schedule))) as pool:
        futures = []
        for index, offset in enumerate(schedule):
            time.sleep(max(0.0, offset - (time.perf_counter() - t0)))
            start = time.perf_counter() - t0
            futures.append((index, start, pool.submit(send, index)))
        return [(index, start, future.result()) for index, start, future in futures]


def run_load(client: Client, work: Workload, encode: Encode, ratios: Sequence[float],
             args: argparse.Namespace, bar: tqdm | None = None) -> list[dict[str, Any]]:
    """Every mode under the closed loop, then under each Poisson rate (module docstring)."""
    client.flush()
    salt, blend_salt = uuid.uuid4().hex, uuid.uuid4().hex
    client.generate(work.ordered, salt)  # warms the prefix cache for prefix/prefix_reordered
    client.precompute(work.prompt.passages, blend_salt)
    orders = reorderings(work.chunks, args.load_requests, args.seed)
    shuffled = [tokenize_prompt(work.prompt.reordered(o), encode) for o in orders]
    senders: dict[str, Callable[[int], Reply]] = {
        "full": lambda i: client.generate(work.ordered, uuid.uuid4().hex),
        "prefix": lambda i: client.generate(work.ordered, salt),
        "prefix_reordered": lambda i: client.generate(shuffled[i], salt),
        "reuse": lambda i: client.generate(shuffled[i], blend_salt, 0.0),
        **{f"blend@{r:g}": (lambda i, r=r: client.generate(shuffled[i], blend_salt, r))
           for r in ratios},
    }
    loops: list[tuple[str, Callable[[Callable[[int], Reply]], list]]] = [
        (f"concurrency={args.concurrency}",
         lambda send: closed_loop(send, concurrency=args.concurrency,
                                  max_requests=args.load_requests, max_seconds=args.load_seconds))]
    for rate in args.rates:
        schedule = poisson_schedule(rate, max_requests=args.load_requests,
                                    max_seconds=args.load_seconds, seed=args.seed)
        loops.append((f"poisson={rate:g}/s", lambda send, s=schedule: open_loop(send, s)))
    rows = []
    for loop, run in loops:
        for mode, send in senders.items():
            def counted(i: int, send: Callable[[int], Reply] = send) -> Reply:
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
    """The ``bench`` flags; defaults keep a run near 10 minutes on a 2-core CPU."""
    add = parser.add_argument
    add("--url", default=None, help="a running --enable-cacheblend server (else one is started)")
    add("--port", type=int, default=30941, help="port of the server started here")
    add("--model-path", type=Path, default=None, help="tokenizer/model (default: embedded)")
    add("--data", type=Path, default=DEFAULT_DATA_PATH, help="musique_dev-format JSON")
    add("--item", type=int, default=0, help="first dataset item the prompts are built from")
    add("--chunks", type=int, nargs="+", default=[2, 6], help="chunk counts (TTFT)")
    add("--chunk-sizes", type=int, nargs="+", default=[512], help="tokens per chunk (TTFT)")
    add("--ratios", type=float, nargs="+", default=[0.15], help="CacheBlend recompute ratios")
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


def check_arguments(args: argparse.Namespace) -> None:
    """``ValueError`` naming the flag for values the benchmark cannot run with."""
    if any(k < 2 for k in [*args.chunks, args.load_chunks]):
        raise ValueError("--chunks/--load-chunks: at least 2 chunks (reordering needs two)")
    if any(s < 1 for s in [*args.chunk_sizes, args.load_chunk_size]):
        raise ValueError("--chunk-sizes/--load-chunk-size must be >= 1")
    if any(not 0 < r <= 1 for r in args.ratios):
        raise ValueError("--ratios must be in (0, 1]; ratio 0 is the 'reuse' mode")
    for flag in ("reps", "concurrency", "load_requests"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.load_seconds <= 0 or any(r <= 0 for r in args.rates):
        raise ValueError("--load-seconds and --rates must be > 0")


def run(args: argparse.Namespace, server_args: Sequence[str] = ()) -> dict[str, Path]:
    """Run the benchmark (self-started server unless ``--url``) and write its outputs."""
    from transformers import AutoTokenizer

    from sglang_cacheblend.launch import ServerProcess
    from sglang_cacheblend.models import ensure_model

    check_arguments(args)
    if args.url and server_args:
        raise ValueError(f"server flags {list(server_args)} need a server started here, not --url")
    model_path = args.model_path or ensure_model(getattr(args, "cache_dir", None))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    context_len = json.loads((Path(model_path) / "config.json").read_text())[
        "max_position_embeddings"]
    items = load_items(args.data)
    shapes = [(k, s) for s in args.chunk_sizes for k in args.chunks]
    works, skipped = [], []
    for k, s in shapes:
        work = make_workload(items, args.item, k, s, tokenizer)
        (works if work.prompt_tokens < context_len else skipped).append(work)
    skipped_rows = [{"chunks": w.chunks, "chunk_size": w.chunk_size,
                     "prompt_tokens": w.prompt_tokens, "context_len": context_len} for w in skipped]
    if not works:
        raise ValueError(f"every prompt shape exceeds the model's context of {context_len} tokens")
    load_work = None if args.no_load else make_workload(items, args.item, args.load_chunks,
                                                        args.load_chunk_size, tokenizer)
    if load_work is not None and load_work.prompt_tokens >= context_len:
        raise ValueError(f"--load-chunks x --load-chunk-size gives {load_work.prompt_tokens} "
                         f"tokens, over the model's context of {context_len}")

    def measure(url: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        client = Client(url)
        state = client.cacheblend_state()
        rows: list[dict[str, Any]] = []
        smallest = min(works, key=lambda w: w.prompt_tokens)
        run_ttft(client, smallest, args.ratios, rep=-1)  # warm-up, not recorded
        modes = len(mode_names(args.ratios))
        with tqdm(total=len(works) * args.reps * modes, desc="TTFT", unit="req") as bar:
            for rep in range(args.reps):  # shapes interleaved per repetition
                for work in works:
                    rows += run_ttft(client, work, args.ratios, rep, bar)
        if load_work is not None:
            total = (1 + len(args.rates)) * modes * args.load_requests

            def encode(text: str) -> list[int]:
                return tokenizer(text, add_special_tokens=False).input_ids

            with tqdm(total=total, desc="load", unit="req") as bar:
                rows += run_load(client, load_work, encode, args.ratios, args, bar)
        server = {k: v for k, v in state.items() if k not in ("last_blend", "token_pool", "pid")}
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
    config.update(command_line=shlex.join(["sglang-cacheblend", *sys.argv[1:]]),
                  server_args=list(server_args), model_path=str(model_path),
                  context_len=context_len, server_cacheblend=server,
                  wall_s=time.monotonic() - started)
    return write_outputs(args.out, args.name, config, rows, skipped_rows)


def write_outputs(out: Path, name: str, config: dict[str, Any], rows: list[dict[str, Any]],
                  skipped: list[dict[str, Any]]) -> dict[str, Path]:
    """``<name>.json``/``.csv`` (:mod:`results`), ``<name>.md`` and ``<name>_ttft.png``."""
    from sglang_cacheblend.eval.plots import plot_ttft_vs_length
    from sglang_cacheblend.eval.results import provenance, write_results

    ttft = ttft_summary([r for r in rows if r["phase"] == "ttft"])
    load = load_summary([r for r in rows if r["phase"] == "load"])
    summary = {"ttft": ttft, "load": load, "skipped": skipped}
    info = provenance()
    paths = write_results(out, name, config=config, rows=rows, summary=summary,
                          provenance_info=info)
    series: dict[str, list[tuple[float, ...]]] = {}
    for r in ttft:
        series.setdefault(r["mode"], []).append(
            (r["prompt_tokens"], r["median_s"], r["min_s"], r["max_s"]))
    png = plot_ttft_vs_length(series, out / f"{name}_ttft.png",
                              title="TTFT vs prompt length (median, min-max)")
    for warning in unblended_warnings(ttft):
        print(warning, file=sys.stderr)
    md = out / f"{name}.md"
    md.write_text(markdown_report(config, info, summary, png.name))
    return {"json": paths.json, "csv": paths.csv, "md": md, "png": png}


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def markdown_report(config: Mapping[str, Any], info: Mapping[str, Any],
                    summary: Mapping[str, Any], png_name: str) -> str:
    """The human-readable table: every mode as ratios against the baselines of the same run."""
    git, machine = info["git"], info["machine"]
    commit = (git["commit"] or "unknown")[:12] + (" (dirty)" if git["dirty"] else "")
    ram = f"{machine['ram_bytes'] / 2**30:.0f} GiB RAM" if machine["ram_bytes"] else "RAM unknown"
    lines = [
        "# Serving benchmark: full prefill, prefix cache, full KV reuse, CacheBlend", "",
        f"Command: `{config.get('command_line', 'sglang-cacheblend bench')}`  ",
        (f"Date {info['date']}; commit {commit}; {machine['cpu_model']}, {machine['cpu_cores']} "
         f"cores, {ram}; torch {machine['torch']}, sglang {machine['sglang']}; load average "
         f"{[round(x, 2) for x in machine['load_avg'] or []]}; wall {config['wall_s']:.0f} s."),
        "",
        ("Ratios are against the baselines measured in this run (>1 is better): TTFT as "
         "baseline/mode, throughput as mode/baseline. Compare ratios, not seconds. "
         "`reused tokens`: the fewest chunk tokens the server reported reusing for the mode's "
         "requests (0 or - for reuse/blend means they were not blended)."),
        "", "## TTFT", "",
        ("| chunks x size | prompt tokens | mode | n | min s | median s | max s | vs full "
         "| vs prefix | vs prefix reordered | reused tokens (min) |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["ttft"]:
        lines.append(
            f"| {r['chunks']} x {r['chunk_size']} | {r['prompt_tokens']} | {r['mode']} | {r['n']} "
            f"| {r['min_s']:.2f} | {r['median_s']:.2f} | {r['max_s']:.2f} | {_x(r['vs_full'])} "
            f"| {_x(r['vs_prefix'])} | {_x(r['vs_prefix_reordered'])} "
            f"| {'-' if r['min_reused_tokens'] is None else r['min_reused_tokens']} |")
    lines += ["", f"![TTFT vs prompt length]({png_name})", ""]
    for warning in unblended_warnings(summary["ttft"]):
        lines += [f"**{warning}**", ""]
    if summary["load"]:
        lines += [
            (f"## Throughput ({config['load_chunks']} chunks x {config['load_chunk_size']} "
             f"tokens, at most {config['load_requests']} requests or {config['load_seconds']:g} s "
             "per loop)"),
            "",
            ("| loop | mode | completed | req/s | median latency s | max latency s | vs full "
             "| vs prefix | vs prefix reordered |"),
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in summary["load"]:
            lines.append(
                f"| {r['loop']} | {r['mode']} | {r['completed']} | {r['requests_per_s']:.3f} "
                f"| {r['median_latency_s']:.2f} | {r['max_latency_s']:.2f} | {_x(r['vs_full'])} "
                f"| {_x(r['vs_prefix'])} | {_x(r['vs_prefix_reordered'])} |")
        lines.append("")
    for s in summary["skipped"]:
        lines.append(f"Skipped {s['chunks']} x {s['chunk_size']}: {s['prompt_tokens']} tokens, "
                     f"over the model's context of {s['context_len']}.")
    return "\n".join(lines).rstrip() + "\n"
