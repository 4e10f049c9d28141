"""``sglang-cacheblend bench``, the one TTFT and throughput harness, by job.

:mod:`.run` (the command and its modes), :mod:`.workload` (the prompts), :mod:`.load` (the HTTP
client and the load loops), :mod:`.report` (summaries, ratios, written report), :mod:`.dense`
(``--dense-sdpa``: the in-process dense prefill) and :mod:`.tiers` (``--tiers``: TTFT with the
chunks in the pool, host RAM, disk or Mooncake).
"""
