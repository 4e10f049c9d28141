"""How ``sglang-cacheblend bench`` talks to the server and paces its requests.

* :class:`Client`: the four server calls the benchmark makes (``/generate`` with
  ``max_new_tokens=1``, ``/flush_cache``, chunk precompute, ``/server_info``), timed on the
  client so every mode's latency is measured the same way;
* :func:`closed_loop`: a fixed number of workers sending back to back (throughput at a
  concurrency);
* :func:`open_loop` with :func:`poisson_schedule`: requests sent at Poisson arrival times,
  whatever is still in flight (throughput and latency at an offered rate).

Both loops stop issuing at a request bound or a time bound, whichever comes first, and wait for
the requests in flight, so a slow mode cannot stretch a run past its time budget by much. What a
mode sends is the caller's ``send(index)``; nothing here knows the modes.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import requests

from sglang_cacheblend.chunks import ChunkedPrompt, chunk_hints, precompute_chunks


@dataclass(frozen=True)
class Reply:
    """One ``/generate`` answer: client-side latency (the TTFT at ``max_new_tokens=1``), the
    request id (to look up the server's blend report), the prefix-cache hit it reported and
    its ``meta_info["cacheblend"]`` report (None: not blended, or no report)."""

    latency_s: float
    rid: str
    cached_tokens: int | None
    blend_report: dict[str, Any] | None = None


Send = Callable[[int], Reply]
"""``send(index)``: issue request ``index`` of a loop and wait for its :class:`Reply`."""

Completed = tuple[int, float, Reply]
"""``(request index, start offset s from the loop's start, reply)`` of a finished request."""


class Client:
    """The server calls the benchmark makes: ``/generate``, ``/flush_cache``, ``/server_info``."""

    def __init__(self, base_url: str, timeout_s: float = 900.0) -> None:
        self.url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def generate(self, prompt: ChunkedPrompt, salt: str, ratio: float | None = None,
                 selector: str | None = None) -> Reply:
        """One request with ``max_new_tokens=1``; chunks marked only when ``ratio`` is given
        (blended with ``selector``, else the server's rule)."""
        body: dict[str, Any] = {"input_ids": list(prompt.input_ids), "cache_salt": salt,
                                "sampling_params": {"temperature": 0, "max_new_tokens": 1}}
        if ratio is not None:
            body["kv_hints"] = chunk_hints(prompt.spans, recompute_ratio=ratio,
                                           selector=selector)
        start = time.perf_counter()
        response = requests.post(self.url + "/generate", json=body, timeout=self.timeout_s)
        latency = time.perf_counter() - start
        if response.status_code != 200:
            raise RuntimeError(f"/generate failed ({response.status_code}): {response.text}")
        meta = response.json()["meta_info"]
        report = meta.get("cacheblend")
        return Reply(latency, meta["id"], meta.get("cached_tokens"), report[0] if report else None)

    def flush(self) -> None:
        """Empty the server's prefix cache, so the next request pays a full prefill."""
        for _ in range(20):  # the scheduler refuses while it still holds a finishing request
            if requests.post(self.url + "/flush_cache", timeout=60).status_code == 200:
                return
            time.sleep(0.5)
        raise RuntimeError("the server refused /flush_cache 20 times")

    def precompute(self, texts: Sequence[str], salt: str) -> float:
        """Compute every chunk standalone under ``salt``; returns the seconds it took."""
        start = time.perf_counter()
        precompute_chunks(self.url, texts, cache_salt=salt, timeout=self.timeout_s)
        return time.perf_counter() - start

    def cacheblend_state(self) -> dict[str, Any]:
        """The server's CacheBlend state; ``RuntimeError`` if it runs without CacheBlend, since
        every reuse/blend time would then be a plain prefill's."""
        info = requests.get(self.url + "/server_info", timeout=60).json()
        state = (info.get("internal_states") or [{}])[0].get("cacheblend")
        if not state:
            raise RuntimeError(f"{self.url} runs without CacheBlend (--enable-cacheblend)")
        return state


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
    offsets: list[float] = []
    t = 0.0
    while len(offsets) < max_requests and t < max_seconds:
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


def closed_loop(send: Send, *, concurrency: int, max_requests: int,
                max_seconds: float) -> list[Completed]:
    """``concurrency`` workers send requests back to back until either bound is reached.

    Returns ``(request index, start offset s, reply)`` per completed request.
    """
    lock = threading.Lock()
    issued = [0]
    t0 = time.perf_counter()
    done: list[Completed] = []

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


def open_loop(send: Send, schedule: Sequence[float]) -> list[Completed]:
    """Send request i at ``schedule[i]`` seconds (Poisson arrivals), whatever is in flight."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(1, len(schedule))) as pool:
        futures: list[tuple[int, float, Future[Reply]]] = []
        for index, offset in enumerate(schedule):
            time.sleep(max(0.0, offset - (time.perf_counter() - t0)))
            start = time.perf_counter() - t0
            futures.append((index, start, pool.submit(send, index)))
        return [(index, start, future.result()) for index, start, future in futures]
