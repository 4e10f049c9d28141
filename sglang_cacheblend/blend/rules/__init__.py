"""HKVD selection rules, one module each; :mod:`sglang_cacheblend.blend.registry` lists them."""
