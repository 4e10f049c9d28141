"""The Loading Controller: the layer pipeline on a real SGLang pool, and the ratio rule.

The pipelined seeding (a loader thread a layer ahead of the compute) must leave exactly the KV
that seeding every layer first leaves, for chunks in pool slots and chunks loaded from a tier;
a loader error must reach the forward. The ratio rule is checked on synthetic speeds.
"""

from __future__ import annotations

import warnings

import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pytest.importorskip("sglang")
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from sglang_cacheblend.blend.rotary_config import RotaryConfig
from sglang_cacheblend.serving.blend_request import ChunkHit, ChunkLoad
from sglang_cacheblend.serving.controller import LoadingController, choose_recompute_ratio
from sglang_cacheblend.serving.layer_loader import ChunkSeeder, LayerPipeline
from sglang_cacheblend.serving.pool_io import check_fits_pool, read_chunk_kv
from sglang_cacheblend.store import ChunkKV

LAYERS, HEADS, DIM, SIZE = 6, 2, 8, 200
ROTARY = RotaryConfig(head_dim=DIM, rotary_dim=DIM)


def make_pool(seed: int) -> MHATokenToKVPool:
    pool = MHATokenToKVPool(SIZE, 1, torch.float32, HEADS, DIM, LAYERS, "cpu", False)
    gen = torch.Generator().manual_seed(seed)
    for layer in range(LAYERS):
        pool.get_key_buffer(layer).copy_(torch.randn(pool.get_key_buffer(layer).shape,
                                                     generator=gen))
        pool.get_value_buffer(layer).copy_(torch.randn(pool.get_value_buffer(layer).shape,
                                                       generator=gen))
    return pool


def chunks(pool: MHATokenToKVPool) -> tuple[torch.Tensor, list[ChunkHit], list[ChunkLoad]]:
    """A request of 40 positions (prefix 4) with a pool hit at [6, 16) and a load at [20, 32)."""
    slots = torch.arange(100, 140)
    hit = ChunkHit(6, 16, torch.arange(10, 20), torch.arange(1, 11))
    gen = torch.Generator().manual_seed(7)
    kv = ChunkKV(k=torch.randn(LAYERS, 12, HEADS, DIM, generator=gen),
                 v=torch.randn(LAYERS, 12, HEADS, DIM, generator=gen),
                 positions=torch.arange(1, 13), token_ids=torch.arange(500, 512))
    load = ChunkLoad(20, 32, torch.arange(500, 512), torch.arange(50, 62), kv, "disk")
    return slots, [hit], [load]


def buffers(pool) -> list[torch.Tensor]:
    return [pool.get_key_buffer(i).clone() for i in range(LAYERS)] + [
        pool.get_value_buffer(i).clone() for i in range(LAYERS)]


def test_pipelined_seeding_leaves_the_same_kv_as_seeding_first():
    results = []
    for pipelined in (False, True):
        pool = make_pool(0)
        slots, hits, loads = chunks(pool)
        seeder = ChunkSeeder(pool, slots, 4, hits, loads, ROTARY)
        pipeline = LayerPipeline(seeder, LAYERS, pipelined=pipelined)
        for layer in range(LAYERS):  # the forward: wait for a layer, then write its new rows
            pipeline.wait(layer)
            pool.get_key_buffer(layer)[slots[36:]] = float(layer)
        pipeline.close()
        assert pipeline.times.layers == LAYERS and len(pipeline.times.per_layer_s) == LAYERS
        results.append(buffers(pool))
        mask = seeder.reuse_mask
        assert mask.tolist() == [2 <= i < 12 or 16 <= i < 28 for i in range(36)]
    for before, after in zip(*results, strict=True):
        assert torch.equal(before, after)
    # The load landed in its own slots exactly as stored (the index takes them afterwards).
    pool = make_pool(0)
    slots, hits, loads = chunks(pool)
    LayerPipeline(ChunkSeeder(pool, slots, 4, hits, loads, ROTARY), LAYERS, pipelined=False)
    stored = read_chunk_kv(pool, loads[0].kv_loc, loads[0].positions, loads[0].token_ids)
    assert torch.equal(stored.k, loads[0].kv.k) and torch.equal(stored.v, loads[0].kv.v)
    # Realigned into the request's slots: the load's keys moved from positions 1.. to 20..
    assert not torch.equal(pool.get_key_buffer(0)[slots[20:32]], loads[0].kv.k[0])
    assert torch.equal(pool.get_value_buffer(0)[slots[20:32]], loads[0].kv.v[0])


def test_a_loader_error_reaches_the_forward():
    pool = make_pool(1)
    slots, hits, loads = chunks(pool)
    seeder = ChunkSeeder(pool, slots, 4, hits, loads, ROTARY)

    def broken(layer: int) -> None:
        raise OSError(f"disk gone at layer {layer}")

    seeder.seed = broken
    pipeline = LayerPipeline(seeder, LAYERS, pipelined=True)
    with pytest.raises(RuntimeError, match="disk gone at layer 0"):
        pipeline.wait(0)
    pipeline.close()
    with pytest.raises(RuntimeError, match="loading chunk KV failed"):
        LayerPipeline(seeder, LAYERS, pipelined=False)


def test_stored_entries_that_do_not_fit_the_pool_are_refused():
    pool = make_pool(2)
    _, _, loads = chunks(pool)
    kv, ids = loads[0].kv, loads[0].token_ids.tolist()
    assert check_fits_pool(kv, pool, ids) == ""
    assert "token ids" in check_fits_pool(kv, pool, [1] * 12)
    assert "shape" in check_fits_pool(kv, pool, ids[:11])
    half = ChunkKV(k=kv.k.half(), v=kv.v.half(), positions=kv.positions, token_ids=kv.token_ids)
    assert "dtype" in check_fits_pool(half, pool, ids)


def test_the_ratio_is_the_largest_whose_recompute_hides_behind_loading():
    # 1000 reused tokens; loading a layer takes 0.2 s; computing a row 1 ms -> 200 rows hide.
    assert choose_recompute_ratio(0.2, 1e-3, 1000, floor=0.1, ceiling=0.5) == pytest.approx(0.2)
    assert choose_recompute_ratio(0.02, 1e-3, 1000, floor=0.1, ceiling=0.5) == 0.1  # the floor
    assert choose_recompute_ratio(2.0, 1e-3, 1000, floor=0.1, ceiling=0.5) == 0.5  # the ceiling
    assert choose_recompute_ratio(0.2, 0.0, 1000, floor=0.1, ceiling=0.5) == 0.1
    with pytest.raises(ValueError):
        choose_recompute_ratio(0.2, 1e-3, 1000, floor=0.6, ceiling=0.5)


def test_the_controller_answers_from_measured_speeds_per_tier():
    controller = LoadingController(floor=0.05, ceiling=0.9, alpha=1.0)
    first = controller.choose({"pool": 1000})
    assert first.ratio == 0.05 and "not measured" in first.why
    # Seeding: 1e-6 s per token and layer; reading from disk 9e-6 more; a row costs 1e-4 s.
    controller.observe_seed(tokens=1000, layers=10, seconds=0.01)
    controller.observe_read("disk", tokens=1000, layers=10, seconds=0.09)
    controller.observe_compute(rows=1000, seconds=0.1)
    assert controller.choose({"pool": 1000}).ratio == 0.05  # 0.001 s per layer hides 10 rows
    on_disk = controller.choose({"disk": 1000})  # 0.01 s per layer hides 100 rows of 1000
    assert on_disk.ratio == pytest.approx(0.1) and on_disk.why.startswith("loading hides")
    mixed = controller.choose({"pool": 500, "disk": 500})
    assert mixed.ratio == pytest.approx(0.055)
    assert "host" in controller.choose({"host": 10}).why  # never read from host yet
    report = on_disk.report()
    assert report["ratio_policy"] == "controller" and report["recompute_ratio"] == 0.1
