"""Client helpers that talk to a running server (HTTP), beside the pure chunk marking."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sglang_cacheblend.chunks.hints import precompute_hints
from sglang_cacheblend.chunks.markers import chunk

__all__ = ["precompute_chunks"]


def precompute_chunks(
    base_url: str,
    texts: Sequence[str],
    *,
    cache_salt: str | None = None,
    extra_key: str | None = None,
    timeout: float = 600.0,
) -> list[dict[str, Any]]:
    """Compute each text standalone and store its KV in the server's chunk index.

    One batched ``/generate`` call with ``max_new_tokens: 0``; returns SGLang's outputs, one per
    text. ``cache_salt``/``extra_key`` must match those of the requests that will reuse them.
    """
    import requests  # only clients that talk to a server pay for it

    if not texts:
        raise ValueError("precompute_chunks needs at least one text")
    body: dict[str, Any] = {
        "text": [chunk(text) for text in texts],
        "sampling_params": {"max_new_tokens": 0},
        "kv_hints": precompute_hints(),
    }
    for name, value in (("cache_salt", cache_salt), ("extra_key", extra_key)):
        if value is not None:
            body[name] = [value] * len(texts)
    response = requests.post(base_url.rstrip("/") + "/generate", json=body, timeout=timeout)
    if response.status_code != 200:
        raise ValueError(f"precompute failed ({response.status_code}): {response.text}")
    return response.json()
