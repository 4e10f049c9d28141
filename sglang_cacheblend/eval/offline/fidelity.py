"""Fidelity of a blended prefill to full prefill, offline: what the selector sweep and the
selection ceiling share.

Both harnesses run the embedded model through transformers (no server) and judge a blended
prefill by the continuation a full prefill generates. Once per item (:func:`prepare_item`): every
chunk's KV standalone after the attention sink (as the server precomputes it), the laid-out
prompt, the full prefill and its greedy continuation. Then per blended prefill
(:func:`evaluate_blend`): the KL to full prefill over that continuation, teacher-forced on the KV
the prompt alone produced (:func:`teacher_forced`; the continuation is never part of the prompt,
so a selector reading the question's queries sees what it sees at generation time), and the
blend's own greedy answer (:func:`greedy`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from sglang_cacheblend.blend.decoder import DecoderOps
from sglang_cacheblend.blend.forward import blended_prefill, extend, extend_with_kv, full_prefill
from sglang_cacheblend.config import BlendConfig

__all__ = [
    "ItemContext", "OfflineModel", "continuation_kl", "evaluate_blend", "greedy",
    "load_offline_model", "prepare_item", "teacher_forced",
]


@dataclass(frozen=True)
class ItemContext:
    """What every blended prefill of one item shares: the laid-out prompt and the full prefill's
    answer."""

    index: int
    input_ids: torch.Tensor  # (N,)
    reuse_mask: torch.Tensor  # (N,) bool: instruction prefix (exact) and chunks
    cached_k: torch.Tensor  # (L, N, Hkv, D) realigned standalone chunk KV
    cached_v: torch.Tensor
    continuation: list[int]  # full prefill's greedy tokens
    answers: tuple[str, ...]  # the dataset's gold answers
    full_logprobs: torch.Tensor  # (T, V) float64, teacher-forced
    full_time_s: float


class OfflineModel(NamedTuple):
    """The embedded model over transformers, and what the offline harnesses need around it."""

    ops: DecoderOps
    encode: Callable[[str], list[int]]  # plain text -> ids, no special tokens added
    decode: Callable[[Sequence[int]], str]
    stop_ids: set[int]
    sink: tuple[int, ...]  # the attention sink chunks are precomputed after (as the server)


def load_offline_model(dtype: torch.dtype) -> OfflineModel:
    """The embedded model (prepared on first use) in ``dtype``, wrapped for ``blend_layers``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sglang_cacheblend.blend.hf_llama import HFLlamaOps
    from sglang_cacheblend.chunks import sink_ids
    from sglang_cacheblend.embedded_model import ensure_model

    path = ensure_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    stop_ids = {i for i in (tokenizer.eos_token_id,) if i is not None}
    return OfflineModel(HFLlamaOps(model), encode, decode, stop_ids,
                        sink_ids(tokenizer.bos_token_id, encode))


def continuation_kl(ctx: ItemContext, logprobs: torch.Tensor) -> torch.Tensor:
    """``(T,)`` KL(full || mode) per continuation position, from the mode's teacher-forced
    ``(T, V)`` log-probs (:func:`teacher_forced`)."""
    p = ctx.full_logprobs
    return (p.exp() * (p - logprobs)).sum(-1)


def greedy(ops: DecoderOps, k: torch.Tensor, v: torch.Tensor, first_logits: torch.Tensor,
           tokens: int, stop_ids: set[int], head: Sequence[int] = ()) -> list[int]:
    """Greedy decode of up to ``tokens`` tokens after a prompt's KV (stopping after a stop id),
    continuing ``head`` (tokens already chosen); one token per step on appended KV."""
    out = list(head) or [int(first_logits.argmax())]
    fed = 0  # out[:fed] are in k/v already
    while len(out) < tokens and out[-1] not in stop_ids:
        step = extend_with_kv(ops, k, v, torch.tensor(out[fed:]))
        k, v = torch.cat([k, step.k], dim=1), torch.cat([v, step.v], dim=1)
        fed = len(out)
        out.append(int(step.logits[-1].argmax()))
    return out


def teacher_forced(ops: DecoderOps, k: torch.Tensor, v: torch.Tensor, first_logits: torch.Tensor,
                   continuation: Sequence[int]) -> torch.Tensor:
    """``(T, V)`` float64 log-probs of every continuation position given the prompt's KV."""
    logits = [first_logits[None].float()]
    if len(continuation) > 1:
        logits.append(extend(ops, k, v, torch.tensor(continuation[:-1])))
    return torch.cat(logits).double().log_softmax(-1)


def prepare_item(ops: DecoderOps, encode: Any, item: Any, passages: int, tokens: int,
                 sink: Sequence[int], stop_ids: set[int], dtype: torch.dtype) -> ItemContext:
    """Chunk KV, layout, full prefill and its greedy continuation for one item."""
    from sglang_cacheblend.blend.offline import blend_prompt, chunk_kv
    from sglang_cacheblend.dataset import build_prompt, tokenize_prompt

    chunked = tokenize_prompt(build_prompt(item, num_passages=passages), encode)
    ids = torch.tensor(chunked.input_ids)
    spans = chunked.spans
    prefix, suffix = ids[: spans[0][0]], ids[spans[-1][1]:]
    sink_t = torch.tensor(list(sink))
    chunks = [chunk_kv(ops, sink_t, ids[s:e], dtype) for s, e in spans]
    prefix_kv = full_prefill(ops, prefix, torch.arange(prefix.numel()), dtype)
    prompt = blend_prompt(ops, ops.rotary, prefix_kv, prefix, chunks, suffix, dtype)
    positions = torch.arange(ids.numel())
    started = time.perf_counter()
    full = blended_prefill(ops, prompt.input_ids, positions, prompt.reuse_mask, prompt.cached_k,
                           prompt.cached_v, BlendConfig(recompute_ratio=1.0))
    full_time = time.perf_counter() - started
    continuation = greedy(ops, full.k, full.v, full.logits, tokens, stop_ids)
    return ItemContext(item.index, prompt.input_ids, prompt.reuse_mask,
                       prompt.cached_k, prompt.cached_v, continuation, item.answers,
                       teacher_forced(ops, full.k, full.v, full.logits, continuation), full_time)


def evaluate_blend(ops: DecoderOps, ctx: ItemContext, name: str, config: BlendConfig,
                   decode: Any, stop_ids: set[int]) -> dict[str, Any]:
    """One blended prefill of the item's prompt under ``config`` and its fidelity numbers, as a
    row named ``name``: ``kl`` (mean over the continuation) and ``kl_first``, ``match`` (its
    greedy answer equals full prefill's), ``f1`` against full prefill's answer and
    ``f1_dataset`` against the gold answers, ``recomputed`` (rows computed / full prefill's)
    and ``time_s`` (wall time of the blended forward)."""
    from sglang_cacheblend.eval.metrics import best_f1, token_f1

    positions = torch.arange(ctx.input_ids.numel())
    started = time.perf_counter()
    res = blended_prefill(ops, ctx.input_ids, positions, ctx.reuse_mask, ctx.cached_k,
                          ctx.cached_v, config)
    elapsed = time.perf_counter() - started
    logprobs = teacher_forced(ops, res.k, res.v, res.logits, ctx.continuation)
    kl_per_pos = continuation_kl(ctx, logprobs)
    agree = (logprobs.argmax(-1) == torch.tensor(ctx.continuation)).tolist()
    first_miss = agree.index(False) if False in agree else len(agree)
    if first_miss == len(agree):
        answer = list(ctx.continuation)
    else:  # its own greedy answer: the agreed head, its own token, then decode on
        head = [*ctx.continuation[:first_miss], int(logprobs[first_miss].argmax())]
        answer = greedy(ops, res.k, res.v, res.logits, len(ctx.continuation), stop_ids, head)
    return {
        "item": ctx.index, "mode": name, "kl": float(kl_per_pos.mean()),
        "kl_first": float(kl_per_pos[0]), "match": float(answer == ctx.continuation),
        "f1": token_f1(decode(answer), decode(ctx.continuation)),
        "f1_dataset": best_f1(decode(answer), ctx.answers),
        "f1_dataset_full": best_f1(decode(ctx.continuation), ctx.answers),
        "recomputed": res.recomputed_rows / res.full_rows, "time_s": elapsed,
        "full_time_s": ctx.full_time_s, "prompt_len": int(ctx.input_ids.numel()),
        "positions": len(ctx.continuation),
    }
