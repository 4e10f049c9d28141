"""Fidelity to full prefill, measured through a running server's own logprobs.

The question: given the KV a mode leaves for a prompt (full prefill, chunk reuse, CacheBlend at
some ratio), how likely is full prefill's greedy continuation? Teacher forcing has one trap: if
the continuation is appended to the prompt of the blended request, it joins the suffix the
selector looks at, and the blend would select other tokens than at generation time. So a mode
is scored in two requests:

1. ``/generate`` of the prompt alone, as the mode serves it (chunks marked, per-request ratio):
   the server blends it exactly as for a user and inserts the prompt's KV into the prefix tree
   under the mode's blend namespace (:mod:`sglang_cacheblend.srt.blend_keys`). It also returns
   the mode's own greedy answer.
2. ``/generate`` of prompt + continuation in the same namespace, ``max_new_tokens`` 0,
   ``logprob_start_len = len(prompt) - 1``: the prefix match reuses request 1's KV for all but
   the last prompt token (SGLang recomputes that one to produce its logits; its KV was computed
   at every layer by the blend, so nothing changes), no chunk lies outside the prefix, so
   nothing is blended, and the continuation is an ordinary extend on the blended KV. The server
   returns, per continuation position, the log-probabilities of a fixed set of token ids.

Distributions are known on that set only: the top-``k`` ids of full prefill at every position
(union over positions). KL is computed exactly on the coarsening "set ∪ rest"
(:func:`sglang_cacheblend.eval.metrics.coarse_kl`), a lower bound of the full-vocabulary KL
that is tight when the set holds nearly all of full prefill's mass.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import requests

from sglang_cacheblend.chunks import ChunkedPrompt, chunk_hints, precompute_hints


@dataclass(frozen=True)
class Mode:
    """How a prompt is served: full prefill (no chunks) or blended.

    ``recompute_ratio``, ``selector`` and ``gradual`` override the server's blend settings for
    the request (None: the server's); ratio 0.0 is plain chunk reuse. ``chunk_context``
    "none" reuses standalone chunk KV on a server with a chunk context (None: the server's);
    ``context_family`` the chunks precomputed in that family (:meth:`TeacherForcer.precompute`).
    """

    name: str
    blend: bool
    recompute_ratio: float | None = None
    selector: str | None = None
    gradual: tuple[tuple[int, float], ...] | None = None
    chunk_context: str | None = None
    recompute_window: int | None = None
    context_family: str | None = None


FULL = Mode("full", blend=False)
REUSE = Mode("reuse", blend=True, recompute_ratio=0.0)


@dataclass(frozen=True)
class Reference:
    """Full prefill's greedy continuation and the token ids distributions are compared on."""

    answer_ids: tuple[int, ...]
    support: tuple[int, ...]
    first_token_s: float


@dataclass(frozen=True)
class Scored:
    """One mode on one prompt.

    ``answer_ids`` is the mode's own greedy answer (request 1); ``token_logprobs[j]`` is the
    log-probability of the reference's token ``j`` teacher-forced on the mode's KV;
    ``support_logprobs[j]`` maps every support id to its log-probability at position ``j``.
    ``report`` is the server's ``meta_info["cacheblend"]`` of request 1, if any.
    """

    mode: Mode
    answer_ids: tuple[int, ...]
    token_logprobs: tuple[float, ...]
    support_logprobs: tuple[dict[int, float], ...]
    report: dict[str, Any] | None = field(default=None, compare=False)


class TeacherForcer:
    """Scores modes against full prefill on one server (see the module docstring).

    ``cache_salt`` isolates this scorer's prefixes and chunks from other clients; by default
    each scorer gets its own.
    """

    def __init__(self, base_url: str, *, cache_salt: str | None = None,
                 timeout_s: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.cache_salt = cache_salt or uuid.uuid4().hex
        self.timeout_s = timeout_s

    def reference(self, prompt: ChunkedPrompt, *, max_new_tokens: int = 16,
                  top_k: int = 20) -> Reference:
        """Full prefill's greedy continuation, and the union of its top-``k`` ids per step."""
        out = self._generate(
            prompt.input_ids, FULL, (), max_new_tokens=max_new_tokens,
            return_logprob=True, top_logprobs_num=top_k,
        )
        answer = tuple(out["output_ids"])
        if not answer:
            raise ValueError("full prefill produced no tokens to score")
        support = {token for step in out["meta_info"]["output_top_logprobs"]
                   for _, token, *_ in step}
        support.update(answer)
        latency = out["meta_info"].get("e2e_latency", 0.0)
        return Reference(answer, tuple(sorted(support)), float(latency))

    def score(self, prompt: ChunkedPrompt, reference: Reference, mode: Mode, *,
              own_answer: bool = True) -> Scored:
        """Serve ``prompt`` as ``mode`` would, then teacher-force the reference on its KV.

        ``own_answer=False`` generates a single token in request 1 (the KV is the same; the
        mode's greedy answer is then just that token).
        """
        first = None
        if mode.blend:  # full prefill's own answer and KV are the reference's
            new_tokens = len(reference.answer_ids) if own_answer else 1
            first = self._generate(prompt.input_ids, mode, prompt.spans,
                                   max_new_tokens=new_tokens)
        n = len(prompt.input_ids)
        forced = self._generate(
            [*prompt.input_ids, *reference.answer_ids], mode, prompt.spans,
            max_new_tokens=0, return_logprob=True, logprob_start_len=n - 1,
            token_ids_logprob=list(reference.support),
        )
        meta = forced["meta_info"]
        if meta["cached_tokens"] < n - 1:
            raise RuntimeError(
                f"mode {mode.name}: the scoring request reused {meta['cached_tokens']} of "
                f"{n - 1} prompt tokens; the continuation would not be scored on the mode's KV"
            )
        # Entry 0 is the last prompt token itself (no logprob); entry j+1 predicts answer[j].
        token_lps = [lp for lp, *_ in meta["input_token_logprobs"][1:]]
        support_lps = [{token: lp for lp, token, *_ in step}
                       for step in meta["input_token_ids_logprobs"][1:]]
        if first is None:
            return Scored(mode, reference.answer_ids, tuple(token_lps), tuple(support_lps))
        report = (first["meta_info"].get("cacheblend") or [None])[0]
        return Scored(mode, tuple(first["output_ids"]), tuple(token_lps), tuple(support_lps),
                      report)

    def precompute(self, prompt: ChunkedPrompt, family: str,
                   contexts: Sequence[Sequence[int]]) -> float:
        """Compute every chunk of ``prompt`` in context ``family``, chunk ``i`` after
        ``contexts[i]``, in one batched request under this scorer's salt; returns its seconds."""
        if len(contexts) != len(prompt.spans):
            raise ValueError(f"{len(contexts)} contexts for {len(prompt.spans)} chunks")
        body = {
            "input_ids": [list(prompt.input_ids[s:e]) for s, e in prompt.spans],
            "sampling_params": {"max_new_tokens": 0},
            "cache_salt": [self.cache_salt] * len(contexts),
            "kv_hints": [precompute_hints(context_family=family, context_ids=ids)
                         for ids in contexts],
        }
        started = time.perf_counter()
        response = requests.post(f"{self.base_url}/generate", json=body, timeout=self.timeout_s)
        if response.status_code != 200:
            raise RuntimeError(f"precompute answered {response.status_code}: {response.text}")
        return time.perf_counter() - started

    def _generate(self, input_ids: Sequence[int], mode: Mode, spans: Sequence[tuple[int, int]],
                  *, max_new_tokens: int, **extra: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "input_ids": list(input_ids),
            "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens},
            "cache_salt": self.cache_salt,
            **extra,
        }
        if mode.blend:
            body["kv_hints"] = chunk_hints(spans, recompute_ratio=mode.recompute_ratio,
                                           selector=mode.selector, gradual=mode.gradual,
                                           chunk_context=mode.chunk_context,
                                           recompute_window=mode.recompute_window,
                                           context_family=mode.context_family)
        response = requests.post(f"{self.base_url}/generate", json=body, timeout=self.timeout_s)
        if response.status_code != 200:
            raise RuntimeError(f"/generate answered {response.status_code}: {response.text}")
        return response.json()
