"""The KV Cache Store through a real server: spill, load-back, restart, damaged files.

One server with a small pool, a host-RAM tier and a disk tier: chunks evicted from the pool
spill to host RAM and come back for the next request with the same output as when they were in
the pool. A second server on the same disk folder (a restart) serves them from disk with the
same output; files damaged on disk (one corrupted, one truncated) are detected, dropped and
recomputed. After all of it, nothing is locked and every pool slot is accounted for.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import requests

from sglang_cacheblend.chunks import chunk_hints, precompute_hints
from sglang_cacheblend.chunks.client import wait_for_store_writes
from tests.conftest import FLOAT32, STANDALONE_CHUNKS, running_server

TIMEOUT = 600
POOL = 6000
CHUNK_LEN = 300
rng = random.Random(15)
CHUNKS = [[rng.randrange(1000, 40000) for _ in range(CHUNK_LEN)] for _ in range(4)]
QUESTION = list(range(2000, 2020))
# Enough other chunks to push CHUNKS (and the first request's prefix-tree entry) out of the pool.
FILLERS = [[rng.randrange(1000, 40000) for _ in range(CHUNK_LEN)]
           for _ in range(POOL // CHUNK_LEN + 2)]
# fp32: the answers from the pool, host RAM and disk are compared token for token, across two
# servers; a bf16 server's restart answered otherwise (greedy tokens of a random-token prompt
# part on near-ties, which bf16 rounding reaches). Standalone chunk KV: the chunk, file and
# tier counts below are the chunks' own, no context entry among them.
COMMON = ["--enable-cacheblend", *FLOAT32, *STANDALONE_CHUNKS, "--max-total-tokens",
          str(POOL), "--cacheblend-min-reused-tokens", "16"]


def _precompute(server, chunks) -> None:
    for i in range(0, len(chunks), 8):  # batches the pool can hold at once
        response = requests.post(server.base_url + "/generate", json={
            "input_ids": chunks[i:i + 8], "sampling_params": {"max_new_tokens": 0},
            "kv_hints": precompute_hints()}, timeout=TIMEOUT)
        assert response.status_code == 200, response.text


def _ask(server, **hints) -> tuple[list[int], dict]:
    ids, spans = [1], []
    for chunk in reversed(CHUNKS):  # an order no precompute used
        spans.append((len(ids), len(ids) + len(chunk)))
        ids += chunk
    ids += QUESTION
    response = requests.post(server.base_url + "/generate", json={
        "input_ids": ids, "sampling_params": {"max_new_tokens": 8, "temperature": 0},
        "kv_hints": chunk_hints(spans, **hints)}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    (report,) = response.json()["meta_info"]["cacheblend"]
    assert report["blended"] is True, report
    return response.json()["output_ids"], report


def _state(server) -> dict:
    info = requests.get(server.base_url + "/server_info", timeout=60).json()
    return info["internal_states"][0]["cacheblend"]


def _settled(server) -> dict:
    """The state once the store's writer queue is empty (bounded wait)."""
    wait_for_store_writes(server.base_url, timeout_s=60)
    return _state(server)


def _assert_nothing_leaked(state: dict) -> None:
    pool = state["token_pool"]
    assert pool["available"] + pool["evictable"] + pool["protected"] == pool["total"]
    assert pool["protected"] == 0 and state["chunk_index"]["locked_size"] == 0


@pytest.fixture(scope="module")
def disk_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("disk_tier")


@pytest.fixture(scope="module")
def in_pool(model_path, disk_dir, tmp_path_factory):
    """First server: the answer with every chunk in the pool, then with every chunk spilled to
    host RAM and loaded back."""
    args = [*COMMON, "--cacheblend-host-tier-mb", "1024", "--cacheblend-disk-tier-dir",
            str(disk_dir)]
    with running_server(model_path, tmp_path_factory.mktemp("store_a"), args) as server:
        _precompute(server, CHUNKS)
        pool_output, pool_report = _ask(server)
        _precompute(server, FILLERS)
        host_output, host_report = _ask(server)
        state = _settled(server)
    return pool_output, pool_report, host_output, host_report, state


def test_chunks_spilled_to_host_ram_come_back_with_the_same_output(in_pool):
    pool_output, pool_report, host_output, host_report, state = in_pool
    assert pool_report["chunk_sources"]["pool"] == 4
    assert host_report["chunk_sources"].get("host") == 4, host_report
    assert host_report["chunk_hits"] == 0  # the pool had lost them
    assert host_output == pool_output
    host = state["store"]["tiers"]["host"]
    assert state["chunk_index"]["evictions"] >= 4 and state["store"]["spills"] >= 4
    assert host["hits"] >= 4 and host["bytes"] <= host["capacity_bytes"]
    _assert_nothing_leaked(state)


def test_a_restart_serves_the_disk_tier_and_drops_damaged_files(in_pool, model_path, disk_dir,
                                                                 tmp_path_factory):
    pool_output = in_pool[0]
    files = sorted(disk_dir.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    assert len(files) == len(CHUNKS) + len(FILLERS)  # written through as they were computed
    args = [*COMMON, "--cacheblend-disk-tier-dir", str(disk_dir)]
    with running_server(model_path, tmp_path_factory.mktemp("store_b"), args) as server:
        output, report = _ask(server)
        assert report["chunk_sources"].get("disk") == 4, report
        assert output == pool_output

        # The four files just read are the newest; damage two of them, empty the pool.
        newest = sorted(disk_dir.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)[-4:]
        data = bytearray(newest[0].read_bytes())
        data[len(data) // 2] ^= 0xFF
        newest[0].write_bytes(bytes(data))
        with newest[1].open("r+b") as f:
            f.truncate(newest[1].stat().st_size // 3)
        requests.post(server.base_url + "/flush_cache", timeout=60).raise_for_status()

        output, report = _ask(server)
        assert report["chunk_sources"].get("disk") == 2, report
        assert report["chunk_sources"]["computed"] == 2, report
        assert output == pool_output
        state = _settled(server)
        assert state["store"]["tiers"]["disk"]["dropped"] == 2
        _assert_nothing_leaked(state)

        # The Loading Controller, asked per request, picks the ratio from what it measured.
        requests.post(server.base_url + "/flush_cache", timeout=60).raise_for_status()
        _, report = _ask(server, ratio_policy="controller")
        assert report["ratio_policy"] == "controller" and report["chunk_sources"]["disk"] == 4
        assert 0.15 <= report["recompute_ratio"] <= 0.5, report
        assert report["controller_load_s_per_layer"] > 0, report  # disk was measured above
        speeds = _state(server)["store"]["controller"]
        assert speeds["compute_s_per_row"] > 0 and speeds["load_s_per_token_layer"]["disk"] > 0
    # The damaged entries were rewritten from the recomputed chunks, whole and valid.
    assert all(p.exists() for p in newest[:2])
