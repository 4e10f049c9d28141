"""Corpus ingest: documents split into chunks whose KV is precomputed into a CacheBlend server.

:mod:`.corpus` reads and splits (pure), :mod:`.state` is the resumable state file,
:mod:`.batches` plans the chunks and sends them in batches through any ``precompute`` callable,
and :mod:`.runner` is the ``sglang-cacheblend ingest`` command around a server. Importing this
package imports neither torch nor SGLang.
"""

from sglang_cacheblend.ingest.batches import IngestSummary, plan_ingest, precompute_batches
from sglang_cacheblend.ingest.corpus import Chunk, Codec, Document, SplitConfig, read_documents
from sglang_cacheblend.ingest.state import IngestState, ingest_key

__all__ = [
    "Chunk", "Codec", "Document", "IngestState", "IngestSummary", "SplitConfig", "ingest_key",
    "plan_ingest", "precompute_batches", "read_documents",
]
