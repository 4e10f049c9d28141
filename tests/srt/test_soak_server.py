"""The short version of ``sglang-cacheblend soak`` (the full run's figures: docs/reliability.md).

A small pool (it evicts all the time), three clients that share, reorder, miss and repeat
chunks, aborts and hang-ups mixed in; bounded in requests and seconds. The server must not die,
every completed answer must equal the same request served alone, and nothing may leak.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sglang_cacheblend.eval.soak import SoakConfig, run_soak
from tests.conftest import FLOAT32, STANDALONE_CHUNKS, running_server


@pytest.fixture(scope="module")
def soak_server(model_path, tmp_path_factory):
    # fp32: every answer is compared with the same request served alone, in another batch.
    args = ["--enable-cacheblend", *FLOAT32, *STANDALONE_CHUNKS, "--max-total-tokens", "4000"]
    with running_server(model_path, tmp_path_factory.mktemp("soak_server"), args) as proc:
        yield proc


def test_short_soak_keeps_serving_answers_alike_and_leaks_nothing(soak_server):
    data = Path(__file__).resolve().parents[1] / "data" / "musique_dev_20_39.json"
    config = SoakConfig(requests=18, duration_s=400, clients=3, prompts=6, seed=1, data=data)
    report = run_soak(soak_server.base_url, config)
    print(report)
    assert soak_server.is_running() and report.server_deaths == 0
    assert report.errors == [] and report.leaks == []
    assert report.mismatches == []
    assert report.served > 0 and report.blended > 0
    assert report.sent == 18
    assert report.chunk_evictions > 0, "the pool never evicted: not a soak under pressure"
