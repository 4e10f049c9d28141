"""BlendConfig: frozen, validated, schedules."""

from __future__ import annotations

import dataclasses
import itertools
import math
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_cacheblend.config import SELECTOR_NAMES, BlendConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_the_single_check_baseline():
    cfg = BlendConfig()
    assert (cfg.recompute_ratio, cfg.check_layer, cfg.selector) == (0.15, 1, "question_lookahead")
    assert cfg.schedule == ((1, 0.15),)
    assert BlendConfig(0.2, 2, selector="k_deviation").schedule == ((2, 0.2),)


@pytest.mark.parametrize(
    "field, value",
    [
        ("recompute_ratio", -0.1),
        ("recompute_ratio", 1.01),
        ("recompute_ratio", math.nan),
        ("recompute_ratio", True),
        ("recompute_ratio", "0.1"),
        ("check_layer", -1),
        ("check_layer", 1.0),
        ("selector", "nope"),
        ("selector", None),
        ("min_selected_tokens", -1),
        ("min_reused_tokens", -5),
        ("gradual", [(1, 0.15)]),
    ],
)
def test_invalid_fields_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        BlendConfig(**{field: value})


@pytest.mark.parametrize(
    "gradual, message",
    [
        (((2, 0.3), (4, 0.15)), "start at check_layer"),
        (((1, 0.3), (1, 0.15)), "layers must increase"),
        (((1, 0.1), (4, 0.15)), "must not increase"),
        (((1, 0.3), (4, 0.2)), "end at recompute_ratio"),
        (((1, 0.3), (4,)), "gradual"),
        (((1, 1.3), (4, 0.15)), "gradual"),
    ],
)
def test_invalid_gradual_schedules(gradual, message):
    with pytest.raises(ValueError, match=message):
        BlendConfig(recompute_ratio=0.15, check_layer=1, gradual=gradual)


def test_frozen_and_replace_revalidates():
    cfg = BlendConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.recompute_ratio = 0.5  # type: ignore[misc]
    assert dataclasses.replace(cfg, recompute_ratio=0.3).recompute_ratio == 0.3
    with pytest.raises(ValueError, match="recompute_ratio"):
        dataclasses.replace(cfg, recompute_ratio=2.0)
    gradual = BlendConfig.linear(0.3, 0.15, 1, 8)
    with pytest.raises(ValueError, match="end at recompute_ratio"):
        dataclasses.replace(gradual, recompute_ratio=0.1)


def test_linear_schedule():
    cfg = BlendConfig.linear(0.3, 0.15, check_layer=1, end_layer=8, selector="k_deviation")
    layers = [layer for layer, _ in cfg.schedule]
    ratios = [ratio for _, ratio in cfg.schedule]
    assert layers == list(range(1, 9))
    assert ratios[0] == 0.3 and ratios[-1] == 0.15
    assert all(a >= b for a, b in itertools.pairwise(ratios))
    assert cfg.selector == "k_deviation"
    assert BlendConfig.linear(0.3, 0.15, 2, 2).schedule == ((2, 0.15),)
    assert BlendConfig.linear(0.15, 0.15, 1, 3).schedule == ((1, 0.15), (2, 0.15), (3, 0.15))
    with pytest.raises(ValueError, match="must not increase"):
        BlendConfig.linear(0.1, 0.15, 1, 4)
    with pytest.raises(ValueError, match="end_layer"):
        BlendConfig.linear(0.3, 0.15, 4, 2)


def test_selector_names_are_the_registry_and_hold_the_default():
    from sglang_cacheblend.blend.registry import SELECTORS

    assert tuple(SELECTORS) == SELECTOR_NAMES
    assert len(set(SELECTOR_NAMES)) == len(SELECTOR_NAMES) == 8
    assert BlendConfig().selector in SELECTOR_NAMES
    for name in SELECTOR_NAMES:
        assert BlendConfig(selector=name).selector == name


def test_config_imports_without_torch_or_the_blend_package():
    """Option parsers and clients validate a BlendConfig without loading torch or the rules."""
    code = (
        "import sys, sglang_cacheblend.config as c; c.BlendConfig.linear(0.3, 0.15, 1, 8); "
        "assert 'torch' not in sys.modules, 'torch'; "
        "assert not [m for m in sys.modules if m.startswith('sglang_cacheblend.blend')], 'blend'"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_registry_refuses_to_import_when_the_names_drift():
    code = (
        "import sglang_cacheblend.config as c; c.SELECTOR_NAMES = c.SELECTOR_NAMES[:-1]; "
        "import sglang_cacheblend.blend.registry"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0
    assert "RuntimeError" in result.stderr and "SELECTOR_NAMES" in result.stderr
