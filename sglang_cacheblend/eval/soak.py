"""``sglang-cacheblend soak``: a bounded soak of one blended server, on a pool that evicts all
the time.

Concurrent clients send RAG requests over real passages (musique_dev) that share, reorder,
miss and repeat chunks; some are aborted mid-request (``/abort_request``) and some clients hang
up before the answer (a read timeout). Everything is loopback only and bounded twice: a request
count and a wall-clock budget, whichever comes first.

What it checks:

* the server never dies (``/health`` after every phase, the process still running);
* every completed greedy answer equals the same request served alone, the same way, after
  ``/flush_cache`` (the caches empty, as on a fresh server with the same settings). "The same
  way" matters: under memory pressure a request may fall back to a full prefill (reported in
  ``meta_info``), which is exact where the blend is approximate, so a fallback is compared with
  a full prefill of the same token ids and a blend with the blend alone. A blend that could
  reuse fewer chunk tokens than alone (a missed chunk with no free slots is recomputed in place)
  has no alone counterpart and is counted, not compared;
* nothing leaks: once idle, no slot is protected and no chunk locked, and after
  ``/flush_cache`` every slot of the pool is free again.

It reports requests served, aborted, disconnected, errors, mismatches and chunk evictions.
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests

from sglang_cacheblend.dataset import DEFAULT_DATA_PATH, load_items, rag_prompt

__all__ = ["SoakConfig", "SoakReport", "add_arguments", "run", "run_soak"]


@dataclass(frozen=True)
class SoakConfig:
    """How hard and how long to push (bounded in requests and in seconds)."""

    requests: int = 60
    duration_s: float = 600.0
    clients: int = 4
    prompts: int = 12  # distinct prompts (so requests repeat)
    passages: int = 3  # chunks per prompt, drawn from a shared corpus (so chunks are shared)
    corpus_items: int = 6  # musique items whose passages form the corpus
    abort_share: float = 0.15
    disconnect_share: float = 0.1
    max_new_tokens: int = 8
    seed: int = 0
    data: Path = DEFAULT_DATA_PATH


@dataclass
class SoakReport:
    """What a soak run saw; ``ok`` when nothing died, mismatched or leaked."""

    config: dict[str, Any]
    sent: int = 0
    served: int = 0
    aborted: int = 0
    disconnected: int = 0
    errors: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    blended: int = 0
    fallbacks: int = 0  # served as full prefill although marked (reported reason)
    uncompared: int = 0  # blended with fewer chunk tokens reused than alone
    compared: int = 0
    chunk_evictions: int = 0
    server_deaths: int = 0
    leaks: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.errors or self.mismatches or self.server_deaths or self.leaks)


def _prompts(config: SoakConfig) -> list[str]:
    """Distinct marked prompts from one shared corpus: each opens with a passage of its own,
    then ``passages - 1`` drawn from the rest in random order (shared, reordered, repeated).

    The passage of its own keeps one prompt's blended KV from ever being another prompt's exact
    prefix, so an answer depends only on its own prompt and on how it was served.
    """
    rng = random.Random(config.seed)
    items = load_items(config.data)[: config.corpus_items]
    corpus = [p for item in items for p in item.passages[:4]]
    rng.shuffle(corpus)
    if len(corpus) < 2 * config.prompts:
        raise ValueError(f"{config.corpus_items} items give {len(corpus)} passages; "
                         f"{config.prompts} prompts need {2 * config.prompts}")
    own, shared = corpus[: config.prompts], corpus[config.prompts:]
    prompts = []
    for first in own:
        item = rng.choice(items)
        passages = [first, *rng.sample(shared, config.passages - 1)]
        prompts.append(rag_prompt(passages, item.question).marked_text())
    return prompts


class _Server:
    def __init__(self, base_url: str, timeout_s: float = 300.0) -> None:
        self.base_url, self.timeout_s = base_url.rstrip("/"), timeout_s

    def generate(self, text: str | list[int], max_new_tokens: int, *, rid: str | None = None,
                 read_timeout: float | None = None) -> dict[str, Any]:
        body = {"rid": rid or uuid.uuid4().hex, "return_prompt_token_ids": True,
                "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens},
                **({"text": text} if isinstance(text, str) else {"input_ids": text})}
        response = requests.post(self.base_url + "/generate", json=body,
                                 timeout=(10, read_timeout or self.timeout_s))
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
        return response.json()

    def abort(self, rid: str) -> None:
        requests.post(self.base_url + "/abort_request", json={"rid": rid}, timeout=30)

    def state(self) -> dict[str, Any]:
        info = requests.get(self.base_url + "/server_info", timeout=60).json()
        return info["internal_states"][0]["cacheblend"]

    def alive(self) -> bool:
        try:
            return requests.get(self.base_url + "/health", timeout=30).status_code == 200
        except requests.RequestException:
            return False

    def flush(self) -> None:
        requests.post(self.base_url + "/flush_cache", timeout=60).raise_for_status()


def _one(server: _Server, text: str, kind: str, config: SoakConfig,
         rng: random.Random) -> tuple[str, dict[str, Any] | None]:
    """Send one request as ``kind`` (complete, abort, disconnect); (outcome, response)."""
    rid = uuid.uuid4().hex
    if kind == "disconnect":
        try:
            server.generate(text, 64, rid=rid, read_timeout=rng.uniform(0.05, 0.5))
        except requests.Timeout:
            return "disconnected", None
        return "served_late", None
    if kind == "abort":
        with ThreadPoolExecutor(max_workers=1) as pool:
            running = pool.submit(server.generate, text, 64, rid=rid)
            time.sleep(rng.uniform(0.05, 0.6))
            server.abort(rid)
            reply = running.result()
        finished = reply["meta_info"].get("finish_reason") or {}
        return ("aborted" if finished.get("type") == "abort" else "served_late"), None
    return "served", server.generate(text, config.max_new_tokens, rid=rid)


def run_soak(base_url: str, config: SoakConfig) -> SoakReport:
    """Soak a running ``--enable-cacheblend`` server at ``base_url`` (see module docstring)."""
    server = _Server(base_url)
    report = SoakReport(config={**asdict(config), "data": str(config.data)})
    prompts = _prompts(config)
    rng = random.Random(config.seed + 1)
    plan = []
    for _ in range(config.requests):
        draw = rng.random()
        kind = ("abort" if draw < config.abort_share else
                "disconnect" if draw < config.abort_share + config.disconnect_share else
                "complete")
        plan.append((rng.randrange(len(prompts)), kind, random.Random(rng.random())))
    shared_prefix = _shared_prefix_len(server, prompts)
    evictions_before = server.state()["chunk_index"]["evictions"]
    started = time.monotonic()
    served: dict[tuple[int, tuple], dict[str, Any]] = {}  # (prompt, how served) -> first reply
    lock = threading.Lock()

    def worker(step: tuple[int, str, random.Random]) -> None:
        index, kind, step_rng = step
        if time.monotonic() - started > config.duration_s:
            return
        try:
            outcome, reply = _one(server, prompts[index], kind, config, step_rng)
        except Exception as exc:  # noqa: BLE001 - every failure is counted, none stops the run
            outcome, reply = f"error: {kind} prompt {index}: {exc}", None
        with lock:
            _count(report, served, index, outcome, reply, shared_prefix)

    with ThreadPoolExecutor(max_workers=config.clients) as pool:
        list(pool.map(worker, plan))
    report.server_deaths += not server.alive()
    report.leaks += _leaks_when_idle(server)
    report.chunk_evictions = server.state()["chunk_index"]["evictions"] - evictions_before
    for (index, how), reply in sorted(served.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        server.flush()  # each alone, on empty caches
        if how[0] == "full" and how[2] == 0:  # a fallback: a full prefill of the same ids
            alone = server.generate(reply["prompt_token_ids"], config.max_new_tokens)
        else:
            alone = server.generate(prompts[index], config.max_new_tokens)
            if how[2]:  # served on its own earlier blended KV: serve it twice
                alone = server.generate(prompts[index], config.max_new_tokens)
            if _how(alone, shared_prefix) != how:
                report.uncompared += 1
                continue
        report.compared += 1
        if alone["output_ids"] != reply["output_ids"]:
            report.mismatches.append(f"prompt {index} served {how}: under load "
                                     f"{reply['output_ids']} != alone {alone['output_ids']}")
    server.flush()
    state = server.state()
    if state["token_pool"]["available"] != state["token_pool"]["total"]:
        report.leaks.append(f"after /flush_cache {state['token_pool']} (not every slot free)")
    report.server_deaths += not server.alive()
    report.wall_s = round(time.monotonic() - started, 1)
    return report


def _how(reply: dict[str, Any], shared_prefix: int) -> tuple:
    """How a request was served: blended or a full prefill, the chunk tokens it reused, and the
    prefix it reused beyond the instruction every prompt shares (0 when none)."""
    reports = reply["meta_info"].get("cacheblend") or [{}]
    cached = int(reply["meta_info"].get("cached_tokens") or 0)
    beyond = 0 if cached <= shared_prefix else cached
    if not reports[0].get("blended"):
        return ("full", None, beyond)
    return ("blend", reports[0].get("chunk_reused_tokens"), beyond)


def _count(report: SoakReport, served: dict[tuple[int, tuple], dict[str, Any]], index: int,
           outcome: str, reply: dict[str, Any] | None, shared_prefix: int) -> None:
    report.sent += 1
    if outcome.startswith("error: "):
        report.errors.append(outcome.removeprefix("error: "))
    elif outcome == "aborted":
        report.aborted += 1
    elif outcome == "disconnected":
        report.disconnected += 1
    else:  # served (compared with its repeats and with the request alone), or served late
        report.served += 1
        if reply is None:
            return
        how = _how(reply, shared_prefix)
        report.blended += how[0] == "blend"
        report.fallbacks += how[0] == "full"
        first = served.setdefault((index, how), reply)
        if first["output_ids"] != reply["output_ids"]:
            report.mismatches.append(f"prompt {index} served {how}: a repeat answered "
                                     "differently")


def _shared_prefix_len(server: _Server, prompts: list[str]) -> int:
    """Tokens every prompt shares before its first passage (the instruction): what a request
    may reuse from another prompt's KV, exact because it precedes every chunk."""
    server.flush()
    server.generate(prompts[0], 1)
    shared = int(server.generate(prompts[1], 1)["meta_info"].get("cached_tokens") or 0)
    server.flush()
    return shared


def _leaks_when_idle(server: _Server, wait_s: float = 60.0) -> list[str]:
    """Once no request runs: nothing protected, nothing locked, the pool's sum intact."""
    deadline = time.monotonic() + wait_s
    while True:
        state = server.state()
        pool, index = state["token_pool"], state["chunk_index"]
        problems = []
        if pool["available"] + pool["evictable"] + pool["protected"] != pool["total"]:
            problems.append(f"pool sum broken: {pool}")
        if pool["protected"] or index["locked_size"]:
            problems.append(f"held while idle: protected {pool['protected']}, "
                            f"locked {index['locked_size']}")
        if not problems or time.monotonic() > deadline:
            return problems
        time.sleep(1.0)  # aborted requests may still be on their way out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``soak`` flags; defaults finish in a few minutes on a 2-core CPU."""
    defaults = SoakConfig()
    add = parser.add_argument
    add("--url", default=None, help="a running --enable-cacheblend server (else one is started)")
    add("--port", type=int, default=30951, help="port of the server started here")
    add("--pool-tokens", type=int, default=6000,
        help="--max-total-tokens of the server started here (small: it evicts all the time)")
    add("--requests", type=int, default=defaults.requests, help="request bound")
    add("--duration", type=float, default=defaults.duration_s, help="time bound in seconds")
    add("--clients", type=int, default=defaults.clients, help="concurrent clients")
    add("--prompts", type=int, default=defaults.prompts, help="distinct prompts")
    add("--passages", type=int, default=defaults.passages, help="chunks per prompt")
    add("--seed", type=int, default=defaults.seed)
    add("--data", type=Path, default=defaults.data, help="musique_dev-format JSON")
    add("--out", type=Path, default=Path("docs/results/soak.json"), help="report file")


def run(args: argparse.Namespace, server_args: list[str]) -> SoakReport:
    """Start a small-pool server (unless ``--url``), soak it, write ``--out``."""
    from sglang_cacheblend.launch import ServerProcess

    config = SoakConfig(requests=args.requests, duration_s=args.duration, clients=args.clients,
                        prompts=args.prompts, passages=args.passages, seed=args.seed,
                        data=args.data)
    if args.url:
        report = run_soak(args.url, config)
    else:
        flags = ["--enable-cacheblend", "--max-total-tokens", str(args.pool_tokens), *server_args]
        with ServerProcess(args=flags, port=args.port) as server:
            report = run_soak(server.base_url, config)
            report.server_deaths += not server.is_running()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"command_line": args.command_line, **asdict(report), "ok": report.ok}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    return report
