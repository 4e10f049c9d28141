"""Two SGLang servers sharing chunk KV through Mooncake; run INSIDE a private network namespace.

``test_mooncake_servers.py`` runs this file under ``private_netns_command``; it starts the
Mooncake service and both servers there (every address 127.0.0.1), runs the steps and prints
one ``RESULT {json}`` line for the test to check. Steps:

1. chunks precomputed on server A reach Mooncake (written through); server B, which never saw
   them, answers a request holding them with every chunk from Mooncake and A's output;
2. both servers precompute the same new chunks at once (concurrent writers of one key); B,
   its pool emptied, then serves them from Mooncake, with A's output for them;
3. the master is killed: B keeps serving: a precompute (its write-through fails) and a request
   whose chunks nobody computed (looked up in vain, computed), with the tier marked unavailable.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from pathlib import Path

import requests

from sglang_cacheblend.chunks import chunk_hints, precompute_hints
from sglang_cacheblend.chunks.client import wait_for_store_writes
from sglang_cacheblend.store.mooncake_service import MooncakeService
from tests.conftest import FLOAT32, STANDALONE_CHUNKS, running_server

TIMEOUT = 600
rng = random.Random(20)


def chunks(n: int, length: int = 300) -> list[list[int]]:
    return [[rng.randrange(1000, 40000) for _ in range(length)] for _ in range(n)]


def precompute(server, batch) -> None:
    response = requests.post(server.base_url + "/generate", json={
        "input_ids": batch, "sampling_params": {"max_new_tokens": 0},
        "kv_hints": precompute_hints()}, timeout=TIMEOUT)
    response.raise_for_status()


def ask(server, batch) -> tuple[list[int], dict]:
    ids, spans = [1], []
    for chunk in reversed(batch):
        spans.append((len(ids), len(ids) + len(chunk)))
        ids += chunk
    ids += list(range(2000, 2020))
    response = requests.post(server.base_url + "/generate", json={
        "input_ids": ids, "sampling_params": {"max_new_tokens": 8, "temperature": 0},
        "kv_hints": chunk_hints(spans)}, timeout=TIMEOUT)
    response.raise_for_status()
    return response.json()["output_ids"], response.json()["meta_info"]["cacheblend"][0]


def state(server) -> dict:
    info = requests.get(server.base_url + "/server_info", timeout=60).json()
    return info["internal_states"][0]["cacheblend"]


def settle(server) -> None:
    wait_for_store_writes(server.base_url, timeout_s=120)


def main(model_path: str, log_dir: str) -> None:
    out: dict = {}
    logs = Path(log_dir)
    with MooncakeService(global_segment_bytes=1 << 30) as service:
        # fp32: the two servers' answers are compared token for token (in bf16 the answers
        # for the concurrently written chunks parted). Standalone chunk KV: counts are chunks'.
        args = ["--enable-cacheblend", *FLOAT32, *STANDALONE_CHUNKS,
                "--cacheblend-min-reused-tokens", "16",
                "--cacheblend-mooncake-master", service.master_addr,
                "--cacheblend-mooncake-metadata", service.metadata_url]
        (logs / "a").mkdir(parents=True, exist_ok=True)
        (logs / "b").mkdir(parents=True, exist_ok=True)
        with running_server(Path(model_path), logs / "a", args) as a, \
                running_server(Path(model_path), logs / "b", args) as b:
            first = chunks(4)
            precompute(a, first)
            settle(a)
            out["a_output"], out["a_report"] = ask(a, first)
            out["b_output"], out["b_report"] = ask(b, first)

            second = chunks(3)
            threads = [threading.Thread(target=precompute, args=(s, second)) for s in (a, b)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            settle(a)
            settle(b)
            requests.post(b.base_url + "/flush_cache", timeout=60).raise_for_status()
            out["a2_output"], _ = ask(a, second)
            out["b2_output"], out["b2_report"] = ask(b, second)
            out["b_tier_after_writers"] = state(b)["store"]["tiers"]["mooncake"]

            service.kill_master()
            started = time.monotonic()
            precompute(b, chunks(3))  # its write-through to Mooncake fails: served anyway
            third = chunks(3)  # never precomputed: looked up in Mooncake, then computed
            out["b3_output"], out["b3_report"] = ask(b, third)
            out["dead_master_s"] = time.monotonic() - started
            out["b_health"] = requests.get(b.base_url + "/health", timeout=30).status_code
            settle(b)
            out["b_tier_after_master"] = state(b)["store"]["tiers"]["mooncake"]
            pool = state(b)["token_pool"]
            out["b_leak_free"] = (pool["available"] + pool["evictable"] + pool["protected"]
                                  == pool["total"] and pool["protected"] == 0)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
