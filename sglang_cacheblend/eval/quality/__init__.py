"""``sglang-cacheblend eval``, by job: :mod:`.modes` (the configuration and which modes a run
scores), :mod:`.run` (the command: score every item under every mode on a server) and
:mod:`.report` (summary, report files, plots, merging batches)."""
