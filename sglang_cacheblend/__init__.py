"""sglang-cacheblend: CacheBlend (EuroSys'25) inside SGLang.

RAG prompts are mostly retrieved chunks that were seen before. Prefix caching reuses only a cached
*prefix*; CacheBlend reuses the stored KV of every chunk wherever it sits in the prompt and
recomputes the small share of tokens whose KV deviates most.

Packages, by job:
    ``sglang_cacheblend.blend``   the algorithm in plain torch (no SGLang imports)
    ``radix_ext``                 the non-prefix chunk index (no SGLang imports)
    ``sglang_cacheblend.srt``     the SGLang glue: plugin, radix-cache backend, model path
    ``sglang_cacheblend.embedded_model``  the embedded default model (SmolLM2-135M-Instruct)

Client API: ``chunk(text)`` marks a reusable chunk (``s += cb.chunk(passage)`` in an
``sgl.function``, or inside ``/generate`` text and chat messages); ``precompute_chunks(base_url,
texts)`` stores chunks in a server's chunk index ahead of time; ``chunk_hints(spans, ...)`` marks
chunk spans of ``input_ids`` for ``/generate`` (``kv_hints``), with optional per-request blend
settings.

Importing this package is cheap: it imports neither torch nor sglang.
"""

from sglang_cacheblend.chunks import chunk, chunk_hints, precompute_chunks

__all__ = ["chunk", "chunk_hints", "precompute_chunks"]
__version__ = "0.1.0"
