"""Results files round-trip with their configuration, git commit and machine."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from sglang_cacheblend.eval.results import (
    REPO_ROOT,
    git_state,
    load_results,
    machine_info,
    write_results,
)


def test_write_and_load_round_trip(tmp_path: Path):
    rows = [{"mode": "full", "ttft_s": 1.5, "spans": [[0, 3]]}, {"mode": "blend", "extra": None}]
    paths = write_results(tmp_path / "out", "demo", config={"reps": 2, "cmd": "x"}, rows=rows,
                          summary={"best": "blend"})
    loaded = load_results(paths.json)
    assert loaded.name == "demo"
    assert loaded.config == {"reps": 2, "cmd": "x"}
    assert loaded.rows == rows and loaded.summary == {"best": "blend"}

    prov = loaded.provenance
    assert prov["date"].endswith("+00:00")
    assert set(prov["git"]) == {"commit", "dirty"}
    machine = prov["machine"]
    for key in ("cpu_model", "cpu_cores", "ram_bytes", "torch", "sglang", "python"):
        assert key in machine
    assert machine["cpu_cores"] >= 1

    with paths.csv.open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["mode", "ttft_s", "spans", "extra"]
    assert table[0]["spans"] == "[[0, 3]]" and table[1]["mode"] == "blend"


def test_git_state_of_this_checkout_and_of_a_plain_folder(tmp_path: Path):
    state = git_state(REPO_ROOT)
    if state["commit"] is None:
        pytest.skip("not a git checkout")
    assert len(state["commit"]) == 40 and isinstance(state["dirty"], bool)
    assert git_state(tmp_path) == {"commit": None, "dirty": None}


def test_machine_info_reads_proc():
    info = machine_info()
    assert info["cpu_model"] and info["python"].count(".") == 2


def test_load_results_rejects_other_json(tmp_path: Path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="missing name, config, provenance"):
        load_results(path)
    path.write_text("[]")
    with pytest.raises(ValueError, match="JSON object"):
        load_results(path)
    with pytest.raises(ValueError, match="plain file stem"):
        write_results(tmp_path, "a/b", config={}, rows=[])
