"""Unit tests of the chunk index: lookup anywhere, collisions, duplicates, locks, LRU eviction."""

from __future__ import annotations

import itertools

import pytest
import torch

from radix_ext import ChunkIndex, ChunkNamespace

NS = ChunkNamespace("smollm2-135m", rope=(("base", 100000.0), ("rotary_dim", 64)))


class Clock:
    """A deterministic clock: every call is one tick later."""

    def __init__(self) -> None:
        self._ticks = itertools.count(1)

    def __call__(self) -> float:
        return float(next(self._ticks))


@pytest.fixture
def allocator(make_allocator):
    return make_allocator(1000)


@pytest.fixture
def index(allocator):
    return ChunkIndex(allocator, clock=Clock())


def put(index, allocator, token_ids, namespace=NS, start=0, rid=None):
    kv_loc = allocator.alloc(len(token_ids))
    return index.insert(namespace, token_ids, kv_loc, start, rid=rid)


def spans_of(*lengths, start=0):
    spans = []
    for length in lengths:
        spans.append((start, start + length))
        start += length
    return spans


A, B, C = [11, 12, 13], [21, 22, 23, 24], [31, 32]


def test_hits_are_found_in_any_order(index, allocator):
    a, b, c = (put(index, allocator, ids, start=7) for ids in (A, B, C))
    prefix, suffix = [1, 2], [9, 9, 9]
    for order in itertools.permutations([(A, a), (B, b), (C, c)]):
        prompt = prefix + [tok for ids, _ in order for tok in ids] + suffix
        spans = spans_of(*(len(ids) for ids, _ in order), start=len(prefix))
        matches = index.match(NS, prompt, spans)
        assert [m.entry_id for m in matches] == [res.entry_id for _, res in order]
        for match, (ids, res), (start, end) in zip(matches, order, spans, strict=True):
            assert match.hit and (match.start, match.end) == (start, end)
            assert torch.equal(match.kv_loc, res.kv_loc)
            assert match.positions.tolist() == list(range(7, 7 + len(ids)))
    index.check_integrity()


def test_hits_are_found_at_any_position_and_repeated(index, allocator):
    a = put(index, allocator, A)
    prompt = A + [5] * 50 + A + A + [6]
    spans = [(56, 59), (0, 3), (53, 56), (59, 60)]
    matches = index.match(NS, torch.tensor(prompt, dtype=torch.int32), spans)
    assert [m.hit for m in matches] == [True, True, True, False]
    assert [(m.start, m.end) for m in matches] == spans, "hits and misses keep their [start, end)"
    assert {m.entry_id for m in matches[:3]} == {a.entry_id}
    assert matches[3].kv_loc is None and matches[3].positions is None
    assert matches[3] == (59, 60, None, None, None), "(start, end, entry_id, kv_loc, positions)"


def test_tensor_and_list_token_ids_are_the_same_key(index, allocator):
    put(index, allocator, torch.tensor(B, dtype=torch.int32))
    assert index.match(NS, B, [(0, 4)])[0].hit
    assert not index.match(NS, B, [(0, 3)])[0].hit, "a prefix of a chunk is another chunk"


def test_namespaces_never_share_chunks(index, allocator):
    put(index, allocator, A)
    others = [
        ChunkNamespace("smollm2-135m", cache_salt="tenant-b", rope=NS.rope),
        ChunkNamespace("other-model", rope=NS.rope),
        ChunkNamespace("smollm2-135m", rope=(("base", 10000.0), ("rotary_dim", 64))),
        ChunkNamespace("smollm2-135m", rope=NS.rope, variant="sink:4"),
        ChunkNamespace("smollm2-135m", extra_key="lora-7", rope=NS.rope),
    ]
    for namespace in others:
        assert not index.match(namespace, A, [(0, 3)])[0].hit
    assert index.match(NS, A, [(0, 3)])[0].hit


def test_namespace_validation():
    with pytest.raises(ValueError):
        ChunkNamespace("")
    with pytest.raises(ValueError, match="pairs"):
        ChunkNamespace("m", rope=(("base", 1e5, "extra"),))
    with pytest.raises(TypeError):
        ChunkNamespace("m", rope=(("scaling", {"type": "yarn"}),))


def test_hash_collision_never_returns_another_chunks_kv(allocator):
    index = ChunkIndex(allocator, hash_fn=lambda token_bytes: 0, clock=Clock())
    a, b, c = (put(index, allocator, ids) for ids in (A, B, C))
    index.check_integrity()
    prompt = C + A + B
    matches = index.match(NS, prompt, [(0, 2), (2, 5), (5, 9), (0, 5)])
    assert [m.entry_id for m in matches] == [c.entry_id, a.entry_id, b.entry_id, None]
    assert torch.equal(matches[1].kv_loc, a.kv_loc)
    assert index.evict(1) == (2, 1)  # C, the least recently used: it was looked up first
    assert [m.entry_id for m in index.match(NS, prompt, [(0, 2), (2, 5), (5, 9)])] == [
        None,
        a.entry_id,
        b.entry_id,
    ]
    index.check_integrity()


def test_duplicate_insert_returns_existing_entry_and_redundant_slots(index, allocator):
    first = put(index, allocator, A, start=3)
    free_before = allocator.available_size()
    again = put(index, allocator, A, start=40)
    assert (again.entry_id, again.inserted) == (first.entry_id, False)
    assert torch.equal(again.kv_loc, first.kv_loc) and again.positions.tolist() == [3, 4, 5]
    assert again.redundant_loc is not None and again.redundant_loc.numel() == 3
    allocator.free(again.redundant_loc)
    assert allocator.available_size() == free_before
    assert index.total_size() == 3 and index.stats().duplicate_inserts == 1
    same_slots = index.insert(NS, A, first.kv_loc.clone(), 3)
    assert same_slots.redundant_loc is None and not same_slots.inserted
    with pytest.raises(ValueError, match="overlaps"):
        index.insert(NS, A, torch.tensor([first.kv_loc[0].item(), 999, 998]), 3)
    index.check_integrity()


def test_insert_validates_inputs(index):
    with pytest.raises(ValueError, match="int64"):
        index.insert(NS, A, torch.tensor([1, 2, 3], dtype=torch.int32), 0)
    with pytest.raises(ValueError, match="shape"):
        index.insert(NS, A, torch.tensor([1, 2]), 0)
    with pytest.raises(ValueError, match="empty"):
        index.insert(NS, [], torch.tensor([], dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="positions"):
        index.insert(NS, A, torch.tensor([1, 2, 3]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="span"):
        index.match(NS, A, [(2, 5)])
    with pytest.raises(ValueError, match="span"):
        index.match(NS, A, [(1, 1)])
    assert len(index) == 0


def test_per_token_positions_are_kept(index, allocator):
    positions = torch.tensor([4, 9, 10, 11])
    put_res = index.insert(NS, B, allocator.alloc(4), positions)
    positions[0] = 0  # the index keeps its own copy
    assert index.match(NS, B, [(0, 4)])[0].positions.tolist() == [4, 9, 10, 11]
    assert put_res.positions.tolist() == [4, 9, 10, 11]


def test_match_has_no_side_effects_but_access_time(index, allocator):
    put(index, allocator, A), put(index, allocator, B)
    stats = index.stats()
    for _ in range(3):
        index.match(NS, B + A + C, spans_of(4, 3, 2))
    assert index.stats() == stats
    assert (index.evictable_size(), index.locked_size()) == (7, 0)
    # Access time is the one effect: each lookup touched B, then A.
    assert index.lru_head().length == len(B)
    index.match(NS, B, [(0, 4)])
    assert index.lru_head().length == len(A)
    index.check_integrity()


def test_locked_chunks_are_never_evicted(index, allocator):
    a, b, c = (put(index, allocator, ids) for ids in (A, B, C))
    matches = index.match(NS, A + B, spans_of(3, 4))
    assert index.lock("req-1", matches).newly_locked_len == 7
    assert (index.evictable_size(), index.locked_size()) == (2, 7)
    result = index.evict(100)
    assert result == (2, 1)
    assert index.total_size() == 7 and index.evict(100) == (0, 0)
    assert [m.hit for m in index.match(NS, A + B + C, spans_of(3, 4, 2))] == [True, True, False]
    assert index.unlock("req-1") == 7
    assert (index.evictable_size(), index.locked_size()) == (7, 0)
    assert index.evict(100) == (7, 2)
    assert allocator.available_size() == allocator.size
    assert len(index) == 0 and index.all_kv_loc().numel() == 0
    index.check_integrity()
    del a, b, c


def test_unlock_is_idempotent_and_releases_all_chunks_of_a_request(index, allocator):
    put(index, allocator, A), put(index, allocator, B)
    matches = index.match(NS, A + B + A, spans_of(3, 4, 3))
    first = index.lock("r1", matches)
    assert first.newly_locked_len == 7, "a repeated chunk is held once per request"
    assert index.lock("r1", matches).newly_locked_len == 0, "locking again is idempotent"
    index.lock("r2", matches[:1])
    assert index.locked_size() == 7
    assert index.unlock("r1") == 7
    assert (index.evictable_size(), index.locked_size()) == (4, 3), "r2 still holds A"
    assert index.unlock("r1") == 0 and index.unlock("never-seen") == 0
    assert index.unlock("r2") == 3
    assert (index.evictable_size(), index.locked_size()) == (7, 0)
    index.check_integrity()


def test_unlocked_chunk_becomes_most_recently_used(index, allocator):
    put(index, allocator, A), put(index, allocator, B)
    index.lock("r", index.match(NS, A, [(0, 3)]))
    index.match(NS, B, [(0, 4)])
    index.unlock("r")
    assert index.evict(1) == (4, 1), "B was used before r finished with A"


def test_lock_reports_stale_matches(index, allocator):
    put(index, allocator, A)
    matches = index.match(NS, A + B, spans_of(3, 4))
    index.evict(3)
    result = index.lock("r", matches)
    assert result == (0, (0,))
    assert index.locked_size() == 0
    assert index.stats().misses == 2
    index.unlock("r")
    index.check_integrity()


def test_stats_count_each_request_span_once(index, allocator):
    put(index, allocator, A)
    matches = index.match(NS, A + B, spans_of(3, 4))
    index.lock("r", matches)
    index.lock("r", index.match(NS, A + B, spans_of(3, 4)))
    stats = index.stats()
    assert (stats.hits, stats.misses, stats.hit_tokens) == (1, 1, 3)
    put_b = put(index, allocator, B, rid="r")
    assert put_b.inserted and index.locked_size() == 7
    assert index.stats().hits == 1, "locking one's own insert is not a hit"
    index.unlock("r")
    stats = index.stats()
    assert (stats.inserts, stats.num_entries, stats.total_size) == (2, 2, 7)


def test_evict_lru_order_and_older_than(index, allocator):
    entries = [put(index, allocator, [100 + i] * (i + 1)) for i in range(4)]
    index.match(NS, [100], [(0, 1)])  # entry 0 becomes the most recent
    head = index.lru_head()
    assert head.length == 2
    assert index.evict(100, older_than=head.last_access_time) == (0, 0)
    assert index.evict(1, older_than=head.last_access_time + 1.5) == (2, 1)
    assert index.evict(4) == (7, 2), "whole entries, least recently used first"
    assert [m.hit for m in index.match(NS, [100], [(0, 1)])] == [True]
    assert index.stats().evictions == 3 and index.stats().evicted_tokens == 9
    index.check_integrity()
    del entries


def test_reset_forgets_entries_without_freeing(index, allocator):
    put(index, allocator, A)
    index.lock("r", index.match(NS, A, [(0, 3)]))
    calls = allocator.num_free_calls
    index.reset()
    assert allocator.num_free_calls == calls, "reset leaves the slots to allocator.clear()"
    assert (len(index), index.total_size(), index.unlock("r")) == (0, 0, 0)
    assert not index.match(NS, A, [(0, 3)])[0].hit
    index.check_integrity()


def test_on_evict_sees_each_victim_before_its_slots_are_freed(make_allocator):
    from radix_ext import ChunkIndex

    allocator = make_allocator(32)
    seen = []

    def listener(victim):
        # The slots still belong to the index: none of them is free yet.
        assert not set(victim.kv_loc.tolist()) & allocator.free_slots
        seen.append((victim.namespace, victim.token_ids, victim.positions.tolist()))

    index = ChunkIndex(allocator, on_evict=listener)
    index.insert("ns", [5, 6, 7], allocator.alloc(3), 1)
    index.insert("ns", [8, 9], allocator.alloc(2), 4)
    assert index.evict(1).num_entries_evicted == 1
    assert seen == [("ns", [5, 6, 7], [1, 2, 3])]
    index.reset()  # a flush drops entries without evicting them: no spill
    assert len(seen) == 1

    def broken(victim):
        raise RuntimeError("store gone")

    failing = ChunkIndex(allocator, on_evict=broken)
    failing.insert("ns", [1, 2], allocator.alloc(2), 0)
    with pytest.raises(RuntimeError, match="store gone"):
        failing.evict(1)
    assert len(failing) == 0  # removed (and its slots freed) all the same
    failing.check_integrity()
