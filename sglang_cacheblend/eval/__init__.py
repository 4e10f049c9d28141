"""Quality and speed evaluation: metrics, the musique dataset and prompt, results files, plots.

Modules, by job:
    ``metrics``   answer F1 / exact match (SQuAD normalisation), KL on a coarsened support,
                  share of the reuse-to-full gap recovered, summary statistics
    ``dataset``   load a musique_dev-format file and build the RAG prompt of an item
    ``results``   write and read a results file (JSON + per-row CSV) with its provenance
    ``plots``     quality vs recompute ratio, gap recovered per mode, TTFT vs prompt length
    ``teacher_forcing``  fidelity of a mode to full prefill through a server's own logprobs
    ``quality``   the ``sglang-cacheblend eval`` runner: every mode on every item, report, plots
    ``bench``     TTFT and throughput against a real server (``sglang-cacheblend bench``), with
                  ``load`` (HTTP client, closed and Poisson load loops) and ``bench_report``
    ``offline_fidelity``  a blended prefill against full prefill without a server: the embedded
                  model, one item's prompt and continuation, greedy decoding, continuation KL
    ``selector_sweep``    every selector x budget on musique items, offline (report and plot)
    ``selection_ceiling`` what oracle rankings close at the same budgets, offline

Importing this package is cheap: submodules are imported where they are used.
"""
