"""Chunk admission on real SGLang pools, on CPU, without a server: never over-commit the pool,
hold chunk locks only while something will read them, free every slot a forward did not fill.

Each request goes through the admission hook as SGLang calls it, with SGLang's own live budget
(free plus evictable slots, less what the admitted request reserved).
"""

from __future__ import annotations

from array import array
from types import SimpleNamespace

import pytest

pytest.importorskip("sglang")

from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams  # noqa: E402, I001
from sglang.srt.mem_cache.radix_cache import RadixKey  # noqa: E402

from sglang_cacheblend.chunks import sink_variant  # noqa: E402
from sglang_cacheblend.config import BlendConfig  # noqa: E402
from sglang_cacheblend.options import ENV_VAR, ServerOptions  # noqa: E402
from sglang_cacheblend.serving.admission import PROMPT_CHANGED  # noqa: E402
from sglang_cacheblend.serving.blend_namespace import blend_extra_key  # noqa: E402
from sglang_cacheblend.serving.blend_request import BlendOutcome  # noqa: E402
from sglang_cacheblend.serving.layout import ChunkLayout  # noqa: E402
from sglang_cacheblend.srt import hooks  # noqa: E402
from sglang_cacheblend.srt.layout_envelope import envelope_with  # noqa: E402
from sglang_cacheblend.srt.radix_cache import CacheBlendRadixCache  # noqa: E402
from tests.serving.test_admission import chunked_prompt  # noqa: E402
from tests.srt.test_radix_cache import POOL_SIZE, check_pool, make_params  # noqa: E402

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
    cache.handoff.insert(cache.chunk_namespace(variant=sink_variant(SINK)), token_ids, kv_loc,
                       len(SINK))


def chunked_req(rid, chunks, *, config=BLEND, output_ids=(), extend_end=None):
    """A scheduler request ``sink + chunks + question`` as the tokenizer hook leaves it."""
    prompt, layout = chunked_prompt(chunks, config=config, sink=SINK, question=QUESTION)
    return SimpleNamespace(
        rid=rid, origin_input_ids=prompt, prefix_len=0, cache_salt=None,
        extra_key=blend_extra_key(None, config), kv_hints=envelope_with(None, layout, rid),
        output_ids=list(output_ids), extend_end=len(prompt) if extend_end is None else extend_end,
        to_finish=None, finished=lambda: False,
    )


def admit(cache, rid, chunks, *, rewrite=None, **kwargs):
    """A request ``sink + chunks + question`` admitted through the hook; returns (req, need).
    ``rewrite(req)`` changes it first, as SGLang's scheduler may after tokenization."""
    req = chunked_req(rid, chunks, **kwargs)
    if rewrite is not None:
        rewrite(req)
    prompt = req.origin_input_ids
    need = len(prompt) + len(req.output_ids)
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
    cache.admission.finish("r", BlendOutcome.not_blended("the batch took SGLang's forward"))
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


def _abort_stub(req):
    """``Req.set_finish_with_abort``: a one-token stub that still runs a prefill."""
    req.origin_input_ids = array("q", [0])
    req.extend_end = 1
    req.to_finish = "abort"


def _truncate(req):
    """``--allow-auto-truncate`` in ``validate_input_length``: the prompt cut short."""
    req.origin_input_ids = req.origin_input_ids[:30]
    req.extend_end = 30


def _same_length_other_ids(req):
    """Any other rewrite of the ids (same length): the layout is for other tokens."""
    req.origin_input_ids = [t + 1 for t in req.origin_input_ids]


@pytest.mark.parametrize("rewrite", [_abort_stub, _truncate, _same_length_other_ids])
def test_a_prompt_sglang_rewrote_after_tokenization_is_neither_matched_nor_blended(
        cache, rewrite):
    """Issue 25 G1: SGLang turns a chunked request into a one-token abort stub (bad logprob
    start, grammar error, hang-up in the grammar queue, over-long prompt) or truncates it
    after tokenization; the spans then lay past the prompt and ``match_prefix`` raised out of
    the scheduler loop, killing the server. Now: looked up never, prefilled unblended, said so."""
    insert_chunk(cache, A)
    free_before = cache.token_to_kv_pool_allocator.available_size()
    req = chunked_req("r", [A, C])
    rewrite(req)
    params = MatchPrefixParams(key=RadixKey(array("q", req.origin_input_ids),
                                            extra_key=req.extra_key), req=req)
    cache.match_prefix(params)  # used to raise ValueError (span outside the prompt)
    admit(cache, "r", [A, C], rewrite=rewrite)
    assert report(cache, "r")["blended"] is False
    assert report(cache, "r")["reason"] == PROMPT_CHANGED
    assert cache.admission.blend_request("r") is None
    assert cache.chunk_stats().locked_size == 0
    assert cache.token_to_kv_pool_allocator.available_size() == free_before
    cache.admission.release("r")
    check_pool(cache)


def test_no_exception_from_chunk_handling_reaches_the_scheduler(cache, monkeypatch):
    """Issue 25 G1, the class: whatever a request's chunk lookup or admission raises stays
    inside the cache (logged), and the request is served unblended."""
    insert_chunk(cache, A)

    def boom(*args, **kwargs):
        raise RuntimeError("index failure")

    monkeypatch.setattr(cache.chunk_index, "match", boom)
    req = chunked_req("r", [A, C])
    params = MatchPrefixParams(key=RadixKey(array("q", req.origin_input_ids),
                                            extra_key=req.extra_key), req=req)
    cache.match_prefix(params)
    admit(cache, "r", [A, C])
    assert cache.admission.blend_request("r") is None
    monkeypatch.undo()
    cache.admission.release("r")
    check_pool(cache)


def test_a_precompute_whose_prompt_sglang_rewrote_stores_nothing(cache):
    """Issue 25 G1 on the precompute path: a truncated precompute must not file a shorter
    chunk (or raise) under the layout's span."""
    layout = ChunkLayout(True, ((1, 21),), SINK, None).for_prompt([*SINK, *A])
    req = SimpleNamespace(rid="p", origin_input_ids=[*SINK, *A][:10], cache_salt=None,
                          extra_key=None, kv_hints=envelope_with(None, layout, "p"))
    from sglang_cacheblend.srt.scheduler_view import hand_off_precompute

    hand_off_precompute(cache, req, layout, up_to=10)  # returns before touching the row
    assert cache.chunk_stats().total_size == 0
    check_pool(cache)
