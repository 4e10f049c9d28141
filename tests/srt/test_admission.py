"""Chunk admission on real SGLang pools, on CPU, without a server: never over-commit the pool,
hold chunk locks only while something will read them, free every slot a forward did not fill.

Each request goes through the admission hook as SGLang calls it, with SGLang's own live budget
(free plus evictable slots, less what the admitted request reserved).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("sglang")

from sglang_cacheblend.chunks import sink_variant  # noqa: E402
from sglang_cacheblend.config import BlendConfig  # noqa: E402
from sglang_cacheblend.srt import hooks  # noqa: E402
from sglang_cacheblend.srt.blend_namespace import blend_extra_key  # noqa: E402
from sglang_cacheblend.srt.chunk_request import ChunkRequest, envelope_with  # noqa: E402
from sglang_cacheblend.srt.radix_cache import CacheBlendRadixCache  # noqa: E402
from sglang_cacheblend.srt.server_options import ENV_VAR, ServerOptions  # noqa: E402
from tests.srt.test_radix_backend import POOL_SIZE, check_pool, make_params  # noqa: E402

SINK = (1,)
MAX_NEW = 8
A, B, C = ([100 + 20 * k + i for i in range(20)] for k in range(3))
QUESTION = [7, 8, 9, 10, 11]
BLEND = BlendConfig(min_reused_tokens=16)


@pytest.fixture(autouse=True)
def _enabled(monkeypatch):
    monkeypatch.setenv(ENV_VAR, ServerOptions(enabled=True, blend=BLEND).to_env())


@pytest.fixture
def cache() -> CacheBlendRadixCache:
    return CacheBlendRadixCache(make_params(), model_id="tiny")


class Adder:
    """The part of SGLang's PrefillAdder the admission hook reads: a live budget in which the
    admitted request has reserved its extend and its new tokens (nothing allocated yet)."""

    def __init__(self, cache: CacheBlendRadixCache, reserved: int) -> None:
        self.tree_cache, self._reserved = cache, reserved

    @property
    def rem_total_tokens(self) -> int:
        allocator = self.tree_cache.token_to_kv_pool_allocator
        return allocator.available_size() + self.tree_cache.evictable_size() - self._reserved


def insert_chunk(cache, token_ids):
    kv_loc = cache.token_to_kv_pool_allocator.alloc(len(token_ids))
    cache.insert_chunk(cache.chunk_namespace(variant=sink_variant(SINK)), token_ids, kv_loc,
                       len(SINK))


def admit(cache, rid, chunks, *, config=BLEND, output_ids=(), extend_end=None):
    """A request ``sink + chunks + question`` admitted through the hook; returns (req, need)."""
    prompt, spans = list(SINK), []
    for ids in chunks:
        spans.append((len(prompt), len(prompt) + len(ids)))
        prompt += ids
    prompt += QUESTION
    request = ChunkRequest(False, tuple(spans), SINK, config)
    req = SimpleNamespace(
        rid=rid, origin_input_ids=prompt, prefix_len=0, cache_salt=None,
        extra_key=blend_extra_key(None, config), kv_hints=envelope_with(None, request, rid),
        output_ids=list(output_ids), extend_end=len(prompt) if extend_end is None else extend_end,
    )
    need = len(prompt) + len(output_ids)
    adder = Adder(cache, reserved=need + MAX_NEW)
    assert adder.rem_total_tokens >= 0, "SGLang itself would not admit this request"
    hooks._admit_request_chunks(None, adder, req)
    return req, need


def report(cache, rid):
    return cache.admission.blend_report(rid)


def fits(cache, need: int) -> bool:
    """Whether the request's own prefill allocation of ``need`` slots can succeed now."""
    return cache.token_to_kv_pool_allocator.available_size() + cache.evictable_size() >= need


def test_locking_hits_never_starves_the_requests_own_prefill(cache):
    """Review F1: the hits SGLang counted as evictable get locked, then misses were allocated
    out of a budget read before the lock, and the prefill allocation ran out of memory."""
    insert_chunk(cache, A)
    insert_chunk(cache, B)  # 40 evictable tokens, 56 free; the request needs 66 + 8
    req, need = admit(cache, "r", [A, B, C])
    assert fits(cache, need), "admission over-committed the pool: the prefill would OOM"
    assert report(cache, "r")["blended"] is False
    assert "not enough KV memory" in report(cache, "r")["reason"]
    assert cache.chunk_stats().locked_size == 0
    cache.admission.release(req.rid)
    check_pool(cache)


def test_a_blend_that_fits_keeps_within_the_budget(cache):
    insert_chunk(cache, A)
    req, need = admit(cache, "r", [A, C])  # 46 + 8 reserved; A locked; C's 21 slots fit
    assert report(cache, "r")["blended"] is True
    assert report(cache, "r")["computed_standalone_tokens"] == len(C)
    assert fits(cache, need)
    assert Adder(cache, reserved=need + MAX_NEW).rem_total_tokens >= 0
    cache.admission.release(req.rid)
    check_pool(cache)
    assert cache.token_to_kv_pool_allocator.available_size() + cache.evictable_size() == POOL_SIZE


def test_a_request_that_will_not_blend_holds_no_locks(cache):
    """Review F6: locks were kept when no blend was planned."""
    insert_chunk(cache, A)
    insert_chunk(cache, B)
    admit(cache, "small", [A, B], config=BlendConfig(min_reused_tokens=1000))
    assert report(cache, "small")["blended"] is False
    assert "min_reused_tokens" in report(cache, "small")["reason"]
    assert cache.chunk_stats().locked_size == 0
    check_pool(cache)


def test_locks_and_unfilled_slots_go_once_the_blended_forward_ran(cache):
    """Review F6/F7: hits stayed locked through the whole decode; miss slots the forward did not
    fill stayed allocated until the request finished."""
    insert_chunk(cache, A)
    free_before = cache.token_to_kv_pool_allocator.available_size()
    admit(cache, "r", [A, C])
    assert cache.chunk_stats().locked_size == len(A)
    assert cache.token_to_kv_pool_allocator.available_size() == free_before - len(SINK) - len(C)
    cache.admission.finish_forward("r", blended=False, reason="the batch took SGLang's forward")
    assert cache.chunk_stats().locked_size == 0
    assert cache.token_to_kv_pool_allocator.available_size() == free_before
    assert cache.admission.blend_request("r") is None  # no later forward blends again
    assert report(cache, "r")["blended"] is False  # meta_info tells the truth
    assert report(cache, "r")["reason"] == "the batch took SGLang's forward"
    cache.admission.release("r")
    check_pool(cache)


@pytest.mark.parametrize(("kind", "reason"), [
    ("retracted", "retraction"), ("chunked", "chunked prefill"),
])
def test_extends_that_cannot_blend_take_no_slots_or_locks(cache, kind, reason):
    """Review F7: a re-prefill after retraction (outputs in the fill ids) or a chunked prefill
    that splits the prompt got miss slots its forward would never fill."""
    insert_chunk(cache, A)
    free_before = cache.token_to_kv_pool_allocator.available_size()
    extra = {"output_ids": (5, 6)} if kind == "retracted" else {"extend_end": 10}
    admit(cache, "r", [A, C], **extra)
    assert report(cache, "r")["blended"] is False and reason in report(cache, "r")["reason"]
    assert cache.token_to_kv_pool_allocator.available_size() == free_before
    assert cache.chunk_stats().locked_size == 0
    check_pool(cache)
