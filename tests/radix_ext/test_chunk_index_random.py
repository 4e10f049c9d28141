"""Randomized workload against a fake allocator and a reference model of the index.

After every step: no slot is both free and referenced, no slot leaks, locked chunks were never
evicted, eviction followed LRU order, and the evictable/locked sizes are exact. At the end every
slot is back in the allocator.
"""

from __future__ import annotations

import itertools
import random
from collections import OrderedDict

import pytest
import torch

from radix_ext import ChunkIndex, ChunkNamespace
from radix_ext.keys import default_chunk_hash

NAMESPACES = [ChunkNamespace("m", cache_salt=salt) for salt in (None, "tenant")]
POOL_SIZE = 160
STEPS = 300


def make_chunks(rng: random.Random) -> list[tuple[int, ...]]:
    chunks = set()
    while len(chunks) < 14:
        length = rng.randint(1, 12)
        chunks.add(tuple(rng.randrange(6) for _ in range(length)))  # tiny vocab: near-duplicates
    return sorted(chunks)


class Model:
    """What the index should hold: per key its slots, lock holders, and the LRU of unlocked keys."""

    def __init__(self) -> None:
        self.slots: dict[tuple, set[int]] = {}
        self.holders: dict[tuple, set[str]] = {}
        self.lru: OrderedDict[tuple, None] = OrderedDict()
        self.locks: dict[str, dict[tuple, None]] = {}  # in lock order, as the index keeps them

    def touch(self, key: tuple) -> None:
        if not self.holders[key]:
            self.lru.move_to_end(key)

    def lock(self, rid: str, key: tuple) -> None:
        if key in self.locks.setdefault(rid, {}):
            return
        self.locks[rid][key] = None
        if not self.holders[key]:
            del self.lru[key]
        self.holders[key].add(rid)

    def unlock(self, rid: str) -> None:
        for key in self.locks.pop(rid, {}):
            self.holders[key].discard(rid)
            if not self.holders[key]:
                self.lru[key] = None

    def sizes(self) -> tuple[int, int]:
        evictable = sum(len(key[1]) for key in self.lru)
        return evictable, sum(len(key[1]) for key in self.slots) - evictable


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("colliding_hash", [False, True], ids=["blake2b", "colliding"])
def test_random_workload_keeps_every_invariant(seed, colliding_hash, make_allocator):
    rng = random.Random(seed)
    allocator = make_allocator(POOL_SIZE)
    hash_fn = (lambda token_bytes: len(token_bytes) % 3) if colliding_hash else default_chunk_hash
    ticks = itertools.count(1)
    index = ChunkIndex(allocator, hash_fn=hash_fn, clock=lambda: float(next(ticks)))
    chunks = make_chunks(rng)
    model = Model()
    scratch: dict[str, list[int]] = {}  # slots a running request holds outside the index
    rids = [f"req-{i}" for i in range(6)]
    max_locked = 0

    def check() -> None:
        index.check_integrity()
        free = allocator.free_slots
        owned = set(index.all_kv_loc().tolist())
        assert owned == set().union(*model.slots.values()), "index slots differ from the model"
        referenced = owned | {slot for slots in scratch.values() for slot in slots}
        assert not referenced & free, "a slot is both free and referenced"
        assert len(referenced) + len(free) == POOL_SIZE, "a slot leaked"
        assert (index.evictable_size(), index.locked_size()) == model.sizes()

    def evict(num_tokens: int) -> None:
        expected, freed = [], 0
        for key in model.lru:
            if freed >= num_tokens:
                break
            expected.append(key)
            freed += len(key[1])
        result = index.evict(num_tokens)
        assert result == (freed, len(expected)), "eviction did not follow LRU order"
        for key in expected:
            assert not model.holders[key], "a locked chunk was evicted"
            assert model.slots[key] <= allocator.free_slots
            del model.slots[key], model.holders[key], model.lru[key]

    for _ in range(STEPS):
        op = rng.choice(["insert", "insert", "match_lock", "match_lock", "unlock", "evict"])
        namespace = rng.choice(NAMESPACES)
        if op == "insert":
            ids = rng.choice(chunks)
            kv_loc = allocator.alloc(len(ids))
            if kv_loc is None:  # memory pressure: evict, as the scheduler would
                evict(len(ids) - allocator.available_size())
                check()
                continue
            rid = rng.choice([None, *rids])
            result = index.insert(namespace, list(ids), kv_loc, rng.randrange(100), rid=rid)
            key = (namespace, ids)
            if result.inserted:
                assert key not in model.slots
                model.slots[key] = set(kv_loc.tolist())
                model.holders[key] = set()
                model.lru[key] = None
            else:
                assert result.redundant_loc is not None
                allocator.free(result.redundant_loc)
                model.touch(key)
            if rid is not None:
                model.lock(rid, key)
        elif op == "match_lock":
            picked = [rng.choice(chunks) for _ in range(rng.randint(1, 5))]
            prompt, spans, start = [rng.randrange(6)], [], 1
            for ids in picked:
                prompt += list(ids)
                spans.append((start, start + len(ids)))
                start += len(ids)
            order = list(range(len(spans)))
            rng.shuffle(order)
            matches = index.match(namespace, prompt, [spans[i] for i in order])
            for i, match in zip(order, matches, strict=True):
                key = (namespace, picked[i])
                assert match.hit == (key in model.slots), f"{key} hit={match.hit}"
                if match.hit:
                    assert set(match.kv_loc.tolist()) == model.slots[key]
                    model.touch(key)
            if rng.random() < 0.7:
                rid = rng.choice(rids)
                assert index.lock(rid, matches).stale == ()
                for i, match in zip(order, matches, strict=True):
                    if match.hit:
                        model.lock(rid, (namespace, picked[i]))
                if rid not in scratch and allocator.available_size() >= 3:
                    scratch[rid] = allocator.alloc(3).tolist()
        elif op == "unlock":
            rid = rng.choice(rids)
            index.unlock(rid)
            model.unlock(rid)
            if rid in scratch and rng.random() < 0.8:
                allocator.free(torch.tensor(scratch.pop(rid)))
        else:
            evict(rng.randint(1, 30))
        check()
        max_locked = max(max_locked, index.locked_size())

    stats = index.stats()
    assert stats.hits and stats.misses and stats.evictions and stats.duplicate_inserts
    assert max_locked > 0, "the workload never held a lock"
    for rid in rids:
        index.unlock(rid)
        model.unlock(rid)
    check()
    assert index.locked_size() == 0, "every request was unlocked"
    index.evict(index.evictable_size())
    for slots in scratch.values():
        allocator.free(torch.tensor(slots))
    assert allocator.available_size() == POOL_SIZE, "slots did not all return to the allocator"
    assert index.total_size() == 0 and len(index) == 0
    index.check_integrity()
