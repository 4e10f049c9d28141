"""Server setups CacheBlend does not serve, refused at launch with the flag named.

Each of these would otherwise run and go wrong later, in the scheduler: speculative verify
forwards would enter the blended extend; tensor/pipeline parallel ranks and DP attention would
select rows per rank from global head counts; a quantized or fp8 KV cache is written around its
scales when chunk KV is seeded; LoRA layers would be called on row subsets that do not match the
batch's segments; chunk KV is freed per token, so pages must hold one token; without the
radix cache there is no chunk index; and data-parallel ranks would each build a disk tier on the
one ``--cacheblend-disk-tier-dir`` (the second rank's tier is refused the folder, which the
first rank owns, so the server would fail at startup with a less direct message). Refusing at
launch is the honest answer until each works and is tested.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sglang_cacheblend.store.config import StoreConfig

__all__ = ["refuse_unsupported_setups"]


def _unsupported(args: Mapping[str, Any], store: StoreConfig | None) -> list[tuple[str, str]]:
    """``(flag, why)`` for every unsupported setting in parsed server arguments."""
    found = []
    if args.get("speculative_algorithm"):
        found.append(("--speculative-algorithm", "speculative verify forwards are not blended"))
    for name, flag in (("tp_size", "--tp-size"), ("pp_size", "--pp-size")):
        if (args.get(name) or 1) > 1:
            found.append((flag, "selection runs per rank; only one rank is supported"))
    if args.get("enable_dp_attention"):
        found.append(("--enable-dp-attention", "selection runs per rank"))
    if args.get("kv_cache_dtype") not in (None, "auto"):
        found.append(("--kv-cache-dtype", "chunk KV is seeded into an unquantized pool only"))
    if args.get("enable_lora") or args.get("lora_paths"):
        found.append(("--enable-lora/--lora-paths", "LoRA layers cannot run on row subsets"))
    if (args.get("page_size") or 1) > 1:
        found.append(("--page-size", "chunk KV needs page size 1"))
    if args.get("disable_radix_cache"):
        found.append(("--disable-radix-cache", "chunk KV lives in the radix cache"))
    if (args.get("dp_size") or 1) > 1 and store is not None and store.disk_dir is not None:
        found.append(("--dp-size with --cacheblend-disk-tier-dir",
                      "each data-parallel rank would need a disk tier folder of its own"))
    return found


def refuse_unsupported_setups(args: Mapping[str, Any], store: StoreConfig | None = None) -> None:
    """``ValueError`` naming each flag CacheBlend cannot serve with (the launcher stops).

    ``args`` are SGLang's parsed server arguments; ``store`` the KV Cache Store's settings (its
    flags are taken off ``args`` before this runs), None when the caller has none.
    """
    found = _unsupported(args, store)
    if found:
        listed = "; ".join(f"{flag} ({why})" for flag, why in found)
        raise ValueError(f"--enable-cacheblend cannot be combined with: {listed}")
