"""Model classes SGLang loads via ``SGLANG_EXTERNAL_MODEL_PACKAGE`` when CacheBlend is on."""
