"""The chunk index: standalone chunk KV, found at any position of any prompt.

Data structure
--------------
- ``_buckets``: dict ``(namespace, hash_fn(token_bytes)) -> list[ChunkEntry]``. A lookup packs the
  prompt once, then per span hashes the span's bytes, probes the dict and compares the full token
  bytes of each entry in the bucket (normally one), so a hash collision never returns another
  chunk's KV. Cost per lookup: O(prompt tokens) to pack plus O(span tokens) per span.
- ``_lru``: ordered dict of the *unlocked* entries, least recently used first. Access (match,
  duplicate insert, release of the last lock) moves an entry to the end; eviction pops from the
  front. Locked entries are not in it, so eviction can never reach them.
- ``_locks``: per request id, the entries it holds. An entry's ``lock_count`` is the number of
  requests holding it; a request holds an entry at most once however often it locks it.

Slot ownership
--------------
==================  ================================================================
slots               owner
==================  ================================================================
``kv_loc`` passed   the caller, until ``insert`` returns ``inserted=True``
to ``insert``       (then the index) or ``redundant_loc`` (the caller frees them)
entry ``kv_loc``    the index; freed through ``SlotFreer.free`` on evict only
==================  ================================================================
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import TYPE_CHECKING

import torch

from radix_ext.chunk_types import (
    ChunkEvictResult,
    ChunkMatch,
    ChunkStats,
    EvictedChunk,
    InsertChunkResult,
    LockResult,
    LruHead,
)
from radix_ext.entry import ChunkEntry, RequestLocks, as_positions, check_kv_loc, redundant_slots
from radix_ext.keys import TOKEN_BYTES, default_chunk_hash, pack_token_ids

if TYPE_CHECKING:
    from radix_ext.chunk_types import ChunkHashFn, SlotFreer, TokenIds


class ChunkIndex:
    """Chunk KV index with per-request locks and LRU eviction.

    A store of standalone chunk KV, keyed by namespace and token ids.

    Parameters
    ----------
    allocator : SlotFreer
        Receives the slots of evicted entries (``free(kv_loc)``).
    hash_fn : ChunkHashFn
        Lookup hash of packed token ids; default BLAKE2b-128. Injectable so tests can force
        collisions.
    clock : Callable[[], float]
        Access-time source; default ``time.monotonic``, the clock SGLang's radix tree uses, so
        access times of chunks and tree nodes compare.
    on_evict : Callable[[EvictedChunk], None], optional
        Called for each entry evicted under memory pressure, *before* its slots are freed, so
        a store below the pool can copy the KV out (spill). Not called by :meth:`reset`. An
        exception from it is the caller's bug and propagates; the entry is still removed.

    Notes
    -----
    Unlocking is idempotent: ``unlock`` of an unknown or already released request returns 0,
    because SGLang may release a request through more than one hook (``on_release`` and
    ``finish``/``release_aborted_request``). Every request that called ``lock`` must be unlocked.
    """

    def __init__(
        self,
        allocator: SlotFreer,
        *,
        hash_fn: ChunkHashFn = default_chunk_hash,
        clock: Callable[[], float] = time.monotonic,
        on_evict: Callable[[EvictedChunk], None] | None = None,
    ) -> None:
        self._allocator = allocator
        self._on_evict = on_evict
        self._hash_fn = hash_fn
        self._clock = clock
        self._buckets: dict[tuple[Hashable, Hashable], list[ChunkEntry]] = {}
        self._entries: dict[int, ChunkEntry] = {}
        self._lru: OrderedDict[int, ChunkEntry] = OrderedDict()
        self._locks: dict[Hashable, RequestLocks] = {}
        self._entry_ids = itertools.count()
        self._evictable_size = 0
        self._locked_size = 0
        self._hits = self._misses = self._hit_tokens = 0
        self._inserts = self._duplicate_inserts = 0
        self._evictions = self._evicted_tokens = 0

    # ------------------------------------------------------------------ match / insert

    def match(
        self, namespace: Hashable, prompt_ids: TokenIds, spans: Iterable[tuple[int, int]]
    ) -> list[ChunkMatch]:
        """Look up each ``[start, end)`` span of ``prompt_ids`` in ``namespace``.

        Spans may sit at any position, in any order, overlap or repeat; each gets its own
        :class:`ChunkMatch`, in the order given. Side effects: hit entries' access times only
        (no locks, no counters), so the scheduler may repeat the lookup freely.
        """
        prompt_bytes = pack_token_ids(prompt_ids)
        num_tokens = len(prompt_bytes) // TOKEN_BYTES
        spans = [(int(start), int(end)) for start, end in spans]
        for start, end in spans:
            if not 0 <= start < end <= num_tokens:
                raise ValueError(
                    f"span [{start}, {end}) must be non-empty and inside the prompt "
                    f"of {num_tokens} tokens"
                )
        now = self._clock()
        matches = []
        for start, end in spans:
            entry = self._find(namespace, prompt_bytes[start * TOKEN_BYTES : end * TOKEN_BYTES])
            if entry is None:
                matches.append(ChunkMatch(start, end, None, None, None))
                continue
            self._touch(entry, now)
            matches.append(ChunkMatch(start, end, entry.entry_id, entry.kv_loc, entry.positions))
        return matches

    def insert(
        self,
        namespace: Hashable,
        token_ids: TokenIds,
        kv_loc: torch.Tensor,
        positions: int | torch.Tensor,
        *,
        rid: Hashable | None = None,
    ) -> InsertChunkResult:
        """Insert a chunk computed standalone, taking ownership of its slots.

        Takes ownership of ``kv_loc`` for a new chunk, or reports the existing entry if the chunk
        is already cached.

        Parameters
        ----------
        namespace : Hashable
            Usually a :class:`~radix_ext.ChunkNamespace`.
        token_ids : sequence of int or torch.Tensor
            The chunk's tokens, shape ``(chunk_len,)``, ``chunk_len >= 1``.
        kv_loc : torch.Tensor
            Slots holding the chunk's KV, shape ``(chunk_len,)``, int64, allocator device. The
            index keeps a copy of this index tensor (the KV itself is not copied).
        positions : int or torch.Tensor
            Absolute positions the KV was computed at: a start position (then the chunk sat at
            ``start .. start + chunk_len - 1``) or a tensor of shape ``(chunk_len,)``, int64.
        rid : Hashable, optional
            Lock the entry for this request as well (as :meth:`lock` does, without counting a
            hit), so it cannot be evicted before the request uses it.

        Returns
        -------
        InsertChunkResult
            For a chunk already cached: the existing entry, ``inserted=False``, and the caller's
            now redundant slots in ``redundant_loc`` (to free), so a duplicate never leaks.
        """
        token_bytes = pack_token_ids(token_ids)
        chunk_len = len(token_bytes) // TOKEN_BYTES
        if chunk_len == 0:
            raise ValueError("cannot insert an empty chunk")
        check_kv_loc(kv_loc, chunk_len)
        positions = as_positions(positions, chunk_len)
        digest = self._hash_fn(token_bytes)
        now = self._clock()
        entry = self._find(namespace, token_bytes, digest)
        if entry is not None:
            self._duplicate_inserts += 1
            self._touch(entry, now)
            redundant_loc = redundant_slots(entry, kv_loc)
            inserted = False
        else:
            entry = ChunkEntry(
                entry_id=next(self._entry_ids),
                namespace=namespace,
                digest=digest,
                token_bytes=token_bytes,
                kv_loc=kv_loc.clone(),
                positions=positions.clone(),
                length=chunk_len,
                last_access_time=now,
            )
            self._buckets.setdefault((namespace, digest), []).append(entry)
            self._entries[entry.entry_id] = entry
            self._lru[entry.entry_id] = entry
            self._evictable_size += chunk_len
            self._inserts += 1
            redundant_loc = None
            inserted = True
        if rid is not None:
            self._lock_entry(self._locks.setdefault(rid, RequestLocks()), entry)
        return InsertChunkResult(
            entry.entry_id, inserted, entry.kv_loc, entry.positions, redundant_loc
        )

    # ------------------------------------------------------------------ lock / unlock

    def lock(self, rid: Hashable, matches: Sequence[ChunkMatch]) -> LockResult:
        """Lock the hits of ``matches`` for request ``rid``; idempotent per (rid, entry).

        Locked entries are never evicted until ``unlock(rid)``.
        Counts a hit or a miss once per (rid, span) for :meth:`stats`. Matches whose entry was
        evicted since the lookup are reported in ``LockResult.stale`` and count as misses.
        """
        held = self._locks.setdefault(rid, RequestLocks())
        newly_locked_len = 0
        stale = []
        for i, match in enumerate(matches):
            entry = None if match.entry_id is None else self._entries.get(match.entry_id)
            if match.entry_id is not None and entry is None:
                stale.append(i)
            span = (match.start, match.end)
            if span not in held.counted_spans:
                held.counted_spans.add(span)
                if entry is None:
                    self._misses += 1
                else:
                    self._hits += 1
                    self._hit_tokens += entry.length
            if entry is not None:
                newly_locked_len += self._lock_entry(held, entry)
        return LockResult(newly_locked_len, tuple(stale))

    def unlock(self, rid: Hashable) -> int:
        """Release all locks of ``rid``; idempotent (unknown rid -> 0).

        Returns the tokens ``rid`` held.

        An entry whose last lock goes becomes evictable as the most recently used one (it was in
        use until now); entries freed by one call join the LRU in the order ``rid`` locked them.
        """
        held = self._locks.pop(rid, None)
        if held is None:
            return 0
        now = self._clock()
        unlocked_len = 0
        for entry_id in held.entry_ids:
            entry = self._entries[entry_id]
            entry.lock_count -= 1
            unlocked_len += entry.length
            if entry.lock_count == 0:
                entry.last_access_time = now
                self._lru[entry_id] = entry
                self._locked_size -= entry.length
                self._evictable_size += entry.length
        return unlocked_len

    # ------------------------------------------------------------------ evict / reset

    def evict(self, num_tokens: int, *, older_than: float | None = None) -> ChunkEvictResult:
        """Evict unlocked entries, least recently used first, until ``num_tokens`` are freed.

        Stops early when no unlocked entry is left or, with ``older_than``, at the first entry
        accessed at or after that time (used to interleave with the radix tree's LRU). Slots go
        back through ``allocator.free``. May free more than asked (whole entries).
        """
        freed = evicted = 0
        while freed < num_tokens and self._lru:
            entry = next(iter(self._lru.values()))
            if older_than is not None and entry.last_access_time >= older_than:
                break
            try:
                if self._on_evict is not None:
                    self._on_evict(EvictedChunk(entry.namespace, entry.token_bytes,
                                                entry.kv_loc, entry.positions))
            finally:
                self._remove(entry)
            freed += entry.length
            evicted += 1
        self._evictions += evicted
        self._evicted_tokens += freed
        return ChunkEvictResult(freed, evicted)

    def reset(self) -> None:
        """Forget every entry and lock *without* freeing their slots; counters are kept.

        For when the whole pool is cleared at once, as SGLang's ``flush_cache`` does: it resets
        the tree cache and then calls ``allocator.clear()``.
        """
        self._buckets.clear()
        self._entries.clear()
        self._lru.clear()
        self._locks.clear()
        self._evictable_size = self._locked_size = 0

    def lru_head(self) -> LruHead | None:
        """The least recently used unlocked entry, or ``None`` if none is evictable."""
        if not self._lru:
            return None
        entry = next(iter(self._lru.values()))
        return LruHead(entry.last_access_time, entry.length)

    # ------------------------------------------------------------------ sizes / stats

    def evictable_size(self) -> int:
        return self._evictable_size

    def locked_size(self) -> int:
        return self._locked_size

    def total_size(self) -> int:
        return self._evictable_size + self._locked_size

    def __len__(self) -> int:
        return len(self._entries)

    def all_kv_loc(self) -> torch.Tensor:
        """Every slot the index owns, concatenated (int64; empty on CPU when there is none)."""
        if not self._entries:
            return torch.empty(0, dtype=torch.int64)
        return torch.cat([entry.kv_loc for entry in self._entries.values()])

    def stats(self) -> ChunkStats:
        return ChunkStats(
            hits=self._hits,
            misses=self._misses,
            hit_tokens=self._hit_tokens,
            inserts=self._inserts,
            duplicate_inserts=self._duplicate_inserts,
            evictions=self._evictions,
            evicted_tokens=self._evicted_tokens,
            num_entries=len(self._entries),
            evictable_size=self._evictable_size,
            locked_size=self._locked_size,
        )

    def check_integrity(self) -> None:
        """Raise ``AssertionError`` if any internal invariant is broken."""
        in_buckets = {}
        for (namespace, digest), bucket in self._buckets.items():
            assert bucket, f"empty bucket {digest!r} left behind"
            for entry in bucket:
                assert entry.namespace == namespace and entry.digest == digest
                assert entry.entry_id not in in_buckets, f"entry {entry.entry_id} twice"
                in_buckets[entry.entry_id] = entry
            assert len({entry.token_bytes for entry in bucket}) == len(bucket), "duplicate chunk"
        assert in_buckets.keys() == self._entries.keys(), "buckets and entries disagree"
        holders = {entry_id: 0 for entry_id in self._entries}
        for rid, held in self._locks.items():
            for entry_id in held.entry_ids:
                assert entry_id in holders, f"request {rid!r} holds missing entry {entry_id}"
                holders[entry_id] += 1
        evictable = locked = 0
        for entry_id, entry in self._entries.items():
            assert entry is in_buckets[entry_id]
            assert self._hash_fn(entry.token_bytes) == entry.digest, "digest out of date"
            assert entry.length == len(entry.token_bytes) // TOKEN_BYTES
            assert entry.kv_loc.dtype == torch.int64 and entry.kv_loc.shape == (entry.length,)
            assert entry.positions.shape == (entry.length,)
            assert entry.lock_count == holders[entry_id], f"entry {entry_id} lock count"
            assert (entry.lock_count == 0) == (entry_id in self._lru), "LRU holds locked entry"
            if entry.lock_count:
                locked += entry.length
            else:
                evictable += entry.length
        assert (evictable, locked) == (self._evictable_size, self._locked_size), "size drift"
        times = [entry.last_access_time for entry in self._lru.values()]
        assert times == sorted(times), "LRU order does not follow access times"
        owned = self.all_kv_loc()
        assert owned.unique().numel() == owned.numel(), "a slot is owned by two entries"

    # ------------------------------------------------------------------ helpers

    def _find(
        self, namespace: Hashable, token_bytes: bytes, digest: Hashable | None = None
    ) -> ChunkEntry | None:
        if digest is None:
            digest = self._hash_fn(token_bytes)
        for entry in self._buckets.get((namespace, digest), ()):
            if entry.token_bytes == token_bytes:
                return entry
        return None

    def _touch(self, entry: ChunkEntry, now: float) -> None:
        entry.last_access_time = now
        if entry.lock_count == 0:
            self._lru.move_to_end(entry.entry_id)

    def _lock_entry(self, held: RequestLocks, entry: ChunkEntry) -> int:
        if entry.entry_id in held.entry_ids:
            return 0
        held.entry_ids[entry.entry_id] = None
        if entry.lock_count == 0:
            del self._lru[entry.entry_id]
            self._evictable_size -= entry.length
            self._locked_size += entry.length
        entry.lock_count += 1
        return entry.length

    def _remove(self, entry: ChunkEntry) -> None:
        del self._lru[entry.entry_id]
        del self._entries[entry.entry_id]
        key = (entry.namespace, entry.digest)
        bucket = self._buckets[key]
        bucket.remove(entry)
        if not bucket:
            del self._buckets[key]
        self._evictable_size -= entry.length
        self._allocator.free(entry.kv_loc)
