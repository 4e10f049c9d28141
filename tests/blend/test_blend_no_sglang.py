"""The pure algorithm package and BlendConfig import with ``sglang`` blocked."""

from __future__ import annotations

from tests.sglang_blocked import run_without_sglang


def test_blend_and_config_import_without_sglang():
    run_without_sglang(
        """
        import importlib, pkgutil
        import sglang_cacheblend.blend as blend
        import sglang_cacheblend.config as config

        for info in pkgutil.walk_packages(blend.__path__, prefix="sglang_cacheblend.blend."):
            importlib.import_module(info.name)
        config.BlendConfig.linear(0.3, 0.15, 1, 8)
        """
    )
