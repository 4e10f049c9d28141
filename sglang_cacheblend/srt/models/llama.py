"""SGLang's Llama and Mistral with a blended-extend path (CacheBlend).

Loaded through SGLang's own seam for out-of-tree models: ``SGLANG_EXTERNAL_MODEL_PACKAGE``
(set by ``--enable-cacheblend``) makes SGLang's model registry take these classes for the
architectures they are named after. Decode batches and extend batches with no blended request
run SGLang's stock forward unchanged; an extend batch holding a blended request runs
:func:`sglang_cacheblend.blend.forward.blend_layers` per request on SGLang's own modules and KV
pool, then SGLang's logits processor, so sampling and decode are untouched.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from sglang.srt.model_executor.forward_context import get_req_to_token_pool, get_token_to_kv_pool
from sglang.srt.models.llama import LlamaForCausalLM as _SGLangLlama
from sglang.srt.models.mistral import MistralForCausalLM as _SGLangMistral

from sglang_cacheblend.blend.forward import blend_layers
from sglang_cacheblend.blend.rotary import RotaryConfig
from sglang_cacheblend.config import BlendConfig
from sglang_cacheblend.srt.blend_requests import BlendRequest, BlendRequestSource
from sglang_cacheblend.srt.pool_ops import PoolKVStore, SGLangLlamaOps

logger = logging.getLogger(__name__)


class BlendedExtendMixin:
    """Adds ``attach_blend_source`` and the blended extend to an SGLang Llama-family model."""

    _blend_source: BlendRequestSource | None = None

    def attach_blend_source(self, source: BlendRequestSource) -> None:
        """Called by the ``cacheblend`` radix cache once both exist (same scheduler process)."""
        self._blend_source = source
        self._blend_ops = SGLangLlamaOps(self)
        self._blend_rotary = RotaryConfig.from_hf_config(self.config)
        self.last_blend_stats: dict[str, dict[str, float]] = {}

    def _blend_requests(self, forward_batch: Any) -> list[BlendRequest | None] | None:
        if self._blend_source is None or not forward_batch.forward_mode.is_extend():
            return None
        requests = [self._blend_source.blend_request(rid) for rid in forward_batch.rids]
        return requests if any(r is not None for r in requests) else None

    @torch.no_grad()
    def forward(self, input_ids, positions, forward_batch, input_embeds=None,
                get_embedding=False, pp_proxy_tensors=None):
        requests = self._blend_requests(forward_batch)
        if requests is None or input_embeds is not None or get_embedding:
            return super().forward(input_ids, positions, forward_batch, input_embeds,
                                   get_embedding, pp_proxy_tensors)
        hidden = self._blended_extend(input_ids, positions, forward_batch, requests)
        return self.logits_processor(input_ids, hidden, self.lm_head, forward_batch)

    def _blended_extend(self, input_ids: torch.Tensor, positions: torch.Tensor,
                        forward_batch: Any, requests: list[BlendRequest | None]) -> torch.Tensor:
        """Prefill each request of the batch in turn; return final-normed hidden states."""
        ops = self._blend_ops
        pool = get_token_to_kv_pool()
        req_to_token = get_req_to_token_pool().req_to_token
        hidden = ops.embed(input_ids)
        self.last_blend_stats = {}  # this batch only
        offset = 0
        for i, request in enumerate(requests):
            started = time.perf_counter()
            prefix_len = forward_batch.extend_prefix_lens_cpu[i]
            extend_len = forward_batch.extend_seq_lens_cpu[i]
            row = int(forward_batch.req_pool_indices_cpu[i])
            slots = req_to_token[row, : prefix_len + extend_len].to(torch.int64)
            store = PoolKVStore(pool, ops, slots, prefix_len)
            reuse_mask = torch.zeros(extend_len, dtype=torch.bool)
            config = _FULL if request is None else request.config
            for hit in request.hits if request is not None else ():
                covered = store.seed_chunk(hit, self._blend_rotary)
                if covered is not None:
                    reuse_mask[covered[0]: covered[1]] = True
            reuse_mask[-1] = False  # the last row's logits feed sampling: always computed
            span = slice(offset, offset + extend_len)
            if not bool(reuse_mask.any()):
                config = _FULL
            plan = blend_layers(ops, hidden[span], positions[span], reuse_mask, store, config)
            self.last_blend_stats[forward_batch.rids[i]] = {
                "reused_tokens": int(reuse_mask.sum()),
                "recomputed_rows": plan.recomputed_rows,
                "full_rows": plan.full_rows,
                "blend_time_s": time.perf_counter() - started,
            }
            offset += extend_len
        return self.model.norm(hidden)


# A request without chunk hits in a blended batch: every row at every layer (a full prefill).
_FULL = BlendConfig(recompute_ratio=1.0)


class LlamaForCausalLM(BlendedExtendMixin, _SGLangLlama):
    """SGLang's ``LlamaForCausalLM`` (also SmolLM2) with the blended extend."""


class MistralForCausalLM(BlendedExtendMixin, _SGLangMistral):
    """SGLang's ``MistralForCausalLM`` with the blended extend."""


EntryClass = [LlamaForCausalLM, MistralForCausalLM]
