"""SGLang glue: the plugin entry point, server options, the ``cacheblend`` radix-cache backend.

Only this sub-package imports ``sglang``.
"""
