"""``bench --dense-sdpa``: the fastest dense prefill of the server's weights, without a server.

transformers' forward of the prompt in this process (4-D causal SDPA, the dtype ``serve`` runs
the model in, every CPU thread): no scheduler, no HTTP, no paging. A server's TTFT for the same
prompt can only be slower, so this row bounds what any server-side prefill could reach.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from sglang_cacheblend.chunks import ChunkedPrompt


class DensePrefill:
    """The model loaded once; :meth:`seconds` times one prefill that keeps only the last logits."""

    def __init__(self, model_path: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from sglang_cacheblend.launch import cpu_dtype, has_cuda

        self.dtype = "bfloat16" if has_cuda() else cpu_dtype()  # what `serve` runs the model in
        torch.set_num_threads(os.cpu_count() or 1)
        self._torch = torch
        self._model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, self.dtype), attn_implementation="sdpa").eval()

    def seconds(self, prompt: ChunkedPrompt) -> float:
        """Wall time of one forward of ``prompt.input_ids`` (CPU tensors, no grad)."""
        torch = self._torch
        start = time.perf_counter()
        with torch.inference_mode():
            self._model(torch.tensor([prompt.input_ids]), logits_to_keep=1)
        return time.perf_counter() - start
