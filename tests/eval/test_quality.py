"""The quality runner's pure parts: which modes it runs and how it summarises them."""

from __future__ import annotations

import dataclasses
import math

import pytest

from sglang_cacheblend.chunks import ClientAction, chunk_hints, read_client_action
from sglang_cacheblend.config import BlendConfig
from sglang_cacheblend.eval.quality.modes import QualityConfig, modes_for
from sglang_cacheblend.eval.quality.report import merge_runs, summarize_modes, write_report
from sglang_cacheblend.serving.blend_namespace import blend_extra_key
from sglang_cacheblend.serving.blend_settings import effective_config


def test_modes_cover_full_reuse_the_sweep_and_the_variants_at_the_main_ratio():
    modes = {m.name: m for m in modes_for(QualityConfig(ratios=(0.05, 0.15),
                                                        selectors=("k_deviation",)))}
    assert list(modes) == ["full", "reuse", "blend@0.05", "blend@0.15", "k_deviation@0.15",
                           "gradual 0.3->0.15"]
    assert not modes["full"].blend and modes["reuse"].recompute_ratio == 0.0
    gradual = modes["gradual 0.3->0.15"].gradual
    assert gradual[0] == (1, 0.3) and gradual[-1] == (8, 0.15)


def _row(item, mode, kl, match=True):
    return {"item": item, "mode": mode, "kl": kl, "logprob": -kl, "answer_matches_full": match,
            "f1_vs_full": 1.0 if match else 0.5, "dataset_f1": 0.2,
            "recomputed_fraction": 0.2}


def test_summary_means_and_gap_recovered():
    rows = [_row(0, "full", 0.0), _row(1, "full", 0.0),
            _row(0, "reuse", 0.2, False), _row(1, "reuse", 0.4),
            _row(0, "blend@0.15", 0.1), _row(1, "blend@0.15", 0.2, False)]
    summary = summarize_modes(rows)
    assert summary["reuse"]["kl"] == pytest.approx(0.3)
    assert summary["blend@0.15"]["gap_recovered"] == pytest.approx(0.5)
    assert summary["full"]["gap_recovered"] == pytest.approx(1.0)
    assert summary["reuse"]["gap_recovered"] == pytest.approx(0.0)
    assert summary["blend@0.15"]["answer_matches_full"] == pytest.approx(0.5)
    assert summary["blend@0.15"]["items"] == 2
    no_reuse = summarize_modes([_row(0, "full", 0.0)])
    assert math.isnan(no_reuse["full"]["gap_recovered"])


def test_per_request_overrides_travel_in_the_action_and_build_the_config():
    hints = chunk_hints([(3, 9)], recompute_ratio=0.2, selector="k_deviation",
                        gradual=[(1, 0.4), (4, 0.2)])
    action = hints["actions"][0]
    client = read_client_action([(action["action_type"], action["action_version"],
                                  action["payload"])])
    config = effective_config(BlendConfig(), client)
    assert (config.recompute_ratio, config.selector, config.check_layer) == (0.2, "k_deviation", 1)
    assert config.gradual == ((1, 0.4), (4, 0.2))
    # Settings that change the KV change the prefix namespace.
    assert blend_extra_key(None, config) != blend_extra_key(None, BlendConfig())


@pytest.mark.parametrize("overrides, message", [
    (dict(selector="nope"), "selector must be one of"),
    (dict(gradual=[[1, 0.3], "x"]), "gradual steps must be"),
    (dict(gradual="1,0.3"), "gradual must be a list"),
])
def test_bad_overrides_are_rejected_with_the_field_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        effective_config(BlendConfig(), ClientAction(False, ((0, 4),), settings=overrides))


def test_a_schedule_that_contradicts_the_ratio_is_rejected():
    action = ClientAction(False, ((0, 4),),
                          settings={"recompute_ratio": 0.1, "gradual": [[1, 0.3], [8, 0.15]]})
    with pytest.raises(ValueError, match="gradual must end at recompute_ratio=0.1"):
        effective_config(BlendConfig(), action)


def _args(tmp_path, **overrides):
    import argparse

    from sglang_cacheblend.eval.quality.run import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path), "--url", "http://127.0.0.1:1"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_a_run_records_the_commit_it_started_on_not_the_one_checked_out_when_it_ended(
        tmp_path, monkeypatch):
    """Regression: a run of hours recorded whatever commit was checked out when it finished."""
    import transformers

    from sglang_cacheblend import embedded_model
    from sglang_cacheblend.eval import results
    from sglang_cacheblend.eval.quality import run as quality

    checkout = {"commit": "a" * 40}
    monkeypatch.setattr(results, "git_state", lambda *_: {"commit": checkout["commit"],
                                                          "dirty": False})
    monkeypatch.setattr(embedded_model, "ensure_model", lambda: tmp_path)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        staticmethod(lambda *_: SimpleTokenizer()))

    def evaluate(*_):
        checkout["commit"] = "b" * 40  # someone commits while the run goes on
        return [_row(0, "full", 0.0), _row(0, "reuse", 0.2), _row(0, "blend@0.15", 0.1)]

    monkeypatch.setattr(quality, "evaluate", evaluate)
    assert quality.run(_args(tmp_path), [], "test") == 0
    record = results.load_results(tmp_path / "quality.json")
    assert record.provenance["git"]["commit"] == "a" * 40
    assert record.provenance["finished"] >= record.provenance["date"]


def test_a_merge_keeps_every_runs_provenance(tmp_path):
    config = QualityConfig(ratios=(0.15,), selectors=(), gradual_end_layer=None)
    for k, commit in enumerate(("a", "b")):
        rows = [_row(k, "full", 0.0), _row(k, "reuse", 0.2), _row(k, "blend@0.15", 0.1)]
        write_report(tmp_path / f"batch_{k}", config, rows, summarize_modes(rows), "t",
                     {"date": "d", "git": {"commit": commit * 40}, "machine": {}})
    merged, rows, runs = merge_runs([tmp_path / "batch_0", tmp_path / "batch_1"])
    assert merged.items == 2 and len(rows) == 6
    assert [run["git"]["commit"] for run in runs] == ["a" * 40, "b" * 40]
    assert runs[1]["folder"] == str(tmp_path / "batch_1")


class SimpleTokenizer:
    def decode(self, ids, **_):
        return " ".join(map(str, ids))


def test_skipped_modes_are_left_out_and_a_bad_name_or_a_baseline_is_refused():
    config = QualityConfig(ratios=(0.15,), selectors=("v_deviation",), gradual_end_layer=None,
                           chunk_context="builtin")
    every = [m.name for m in modes_for(config)]
    assert "ctx v_deviation@0.15" in every
    kept = [m.name for m in modes_for(dataclasses.replace(
        config, skip_modes=("ctx v_deviation@0.15",)))]
    assert kept == [name for name in every if name != "ctx v_deviation@0.15"]
    with pytest.raises(ValueError, match="'ctx nope' is not a mode of this run"):
        modes_for(dataclasses.replace(config, skip_modes=("ctx nope",)))
    with pytest.raises(ValueError, match="cannot be skipped"):
        modes_for(dataclasses.replace(config, skip_modes=("reuse",)))
