"""The weights identity in chunk namespaces (issue 25 G3): KV of other weights is never served."""

from __future__ import annotations

import os

from sglang_cacheblend.serving.weights import WeightsIdentity, weights_fingerprint


def _model(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 64)
    return tmp_path


def test_the_fingerprint_moves_with_the_config_and_every_weight_file(tmp_path):
    folder = _model(tmp_path)
    first = weights_fingerprint(folder)
    assert first and weights_fingerprint(folder) == first  # stable across restarts
    weights = folder / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert weights_fingerprint(folder) != first  # rewritten in place
    second = weights_fingerprint(folder)
    (folder / "config.json").write_text('{"hidden_size": 9}')
    assert weights_fingerprint(folder) != second
    third = weights_fingerprint(folder)
    (folder / "extra.safetensors").write_bytes(b"\1")
    assert weights_fingerprint(folder) != third
    (folder / "README.md").write_text("not weights")
    assert weights_fingerprint(folder) == weights_fingerprint(folder)


def test_a_hub_id_has_no_fingerprint(tmp_path):
    assert weights_fingerprint("org/model") == ""
    assert WeightsIdentity("org/model", "abc").current == "org/model@abc"


def test_every_weights_change_is_a_new_identity(tmp_path):
    identity = WeightsIdentity(str(_model(tmp_path)))
    seen = {identity.current}
    for _ in range(3):
        seen.add(identity.changed(str(tmp_path)))
    seen.add(identity.changed(None))  # weights from tensors: no folder to read
    assert len(seen) == 5
