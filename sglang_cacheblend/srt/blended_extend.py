"""The blended extend: CacheBlend inside SGLang's forward pass, for Llama-family models.

:class:`BlendedExtendMixin` goes in front of an SGLang ``*ForCausalLM`` class (see
``sglang_cacheblend.srt.models``). Decode batches and extend batches with no blended request run
SGLang's stock forward unchanged; an extend batch holding a blended request runs, per request,

1. each missed chunk standalone (after the sink) into slots the cache allocated, then hands it to
   the chunk index, so the next request hits it;
2. every chunk's KV (a pool hit, a miss just computed, or a chunk loaded from a tier below the
   pool) copied into the request's own slots, K RoPE-realigned to the chunk's place in this
   prompt, layer by layer on a loader thread while the layers before it compute
   (:mod:`.layer_loader`);
3. :func:`sglang_cacheblend.blend.forward.blend_layers` on SGLang's own modules and KV pool;

then SGLang's logits processor, so sampling and decode are untouched. Right after, each blended
request's :class:`~sglang_cacheblend.serving.blend_request.BlendOutcome` goes to the cache's
admission (``finish``): the chunks it computed or loaded enter the index, the chunk locks are
released, since the request's own slots now hold the KV, and no later forward of the request
blends again. A blend that raises is logged and that request is prefilled in full in the same
forward (reported as not blended): no request's error reaches the scheduler loop. Each chunked
request's accounting (the cache's decision plus rows recomputed and time) rides back in
``LogitsProcessorOutput.customized_info``, which SGLang returns as ``meta_info["cacheblend"]``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import torch
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.model_executor.forward_context import get_req_to_token_pool, get_token_to_kv_pool

from sglang_cacheblend.blend.forward import blend_layers
from sglang_cacheblend.blend.rotary_config import RotaryConfig
from sglang_cacheblend.config import BlendConfig
from sglang_cacheblend.options import current_options
from sglang_cacheblend.serving.blend_request import (
    BlendOutcome,
    BlendRequest,
    BlendSource,
    ChunkHit,
)
from sglang_cacheblend.serving.layer_loader import ChunkSeeder, LayerPipeline, LoadTimes
from sglang_cacheblend.srt.pool_request_kv import PoolRequestKV
from sglang_cacheblend.srt.sglang_decoder import SGLangDecoderOps

logger = logging.getLogger(__name__)

_BLENDABLE_MODES = (ForwardMode.EXTEND, ForwardMode.MIXED)

META_INFO_KEY = "cacheblend"
"""``meta_info`` key of a chunked request's accounting (a one-element list, SGLang's format)."""

# A request without chunk KV in a blended batch: every row at every layer (a full prefill).
# Check layer 0, so it runs on a one-layer model too.
_FULL = BlendConfig(recompute_ratio=1.0, check_layer=0)


class BlendedExtendMixin:
    """Adds ``attach_blend_source`` and the blended extend to an SGLang Llama-family model."""

    _blend_source: BlendSource | None = None

    def attach_blend_source(self, source: BlendSource) -> None:
        """Called by the ``cacheblend`` radix cache factory once both exist (same scheduler
        process): the model asks the cache's admission for each request's blend."""
        self._blend_source = source
        self._blend_ops = SGLangDecoderOps(self)
        self._blend_rotary = RotaryConfig.from_hf_config(self.config)
        self._blend_pipelined = current_options().pipeline_loads
        # Totals over every blended extend, for /server_info: no request ids, no per-request
        # figures (each request's own accounting goes to its own meta_info only).
        self.blend_totals: Counter[str] = Counter()

    @torch.no_grad()
    def forward(self, input_ids, positions, forward_batch, input_embeds=None,
                get_embedding=False, pp_proxy_tensors=None):
        source = self._blend_source
        # Only prompt extends blend: decode, speculative verify and draft forwards run stock.
        if source is None or forward_batch.forward_mode not in _BLENDABLE_MODES:
            return super().forward(input_ids, positions, forward_batch, input_embeds,
                                   get_embedding, pp_proxy_tensors)
        rids = list(forward_batch.rids)
        requests = [source.blend_request(rid) for rid in rids]
        outcomes: dict[str, BlendOutcome] = {}
        if any(requests) and input_embeds is None and not get_embedding:
            hidden, stats, outcomes = self._blended_extend(input_ids, positions, forward_batch,
                                                           requests)
            output = self.logits_processor(input_ids, hidden, self.lm_head, forward_batch)
        else:
            output = super().forward(input_ids, positions, forward_batch, input_embeds,
                                     get_embedding, pp_proxy_tensors)
            stats = {}
        for rid, request in zip(rids, requests):
            if request is not None:
                source.finish(rid, outcomes.get(rid) or BlendOutcome.not_blended(
                    "the batch took SGLang's own forward (embeddings)"))
        self._report(output, rids, stats)
        return output

    def _report(self, output: Any, rids: list[str], stats: dict[str, dict[str, Any]]) -> None:
        """Attach each chunked request's accounting to the batch output (-> ``meta_info``)."""
        reports = []
        for rid in rids:
            report = self._blend_source.blend_report(rid)
            reports.append(None if report is None else {**report, **stats.get(rid, {})})
        if all(r is None for r in reports) or not hasattr(output, "customized_info"):
            return
        if output.customized_info is None:
            output.customized_info = {}
        output.customized_info[META_INFO_KEY] = reports

    def _blended_extend(
        self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: Any,
        requests: list[BlendRequest | None],
    ) -> tuple[torch.Tensor, dict[str, dict[str, Any]], dict[str, BlendOutcome]]:
        """Prefill each request of the batch in turn.

        Returns the final-normed hidden states, per-request stats, and each blended request's
        outcome. A blend that raises is logged and that request is prefilled in full instead:
        one request's error never reaches the scheduler.
        """
        ops = self._blend_ops
        pool = get_token_to_kv_pool()
        req_to_token = get_req_to_token_pool().req_to_token
        hidden = ops.embed(input_ids)
        stats: dict[str, dict[str, Any]] = {}
        outcomes: dict[str, BlendOutcome] = {}
        offset = 0
        for i, request in enumerate(requests):
            rid = forward_batch.rids[i]
            prefix_len = forward_batch.extend_prefix_lens_cpu[i]
            extend_len = forward_batch.extend_seq_lens_cpu[i]
            if request is not None and request.prompt_len not in (None, prefix_len + extend_len):
                outcomes[rid] = BlendOutcome.not_blended(
                    "the extend does not end at the prompt's end: prefilled in full")
                request = None
            row = int(forward_batch.req_pool_indices_cpu[i])
            slots = req_to_token[row, : prefix_len + extend_len].to(torch.int64)
            kv = PoolRequestKV(pool, ops, slots, prefix_len)
            span = slice(offset, offset + extend_len)
            started = time.perf_counter()
            times = LoadTimes()  # a request that does not blend loads nothing
            if request is not None:
                try:
                    plan, standalone_s, times, outcomes[rid] = self._blend_one(
                        request, hidden[span], positions[span], kv)
                except Exception as exc:  # noqa: BLE001 - never into the scheduler loop
                    logger.exception("request %s: blended prefill failed; prefilling in full", rid)
                    outcomes[rid] = BlendOutcome.not_blended(
                        f"blended prefill failed ({type(exc).__name__}): prefilled in full")
                    request = None
                    times = LoadTimes()
                    hidden[span] = ops.embed(input_ids[span])
            if request is None:
                standalone_s = 0.0
                plan = blend_layers(ops, hidden[span], positions[span],
                                    torch.zeros(extend_len, dtype=torch.bool), kv, _FULL)
            stats[rid] = {
                "load_s": round(times.load_s, 6),
                "load_wait_s": round(times.wait_s, 6),
                "reused_tokens": plan.num_reused,
                "recomputed_rows": plan.recomputed_rows,
                "full_rows": plan.full_rows,
                "standalone_time_s": round(standalone_s, 6),
                "blend_time_s": round(time.perf_counter() - started - standalone_s, 6),
            }
            offset += extend_len
        self.blend_totals.update(
            blended_requests=sum(o.blended for o in outcomes.values()),
            fallbacks=sum(not o.blended for o in outcomes.values()),
            reused_tokens=sum(s["reused_tokens"] for s in stats.values()),
            recomputed_rows=sum(s["recomputed_rows"] for s in stats.values()))
        return self.model.norm(hidden), stats, outcomes

    def _blend_one(self, request: BlendRequest, hidden: torch.Tensor, positions: torch.Tensor,
                   kv: PoolRequestKV) -> tuple[Any, float, LoadTimes, BlendOutcome]:
        """Misses computed standalone, every chunk's KV seeded layer by layer (behind the
        compute when pipelined), the blended layers run.

        Returns the plan, the seconds of standalone compute, the pipeline's load times and the
        outcome that hands the new chunk KV to the index (admission takes it after the batch:
        by then this request has copied it into its own slots)."""
        started = time.perf_counter()
        computed = self._compute_misses(request)
        standalone_s = time.perf_counter() - started
        seeder = ChunkSeeder(kv.pool, kv.slots, kv.prefix_len,
                             [*request.hits, *computed], request.loads, self._blend_rotary)
        reuse_mask = seeder.reuse_mask
        reuse_mask[-1] = False  # the last row's logits feed sampling: always computed
        config = request.config if bool(reuse_mask.any()) else _FULL
        blend_started = time.perf_counter()
        pipeline = LayerPipeline(seeder, self._blend_ops.num_layers,
                                 pipelined=self._blend_pipelined and not kv.slots.is_cuda)
        kv.ready = pipeline.wait
        try:
            plan = blend_layers(self._blend_ops, hidden, positions, reuse_mask, kv, config)
        finally:
            pipeline.close()
            kv.ready = None
        blend_s = time.perf_counter() - blend_started
        times = pipeline.times
        context = request.context
        outcome = BlendOutcome(
            context=context if context is not None and not context.ready else None,
            computed=request.misses, loaded=request.loads,
            seeded_tokens=int(reuse_mask.sum()), load_s=times.load_s,
            compute_s=max(blend_s - times.wait_s, 0.0), computed_rows=plan.recomputed_rows)
        return plan, standalone_s, times, outcome

    def _compute_misses(self, request: BlendRequest) -> list[ChunkHit]:
        """Compute each missed chunk into its fresh slots: standalone after the sink, or after
        the chunk context (whose KV is computed first when the index did not hold it).

        Returns them as hits. They reach the index only after the request has copied them
        (the index frees the slots at once if an equal chunk got there first).
        """
        context = request.context
        if request.misses and context is not None and not context.ready:
            self._prefill_into(context.token_ids, context.kv_loc)
        hits = []
        for miss in request.misses:
            if miss.context is None:
                ids = torch.cat([torch.tensor(miss.sink_ids, dtype=torch.int64), miss.token_ids])
                self._prefill_into(ids, torch.cat([miss.sink_loc, miss.kv_loc]))
            else:
                self._prefill_into(miss.token_ids, miss.kv_loc, after=miss.context.kv_loc)
            hits.append(ChunkHit(miss.start, miss.end, miss.kv_loc, miss.positions))
        return hits

    def _prefill_into(self, ids: torch.Tensor, slots: torch.Tensor, *,
                      after: torch.Tensor | None = None) -> None:
        """Full prefill of ``ids`` into ``slots``, after the KV already in ``after`` (positions
        ``0..`` of the prefix, then the ids' own)."""
        ops = self._blend_ops
        prefix = torch.empty(0, dtype=torch.int64) if after is None else after.to(torch.int64)
        all_slots = torch.cat([prefix.to(slots.device), slots.to(torch.int64)])
        device = all_slots.device
        kv = PoolRequestKV(get_token_to_kv_pool(), ops, all_slots, prefix.numel())
        positions = torch.arange(prefix.numel(), prefix.numel() + ids.numel(), device=device)
        blend_layers(ops, ops.embed(ids.to(device)), positions,
                     torch.zeros(ids.numel(), dtype=torch.bool), kv, _FULL)
