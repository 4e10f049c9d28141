"""The `cacheblend` radix-cache backend on real SGLang pools, on CPU, without a server."""

from __future__ import annotations

import random
import time
import warnings
from array import array
from types import SimpleNamespace

import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pytest.importorskip("sglang")
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.base_prefix_cache import (
        CacheRequestHandle,
        CacheRequestOutcome,
        EvictParams,
        InsertParams,
        MatchPrefixParams,
    )
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext

from sglang_cacheblend.config import BlendConfig
from sglang_cacheblend.serving.blend_namespace import blend_extra_key, chunk_extra_key
from sglang_cacheblend.srt.cache_factory import create_cacheblend_cache
from sglang_cacheblend.srt.radix_cache import CacheBlendRadixCache

POOL_SIZE = 96


def make_params(page_size: int = 1) -> CacheInitParams:
    kv_pool = MHATokenToKVPool(POOL_SIZE, page_size, torch.bfloat16, 1, 4, 1, "cpu", False)
    allocator = TokenToKVPoolAllocator(POOL_SIZE, torch.bfloat16, "cpu", kv_pool, False)
    req_to_token_pool = ReqToTokenPool(4, POOL_SIZE, "cpu", False)
    return CacheInitParams(
        disable=False,
        req_to_token_pool=req_to_token_pool,
        token_to_kv_pool_allocator=allocator,
        page_size=page_size,
    )


@pytest.fixture
def cache() -> CacheBlendRadixCache:
    return CacheBlendRadixCache(make_params(), model_id="tiny", rope=(("rope_theta", "1e5"),))


def allocator_of(cache) -> TokenToKVPoolAllocator:
    return cache.token_to_kv_pool_allocator


def free_slots(cache) -> set[int]:
    allocator = allocator_of(cache)
    return set(allocator.free_pages.tolist()) | set(allocator.release_pages.tolist())


def check_pool(cache) -> None:
    """The scheduler's full-pool invariant at idle, and no slot both free and owned."""
    cache.check_integrity()
    allocator = allocator_of(cache)
    assert allocator.available_size() + cache.evictable_size() + cache.protected_size() == (
        POOL_SIZE
    )
    assert cache.total_size() == cache.evictable_size() + cache.protected_size()
    assert not set(cache.all_values_flatten().tolist()) & free_slots(cache)


def key(token_ids, extra_key=None) -> RadixKey:
    return RadixKey(array("q", token_ids), extra_key=extra_key)


def tree_insert(cache, token_ids, extra_key=None):
    shortfall = len(token_ids) - allocator_of(cache).available_size()
    if shortfall > 0:  # as the scheduler does under memory pressure
        cache.evict(EvictParams(num_tokens=shortfall))
    value = allocator_of(cache).alloc(len(token_ids))
    result = cache.insert(InsertParams(key=key(token_ids, extra_key), value=value))
    duplicate = value[: result.prefix_len]  # already in the tree: the caller frees them
    if duplicate.numel():
        allocator_of(cache).free(duplicate)
    return value


def chunk_insert(cache, token_ids, start=0, rid=None):
    kv_loc = allocator_of(cache).alloc(len(token_ids))
    return cache.handoff.insert(cache.chunk_namespace(), token_ids, kv_loc, start, rid=rid)


def tick() -> None:
    """Let time.monotonic() move on, so access times are strictly ordered."""
    time.sleep(0.002)


def test_prefix_behaviour_is_that_of_plain_radix_cache(cache):
    plain = RadixCache(make_params())
    rng = random.Random(0)
    for step in range(120):
        token_ids = [rng.randrange(4) for _ in range(rng.randint(1, 10))]
        extra_key = rng.choice([None, "lora-a", blend_extra_key(None, BlendConfig())])
        if step % 3:
            for tree in (cache, plain):
                tree_insert(tree, token_ids, extra_key)
        else:
            results = [
                tree.match_prefix(MatchPrefixParams(key=key(token_ids, extra_key)))
                for tree in (cache, plain)
            ]
            assert results[0].device_prefix_len == results[1].device_prefix_len
            paths = [
                tree.path_device_indices(result.last_device_node)
                for tree, result in zip((cache, plain), results, strict=True)
            ]
            assert torch.equal(paths[0], paths[1])
        if step % 17 == 16:
            for tree in (cache, plain):
                tree.evict(EvictParams(num_tokens=5))
        sizes = [(t.evictable_size(), t.protected_size(), t.total_size()) for t in (cache, plain)]
        assert sizes[0] == sizes[1]
        assert allocator_of(cache).available_size() == allocator_of(plain).available_size()
    check_pool(cache)


def test_blended_prefix_matches_only_requests_blended_the_same_way(cache):
    at_15, at_0 = BlendConfig(recompute_ratio=0.15), BlendConfig(recompute_ratio=0.0)
    assert chunk_extra_key(blend_extra_key(None, at_15)) is None
    assert chunk_extra_key(blend_extra_key("lora-a", at_15)) == "lora-a"
    # SGLang appends a LoRA id to the key as is: it must stay the caller's part.
    assert chunk_extra_key(blend_extra_key(None, at_15) + "lora-b") == "lora-b"
    assert blend_extra_key(None, at_15) != blend_extra_key(None, at_0)
    same_kv = BlendConfig(recompute_ratio=0.15, min_reused_tokens=1)
    assert blend_extra_key(None, at_15) == blend_extra_key(None, same_kv)
    tree_insert(cache, [1, 2, 3, 4], extra_key=blend_extra_key(None, at_15))
    matched = {
        name: cache.match_prefix(MatchPrefixParams(key=key([1, 2, 3, 4, 5], extra))).device_prefix_len
        for name, extra in [("plain", None), ("same", blend_extra_key(None, at_15)),
                            ("other ratio", blend_extra_key(None, at_0)),
                            ("other caller", blend_extra_key("lora-a", at_15))]
    }
    assert matched == {"plain": 0, "same": 4, "other ratio": 0, "other caller": 0}


def test_chunks_are_found_at_any_position_and_counted_in_the_pool(cache):
    namespace = cache.chunk_namespace()
    a = chunk_insert(cache, [7, 8, 9], start=5)
    b = chunk_insert(cache, [4, 4], start=8)
    assert cache.chunk_stats().num_entries == 2
    prompt = [1] + [4, 4] + [7, 8, 9] + [0]
    matches = cache.chunk_index.match(namespace, prompt, [(3, 6), (1, 3), (6, 7)])
    assert [m.entry_id for m in matches] == [a.entry_id, b.entry_id, None]
    assert matches[0].positions.tolist() == [5, 6, 7]
    assert (cache.evictable_size(), cache.protected_size(), cache.total_size()) == (5, 0, 5)
    assert cache.chunk_index.lock("r", matches).newly_locked_len == 5
    assert (cache.evictable_size(), cache.protected_size()) == (0, 5)
    check_pool(cache)
    assert cache.chunk_index.unlock("r") == 5
    assert (
        cache.chunk_index.match(cache.chunk_namespace(cache_salt="t2"), prompt, [(3, 6)])[0].hit is False
    )


def test_duplicate_chunk_insert_does_not_leak(cache):
    first = chunk_insert(cache, [5, 6, 7])
    again = chunk_insert(cache, [5, 6, 7])
    assert not again.inserted and again.entry_id == first.entry_id
    allocator_of(cache).free(again.redundant_loc)
    check_pool(cache)


def test_evict_under_pressure_follows_lru_across_tree_and_chunks(cache):
    tree_a = tree_insert(cache, [1, 1, 1, 1])  # oldest
    tick()
    chunk_x = chunk_insert(cache, [9, 9, 9])
    tick()
    tree_b = tree_insert(cache, [2, 2, 2, 2, 2])
    tick()
    chunk_y = chunk_insert(cache, [8, 8])
    tick()
    chunk_z = chunk_insert(cache, [6, 6, 6, 6], rid="running")  # locked by a running request
    check_pool(cache)

    order = []
    for victim in (tree_a, chunk_x.kv_loc, tree_b, chunk_y.kv_loc):
        before = free_slots(cache)
        result = cache.evict(EvictParams(num_tokens=1))
        freed = free_slots(cache) - before
        assert result.num_tokens_evicted == len(freed)
        order.append(freed == set(victim.tolist()))
        check_pool(cache)
    assert order == [True, True, True, True], "eviction did not follow LRU across both stores"

    assert cache.evict(EvictParams(num_tokens=100)).num_tokens_evicted == 0
    assert cache.protected_size() == 4, "a locked chunk was evicted"
    assert cache.chunk_stats().evictions == 2
    cache.on_release(SimpleNamespace(rid="running"), checkpointed=False)
    assert cache.evict(EvictParams(num_tokens=100)).num_tokens_evicted == 4
    assert allocator_of(cache).available_size() == POOL_SIZE and cache.total_size() == 0
    del chunk_z


def test_recently_matched_chunk_outlives_older_tree_nodes(cache):
    chunk = chunk_insert(cache, [9, 9, 9])
    tick()
    tree = tree_insert(cache, [1, 2, 3])
    tick()
    cache.chunk_index.match(cache.chunk_namespace(), [9, 9, 9], [(0, 3)])  # access time moves on
    before = free_slots(cache)
    assert cache.evict(EvictParams(num_tokens=2)).num_tokens_evicted == 3
    assert free_slots(cache) - before == set(tree.tolist())
    del chunk


def test_pool_accounting_returns_to_the_start(cache):
    allocator = allocator_of(cache)
    start = allocator.available_size() + cache.total_size()
    tree_insert(cache, [1, 2, 3, 4])
    tree_insert(cache, [1, 2, 5])
    chunk_insert(cache, [3, 3, 3])
    matches = cache.chunk_index.match(cache.chunk_namespace(), [0, 3, 3, 3], [(1, 4)])
    cache.chunk_index.lock("r", matches)
    locked = cache.lock(cache.match_prefix(MatchPrefixParams(key=key([1, 2, 3]))).last_device_node)
    check_pool(cache)
    assert allocator.available_size() + cache.total_size() == start
    cache.unlock(locked)
    cache.chunk_index.unlock("r")
    cache.evict(EvictParams(num_tokens=POOL_SIZE))
    assert allocator.available_size() == start and cache.total_size() == 0
    check_pool(cache)


def test_reset_then_allocator_clear_empties_both_stores(cache):
    tree_insert(cache, [1, 2, 3])
    chunk_insert(cache, [4, 5], rid="r")
    cache.reset()
    allocator_of(cache).clear()
    assert (cache.total_size(), cache.evictable_size(), cache.protected_size()) == (0, 0, 0)
    assert allocator_of(cache).available_size() == POOL_SIZE
    check_pool(cache)


def test_lifecycle_hooks_release_chunk_locks(cache):
    chunk_insert(cache, [4, 5], rid="finished")
    chunk_insert(cache, [6, 7], rid="aborted-in-queue")
    chunk_insert(cache, [8, 9], rid="aborted")
    assert cache.protected_size() == 6
    cache.on_release(SimpleNamespace(rid="finished"), checkpointed=True)
    cache.release_aborted_request(CacheRequestHandle(rid="aborted-in-queue", attempt_id=0))
    cache.finish(CacheRequestHandle(rid="aborted", attempt_id=1), CacheRequestOutcome.ABORT)
    assert cache.protected_size() == 0 and cache.evictable_size() == 6
    cache.on_release(SimpleNamespace(rid="finished"), checkpointed=False)  # idempotent
    assert cache.chunk_index.unlock("never-locked") == 0
    check_pool(cache)


def test_insert_chunk_needs_page_size_one():
    paged = CacheBlendRadixCache(make_params(page_size=2))
    with pytest.raises(ValueError, match="page_size 1"):
        paged.handoff.insert(paged.chunk_namespace(), [1, 2], torch.tensor([1, 2]), 0)


def test_factory_builds_the_cache_and_refuses_what_it_cannot_serve(monkeypatch):
    from sglang.srt.plugins.hook_registry import HookRegistry

    from sglang_cacheblend.options import ENV_VAR, ServerOptions
    from sglang_cacheblend.srt.hooks import HOOKS

    hf_text_config = SimpleNamespace(rope_theta=100000.0, rope_scaling=None)
    model_config = SimpleNamespace(
        model_path="/models/smollm2", revision=None, hf_text_config=hf_text_config, head_dim=64,
        num_hidden_layers=30,
    )

    def context(**overrides):
        fields = dict(
            server_args=None,
            params=make_params(),
            is_hybrid_swa=False,
            is_hybrid_ssm=False,
            enable_hierarchical_cache=False,
            disable_radix_cache=False,
            tp_worker=None,
            model_config=model_config,
            tp_size=1,
            tp_rank=0,
            tp_group=None,
        )
        return TreeCacheBuildContext(**{**fields, **overrides})

    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(ValueError, match="--enable-cacheblend"):
        create_cacheblend_cache(context())  # the request hooks would be inert
    monkeypatch.setenv(ENV_VAR, ServerOptions(enabled=True).to_env())
    patched = {hook.target for hook in HOOKS}
    admission_hook = next(h.target for h in HOOKS if h.target.endswith("_commit_prefill_admission"))
    monkeypatch.setattr(HookRegistry, "_patched", patched - {admission_hook})
    with pytest.raises(RuntimeError, match="_commit_prefill_admission"):
        create_cacheblend_cache(context())  # a hook that did not apply stops the scheduler
    monkeypatch.setattr(HookRegistry, "_patched", patched)

    cache = create_cacheblend_cache(context())
    assert isinstance(cache, CacheBlendRadixCache)
    namespace = cache.chunk_namespace(cache_salt="tenant")
    assert namespace.model == "/models/smollm2" and ("rope_theta", "100000.0") in namespace.rope
    for overrides in ({"is_hybrid_swa": True}, {"enable_hierarchical_cache": True}):
        with pytest.raises(ValueError, match="cacheblend"):
            create_cacheblend_cache(context(**overrides))
    too_deep = ServerOptions(enabled=True, blend=BlendConfig(check_layer=30))
    monkeypatch.setenv(ENV_VAR, too_deep.to_env())
    with pytest.raises(ValueError, match="--cacheblend-check-layer.*30 layers"):
        create_cacheblend_cache(context())
