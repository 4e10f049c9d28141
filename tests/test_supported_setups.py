"""Setups refused at launch that involve the KV Cache Store's settings (review 2: G5)."""

from __future__ import annotations

import argparse

import pytest

from sglang_cacheblend.supported_setups import refuse_unsupported_setups
from sglang_cacheblend.store.config import StoreConfig


def test_data_parallel_ranks_sharing_one_disk_tier_folder_are_refused(tmp_path):
    """Each DP rank builds its own disk tier; on one folder they would evict each other's
    files and double its size, so the launcher stops with the flags named."""
    with_disk = StoreConfig(disk_dir=str(tmp_path))
    with pytest.raises(ValueError, match="cannot be combined with: --dp-size with "
                                         "--cacheblend-disk-tier-dir"):
        refuse_unsupported_setups({"dp_size": 2}, with_disk)


@pytest.mark.parametrize("args, store", [
    ({"dp_size": 2}, StoreConfig(host_mb=64)),  # host RAM: one tier per rank, nothing shared
    ({"dp_size": 2}, None),
    ({"dp_size": 1}, StoreConfig(disk_dir="/var/cache/cacheblend")),
    ({}, StoreConfig(disk_dir="/var/cache/cacheblend")),
])
def test_a_disk_tier_or_data_parallelism_alone_is_served(args, store):
    refuse_unsupported_setups(args, store)


def test_the_launcher_passes_the_store_settings_and_refuses(tmp_path, monkeypatch):
    """The check sees the disk tier although its flag is taken off SGLang's arguments first."""
    pytest.importorskip("sglang")
    from sglang.srt.server_args import ServerArgs

    from sglang_cacheblend import options

    monkeypatch.delenv(options.ENV_VAR, raising=False)
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    options.add_cli_args(parser)
    args = parser.parse_args(["--model-path", "m", "--enable-cacheblend", "--dp-size", "2",
                              "--cacheblend-disk-tier-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--dp-size with --cacheblend-disk-tier-dir"):
        options.apply_to_server_args(args)
