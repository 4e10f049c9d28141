"""Client helpers that talk to a running server (HTTP), beside the pure chunk marking."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from sglang_cacheblend.chunks.hints import precompute_hints
from sglang_cacheblend.chunks.markers import chunk

__all__ = ["precompute_chunks", "wait_for_store_writes"]


def precompute_chunks(
    base_url: str,
    texts: Sequence[str],
    *,
    cache_salt: str | None = None,
    extra_key: str | None = None,
    chunk_context: str | None = None,
    context_family: str | None = None,
    contexts: Sequence[Sequence[int]] | None = None,
    timeout: float = 600.0,
) -> list[dict[str, Any]]:
    """Compute each text's chunk KV and store it in the server's chunk index.

    One batched ``/generate`` call with ``max_new_tokens: 0``; returns SGLang's outputs, one per
    text. ``cache_salt``/``extra_key`` must match those of the requests that will reuse them,
    and so must ``chunk_context`` (None or "server": after the server's chunk context, if it
    has one; "none": standalone after the sink). With ``context_family``, ``contexts[i]`` are
    the token ids text ``i`` is computed after (beside the sink), and requests that name the
    family (``chunk_hints(..., context_family=...)``) reuse the chunks.
    """
    import requests  # only clients that talk to a server pay for it

    if not texts:
        raise ValueError("precompute_chunks needs at least one text")
    if (context_family is None) != (contexts is None):
        raise ValueError("give context_family and contexts together")
    if contexts is not None and len(contexts) != len(texts):
        raise ValueError(f"{len(contexts)} contexts for {len(texts)} texts")
    hints: Any = precompute_hints(chunk_context=chunk_context)
    if contexts is not None:
        hints = [precompute_hints(context_family=context_family, context_ids=ids)
                 for ids in contexts]
    body: dict[str, Any] = {
        "text": [chunk(text) for text in texts],
        "sampling_params": {"max_new_tokens": 0},
        "kv_hints": hints,
    }
    for name, value in (("cache_salt", cache_salt), ("extra_key", extra_key)):
        if value is not None:
            body[name] = [value] * len(texts)
    response = requests.post(base_url.rstrip("/") + "/generate", json=body, timeout=timeout)
    if response.status_code != 200:
        raise ValueError(f"precompute failed ({response.status_code}): {response.text}")
    return response.json()


def wait_for_store_writes(url: str, timeout_s: float = 300.0) -> int:
    """Wait until the server's store has written every queued chunk to its persistent tiers;
    return how many chunk writes it did not store so far (``unstored_writes``: skipped,
    declined or failed), summed over the server's scheduler ranks.

    Chunks are written to disk/Mooncake on a writer thread after they are computed, so a
    precompute's answer comes before its KV is durable: ingest records a batch only after
    this, and only if the count did not grow since the same wait before the batch, and
    benchmarks wait here so writes never overlap a measurement. A server without tiers returns
    at once. ``RuntimeError`` if the writes do not land in ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        queued, unstored = _store_counters(url)
        if not queued:
            return unstored
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server's store still has {queued} chunk writes queued "
                               f"after {timeout_s:.0f} s")
        time.sleep(0.1)


def _store_counters(url: str) -> tuple[int, int]:
    """``(queued_writes, unstored_writes)`` summed over every scheduler rank's store."""
    import requests  # only clients that talk to a server pay for it

    info = requests.get(url + "/server_info", timeout=60).json()
    queued = unstored = 0
    for state in info.get("internal_states") or []:
        store = (state.get("cacheblend") or {}).get("store") or {}
        queued += int(store.get("queued_writes") or 0)
        unstored += int(store.get("unstored_writes") or 0)
    return queued, unstored
