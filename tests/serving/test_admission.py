"""Admission of chunked requests on a fake pool: no SGLang, no server.

The same :class:`~sglang_cacheblend.serving.admission.Admission` runs inside the ``cacheblend``
radix cache on SGLang's pools (``tests/srt/test_admission.py``); here every slot is checked by a
fake allocator that refuses double frees, and the pool's books must balance after each request.
"""

from __future__ import annotations

from array import array
from types import SimpleNamespace

import pytest
import torch

from radix_ext import ChunkIndex, ChunkNamespace
from sglang_cacheblend.config import BlendConfig
from sglang_cacheblend.serving.admission import PROMPT_CHANGED, Admission
from sglang_cacheblend.serving.blend_request import BlendOutcome
from sglang_cacheblend.serving.controller import LoadingController
from sglang_cacheblend.serving.handoff import ChunkHandoff, precompute_free_ranges
from sglang_cacheblend.serving.layout import ChunkLayout
from sglang_cacheblend.serving.pool import RequestView
from tests.radix_ext.conftest import FakeAllocator

SIZE = 200
SINK = (1,)
A, B, C = ([100 + 20 * k + i for i in range(20)] for k in range(3))
QUESTION = [7, 8, 9]
CONFIG = BlendConfig(min_reused_tokens=16)


class FakePool:
    """A :class:`~sglang_cacheblend.serving.pool.ChunkPool` over the fake allocator; ``alloc``
    evicts unlocked chunks first, as SGLang's cache does."""

    def __init__(self) -> None:
        self.allocator = FakeAllocator(SIZE)
        self.index: ChunkIndex | None = None

    def alloc(self, num_tokens: int) -> torch.Tensor | None:
        short = num_tokens - self.allocator.available_size()
        if short > 0 and self.index is not None:
            self.index.evict(short)
        return self.allocator.alloc(num_tokens)

    def free(self, kv_loc: torch.Tensor) -> None:
        self.allocator.free(kv_loc)

    def kv_cache(self):
        return SimpleNamespace(layer_num=2)


def namespace_of(*, cache_salt=None, extra_key=None, variant=""):
    return ChunkNamespace("tiny", cache_salt, extra_key, (), variant)


@pytest.fixture
def setup():
    pool = FakePool()
    index = ChunkIndex(pool.allocator)
    pool.index = index
    handoff = ChunkHandoff(index, pool, None, lambda ns, ids: "key")
    admission = Admission(index=index, pool=pool, namespace_of=namespace_of,
                          store_key=lambda ns, ids: "key",
                          controller=LoadingController(floor=0.15, ceiling=0.5),
                          handoff=handoff)
    return SimpleNamespace(pool=pool, index=index, admission=admission)


def balanced(s) -> bool:
    """Every slot is free or owned by the index, and nothing is locked."""
    return (s.pool.allocator.available_size() + s.index.total_size() == SIZE
            and s.index.locked_size() == 0)


def chunked_prompt(chunks, *, config=CONFIG, sink=SINK, question=QUESTION):
    """``sink + chunks + question`` and its layout, as the tokenizer hook decides it (also
    used by ``tests/srt/test_admission.py``)."""
    prompt, spans = list(sink), []
    for ids in chunks:
        spans.append((len(prompt), len(prompt) + len(ids)))
        prompt += ids
    prompt += question
    return prompt, ChunkLayout(False, tuple(spans), tuple(sink), config).for_prompt(prompt)





def store_chunk(s, ids):
    layout_ns = namespace_of(variant=ChunkLayout(False, (), SINK, None).variant)
    s.index.insert(layout_ns, ids, s.pool.allocator.alloc(len(ids)), len(SINK))


def test_a_hit_and_a_miss_blend_and_the_miss_is_cached_after_the_forward(setup):
    s = setup
    store_chunk(s, A)
    prompt, layout = chunked_prompt([A, C])
    s.admission.admit(RequestView("r", prompt), layout, remaining_tokens=lambda: 10_000)
    blend = s.admission.blend_request("r")
    assert blend is not None and len(blend.hits) == 1 and len(blend.misses) == 1
    assert s.admission.blend_report("r")["chunk_sources"]["computed"] == 1
    assert s.index.locked_size() == len(A)
    s.admission.finish("r", BlendOutcome(computed=blend.misses, seeded_tokens=40))
    assert s.admission.blend_request("r") is None  # no later forward blends again
    assert s.index.total_size() == len(A) + len(C)  # C went to the index, its sink was freed
    s.admission.release("r")
    assert balanced(s)
    again, layout = chunked_prompt([C, A])  # another order: both chunks hit
    s.admission.admit(RequestView("r2", again), layout, remaining_tokens=lambda: 10_000)
    assert s.admission.blend_report("r2")["chunk_hits"] == 2
    s.admission.release("r2")
    assert balanced(s)


def test_a_forward_that_did_not_blend_frees_what_admission_took(setup):
    s = setup
    prompt, layout = chunked_prompt([A, B])
    s.admission.admit(RequestView("r", prompt), layout, remaining_tokens=lambda: 10_000)
    assert s.pool.allocator.available_size() < SIZE  # miss slots taken
    s.admission.finish("r", BlendOutcome.not_blended("blended prefill failed"))
    assert s.admission.blend_report("r")["reason"] == "blended prefill failed"
    assert s.pool.allocator.available_size() == SIZE
    s.admission.release("r")
    assert balanced(s)


def test_admission_never_takes_more_than_the_budget(setup):
    s = setup
    store_chunk(s, A)
    prompt, layout = chunked_prompt([A, B])
    s.admission.admit(RequestView("r", prompt), layout, remaining_tokens=lambda: -1)
    assert "not enough KV memory" in s.admission.blend_report("r")["reason"]
    assert balanced(s)


@pytest.mark.parametrize("rewritten", [
    lambda p: array("q", [0]),  # an abort stub
    lambda p: p[:30],  # auto-truncation
    lambda p: [t + 1 for t in p],  # the same length, other ids
    lambda p: [*p, 5],  # longer
])
def test_a_layout_is_used_only_on_the_prompt_it_was_decided_for(setup, rewritten):
    """Issue 25 G1: a prompt SGLang rewrote after tokenization is never looked up (a span past
    its end raised out of the scheduler loop) and never blended; the report says why."""
    s = setup
    store_chunk(s, A)
    prompt, layout = chunked_prompt([A, B])
    view = RequestView("r", rewritten(prompt))
    s.admission.touch(view, layout)  # raised ValueError before
    s.admission.admit(view, layout, remaining_tokens=lambda: 10_000)
    assert s.admission.blend_request("r") is None
    assert s.admission.blend_report("r")["reason"] == PROMPT_CHANGED
    assert s.index.stats().hits == 0  # the stub was never matched against A
    s.admission.release("r")
    assert balanced(s)


def test_a_request_sglang_will_abort_is_not_blended(setup):
    s = setup
    prompt, layout = chunked_prompt([A, B])
    s.admission.admit(RequestView("r", prompt, ending=True), layout,
                      remaining_tokens=lambda: 10_000)
    assert s.admission.blend_report("r")["reason"] == PROMPT_CHANGED
    assert balanced(s)


def test_an_exception_in_chunk_handling_stays_inside_admission(setup, monkeypatch):
    s = setup
    prompt, layout = chunked_prompt([A, B])

    def broken(*args, **kwargs):
        raise RuntimeError("index failure")

    monkeypatch.setattr(s.index, "match", broken)
    s.admission.touch(RequestView("r", prompt), layout)
    s.admission.admit(RequestView("r", prompt), layout, remaining_tokens=lambda: 10_000)
    assert s.admission.blend_request("r") is None
    monkeypatch.undo()
    assert balanced(s)


def test_a_layout_round_trips_through_its_payload_and_keeps_its_prompt():
    prompt, layout = chunked_prompt([A, B])
    again = ChunkLayout.from_payload(layout.to_payload())
    assert again == layout and again.fits_prompt(prompt)
    with pytest.raises(KeyError):  # a payload of the old shape (no prompt) is not trusted
        ChunkLayout.from_payload({k: v for k, v in layout.to_payload().items()
                                  if k != "prompt_digest"})


@pytest.mark.parametrize(("inserted", "keeps_prefix", "expected"), [
    (True, False, [(0, 5), (25, 30)]),
    (False, False, [(0, 5), (5, 30)]),
    (True, True, [(25, 30)]),
    (False, True, [(5, 30)]),
])
def test_a_precompute_row_has_one_owner_per_slot(inserted, keeps_prefix, expected):
    assert precompute_free_ranges(start=5, end=25, protected=0, up_to=30,
                                  chunk_inserted=inserted, keeps_prefix=keeps_prefix) == expected


def test_a_failed_hand_off_leaves_no_slot_without_an_owner(setup, monkeypatch):
    """Whatever the index raises while a forward's chunks are handed over, every slot ends up
    free or owned by the index once the request is released (the fake allocator refuses
    double frees)."""
    s = setup
    prompt, layout = chunked_prompt([A, B])
    s.admission.admit(RequestView("r", prompt), layout, remaining_tokens=lambda: 10_000)
    blend = s.admission.blend_request("r")
    real_insert = s.index.insert
    calls = []

    def second_insert_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("index full of surprises")
        return real_insert(*args, **kwargs)

    monkeypatch.setattr(s.index, "insert", second_insert_fails)
    s.admission.finish("r", BlendOutcome(computed=blend.misses))  # logged, never raised
    s.admission.release("r")
    assert s.index.total_size() == len(A)  # the first chunk made it, the second was freed
    assert balanced(s)
