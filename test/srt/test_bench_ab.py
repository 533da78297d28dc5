"""bench_ab end to end on CPU: two real servers (patch off, on), one bench_serving workload."""

from __future__ import annotations

import json
import os

from sglab import bench_ab
from sglab.srt.utils.dummy_model import get_default_model_path


def test_bench_ab_0001_report(tmp_path):
    model = get_default_model_path()
    report = bench_ab.main([
        "--patch", "0001", "--model-path", model, "--repeats", "1",
        "--server-args=--skip-server-warmup", "--out-dir", str(tmp_path), "--tag", "ab",
        "--", "--dataset-name", "random-ids", "--num-prompts", "6", "--random-input-len", "24",
        "--random-output-len", "6", "--tokenizer", model, "--warmup-requests", "1"])
    summary = report["summary"]
    for metric in bench_ab.METRICS:
        assert summary[metric]["off"] > 0 and summary[metric]["on"] > 0
        assert summary[metric]["ratio"] == summary[metric]["on"] / summary[metric]["off"]
    assert summary["outputs_identical"] is True
    assert summary["syncs_per_step"]["off"] >= 9 and summary["syncs_per_step"]["on"] == 0
    runs = report["runs"]
    assert [r["on"] for r in runs] == [False, True]
    assert all(r["result"]["completed"] == 6 for r in runs)
    assert "0001" not in runs[0]["active_patches"] and "0001" in runs[1]["active_patches"]
    with open(tmp_path / "ab.json") as f:
        assert json.load(f)["summary"]["outputs_identical"] is True
    assert "| median_itl_ms |" in (tmp_path / "ab.md").read_text()
    assert os.path.getsize(tmp_path / "ab.png") > 1000
