"""Research scripts that need no server (``python -m sglang_cacheblend.eval.offline.<name>``).

They run the blended prefill of :mod:`sglang_cacheblend.blend` on the embedded model in this
process, where every selector, budget and oracle ranking can be tried at no serving cost:
:mod:`.fidelity` (a blended prefill scored against full prefill: the shared library),
:mod:`.selector_sweep` (every selector x budget) and :mod:`.selection_ceiling` (what oracle
rankings close at the same budgets).
"""
