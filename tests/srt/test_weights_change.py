"""Issue 25 G3 in the cache: after SGLang replaces the weights, chunk KV of the old ones is
neither matched in the pool nor keyed like anything the tiers hold."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("sglang")

from sglang_cacheblend.options import ENV_VAR, ServerOptions  # noqa: E402
from sglang_cacheblend.srt import hooks  # noqa: E402
from sglang_cacheblend.srt.radix_cache import CacheBlendRadixCache  # noqa: E402
from tests.srt.test_radix_cache import chunk_insert, make_params  # noqa: E402

CHUNK = [5, 6, 7, 8]


@pytest.fixture
def cache() -> CacheBlendRadixCache:
    return CacheBlendRadixCache(make_params(), model_id="tiny")


def test_the_weight_update_hook_retires_every_chunk_namespace(cache, monkeypatch):
    monkeypatch.setenv(ENV_VAR, ServerOptions(enabled=True).to_env())
    chunk_insert(cache, CHUNK)
    namespace = cache.chunk_namespace()
    key = cache.store_key(namespace, CHUNK)
    assert cache.chunk_index.match(namespace, CHUNK, [(0, 4)])[0].hit
    manager = SimpleNamespace(scheduler=SimpleNamespace(tree_cache=cache))
    hooks._forget_old_weights((True, "ok"), manager, SimpleNamespace(model_path="/new"))
    after = cache.chunk_namespace()
    assert after != namespace
    assert not cache.chunk_index.match(after, CHUNK, [(0, 4)])[0].hit
    assert cache.store_key(after, CHUNK) != key  # a tier's old entry is never found


def test_the_hook_targets_sglangs_weight_update_path():
    target = next(h.target for h in hooks.HOOKS if h.fn is hooks._forget_old_weights)
    import pkgutil

    owner, _, name = target.rpartition(".")
    assert callable(getattr(pkgutil.resolve_name(owner), name))
