"""Quality and speed evaluation, kept at arm's length from the product.

No product module imports this package; only ``cli.py`` does, inside the function that runs a
subcommand (``tests/test_import_rules.py`` pins it). The data format and the RAG prompt that the
product shares with these harnesses live in :mod:`sglang_cacheblend.dataset`. Three kinds of
module, by folder:

Shared libraries (imported by the harnesses below, never run):
    ``metrics``          answer F1 / exact match (SQuAD normalisation), KL on a coarsened
                         support, share of the reuse-to-full gap recovered, summary statistics
    ``results``          write and read a results file (JSON + per-row CSV) with its provenance
    ``plots``            quality vs recompute ratio, gap recovered per mode, TTFT vs prompt length
    ``paired``           one mode against another on the same items, with a bootstrap interval
    ``teacher_forcing``  fidelity of a mode to full prefill through a server's own logprobs
    ``context_families`` the chunk contexts ``eval --families`` precomputes chunks after

CLI harnesses (against a real server; each writes its command line with its results):
    ``quality/``         ``sglang-cacheblend eval``: every mode on every item, report, plots;
                         ``modes`` (which modes a run scores), ``run``, ``report``
    ``bench/``           ``sglang-cacheblend bench`` (TTFT and throughput) and ``bench --tiers``;
                         ``run``, ``workload``, ``load``, ``report``, ``dense``, ``tiers``
    ``soak``             ``sglang-cacheblend soak``: a bounded soak on a small pool
    ``bad_inputs``       ``python -m sglang_cacheblend.eval.bad_inputs``: malformed requests and
                         the server's answer to each

Offline research scripts (no server; ``python -m sglang_cacheblend.eval.offline.<name>``):
    ``offline/fidelity``           a blended prefill against full prefill on the embedded model
                                   (the library the two scripts share)
    ``offline/selector_sweep``     every selector x budget on musique items (report and plot)
    ``offline/selection_ceiling``  what oracle rankings close at the same budgets

Importing this package is cheap: submodules are imported where they are used.
"""
