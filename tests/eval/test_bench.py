"""The benchmark's pure parts (``bench/``: run, workload, load, report, tiers): chunk sizing,
workloads, schedules, orders, request bodies, ratios and summaries. No server."""

from __future__ import annotations

import argparse
import sys
import time
from types import SimpleNamespace

import pytest

from sglang_cacheblend.chunks import ChunkedPrompt
from sglang_cacheblend.eval.bench import load, tiers
from sglang_cacheblend.dataset import QAItem
from sglang_cacheblend.eval.bench.load import Reply, closed_loop, open_loop, poisson_schedule
from sglang_cacheblend.eval.bench.report import (
    load_summary,
    markdown_report,
    ratios_against,
    ttft_summary,
    unblended_warnings,
    write_outputs,
)
from sglang_cacheblend.eval.bench.run import (
    add_arguments,
    blend_modes,
    check_arguments,
    mode_names,
    run_ttft,
)
from sglang_cacheblend.eval.bench.workload import make_workload, reorderings, sized_passages
from sglang_cacheblend.eval.results import load_results


def encode(text: str) -> list[int]:
    return [ord(c) for c in text]


def decode(ids) -> str:
    return "".join(map(chr, ids))


ITEMS = [QAItem(0, "q0", ("a",), ("x" * 10, "y" * 10)), QAItem(1, "q1", ("a",), ("z" * 30,))]


def test_sized_passages_truncates_joins_and_wraps():
    assert sized_passages(ITEMS, 0, 2, 4, encode, decode) == ["xxxx", "yyyy"]
    # 15 tokens: a 10-token passage joined by a space with the next one.
    assert sized_passages(ITEMS, 0, 1, 15, encode, decode) == ["x" * 10 + " yyyy"]
    # Starting at item 1, the stream wraps to item 0.
    assert sized_passages(ITEMS, 1, 2, 10, encode, decode) == ["z" * 10, "x" * 10]
    with pytest.raises(ValueError, match="too few passages"):
        sized_passages(ITEMS, 0, 3, 30, encode, decode)


class CharTokenizer:
    """A tokenizer stand-in: one token per character, no special tokens of its own."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> SimpleNamespace:
        assert not add_special_tokens
        return SimpleNamespace(input_ids=encode(text))

    def decode(self, ids, clean_up_tokenization_spaces: bool = True) -> str:
        return decode(ids)


def test_make_workload_sends_the_same_chunks_reversed():
    work = make_workload(ITEMS, 0, 2, 4, CharTokenizer())
    assert work.prompt.passages == ("xxxx\n\n", "yyyy\n\n")
    assert work.prompt_tokens == len(work.ordered.input_ids) == len(work.reordered.input_ids)

    def chunk(prompt, k):
        start, end = prompt.spans[k]
        return prompt.input_ids[start:end]

    assert chunk(work.ordered, 0) == chunk(work.reordered, 1) == tuple(encode("xxxx\n\n"))
    assert chunk(work.ordered, 1) == chunk(work.reordered, 0)


def test_poisson_schedule_is_seeded_and_bounded():
    a = poisson_schedule(2.0, max_requests=50, max_seconds=1000.0, seed=3)
    assert a == poisson_schedule(2.0, max_requests=50, max_seconds=1000.0, seed=3)
    assert a != poisson_schedule(2.0, max_requests=50, max_seconds=1000.0, seed=4)
    assert len(a) == 50 and a[0] == 0.0 and a == sorted(a)
    mean_gap = (a[-1] - a[0]) / 49
    assert 0.25 < mean_gap < 1.0  # 1 / rate = 0.5 s
    short = poisson_schedule(2.0, max_requests=10_000, max_seconds=5.0, seed=0)
    assert len(short) < 10_000 and all(t < 5.0 for t in short)
    with pytest.raises(ValueError):
        poisson_schedule(0.0, max_requests=1, max_seconds=1.0, seed=0)


def test_reorderings_are_seeded_permutations_never_the_original():
    orders = reorderings(3, 20, seed=1)
    assert orders == reorderings(3, 20, seed=1)
    assert all(sorted(o) == [0, 1, 2] and o != [0, 1, 2] for o in orders)
    with pytest.raises(ValueError):
        reorderings(1, 1, seed=0)


def test_ratios_against_baselines():
    ttft = ratios_against({"full": 8.0, "prefix": 4.0, "blend": 2.0}, ("full", "prefix", "gone"),
                          higher_is_better=False)
    assert ttft["blend"] == {"vs_full": 4.0, "vs_prefix": 2.0, "vs_gone": None}
    assert ttft["full"]["vs_full"] == 1.0
    rps = ratios_against({"full": 0.1, "blend": 0.4}, ("full",), higher_is_better=True)
    assert rps["blend"]["vs_full"] == pytest.approx(4.0)


def _ttft_rows():
    rows = []
    for mode, times in {"full": [8, 10, 9], "prefix": [4, 5, 6], "prefix_reordered": [9, 9, 9],
                        "blend@0.15": [2, 3, 2]}.items():
        for rep, t in enumerate(times):
            rows.append({"phase": "ttft", "chunks": 6, "chunk_size": 512, "prompt_tokens": 3200,
                         "mode": mode, "rep": rep, "ttft_s": float(t),
                         "reused_tokens": 3000 + rep if mode.startswith("blend") else None})
    return rows


def test_ttft_summary_medians_and_ratios():
    summary = {r["mode"]: r for r in ttft_summary(_ttft_rows())}
    blend = summary["blend@0.15"]
    assert (blend["min_s"], blend["median_s"], blend["max_s"], blend["n"]) == (2, 2, 3, 3)
    assert blend["vs_full"] == pytest.approx(9 / 2)
    assert blend["vs_prefix"] == pytest.approx(5 / 2)
    assert blend["vs_prefix_reordered"] == pytest.approx(9 / 2)
    assert blend["min_reused_tokens"] == 3000
    assert summary["full"]["min_reused_tokens"] is None


def test_load_summary_throughput_and_ratios():
    rows = []
    for mode, ends in {"full": [10.0, 20.0], "blend@0.15": [2.0, 5.0]}.items():
        for i, end in enumerate(ends):
            rows.append({"loop": "concurrency=2", "mode": mode, "request": i, "start_s": 0.0,
                         "latency_s": end, "end_s": end})
    summary = {r["mode"]: r for r in load_summary(rows)}
    assert summary["full"]["requests_per_s"] == pytest.approx(0.1)
    assert summary["blend@0.15"]["requests_per_s"] == pytest.approx(0.4)
    assert summary["blend@0.15"]["vs_full"] == pytest.approx(4.0)
    assert summary["blend@0.15"]["vs_prefix"] is None


def test_closed_and_open_loops_respect_both_bounds():
    def send(i: int) -> Reply:
        time.sleep(0.01)
        return Reply(0.01, str(i), None)

    done = closed_loop(send, concurrency=3, max_requests=7, max_seconds=60.0)
    assert sorted(i for i, _, _ in done) == list(range(7))
    slow = closed_loop(lambda i: (time.sleep(0.2), Reply(0.2, "", None))[1], concurrency=1,
                       max_requests=1000, max_seconds=0.3)
    assert 1 <= len(slow) <= 3
    opened = open_loop(send, [0.0, 0.02, 0.05])
    assert [i for i, _, _ in opened] == [0, 1, 2]
    assert opened[2][1] >= 0.05


def test_client_generate_marks_chunks_only_with_a_ratio(monkeypatch):
    sent = []

    class Response:
        status_code = 200

        def json(self):
            return {"meta_info": {"id": "rid", "cached_tokens": 4}}

    def post(url, json, timeout):
        sent.append((url, json))
        return Response()

    monkeypatch.setattr(load.requests, "post", post)
    client = load.Client("http://server/")
    prompt = ChunkedPrompt((1, 2, 3, 4, 5), ((1, 3), (3, 4)))
    reply = client.generate(prompt, "salt")
    assert (reply.rid, reply.cached_tokens) == ("rid", 4)
    client.generate(prompt, "salt", 0.0)
    plain, blended = (body for _, body in sent)
    assert sent[0][0] == "http://server/generate" and "kv_hints" not in plain
    assert plain["input_ids"] == [1, 2, 3, 4, 5] and plain["cache_salt"] == "salt"
    assert plain["sampling_params"] == {"temperature": 0, "max_new_tokens": 1}
    payload = blended["kv_hints"]["actions"][0]["payload"]
    assert payload == {"spans": [[1, 3], [3, 4]], "recompute_ratio": 0.0}


def test_arguments_defaults_and_checks():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    check_arguments(args)
    assert mode_names(args.ratios) == ["full", "prefix", "prefix_reordered", "reuse", "blend@0.15"]
    for bad in (["--chunks", "1"], ["--ratios", "0"], ["--reps", "0"], ["--rates", "-1"],
                ["--selectors", "no_such_rule"]):
        with pytest.raises(ValueError):
            check_arguments(parser.parse_args(bad))


def test_markdown_report_lists_every_mode():
    info = {"date": "2026-01-01T00:00:00+00:00", "git": {"commit": "a" * 40, "dirty": True},
            "machine": {"cpu_model": "cpu", "cpu_cores": 2, "ram_bytes": 2**34, "torch": "2",
                        "sglang": "0.5.23", "load_avg": [1.0, 1.0, 1.0]}}
    summary = {"ttft": ttft_summary(_ttft_rows()), "load": [], "skipped": [
        {"chunks": 12, "chunk_size": 1024, "prompt_tokens": 12400, "context_len": 8192}]}
    text = markdown_report({"wall_s": 10.0, "command_line": "sglang-cacheblend bench"}, info,
                           summary, "bench_ttft.png")
    assert "aaaaaaaaaaaa (dirty)" in text and "16 GiB RAM" in text
    row = "| 6 x 512 | 3200 | blend@0.15 | 3 | 2.00 | 2.00 | 3.00 | 4.50x | 2.50x | 4.50x | 3000 |"
    assert row in text
    assert "Skipped 12 x 1024" in text and "![TTFT vs prompt length](bench_ttft.png)" in text
    assert "WARNING" not in text


def test_unblended_modes_are_flagged():
    rows = [r for r in _ttft_rows() if r["mode"] != "blend@0.15" or r["rep"] == 0]
    rows[-1]["reused_tokens"] = 0
    warnings = unblended_warnings(ttft_summary(rows))
    assert len(warnings) == 1 and "blend@0.15 at 6 x 512 was not blended" in warnings[0]


def test_whole_passages_are_the_items_own_passages_uncut():
    work = make_workload(ITEMS, 0, 2, None, CharTokenizer())
    assert work.chunk_size is None
    assert work.prompt.passages == ("x" * 10 + "\n\n", "y" * 10 + "\n\n")
    assert "Question: q0" in work.prompt.suffix


class FakeClient:
    """The server calls ``run_ttft`` makes, recorded; every request takes 1 s."""

    def __init__(self):
        self.sent = []

    def flush(self):
        self.sent.append("flush")

    def generate(self, prompt, salt, ratio=None, selector=None):
        self.sent.append((ratio, selector))
        return Reply(1.0, f"rid{len(self.sent)}", 0)

    def precompute(self, passages, salt):
        return 0.5

    def reused_tokens(self, rid):
        return 7


class FakeDense:
    def seconds(self, prompt):
        return 0.25


def test_ttft_sends_each_selector_per_request_and_times_dense_prefill_last():
    modes = blend_modes([0.15], ["v_deviation"])
    assert mode_names([0.15], ["v_deviation"]) == [
        "full", "prefix", "prefix_reordered", "reuse", "blend@0.15", "blend@0.15 v_deviation"]
    client = FakeClient()
    rows = run_ttft(client, make_workload(ITEMS, 0, 2, 4, CharTokenizer()), modes, rep=0,
                    dense=FakeDense())
    assert client.sent[-3:] == [(0.0, None), (0.15, None), (0.15, "v_deviation")]
    ttft = [r for r in rows if r["phase"] == "ttft"]
    assert [r["mode"] for r in ttft] == [*mode_names([0.15], ["v_deviation"]), "dense_sdpa"]
    assert ttft[-1]["ttft_s"] == 0.25 and ttft[-1]["reused_tokens"] is None


def test_dense_prefill_is_a_ttft_baseline_with_its_own_column_and_never_a_warning():
    rows = _ttft_rows() + [{"phase": "ttft", "chunks": 6, "chunk_size": 512, "prompt_tokens": 3200,
                            "mode": "dense_sdpa", "rep": 0, "ttft_s": 4.0, "reused_tokens": None}]
    summary = {r["mode"]: r for r in ttft_summary(rows)}
    assert summary["blend@0.15"]["vs_dense_sdpa"] == pytest.approx(2.0)
    assert unblended_warnings(list(summary.values())) == []
    text = markdown_report({"wall_s": 1.0, "command_line": "c"}, _INFO,
                           {"ttft": list(summary.values()), "load": [], "skipped": []}, "p.png")
    assert "| vs prefix reordered | vs dense SDPA | reused tokens (min) |" in text
    assert "| 4.50x | 2.50x | 4.50x | 2.00x | 3000 |" in text


_INFO = {"date": "2026-01-01T00:00:00+00:00", "git": {"commit": "a" * 40, "dirty": False},
         "machine": {"cpu_model": "cpu", "cpu_cores": 2, "ram_bytes": None, "torch": "2",
                     "sglang": "0.5.23", "load_avg": None}}


def test_written_results_record_the_command_line(tmp_path):
    config = {"wall_s": 1.0, "command_line": "sglang-cacheblend bench --item 3"}
    paths = write_outputs(tmp_path, "b", config, _ttft_rows(), [])
    assert load_results(paths["json"]).config["command_line"] == config["command_line"]
    assert "Command: `sglang-cacheblend bench --item 3`" in paths["md"].read_text()


def test_the_tier_report_names_the_cpu_count_and_the_item():
    """Regression: the tier report read a machine key that does not exist ("None CPUs")."""
    config = {"command_line": "sglang-cacheblend bench --tiers disk --item 4", "wall_s": 1.0,
              "chunks": 6, "chunk_size": 512, "item": 4, "ratio": 0.15, "reps": 1}
    text = tiers.markdown(config, _INFO, [], "t.png")
    assert "2 CPUs" in text and "Prompt 6 x 512 of item 4" in text
    assert "`sglang-cacheblend bench --tiers disk --item 4`" in text


def test_tiers_mooncake_reruns_the_same_command_in_a_private_namespace(monkeypatch):
    from sglang_cacheblend.store import netns

    argv = ["bench", "--tiers", "disk", "mooncake", "--item", "2"]
    args = SimpleNamespace(url=None, tiers=["disk", "mooncake"], argv=argv)
    run_commands = []
    monkeypatch.setattr(netns, "in_private_netns", lambda: "eth0 is visible")
    monkeypatch.setattr(netns, "mooncake_available", lambda: None)
    monkeypatch.setattr(tiers.subprocess, "run", lambda command, check: (
        run_commands.append(command) or SimpleNamespace(returncode=0)))
    assert tiers.run(args, []) == {}
    assert run_commands[0][0] == "unshare"
    assert run_commands[0][-len(argv) - 3:] == [sys.executable, "-m", "sglang_cacheblend.cli",
                                                *argv]
    monkeypatch.setattr(netns, "mooncake_available", lambda: "needs root")
    with pytest.raises(ValueError, match="needs root"):
        tiers.run(args, [])
