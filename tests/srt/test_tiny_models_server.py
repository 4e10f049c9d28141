"""The blended extend on other Llama-family architectures, served by a real SGLang server.

Tiny random Qwen2, Mistral and Qwen3 checkpoints (4 layers, SmolLM2's tokenizer and vocabulary, float32)
are written to a temp dir and served with ``--enable-cacheblend``. In float32 the server's
blended prefill can be held to the transformers reference of the same weights
(:mod:`sglang_cacheblend.blend.offline`) to a tight tolerance:

- ratio 1.0 gives blending-off's greedy tokens and first-token log-probability;
- ratio 0.0 (plain chunk reuse) gives the offline reuse result of the same chunk KV;
- reordered chunks hit.
"""

from __future__ import annotations

import dataclasses
import shutil
import uuid
from pathlib import Path

import pytest
import requests
import torch

from sglang_cacheblend.chunks import ChunkedPrompt, chunk_hints, precompute_hints, sink_ids
from sglang_cacheblend.config import BlendConfig
from sglang_cacheblend.dataset import build_prompt, load_items, tokenize_prompt
from tests.conftest import STANDALONE_CHUNKS, free_port

SAMPLE = Path(__file__).parent.parent / "data" / "musique_sample.json"
ARCHS = ("qwen2", "mistral", "qwen3")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _tiny_checkpoint(arch: str, out: Path, tokenizer_dir: Path) -> Path:
    import transformers

    torch.manual_seed(0)
    common = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=True, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
    )
    if arch == "qwen2":
        config = transformers.Qwen2Config(**common, rope_theta=1e6)
        model = transformers.Qwen2ForCausalLM(config)
    elif arch == "qwen3":
        config = transformers.Qwen3Config(**common, head_dim=16, rope_theta=1e6)
        model = transformers.Qwen3ForCausalLM(config)
    else:
        config = transformers.MistralConfig(**common, rope_theta=1e4, sliding_window=None)
        model = transformers.MistralForCausalLM(config)
    model.float().save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, model_path, tmp_path_factory):
    """(arch, checkpoint dir, running server) for each architecture."""
    from sglang_cacheblend.launch import ServerProcess

    arch = request.param
    ckpt = _tiny_checkpoint(arch, tmp_path_factory.mktemp(f"tiny-{arch}"), model_path)
    log_path = ckpt / "sglang.log"
    proc = ServerProcess(args=["--enable-cacheblend", "--dtype", "float32",
                               *STANDALONE_CHUNKS], port=free_port(),
                         model_path=ckpt, log_path=log_path)
    try:
        proc.start()
    except Exception:
        print(log_path.read_text()[-5000:])
        raise
    yield arch, ckpt, proc
    proc.stop()


@pytest.fixture(scope="module")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def _prompt(tokenizer, order=None) -> ChunkedPrompt:
    rag = build_prompt(load_items(SAMPLE)[0], num_passages=3)
    rag = rag if order is None else rag.reordered(order)
    return tokenize_prompt(rag, lambda t: tokenizer(t, add_special_tokens=False).input_ids)


def _post(server, body: dict) -> dict:
    response = requests.post(server.base_url + "/generate", json=body, timeout=600)
    assert response.status_code == 200, response.text
    return response.json()


def _precompute(server, prompt: ChunkedPrompt, salt: str) -> None:
    for start, end in prompt.spans:
        _post(server, {"input_ids": list(prompt.input_ids[start:end]), "cache_salt": salt,
                       "sampling_params": {"max_new_tokens": 0}, "kv_hints": precompute_hints()})


def _generate(server, prompt: ChunkedPrompt, salt: str, ratio: float | None) -> dict:
    body = {"input_ids": list(prompt.input_ids), "cache_salt": salt, "return_logprob": True,
            "top_logprobs_num": 5,
            "sampling_params": {"temperature": 0, "max_new_tokens": 4}}
    if ratio is not None:
        body["kv_hints"] = chunk_hints(prompt.spans, recompute_ratio=ratio)
    return _post(server, body)


def _first_logprob(out: dict) -> tuple[int, float]:
    logprob, token, *_ = out["meta_info"]["output_token_logprobs"][0]
    return token, logprob


def test_ratio_one_equals_blending_off(tiny, tokenizer):
    _, _, server = tiny
    salt = uuid.uuid4().hex
    prompt = _prompt(tokenizer)
    _precompute(server, prompt, salt)
    blended = _generate(server, prompt, salt, ratio=1.0)
    assert blended["meta_info"]["cacheblend"][0]["chunk_hits"] == 3
    plain = _generate(server, prompt, uuid.uuid4().hex, ratio=None)
    assert blended["output_ids"] == plain["output_ids"]
    (t1, lp1), (t2, lp2) = _first_logprob(blended), _first_logprob(plain)
    assert t1 == t2 and abs(lp1 - lp2) < 1e-3, (lp1, lp2)


def test_ratio_zero_equals_offline_reuse_of_the_same_chunks(tiny, tokenizer):
    import transformers

    from sglang_cacheblend.blend.hf_llama import HFLlamaOps
    from sglang_cacheblend.blend.offline import blend_prompt, chunk_kv, run_blend
    from sglang_cacheblend.blend.rotary_config import RotaryConfig

    _, ckpt, server = tiny
    salt = uuid.uuid4().hex
    prompt = _prompt(tokenizer, order=[1, 2, 0])
    _precompute(server, prompt, salt)
    out = _generate(server, prompt, salt, ratio=0.0)
    report = out["meta_info"]["cacheblend"][0]
    assert report["blended"] and report["chunk_hits"] == 3

    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32)
    ops = HFLlamaOps(model.eval())
    sink = torch.tensor(sink_ids(tokenizer.bos_token_id, None))
    ids = torch.tensor(prompt.input_ids)
    chunks = [chunk_kv(ops, sink, ids[s:e], torch.float32) for s, e in prompt.spans]
    first, last = prompt.spans[0][0], prompt.spans[-1][1]
    laid_out = blend_prompt(ops, RotaryConfig.from_hf_config(model.config), None, ids[:first],
                            chunks, ids[last:], torch.float32)
    config = dataclasses.replace(BlendConfig(), recompute_ratio=0.0, gradual=())
    with torch.no_grad():
        offline = torch.log_softmax(run_blend(ops, laid_out, config).logits.float(), dim=-1)
    token, logprob = _first_logprob(out)
    assert token == int(offline.argmax())
    assert abs(logprob - float(offline[token])) < 2e-3, (logprob, float(offline[token]))


def test_reordered_chunks_hit(tiny, tokenizer):
    _, _, server = tiny
    salt = uuid.uuid4().hex
    _precompute(server, _prompt(tokenizer), salt)
    out = _generate(server, _prompt(tokenizer, order=[2, 0, 1]), salt, ratio=0.15)
    report = out["meta_info"]["cacheblend"][0]
    assert (report["chunk_hits"], report["chunk_misses"]) == (3, 0) and report["blended"]
    assert 0 < report["recomputed_rows"] < report["full_rows"]
